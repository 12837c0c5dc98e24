"""Expert parallelism with offload (issue 19, item 2): when the experts do not fit the GPUs in a
format that meets the quality budget, each GPU's own experts get the single-node treatment
(resident, cached, CPU-run or streamed, per format) within the EP layout; the budget and
``--critical`` hold, the plan records every expert's owner GPU, ``check_plan`` holds it to the
hardware, and the simulator plays the plan out at the price the planner gives it.

The issue's case: Mixtral-8x7B on 2x RTX 3090 (PCIe) at the int8 budget, where EP alone holds
only int4 (a few hundred synthetic tokens).
"""

from __future__ import annotations

import numpy as np
import pytest

from planner.cluster import ClusterRequest, plan_cluster
from planner.costs import QUANT_ERROR
from planner.plan import load_plan
from planner.plan_layer import GpuCache
from planner.plan_check import check_plan
from planner.workload_view import planning_stats
from profiles.errors import InputError
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import save_trace
from simulator.engine import SimConfig, simulate

HW, MODEL, BUDGET = "workstation-2x3090-pcie", "mixtral-8x7b", QUANT_ERROR["int8"]
FORMATS = ("bf16", "int8", "int4")
# planned tpot against the simulator's p50, same trace (the plan prices each GPU's expected
# load; the simulator plays out each step's spread and the CPU the GPUs take turns on)
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def trace():
    spec = load_model(MODEL)
    return generate(SyntheticWorkload(num_layers=spec.num_moe_layers, num_experts=spec.num_experts, top_k=spec.top_k,
                                      skew=0.8, affinity=0.9, prompt_tokens=24, output_tokens=16, num_sequences=16,
                                      seed=3, model=MODEL))


@pytest.fixture(scope="module")
def critical(trace):
    """The four experts of most importance (layer, expert), as ``--critical`` takes them."""
    w = planning_stats(trace, real_experts=8).importance  # [L, E]
    top = np.dstack(np.unravel_index(np.argsort(-w, axis=None)[:4], w.shape))[0]
    sets = [set() for _ in range(w.shape[0])]
    for l, e in top.tolist():
        sets[l].add(e)
    return tuple(tuple(sorted(s)) for s in sets)


def _request(trace, critical=(), **kw) -> ClusterRequest:
    return ClusterRequest(hardware=HW, model=MODEL, trace=trace, quality_budget=BUDGET, formats=FORMATS,
                          critical=critical, sweeps=1, time_limit_s=60, **kw)


@pytest.fixture(scope="module")
def result(trace, critical):
    """The roofline engine runs every site (resident, fetch, local, hybrid, stream)."""
    return plan_cluster(_request(trace, critical, offload=True, engine="roofline"))


def test_without_offload_ep_refuses_the_budget(trace):
    with pytest.raises(InputError, match="quality budget"):
        plan_cluster(_request(trace))


def test_each_gpu_offloads_its_own_experts(result):
    plan = result.plan
    gpus = ("node/gpu0", "node/gpu1")
    assert plan.solver.method == "ep-offload" and result.baselines == {}
    for lp in plan.layers:
        assert sorted(lp.owner) == sorted(gpus * 4)  # one copy of each expert, 4 per GPU
        for home, site, gpu in zip(lp.home, lp.site, lp.owner):
            assert home == gpu if site == "resident" else home == "node/cpu0"
        assert not lp.replicas and lp.cache_slots == 0
    sites = plan.counts()["site"]
    assert sites["resident"] < 256 and sum(sites.values()) == 256  # some experts offloaded, on both GPUs
    for gpu in gpus:
        assert any(s != "resident" for lp in plan.layers for s, o in zip(lp.site, lp.owner) if o == gpu)
        use = plan.memory[gpu]
        assert use.used_bytes <= use.capacity_bytes and use.expert_bytes > 0
    # a priced plan with a certified bound for its placement
    p = plan.predicted
    assert p["tpot_s"] > 0 and p["tokens_per_s"] == pytest.approx(plan.batch_size / p["tpot_s"])
    assert plan.solver.objective == pytest.approx(p["tpot_s"])
    assert 0 < plan.solver.bound <= plan.solver.objective and 0 <= plan.solver.gap < 1
    assert any("not over other placements" in n for n in plan.notes)


