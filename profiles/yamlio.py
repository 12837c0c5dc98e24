"""Read YAML and JSON user files safely, remembering the line of every key path.

Both readers bound what a file may ask of us (:mod:`profiles.limits`): its size, nesting
depth, integer digits and, for YAML, aliases and the expanded size of the document. YAML
keys must be unique in a mapping (a repeated key would silently override the first).
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError, format_key
from .limits import MAX_INT_DIGITS, MAX_NESTING, MAX_TEXT_FILE_BYTES, MAX_YAML_ALIASES, MAX_YAML_NODES
from .units import format_size

__all__ = ["load_yaml", "load_json", "loads_json", "read_text"]


def load_yaml(path: str | Path) -> tuple[Any, dict[tuple, int]]:
    """Load a YAML file with ``yaml.safe_load`` semantics.

    Returns:
        ``(data, lines)`` where ``lines`` maps a key path tuple such as
        ``("nodes", 0, "devices")`` to the 1-based line on which it stands.

    Raises:
        InputError: the file is missing, unreadable, too large, not valid YAML, repeats a
            key in one mapping, or uses too many aliases.
    """
    path = Path(path)
    text = read_text(path)
    if _FLOW_BOMB.search(text):  # "[[[[..." 100,000 deep: refused before the recursive parser sees it
        raise InputError(f"nested too deeply (over {MAX_NESTING} levels)", file=path, fix="flatten the document")
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        lines: dict[tuple, int] = {}
        if node is not None:
            _check_size(node, path)
            _walk(node, (), lines, path)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"malformed YAML ({problem})", file=path, line=line,
                         fix="check indentation, colons and quoting at that line") from None
    except _TooMany as exc:
        raise InputError(exc.args[0], file=path, line=exc.args[1], fix=exc.args[2]) from None
    except RecursionError:
        raise InputError(f"nested too deeply (over {MAX_NESTING} levels)", file=path,
                         fix="flatten the document") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise InputError(f"unreadable value ({str(exc).splitlines()[0]})", file=path,
                         fix="write numbers with at most 30 digits") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, lines


def load_json(path: str | Path) -> Any:
    """Load a JSON file; a syntax error names the line and column."""
    path = Path(path)
    return loads_json(read_text(path), file=path)


def loads_json(text: str, *, file: str | Path | None = None) -> Any:
    """Parse JSON text within the bounds of :mod:`profiles.limits`; NaN and Infinity are refused."""
    try:
        data = json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON ({exc.msg} at column {exc.colno})", file=file,
                         line=exc.lineno, fix="check commas, quotes and brackets at that line") from None
    except RecursionError:
        raise InputError(f"nested too deeply (over {MAX_NESTING} levels)", file=file,
                         fix="flatten the document") from None
    except InputError as exc:
        raise exc.located(file=file) from None
    if _depth(data) > MAX_NESTING:
        raise InputError(f"nested too deeply (over {MAX_NESTING} levels)", file=file, fix="flatten the document")
    return data


def read_text(path: Path) -> str:
    """The UTF-8 text of a regular file of at most ``MAX_TEXT_FILE_BYTES``."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError("file not found", file=path, fix="check the path") from None
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror})", file=path, fix="check the path and permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError("is a directory, not a file", file=path, fix="name a file")
    if not stat.S_ISREG(st.st_mode):  # /dev/zero, a FIFO: they never end
        raise InputError("not a regular file", file=path, fix="name a file on disk")
    if st.st_size > MAX_TEXT_FILE_BYTES:
        raise InputError("file too large", file=path, value=format_size(st.st_size),
                         expected=f"at most {format_size(MAX_TEXT_FILE_BYTES)}", fix="name the right file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_TEXT_FILE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read file ({exc.strerror})", file=path, fix="check permissions") from None
    if len(raw) > MAX_TEXT_FILE_BYTES:
        raise InputError("file too large", file=path, expected=f"at most {format_size(MAX_TEXT_FILE_BYTES)}",
                         fix="name the right file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("not a UTF-8 text file", file=path, fix="save it as UTF-8 text") from None


# --------------------------------------------------------------------------- JSON


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise InputError("integer too long", value=text[:20] + "...", expected=f"at most {MAX_INT_DIGITS} digits",
                         fix="write a realistic number")
    return int(text)


def _refuse_constant(name: str) -> float:
    raise InputError(f"{name} is not a number JSON allows", value=name, expected="a finite number",
                     fix="write a finite number")


def _depth(data: Any) -> int:
    """Nesting depth of lists/dicts, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        obj, d = stack.pop()
        if isinstance(obj, dict):
            obj = list(obj.values())
        if isinstance(obj, list):
            deepest = max(deepest, d)
            if d > MAX_NESTING:
                return d
            stack.extend((v, d + 1) for v in obj if isinstance(v, (list, dict)))
    return deepest


# --------------------------------------------------------------------------- YAML


_FLOW_BOMB = re.compile(r"(?:[\[{]\s*){%d}" % (MAX_NESTING + 1))


class _TooMany(Exception):
    """(message, line, fix): a document beyond the bounds."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that counts aliases and refuses integers too long to be real."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent, index):  # noqa: D102
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                mark = self.peek_event().start_mark
                raise _TooMany(f"too many YAML aliases (over {MAX_YAML_ALIASES})", mark.line + 1,
                               "write the values out, or use fewer `*alias` references")
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node):  # noqa: D102
        digits = sum(c.isdigit() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise _TooMany(f"integer too long (over {MAX_INT_DIGITS} digits)", node.start_mark.line + 1,
                           "write a realistic number")
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _check_size(root: yaml.Node, path: Path) -> None:
    """Refuse a document whose aliases expand it beyond ``MAX_YAML_NODES`` or ``MAX_NESTING``."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    # post-order without recursion; aliases make the node graph a DAG, so memoise by id
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in size:
            continue
        children = []
        if isinstance(node, yaml.MappingNode):
            children = [c for pair in node.value for c in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)
            continue
        size[key] = 1 + sum(size[id(c)] for c in children)
        depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
        if size[key] > MAX_YAML_NODES:
            raise _TooMany(f"the document expands to over {MAX_YAML_NODES:,} values (YAML aliases)",
                           node.start_mark.line + 1, "write the values out, or use fewer `*alias` references")
        if depth[key] > MAX_NESTING + 1:
            raise _TooMany(f"nested too deeply (over {MAX_NESTING} levels)", node.start_mark.line + 1,
                           "flatten the document")


def _walk(node: yaml.Node, path: tuple, lines: dict[tuple, int], file: Path) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                _walk(value_node, path, lines, file)
                continue
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    shown = format_key(path + (key_node.value,))
                    raise _TooMany(f"duplicate key {shown!r} (first on line {seen[key_node.value]})", line,
                                   "keep one of the two; YAML would silently use the last")
                seen[key_node.value] = line
            key = path + (key_node.value,)
            lines[key] = line
            _walk(value_node, key, lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, file)
