"""The number formats of an expert-parallel plan, under the quality budget and ``--critical``.

Shape legend: L = MoE layers, E = routed experts, S = expert slots per GPU per layer,
c_l = critical experts of layer l.

The quality accounting is the single-node planner's (:mod:`planner.costs`, ``quality_error``
in :func:`planner.plan_assembly.assemble_plan`): an expert stored in format b costs
``quant_error[b]`` weighted by its importance ``w[l, e]`` (frequency x mean gate weight),
over the total importance. Every expert of an EP plan is in one format b except the critical
ones, which stay in the full-precision format (the candidate of least error) and carry the
share ``crit`` of the importance:

    quality(b) = sum_le w[l, e] err(b_le) / sum_le w[l, e] = (1 - crit) err(b) + crit err(full)

and the dense weights (format d) obey ``err(d) <= budget`` on their own, as the ILP's dense
constraint does. Memory per GPU: a GPU holds at most one copy of an expert, so at most
``min(S, c_l)`` of its S slots of layer l hold critical experts, whatever the placement:

    sum_l [min(S, c_l) bytes(full) + (S - min(S, c_l)) bytes(b)] + dense(d) + KV <= HBM

which lets the formats be chosen before the experts are placed. The experts' format is the
first of the candidates that meets the budget and fits; the dense format the first that
then fits beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from profiles.errors import InfeasibleError, InputError, UserError
from profiles.formats import default_quant_error
from profiles.hardware import Hardware
from profiles.models import ModelSpec
from profiles.workload.trace import Trace

from ..costs import QUANT_ERROR
from .topology import Topology

__all__ = ["FormatChoice", "choose_formats", "critical_share", "quant_errors"]

GiB = 2**30


def quant_errors(table: dict[str, float] | None, formats: tuple[str, ...]) -> dict[str, float]:
    """The error of every candidate format: ``table`` (default :data:`QUANT_ERROR`), then each
    format's stated or bits-interpolated error (as :func:`planner.optimize.make_setup`)."""
    errors = dict(QUANT_ERROR if table is None else table)
    return errors | {fm: default_quant_error(fm) for fm in formats if fm not in errors}


def critical_share(trace: Trace, num_experts: int, critical: tuple[tuple[int, ...], ...]) -> float:
    """Share of the importance ``w [L, E]`` (gate weight per token; frequency / K without gate
    weights, as :func:`planner.workload_view.planning_stats`) that the critical experts carry."""
    if not any(critical):
        return 0.0
    L, E = trace.num_layers, num_experts
    for l, experts in enumerate(critical):
        bad = [e for e in experts if not 0 <= e < E]
        if l >= L or bad:
            raise InputError("no such expert", key="--critical", value=f"{l}:{(bad or experts)[0]}",
                             expected=f"MOE_LAYER:EXPERT with MOE_LAYER < {L} and EXPERT < {E}",
                             fix="name experts of the model, e.g. --critical 0:3")
    ids = trace.expert_ids.astype(np.int64)  # [T, L, K]
    real = ids < E  # zero-computation experts hold no weights
    layer = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)
    weights = trace.gate_weights.astype(float) if trace.gate_weights is not None else np.ones(ids.shape)
    w = np.bincount((layer * E + ids)[real], weights=weights[real], minlength=L * E).reshape(L, E)  # [L, E]
    total = float(w.sum())
    crit = sum(float(w[l, list(experts)].sum()) for l, experts in enumerate(critical) if experts)
    return crit / total if total > 0 else 0.0


@dataclass(frozen=True)
class FormatChoice:
    """The formats of an EP plan, or why there are none (``expert_format`` is ``None``).

    Attributes:
        expert_format: format of every routed expert but the critical ones.
        dense_format: format of the dense weights (replicated on every GPU).
        full_format: format of the critical experts.
        quality_budget: the budget the choice meets.
        quality_error: importance-weighted error of the experts (the formula above).
        memory_need: per GPU, bytes: ``expert_bytes`` (the bound above), ``dense_bytes``, ``kv_bytes``.
        capacity_bytes: the smallest GPU memory.
        binding: when refused: ``"memory"``, ``"--critical"`` or ``"--quality-budget"``.
        reason: when refused: why, in a sentence (the auto mode's note).
        least_error: when the budget binds: the least budget an EP plan meets in the GPUs' memory.
    """

    expert_format: str | None
    dense_format: str
    full_format: str
    quality_budget: float
    quality_error: float
    memory_need: dict[str, float] = field(default_factory=dict)
    capacity_bytes: float = 0.0
    binding: str = ""
    reason: str = ""
    least_error: float | None = None

    def error(self, num_gpus: int, num_critical: int) -> UserError:
        """The error an explicit ``--parallel ep`` raises for a refused choice."""
        if self.binding == "memory":
            short = sum(self.memory_need.values()) - self.capacity_bytes
            return InfeasibleError(
                f"HBM of every GPU is short by {short / GiB:.1f} GiB: {self.reason}. Fix: a profile with more GPUs, "
                f"fewer --redundant-experts, a smaller --formats entry, or a shorter --context / --batch")
        if self.binding == "--critical":
            return InputError(f"the critical experts in {self.full_format} do not fit the {num_gpus} GPUs' memory "
                              f"in expert-parallel mode", key="--critical", value=f"{num_critical} experts",
                              expected=f"critical experts whose {self.full_format} copies fit every GPU "
                                       f"({self.reason})",
                              fix="name fewer --critical experts, or use --parallel offload (or auto), which "
                                  "offloads experts to host memory")
        return InputError(f"expert parallelism cannot meet the quality budget: {self.reason}", key="--quality-budget",
                          value=self.quality_budget, expected=f">= {self.least_error:.4g}",
                          fix=f"raise --quality-budget to {self.least_error:.4g}, or use --parallel offload (or auto), "
                              f"which offloads experts to host memory and meets the budget")


