"""The placement ILP against brute force, its properties, and the Plan it produces."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from planner.baselines import BASELINE_ENGINES, BASELINES
from planner.costs import MODES, N_SPEC, Setup
from planner.workload_view import planning_stats
from planner.ilp import _feasible, build_problem, pareto_front, solve
from profiles.engines import load_engine
from planner.optimize import OptimizeRequest, make_setup, optimize
from planner.plan import load_plan
from profiles.errors import InfeasibleError
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.synthetic import SyntheticWorkload, generate

TINY_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
    "num_experts_per_tok": 2, "vocab_size": 128, "tie_word_embeddings": False,
}

TINY_HW = """
name: tiny-box
nodes:
  - name: n
    devices:
      - {name: cpu0, kind: cpu, cores: 4, memory_bytes: {dram}, memory_bytes_per_s: 20GB/s,
         peak_ops_per_s: {fp32: 0.2TFLOPS, bf16: 0.4TFLOPS}}
      - name: gpu0
        kind: gpu
        memory_bytes: {hbm}
        memory_bytes_per_s: 300GB/s
        peak_ops_per_s: {bf16: 30TFLOPS, int8: 60TOPS}
        links: [{kind: pcie, to: cpu0, gen: 3, lanes: 8}]
      - name: nvme0
        kind: nvme
        memory_bytes: 100MB
        memory_bytes_per_s: 2GB/s
        links: [{kind: pcie, to: cpu0, gen: 3, lanes: 4}]
