"""`planner optimize` as a library call: inputs in, a Plan (and the baselines' Plans) out.

    result = optimize(OptimizeRequest(hardware="desktop-4090", model="mixtral-8x7b"))
    result.plan.save("plan.json")
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, get_args

import numpy as np

from profiles.engines import Engine, load_engine
from profiles.errors import InfeasibleError, InputError
from profiles.hardware import Hardware, load_profile
from profiles.models import ModelSpec, load_model
from profiles.workload.trace import Trace

from .baselines import BASELINE_ENGINES, BASELINES, Baseline
from .batch_search import search_batch
from .costs import DEFAULT_FORMATS, N_SPEC, QUANT_ERROR, Setup, engine_runs, keeps_critical, step_time
from .setup import make_setup
from .energy import check_power, energy_problem, with_power_cap
from .ilp import Problem, SolveResult, _feasible, build_problem, explain_infeasible, solve
from .kv_offload import kv_sites, with_kv_on_host
from .miss_copy_options import copy_shares
from .prefill_sites import with_prefill_choice
from .nested_options import offers_nested, rows_in
from .multi_gpu import node_gpus, plan_multi_gpu
from .plan import Inputs, Plan, SolverInfo
from .plan_digest import digest, model_digest, workload_digest
from .plan_assembly import assemble_plan, option_rows
from .workload_view import PlanningStats, planning_stats

if TYPE_CHECKING:
    from .given import Fixes, GivenPolicy

__all__ = ["OptimizeRequest", "OptimizeResult", "optimize", "make_setup", "assemble_plan", "option_rows",
           "DEFAULT_HARDWARE", "DEFAULT_MODEL"]

DEFAULT_HARDWARE = "desktop-4090"
DEFAULT_MODEL = "mixtral-8x7b"


@dataclass(frozen=True)
class OptimizeRequest:
    """Everything `planner optimize` takes. Defaults plan Mixtral-8x7B on the 4090 desktop."""

    hardware: str = DEFAULT_HARDWARE
    model: str = DEFAULT_MODEL
    trace: Trace | None = None  # None: the model's default workload
    objective: str = "latency"  # latency | throughput | cost | energy (joules per token at batch_size)
    batch_size: int = 1
    context_tokens: int = 4096
    prompt_tokens: int = 512
    quality_budget: float | None = None  # None: the error of uniform int4
    formats: tuple[str, ...] = DEFAULT_FORMATS
    solver: str = "highs"
    time_limit_s: float = 300.0  # wall-clock safety net per solve (work limits decide the plan)
    gap: float = 0.001
    # SLOs: with --objective cost (TPOT default 0.2 s), or throughput given either, the batch size
    # is a decision (planner.batch_search) over 1..max_batch instead of batch_size
    tpot_slo_s: float | None = None
    ttft_slo_s: float | None = None
    max_batch: int = 1024
    critical: tuple[tuple[int, ...], ...] = ()  # per MoE layer: experts kept at full precision
    quant_error: dict[str, float] = field(default_factory=lambda: dict(QUANT_ERROR))
    # measured per-expert errors (profiles.quality.error_table): format -> [L, E]; None: the constants
    expert_error: dict[str, np.ndarray] | None = None
    quality_digest: str | None = None  # the quality file's digest, recorded in the plan's inputs
    engine: str | None = None  # engine profile (bundled name or path); None: the bundle runtime (or the policy's)
    policy: GivenPolicy | None = None  # a given configuration to price instead of solving (planner.given)
    fixes: Fixes | None = None  # parts of the plan fixed, the ILP decides the rest (planner.given)
    prefetch: str | None = None  # the plan's prefetch policy (Plan.prefetch); None: the faster of none/next-layer
    eviction: str | None = None  # the plan's cache eviction (Plan.eviction); None: lru
    # host DRAM as one port shared by CPU expert reads and copies (planner.dram; recorded in
    # the plan's inputs); False: the CPU and the link price apart, as before
    dram_contention: bool = False
    kv_cache: str = "auto"  # auto | device | host: where the KV cache lives (planner.kv_offload)
    multi_gpu: bool = False  # every GPU of the node, layers assigned pipeline-style (planner.multi_gpu)
    compare: bool = True  # also plan every baseline (OptimizeResult.baselines); False: the plan alone
    max_watts: float | None = None  # average power cap, W: energy per step <= max_watts x step time (planner.energy)
    drop_below: float | None = None  # task-specific plans: experts rarer than this may be dropped (planner.task)
    nested: bool = False  # offer nested int8 experts as bit-planes (planner.nested_options; --nested)
    # offer low-bit copies for low-gate misses: (copy format, gate threshold) (planner.miss_copy_options)
    miss_copy: tuple[str, float] | None = None
    dropped: tuple[tuple[int, ...], ...] = ()  # per layer the experts dropped (set by planner.task)
    dropped_importance: tuple[float, ...] = ()  # per layer their importance on the trace (planner.task)
    # batch -> the trace's low-gate shares at miss_copy (planner.miss_copy_options.copy_shares; set by optimize)
    low_gate: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None


@dataclass(frozen=True, eq=False)
class OptimizeResult:
    plan: Plan
    baselines: dict[str, Plan]  # name -> the baseline's best feasible plan
    setup: Setup
    timings_s: dict[str, float]


def _default_trace(model: ModelSpec) -> Trace:
    from profiles.workload.defaults import default_workload

    return default_workload(model)


def _now() -> np.ndarray:
    """``[2]`` wall-clock and CPU seconds now (timings report both: on a busy machine the CPU
    seconds are the fair figure)."""
    import time

    return np.array([time.perf_counter(), time.process_time()])


def optimize(req: OptimizeRequest) -> OptimizeResult:
    """Plan ``req`` (see :class:`OptimizeRequest`). Raises InfeasibleError with an explanation."""
    t0 = _now()
    profile, hw = load_profile(req.hardware)
    model = load_model(req.model)
    if req.policy is not None:
        req.policy.check(model)
    # a given configuration runs on its tool's engine unless another is named
    engine = load_engine(BASELINE_ENGINES[req.policy.name] if req.engine is None and req.policy else req.engine)
    _check_policies(engine, req)
    trace = req.trace if req.trace is not None else _default_trace(model)
    zero = model.zero_experts.count if model.zero_experts else 0
    if trace.num_experts not in (model.num_experts, model.num_experts + zero):
        raise InputError("the workload does not match the model", key="--trace",
                         value=f"{trace.num_layers} layers x {trace.num_experts} experts",
                         expected=f"{model.num_moe_layers} MoE layers x {model.num_experts} experts"
                                  + (f" (+{zero} zero-computation)" if zero else "") + f" ({model.name})",
                         fix="record or synthesise a trace for this model (planner trace synth --model ...)")
    stats = planning_stats(trace, real_experts=model.num_experts)
    if req.miss_copy is not None:  # the low-gate shares the copy options price (profiles.miss_copy)
        req = dataclasses.replace(req, low_gate=functools.lru_cache(maxsize=None)(functools.partial(
            copy_shares, trace, model.num_experts, req.miss_copy[1])))
    t_stats = _now()
    budget = req.quality_budget if req.quality_budget is not None else req.quant_error.get("int4", QUANT_ERROR["int4"])
    if req.quality_budget is None and req.expert_error is not None and "int4" in req.expert_error:
        w = stats.importance  # uniform int4 under the measured errors
        budget = float((w * req.expert_error["int4"]).sum() / max(float(w.sum()), 1e-300))
    inputs = Inputs(hardware=hw.name, hardware_digest=digest(profile.model_dump(mode="json")), model=model.name,
                    model_digest=model_digest(model), workload=trace.source or "trace",
                    workload_digest=workload_digest(trace), engine=engine.name,
                    engine_digest=digest(engine.profile.model_dump(mode="json")), quality_digest=req.quality_digest,
                    dram_contention=req.dram_contention)
    if req.drop_below is not None:  # task-specific: the best of a few drop levels (planner.task)
        from .task import optimize_dropping

        return optimize_dropping(req, hw, model, trace, stats, budget, inputs, t0, t_stats, engine)
    if req.objective == "cost" or (req.objective == "throughput" and (req.tpot_slo_s or req.ttft_slo_s)):
        return _optimize_batch(req, hw, model, stats, budget, inputs, t0, t_stats, engine)
    batch = 1 if req.objective == "latency" else req.batch_size
    return _optimize_at(req, hw, model, stats, budget, inputs, batch, t0, t_stats, engine)


def _check_policies(engine: Engine, req: OptimizeRequest) -> None:
    """Refuse an eviction or prefetch policy the engine does not have."""
    for what, name, listed in (("eviction", req.eviction, engine.profile.eviction),
                               ("prefetch", req.prefetch, engine.profile.prefetch)):
        known = get_args(Plan.model_fields[what].annotation)  # every policy the simulator has
        if name is not None and (name not in known or name not in listed):
            raise InputError(f"engine {engine.name} has no {what} policy {name}", key=f"--{what}", value=name,
                             expected=", ".join(listed) or "none (it has no expert cache)",
                             fix="pick one it lists, or another --engine (planner engines show NAME)")


def _optimize_at(req: OptimizeRequest, hw: Hardware, model: ModelSpec, stats: PlanningStats, budget: float,
                 inputs: Inputs, batch: int, t0: np.ndarray, t_stats: np.ndarray,
                 engine: Engine | None = None, compare: bool = True) -> OptimizeResult:
    s = make_setup(hw, model, stats, batch_size=batch, context_tokens=req.context_tokens, formats=req.formats,
                   critical=req.critical, quant_error=req.quant_error, engine=engine, fixes=req.fixes,
                   expert_error=req.expert_error, dram_contention=req.dram_contention)
    if req.dropped:  # planner.task: the stats are the trace's with these dropped
        s = dataclasses.replace(s, dropped=req.dropped, dropped_importance=req.dropped_importance)
    if req.nested:  # nested int8 experts among the options (planner.nested_options)
        s = dataclasses.replace(s, nested=True)
    if req.miss_copy is not None:  # low-bit copies for low-gate misses (planner.miss_copy_options)
        s = dataclasses.replace(s, miss_copy=req.miss_copy, low_gate=req.low_gate(batch))
    if req.policy is not None:  # a given configuration: priced as it is, no search
        from .given import price_given

        plan = price_given(s, req, inputs, budget)
        t_build = t_solve = _now()
    elif req.multi_gpu and req.fixes is None and len(node_gpus(s)) > 1:
        if req.kv_cache == "host":
            raise InputError("a plan over several GPUs keeps the KV cache on them", key="--kv-cache", value="host",
                             fix="use --kv-cache auto or device, or --parallel offload for one GPU")
        if req.objective == "energy" or req.max_watts is not None:
            raise InputError("--objective energy and --max-watts plan one GPU with offloading", key="--parallel",
                             value=hw.name, fix="add --parallel offload")
        if req.nested:
            raise InputError("--nested plans one GPU with offloading", key="--parallel", value=hw.name,
                             fix="add --parallel offload, or drop --nested")
        if req.miss_copy is not None:
            raise InputError("--miss-copy plans one GPU with offloading", key="--parallel", value=hw.name,
                             fix="add --parallel offload, or drop --miss-copy")
        t_build = _now()
        plan = plan_multi_gpu(s, req, inputs, budget)  # builds and solves: its time is the solve's
        t_solve = _now()
    else:
        plan, t_build = _solve_ilp(s, req, inputs, budget)
        t_solve = _now()
    baselines = _compare(req, hw, model, stats, budget, inputs, batch) if compare and req.compare else {}
    spans = {"stats": t_stats - t0, "build": t_build - t_stats, "solve": t_solve - t_build, "total": _now() - t0}
    timings = {f"{k}_s": float(v[0]) for k, v in spans.items()} | {f"{k}_cpu_s": float(v[1]) for k, v in spans.items()}
    return OptimizeResult(plan=plan, baselines=baselines, setup=s, timings_s=timings)


def _solve_ilp(s: Setup, req: OptimizeRequest, inputs: Inputs, budget: float) -> tuple[Plan, np.ndarray]:
    """The ILP's plan for ``s``, warm-started from the baselines, and when its model was built (:func:`_now`)."""
    kv_on_host = kv_sites(s, req.kv_cache)  # where the KV cache may live (a refusal before any work)
    # warm starts: the baselines' placements this engine can run (and that keep the fixes)
    candidates = [b for fn in BASELINES.values() for b in (fn(s, budget) or [])
                  if all(engine_runs(s, tuple(int(x) for x in spec)) for spec in b.specs)
                  and (s.fixes is None or s.fixes.keeps(s, b)) and keeps_critical(s, b.specs)]
    L = s.stats.num_layers
    extra = [np.array([b.specs[l] for b in candidates]).reshape(-1, N_SPEC) for l in range(L)]
    # a TTFT SLO binds in the ILP (each option's share of one prompt's prefill)
    ttft = (req.ttft_slo_s, req.prompt_tokens) if req.ttft_slo_s else None
    s = with_prefill_choice(s, ttft)  # per-layer prefill sites where a TTFT SLO asks (planner.prefill_sites)

    def build(s: Setup) -> Problem:
        problem = build_problem(s, budget, extra, ttft=ttft)
        if s.fixes is not None and s.fixes.dense_format:
            problem = dataclasses.replace(problem, fixed={s.fixes.dense_format: problem.fixed[s.fixes.dense_format]})
        return problem

    problem = build(s)
    t_build = _now()
    scored = _score_baselines(problem, candidates)
    warm = min(scored.values(), key=lambda x: x[1]) if scored else None
    both = (False, True) if s.engine_can("next-layer") else (False,)
    settings = [(on_host, prefetch) for on_host in kv_on_host
                for prefetch in (both if req.prefetch is None else (req.prefetch != "none",))]

    def solve_settings(problem: Problem, seeds: dict) -> list[tuple[SolveResult, Problem, tuple]]:
        results: list[tuple[SolveResult, Problem, tuple]] = []
        infeasible: InfeasibleError | None = None
        parts = {}  # the KV cache's site is a binary per plan, branched on at the root (planner.kv_offload)
        for on_host, prefetch in settings:
            if on_host not in parts:
                parts[on_host] = with_kv_on_host(problem, ttft) if on_host else problem
            part = parts[on_host]
            if part is None:
                continue
            seed = seeds.get((on_host, prefetch))  # the plain problem's plan, as rows of this part's tables
            start = None if seed is None else rows_in(seed[0], part.tables, seed[1])
            start = None if start is None else (start, seed[2])
            if start is None and results:
                start = (results[-1][0].choice, results[-1][0].dense_format)
            elif start is None and warm is not None:
                start = (warm[0], warm[2])
            # the first setting's plan bounds the next: no MIP where its LP bound cannot beat it
            try:
                results.append((_solve(part, req, prefetch=prefetch, solver=req.solver, time_limit_s=req.time_limit_s,
                                      gap=req.gap, warm=start,
                                      incumbent_s=min((r.objective_s for r, _, _ in results), default=None)),
                                part, (on_host, prefetch)))
            except InfeasibleError as exc:  # no plan with the cache here (its bound: infinite)
                infeasible = infeasible or exc
        if not results:
            raise infeasible or explain_infeasible(problem)
        return results

    seeds = {}
    if s.nested and any(offers_nested(s, l) for l in range(L)):
        # offering more options must never plan slower: the plain problem's plan of each setting
        # (a plan of the nested problem too, at the same price) is the nested solve's warm start,
        # and a solve never returns a plan slower than its warm start. The bound stays the nested
        # problem's own (the valid one over every option offered).
        try:
            plain = solve_settings(build(dataclasses.replace(s, nested=False)), {})
        except InfeasibleError:  # no plain plan: nothing to start from
            plain = []
        seeds = {key: (part.tables, r.choice, r.dense_format) for r, part, key in plain}
    results = solve_settings(problem, seeds)
    best, problem, _ = min(results, key=lambda r: r[0].objective_s)
    results = [r for r, _, _ in results]
    # the plan is the faster setting's; no plan of either is faster than the lesser bound
    bound = min(r.bound_s if r.bound_s is not None else r.objective_s for r in results)
    gap = max(0.0, (best.objective_s - bound) / best.objective_s) if best.objective_s > 0 else 0.0
    timed_out = any(r.timed_out for r in results)
    status = "optimal" if gap <= req.gap + 1e-9 else "time limit" if timed_out else "node limit"
    solver_info = SolverInfo(method="ilp", solver=best.solver, status=status, objective=best.objective_s,
                             bound=bound, gap=gap, time_limit_s=req.time_limit_s,
                             variables=best.variables, constraints=best.constraints)
    notes = ((f"the wall-clock safety net (--time-limit {req.time_limit_s:g} s) stopped the solver: this plan may "
              f"differ on a less busy machine; raise --time-limit",) if timed_out else ())
    return assemble_plan(problem, best.choice, best.dense_format, best.prefetch, solver_info, req, inputs, budget,
                         notes=notes, prefetch_policy=req.prefetch, eviction=req.eviction), t_build


