"""Benchmark: the placement ILP's solve time, gap and predicted speed-up over the baselines.

The matrix: OLMoE-1B-7B, Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3 on five bundled
profiles (desktop-4090, desktop-3060, cpu-server-4090, workstation-3090, laptop-4060), each
at two quality budgets: that of uniform int4 (the default) and that of uniform int8 (tighter).
Baselines always use one format for the whole model (the fastest their budget allows); the
ILP may mix formats within the budget. Speeds are the shared cost model's predictions at
batch 1 (the latency objective), so every ratio compares figures from the same run.

Targets (from the issue): >= 1.5x the best baseline on the default case (mixtral-8x7b on
desktop-4090) and on average over the matrix; DeepSeek-V3 solves in <= 5 s with gap <= 0.5%
on cpu-server-4090 and desktop-4090. Where a case falls short of 1.5x, its ``note`` says why.
Times are recorded as wall-clock and CPU seconds (``*_cpu_s``, this process: HiGHS runs in
it); the solve target is judged on CPU seconds, which a busy machine does not inflate. The
solver stops on work limits (node limits), so the plans do not depend on the machine's load.

Diagnostic (``per_token``): the cost model prices a batch-1 layer over the distinct per-token
outcomes of the exact LRU replay (which of a token's experts are resident, hit, miss or run
on the CPU). ``per_token`` re-prices the ILP's plan and every baseline's on the trace's
tokens with the same schedule (layer_schedule.expected_max) but with cache hits drawn independently
at the planned hit rate, so a gain that rests on the hits' timing (rather than their rate)
shows up as a ratio below the predicted one.

Levers (``levers_used``, ``levers``, ``speedup_over_popularity``): popularity (Fiddler's
placement) is the baseline on the ILP's own engine; each case lists where the ILP's plan
differs from it (format mix, expert and dense format, resident counts, execution-site split,
cache slots, NVMe homes, prefetch; benchmarks/_levers.py) and, per lever used, the ILP
re-solved with that lever pinned to popularity's choice (``loss_when_pinned``: the slowdown,
or that nothing fits then). ``format_headroom`` bounds the expert bytes a format mix could
save under the budget: per expert, and within the ILP's per-layer options.

Workloads: each model's default workload (profiles.workload.defaults) when that module is
present, else a seeded synthetic trace of the model's shape.

Run: ``python benchmarks/bench_optimize.py [--models ...] [--profiles ...] [--out PATH]``

``--deepseek``: only the DeepSeek-V3 solve table (the issue's target: both 4090 profiles, both
budgets; the plan's solver status, gap, bound and CPU seconds, no levers or per-token pricing),
written to ``benchmarks/results/optimize_deepseek.json`` unless ``--out`` says otherwise.
``--deepseek --measured-errors``: the same table with per-expert errors (issue 16's target: DeepSeek-V3
still plans in <= 10 s with gap <= 0.5% when each expert has its own error at each format, so the
ILP's per-expert format tiers are offered): each (layer, expert, format) error is the format's
constant times a seeded lognormal factor (sigma 0.5, seed 0), as a measured quality file would
give; written to ``benchmarks/results/optimize_deepseek_measured.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import _levers as lv  # benchmarks/ is on sys.path when a script runs
from _provenance import provenance
from planner.costs import QUANT_ERROR
from planner.layer_schedule import expected_max
from planner.optimize import OptimizeRequest, OptimizeResult, optimize
from planner.layer_breakdown import layer_breakdown
from profiles.errors import InfeasibleError
from profiles.models import load_model
from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import Trace

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("olmoe-1b-7b", "mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3")
PROFILES = ("desktop-4090", "desktop-3060", "cpu-server-4090", "workstation-3090", "laptop-4060")
BUDGETS = {"int4": QUANT_ERROR["int4"], "int8": QUANT_ERROR["int8"]}  # uniform-format error as the budget
DEFAULT_CASE = ("mixtral-8x7b", "desktop-4090", "int4")
TARGET_SPEEDUP = 1.5
DSV3_PROFILES = ("cpu-server-4090", "desktop-4090")
DSV3_SOLVE_S, DSV3_GAP = 5.0, 0.005  # the issue: DeepSeek-V3 in <= 5 s (CPU) with gap <= 0.5%
DSV3_MEASURED_TOTAL_S = 10.0  # issue 16: with measured per-expert errors, planned in <= 10 s (CPU) with gap <= 0.5%
MEASURED_SIGMA, MEASURED_SEED = 0.5, 0
MATTERS = 1.01  # a lever matters where pinning it costs over 1% of tokens/s
TIME_LIMIT_S = 300.0  # the wall-clock safety net only: work limits end the solves


def _trace(model_name: str) -> Trace:
    """The model's default workload, or a seeded synthetic trace of its shape."""
    m = load_model(model_name)
    try:
        from profiles.workload.defaults import default_workload
    except ImportError:
        return generate(SyntheticWorkload(num_layers=m.num_moe_layers, num_experts=m.num_experts, top_k=m.top_k,
                                          num_sequences=8, prompt_tokens=128, output_tokens=64, seed=0,
                                          model=m.name))
    return default_workload(m)