"""


def tiny_setup(tmp_path, hbm: float, dram: float, seed: int = 0, skew: float = 1.0,
               cpu_launch: str | None = None) -> Setup:
    cfg = tmp_path / "model"
    cfg.mkdir(exist_ok=True)
    (cfg / "config.json").write_text(json.dumps(TINY_CONFIG))
    hw_file = tmp_path / "hw.yaml"
    hw = TINY_HW.replace("{hbm}", str(int(hbm))).replace("{dram}", str(int(dram)))
    if cpu_launch is not None:  # the CPU's per-call overhead (the profile's default otherwise)
        hw = hw.replace("bf16: 0.4TFLOPS}}", f"bf16: 0.4TFLOPS}}, launch_overhead_s: {cpu_launch}}}")
    hw_file.write_text(hw)
    _, hw = load_profile(hw_file)
    model = load_model(cfg)
    trace = generate(SyntheticWorkload(num_layers=2, num_experts=8, top_k=2, skew=skew, temporal=0.3,
                                       affinity=0.5, num_sequences=8, prompt_tokens=40, output_tokens=10, seed=seed))
    s = make_setup(hw, model, planning_stats(trace), batch_size=1, context_tokens=64, formats=("bf16", "int8", "int4"),
                   engine=load_engine("roofline"))
    return dataclasses.replace(s, device_reserve=(0.0, 0.0), host_reserve=(0.0, 0.0))


def fast_cpu_setup(tmp_path, hbm: float, dram: float, seed: int = 0) -> Setup:
    """The tiny box with a CPU that starts an expert call in 10 us: a cache hit on the GPU
    (20 us) beats running an expert on the CPU (about 32 us with its activations), which
    beats a miss (a 16 us fetch, then 20 us on the GPU), so rare offloaded experts belong on
    the CPU and frequent ones in the cache."""
    return tiny_setup(tmp_path, hbm=hbm, dram=dram, seed=seed, cpu_launch="10us")


def brute_force(problem, prefetch: bool, allowed=None) -> float:
    """Minimum objective over every combination of one option per layer (no pruning, no LP
    fixing), by broadcasting over the whole product; ``allowed(table) -> [N] bool`` limits
    the options each layer may take."""
    s, times = problem.setup, problem.times(prefetch)
    R = 2 + len(s.homes)  # device, each home, quality
    total_s, used = np.zeros(1), np.zeros((1, R))
    for l, t in enumerate(problem.tables):
        rows = np.ones(len(t), bool) if allowed is None else allowed(t)
        usage = np.stack([t.dev_bytes] + [np.where(t.home == h, t.home_bytes, 0.0) for h in range(len(s.homes))]
                         + [t.error], axis=1)[rows]  # [N, R]
        total_s = (total_s[:, None] + times[l][rows][None, :]).ravel()
        used = (used[:, None, :] + usage[None, :, :]).reshape(-1, R)
    best = np.inf
    for dense, fc in problem.fixed.items():
        if problem.quality_budget is not None and fc.error > problem.quality_budget + 1e-12:
            continue
        limit = np.array([problem.caps[problem.device_mem] - problem.dense_total_bytes(dense)]
                         + [problem.caps[h] for h in s.homes]
                         + [np.inf if problem.quality_budget is None
                            else problem.quality_budget * problem.importance_total])
        ok = (used <= limit * (1 + 1e-9) + 1e-15).all(axis=1)
        if ok.any():
            best = min(best, float(total_s[ok].min()) + fc.dense_s)
    return best


@pytest.mark.parametrize("cpu", ["default", "fast"])
@pytest.mark.parametrize("hbm, dram, budget", [(300_000, 600_000, 0.04), (450_000, 600_000, 0.01),
                                               (250_000, 600_000, None), (700_000, 600_000, 0.0),
                                               (100_000, 600_000, 0.01), (150_000, 150_000, 0.01),
                                               (250_000, 150_000, 0.01)])
def test_ilp_equals_brute_force_on_tiny_instances(tmp_path, cpu, hbm, dram, budget):
    make = tiny_setup if cpu == "default" else fast_cpu_setup
    s = dataclasses.replace(make(tmp_path, hbm=hbm, dram=dram), cache_grid=(0, 2))  # keeps the brute force small
    problem = build_problem(s, budget)
    assert any(((t.p < t.q) & (t.q < 8)).any() for t in problem.tables)  # split execution sites are in the grid
    for prefetch in (False, True):
        expected = brute_force(problem, prefetch)
        if not np.isfinite(expected):
            with pytest.raises(InfeasibleError):
                solve(problem, prefetch=prefetch)
            continue
        result = solve(problem, prefetch=prefetch, gap=0.0)
        assert result.objective_s == pytest.approx(expected, rel=1e-9)
        assert _feasible(problem, result.choice, result.dense_format)


def test_splitting_execution_sites_within_a_layer_pays_and_the_ilp_finds_it(tmp_path):
    """On the fast-CPU box the optimum fetches a layer's most frequent offloaded experts and
    runs its rare ones on the CPU (p < q < E), strictly faster than any plan that runs every
    offloaded expert of a layer the same way (q = p: all local, q = E: all through the cache)."""
    s = dataclasses.replace(fast_cpu_setup(tmp_path, hbm=100_000, dram=600_000), cache_grid=(0, 2))
    problem = build_problem(s, 0.01)
    best = brute_force(problem, prefetch=False)
    per_layer = brute_force(problem, prefetch=False, allowed=lambda t: (t.q == t.p) | (t.q == 8))
    assert best < per_layer * (1 - 1e-4)
    result = solve(problem, prefetch=False, gap=0.0)
    assert result.objective_s == pytest.approx(best, rel=1e-9)
    split = [l for l, w in enumerate(result.choice) if problem.tables[l].p[w] < problem.tables[l].q[w] < 8]
    assert split
    # the plan records each expert's site: by frequency rank resident, then fetch, then local
    from planner.plan_assembly import assemble_plan
    from planner.plan import Inputs, SolverInfo
    from planner.layer_breakdown import plan_specs
    inputs = Inputs(hardware="h", hardware_digest="0", model="m", model_digest="0", workload="w", workload_digest="0")
    plan = assemble_plan(problem, result.choice, result.dense_format, False, SolverInfo(method="ilp"),
                         OptimizeRequest(quality_budget=0.01), inputs, 0.01)
    for l in split:
        t, w = problem.tables[l], result.choice[l]
        sites = [plan.layers[l].site[e] for e in s.stats.order[l]]  # by frequency rank
        assert sites == (["resident"] * int(t.p[w]) + [MODES[t.mode[w]]] * int(t.q[w] - t.p[w])
                         + ["local"] * int(8 - t.q[w]))
    assert (plan_specs(plan, s) == np.stack([problem.tables[l].specs([w])[0] for l, w in enumerate(result.choice)])).all()


def test_plans_are_split_by_nvme_count_when_the_lp_splits_a_layer_between_homes(tmp_path, monkeypatch):
    """Host DRAM holds one layer's offloaded experts, not two: the LP relaxation homes a
    fraction of a layer on NVMe, so after a short try at all plans (made fruitless here) the
    solver solves one part per count of NVMe-homed layers; the parts cover every plan, so the
    optimum is still the brute force's."""
    from planner import ilp
    from planner.ilp_mip import _MipResult

    s = dataclasses.replace(tiny_setup(tmp_path, hbm=150_000, dram=150_000), cache_grid=(0, 2))
    problem = build_problem(s, 0.01)
    walked, mip = [], ilp._mip
    count_parts = ilp._Relaxer.count_parts
    monkeypatch.setattr(ilp._Relaxer, "count_parts",
                        lambda self, relax, cutoff: walked.append(relax.spilled) or count_parts(self, relax, cutoff))

    def no_luck(problem, times, fronts, warm, count, solver, time_limit_s, gap, max_nodes=None, seed=0):
        if count is None and max_nodes is not None:  # the short try at all plans finds and proves nothing
            return _MipResult(choice=None, dense_format=None, status="Not Solved", infeasible=False,
                              bound_s=-np.inf, solve_s=0.0, variables=0, constraints=0)
        return mip(problem, times, fronts, warm, count, solver, time_limit_s, gap, max_nodes, seed)

    monkeypatch.setattr(ilp, "_mip", no_luck)
    for prefetch in (False, True):
        result = solve(problem, prefetch=prefetch, gap=0.0)
        assert result.objective_s == pytest.approx(brute_force(problem, prefetch), rel=1e-9)
        assert result.status == "optimal"
    assert len(walked) == 2 and all(0 < n % 1 for n in walked)