def _solve(problem: Problem, req: OptimizeRequest, **kw) -> SolveResult:
    """:func:`planner.ilp.solve` for ``req``'s objective: ``--max-watts`` as a row and
    ``--objective energy`` as joules in place of seconds (planner.energy); ``problem`` itself
    (seconds) prices the plan."""
    if req.max_watts is not None:  # energy per step <= W x step time, a linear row
        check_power(problem.setup, "--max-watts")
        problem = with_power_cap(problem, req.max_watts)
    if req.objective == "energy":
        check_power(problem.setup, "--objective energy")
        problem = energy_problem(problem)
    try:
        return solve(problem, **kw)
    except InfeasibleError as exc:
        if req.max_watts is None:
            raise
        raise InfeasibleError(f"no plan averages at most {req.max_watts:g} W (--max-watts) within memory and the "
                              f"quality budget; smallest change: raise --max-watts ({exc})") from None


def _compare(req: OptimizeRequest, hw: Hardware, model: ModelSpec, stats: PlanningStats, budget: float,
             inputs: Inputs, batch: int) -> dict[str, Plan]:
    """Every baseline's best feasible plan, priced on its own engine (BASELINE_ENGINES): the
    placement a tool makes, at the speed that tool's software runs it."""
    out = {}
    for name, fn in BASELINES.items():
        engine = load_engine(BASELINE_ENGINES[name])
        try:
            s = make_setup(hw, model, stats, batch_size=batch, context_tokens=req.context_tokens, formats=req.formats,
                           critical=req.critical, quant_error=req.quant_error, engine=engine,
                           expert_error=req.expert_error, dram_contention=req.dram_contention)
        except InputError:
            continue  # the engine runs none of the formats on this hardware
        candidates = [b for b in fn(s, budget) or [] if keeps_critical(s, b.specs)]  # --critical binds here too
        if not candidates:
            continue
        L = stats.num_layers
        problem = build_problem(s, budget, [np.array([b.specs[l] for b in candidates]).reshape(-1, N_SPEC)
                                            for l in range(L)], grid=False)
        scored = _score_baselines(problem, candidates)
        if name not in scored:
            continue
        choice, seconds, dense_fm, prefetch, note = scored[name]
        info = SolverInfo(method=name, status="heuristic", objective=seconds)
        own = inputs.model_copy(update=dict(engine=engine.name,
                                            engine_digest=digest(engine.profile.model_dump(mode="json"))))
        out[name] = assemble_plan(problem, choice, dense_fm, prefetch, info, req, own, budget,
                                  notes=(f"baseline {name} on engine {engine.name}: {note}",))
    from .baselines_multi import compare_pipeline  # several GPUs: what a multi-GPU user runs

    def setup_for(engine_name: str) -> Setup | None:
        try:
            return make_setup(hw, model, stats, batch_size=batch, context_tokens=req.context_tokens,
                              formats=req.formats, critical=req.critical, quant_error=req.quant_error,
                              engine=load_engine(engine_name), expert_error=req.expert_error,
                              dram_contention=req.dram_contention)
        except InputError:
            return None
    return out | compare_pipeline(setup_for, budget, req, inputs)


