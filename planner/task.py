"""Task-specific plans (PreMoe): drop the experts a task rarely uses, within the quality budget.

Given the task's routing trace (``--trace FILE``, ``--task NAME`` for a multi-task file) and
``--drop-below F``, every expert whose frequency on the trace (activations per token) is
below F is a candidate. Dropping expert e of layer l costs its whole contribution to the
quality measure the ILP already bounds: importance ``w_le = f_le x mean gate`` times an
error of 1 (formats cost ``w_le x err(b)``, err(b) << 1). It frees the expert's bytes and
its calls: the router takes its top-k among the kept experts at run time, and the planner
and the simulator read a dropped expert's accesses as zero-computation ones
(:func:`profiles.workload.drop.drop_experts`).

Which experts: the cheapest first (candidates by ascending importance: those the trace never
routes to cost nothing), as many as the budget allows,

    sum_{dropped} w_le <= Q sum_le w_le          (dropping stops when the budget is used)

and what is left of the budget goes to the formats. How many: dropping more frees more, but
leaves less budget for narrow formats, so the count is searched: the ILP plans each of a few
prefixes of the candidate list (none, the free ones, and the largest the budget allows halved
down to the free ones) and the plan with the best objective wins, ties to fewer drops. Each
prefix is an exact ILP; the count between two prefixes tried is not. A plan that drops more
wins only by more than the solver's gap (``--gap``): below it the difference is the solver's
tolerance, not the drops' worth.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from profiles.errors import InfeasibleError, InputError
from profiles.workload.drop import drop_experts
from profiles.workload.trace import Trace

from .workload_view import PlanningStats, planning_stats

if TYPE_CHECKING:
    from .optimize import OptimizeRequest, OptimizeResult

__all__ = ["DEFAULT_DROP_BELOW", "drop_candidates", "drop_levels", "optimize_dropping"]

DEFAULT_DROP_BELOW = 0.005  # activations per token: an expert fewer than 1 token in 200 routes to
MAX_LEVELS = 5  # prefixes of the candidate list the ILP plans


def drop_candidates(stats: PlanningStats, below: float, critical: tuple[tuple[int, ...], ...] = ()
                    ) -> list[tuple[float, int, int]]:
    """``(importance, layer, expert)`` of every expert with frequency below ``below`` (critical
    experts excepted), cheapest first; at least one expert of each layer is kept."""
    out = []
    for layer in range(stats.num_layers):
        rare = [int(e) for e in np.flatnonzero(stats.frequency[layer] < below)
                if not (critical and layer < len(critical) and int(e) in critical[layer])]
        rare = sorted(rare, key=lambda e: (float(stats.importance[layer, e]), e))[:stats.num_experts - 1]
        out += [(float(stats.importance[layer, e]), layer, e) for e in rare]
    return sorted(out)


def drop_levels(candidates: list[tuple[float, int, int]], allowance: float) -> list[int]:
    """Prefix lengths of ``candidates`` to plan: 0, the free ones (importance 0), and the longest
    prefix whose importance fits ``allowance`` halved down towards the free ones."""
    cum = np.cumsum([w for w, _, _ in candidates])
    most = int(np.searchsorted(cum, allowance * (1 + 1e-9), side="right"))
    free = sum(1 for w, _, _ in candidates if w <= 0.0)
    levels = {0, min(free, most)}
    n = most
    while n > free and len(levels) < MAX_LEVELS:
        levels.add(n)
        n = free + (n - free) // 2
    return sorted(levels)


def _per_layer(candidates: list[tuple[float, int, int]], n: int, L: int) -> tuple[tuple[tuple[int, ...], ...],
                                                                                   tuple[float, ...]]:
    """The first ``n`` candidates as per-layer expert ids and per-layer importance."""
    ids: list[list[int]] = [[] for _ in range(L)]
    weight = [0.0] * L
    for w, layer, e in candidates[:n]:
        ids[layer].append(e)
        weight[layer] += w
    return tuple(tuple(sorted(d)) for d in ids), tuple(weight)


def optimize_dropping(req: OptimizeRequest, hw, model, trace: Trace, stats: PlanningStats, budget: float, inputs,
                      t0: np.ndarray, t_stats: np.ndarray, engine) -> OptimizeResult:
    """The best plan over the drop levels (module docstring); baselines keep every expert."""
    from .optimize import _compare, _now, _optimize_at

    if req.objective not in ("latency", "energy") and not (req.objective == "throughput" and not req.tpot_slo_s
                                                          and not req.ttft_slo_s):
        raise InputError("--drop-below plans at one batch size", key="--objective", value=req.objective,
                         expected="latency, throughput at --batch (no SLO), or energy",
                         fix="drop the SLOs, or --drop-below")
    if req.policy is not None or req.multi_gpu and len([d for d in hw.devices.values() if d.kind == "gpu"]) > 1:
        raise InputError("--drop-below plans one GPU with offloading (the ILP)", key="--drop-below",
                         value=req.drop_below, fix="add --parallel offload, or drop --policy")
    candidates = drop_candidates(stats, req.drop_below, req.critical)
    allowance = budget * float(stats.importance.sum())
    batch = 1 if req.objective == "latency" else req.batch_size
    best, first_error = None, None
    for n in drop_levels(candidates, allowance):
        dropped, weight = _per_layer(candidates, n, stats.num_layers)
        level_stats = planning_stats(drop_experts(trace, dropped, model.num_experts), real_experts=model.num_experts) \
            if n else stats
        sub = dataclasses.replace(req, dropped=dropped if n else (), dropped_importance=weight if n else (),
                                  drop_below=None)
        try:
            res = _optimize_at(sub, hw, model, level_stats, budget, inputs, batch, t0, t_stats, engine, compare=False)
        except InfeasibleError as exc:
            first_error = first_error or exc
            continue
        score = res.plan.solver.objective
        if best is None or score < best[0] * (1 - req.gap):  # within the solver's gap: a tie
            best = (score, res)
    if best is None:
        raise first_error
    res = best[1]
    baselines = _compare(req, hw, model, stats, budget, inputs, batch) if req.compare else {}
    total = _now() - t0
    return dataclasses.replace(res, baselines=baselines, timings_s=res.timings_s | {
        "total_s": float(total[0]), "total_cpu_s": float(total[1])})


def dropped_note(dropped: tuple[tuple[int, ...], ...], limit: int = 12) -> str:
    """``dropped N experts: 0:3 0:5 1:7 ...`` (MOE_LAYER:EXPERT)."""
    pairs = [f"{layer}:{e}" for layer, d in enumerate(dropped) for e in d]
    more = f" (+{len(pairs) - limit} more)" if len(pairs) > limit else ""
    return f"dropped {len(pairs)} experts: {' '.join(pairs[:limit])}{more}"
