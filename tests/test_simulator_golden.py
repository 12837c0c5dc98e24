"""The simulator's results, held byte for byte: every case of ``benchmarks/bench_simulator.py``
and the scenarios of ``tests/test_simulator.py``, their full metrics (unrounded, ``repr``
floats) and, where recorded, their event logs, against ``tests/data/golden/simulator/``.

A speed-up of the simulator must leave these unchanged. A deliberate change of results (the
performance model in ``profiles/``, an engine profile, the planner's plans, a simulator
rule) regenerates them:

    MOE_PLANNER_REGEN_GOLDEN=1 python -m pytest tests/test_simulator_golden.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from planner.optimize import OptimizeRequest, optimize
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.defaults import default_workload
from simulator.engine import SimConfig, Simulation, simulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_simulator import CASES, first_tokens  # noqa: E402  (the benchmark's own cases)
from test_simulator import _decode_only, _ep_plan, _hand_plan, _two_layer_case  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "golden" / "simulator"
REGEN = os.environ.get("MOE_PLANNER_REGEN_GOLDEN") == "1"


def _dump(report) -> str:
    """Metrics (and the event log, when recorded) as JSON with exact floats."""
    out = {"metrics": report.metrics}
    if report.events is not None:
        out["events"] = [list(e) for e in report.events]
    return json.dumps(out, indent=1, sort_keys=True) + "\n"


def _check(name: str, report) -> None:
    path = GOLDEN / f"{name}.json"
    text = _dump(report)
    if REGEN:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: regenerate (see the module docstring)"
    assert text == path.read_text(), f"{name}: the simulator's results changed"


# ----------------------------------------------------------------------------- the benchmark


@pytest.mark.parametrize("model_name, hw_name", CASES)
def test_bench_simulator_cases(model_name, hw_name):
    """Exactly what ``bench_simulator.py`` replays: 1,000 decode tokens at batch 1 and the
    whole default workload at batch 32 (32 requests)."""
    model = load_model(model_name)
    _, hw = load_profile(hw_name)
    trace = default_workload(model)
    plan = optimize(OptimizeRequest(hardware=hw_name, model=model_name)).plan
    tag = f"bench--{model_name}--{hw_name}"
    _check(f"{tag}--batch1", simulate(plan, hw, model, first_tokens(trace, 1000),
                                      SimConfig(batch_size=1, kv_context="plan")))
    _check(f"{tag}--batch32", simulate(plan, hw, model, trace, SimConfig(batch_size=32, requests=32)))


# ----------------------------------------------------------------------------- tests/test_simulator.py


@pytest.fixture(scope="module")
def mixtral_small():
    model = load_model("mixtral-8x7b")
    return model, default_workload(model).subset_sequences(list(range(3)))


@pytest.mark.parametrize("model_name, hardware", [
    ("mixtral-8x7b", "desktop-4090"), ("mixtral-8x7b", "desktop-3060"), ("mixtral-8x7b", "laptop-4060"),
    ("qwen3-30b-a3b", "desktop-3060"), ("qwen3-30b-a3b", "desktop-4090"), ("deepseek-v3", "cpu-server-4090")])
def test_batch1_agreement_scenarios(model_name, hardware):
    model = load_model(model_name)
    trace = _decode_only(default_workload(model).subset_sequences([0, 1, 2]))
    plan = optimize(OptimizeRequest(hardware=hardware, model=model_name, trace=trace)).plan
    _, hw = load_profile(hardware)
    _check(f"agree--{model_name}--{hardware}", simulate(plan, hw, model, trace,
                                                        SimConfig(batch_size=1, kv_context="plan")))


def _fetch_plan(model, trace, slots: int):
    E = model.num_experts
    layer = {"home": ("node/cpu0",) * E, "format": ("int4",) * E, "site": ("fetch",) * E, "cache_slots": slots,
             "cache_device": "node/gpu0"}
    return _hand_plan(model, "desktop-3060", [layer] * trace.num_layers)


@pytest.mark.parametrize("policy", ["lru", "belady", "lfu", "score", "static"])
@pytest.mark.parametrize("slots", [1, 2, 5])
@pytest.mark.parametrize("prefill", [False, True], ids=["token-steps", "prompt-steps"])
def test_cache_scenarios(mixtral_small, policy, slots, prefill):
    model, trace = mixtral_small
    if not prefill:
        trace = _decode_only(trace)
    _, hw = load_profile("desktop-3060")
    _check(f"cache--{policy}--{slots}--{'prompt' if prefill else 'token'}",
           simulate(_fetch_plan(model, trace, slots), hw, model, trace, SimConfig(eviction=policy)))


def test_played_ahead_and_played_out(mixtral_small):
    model, trace = mixtral_small
    plan = optimize(OptimizeRequest(hardware="desktop-3060", model="mixtral-8x7b", trace=trace)).plan
    _, hw = load_profile("desktop-3060")
    cfg = SimConfig(batch_size=2)
    _check("played-ahead", Simulation(plan, hw, model, trace, cfg).run())
    slow = Simulation(plan, hw, model, trace, cfg)
    slow.play_ahead = False
    _check("played-out", slow.run())


def test_two_layer_hand_scenario(tmp_path):
    model, hw, trace, plan = _two_layer_case(tmp_path)
    _check("hand-two-layer", simulate(plan, hw, model, trace, SimConfig(record=True, kv_context="plan")))


@pytest.mark.parametrize("prefetch", ["none", "oracle", "next-layer", "transition"])
@pytest.mark.parametrize("miss", ["plan", "fiddler", "hobbit"])
def test_prefetch_and_miss_scenarios(mixtral_small, prefetch, miss):
    model, trace = mixtral_small
    _, hw = load_profile("desktop-3060")
    cfg = SimConfig(requests=2, prefetch=prefetch, prefetch_accuracy=0.7, seed=3, miss=miss)
    _check(f"prefetch--{prefetch}--{miss}", simulate(_fetch_plan(model, trace, 2), hw, model, trace, cfg))


def test_batching_scenarios(mixtral_small):
    model, trace = mixtral_small
    plan = optimize(OptimizeRequest(hardware="desktop-4090", model="mixtral-8x7b", trace=trace)).plan
    _, hw = load_profile("desktop-4090")
    _check("batching--closed", simulate(plan, hw, model, trace, SimConfig(batch_size=3)))
    _check("batching--serial", simulate(plan, hw, model, trace, SimConfig(batch_size=1)))
    _check("batching--poisson", simulate(plan, hw, model, trace,
                                         SimConfig(batch_size=3, requests=6, arrival_rate_per_s=0.5, seed=1)))
    _check("batching--static-recorded", simulate(plan, hw, model, trace,
                                                 SimConfig(batch_size=2, batching="static", record=True)))


def test_expert_parallel_scenarios(mixtral_small):
    model, trace = mixtral_small
    _, hw = load_profile("workstation-2x3090-nvlink")
    E = model.num_experts
    cfg = SimConfig(batch_size=4, requests=3)
    _check("ep--replicated", simulate(_ep_plan(model, hw, [0] * E, replicas=[[1]] * E), hw, model, trace, cfg))
    _check("ep--split", simulate(_ep_plan(model, hw, [e % 2 for e in range(E)]), hw, model, trace, cfg))
    _check("ep--split-expert-home", simulate(_ep_plan(model, hw, [e % 2 for e in range(E)]), hw, model, trace,
                                             SimConfig(batch_size=4, requests=3, ep_token_home="expert")))
