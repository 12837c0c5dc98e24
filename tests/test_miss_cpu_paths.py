"""A miss's host CPU work (issue 14) on every path that copies an expert: the simulator's
fast paths (one-token steps' LRU-fetch layers, :meth:`simulator.step_ahead.StepAhead._lru_fetches`;
several tokens' fetch layers in one pass, :meth:`simulator.one_pass.OnePass._fetch_layer`),
prefetch copies, and miss copies. Each copy's read runs on the copy worker, a thread on the
CPU compute device's cores, whoever asked for it; planner and simulator charge it alike.

The box and the engine profiles are tests/test_miss_cpu_cost.py's; 10 ms + 1 ns/B per copy
(16.3 ms for an int8 OLMoE expert) makes the CPU work, not the drive, bound the layers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from planner.given import Fixes
from planner.optimize import OptimizeRequest, optimize
from profiles.engines import load_engine
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.defaults import default_workload
from profiles.workload.trace import DECODE
from simulator.engine import SimConfig, Simulation
from tests.test_miss_cpu_cost import PROFILE, engine

CPU = ("10ms", 1e-9)  # a copy's host CPU work: fixed, per byte


@pytest.fixture(scope="module")
def olmoe():
    model = load_model("olmoe-1b-7b")
    trace = default_workload(model).subset_sequences([0, 1])
    return model, dataclasses.replace(trace, phase=np.full(trace.num_tokens, DECODE, np.uint8))


def _box(tmp_path, memory: str = "3GiB"):
    path = tmp_path / f"cpu-box-{memory}.yaml"
    path.write_text(PROFILE.replace("3GiB", memory))
    return path


def _planned(hw_path, trace, eng, **kw):
    return optimize(OptimizeRequest(hardware=str(hw_path), model="olmoe-1b-7b", trace=trace, formats=("int8",),
                                    engine=str(eng), **kw)).plan


def _step_s(plan, hw_path, eng, model, trace, batch: int = 1, play_ahead: bool = True) -> float:
    hw = load_engine(eng).apply(load_profile(str(hw_path))[1])
    sim = Simulation(plan, hw, model, trace, SimConfig(batch_size=batch, kv_context="plan"))
    sim.play_ahead = play_ahead
    return sim.run().metrics["decode_step_s"]["mean"]


def test_lru_fetch_layers_charge_the_copies_cpu_work(tmp_path, olmoe):
    """1.65 GiB of DRAM leaves no expert resident: every layer fetches all its experts from
    the drive, the one-token steps' fast path (``_lru_fetches``). Before, it skipped the
    copies' CPU work: simulated 0.885 s per step against the planner's 2.240 s. Now the
    simulated step is the planner's (1%), and the fast paths (one-token loop, one-pass batch)
    book what playing every layer out books."""
    model, trace = olmoe
    box, eng = _box(tmp_path, "1650MiB"), engine(tmp_path, *CPU)
    plan = _planned(box, trace, eng)
    assert plan.counts()["site"] == {"fetch": sum(len(lp.site) for lp in plan.layers)}
    fast = _step_s(plan, box, eng, model, trace)
    assert fast == pytest.approx(plan.predicted["tpot_s"], rel=0.01)
    assert fast == pytest.approx(_step_s(plan, box, eng, model, trace, play_ahead=False), rel=1e-9)
    # batch 2: the fetch layers are done in one pass (OnePass._fetch_layer), the same as played out
    assert _step_s(plan, box, eng, model, trace, batch=2) == pytest.approx(
        _step_s(plan, box, eng, model, trace, batch=2, play_ahead=False), rel=1e-9)


def test_prefetch_copies_charge_their_cpu_work(tmp_path, olmoe):
    """An 8-slot cache per layer and next-layer prefetch: the prefetcher's guesses are copies
    too. What the misses' CPU work adds to a step (10 ms per copy against none), planner and
    simulator alike (1%). Before, the simulator charged demand misses only (+0.197 s) and the
    planner the misses without the wrong guesses the link carries (+0.804 s); now both charge
    every copy (about +1.48 s; the prefetch price without CPU work differs by itself, 0.79 s
    planned against 0.84 s simulated, which is why the added seconds are compared)."""
    model, trace = olmoe
    box = _box(tmp_path)
    fixes = Fixes(cache_slots=(8,) * model.num_moe_layers)
    added = {}
    for side in ("plan", "sim"):
        steps = []
        for cpu in (None, CPU):
            eng = engine(tmp_path, *cpu) if cpu else engine(tmp_path, None)
            plan = _planned(box, trace, eng, prefetch="next-layer", fixes=fixes)
            assert plan.prefetch == "next-layer" and plan.layers[0].cache_slots == 8
            steps.append(plan.predicted["tpot_s"] if side == "plan" else _step_s(plan, box, eng, model, trace))
        added[side] = steps[1] - steps[0]
    assert added["sim"] == pytest.approx(added["plan"], rel=0.01)
    assert added["sim"] > 1.0  # more than the no-prefetch plan's misses (+0.79 s): the guesses' copies


def test_miss_copies_never_meet_a_cpu_compute_device(tmp_path, olmoe):
    """Not a disagreement: a copy's CPU work is priced only where the compute device is the
    host CPU, and there a miss copy is never offered (``Setup.unified``: a copy lives in host
    DRAM, which is that CPU's own memory, nothing to fetch it into), so the copy's bytes never
    reach a CPU price. Asked for int4 copies, no layer is offered any, the CPU plan has none and
    planner = simulator (1%)."""
    from planner.miss_copy_options import offers_copies

    model, trace = olmoe
    box, eng = _box(tmp_path), engine(tmp_path, *CPU)
    result = optimize(OptimizeRequest(hardware=str(box), model="olmoe-1b-7b", trace=trace, formats=("int8",),
                                      engine=str(eng), miss_copy=("int4", 0.5), quality_budget=1.0))
    s, plan = result.setup, result.plan
    assert s.compute is s.host and s.miss_copy == ("int4", 0.5) and s.runs(s.compute, "int4")
    assert s.unified and not any(offers_copies(s, layer) for layer in range(model.num_moe_layers))
    assert plan.counts()["site"].get("fetch", 0) > 0
    assert all(lp.miss_copy is None for lp in plan.layers)
    assert _step_s(plan, box, eng, model, trace) == pytest.approx(plan.predicted["tpot_s"], rel=0.01)
