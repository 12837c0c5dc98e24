"""Which levers the ILP's plan pulls that the popularity heuristic (Fiddler's placement) does not.

Popularity (planner.baselines) runs on the same engine as the ILP's plans and fixes every
lever but one: one expert format for the whole model (the dense weights too), the model's
most frequent experts resident on the GPU while they fit, every other expert computed by the
CPU from host DRAM, no expert cache, no prefetch. A plan's levers are where it differs:

    expert_format  its expert formats are not popularity's one format (format_mix: several)
    dense_format   the dense weights' format is not popularity's
    resident       a layer keeps another number of experts resident than popularity does
    site_split     some offloaded experts run on the GPU (through the cache, hybrid, streamed)
    cache          expert-cache slots (uniform over the layers or not)
    homes          experts homed on NVMe
    prefetch       next-layer prefetch

:func:`levers_used` lists them; :func:`lever_loss` re-solves the ILP with one lever pinned to
popularity's choice (planner.given.Fixes, the ``--fix-*`` machinery) and reports what that
costs. :func:`format_headroom` bounds what a format mix could save in bytes under the
quality budget, per expert and within the ILP's options (one format for a layer's resident
ranks, one for its offloaded ranks).

Legend: L = MoE layers, E = experts per layer, O = options of a group.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from planner.costs import N_SPEC
from planner.given import Fixes
from planner.optimize import OptimizeRequest, OptimizeResult, _solve_ilp, make_setup
from profiles.errors import InfeasibleError, InputError

__all__ = ["LEVERS", "CpuSites", "plan_shape", "global_top", "reference", "levers_used", "pinned_plan", "lever_loss",
           "lp_min_bytes", "format_headroom"]

LEVERS = ("format_mix", "expert_format", "dense_format", "resident", "site_split", "cache", "homes", "prefetch")
# the lever pinned to popularity's choice to measure it (format_mix is measured with expert_format)
_MEASURED = ("expert_format", "dense_format", "resident", "site_split", "cache", "homes", "prefetch")
GPU_SITES = ("fetch", "hybrid", "stream")  # offloaded experts that run on the compute device


@dataclass(frozen=True)
class CpuSites(Fixes):
    """The fixes plus popularity's execution sites: no option runs offloaded experts on the GPU
    (its band is empty, q = p: every offloaded expert is computed by the CPU where it lives)."""

    def allows(self, s, layer: int, specs: np.ndarray) -> np.ndarray:
        specs = np.asarray(specs, dtype=np.int64).reshape(-1, N_SPEC)
        return super().allows(s, layer, specs) & (specs[:, 1] == specs[:, 0])


def plan_shape(plan, tiers: dict[str, str]) -> dict:
    """The plan's levers as figures. ``tiers``: memory id -> tier (hbm, dram, nvme, accel).

    ``split`` counts experts by where they run: resident, cache (fetched into a layer's cache
    slots; hybrid: hits on the GPU, misses on the CPU), fetch (no slots: every use crosses the
    link), stream (every step, used or not), cpu_local; ``homes`` by the tier that holds them.
    """
    formats: dict[str, int] = {}
    split = dict.fromkeys(("resident", "cache", "hybrid", "fetch", "stream", "cpu_local"), 0)
    homes: dict[str, int] = {}
    for layer in plan.layers:
        for home, fm, site in zip(layer.home, layer.format, layer.site):
            formats[fm] = formats.get(fm, 0) + 1
            homes[tiers.get(home, home)] = homes.get(tiers.get(home, home), 0) + 1
            key = {"local": "cpu_local", "fetch": "cache" if layer.cache_slots else "fetch"}.get(site, site)
            split[key] += 1
    slots = [layer.cache_slots for layer in plan.layers]
    return {"formats": dict(sorted(formats.items())), "num_formats": len(formats),
            "resident_formats": sorted({f for x in plan.layers for f, s in zip(x.format, x.site) if s == "resident"}),
            "offloaded_formats": sorted({f for x in plan.layers for f, s in zip(x.format, x.site) if s != "resident"}),
            "dense_format": plan.dense_format, "split": split, "homes": dict(sorted(homes.items())),
            "resident_per_layer": [x.site.count("resident") for x in plan.layers],
            "cache": {"total_slots": int(sum(slots)), "layers_with_slots": sum(1 for c in slots if c),
                      "min": min(slots), "max": max(slots), "uniform": len(set(slots)) == 1, "per_layer": slots},
            "prefetch": plan.prefetch}


def global_top(frequency: np.ndarray, n: int) -> list[int]:
    """``[L]`` experts per layer among the model's ``n`` most frequent (popularity's rule, its
    tie-break). ``frequency``: ``[L, E]`` activations per token."""
    L, E = frequency.shape
    freq = -np.sort(-frequency, axis=1)  # [L, E] descending per layer
    top = np.argsort(-freq.ravel(), kind="stable")[:n]
    return np.bincount(top // E, minlength=L).tolist()


def reference(ilp: dict, popularity: dict | None, frequency: np.ndarray) -> dict:
    """Popularity's choice of every lever: from its plan's shape when it fits, else its rules
    (one format, the ILP's most used; the ILP's resident count spread as the global top-N)."""
    if popularity is not None:
        fm = next(iter(popularity["formats"]))
        return {"expert_format": fm, "dense_format": popularity["dense_format"],
                "resident_per_layer": popularity["resident_per_layer"], "from": "popularity's plan"}
    fm = max(ilp["formats"], key=lambda f: (ilp["formats"][f], f))
    return {"expert_format": fm, "dense_format": fm, "from": "popularity's rules (its plan does not fit)",
            "resident_per_layer": global_top(frequency, sum(ilp["resident_per_layer"]))}


def levers_used(ilp: dict, ref: dict) -> list[str]:
    """The levers (LEVERS, in that order) where plan shape ``ilp`` differs from ``ref`` (:func:`reference`)."""
    used = {
        "format_mix": ilp["num_formats"] > 1,
        "expert_format": set(ilp["formats"]) != {ref["expert_format"]},
        "dense_format": ilp["dense_format"] != ref["dense_format"],
        "resident": ilp["resident_per_layer"] != list(ref["resident_per_layer"]),
        "site_split": any(ilp["split"][k] for k in ("cache", "hybrid", "fetch", "stream")),
        "cache": ilp["cache"]["total_slots"] > 0,
        "homes": ilp["homes"].get("nvme", 0) > 0,
        "prefetch": ilp["prefetch"] != "none",
    }
    return [k for k in LEVERS if used[k]]


def _pin(lever: str, ref: dict, L: int) -> tuple[Fixes, str | None]:
    """The fixes (and prefetch policy) that pin ``lever`` to popularity's choice."""
    if lever == "expert_format":
        return Fixes(expert_format=ref["expert_format"]), None
    if lever == "dense_format":
        return Fixes(dense_format=ref["dense_format"]), None
    if lever == "resident":
        return Fixes(resident=tuple(int(p) for p in ref["resident_per_layer"])), None
    if lever == "site_split":
        return CpuSites(), None
    if lever == "cache":
        return Fixes(cache_slots=(0,) * L), None
    if lever == "homes":
        return Fixes(home="dram"), None
    if lever == "prefetch":
        return Fixes(), "none"
    raise ValueError(f"unknown lever {lever!r}")


