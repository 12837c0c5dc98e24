"""A plan's per-layer times under the shared cost model, rebuilt from its per-expert decisions.

:func:`layer_breakdown` is the time-per-layer plot's source and a check that the Plan and the
cost model agree; :func:`plan_specs` and :func:`plan_tiers` recover each layer's option row
(:data:`planner.costs.SPEC_COLUMNS`) and tier from a Plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from profiles.engines import load_engine

from .costs import MODES, SPEC_COLUMNS, Setup, fixed_costs, option_costs, option_time
from .plan import Plan

__all__ = ["LayerBreakdown", "dense_format_of", "layer_breakdown", "plan_specs", "plan_tiers"]


@dataclass(frozen=True)
class LayerBreakdown:
    """Per-layer seconds of one decode step (all arrays ``[L]``), under :mod:`planner.costs`.

    ``tau`` is the layer's time (costs.option_time: at batch 1 the expected per-token max of
    device, CPU and link, so it can exceed the max of the averages below); ``compute`` =
    expected device time ``G``, ``stall`` = fetches the device waits for, ``cpu`` = host busy
    time ``U``, ``link`` = the bytes the layer moves (demand misses, plus the prefetched set
    with prefetch).
    """

    compute_s: np.ndarray  # [L] G
    stall_s: np.ndarray  # [L]
    cpu_s: np.ndarray  # [L] U
    link_s: np.ndarray  # [L]
    tau_s: np.ndarray  # [L]
    dense_s: float  # attention, dense weights, KV reads, launches: once per step
    dense_format: str
    specs: np.ndarray  # [L, 7] the option row of each layer (costs.SPEC_COLUMNS)

    @property
    def step_s(self) -> float:
        return float(self.tau_s.sum() + self.dense_s)

    @property
    def bound_by(self) -> list[str]:
        """``[L]`` which resource sets each layer's time: ``device`` (computing), ``cpu``, or
        ``link`` (busy, or the device mostly waiting for its fetches)."""
        stack = np.stack([self.compute_s + self.stall_s, self.cpu_s, self.link_s])
        which = np.argmax(stack, axis=0)
        which = np.where((which == 0) & (self.stall_s > self.compute_s), 2, which)
        return [("device", "cpu", "link")[i] for i in which]


def plan_specs(plan: Plan, s: Setup) -> np.ndarray:
    """``[L, 7]`` the option row (costs.SPEC_COLUMNS) each layer of ``plan`` takes.

    A layer's resident experts are its top-p by frequency, the next q - p go through the
    cache and the rest run locally (that is how plans are built), so counts give p and q.
    """
    rows = []
    E = s.stats.num_experts
    for layer in plan.layers:
        if any(layer.planes):  # nested (planner.nested_options): p both, q - p fetch-low, the rest high
            b = s.formats.index(layer.format[layer.planes.index(next(x for x in layer.planes if x))])
            p, band = layer.planes.count("both"), layer.planes.count("fetch-low")
            dram = next((h for h in range(len(s.homes)) if s.in_host_dram(h)), 0)
            rows.append((p, p + band, b, 0, b, dram, MODES.index("nested")))
            continue
        resident = [e for e, site in enumerate(layer.site) if site == "resident"]
        off = [e for e, site in enumerate(layer.site) if site != "resident"]
        band = [e for e in off if layer.site[e] != "local"]
        p = len(resident)
        # b_off: the band's format, else the tail's narrowest (its tier, if any, is wider)
        bo = layer.format[band[0]] if band else min((layer.format[e] for e in off), key=s.expert_bytes, default=None)
        br = layer.format[resident[0]] if resident else bo
        if not off:
            rows.append((p, E, s.formats.index(br), 0, s.formats.index(br), 0, MODES.index("fetch")))
            continue
        home = s.homes.index(layer.home[off[0]]) if s.homes else 0
        mode = MODES.index(layer.site[band[0]] if band else "local")
        if layer.miss_copy is not None:  # low-gate misses load copies (planner.miss_copy_options)
            if s.low_gate is None or s.miss_copy != (layer.miss_copy.format, layer.miss_copy.gate_below):
                raise ValueError(f"layer {layer.moe_layer}'s low-bit copies were planned on another setup "
                                 "(optimize with its --miss-copy)")
            mode = MODES.index("copy")
        rows.append((p, p + len(band), s.formats.index(br), layer.cache_slots, s.formats.index(bo), home, mode))
    return np.array(rows, dtype=np.int64).reshape(-1, len(SPEC_COLUMNS))


def plan_tiers(plan: Plan, s: Setup, specs: np.ndarray) -> np.ndarray:
    """``[L, 2]`` each layer's tier ``(k, b_up)`` (planner.format_tiers): its offloaded experts
    stored at another format than the option's ``b_off`` (``specs``, from :func:`plan_specs`)."""
    rows = []
    for layer, spec in zip(plan.layers, specs):
        b_off = s.formats[spec[SPEC_COLUMNS.index("b_off")]]
        up = [f for f, site in zip(layer.format, layer.site) if site != "resident" and f != b_off]
        rows.append((len(up), s.formats.index(up[0]) if up else spec[SPEC_COLUMNS.index("b_off")]))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def layer_breakdown(plan: Plan, s: Setup) -> LayerBreakdown:
    """Per-layer times of ``plan`` (see :class:`LayerBreakdown`); ``s`` is ``result.setup``.

    Raises:
        ValueError: the rebuilt times do not add up to the plan's predicted TPOT (the plan was
            edited, or was made for another setup).
    """
    if s.engine is not None and plan.inputs.engine != s.engine.name:  # a baseline on its own engine
        s = s.with_engine(load_engine(plan.inputs.engine), [f for layer in plan.layers for f in layer.format])
    dense_fm = dense_format_of(plan, s)
    fc = fixed_costs(s, dense_fm)
    prefetch = plan.prefetch == "next-layer"
    r = s.stats.predictability  # [L]
    specs = plan_specs(plan, s)
    tiers = plan_tiers(plan, s, specs)
    tables = [option_costs(s, l, specs[l:l + 1], tiers[l:l + 1]) for l in range(len(specs))]
    G = np.array([t.G[0] for t in tables])
    U = np.array([t.U[0] for t in tables])
    F = np.array([t.F[0] for t in tables])
    mode = specs[:, SPEC_COLUMNS.index("mode")]
    # a streamed band moves every step, prefetch or not (layer_schedule.averaged_max)
    pi_r = np.where(mode == MODES.index("stream"), 0.0, r) if prefetch else np.zeros_like(r)
    stall = np.where(np.isin(mode, [MODES.index(m) for m in ("fetch", "stream", "copy")]), (1 - pi_r) * F, 0.0)
    link = (1 - pi_r) * F + (F if prefetch else 0.0)
    tau = np.array([option_time(t, prefetch)[0] for t in tables])
    out = LayerBreakdown(compute_s=G, stall_s=stall, cpu_s=U, link_s=link, tau_s=tau, dense_s=fc.dense_s,
                         dense_format=dense_fm, specs=specs)
    target = plan.predicted.get("tpot_s")
    if target is not None and abs(out.step_s - target) > 1e-9 * max(target, 1e-12):
        raise ValueError(f"the plan's layers add up to {out.step_s:.6g} s per step, not the predicted {target:.6g} s; "
                         "was it made for another setup?")
    return out


def dense_format_of(plan: Plan, s: Setup) -> str | None:
    """The dense weights' format: the one whose bytes the plan charges to the compute device."""
    for note in plan.notes:
        if note.startswith("dense weights: "):
            return note.split(": ", 1)[1]
    dev = plan.memory.get(s.hardware.memory_of(s.compute.id).id)
    if dev is None:
        return None
    return min(s.formats, key=lambda fm: abs(float(s.model.dense_bytes(fm)) - dev.dense_bytes))