def test_budget_and_critical_bind(result, trace, critical):
    plan = result.plan
    assert plan.quality_budget == pytest.approx(BUDGET)
    w = planning_stats(trace, real_experts=8).importance  # [L, E]
    err = np.array([[QUANT_ERROR[f] for f in lp.format] for lp in plan.layers])  # [L, E]
    assert plan.quality_error == pytest.approx(float((w * err).sum() / w.sum()), rel=1e-9, abs=1e-12)
    assert plan.quality_error <= BUDGET * (1 + 1e-9)
    assert QUANT_ERROR[plan.dense_format] <= BUDGET
    assert plan.counts()["format"].get("int4", 0) < 256  # not the all-int4 layout EP alone would take
    for l, experts in enumerate(critical):
        for e in experts:
            assert plan.layers[l].format[e] == "bf16", (l, e)


def test_check_plan_holds_the_owners(result, tmp_path):
    plan = result.plan
    _, hw = load_profile(HW)
    model = load_model(MODEL)
    assert check_plan(plan, hw, model) == []
    again = load_plan(plan.save(tmp_path / "plan.json"))
    assert again.to_json() == plan.to_json() and "\"owner\"" in again.to_json()
    layers = list(plan.layers)
    lp = layers[0]
    e = lp.site.index("resident")
    other = next(g for g in ("node/gpu0", "node/gpu1") if g != lp.owner[e])
    moved = lp.model_copy(update={"owner": lp.owner[:e] + (other,) + lp.owner[e + 1:]})
    with pytest.raises(InputError, match="owner"):
        check_plan(plan.model_copy(update={"layers": (moved, *layers[1:])}), hw, model)
    big = lp.model_copy(update={"gpu_caches": (GpuCache(device="node/gpu0", slots=5, format="int8"),)})
    with pytest.raises(InputError, match="cache"):
        check_plan(plan.model_copy(update={"layers": (big, *layers[1:])}), hw, model)


def test_the_simulator_agrees_with_the_price(result, trace):
    plan = result.plan
    _, hw = load_profile(HW)
    report = simulate(plan, hw, load_model(MODEL), trace, SimConfig(requests=16))
    tpot = report.metrics["tpot_s"]["p50"]
    assert tpot == pytest.approx(plan.predicted["tpot_s"], rel=TOLERANCE)
    assert report.metrics["expert_parallel"]["gpus"] == 2


def test_cli_ep_offloads_on_sglang(run_cli, trace, tmp_path):
    """`--parallel ep` plans the issue's case on SGLang (which streams offloaded experts) and
    the simulator agrees with its price."""
    path = save_trace(trace, tmp_path / "trace.npz")
    out = tmp_path / "plan.json"
    r = run_cli("optimize", "-H", HW, "-m", MODEL, "-t", path, "--parallel", "ep", "--quality-budget", str(BUDGET),
                "--out", out)
    assert r.exit_code == 0, r.output
    plan = load_plan(out)
    assert plan.inputs.engine == "sglang" and plan.quality_budget == pytest.approx(BUDGET)
    assert set(plan.counts()["site"]) == {"resident", "stream"}
    _, hw = load_profile(HW)
    report = simulate(plan, hw, load_model(MODEL), trace, SimConfig(requests=16))
    assert report.metrics["tpot_s"]["p50"] == pytest.approx(plan.predicted["tpot_s"], rel=TOLERANCE)


def test_gpu_caches_fetch_over_their_gpus_link(result, trace):
    """The plan with its CPU-run experts fetched instead, through a one-slot cache on the GPU
    that owns them: misses cross from host DRAM, hits do not, and a cache policy that needs
    the trace's future is refused in one line."""
    plan = result.plan
    layers = list(plan.layers)
    for l in [l for l, lp in enumerate(layers) if "local" in lp.site][:4]:  # a few: their slots take GPU memory
        lp = layers[l]
        site = tuple("fetch" if s == "local" else s for s in lp.site)
        gpus = sorted({o for o, s in zip(lp.owner, site) if s == "fetch"})
        layers[l] = lp.model_copy(update={"site": site, "gpu_caches": tuple(
            GpuCache(device=g, slots=1, format=lp.format[lp.site.index("local")]) for g in gpus)})
    cached = plan.model_copy(update={"layers": tuple(layers)})
    _, hw = load_profile(HW)
    model = load_model(MODEL)
    check_plan(cached, hw, model)
    m = simulate(cached, hw, model, trace, SimConfig(requests=4)).metrics
    assert m["bytes_moved"]["dram"] > 0 and 0 < m["expert_hit_rate"] < 1
    with pytest.raises(InputError, match="--eviction"):
        simulate(cached, hw, model, trace, SimConfig(requests=4, eviction="belady"))