def pinned_plan(res: OptimizeResult, req: OptimizeRequest, lever: str, ref: dict):
    """The ILP's plan for ``res``'s case re-solved with ``lever`` pinned to ``ref``'s choice.

    Raises:
        InfeasibleError, InputError: nothing fits with the lever pinned.
    """
    s, plan = res.setup, res.plan
    fixes, prefetch = _pin(lever, ref, s.stats.num_layers)
    pinned = make_setup(s.bare, s.model, s.stats, batch_size=s.batch_size, context_tokens=s.context_tokens,
                        formats=req.formats, critical=req.critical, quant_error=req.quant_error, engine=s.engine,
                        fixes=fixes)
    return _solve_ilp(pinned, dataclasses.replace(req, fixes=fixes, prefetch=prefetch), plan.inputs,
                      plan.quality_budget)[0]


def lever_loss(res: OptimizeResult, req: OptimizeRequest, used: list[str], ref: dict) -> dict:
    """Per lever used, the ILP re-solved with it pinned to popularity's choice: its tokens/s and
    ``slowdown`` (the ILP's tokens/s over the pinned one's; 1 = the lever is worth nothing), or
    why nothing fits then. Levers not used cost nothing when pinned and are not solved."""
    tps = res.plan.predicted["tokens_per_s"]
    out = {}
    for lever in (k for k in _MEASURED if k in used):
        c0 = time.process_time()
        try:
            fixed = pinned_plan(res, req, lever, ref)
        except (InfeasibleError, InputError) as exc:
            out[lever] = {"fits": False, "why": str(exc)[:300], "cpu_s": round(time.process_time() - c0, 3)}
            continue
        v = fixed.predicted["tokens_per_s"]
        out[lever] = {"fits": True, "tokens_per_s": v, "slowdown": tps / v, "gap": fixed.solver.gap,
                      "cpu_s": round(time.process_time() - c0, 3)}
    return out


