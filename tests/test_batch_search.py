"""Batch size as a decision under TPOT/TTFT SLOs (planner.batch_search): the certificate holds
against brute force over every batch, on synthetic step-time curves and on real ILP solves."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from planner.batch_search import search_batch
from planner.prefill_costs import prefill_dense_s, prefill_options_s, prefill_s
from planner.layer_breakdown import dense_format_of, plan_specs, plan_tiers
from planner.optimize import OptimizeRequest, optimize
from profiles.errors import InfeasibleError
from profiles.models import load_model
from profiles.workload.defaults import default_workload


def _curve(seed: int, fits: int, max_batch: int, plateau: bool = False):
    """A synthetic ILP: step*(b) nondecreasing in b, each solve's plan within its own gap of it, a
    TTFT per batch (not monotone), memory out above ``fits``. Step time concave in b (offloading:
    the distinct experts a step fetches saturate) or, with ``plateau``, growing linearly, so that
    tokens/s flattens out (compute-bound) and many batches come within a percent of the best."""
    rng = np.random.default_rng(seed)
    steps = rng.uniform(0.0, 0.02, max_batch + 1) * (1.0 if plateau else np.exp(-np.arange(max_batch + 1) / 30))
    low = np.cumsum(steps) + rng.uniform(0.05, 0.2)  # L(b), nondecreasing
    gaps = rng.uniform(0.0, 0.001, max_batch + 1)  # the ILP solved to --gap 0.001
    ttft = rng.uniform(0.5, 1.5, max_batch + 1)
    calls = []

    def solve_at(b: int, exact: bool):
        calls.append(b)
        if b > fits:
            raise InfeasibleError(f"batch {b} does not fit")
        step = low[b] / (1.0 - (0.0 if exact else gaps[b]))  # the plan found; the bound certifies low[b]
        return SimpleNamespace(predicted={"tpot_s": step, "ttft_s": ttft[b], "tokens_per_s": b / step},
                               solver=SimpleNamespace(bound=low[b]))
    return solve_at, low, gaps, ttft, calls


@pytest.mark.parametrize("plateau", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_certificate_holds_against_brute_force(seed, plateau):
    max_batch, fits = 200, 150 + seed
    solve_at, low, gaps, ttft, calls = _curve(seed, fits, max_batch, plateau)
    slo_tpot = float(np.quantile(low[1:fits], 0.6))
    plan, cert = search_batch(solve_at, slo_tpot_s=slo_tpot, slo_ttft_s=None, max_batch=max_batch, gap=0.01,
                              max_solves=60 if plateau else 24)
    b = cert.batch
    assert plan.predicted["tpot_s"] <= slo_tpot
    # no batch meeting the SLO can beat the bound, even at its certified lower step time
    feasible = [x for x in range(1, min(fits, max_batch) + 1) if low[x] <= slo_tpot]
    assert cert.tokens_per_s_bound >= max(x / low[x] for x in feasible) * (1 - 1e-12)
    # and the plan found is within the gap of the best plan at any batch (solved exactly)
    assert cert.status == "optimal" and cert.gap <= 0.01
    assert plan.predicted["tokens_per_s"] >= max(x / low[x] for x in feasible) * (1 - 0.01)
    assert plan.predicted["tokens_per_s"] in (pytest.approx(b / low[b]), pytest.approx(b * (1 - gaps[b]) / low[b]))
    assert len(calls) == cert.solves >= len(cert.solved) and cert.solves <= (60 if plateau else 24) < max_batch


@pytest.mark.parametrize("seed", range(6))
def test_ttft_is_checked_and_the_bound_still_holds(seed):
    """TTFT is checked on each solved plan, not optimised: the plan meets it, and the bound still
    covers every batch (a batch whose plan misses TTFT keeps its bound: another plan might not)."""
    max_batch, fits = 120, 100
    solve_at, low, gaps, ttft, _ = _curve(seed, fits, max_batch)
    slo_tpot, slo_ttft = float(np.quantile(low[1:fits], 0.7)), 1.2
    plan, cert = search_batch(solve_at, slo_tpot_s=slo_tpot, slo_ttft_s=slo_ttft, max_batch=max_batch, gap=0.01)
    assert plan.predicted["tpot_s"] <= slo_tpot and plan.predicted["ttft_s"] <= slo_ttft
    assert cert.tokens_per_s_bound >= max(x / low[x] for x in range(1, fits + 1) if low[x] <= slo_tpot) * (1 - 1e-12)
    assert cert.gap == pytest.approx((cert.tokens_per_s_bound - cert.tokens_per_s) / cert.tokens_per_s_bound)
    assert (cert.status == "optimal") == (cert.gap <= 0.01 + 1e-9)


def test_solve_limit_is_reported_not_hidden():
    solve_at, *_ = _curve(3, 1000, 1000, plateau=True)
    _, cert = search_batch(solve_at, slo_tpot_s=10.0, slo_ttft_s=None, max_batch=1000, gap=0.0, max_solves=4)
    assert len(cert.solved) == 4 and cert.status == "open gap" and cert.gap > 0


def test_no_batch_meets_the_slos():
    solve_at, low, *_ = _curve(5, 100, 100)
    with pytest.raises(InfeasibleError, match="no batch size up to 100 meets TPOT <= "):
        search_batch(solve_at, slo_tpot_s=float(low[1]) * 0.5, slo_ttft_s=None, max_batch=100, gap=0.01)
    solve_at, *_ = _curve(5, 0, 100)  # nothing fits: batch 1's own explanation
    with pytest.raises(InfeasibleError, match="batch 1 does not fit"):
        search_batch(solve_at, slo_tpot_s=1.0, slo_ttft_s=None, max_batch=100, gap=0.01)


def test_real_solves_against_every_batch():
    """Phi-3.5-MoE on the 3060 desktop: the search's batch is within its gap of the best of all
    six batches solved one by one, and the step time never falls as the batch grows."""
    base = dict(hardware="desktop-3060", model="phi-3.5-moe", objective="throughput", compare=False,
                trace=default_workload(load_model("phi-3.5-moe")))
    every = {b: optimize(OptimizeRequest(**base, batch_size=b)).plan for b in range(1, 7)}
    steps = [every[b].predicted["tpot_s"] for b in range(1, 7)]
    assert all(b >= a * (1 - 2e-3) for a, b in zip(steps, steps[1:]))  # monotone up to the solver's gap
    slo = (steps[3] + steps[4]) / 2  # batches 1..4 meet it
    res = optimize(OptimizeRequest(**base, tpot_slo_s=slo, max_batch=6))
    cert = res.plan.solver.batch_search
    best = max(every[b].predicted["tokens_per_s"] for b in range(1, 7) if every[b].predicted["tpot_s"] <= slo)
    assert res.plan.batch_size == cert.batch == 4 and res.plan.predicted["tpot_s"] <= slo
    assert res.plan.predicted["tokens_per_s"] >= best * (1 - cert.gap) - 1e-9
    assert cert.tokens_per_s_bound >= best * (1 - 1e-9) and cert.status == "optimal"
    assert any("batch 4 chosen under TPOT" in n for n in res.plan.notes) and res.baselines == {}


def test_cli_records_the_search_and_refuses_an_unreachable_slo(run_cli):
    r = run_cli("optimize", "-H", "desktop-3060", "-m", "phi-3.5-moe", "--objective", "throughput", "--slo-tpot", "1",
                "--max-batch", "4", "--json")
    assert r.exit_code == 0, r.output
    solver = json.loads(r.output)["plan"]["solver"]
    assert solver["batch_search"]["batch"] == json.loads(r.output)["plan"]["batch_size"]
    r = run_cli("optimize", "-H", "desktop-3060", "-m", "phi-3.5-moe", "--objective", "throughput", "--slo-tpot",
                "0.001")
    assert r.exit_code != 0 and "no batch size up to 1024 meets TPOT <= 1 ms" in r.output
    assert "Traceback" not in r.output


def test_an_slo_the_plan_cannot_use_is_refused(run_cli):
    r = run_cli("optimize", "--slo-tpot", "0.2")  # --objective latency: batch 1, no batch to decide
    assert r.exit_code == 1 and "--objective latency plans batch 1" in r.output
    r = run_cli("optimize", "-H", "workstation-2x3090-nvlink", "--parallel", "ep", "--objective", "throughput",
                "--slo-ttft", "2")
    assert r.exit_code == 1 and "an expert-parallel plan takes --batch" in r.output


def test_ttft_is_linear_in_the_options_chosen():
    """prefill_s = per-layer option terms + a dense term, so a TTFT SLO can bind inside the ILP;
    llama.cpp splits the prompt into micro-batches and op-offloads past its threshold."""
    base = dict(hardware="desktop-4090", model="mixtral-8x7b", compare=False)
    for engine in (None, "llama.cpp"):
        res = optimize(OptimizeRequest(**base, engine=engine))
        s, plan = res.setup, res.plan
        specs = plan_specs(plan, s)
        tiers = plan_tiers(plan, s, specs)
        prefetch, dense = plan.prefetch == "next-layer", dense_format_of(plan, s)
        whole = prefill_s(s, [specs[l:l + 1] for l in range(len(specs))], dense, 1400, prefetch,
                          [tiers[l:l + 1] for l in range(len(specs))])
        parts = sum(prefill_options_s(s, l, specs[l:l + 1], 1400, prefetch, tiers[l:l + 1])[0]
                    for l in range(len(specs))) + prefill_dense_s(s, dense, 1400)
        assert whole == pytest.approx(parts, rel=1e-12) and whole > prefill_dense_s(s, dense, 1400) > 0
        assert plan.predicted["ttft_s"] == pytest.approx(
            prefill_s(s, [specs[l:l + 1] for l in range(len(specs))], dense, 512, prefetch,
                      [tiers[l:l + 1] for l in range(len(specs))]), rel=1e-9)


def test_a_ttft_slo_binds_inside_the_ilp():
    """With --slo-ttft the ILP itself keeps one prompt's prefill within the SLO: at a batch whose
    unconstrained plan misses it, the plan meets it, paying for it in decode time."""
    base = dict(hardware="desktop-3060", model="phi-3.5-moe", objective="throughput", compare=False,
                trace=default_workload(load_model("phi-3.5-moe")))
    free = optimize(OptimizeRequest(**base, batch_size=1)).plan
    slo = free.predicted["ttft_s"] * 0.9
    res = optimize(OptimizeRequest(**base, ttft_slo_s=slo, max_batch=1))
    plan = res.plan
    assert plan.predicted["ttft_s"] <= slo * (1 + 1e-9) < free.predicted["ttft_s"]
    assert plan.predicted["tpot_s"] >= free.predicted["tpot_s"] * (1 - 2e-3)  # no faster than without the SLO
    assert plan.solver.batch_search.status == "optimal"
    with pytest.raises(InfeasibleError, match="TTFT SLO"):
        optimize(OptimizeRequest(**base, ttft_slo_s=1e-4, max_batch=1))