def test_pareto_front_keeps_an_optimum_and_drops_dominated_options(tmp_path):
    s = tiny_setup(tmp_path, hbm=300_000, dram=600_000)
    problem = build_problem(s, 0.04)
    tau = problem.times(False)[0]
    t = problem.tables[0]
    front = pareto_front(tau, t)
    assert 0 < len(front) < len(t)
    cols = np.stack([tau, t.dev_bytes, t.home_bytes, t.error], axis=1)
    for i in set(range(len(t))) - set(front.tolist()):
        dominators = (cols[front] <= cols[i] + 1e-12).all(axis=1) & (t.home[front] == t.home[i])
        assert dominators.any(), f"option {i} was dropped but nothing kept dominates it"


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hbm=st.integers(150_000, 900_000), dram=st.integers(300_000, 2_000_000), seed=st.integers(0, 5),
       skew=st.floats(0.0, 2.0), budget=st.sampled_from([None, 0.006, 0.02, 0.04]),
       cpu_launch=st.sampled_from([None, "10us"]))
def test_plans_place_every_expert_once_fit_memory_and_beat_every_baseline(tmp_path, hbm, dram, seed, skew, budget,
                                                                          cpu_launch):
    s = tiny_setup(tmp_path, hbm=hbm, dram=dram, seed=seed, skew=skew, cpu_launch=cpu_launch)
    candidates = [b for fn in BASELINES.values() for b in (fn(s, budget) or [])]
    extra = [np.array([b.specs[l] for b in candidates]).reshape(-1, N_SPEC) for l in range(2)]
    problem = build_problem(s, budget, extra)
    try:
        result = min((solve(problem, prefetch=p, gap=0.0) for p in (False, True)), key=lambda r: r.objective_s)
    except InfeasibleError:
        # then no baseline fits either
        from planner.optimize import _score_baselines
        assert not _score_baselines(problem, candidates)
        return
    # never worse than any baseline under the same cost model
    from planner.optimize import _score_baselines
    for name, (choice, seconds, dense, prefetch, _) in _score_baselines(problem, candidates).items():
        assert result.objective_s <= seconds * (1 + 1e-9), name
    # every expert placed exactly once, no capacity exceeded
    req = OptimizeRequest(quality_budget=budget)
    from planner.plan_assembly import assemble_plan
    from planner.plan import Inputs, SolverInfo
    inputs = Inputs(hardware="h", hardware_digest="0", model="m", model_digest="0", workload="w", workload_digest="0")
    plan = assemble_plan(problem, result.choice, result.dense_format, result.prefetch, SolverInfo(method="ilp"),
                         req, inputs, budget or 0.0)
    for layer in plan.layers:
        assert len(layer.home) == len(layer.format) == len(layer.site) == 8
        assert all(h in problem.caps for h in layer.home)
    for mem, use in plan.memory.items():
        assert use.used_bytes <= problem.caps[mem] * (1 + 1e-9)
    if budget is not None:
        assert plan.quality_error <= budget * (1 + 1e-9)


