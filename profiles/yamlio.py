"""Read YAML and JSON user files safely, remembering the line of every key path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

__all__ = ["load_yaml", "load_json"]


def load_yaml(path: str | Path) -> tuple[Any, dict[tuple, int]]:
    """Load a YAML file with ``yaml.safe_load`` semantics.

    Returns:
        ``(data, lines)`` where ``lines`` maps a key path tuple such as
        ``("nodes", 0, "devices")`` to the 1-based line on which it stands.

    Raises:
        InputError: the file is missing, unreadable or not valid YAML.
    """
    path = Path(path)
    text = _read_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"malformed YAML ({problem})", file=path, line=line,
                         fix="check indentation, colons and quoting at that line") from None
    lines: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines


def load_json(path: str | Path) -> Any:
    """Load a JSON file; a syntax error names the line and column."""
    path = Path(path)
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON ({exc.msg} at column {exc.colno})", file=path,
                         line=exc.lineno, fix="check commas, quotes and brackets at that line") from None


def _read_text(path: Path) -> str:
    if not path.exists():
        raise InputError("file not found", file=path, fix="check the path")
    if path.is_dir():
        raise InputError("is a directory, not a file", file=path, fix="name a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError("not a UTF-8 text file", file=path, fix="save it as UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror})", file=path, fix="check permissions") from None


def _walk(node: yaml.Node, path: tuple, lines: dict[tuple, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (path + (key_node.value,))
            lines[key] = key_node.start_mark.line + 1
            _walk(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines)
