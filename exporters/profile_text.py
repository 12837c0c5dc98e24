"""Write measured values into a YAML profile's text, keeping its comments and layout.

``planner engines probe`` re-measures a few keys of an engine profile (the bundled
``profiles/engines/bundle.yaml`` when it is re-probed); a YAML dump of the whole document
would drop the file's comments, which say what each figure is. :func:`update_yaml_text`
replaces only the given keys' lines, each with its new value as a one-line flow mapping, and
checks that the text it returns loads as the document it was asked to write.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import yaml

__all__ = ["update_yaml_text"]


_PLAIN = re.compile(r"^[0-9][0-9.]*[A-Za-z/]+$")  # a unit-suffixed number ("1.2ms", "900GB/s"): no quotes


def _flow(value: Any) -> str:
    """``value`` as a one-line YAML flow node, written as the bundled profiles write them
    (``{value: 1.1ms, source: "probe (...)"}``)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, str) and _PLAIN.match(value):
        return value
    return json.dumps(value, ensure_ascii=False)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _entry(lines: list[str], section: str | None, key: str) -> tuple[int, int] | None:
    """``(first, end)`` line indices of ``key``'s entry (in top-level ``section``, or at the
    top level for None): its line and the more-indented lines under it."""
    inside = section is None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        depth = _indent(line)
        if depth == 0:
            inside = section is None or stripped.startswith(f"{section}:")
            if section is None and stripped.startswith(f"{key}:"):
                return i, _end(lines, i)
            continue
        if inside and section is not None and depth > 0 and stripped.startswith(f"{key}:"):
            return i, _end(lines, i)
    return None


def _end(lines: list[str], first: int) -> int:
    depth, end = _indent(lines[first]), first + 1
    while end < len(lines) and lines[end].strip() and _indent(lines[end]) > depth:
        end += 1
    return end


def update_yaml_text(text: str, doc: dict[str, Any], keys: Sequence[tuple[str | None, str]],
                     sources_prefix: str | None = None) -> str | None:
    """``text`` with each of ``keys`` (``(top-level section or None, key)``) set to its value
    in ``doc``; with ``sources_prefix``, the ``sources`` list item starting with it replaced
    by ``doc``'s (appended when missing). A key missing from ``text`` is added after the
    entry before it in ``keys`` (same section). Returns None where the text cannot be
    updated so that it loads as ``doc`` (then write the whole document instead)."""
    lines = text.splitlines()
    previous: tuple[int, int] | None = None
    for section, key in keys:
        value = doc[section][key] if section else doc[key]
        at = _entry(lines, section, key)
        if at is None:
            if previous is None:
                return None
            indent = " " * _indent(lines[previous[0]])
            lines.insert(previous[1], f"{indent}{key}: {_flow(value)}")
            previous = (previous[1], previous[1] + 1)
            continue
        first, end = at
        indent = " " * _indent(lines[first])
        lines[first:end] = [f"{indent}{key}: {_flow(value)}"]
        previous = (first, first + 1)
    if sources_prefix is not None:
        new = [s for s in doc.get("sources", []) if str(s).startswith(sources_prefix)]
        at = _entry(lines, None, "sources")
        if at is None or len(new) != 1:
            return None
        first, end = at
        items = [i for i in range(first + 1, end) if lines[i].lstrip().startswith(f"- {sources_prefix}")]
        item = f"{' ' * (_indent(lines[end - 1]) if end - 1 > first else 2)}- {_flow(new[0])}"
        if items:
            lines[items[0]] = item
        else:
            lines.insert(end, item)
    out = "\n".join(lines) + "\n"
    try:
        loaded = yaml.safe_load(out)
    except yaml.YAMLError:
        return None
    return out if loaded == json.loads(json.dumps(doc)) else None
