"""The runtime's user-facing error: one line naming the file, the key, the value, what was
expected and a fix (the same shape as the planner's ``InputError``, without importing it:
this package is copied into bundles that run without the planner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["RuntimeInputError"]

_UNSET = object()


class RuntimeInputError(ValueError):
    """Bad input to the runtime (plan, checkpoint, kernels, arguments); ``exit_code`` 1."""

    exit_code = 1

    def __init__(self, message: str, *, file: str | Path | None = None, key: str | None = None,
                 value: Any = _UNSET, expected: str | None = None, fix: str | None = None) -> None:
        where = str(file) if file is not None else ""
        if key:
            where = f"{where}: {key}" if where else key
        parts = [f"{where}: {message}" if where else message]
        if value is not _UNSET:
            shown = repr(value)
            parts.append(f"got {shown if len(shown) <= 80 else shown[:77] + '...'}")
        if expected:
            parts.append(f"expected {expected}")
        text = "; ".join(parts) + (f". Fix: {fix}" if fix else "")
        super().__init__(" ".join(text.split()))  # always one line
