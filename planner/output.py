"""How commands print: ``--json`` puts only JSON on stdout; tables, logs and progress go to
stderr then. Without ``--json`` tables go to stdout."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import click
from rich.console import Console

__all__ = ["Output", "get_output", "to_jsonable"]


@dataclass
class Output:
    json_mode: bool = False
    debug: bool = False

    @property
    def console(self) -> Console:
        """Console for human-readable output: stderr in --json mode, stdout otherwise."""
        return Console(file=sys.stderr if self.json_mode else sys.stdout, soft_wrap=False, width=_width())

    @property
    def log(self) -> Console:
        """Console for logs and progress: always stderr."""
        return Console(file=sys.stderr, width=_width())

    def emit(self, data: Any, render: Callable[[Console], None] | None = None) -> None:
        """Print ``data`` as JSON (``--json``) or call ``render`` with a console."""
        if self.json_mode:
            click.echo(json.dumps(to_jsonable(data), indent=2, sort_keys=False))
        elif render is not None:
            render(self.console)
        else:
            click.echo(json.dumps(to_jsonable(data), indent=2))


def _width() -> int | None:
    return None if sys.stdout.isatty() else 120


def get_output() -> Output:
    ctx = click.get_current_context()
    root = ctx.find_root()
    if not isinstance(root.obj, Output):
        root.obj = Output()
    return root.obj


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: dataclasses, pydantic models, numpy scalars/arrays, inf -> null."""
    import dataclasses

    if hasattr(obj, "model_dump"):
        return to_jsonable(obj.model_dump(mode="json"))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
