"""The simulator reproduces its frozen-plan golden results exactly (every metric, float for
float): the benchmark's cases cut down and cache/prefetch/miss variants, on plans frozen as
JSON so that a planner change does not move them. Written by ``tests/make_simulator_frozen.py``
(see there when to regenerate; PROVENANCE.json says which commit wrote them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_simulator_frozen import OUT, run, scenarios  # noqa: E402

SCENARIOS = list(scenarios())


@pytest.mark.parametrize("name, model_name, hw_name, trace, cfg", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_frozen_plan_results(name, model_name, hw_name, trace, cfg):
    assert run(name, model_name, hw_name, trace, cfg) == (OUT / f"{name}.json").read_text(), \
        f"{name}: the simulator's results changed"
