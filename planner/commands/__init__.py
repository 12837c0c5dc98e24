"""CLI command groups, one module per noun. Commands parse options and call the library."""

from __future__ import annotations

import click

from .models import models
from .profiles import profiles
from .trace import trace

__all__ = ["COMMANDS"]

COMMANDS: list[click.Command] = [profiles, models, trace]
