"""An expert-parallel plan from a request: load the inputs, pick the storage format that
fits every GPU's memory, place the experts (ours and the baselines), and write each
placement as a :class:`~planner.plan.Plan`.

Shape legend: L = MoE layers, E = routed experts, R = physical experts per layer (E plus
the redundant copies), G = GPUs (EP ranks), N = nodes.

Memory per GPU: R / G expert slots x L layers + dense weights (replicated: data-parallel
attention) + KV cache for ``batch_size`` sequences, within its HBM.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from profiles.errors import InfeasibleError, InputError
from profiles.hardware import Hardware, load_profile
from profiles.models import ModelSpec, load_model
from profiles.workload.trace import Trace

from ..eplb import PLACEMENTS
from ..plan import Inputs, LayerPlan, MemoryUse, Plan, SolverInfo, digest, model_digest, workload_digest
from .metrics import placement_metrics
from .placement import place_for
from .topology import Topology, topology
from .workload import group_limited, workload_arrays

__all__ = ["METHODS", "ClusterRequest", "ClusterResult", "cluster_applies", "default_redundant", "plan_cluster",
           "plan_from_placement"]

METHODS = ("ours", *PLACEMENTS)
# Default redundancy: at least E / 8 extra physical experts (DeepSeek-V3 serves 256 experts
# with 32 redundant ones on 32 prefill GPUs), rounded up so that E + R divides over the GPUs.
REDUNDANT_FRACTION = 1 / 8


def default_redundant(num_experts: int, num_gpus: int) -> int:
    """Smallest R - E >= E / 8 with E + (R - E) a multiple of the GPU count."""
    r = math.ceil(num_experts * REDUNDANT_FRACTION)
    return r + (-(num_experts + r)) % num_gpus


def _check_redundant(redundant: int, num_experts: int, num_gpus: int) -> None:
    if redundant < 0 or (num_experts + redundant) % num_gpus:
        lo = redundant - (num_experts + redundant) % num_gpus
        options = sorted({x for x in (lo, lo + num_gpus) if x >= 0})
        raise InputError("experts plus redundant experts must divide evenly over the GPUs", key="--redundant-experts",
                         value=redundant, expected=f"E + R a multiple of {num_gpus} GPUs (E = {num_experts})",
                         fix="use " + " or ".join(str(x) for x in options))

@dataclass(frozen=True)
class ClusterRequest:
    """Everything an expert-parallel plan takes.

    Attributes:
        hardware: profile name or YAML path (two or more GPUs, equal per node).
        model: preset name or HF config path.
        trace: routing trace; ``None``: the model's default workload.
        redundant_experts: R - E; ``None``: :func:`default_redundant`.
        group_limited: impose the model's group-limited routing on the workload (``None``:
            when the model has ``n_group > 1``; a trace that obeys it is unchanged).
        formats: storage formats to try for experts and dense weights, first that fits wins.
        batch_size: sequences per GPU (data-parallel attention) the KV cache must hold.
        context_tokens: context per sequence.
        balance_slack: straggler load allowed above EPLB global's, in units of the mean load
            (``None``: 0.01 on the sample, :data:`.placement.EXPECTED_SLACK` on the draws).
        sweeps: passes over the layers.
        time_limit_s: wall-clock safety net of the placement (the work is bounded by ``sweeps``;
            reaching it is recorded in the plan as status "time limit").
        seed: seed of the group-limited redraws and the bootstrap draws.
        plan_for: ``"expected"``: balance the load unseen tokens are expected to bring
            (:func:`.workload.expected_load`: smoothed counts, bootstrap draws over sequences, replicas
            for uncertain experts); ``"sample"``: balance the trace's own counts (fits its noise).
    """

    hardware: str = "cluster-h100-2node"
    model: str = "deepseek-v3"
    trace: Trace | None = None
    redundant_experts: int | None = None
    group_limited: bool | None = None
    formats: tuple[str, ...] = ("bf16", "fp8", "int8", "int4")
    batch_size: int = 8
    context_tokens: int = 4096
    balance_slack: float | None = None
    sweeps: int = 2
    time_limit_s: float = 300.0
    seed: int = 0
    plan_for: str = "expected"


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


def _memory_need(model: ModelSpec, slots: int, fmt: str, batch_size: int, context_tokens: int) -> dict[str, float]:
    return {"expert_bytes": slots * model.num_moe_layers * model.expert_bytes(fmt),
            "dense_bytes": model.dense_bytes(fmt),  # replicated: data-parallel attention on every GPU
            "kv_bytes": model.kv_cache_bytes(context_tokens, batch_size=batch_size)}


def _pick_format(model: ModelSpec, hw: Hardware, topo: Topology, slots: int, formats: tuple[str, ...],
                 batch_size: int, context_tokens: int) -> tuple[str | None, dict[str, float], float]:
    capacity = min(hw.memories[g].capacity_bytes for g in topo.gpus)
    need: dict[str, float] = {}
    for fmt in formats:
        need = _memory_need(model, slots, fmt, batch_size, context_tokens)
        if sum(need.values()) <= capacity:
            return fmt, need, capacity
    return None, need, capacity


def cluster_applies(parallel: str, hardware: str, model: str, formats: tuple[str, ...] = ClusterRequest.formats,
                    batch_size: int = 8, context_tokens: int = 4096) -> bool:
    """Whether ``planner optimize`` makes an expert-parallel plan.

    ``ep``: always; ``offload``: never; ``auto``: when the profile has two or more GPUs, the
    same number on every node, and the model's experts (with the default redundancy) fit
    their memory in one of ``formats``.
    """
    if parallel == "ep":
        return True
    if parallel == "offload":
        return False
    _, hw = load_profile(hardware)
    if len(hw.devices_of_kind("gpu")) < 2:
        return False
    try:
        topo = topology(hw)
    except InputError:
        return False
    spec = load_model(model)
    slots = (spec.num_experts + default_redundant(spec.num_experts, topo.num_gpus)) // topo.num_gpus
    return _pick_format(spec, hw, topo, slots, formats, batch_size, context_tokens)[0] is not None


def plan_from_placement(phy2log: np.ndarray, *, hw: Hardware, topo: Topology, model: ModelSpec, inputs: Inputs,
                        expert_format: str, memory_need: dict[str, float], batch_size: int, context_tokens: int,
                        predicted: dict[str, float], solver: SolverInfo, notes: tuple[str, ...] = ()) -> Plan:
    """A :class:`Plan` from ``phy2log [L, R]``: every expert's ``home`` is the GPU of its
    lowest physical slot, ``replicas`` the GPUs of its other copies, site ``resident``."""
    L, R = phy2log.shape
    E = model.num_experts
    S = R // topo.num_gpus
    layers = []
    for l in range(L):
        gpus_of: list[list[str]] = [[] for _ in range(E)]
        for s, e in enumerate(phy2log[l].tolist()):
            gpus_of[e].append(topo.gpus[s // S])
        layers.append(LayerPlan(moe_layer=l, hidden_layer=model.moe_layer_indices[l],
                                home=tuple(g[0] for g in gpus_of), format=(expert_format,) * E,
                                site=("resident",) * E, replicas=tuple(tuple(g[1:]) for g in gpus_of)))
    memory = {g: MemoryUse(capacity_bytes=hw.memories[g].capacity_bytes, **memory_need) for g in topo.gpus}
    host = next(d for d in hw.devices_of_kind("cpu") if d.node == hw.devices[topo.gpus[0]].node)
    return Plan(inputs=inputs, objective="throughput", batch_size=batch_size, context_tokens=context_tokens,
                compute_device=topo.gpus[0], host_device=hw.memory_of(host.id).id, eviction="static",
                layers=tuple(layers), memory=memory, predicted=predicted, solver=solver, notes=notes)


def _predicted(m: dict[str, Any]) -> dict[str, float]:
    out = {"max_mean_load": m["max_mean_avg"], "max_mean_load_worst_layer": m["max_mean_worst"],
           "cross_gpu_fraction": m["cross_gpu_fraction"], "cross_node_fraction": m["cross_node_fraction"],
           "traffic_s_per_token": m["traffic_s_per_token"]}
    if m.get("nodes_per_token") is not None:
        out["nodes_per_token"] = m["nodes_per_token"]
    return {k: float(v) for k, v in out.items()}


def plan_cluster(req: ClusterRequest) -> ClusterResult:
    """Plan expert parallelism for ``req`` (see :class:`ClusterRequest`) and score the baselines.

    Raises:
        InputError: bad inputs (profile, model, trace, redundant count).
        InfeasibleError: the experts do not fit the GPUs' memory in any of ``req.formats``.
    """
    t0 = time.perf_counter()
    profile, hw = load_profile(req.hardware)
    model = load_model(req.model)
    topo = topology(hw)
    G, N = topo.num_gpus, topo.num_nodes
    E = model.num_experts
    redundant = default_redundant(E, G) if req.redundant_experts is None else req.redundant_experts
    _check_redundant(redundant, E, G)
    R = E + redundant
    fmt, need, capacity = _pick_format(model, hw, topo, R // G, req.formats, req.batch_size, req.context_tokens)
    if fmt is None:
        short = sum(need.values()) - capacity
        raise InfeasibleError(
            f"HBM of every GPU ({topo.gpus[0]} ...) is short by {short / 2**30:.1f} GiB: {R // G} expert slots x "
            f"{model.num_moe_layers} layers + dense weights + KV cache need {sum(need.values()) / 2**30:.1f} GiB in "
            f"{req.formats[-1]}, {capacity / 2**30:.1f} GiB available. Fix: a profile with more GPUs, fewer "
            f"--redundant-experts, a smaller --formats entry, or a shorter --context / --batch")
    if req.trace is not None:
        trace = req.trace
    else:
        from profiles.workload.defaults import default_workload

        trace = default_workload(model)
    zero = model.zero_experts.count
    if trace.num_experts not in (E, E + zero) or trace.num_layers != model.num_moe_layers:
        raise InputError("the workload does not match the model", key="--trace",
                         value=f"{trace.num_layers} layers x {trace.num_experts} experts",
                         expected=f"{model.num_moe_layers} MoE layers x {E} experts ({model.name})",
                         fix="record or synthesise a trace for this model (planner trace synth --model ...)")
    # the plan names the workload it was given (simulate and export replay that one), not the
    # group-limited copy the placer balances
    given_digest = workload_digest(trace)
    limited = req.group_limited if req.group_limited is not None else model.n_group > 1
    if limited and model.n_group > 1:
        trace = group_limited(trace, model.n_group, model.topk_group, num_experts=E, seed=req.seed)
    load, trans = workload_arrays(trace, E)
    t_stats = time.perf_counter()

    def score(p: np.ndarray) -> dict[str, Any]:
        return placement_metrics(p, load, trans, topo, model.hidden_size, trace.num_tokens, trace.expert_ids)

    placements: dict[str, np.ndarray] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for name, fn in PLACEMENTS.items():
        t = time.perf_counter()
        placements[name] = fn(load, R, model.n_group, N, G)
        metrics[name] = score(placements[name]) | {"solve_s": time.perf_counter() - t}
    t = time.perf_counter()
    ours, info = place_for(req.plan_for, trace, load, trans, topo, R, balance_slack=req.balance_slack,
                           sweeps=req.sweeps, time_limit_s=req.time_limit_s, hidden_size=model.hidden_size,
                           seed=req.seed)
    metrics["ours"] = score(ours) | {"solve_s": time.perf_counter() - t}
    t_solve = time.perf_counter()

    inputs = Inputs(hardware=hw.name, hardware_digest=digest(profile.model_dump(mode="json")), model=model.name,
                    model_digest=model_digest(model), workload=trace.source or "trace",
                    workload_digest=given_digest)
    notes = ((f"expert parallelism: {G} GPUs ({N} nodes x {G // N}), {R // G} expert slots per GPU, "
             f"{E} experts + {redundant} redundant per MoE layer"),
             "EP rank r = the r-th GPU in natural order of its id; physical slot s lives on rank s // slots",
             "a replicated expert's tokens split evenly over its copies",
             ("dense weights replicated on every GPU (data-parallel attention); KV cache for batch_size "
             "sequences per GPU"))
    common = {"hw": hw, "topo": topo, "model": model, "inputs": inputs, "expert_format": fmt, "memory_need": need,
                  "batch_size": req.batch_size, "context_tokens": req.context_tokens}
    predicted = _predicted(metrics["ours"])
    for name in PLACEMENTS:
        for k, v in _predicted(metrics[name]).items():
            predicted[f"{name}.{k}"] = v
    stopped = ()  # the safety net's note: this plan depends on the machine's load
    if info["stopped_by_time_limit"]:
        stopped = (f"the wall-clock safety net (--time-limit {req.time_limit_s:g} s) stopped the placement after "
                  f"{info['layer_solves']} of {req.sweeps * model.num_moe_layers} layer solves: this plan may differ "
                  f"on a less busy machine; raise --time-limit",)
    plan = plan_from_placement(
        ours, predicted=predicted, notes=notes + stopped,
        solver=SolverInfo(method="ep-placement", solver="numpy decomposition (nodes, then GPUs; swaps)",
                          status="time limit" if info["stopped_by_time_limit"] else "feasible",
                          objective=metrics["ours"]["traffic_s_per_token"],
                          time_limit_s=req.time_limit_s, variables=int(model.num_moe_layers * R)),
        **common)
    baselines = {name: plan_from_placement(placements[name], predicted=_predicted(metrics[name]), notes=notes,
                                           solver=SolverInfo(method=name, status="heuristic"), **common)
                 for name in PLACEMENTS}
    t_end = time.perf_counter()
    return ClusterResult(plan=plan, placement=ours, baselines=baselines, metrics=metrics, topology=topo,
                         num_physical=R, expert_format=fmt, workload=trace.source, info=info,
                         timings_s={"stats_s": t_stats - t0, "solve_s": t_solve - t_stats, "total_s": t_end - t0})