def choose_formats(model: ModelSpec, hw: Hardware, topo: Topology, slots: int, formats: tuple[str, ...], *,
                   batch_size: int, context_tokens: int, budget: float, errors: dict[str, float],
                   critical: tuple[tuple[int, ...], ...] = (), share: float = 0.0) -> FormatChoice:
    """The formats of an EP plan (see the module docstring); ``share``: :func:`critical_share`."""
    L = model.num_moe_layers
    capacity = min(hw.memories[g].capacity_bytes for g in topo.gpus)
    full = min(formats, key=lambda fm: errors[fm])  # the first of least error
    k = np.zeros(L)  # [L] critical slots per GPU, at most
    k[:len(critical)] = np.minimum(slots, [len(c) for c in critical[:L]])
    kv = float(model.kv_cache_bytes(context_tokens, batch_size=batch_size))

    def need(fm: str, dense: str, k: np.ndarray = k) -> dict[str, float]:
        experts = np.sum(k * model.expert_bytes(full) + (slots - k) * model.expert_bytes(fm))
        return {"expert_bytes": float(experts), "dense_bytes": float(model.dense_bytes(dense)), "kv_bytes": kv}

    def fits(n: dict[str, float]) -> bool:
        return sum(n.values()) <= capacity

    def quality(fm: str) -> float:
        return (1 - share) * errors[fm] + share * errors[full]

    def meets(error: float) -> bool:
        return error <= budget * (1 + 1e-9)

    for fm in formats:
        if meets(quality(fm)):
            for d in formats:
                if meets(errors[d]) and fits(n := need(fm, d)):
                    return FormatChoice(fm, d, full, budget, quality(fm), n, capacity)
    # refused: memory binds, else --critical, else the budget
    smallest = min(formats, key=lambda fm: (model.expert_bytes(fm), formats.index(fm)))
    small_dense = min(formats, key=lambda fm: (model.dense_bytes(fm), formats.index(fm)))
    base = FormatChoice(None, small_dense, full, budget, 0.0, capacity_bytes=capacity)
    plain = need(smallest, small_dense, np.zeros(L))
    avail = f"{capacity / GiB:.1f} GiB"
    if not fits(plain):
        return replace(base, binding="memory", memory_need=plain,
                       reason=f"{slots} expert slots x {L} layers + dense weights + KV cache need "
                              f"{sum(plain.values()) / GiB:.1f} GiB per GPU in {smallest}, {avail} available")
    held = need(smallest, small_dense)
    if not fits(held):
        return replace(base, binding="--critical", memory_need=held,
                       reason=f"up to {int(k.sum())} critical expert slots per GPU in {full} and the rest in "
                              f"{smallest} need {sum(held.values()) / GiB:.1f} GiB per GPU, {avail} available")
    # the least budget any (experts, dense) pair that fits meets
    least, fm, d = min((max(quality(fm), errors[d]), formats.index(fm), formats.index(d))
                       for fm in formats for d in formats if fits(need(fm, d)))
    fm, d = formats[fm], formats[d]
    return replace(base, binding="--quality-budget", memory_need=need(fm, d), least_error=_round_up(least),
                   reason=f"the most accurate formats that fit the {topo.num_gpus} GPUs ({avail} each), experts in "
                          f"{fm} and dense weights in {d}, have error {least:.4g}, over the budget {budget:.4g}")


def _round_up(x: float, digits: int = 4) -> float:
    """``x`` rounded up to ``digits`` significant digits (a budget printed with ``:.4g`` still holds it)."""
    if x <= 0:
        return 0.0
    unit = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return max(math.ceil(x / unit - 1e-6) * unit, x)
