"""An expert-parallel plan from a request (:mod:`.request`): load the inputs, pick the storage
format that fits every GPU's memory, place the experts (ours and the baselines), and write
each placement as a :class:`~planner.plan.Plan`.

Shape legend: L = MoE layers, E = routed experts, R = physical experts per layer (E plus
the redundant copies), G = GPUs (EP ranks), N = nodes.

Memory per GPU: R / G expert slots x L layers + dense weights (replicated: data-parallel
attention) + KV cache for ``batch_size`` sequences, within its HBM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from profiles.engines import load_engine
from profiles.errors import InputError
from profiles.hardware import load_profile
from profiles.models import load_model

from ..eplb import PLACEMENTS, eplb_speed_aware
from ..plan import Inputs, Plan, SolverInfo
from ..plan_digest import digest, model_digest, workload_digest
from .bound import traffic_bound
from .layout_plan import plan_from_placement
from .metrics import placement_metrics
from .placement import place_for
from .quality import FormatChoice, quant_errors
from .request import RANKS, ClusterRequest, budget_of, check_redundant, default_redundant, formats_of, workload_of
from .slots import attention_and_slots, trim_slots
from .speed import gpu_speeds, tokens_per_call
from .topology import Topology, topology
from .workload import group_limited, workload_arrays

__all__ = ["METHODS", "ClusterResult", "plan_cluster", "plan_from_placement"]

METHODS = ("ours", *PLACEMENTS)


@dataclass(frozen=True, eq=False)
class ClusterResult:
    """A cluster plan, its placement and every method's metrics (ours and the baselines)."""

    plan: Plan
    placement: np.ndarray  # [L, R] phy2log of ours
    baselines: dict[str, Plan]
    metrics: dict[str, dict[str, Any]]  # method -> placement_metrics (+ solve_s)
    topology: Topology
    num_physical: int
    expert_format: str
    workload: str
    timings_s: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _predicted(m: dict[str, Any]) -> dict[str, float]:
    out = {"max_mean_load": m["max_mean_avg"], "max_mean_load_worst_layer": m["max_mean_worst"],
           "cross_gpu_fraction": m["cross_gpu_fraction"], "cross_node_fraction": m["cross_node_fraction"],
           "traffic_s_per_token": m["traffic_s_per_token"]}
    if m.get("nodes_per_token") is not None:
        out["nodes_per_token"] = m["nodes_per_token"]
    return {k: float(v) for k, v in out.items()}


def _gap(objective: float, bound: float) -> float:
    """Relative gap ``(objective - bound) / objective`` (0 when both are 0)."""
    return max(objective - bound, 0.0) / objective if objective > 0 else 0.0


def _quality_note(choice: FormatChoice, critical: tuple[tuple[int, ...], ...]) -> str:
    kept = sum(len(c) for c in critical)
    return (f"experts in {choice.expert_format}" + (f", {kept} critical in {choice.full_format}" if kept else "")
            + f", dense weights in {choice.dense_format}: quality error {choice.quality_error:.4g} within the budget "
            f"{choice.quality_budget:.4g}")