def _setting(name: str, plan) -> str:
    """The baseline's setting from its plan's note ``baseline NAME on engine ENGINE: SETTING``."""
    prefix = f"baseline {name} on engine "
    return next((n.split(": ", 1)[1] for n in plan.notes if n.startswith(prefix) and ": " in n), "")


def _why(res: OptimizeResult, best_name: str | None, speedup: float | None, ilp: dict, headroom: dict) -> str:
    """Why a case is where it is: which baselines do not fit, and, short of the target, why.
    ``ilp``: the plan's shape (_levers.plan_shape); ``headroom``: _levers.format_headroom."""
    from planner.baselines import BASELINES

    missing = [n for n in BASELINES if n not in res.baselines]
    parts = [f"do not fit: {', '.join(missing)}"] if missing else []
    slots = [k for k in res.setup.cache_sizes() if k > 0]
    if "lru-offload" in missing and slots:
        parts.append(f"lru-offload tries only the planner's cache grid, whose smallest size ({min(slots)} slots "
                     f"per layer) does not fit on the GPU next to the dense weights and KV cache")
    if speedup is None:
        return "; ".join(parts + ["no baseline fits this hardware: the ILP's plan is the only one"])
    plan, best = res.plan, res.baselines[best_name]
    L, E = len(plan.layers), len(plan.layers[0].home)
    if speedup >= TARGET_SPEEDUP:
        if best_name == "accelerate":
            parts.append("only HF accelerate's per-forward streaming fits among the baselines; the ILP fetches "
                         "just the experts a token uses")
        return "; ".join(parts)
    bd = layer_breakdown(plan, res.setup)
    bound = bd.bound_by
    split = ilp["split"]
    if best.inputs.engine != plan.inputs.engine and speedup < 1:
        parts.append(f"{best_name} ({_setting(best_name, best)}) is priced on its own engine "
                     f"({best.inputs.engine}), which runs it faster than engine {plan.inputs.engine} (the one "
                     f"the ILP plans for) runs the ILP's plan: a gap between engines, not placements")
    elif [(x.home, x.format, x.site, x.cache_slots) for x in plan.layers] == \
            [(x.home, x.format, x.site, x.cache_slots) for x in best.layers] and plan.prefetch == best.prefetch:
        parts.append(f"the best baseline's plan ({best_name}, {_setting(best_name, best)}) is optimal under the "
                     f"cost model: the ILP returns the same placement")
    elif "all-gpu" in res.baselines and res.baselines["all-gpu"].predicted["tokens_per_s"] >= \
            best.predicted["tokens_per_s"] * (1 - 1e-9):
        parts.append(f"everything fits on the GPU at {_setting('all-gpu', res.baselines['all-gpu'])}, so all-gpu "
                     f"is near the optimum; the ILP gains only by running {split['cpu_local'] + split['hybrid']} "
                     f"of {L * E} cold experts on the CPU (local/hybrid) in parallel with the GPU")
    elif bd.dense_s / bd.step_s > 0.5:
        parts.append(f"the dense part (attention, dense weights, KV reads) is {100 * bd.dense_s / bd.step_s:.0f}% "
                     f"of the step and no expert placement changes it")
    elif bound.count("link") > L / 2:
        parts.append(f"the link bounds {bound.count('link')} of {L} layers: the experts that fit in neither GPU "
                     f"nor host memory cross PCIe/NVMe in every plan, and {best_name} "
                     f"({_setting(best_name, best)}) already moves about as little")
    elif bound.count("cpu") > L / 2:
        parts.append(f"the host CPU bounds {bound.count('cpu')} of {L} layers: the experts that do not fit on the "
                     f"GPU run on the CPU in every good plan, as in {best_name} ({_setting(best_name, best)})")
    else:
        parts.append(f"{best_name} ({_setting(best_name, best)}) already has the optimum's structure: the ILP "
                     f"keeps {split['resident']} of {L * E} experts resident + {ilp['cache']['total_slots']} cache "
                     f"slots, the rest on the CPU; it gains by balancing GPU and CPU time per layer")
    if ilp["num_formats"] == 1 and headroom:
        fm = next(iter(ilp["formats"]))
        parts.append(f"one expert format ({fm}): within this budget a per-expert mix could hold the experts in "
                     f"{100 * headroom['per_expert']:.1f}% fewer bytes than one format, the ILP's options (one "
                     f"format for a layer's resident ranks, one for its offloaded ranks) in "
                     f"{100 * headroom['rank_split']:.1f}% at best and {100 * headroom['at_plan_residency']:.1f}% "
                     f"at this plan's residency")
    return "; ".join(parts)


