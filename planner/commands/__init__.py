"""CLI command groups, one module per noun. Commands parse options and call the library."""

from __future__ import annotations

import click

from .calibrate import calibrate_cmd
from .engines import engines
from .export import export_cmd, verify_cmd
from .models import models
from .optimize import optimize_cmd
from .plan import plan_group
from .profiles import profiles
from .quality import quality
from .simulate import simulate_cmd
from .sweep import sweep_cmd
from .trace import trace

__all__ = ["COMMANDS"]

COMMANDS: list[click.Command] = [optimize_cmd, simulate_cmd, sweep_cmd, export_cmd, verify_cmd, calibrate_cmd, profiles, engines, models, trace,
                                 plan_group, quality]