def test_critical_experts_stay_at_full_precision(tmp_path):
    s = tiny_setup(tmp_path, hbm=250_000, dram=600_000)
    s = dataclasses.replace(s, critical=((s.stats.order[0][-1],), ()))  # the least popular expert of layer 0
    problem = build_problem(s, 0.04)
    result = solve(problem, prefetch=False)
    t = problem.tables[0]
    w = result.choice[0]
    rank = int(np.flatnonzero(s.stats.order[0] == s.stats.order[0][-1])[0])
    fmt = s.formats[t.b_res[w]] if rank < t.p[w] else s.formats[t.b_off[w]]
    assert fmt == "bf16"


def test_infeasible_input_names_the_binding_resource(tmp_path):
    s = tiny_setup(tmp_path, hbm=40_000, dram=600_000)  # dense weights + KV alone do not fit
    with pytest.raises(InfeasibleError) as err:
        solve(build_problem(s, 0.04), prefetch=False)
    msg = str(err.value)
    assert "n/gpu0" in msg and "short" in msg and "smallest change" in msg


def test_default_plan_is_deterministic_and_round_trips(tmp_path):
    small = generate(SyntheticWorkload(num_layers=16, num_experts=64, top_k=8, num_sequences=6, prompt_tokens=60,
                                       output_tokens=20, seed=3))
    req = OptimizeRequest(hardware="laptop-4060", model="olmoe-1b-7b", trace=small)
    a, b = optimize(req), optimize(req)
    assert a.plan.to_json() == b.plan.to_json()
    path = a.plan.save(tmp_path / "plan.json")
    assert load_plan(path).to_json() == path.read_text()  # stable under load -> dump
    assert a.plan.solver.status == "optimal" and a.plan.solver.gap <= 0.001
    for name, base in a.baselines.items():
        assert base.inputs.engine == BASELINE_ENGINES[name]  # priced on its own engine
        if base.inputs.engine == a.plan.inputs.engine:  # same software: the ILP never loses
            assert a.plan.predicted["tpot_s"] <= base.predicted["tpot_s"] * (1 + 1e-9), name
    # the same cost model scores the plan and says what it predicts
    assert a.plan.predicted["tokens_per_s"] == pytest.approx(1 / a.plan.predicted["tpot_s"])


def test_cbc_finds_the_same_optimum_as_highs(tmp_path):
    s = dataclasses.replace(tiny_setup(tmp_path, hbm=300_000, dram=600_000), cache_grid=(0, 2))
    problem = build_problem(s, 0.04)
    highs = solve(problem, prefetch=False, gap=0.0)
    cbc = solve(problem, prefetch=False, solver="cbc", gap=0.0)
    assert cbc.objective_s == pytest.approx(highs.objective_s, rel=1e-9)
    assert cbc.solver == "cbc"


def test_zero_computation_experts_cost_nothing(tmp_path):
    """Routing to a zero-computation expert (ids >= E) is free: adding one such pick to every
    token leaves the plan's time unchanged, and plans cover the real experts only."""
    from profiles.workload.trace import Trace

    hw_file = tmp_path / "hw.yaml"
    hw_file.write_text(TINY_HW.replace("{hbm}", "200000").replace("{dram}", "600000"))
    _, hw = load_profile(hw_file)
    model = load_model("tests/data/configs/longcat_flash")  # 8 real + 4 zero experts per MoE layer
    real = generate(SyntheticWorkload(num_layers=model.num_moe_layers, num_experts=8, top_k=2, num_sequences=6,
                                      prompt_tokens=30, output_tokens=10, seed=2))
    zero_pick = 8 + (np.arange(real.num_tokens) % 4)  # a zero expert per token, cycling through all four
    ids = np.concatenate([real.expert_ids, np.repeat(zero_pick[:, None, None], model.num_moe_layers, axis=1)], axis=2)
    with_zero = Trace(expert_ids=ids, seq_lens=real.seq_lens.copy(), phase=real.phase.copy(), num_experts=12,
                      layer_map=real.layer_map)
    objectives = []
    for trace in (real, with_zero):
        stats = planning_stats(trace, real_experts=8)
        assert stats.frequency.shape == (model.num_moe_layers, 8)
        s = dataclasses.replace(make_setup(hw, model, stats, batch_size=1, context_tokens=64,
                                           formats=("bf16", "int8", "int4")), device_reserve=(0, 0), host_reserve=(0, 0))
        objectives.append(solve(build_problem(s, None), prefetch=False, gap=0.0).objective_s)
    assert objectives[1] == pytest.approx(objectives[0], rel=1e-12)
