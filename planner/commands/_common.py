"""Options every command shares: ``--json`` and ``--debug`` also work after the subcommand."""

from __future__ import annotations

from typing import Callable

import click

from ..output import get_output

__all__ = ["common_options"]


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        get_output().json_mode = True


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        get_output().debug = True


def common_options(func: Callable) -> Callable:
    """Add ``--json`` and ``--debug`` to a command (same meaning as on ``planner``)."""
    func = click.option("--json", "json_flag", is_flag=True, expose_value=False, is_eager=True, callback=_set_json,
                        help="Print only JSON on stdout.")(func)
    func = click.option("--debug", "debug_flag", is_flag=True, expose_value=False, is_eager=True,
                        callback=_set_debug, help="Show tracebacks for errors.")(func)
    return func
