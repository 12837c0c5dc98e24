"""Same inputs, same plan, on a busy machine or an idle one (issue 18 item 1).

Plans are decided by work limits (node limits, sweeps), never by the wall clock: a solve run
while other processes hog the CPUs, or with a clock that runs fast, gives the same bytes. The
wall-clock limit is a safety net only, and when it stops a solve the plan says so (status
"time limit" and a note) and so does the CLI. No assertion here reads the wall clock.
"""

from __future__ import annotations

import multiprocessing
import types

import numpy as np
import pytest

from planner import ilp
from planner.cluster import ClusterRequest, plan_cluster
from planner.cluster import placement as ep_placement
from planner.costs import QUANT_ERROR
from planner.optimize import OptimizeRequest, optimize
from profiles.models import load_model
from profiles.workload.synthetic import SyntheticWorkload, generate
from conftest import small_cluster  # noqa: E402

# a case whose solve runs MIPs (HiGHS under node limits), about 5 CPU-s. At the uniform-int4 budget
# the LP bound alone closes the gap since plans count the runtime's own memory (11c39e9), so no MIP
# ran and the safety-net tests had nothing to stop; the int8 budget needs MIPs and closes its gap
CASE = dict(hardware="desktop-3060", model="mixtral-8x7b", quality_budget=QUANT_ERROR["int8"])


def _spin() -> None:  # pragma: no cover (runs in the hog processes)
    while True:
        pass


class _Hog:
    """Busy-loop processes on every CPU while the block runs."""

    def __enter__(self):
        ctx = multiprocessing.get_context("fork")
        self.procs = [ctx.Process(target=_spin, daemon=True) for _ in range(max(multiprocessing.cpu_count(), 2))]
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join()


def _fast_clock(step_s: float):
    """A stand-in for the ``time`` module whose perf_counter advances ``step_s`` per call."""
    now = [0.0]

    def perf_counter() -> float:
        now[0] += step_s
        return now[0]

    return types.SimpleNamespace(perf_counter=perf_counter)


@pytest.fixture(scope="module")
def idle_plan() -> str:
    plan = optimize(OptimizeRequest(**CASE)).plan
    assert plan.solver.status in ("optimal", "node limit")
    return plan.to_json()


def test_optimize_gives_the_same_bytes_under_a_cpu_hog(idle_plan):
    with _Hog():
        busy = optimize(OptimizeRequest(**CASE)).plan.to_json()
    assert busy == idle_plan


def test_optimize_gives_the_same_bytes_with_a_fast_clock(idle_plan, monkeypatch):
    # every clock reading 5 s later than the one before: a very slow machine, but within the safety net
    monkeypatch.setattr(ilp, "time", _fast_clock(5.0))
    assert optimize(OptimizeRequest(**CASE)).plan.to_json() == idle_plan


def test_hitting_the_safety_net_is_recorded_in_the_plan(monkeypatch):
    monkeypatch.setattr(ilp, "time", _fast_clock(1000.0))  # past the limit before the first MIP
    plan = optimize(OptimizeRequest(**CASE, time_limit_s=60)).plan
    if plan.solver.gap <= 0.001:
        pytest.skip("the LP bound alone closed the gap: no MIP ran")  # the case is chosen so that one does
    assert plan.solver.status == "time limit"
    assert any("safety net (--time-limit 60 s)" in n for n in plan.notes)


def test_hitting_the_safety_net_is_said_on_the_cli(run_cli, monkeypatch):
    monkeypatch.setattr(ilp, "time", _fast_clock(1000.0))
    result = run_cli("optimize", "-H", CASE["hardware"], "-m", CASE["model"], "--quality-budget",
                     str(CASE["quality_budget"]), "--time-limit", "60")
    assert result.exit_code == 0, result.output
    assert "time limit" in result.output and "safety net (--time-limit 60 s)" in result.output


@pytest.fixture(scope="module")
def tiny_cluster(tmp_path_factory):
    """cluster-h100-2node cut to 2 nodes x 2 GPUs, and a small OLMoE workload."""
    path = small_cluster(tmp_path_factory.mktemp("hw") / "tiny.yaml")
    spec = load_model("olmoe-1b-7b")
    trace = generate(SyntheticWorkload(num_layers=spec.num_moe_layers, num_experts=spec.num_experts,
                                       top_k=spec.top_k, skew=0.8, affinity=0.9, prompt_tokens=24, output_tokens=8,
                                       num_sequences=12, seed=0, model=spec.name))
    return ClusterRequest(hardware=str(path), model="olmoe-1b-7b", trace=trace)


def test_ep_placement_gives_the_same_bytes_under_a_cpu_hog_and_a_fast_clock(tiny_cluster, monkeypatch):
    idle = plan_cluster(tiny_cluster)
    assert idle.plan.solver.status == "feasible" and not idle.info["stopped_by_time_limit"]
    with _Hog():
        busy = plan_cluster(tiny_cluster)
    monkeypatch.setattr(ep_placement, "time", _fast_clock(1.0))  # 1 s per reading: 16 layers x 2 sweeps, well within
    slow = plan_cluster(tiny_cluster)
    assert busy.plan.to_json() == idle.plan.to_json() == slow.plan.to_json()
    assert np.array_equal(busy.placement, idle.placement)


def test_ep_safety_net_is_recorded_in_the_plan(tiny_cluster, monkeypatch):
    monkeypatch.setattr(ep_placement, "time", _fast_clock(1000.0))
    result = plan_cluster(tiny_cluster)
    assert result.info["stopped_by_time_limit"]
    assert result.plan.solver.status == "time limit"
    assert any("safety net" in n for n in result.plan.notes)
    assert not any("safety net" in n for b in result.baselines.values() for n in b.notes)


def test_a_model_file_at_another_path_gives_the_same_plan(tmp_path):
    """Two checkouts of one commit plan the same bytes: the model's digest is of its
    specification, not of the file's path; a plan with an older, path-bearing digest still
    passes the plan check without a warning."""
    import dataclasses

    from planner.plan_digest import digest
    from planner.plan_check import check_plan
    from profiles.hardware import load_profile
    from profiles.models import BUNDLED_DIR as MODELS_DIR

    copy = tmp_path / "elsewhere" / "mixtral-8x7b.yaml"
    copy.parent.mkdir()
    copy.write_bytes((MODELS_DIR / "mixtral-8x7b.yaml").read_bytes())
    here = optimize(OptimizeRequest(**dict(CASE, model="mixtral-8x7b"))).plan
    there = optimize(OptimizeRequest(**dict(CASE, model=str(copy)))).plan
    assert here.inputs.model_digest == there.inputs.model_digest
    assert here.to_json() == there.to_json()
    model = load_model("mixtral-8x7b")
    old = here.model_copy(update={"inputs": here.inputs.model_copy(
        update={"model_digest": digest(dataclasses.asdict(model))})})
    profile, hw = load_profile(CASE["hardware"])
    assert not check_plan(old, hw, model, profile=profile)
    assert not check_plan(here, hw, model, profile=profile)