def _score_baselines(problem: Problem, candidates: list[Baseline]) -> dict[str, tuple]:
    """name -> (choice, seconds, dense format, prefetch, note) of its fastest feasible candidate."""
    s = problem.setup
    best: dict[str, tuple] = {}
    for b in candidates:
        choice = option_rows(problem, b.specs)
        if not _feasible(problem, choice, b.dense_format):
            continue
        seconds = step_time(s, problem.tables, choice, problem.fixed[b.dense_format], b.prefetch)[0]
        if b.name not in best or seconds < best[b.name][1]:
            best[b.name] = (choice, seconds, b.dense_format, b.prefetch, b.note)
    return best


def _optimize_batch(req, hw, model, stats, budget, inputs, t0, t_stats, engine) -> OptimizeResult:
    """The batch size with the most tokens/s under the SLOs (the cost objective: the fewest $ per
    million tokens, the same batch on one machine), certified by planner.batch_search."""
    if req.objective == "cost" and hw.price_per_hour_usd is None:
        raise InputError("the cost objective needs a price", key="price_per_hour_usd", value=hw.name,
                         fix="add price_per_hour_usd to the profile's nodes, or use --objective throughput")
    tpot = req.tpot_slo_s if req.tpot_slo_s is not None or req.ttft_slo_s is not None else 0.2
    solved: dict[int, OptimizeResult] = {}

    spent = {"build_s": 0.0, "solve_s": 0.0, "build_cpu_s": 0.0, "solve_cpu_s": 0.0}

    def solve_at(batch: int, exact: bool) -> Plan:
        r = dataclasses.replace(req, gap=0.0) if exact else req
        solved[batch] = _optimize_at(r, hw, model, stats, budget, inputs, batch, t0, _now(), engine, compare=False)
        for k in spent:  # each solve's own model build and solve (its spans start at _now() above)
            spent[k] += solved[batch].timings_s[k]
        return solved[batch].plan

    plan, cert = search_batch(solve_at, slo_tpot_s=tpot, slo_ttft_s=req.ttft_slo_s, max_batch=req.max_batch,
                              gap=req.gap)
    slos = " and ".join(f"{n} <= {v * 1e3:g} ms" for n, v in (("TPOT", tpot), ("TTFT", req.ttft_slo_s))
                        if v is not None)
    note = (f"batch {cert.batch} chosen under {slos}: {len(cert.solved)} batch sizes solved; no batch up to "
            f"{cert.max_batch} makes more than {cert.tokens_per_s_bound:.4g} tok/s (gap {100 * cert.gap:.2f}%)")
    plan = plan.model_copy(update={"solver": plan.solver.model_copy(update={"batch_search": cert}),
                                   "notes": (*plan.notes, note)})
    res = solved[cert.batch]
    baselines = _compare(req, hw, model, stats, budget, inputs, cert.batch) if req.compare else {}
    total, stats_span = _now() - t0, t_stats - t0
    return dataclasses.replace(res, plan=plan, baselines=baselines, timings_s=res.timings_s | spent | {
        "stats_s": float(stats_span[0]), "stats_cpu_s": float(stats_span[1]),
        "total_s": float(total[0]), "total_cpu_s": float(total[1])})
