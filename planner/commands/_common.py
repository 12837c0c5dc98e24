"""Options every command shares (``--json``, ``--debug``), bounded option types, and output paths."""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import click

from profiles.errors import InputError

from ..output import get_output

__all__ = ["common_options", "FiniteFloat", "check_output_path", "writing"]


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


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses nan and inf (nan passes every comparison)."""

    name = "finite float range"

    def convert(self, value, param, ctx):  # noqa: D102
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class Seconds(click.ParamType):
    """A positive time: a plain number of seconds or a time with its unit (``2s``, ``100ms``), as
    ``planner sweep``'s SLOs take it (:func:`profiles.units.parse_time`)."""

    name = "time"

    def convert(self, value, param, ctx):  # noqa: D102
        from profiles.units import parse_time

        try:
            seconds = float(value)  # a plain number: seconds
        except ValueError:
            try:
                seconds = parse_time(value)
            except InputError as exc:
                self.fail(f"{value!r}: {exc.message}; expected a time such as 2, 2s or 100ms.", param, ctx)
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(f"{value!r} is not a positive time.", param, ctx)
        return seconds


def check_output_path(path: str | Path | None, flag: str, *, force: bool = False, directory: bool = False) -> None:
    """Refuse an output path before any work: it exists (without ``force``), or its directory
    cannot be created or written.

    Missing parent directories are fine (they are created when written), as long as the
    nearest existing one is a writable directory.
    """
    if path is None:
        return
    path = Path(path)
    if path.exists() and not directory and not force:
        raise InputError("output file exists", file=path, fix="pass --force to overwrite it, or choose another path")
    if path.exists() and not directory and path.is_dir():
        raise InputError("output path is a directory", file=path, key=flag, fix="name a file")
    if directory and path.exists() and not path.is_dir():
        raise InputError("output path is a file, not a directory", file=path, key=flag, fix="name a directory")
    parent = path if directory else path.parent
    probe = parent.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError("cannot write there: a parent is not a directory", file=path, key=flag, value=str(probe),
                         fix="choose a path inside a directory")
    try:  # os.access says yes to root on a read-only mount: try a file
        if not os.access(probe, os.W_OK | os.X_OK):
            raise PermissionError
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError:
        raise InputError("cannot write there: the directory is not writable", file=path, key=flag, value=str(probe),
                         fix="choose a writable directory") from None


@contextmanager
def writing(path: str | Path, flag: str) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` (read-only file system, disk full) into one line."""
    try:
        yield
    except OSError as exc:
        raise InputError(f"cannot write the output ({exc.strerror or exc})", file=path, key=flag,
                         fix="choose a writable path with free space") from None


def validate_files(files: tuple[str, ...], check: Callable[[str], dict], describe: Callable[[dict], str]) -> None:
    """The `validate` commands: ``check(file)`` loads one file (raising UserError) and returns
    what to report; ``ok: FILE (describe(row))`` per good file, one ``error:`` line per bad
    one on stderr, exit 1 when any is bad."""
    from profiles.errors import UserError

    results = []
    for f in files:
        try:
            results.append({"file": f, "ok": True, **check(f)})
        except UserError as exc:
            results.append({"file": f, "ok": False, "error": str(exc)})

    def render(console):
        for r in results:
            if r["ok"]:
                console.print(f"ok: {r['file']} ({describe(r)})", highlight=False)
    get_output().emit(results, render)
    for r in results:
        if not r["ok"]:
            click.echo(f"error: {r['error']}", err=True)
    if any(not r["ok"] for r in results):
        raise click.exceptions.Exit(1)