def lp_min_bytes(bytes_: np.ndarray, err: np.ndarray, budget: float) -> float:
    """Least total bytes choosing one option per group with total error <= ``budget``, LP
    relaxation (a lower bound on the integer optimum; tight up to one fractional group).

    ``bytes_``, ``err``: ``[G, O]``. Greedy over each group's lower convex hull in (error,
    bytes), steps taken by bytes saved per unit of error, the last one fractionally.
    """
    base_b = base_e = 0.0
    rate, saved, cost = [], [], []
    for b, e in zip(np.asarray(bytes_, float), np.asarray(err, float)):
        o = np.lexsort((b, e))
        b, e = b[o], e[o]
        hull = [0]  # least error first; each next point saves bytes at a falling rate
        for i in range(1, len(b)):
            if b[i] >= b[hull[-1]]:
                continue
            while len(hull) >= 2 and ((b[hull[-1]] - b[i]) * (e[hull[-1]] - e[hull[-2]])
                                      >= (b[hull[-2]] - b[hull[-1]]) * (e[i] - e[hull[-1]])):
                hull.pop()
            hull.append(i)
        base_b += b[hull[0]]
        base_e += e[hull[0]]
        for a, c in zip(hull[:-1], hull[1:]):
            saved.append(b[a] - b[c])
            cost.append(e[c] - e[a])
            rate.append(saved[-1] / max(cost[-1], 1e-300))
    left, total = budget - base_e, base_b
    for i in np.argsort(-np.array(rate), kind="stable"):
        if left <= 0:
            break
        take = min(1.0, left / cost[i]) if cost[i] > 0 else 1.0
        total -= take * saved[i]
        left -= take * cost[i]
    return float(total)


def format_headroom(s, budget: float, resident_per_layer: list[int]) -> dict:
    """Expert bytes a format mix could save against one format for all, under the quality
    budget (``sum w_e err(b_e) <= budget sum w``, w = importance), as fractions (LP bounds):

    ``per_expert``: any candidate format for any expert; ``rank_split``: the ILP's options,
    one format for ranks [0, p) and one no wider for [p, E) per layer, p free on the rank
    grid; ``at_plan_residency``: the same with p the plan's resident count (the ILP ties the
    format boundary to residency). The reference is the narrowest single format within budget.
    """
    st = s.stats
    L, E = st.num_layers, st.num_experts
    fms = list(s.formats)
    eb = np.array([s.expert_bytes(fm) for fm in fms])  # [b]
    er = np.array([s.quant_error[fm] for fm in fms])  # [b]
    w = np.take_along_axis(st.importance, st.order, axis=1)  # [L, E] by rank
    cap = budget * float(w.sum())
    uniform = min((eb[i] for i in range(len(fms)) if er[i] <= budget + 1e-12), default=None)
    if uniform is None:
        return {}
    ref = L * E * uniform
    per_expert = lp_min_bytes(np.broadcast_to(eb, (L * E, len(fms))), w.reshape(-1, 1) * er, cap)
    pairs = [(i, j) for i in range(len(fms)) for j in range(len(fms)) if eb[j] <= eb[i]]
    cw = np.concatenate([np.zeros((L, 1)), np.cumsum(w, axis=1)], axis=1)  # [L, E+1]

    def by_rank(cuts: list[list[int]]) -> float:
        rows_b, rows_e = [], []
        for l in range(L):
            opts = [(p * eb[i] + (E - p) * eb[j], cw[l, p] * er[i] + (cw[l, E] - cw[l, p]) * er[j])
                    for p in cuts[l] for i, j in pairs]
            rows_b.append([b for b, _ in opts])
            rows_e.append([e for _, e in opts])
        return lp_min_bytes(np.array(rows_b), np.array(rows_e), cap)

    grid = sorted({int(p) for p in st.pinned_grid} | {E})
    return {"reference_bytes": ref, "per_expert": 1 - per_expert / ref, "rank_split": 1 - by_rank([grid] * L) / ref,
            "at_plan_residency": 1 - by_rank([[int(p)] for p in resident_per_layer]) / ref}
