"""User-facing errors: one line that names the file, the key path, the value, what was
expected and how to fix it.

Every error a user can cause derives from :class:`UserError`; the CLI prints its one-line
message and exits with its ``exit_code`` (1 bad input, 3 infeasible plan). Anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["UserError", "InputError", "InfeasibleError", "from_validation_error", "format_key"]


class UserError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""

    exit_code = 1


class InputError(UserError, ValueError):
    """Bad input: a file, key or value that cannot be used.

    Args:
        message: what is wrong, in a few words.
        file: the file the value came from (``None`` for command-line values).
        key: the key path inside the file, e.g. ``nodes[0].devices[1].memory_bytes``.
        value: the offending value, shown with ``repr``.
        expected: what would have been accepted.
        fix: how to fix it.
        line: 1-based line number in ``file`` where the key stands, when known.
    """

    _UNSET = object()

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        key: str | None = None,
        value: Any = _UNSET,
        expected: str | None = None,
        fix: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.key = key
        self.value = value
        self.expected = expected
        self.fix = fix
        self.line = line
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line else "")
        if self.key:
            where = f"{where}: {self.key}" if where else self.key
        parts = [f"{where}: {self.message}" if where else self.message]
        if self.value is not InputError._UNSET:
            shown = repr(self.value)
            if len(shown) > 80:
                shown = shown[:77] + "..."
            parts.append(f"got {shown}")
        if self.expected:
            parts.append(f"expected {self.expected}")
        text = "; ".join(parts)
        if self.fix:
            text += f". Fix: {self.fix}"
        return " ".join(text.split())  # always one line

    def located(self, file: str | Path | None = None, key_prefix: str | None = None,
                line: int | None = None) -> "InputError":
        """Return a copy with the file, a key prefix or a line number filled in."""
        key = self.key
        # a validator that names its own full path (a layer's ``layers[3].planes``) keeps it
        named = bool(key) and (key == key_prefix or key.startswith((f"{key_prefix}.", f"{key_prefix}[")))
        if key_prefix and not named:
            key = f"{key_prefix}.{key}" if key and not key.startswith("[") else f"{key_prefix}{key or ''}"
        return InputError(
            self.message,
            file=file if file is not None else self.file,
            key=key,
            value=self.value,
            expected=self.expected,
            fix=self.fix,
            line=line if line is not None else self.line,
        )


class InfeasibleError(UserError):
    """The inputs admit no plan: names the binding resource, the shortfall and a way out."""

    exit_code = 3


def format_key(loc: tuple[Any, ...] | list[Any]) -> str:
    """Render a key path: ``("nodes", 0, "devices", 1, "kind")`` -> ``nodes[0].devices[1].kind``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def from_validation_error(exc: Any, *, file: str | Path | None = None,
                          lines: dict[tuple, int] | None = None,
                          fixes: dict[str, str] | None = None) -> InputError:
    """Turn the first error of a pydantic ``ValidationError`` into an :class:`InputError`.

    Args:
        exc: the ``pydantic.ValidationError``.
        file: the file that was validated.
        lines: key path tuple -> line number, from :func:`profiles.yamlio.load_yaml`.
        fixes: error type -> fix text, for errors whose fix is generic.
    """
    err = exc.errors(include_url=False)[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # pydantic appends the union member / validator name to loc; drop tags it adds itself.
    loc = tuple(p for p in loc if p not in ("tagged-union", "union"))
    etype = err["type"]
    msg = err["msg"]
    ctx = err.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, InputError):
        # raised by one of our own validators: keep its wording, add the location
        line = _line_for(loc, lines)
        return inner.located(file=file, key_prefix=format_key(loc) or None, line=line)
    expected = None
    fix = (fixes or {}).get(etype)
    if etype == "extra_forbidden":
        msg = "unknown key"
        fix = fix or "remove it or check its spelling against the schema (`planner profiles schema` prints it)"
    elif etype == "missing":
        msg = "required key is missing"
        fix = fix or "add it"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    elif etype in ("literal_error", "enum"):
        expected = msg.replace("Input should be ", "")
        msg, fix = "invalid value", fix or "use one of the listed values"
    elif etype in _RANGE_ERRORS:
        expected = msg.replace("Input should be ", "a value ")
        msg, fix = "out of range", fix or "use a value in that range"
    elif etype in ("too_short", "too_long"):
        expected = msg.replace("List should have ", "").replace("Tuple should have ", "")
        msg, fix = "wrong number of entries", fix or "add or remove entries"
    elif etype.endswith("_type") or etype.endswith("_parsing"):
        expected = msg.replace("Input should be ", "")
        msg, fix = "wrong type", fix or "write a value of that type"
    value = err.get("input", InputError._UNSET) if etype != "missing" else InputError._UNSET
    if etype == "extra_forbidden":
        value = InputError._UNSET
    return InputError(msg, file=file, key=format_key(loc), value=value, expected=expected,
                      fix=fix, line=_line_for(loc, lines))


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
                 "finite_number"}


def _line_for(loc: tuple, lines: dict[tuple, int] | None) -> int | None:
    if not lines:
        return None
    loc = tuple(loc)
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return None
