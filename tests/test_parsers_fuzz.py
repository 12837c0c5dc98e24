"""Property: the parsers of every user file (hardware profile, config.json, routing trace,
plan) raise nothing but the project's own :class:`UserError` on any input.

Each property mutates a valid document (a value swapped for a random one, a key dropped or
added) or feeds raw bytes, writes it to a file and parses it through the same entry point
the CLI uses. Examples are capped so the whole module runs in well under a minute.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from profiles.errors import UserError

HERE = Path(__file__).parent
REPO = HERE.parent
PROFILE_DOC = yaml.safe_load((REPO / "profiles" / "hardware" / "desktop-4090.yaml").read_text())
CONFIG_DOC = json.loads((HERE / "data" / "configs" / "deepseek_v3" / "config.json").read_text())
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# values a user might write anywhere: wrong types, edge numbers, unit strings
VALUES = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-10, max_value=10), st.integers(min_value=-(10**25), max_value=10**25),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, -1, 1.5, 1e308, 2**63, 10**6]),
    st.text(max_size=12),
    st.sampled_from(["24GiB", "1e400GiB", "-1GB", "nan", "inf", "165TFLOPS", "10us", "4", "cpu0", "gpu", "pcie"]),
    st.lists(st.integers(min_value=-3, max_value=300), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(min_value=-3, max_value=300), max_size=3),
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated(draw, doc: Any) -> Any:
    """``doc`` (deep-copied) with one to three random edits: set, drop or add a key."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["set", "set", "drop", "add"]))
        if action == "set":
            parent[path[-1]] = draw(VALUES)
        elif action == "drop":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(VALUES)
        else:
            parent.append(draw(VALUES))
    return doc


def _only_user_errors(parse, *args) -> None:
    try:
        parse(*args)
    except UserError:
        pass


def _write(text: str | bytes, suffix: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-"))
    path = tmp / f"input{suffix}"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- profiles and config.json


def _load_profile(path: Path) -> None:
    from profiles.hardware import load_profile

    load_profile(path)


def _load_model(path: Path) -> None:
    from profiles.models import load_model

    load_model(path)


# kind -> (parser, mutated documents, how to write one, suffix)
DOCUMENTS = {
    "profile": (_load_profile, mutated(PROFILE_DOC), lambda d: yaml.safe_dump(d, allow_unicode=True), ".yaml"),
    "config": (_load_model, mutated(CONFIG_DOC), lambda d: json.dumps(d, allow_nan=True), ".json"),
}


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
@FUZZ
@given(data=st.data())
def test_document_parsers_raise_only_user_errors(kind, data):
    parse, documents, dump, suffix = DOCUMENTS[kind]
    _only_user_errors(parse, _write(dump(data.draw(documents)), suffix))


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
@FUZZ
@given(raw=st.one_of(st.text(max_size=300), st.binary(max_size=200)))
def test_document_parsers_on_any_text(kind, raw):
    parse, _, _, suffix = DOCUMENTS[kind]
    _only_user_errors(parse, _write(raw, suffix))


# --------------------------------------------------------------------------- routing traces

META = {"format_version": 1, "model": "m", "num_experts": 8, "layer_map": [0, 1], "source": "fuzz"}
ARRAYS = st.one_of(
    hnp.arrays(st.sampled_from([np.uint8, np.int32, np.int64, np.float32, np.bool_]),
               hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)),
    st.just(np.zeros((3, 2, 2), np.uint8)), st.just(np.array([3], np.int32)),
)


@FUZZ
@given(ids=ARRAYS, seq=ARRAYS, phase=st.one_of(st.none(), ARRAYS), gate=st.one_of(st.none(), ARRAYS),
       meta=mutated(META), drop=st.sets(st.sampled_from(["expert_ids", "seq_lens", "meta"]), max_size=1))
def test_trace_parser_raises_only_user_errors(ids, seq, phase, gate, meta, drop):
    from profiles.workload.importers import load_workload

    arrays = {"expert_ids": ids, "seq_lens": seq, "meta": np.array(json.dumps(meta, allow_nan=True))}
    if phase is not None:
        arrays["phase"] = phase
    if gate is not None:
        arrays["gate_weights"] = gate
    for key in drop:
        arrays.pop(key)
    path = _write(b"", ".npz")
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    _only_user_errors(load_workload, path)


@FUZZ
@given(st.binary(max_size=300))
def test_trace_parser_on_any_bytes(data):
    from profiles.workload.importers import load_workload

    _only_user_errors(load_workload, _write(b"PK\x03\x04" + data, ".npz"))


# --------------------------------------------------------------------------- plans


@pytest.fixture(scope="module")
def plan_doc() -> dict:
    """A small real plan: OLMoE on the RTX 4090 desktop (made once)."""
    from click.testing import CliRunner

    from planner.cli import cli

    path = Path(tempfile.mkdtemp(prefix="fuzz-plan-")) / "plan.json"
    result = CliRunner().invoke(cli, ["optimize", "-m", "olmoe-1b-7b", "--out", str(path)])
    assert result.exit_code == 0, result.output
    return json.loads(path.read_text())


def test_plan_parser_and_check_raise_only_user_errors(plan_doc):
    from planner.commands.simulate import plan_hardware
    from planner.plan import load_plan
    from planner.plan_check import check_plan
    from profiles.models import load_model

    model = load_model("olmoe-1b-7b")

    @FUZZ
    @given(mutated(plan_doc))
    def check(doc):
        def parse(path: Path) -> None:
            plan = load_plan(path)
            profile, hw = plan_hardware(plan, "desktop-4090")
            check_plan(plan, hw, model, file=path, profile=profile)

        _only_user_errors(parse, _write(json.dumps(doc, allow_nan=True), ".json"))

    check()