def per_token_tpot(plan, s, trace: Trace, seed: int = 0) -> float | None:
    """Mean over the trace's tokens of the layers' seconds + dense seconds (batch 1), each layer
    on planner.costs' batch-1 schedule (layer_schedule.expected_max) with the token's own outcome,
    its cache hits drawn at the planned hit rate. None for batch > 1.
    """
    if plan.batch_size != 1:
        return None
    if s.engine is not None and plan.inputs.engine != s.engine.name:  # a baseline on its own engine, as
        from profiles.engines import load_engine  # layer_breakdown prices it

        s = s.with_engine(load_engine(plan.inputs.engine), [f for layer in plan.layers for f in layer.format])
    st = s.stats
    bd = layer_breakdown(plan, s)
    rng = np.random.default_rng(seed)
    ids = trace.expert_ids.astype(np.int64)  # [T, L, K]
    prefetch = plan.prefetch == "next-layer"
    one = np.array([1.0])
    total = np.zeros(ids.shape[0])  # [T]

    def per_token(v) -> np.ndarray:
        return np.full(ids.shape[0], v)

    for l, (p, q, bi, c, boi, hi, mode) in enumerate(bd.specs):
        rank = np.empty(st.num_experts, np.int64)
        rank[st.order[l]] = np.arange(st.num_experts)
        rk = rank[ids[:, l, :]]  # [T, K] frequency rank of each routed expert
        br, bo = s.formats[bi], s.formats[boi]
        x = s.transfer_s(s.homes[hi], s.expert_bytes(bo)) if s.homes else 0.0
        band = (rk >= p) & (rk < q)  # through the cache; ranks past q run on the CPU
        hit = rng.random(rk.shape) < (st.hit_rate(l, p, c, q) if q > p else 0.0)
        counts = ((rk < p).sum(1), (band & hit).sum(1), (band & ~hit).sum(1), (rk >= q).sum(1))  # [T] each

        # the token's layer on planner.costs' own batch-1 schedule, with its drawn outcome
        tau, tau_prefetch, _ = expected_max(
            *counts, per_token(mode), per_token(s.call_s(s.compute, br, one)[0]),
            per_token(s.call_s(s.compute, bo, one)[0]), per_token(s.call_s(s.host, bo, one)[0]), per_token(x),
            per_token(q - p), float(st.predictability[l]), 2 * s.activation_s(1.0))
        total += tau_prefetch if prefetch else tau
    return float(total.mean() + bd.dense_s)


