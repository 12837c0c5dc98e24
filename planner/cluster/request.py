"""What an expert-parallel plan is asked for (:class:`ClusterRequest`), its inputs checked and
completed (redundant experts, workload, quality budget, formats), and whether ``planner
optimize`` plans expert parallelism for it at all (:func:`parallel_mode`).

Shape legend: E = routed experts, R = physical experts per layer (E plus the redundant
copies), G = GPUs (EP ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from profiles.engines import load_engine
from profiles.errors import InputError
from profiles.hardware import Hardware, load_profile
from profiles.models import ModelSpec, load_model
from profiles.workload.trace import Trace

from ..costs import QUANT_ERROR
from .quality import FormatChoice, choose_formats, critical_share, quant_errors
from .topology import Topology, topology

__all__ = ["EP_ENGINE", "RANKS", "ClusterRequest", "budget_of", "check_redundant", "cluster_applies",
           "default_redundant", "formats_of", "parallel_mode", "workload_of"]

# Default redundancy: at least E / 8 extra physical experts (DeepSeek-V3 serves 256 experts
# with 32 redundant ones on 32 prefill GPUs), rounded up so that E + R divides over the GPUs.
REDUNDANT_FRACTION = 1 / 8
# the engine an expert-parallel plan runs on unless the user names another: its export writes
# SGLang (and vLLM) configs, and the bundle runtime runs single-node offload plans only
EP_ENGINE = "sglang"
RANKS = ("engine", "even", "shares", "uneven")  # ClusterRequest.ranks


def default_redundant(num_experts: int, num_gpus: int) -> int:
    """Smallest R - E >= E / 8 with E + (R - E) a multiple of the GPU count."""
    r = math.ceil(num_experts * REDUNDANT_FRACTION)
    return r + (-(num_experts + r)) % num_gpus


def check_redundant(redundant: int, num_experts: int, num_gpus: int) -> None:
    """Refuse (one line, the nearest counts that work) a redundant count E + R does not divide over the GPUs."""
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
        formats: storage formats to try for experts and dense weights: the first that meets
            the quality budget and fits wins (:mod:`.quality`).
        quality_budget: largest importance-weighted quantisation error of the experts (the
            dense weights' error stays within it too); ``None``: the error of uniform int4.
        critical: per MoE layer, experts kept at full precision (the least-error format).
        quant_error: error per format (:data:`planner.costs.QUANT_ERROR`).
        batch_size: sequences per GPU (data-parallel attention) the KV cache must hold.
        context_tokens: context per sequence.
        balance_slack: straggler load allowed above EPLB global's, in units of the mean load
            (``None``: 0.01 on the sample, :data:`.placement.EXPECTED_SLACK` on the draws).
        sweeps: passes over the layers.
        time_limit_s: wall-clock safety net of the placement (the work is bounded by ``sweeps``;
            reaching it is recorded in the plan as status "time limit").
        seed: seed of the group-limited redraws and the bootstrap draws.
        engine: engine profile the plan is priced for and recorded with, so the simulator
            prices it the same way: the GPUs' expert speeds (:mod:`.speed`) are this engine's.
            Default SGLang (:data:`EP_ENGINE`): an expert-parallel plan is exported as SGLang
            and vLLM configs, and the bundle runtime does not run it.
        plan_for: ``"expected"``: balance the load unseen tokens are expected to bring
            (:func:`.workload.expected_load`: smoothed counts, bootstrap draws over sequences, replicas
            for uncertain experts); ``"sample"``: balance the trace's own counts (fits its noise).
        offload: when no format that meets the budget (critical experts at full precision)
            fits the GPUs, plan expert parallelism with offload (:mod:`.offload`: each GPU's
            experts resident, cached, CPU-run or streamed as one node plans them) instead of
            refusing; ``planner optimize --parallel ep`` sets it.
        ranks: how unequal the EP ranks' work may be: ``"even"`` every GPU the same
            share of the sequences for data-parallel attention and S expert slots (what SGLang
            and vLLM run); ``"shares"`` attention shares by speed (:mod:`.attention`; a router
            in front of the DP ranks must send them), S slots; ``"uneven"`` also fewer slots on
            slow GPUs (:mod:`.slots`); ``"engine"`` (default) what the plan's engine runs:
            ``"uneven"`` where its profile states ``uneven_ranks``, else ``"even"``.
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
    engine: str = EP_ENGINE
    quality_budget: float | None = None
    critical: tuple[tuple[int, ...], ...] = ()
    quant_error: dict[str, float] = field(default_factory=lambda: dict(QUANT_ERROR))
    offload: bool = False
    ranks: str = "engine"


def budget_of(req: ClusterRequest) -> float:
    """The quality budget; ``None``: the error of uniform int4 (as ``planner optimize``)."""
    return req.quality_budget if req.quality_budget is not None else req.quant_error.get("int4", QUANT_ERROR["int4"])


def _check_trace(trace: Trace, model: ModelSpec) -> None:
    if trace.num_experts not in (model.num_experts, model.num_experts + model.zero_experts.count) \
            or trace.num_layers != model.num_moe_layers:
        raise InputError("the workload does not match the model", key="--trace",
                         value=f"{trace.num_layers} layers x {trace.num_experts} experts",
                         expected=f"{model.num_moe_layers} MoE layers x {model.num_experts} experts ({model.name})",
                         fix="record or synthesise a trace for this model (planner trace synth --model ...)")


def workload_of(trace: Trace | None, model: ModelSpec) -> Trace:
    """``trace``, or the model's default workload for ``None``, checked against the model's shape."""
    if trace is None:
        from profiles.workload.defaults import default_workload

        trace = default_workload(model)
    _check_trace(trace, model)
    return trace


def formats_of(req: ClusterRequest, model: ModelSpec, hw: Hardware, topo: Topology, slots: int,
               trace: Trace | None) -> FormatChoice:
    """The formats under ``req``'s budget and critical experts (``trace``: ``None`` loads the
    model's default workload, only when there are critical experts to weigh)."""
    share = critical_share(workload_of(trace, model), model.num_experts, req.critical) if any(req.critical) else 0.0
    return choose_formats(model, hw, topo, slots, req.formats, batch_size=req.batch_size,
                          context_tokens=req.context_tokens, budget=budget_of(req),
                          errors=quant_errors(req.quant_error, req.formats), critical=req.critical, share=share)