def plan_cluster(req: ClusterRequest) -> ClusterResult:
    """Plan expert parallelism for ``req`` (see :class:`ClusterRequest`) and score the baselines.

    Raises:
        InputError: bad inputs (profile, model, trace, redundant count, critical experts, ranks), or
            no format meets the quality budget (or keeps the critical experts at full
            precision) in the GPUs' memory (:meth:`.quality.FormatChoice.error`).
        InfeasibleError: the experts do not fit the GPUs' memory in any of ``req.formats``.
    """
    t0 = time.perf_counter()
    if req.ranks not in RANKS:
        raise InputError("unknown rank layout", key="ranks", value=req.ranks, expected=" | ".join(RANKS),
                         fix="pass one of " + ", ".join(RANKS))
    eng = load_engine(req.engine)
    if not eng.runs_expert_parallel:
        raise InputError(f"engine {eng.name} does not run expert-parallel plans", key="--engine", value=req.engine,
                         expected="an engine whose profile says expert_parallel (sglang, vllm)",
                         fix="name one of those, or plan offloading (--parallel offload or pipeline)")
    profile, hw = load_profile(req.hardware)
    model = load_model(req.model)
    topo = topology(hw)
    G, N = topo.num_gpus, topo.num_nodes
    E = model.num_experts
    redundant = default_redundant(E, G) if req.redundant_experts is None else req.redundant_experts
    check_redundant(redundant, E, G)
    R = E + redundant
    trace = workload_of(req.trace, model) if any(req.critical) else req.trace  # only critical experts need it now
    choice = formats_of(req, model, hw, topo, R // G, trace)
    offload = choice.expert_format is None and req.offload
    if choice.expert_format is None and not offload:
        raise choice.error(G, sum(len(c) for c in req.critical))
    if offload:  # one copy of each expert per layer: a replica would spend the memory the offload needs
        if E % G or req.redundant_experts:
            raise InputError("expert parallelism with offload places one copy of each expert", key="--redundant-experts"
                             if req.redundant_experts else "--hardware", value=req.redundant_experts or G,
                             expected=f"no redundant experts and a GPU count that divides {E} experts",
                             fix="drop --redundant-experts, or plan with --parallel pipeline or offload")
        redundant, R = 0, E
    trace = workload_of(trace, model)
    # the plan names the workload it was given (simulate and export replay that one), not the
    # group-limited copy the placer balances
    given, given_digest = trace, workload_digest(trace)
    limited = req.group_limited if req.group_limited is not None else model.n_group > 1
    if limited and model.n_group > 1:
        trace = group_limited(trace, model.n_group, model.topk_group, num_experts=E, seed=req.seed)
    load, trans = workload_arrays(trace, E)
    # each GPU's expert speed at the decode batch (mean 1; all 1 on one GPU type): balance is of time
    speed = gpu_speeds(hw, topo, model, choice.expert_format or req.formats[-1],
                       tokens_per_call(req.batch_size, G, model.top_k, R), req.engine)
    mixed = not np.all(speed == 1.0)
    t_stats = time.perf_counter()

    def score(p: np.ndarray) -> dict[str, Any]:
        return placement_metrics(p, load, trans, topo, model.hidden_size, trace.num_tokens, trace.expert_ids,
                                 speed=speed if mixed else None)

    placements: dict[str, np.ndarray] = {}
    metrics: dict[str, dict[str, Any]] = {}
    baseline_fns = dict(PLACEMENTS)
    if mixed:  # EPLB global balancing time, beside the speed-blind one people run
        baseline_fns["eplb-speed"] = lambda w, r, _groups, _nodes, g: eplb_speed_aware(w, r, g, speed)
    for name, fn in baseline_fns.items():
        t = time.perf_counter()
        placements[name] = fn(load, R, model.n_group, N, G)
        metrics[name] = score(placements[name]) | {"solve_s": time.perf_counter() - t}
    t = time.perf_counter()
    ours, info = place_for(req.plan_for, trace, load, trans, topo, R, balance_slack=req.balance_slack,
                           sweeps=req.sweeps, time_limit_s=req.time_limit_s, hidden_size=model.hidden_size,
                           seed=req.seed, speed=speed if mixed else None)
    cap, planned_load = info.pop("_cap"), info.pop("_load")
    info["slots"], attention = None, None
    ranks = ("uneven" if eng.runs_uneven_ranks else "even") if req.ranks == "engine" else req.ranks
    if not offload and ranks != "even":  # sequences per GPU for data-parallel attention, slots per GPU
        attention = attention_and_slots(
            eng.apply(hw), hw, topo, model, choice, R, info, batch_size=req.batch_size,
            context_tokens=req.context_tokens, engine=req.engine,
            uneven=mixed and ranks == "uneven" and not any(req.critical))
        if info["slots"] is not None:
            ours = trim_slots(ours, np.array(info["slots"]), planned_load, info.pop("_call_s"))
    metrics["ours"] = score(ours) | {"solve_s": time.perf_counter() - t}
    t_solve = time.perf_counter()
    bound = traffic_bound(ours, planned_load, trans, topo, model.hidden_size, trace.num_tokens, cap,
                          speed if mixed else None)
    objective = metrics["ours"]["traffic_s_per_token"]
    gap = _gap(objective, bound.traffic_s_per_token)
    info |= {"speed": [round(float(v), 4) for v in speed] if mixed else None,
             "speed_tokens_per_call": round(tokens_per_call(req.batch_size, G, model.top_k, R), 3),
             "bound": {"method": bound.method, "status": bound.status, "traffic_s_per_token": bound.traffic_s_per_token,
                       "traffic_gap": gap, "cross_node_fraction": bound.cross_node_fraction,
                       "cross_node_gap": _gap(metrics["ours"]["cross_node_fraction"], bound.cross_node_fraction),
                       "cross_gpu_fraction": bound.cross_gpu_fraction,
                       "cross_gpu_gap": _gap(metrics["ours"]["cross_gpu_fraction"], bound.cross_gpu_fraction),
                       "solve_s": time.perf_counter() - t_solve}}
    t_bound = time.perf_counter()
    if not offload:  # None: equal shares
        info["attention"] = None if attention is None or attention.equal else {
            "sequences": attention.counts.tolist(), "stage_s": attention.stage_s, "equal_s": attention.equal_s}

    inputs = Inputs(hardware=hw.name, hardware_digest=digest(profile.model_dump(mode="json")), model=model.name,
                    model_digest=model_digest(model), workload=trace.source or "trace",
                    workload_digest=given_digest, engine=eng.name,
                    engine_digest=digest(eng.profile.model_dump(mode="json")))
    notes = ((f"expert parallelism: {G} GPUs ({N} nodes x {G // N}), {R // G} expert slots per GPU, "
             f"{E} experts + {redundant} redundant per MoE layer"),
             "EP rank r = the r-th GPU in natural order of its id; physical slot s lives on rank s // slots",
             "a replicated expert's tokens split evenly over its copies",
             ("load balance is of time: each GPU's load over its expert speed at the decode batch (relative "
              "speeds " + ", ".join(f"{g} {v:.3f}" for g, v in zip(topo.gpus, speed)) + ")" if mixed
              else "load balance is of tokens (every GPU equally fast)"),
             (f"traffic bound {bound.traffic_s_per_token:.4g} s/token ({bound.method}, {bound.status}); gap "
              f"{gap:.1%}; cross-node pairs >= {bound.cross_node_fraction:.1%}"),
             ("dense weights replicated on every GPU (data-parallel attention); KV cache for batch_size "
             "sequences per GPU"),
             _quality_note(choice, req.critical))
    shares_note = ()  # ours only: the baselines keep equal shares and slots, as the engines do
    if info["slots"] is not None:
        shares_note += (f"expert slots per GPU by call time {info['slots']} (of {R // G}): a slow GPU's calls cost "
                        "more, so it gives up replica slots (their experts keep their other copies); SGLang and "
                        "vLLM need equal slots per rank: --ranks even plans for them",)
    if attention is not None and not attention.equal:
        shares_note += (f"data-parallel attention shares by speed: sequences per GPU {attention.counts.tolist()} (a GPU "
                  f"with 0 serves experts only); the attention stage {attention.stage_s * 1e3:.2f} ms per step vs "
                  f"{attention.equal_s * 1e3:.2f} ms with equal shares (SGLang / vLLM give every rank an equal share: "
                  "they have no flag for this, a router in front of the DP ranks must send them)",)
    common = {"hw": hw, "topo": topo, "model": model, "inputs": inputs, "expert_format": choice.expert_format,
              "memory_need": choice.memory_need, "choice": choice, "critical": req.critical,
              "batch_size": req.batch_size, "context_tokens": req.context_tokens}
    predicted = _predicted(metrics["ours"]) | {"traffic_bound_s_per_token": bound.traffic_s_per_token,
                                               "cross_node_fraction_bound": bound.cross_node_fraction}
    for name in baseline_fns:
        for k, v in _predicted(metrics[name]).items():
            predicted[f"{name}.{k}"] = v
    stopped = ()  # the safety net's note: this plan depends on the machine's load
    if info["stopped_by_time_limit"]:
        stopped = (f"the wall-clock safety net (--time-limit {req.time_limit_s:g} s) stopped the placement after "
                  f"{info['layer_solves']} of {req.sweeps * model.num_moe_layers} layer solves: this plan may differ "
                  f"on a less busy machine; raise --time-limit",)
    if offload:
        from .offload import plan_ep_offload

        plan = plan_ep_offload(hw=eng.apply(hw), bare=hw, engine=eng, model=model, topo=topo, trace=given,
                               phy2log=ours, inputs=inputs, formats=req.formats,
                               errors=quant_errors(req.quant_error, req.formats), budget=budget_of(req),
                               critical=req.critical, batch_size=req.batch_size, context_tokens=req.context_tokens,
                               time_limit_s=req.time_limit_s, predicted=predicted,
                               notes=notes[:-2] + stopped + ("dense weights replicated on every GPU (data-parallel "
                                                             "attention), KV cache of batch / GPUs sequences per GPU",
                                                             f"experts offloaded: {choice.reason}"))
        t_end = time.perf_counter()
        return ClusterResult(plan=plan, placement=ours, baselines={}, metrics=metrics, topology=topo, num_physical=R,
                             expert_format=plan.counts()["format"] and max(plan.counts()["format"].items(),
                                                                           key=lambda kv: kv[1])[0],
                             workload=trace.source, info=info | {"offload": True},
                             timings_s={"stats_s": t_stats - t0, "solve_s": t_solve - t_stats,
                                        "bound_s": t_bound - t_solve, "total_s": t_end - t0})
    plan = plan_from_placement(
        ours, predicted=predicted, notes=notes + stopped + shares_note, attention=attention,
        solver=SolverInfo(method="ep-placement",
                          solver=f"numpy decomposition (nodes, then GPUs; swaps); bound: {bound.method}",
                          status="time limit" if info["stopped_by_time_limit"] else
                          ("optimal" if gap <= 1e-9 else "feasible"),
                          objective=objective, bound=bound.traffic_s_per_token, gap=gap,
                          time_limit_s=req.time_limit_s, variables=int(model.num_moe_layers * R)),
        **common)
    baselines = {name: plan_from_placement(placements[name], predicted=_predicted(metrics[name]), notes=notes,
                                           solver=SolverInfo(method=name, status="heuristic"), **common)
                 for name in baseline_fns}
    t_end = time.perf_counter()
    return ClusterResult(plan=plan, placement=ours, baselines=baselines, metrics=metrics, topology=topo,
                         num_physical=R, expert_format=choice.expert_format, workload=trace.source, info=info,
                         timings_s={"stats_s": t_stats - t0, "solve_s": t_solve - t_stats, "bound_s": t_bound - t_solve,
                                    "total_s": t_end - t0})