def run_case(model: str, profile: str, budget_name: str, trace: Trace) -> dict:
    budget = BUDGETS[budget_name]
    case = {"model": model, "profile": profile, "quality_budget_name": f"uniform {budget_name}",
            "quality_budget": budget, "workload": trace.source}
    t0, c0 = time.perf_counter(), time.process_time()
    req = OptimizeRequest(hardware=profile, model=model, trace=trace, quality_budget=budget, time_limit_s=TIME_LIMIT_S)
    try:
        res = optimize(req)
    except InfeasibleError as exc:
        case.update(status="infeasible", note=str(exc), wall_s=round(time.perf_counter() - t0, 3),
                    cpu_s=round(time.process_time() - c0, 3))
        return case
    plan = res.plan
    tps = plan.predicted["tokens_per_s"]
    baselines = {name: b.predicted["tokens_per_s"] for name, b in res.baselines.items()}
    best_name = max(baselines, key=lambda n: (baselines[n], n)) if baselines else None
    best_tps = baselines[best_name] if best_name else None
    speedup = tps / best_tps if best_tps else None
    beaten = sorted(n for n, v in baselines.items() if v > tps * (1 + 1e-9))
    # a baseline on the ILP's own engine that beats it is a bug (the ILP has its options);
    # one on another engine is that engine's speed
    same = [n for n in beaten if res.baselines[n].inputs.engine == plan.inputs.engine]
    sv = plan.solver
    tiers = {m: mem.tier for m, mem in res.setup.hardware.memories.items()}
    pop = res.baselines.get("popularity")
    shape, pop_shape = lv.plan_shape(plan, tiers), lv.plan_shape(pop, tiers) if pop else None
    ref = lv.reference(shape, pop_shape, res.setup.stats.frequency)
    used = lv.levers_used(shape, ref)
    c1 = time.process_time()
    loss = lv.lever_loss(res, req, used, ref)
    levers_cpu_s = time.process_time() - c1
    headroom = lv.format_headroom(res.setup, budget, shape["resident_per_layer"])
    headroom = {k: round(float(v), 6) + 0.0 for k, v in headroom.items()}  # + 0.0: no -0.0
    case.update(
        status=sv.status, ilp_tokens_per_s=tps, ilp_tpot_s=plan.predicted["tpot_s"],
        ilp_quality_error=plan.quality_error, ilp_engine=plan.inputs.engine,
        best_baseline=best_name, best_baseline_tokens_per_s=best_tps,
        best_baseline_setting=_setting(best_name, res.baselines[best_name]) if best_name else None,
        speedup=speedup, speedup_over_popularity=tps / baselines["popularity"] if pop else None,
        levers_used=used,
        baselines_tokens_per_s=dict(sorted(baselines.items(), key=lambda kv: -kv[1])),
        baselines_setting={n: _setting(n, b) for n, b in res.baselines.items()},
        baselines_engine={n: b.inputs.engine for n, b in res.baselines.items()},
        **{k: res.timings_s[k] for k in ("stats_s", "build_s", "solve_s", "total_s", "stats_cpu_s", "build_cpu_s",
                                         "solve_cpu_s", "total_cpu_s")}, gap=sv.gap, objective_s=sv.objective, bound_s=sv.bound,
        variables=sv.variables, constraints=sv.constraints,
        # the ILP's levers against popularity's (same engine): what each is worth when pinned
        levers={"ilp": shape, "popularity": pop_shape, "reference": ref, "loss_when_pinned": loss,
                "cpu_s": round(levers_cpu_s, 3)},
        format_headroom=headroom,
        bound_by={k: layer_breakdown(plan, res.setup).bound_by.count(k) for k in ("device", "cpu", "link")},
        note=_why(res, best_name, speedup, shape, headroom),
    )
    if same:
        case["suspicious"] = f"baselines faster than the ILP on its own engine: {', '.join(same)} (a bug: the ILP " \
                             "sees their options)"
    if sorted(set(beaten) - set(same)):
        case["faster_on_own_engine"] = sorted(set(beaten) - set(same))
    # diagnostic: the same plans priced token by token (see the module docstring)
    pt = {"ilp": per_token_tpot(plan, res.setup, trace)}
    pt.update({n: per_token_tpot(b, res.setup, trace) for n, b in res.baselines.items()})
    if pt["ilp"] is not None:
        tps_pt = {n: 1.0 / v for n, v in pt.items()}
        best_pt = max((n for n in tps_pt if n != "ilp"), key=lambda n: tps_pt[n], default=None)
        case["per_token"] = {
            "ilp_tokens_per_s": tps_pt["ilp"], "ilp_over_predicted": tps_pt["ilp"] / tps,
            "best_baseline": best_pt, "best_baseline_tokens_per_s": tps_pt.get(best_pt),
            "speedup": tps_pt["ilp"] / tps_pt[best_pt] if best_pt else None,
            "baselines_tokens_per_s": {n: v for n, v in tps_pt.items() if n != "ilp"}}
        ratio = tps_pt["ilp"] / tps_pt[best_pt] if best_pt else None
        if ratio is not None and ratio < 1 - 1e-3 and (speedup is None or ratio < speedup * (1 - 1e-3)):
            case["per_token"]["warning"] = (
                f"priced token by token the ILP's plan ({tps_pt['ilp']:.3g} tok/s) is slower than {best_pt} "
                f"({tps_pt[best_pt]:.3g} tok/s): its predicted gain rests on when its cache hits come, not how often")
    return case