def parallel_mode(parallel: str, req: ClusterRequest) -> tuple[bool, str]:
    """Whether ``planner optimize`` makes an expert-parallel plan for ``req``, and when
    ``auto`` chose offloading on a profile EP could use, why (else ``""``).

    ``ep``: always (:func:`plan_cluster` refuses what it cannot plan, or with
    ``req.offload`` offloads per GPU); ``offload``: never;
    ``auto``: when the engine runs expert-parallel plans, the profile has two or more GPUs, the same number on every node, and the
    experts (with ``req.redundant_experts``, default :func:`default_redundant`) fit their
    memory in a format that meets the quality budget with the critical experts at full
    precision (:mod:`.quality`).
    """
    if parallel in ("ep", "offload"):
        return parallel == "ep", ""
    engine = load_engine(req.engine)
    if not engine.runs_expert_parallel:
        return False, f"expert parallelism not used: engine {engine.name} does not run expert-parallel plans"
    _, hw = load_profile(req.hardware)
    if len(hw.devices_of_kind("gpu")) < 2:
        return False, ""
    try:
        topo = topology(hw)
    except InputError:
        return False, ""
    spec = load_model(req.model)
    E, G = spec.num_experts, topo.num_gpus
    redundant = req.redundant_experts
    if redundant is None or (E + redundant) % G:  # plan_cluster names a count that does not divide
        redundant = default_redundant(E, G)
    slots = (E + redundant) // G
    choice = formats_of(req, spec, hw, topo, slots, req.trace)
    if choice.expert_format is not None:
        return True, ""
    return False, f"expert parallelism over {G} GPUs not used: {choice.reason}"


def cluster_applies(parallel: str, hardware: str, model: str, formats: tuple[str, ...] = ClusterRequest.formats,
                    batch_size: int = 8, context_tokens: int = 4096) -> bool:
    """:func:`parallel_mode` at the default quality budget, without critical experts."""
    return parallel_mode(parallel, ClusterRequest(hardware=hardware, model=model, formats=formats,
                                                  batch_size=batch_size, context_tokens=context_tokens))[0]