def measured_errors(model: str, formats=("bf16", "int8", "int4")) -> dict[str, np.ndarray]:
    """Per-expert errors as a quality file gives them (``format -> [L, E]``): each format's
    constant times a seeded lognormal factor, one draw per (layer, expert, format)."""
    m = load_model(model)
    rng = np.random.default_rng(MEASURED_SEED)
    shape = (m.num_moe_layers, m.num_experts)
    return {fm: QUANT_ERROR[fm] * rng.lognormal(0.0, MEASURED_SIGMA, shape) for fm in formats}


def solve_case(model: str, profile: str, budget_name: str, trace: Trace,
               expert_error: dict[str, np.ndarray] | None = None) -> dict:
    """The ILP's solve alone (--deepseek): status, gap, bound and seconds, as run_case sets it up."""
    budget = BUDGETS[budget_name]
    case = {"model": model, "profile": profile, "quality_budget_name": f"uniform {budget_name}",
            "quality_budget": budget, "workload": trace.source}
    req = OptimizeRequest(hardware=profile, model=model, trace=trace, quality_budget=budget, time_limit_s=TIME_LIMIT_S,
                          expert_error=expert_error)
    try:
        res = optimize(req)
    except InfeasibleError as exc:
        return case | {"status": "infeasible", "note": str(exc)}
    sv = res.plan.solver
    case.update(status=sv.status, gap=sv.gap, objective_s=sv.objective, bound_s=sv.bound,
                variables=sv.variables, constraints=sv.constraints, ilp_tokens_per_s=res.plan.predicted["tokens_per_s"],
                **{k: res.timings_s[k] for k in ("stats_s", "build_s", "solve_s", "total_s", "stats_cpu_s",
                                                 "build_cpu_s", "solve_cpu_s", "total_cpu_s")})
    case["layers_with_3_formats"] = sum(1 for layer in res.plan.layers if len(set(layer.format)) >= 3)
    if expert_error is None:
        case["within_target"] = case["solve_cpu_s"] <= DSV3_SOLVE_S and (sv.gap or 0.0) <= DSV3_GAP
    else:
        case["within_target"] = case["total_cpu_s"] <= DSV3_MEASURED_TOTAL_S and (sv.gap or 0.0) <= DSV3_GAP
    return case


def _deepseek(args: argparse.Namespace) -> None:
    """--deepseek: the DeepSeek-V3 solve table."""
    started, started_cpu = time.perf_counter(), time.process_time()
    trace = _trace("deepseek-v3")
    errors = measured_errors("deepseek-v3") if args.measured_errors else None
    cases = [solve_case("deepseek-v3", profile, budget, trace, errors)
             for budget in args.budgets for profile in DSV3_PROFILES]
    target = ({"total_cpu_s": DSV3_MEASURED_TOTAL_S, "gap": DSV3_GAP} if errors else
              {"solve_cpu_s": DSV3_SOLVE_S, "gap": DSV3_GAP})
    record = {"benchmark": "optimize_deepseek" + ("_measured" if errors else ""),
              **provenance(("numpy", "pulp", "highspy")),
              "settings": {"objective": "latency", "batch_size": 1, "context_tokens": 4096,
                           "time_limit_s": TIME_LIMIT_S, "solver": "highs", "budgets": BUDGETS,
                           "expert_errors": (f"per (layer, expert, format): the format's constant x lognormal(0, "
                                             f"{MEASURED_SIGMA}), seed {MEASURED_SEED}") if errors else "the constants"},
              "target": {**target, "met": all(c.get("within_target", False) for c in cases)},
              "cases": cases,
              "wall_s": round(time.perf_counter() - started, 2), "cpu_s": round(time.process_time() - started_cpu, 2)}
    out = args.out or ROOT / "benchmarks" / "results" / ("optimize_deepseek_measured.json" if errors
                                                          else "optimize_deepseek.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    for c in cases:
        print(f"{c['profile']:17} {c['quality_budget_name']:13} {c['status']:10} gap {100 * (c.get('gap') or 0):.3f}% "
              f"solve {c.get('solve_cpu_s', 0):.2f} CPU-s (total {c.get('total_cpu_s', 0):.2f})")
    print(json.dumps(record["target"]))


def _geomean(xs: list[float]) -> float | None:
    return float(math.exp(np.mean(np.log(xs)))) if xs else None


def _summary(cases: list[dict]) -> dict:
    out = {}
    for budget in BUDGETS:
        sp = [c["speedup"] for c in cases if c["quality_budget_name"] == f"uniform {budget}" and c.get("speedup")]
        out[budget] = {"cases": len(sp), "mean_speedup": float(np.mean(sp)) if sp else None,
                       "geomean_speedup": _geomean(sp), "median_speedup": float(np.median(sp)) if sp else None,
                       "min_speedup": min(sp, default=None),
                       "max_speedup": max(sp, default=None),
                       "cases_at_or_above_target": sum(1 for x in sp if x >= TARGET_SPEEDUP)}
    sp_all = [c["speedup"] for c in cases if c.get("speedup")]
    out["all"] = {"cases": len(sp_all), "mean_speedup": float(np.mean(sp_all)) if sp_all else None,
                  "geomean_speedup": _geomean(sp_all)}
    default = next((c for c in cases if (c["model"], c["profile"], c["quality_budget_name"])
                    == (DEFAULT_CASE[0], DEFAULT_CASE[1], f"uniform {DEFAULT_CASE[2]}")), None)
    dsv3 = {c["profile"] + "/" + c["quality_budget_name"].split()[-1]:
            {"solve_cpu_s": c.get("solve_cpu_s"), "total_cpu_s": c.get("total_cpu_s"), "solve_s": c.get("solve_s"),
             "total_s": c.get("total_s"), "gap": c.get("gap"), "status": c.get("status"),
             "within_target": c.get("solve_cpu_s") is not None and c["solve_cpu_s"] <= DSV3_SOLVE_S
             and (c.get("gap") or 0.0) <= DSV3_GAP,
             "total_within_target": c.get("total_cpu_s") is not None and c["total_cpu_s"] <= DSV3_SOLVE_S}
            for c in cases if c["model"] == "deepseek-v3" and c["profile"] in DSV3_PROFILES}
    pt = [c for c in cases if c.get("per_token", {}).get("speedup")]
    out["per_token"] = {
        "cases": len(pt), "geomean_speedup": _geomean([c["per_token"]["speedup"] for c in pt]),
        "ilp_slower_than_best_baseline": [f"{c['model']}/{c['profile']}/{c['quality_budget_name'].split()[-1]}"
                                          for c in pt if "warning" in c["per_token"]],
        "ilp_over_predicted_min": min((c["per_token"]["ilp_over_predicted"] for c in pt), default=None)}
    targets = {
        "default_case": {"case": "/".join(DEFAULT_CASE), "speedup": default and default.get("speedup"),
                         "target": TARGET_SPEEDUP,
                         "met": bool(default and (default.get("speedup") or 0) >= TARGET_SPEEDUP)},
        # the arithmetic mean is dominated by the few cases where only a straw man (accelerate's
        # streaming) fits; the geometric mean and the median say more
        "matrix_average": {budget: {"mean_speedup": out[budget]["mean_speedup"],
                                    "geomean_speedup": out[budget]["geomean_speedup"],
                                    "median_speedup": out[budget]["median_speedup"], "target": TARGET_SPEEDUP,
                                    "met_by_mean": bool((out[budget]["mean_speedup"] or 0) >= TARGET_SPEEDUP),
                                    "met_by_geomean": bool((out[budget]["geomean_speedup"] or 0) >= TARGET_SPEEDUP)}
                           for budget in BUDGETS},
        "deepseek_v3_solve": {"target_solve_s": DSV3_SOLVE_S, "target_gap": DSV3_GAP, "cases": dsv3,
                              "met": bool(dsv3) and all(v["within_target"] for v in dsv3.values())},
        "suspicious_cases": [f"{c['model']}/{c['profile']}/{c['quality_budget_name']}" for c in cases
                             if "suspicious" in c],
    }
    return {"speedup": out, "levers": _lever_summary(cases), "targets": targets}


def _lever_summary(cases: list[dict]) -> dict:
    """How often the ILP pulls each lever that popularity does not, and how often pinning it to
    popularity's choice costs more than MATTERS (or leaves nothing that fits)."""
    ok = [c for c in cases if "levers_used" in c]
    sp = [c["speedup_over_popularity"] for c in ok if c.get("speedup_over_popularity")]

    def matters(c: dict, lever: str) -> bool:
        r = c["levers"]["loss_when_pinned"].get("expert_format" if lever == "format_mix" else lever)
        return r is not None and (not r["fits"] or r["slowdown"] > MATTERS)

    headroom = {b: {k: float(np.median(v)) if (v := [c["format_headroom"][k] for c in ok if c["format_headroom"]
                                                        and c["quality_budget_name"] == f"uniform {b}"]) else None
                    for k in ("per_expert", "rank_split", "at_plan_residency")} for b in BUDGETS}
    return {"cases": len(ok), "used": {k: sum(k in c["levers_used"] for c in ok) for k in lv.LEVERS},
            "matters": {k: sum(k in c["levers_used"] and matters(c, k) for c in ok) for k in lv.LEVERS},
            "matters_means": f"pinned to popularity's choice the ILP is over {100 * (MATTERS - 1):g}% slower, "
                             "or nothing fits",
            "single_format_cases": sum(c["levers"]["ilp"]["num_formats"] == 1 for c in ok),
            "popularity_fits": len(sp), "geomean_speedup_over_popularity": _geomean(sp),
            "equal_to_popularity": sum(abs(x - 1) <= 1e-3 for x in sp),
            "median_format_headroom": headroom}


def _pt(case: dict) -> str:
    """The per-token speed-up over the best per-token baseline, '!' when below 1."""
    sp = case.get("per_token", {}).get("speedup")
    return "-" if sp is None else f"{sp:.2f}x" + ("!" if sp < 1 - 1e-3 else "")


_SHORT = {"format_mix": "mix", "expert_format": "fmt", "dense_format": "dense", "resident": "res",
          "site_split": "site", "cache": "cache", "homes": "nvme", "prefetch": "pf"}


def _table(cases: list[dict]) -> str:
    head = (f"{'budget':6} {'model':14} {'profile':17} {'ILP tok/s':>10} {'best baseline':>14} {'tok/s':>9} "
            f"{'speed-up':>8} {'vs pop':>7} {'solve cpu':>9} {'total cpu':>9} {'gap':>8} {'vars':>6} {'per-token':>9} "
            f"levers")
    lines = [head, "-" * len(head)]
    for c in cases:
        budget = c["quality_budget_name"].split()[-1]
        if c["status"] == "infeasible":
            lines.append(f"{budget:6} {c['model']:14} {c['profile']:17} infeasible: {c['note'][:70]}")
            continue
        best = c["best_baseline"] or "-"
        btps = f"{c['best_baseline_tokens_per_s']:.3g}" if c["best_baseline_tokens_per_s"] else "-"
        sp = f"{c['speedup']:.2f}x" if c["speedup"] else "-"
        pop = f"{c['speedup_over_popularity']:.2f}x" if c.get("speedup_over_popularity") else "-"
        levers = ",".join(_SHORT[k] for k in c["levers_used"]) or "-"
        lines.append(f"{budget:6} {c['model']:14} {c['profile']:17} {c['ilp_tokens_per_s']:10.3g} {best:>14} "
                     f"{btps:>9} {sp:>8} {pop:>7} {c['solve_cpu_s']:9.2f} {c['total_cpu_s']:9.2f} "
                     f"{100 * (c['gap'] or 0):7.3f}% {c['variables']:6d} {_pt(c):>9} {levers}"
                     + ("  SUSPICIOUS" if "suspicious" in c else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--profiles", nargs="+", default=list(PROFILES))
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/optimize.json "
                                                                 "(optimize_deepseek.json with --deepseek)")
    parser.add_argument("--deepseek", action="store_true",
                        help="only the DeepSeek-V3 solve table (4090 profiles, solver figures, no levers)")
    parser.add_argument("--measured-errors", action="store_true",
                        help="with --deepseek: per-expert errors (seeded lognormal around the constants)")
    args = parser.parse_args()
    if args.deepseek:
        return _deepseek(args)
    args.out = args.out or ROOT / "benchmarks" / "results" / "optimize.json"

    started, started_cpu = time.perf_counter(), time.process_time()
    cases = []
    for model in args.models:
        t0 = time.perf_counter()
        trace = _trace(model)
        print(f"{model}: workload {trace.source!r} ({trace.num_tokens} "
              f"tokens) in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        for budget in args.budgets:
            for profile in args.profiles:
                case = run_case(model, profile, budget, trace)
                cases.append(case)
                print(_table([case]).splitlines()[-1], file=sys.stderr, flush=True)
    record = {
        "benchmark": "optimize", **provenance(("numpy", "pulp", "highspy")),
        # the cases run (a subset of the matrix when --models/--profiles/--budgets say so)
        "selection": {"models": args.models, "profiles": args.profiles, "budgets": args.budgets},
        "settings": {"objective": "latency", "batch_size": 1, "context_tokens": 4096, "time_limit_s": TIME_LIMIT_S,
                     "solver": "highs", "formats": ["bf16", "int8", "int4"], "budgets": BUDGETS,
                     "target_speedup": TARGET_SPEEDUP},
        **_summary(cases),
        "cases": cases,
        "wall_s": round(time.perf_counter() - started, 2), "cpu_s": round(time.process_time() - started_cpu, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(_table(cases))
    print(json.dumps({k: record[k] for k in ("speedup", "levers", "targets")}, indent=1))


if __name__ == "__main__":
    main()
