"""A plan from one option per layer: per-expert decisions, memory rows and predicted metrics.

:func:`assemble_plan` expands the ILP's (or a baseline's, or a given configuration's) choice
of one option per MoE layer into the frozen :class:`planner.plan.Plan`, priced by the shared
cost model, so every placement gets its one price wherever it was chosen (planner.optimize,
planner.given, planner.multi_gpu); :func:`option_rows` finds a placement's rows in the
option tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import __version__
from .costs import MODES, step_time
from .energy import step_energy_j
from .format_tiers import tier_masks
from .plan import MemoryUse, Plan
from .plan_layer import LayerPlan, MissCopy
from .prefill_costs import prefill_s
from .prefill_sites import prefill_copies
from .task import dropped_note

if TYPE_CHECKING:
    from .ilp import Problem
    from .optimize import OptimizeRequest
    from .plan import Inputs, SolverInfo

__all__ = ["assemble_plan", "option_rows"]


def option_rows(problem: Problem, specs: np.ndarray) -> tuple[int, ...]:
    """The row of each layer's option table that holds ``specs[l]`` (``[L, 7]``, SPEC_COLUMNS)."""
    choice = []
    for l, spec in enumerate(specs):
        t = problem.tables[l]
        match = np.flatnonzero((t.p == spec[0]) & (t.q == spec[1]) & (t.b_res == spec[2]) & (t.c == spec[3])
                               & (t.b_off == spec[4]) & (t.home == spec[5]) & (t.mode == spec[6]) & (t.k == 0))
        choice.append(int(match[0]))
    return tuple(choice)


def assemble_plan(problem: Problem, choice: tuple[int, ...], dense_fm: str, prefetch: bool, solver: SolverInfo,
                  req: OptimizeRequest, inputs: Inputs, budget: float, notes: tuple[str, ...] = (),
                  prefetch_policy: str | None = None, eviction: str | None = None) -> Plan:
    """Expand one option per layer into per-expert decisions and predicted metrics.

    ``prefetch_policy`` and ``eviction`` name the policies the plan records (default: next-layer
    or none as ``prefetch`` priced, and lru); any prefetch is priced as next-layer prefetch,
    any eviction by the LRU hit-rate curves (the simulator plays the named ones out).

    By frequency rank r within the layer: r < p resident; p <= r < q offloaded and run by the
    option's mode (fetch, hybrid, stream); r >= q offloaded and computed where it lives (local),
    at ``b_off`` or, for the option's tier (planner.format_tiers), at ``b_up``.
    """
    s, st = problem.setup, problem.setup.stats
    dev_mem = problem.device_mem
    if any(s.dropped):  # planner.task
        notes = (*notes, dropped_note(s.dropped))
    notes = (*_input_notes(s, req), *notes)  # before the caller's (a baseline's own note stays last)
    layers = []
    mem = {m: dict(expert_bytes=0.0, cache_bytes=0.0) for m in problem.caps}
    for l, w in enumerate(choice):
        t = problem.tables[l]
        p, q, c = int(t.p[w]), int(t.q[w]), int(t.c[w])
        br, bo = s.formats[t.b_res[w]], s.formats[t.b_off[w]]
        home = s.homes[t.home[w]] if s.homes else dev_mem
        band_site = MODES[t.mode[w]]  # fetch, hybrid or stream (local: the band is empty)
        up = tier_masks(s, l, t.q[w:w + 1], t.k[w:w + 1], t.b_off[w:w + 1], t.b_up[w:w + 1])[0]  # [E] by rank
        if band_site == "nested":  # every expert resident as int8 bit-planes (planner.nested_options)
            layers.append(_nested_layer(s, l, p, q, br, dev_mem))
            mem[dev_mem]["expert_bytes"] += float(t.dev_bytes[w])
            mem[home]["expert_bytes"] += float(t.home_bytes[w])  # the fetch-low experts' low planes
            continue
        copy = None
        if band_site == "copy":  # a fetch band whose low-gate misses load copies (planner.miss_copy_options)
            band_site, copy = "fetch", MissCopy(format=s.miss_copy[0], gate_below=s.miss_copy[1])
        homes, fmts, sites = [None] * st.num_experts, [None] * st.num_experts, [None] * st.num_experts
        for rank, e in enumerate(st.order[l]):
            if rank < p:
                homes[e], fmts[e], sites[e] = dev_mem, br, "resident"
            else:
                homes[e], fmts[e], sites[e] = home, s.formats[t.b_up[w]] if up[rank] else bo, \
                    band_site if rank < q else "local"
        layers.append(LayerPlan(moe_layer=l, hidden_layer=int(s.model.moe_layer_indices[l]), home=tuple(homes),
                                format=tuple(fmts), site=tuple(sites), cache_slots=c,
                                cache_device=s.compute.id if c else None, cache_format=bo if c else None,
                                miss_copy=copy))
        held = min(p, st.num_experts - len(s.dropped[l])) if s.dropped else p  # dropped ranks are last
        mem[dev_mem]["expert_bytes"] += held * s.expert_bytes(br) * s.kernel_factor(s.compute, br)
        mem[dev_mem]["cache_bytes"] += c * s.expert_bytes(bo) * s.kernel_factor(s.compute, bo)
        if p < st.num_experts:
            mem[home]["expert_bytes"] += float(t.home_bytes[w])  # as the ILP counted it
    fc = problem.fixed[dense_fm]
    memory = {}
    for m, use in mem.items():
        extra = dict(dense_bytes=fc.dense_bytes, kv_bytes=fc.kv_bytes, workspace_bytes=fc.workspace_bytes) \
            if m == dev_mem else dict(kv_bytes=fc.kv_host_bytes) if fc.kv_on_host and m == s.homes[0] else {}
        memory[m] = MemoryUse(capacity_bytes=s.hardware.memories[m].capacity_bytes, **use, **extra)
    step_s, tau = step_time(s, problem.tables, choice, fc, prefetch)
    predicted = _predict(problem, choice, dense_fm, prefetch, step_s, req)
    if s.compute.power_w is not None and s.host.power_w is not None:  # profiles.energy, planner.energy
        joules = step_energy_j(problem, choice, dense_fm, prefetch)
        predicted |= {"energy_j_per_token": joules / s.batch_size, "power_w": joules / step_s}
    quality = float(sum(problem.tables[l].error[w] for l, w in enumerate(choice)) / max(problem.importance_total, 1e-300))
    copies = prefill_copies(s, [problem.tables[l].specs([w]) for l, w in enumerate(choice)],
                            [problem.tables[l].tiers([w]) for l, w in enumerate(choice)],
                            req.prompt_tokens, prefetch)  # per-phase sites (planner.prefill_sites)
    prefill = tuple(bool(ids) for ids in copies) if copies is not None else None
    dram = {h for i, h in enumerate(s.homes) if s.in_host_dram(i)}
    split = copies is not None and any(  # a layer copies some of its host-held CPU experts, not all
        ids and len(ids) < sum(st == "local" and h in dram for st, h in zip(lp.site, lp.home))
        for ids, lp in zip(copies, layers))
    return Plan(inputs=inputs, objective=req.objective, batch_size=s.batch_size, context_tokens=s.context_tokens,
                compute_device=s.compute.id, host_device=s.host.id, dense_format=dense_fm,
                prefetch=prefetch_policy or ("next-layer" if prefetch else "none"), eviction=eviction or "lru",
                quality_budget=budget, dropped_experts=s.dropped if any(s.dropped) else (),
                quality_error=quality, layers=tuple(layers), memory=memory, predicted=predicted, solver=solver,
                kv_cache="host" if fc.kv_on_host else "device",
                prefill_offload=prefill, prefill_copies=copies if split else None,
                notes=(f"dense weights: {dense_fm}", f"planned by moe-planner {__version__}") + notes
                + ((f"KV cache in host memory ({fc.kv_host_bytes / 2**30:.2f} GiB; engine flag "
                    f"{s.engine.kv_offload.flag}): attention where it lives",) if fc.kv_on_host else ())
                + ((f"prefill sites: {sum(prefill)} of {len(prefill)} MoE layers run a prompt's CPU experts on "
                    f"{s.compute.id} after a copy (prefill_offload" + (f"; {sum(map(len, copies))} experts copied, "
                    "the host CPU runs the rest meanwhile: prefill_copies" if split else "")
                    + "); decode runs them on the CPU",) if prefill else ()))


def _nested_layer(s, l: int, p: int, q: int, fmt: str, dev_mem: str) -> LayerPlan:
    """A nested option's layer: every expert resident at ``fmt``, by rank both planes below p,
    the high plane with the low plane fetched below q, the high plane alone from q."""
    E = s.stats.num_experts
    planes = [""] * E
    for rank, e in enumerate(s.stats.order[l]):
        planes[e] = "both" if rank < p else "fetch-low" if rank < q else "high"
    return LayerPlan(moe_layer=l, hidden_layer=int(s.model.moe_layer_indices[l]), home=(dev_mem,) * E,
                     format=(fmt,) * E, site=("resident",) * E, planes=tuple(planes))


def _predict(problem: Problem, choice: tuple[int, ...], dense_fm: str, prefetch: bool, step_s: float,
             req: OptimizeRequest) -> dict[str, float]:
    """Predicted metrics of a plan under the shared cost model."""
    s, st = problem.setup, problem.setup.stats
    tables = problem.tables
    fetched, accesses, link_s = 0.0, 0.0, 0.0
    hit_num, hit_den = 0.0, 0.0
    for l, w in enumerate(choice):
        t = tables[l]
        p, q, c = int(t.p[w]), int(t.q[w]), int(t.c[w])
        f = st.frequency[l][st.order[l]]
        band = float(f[p:q].sum())  # accesses through the cache; ranks past q run locally
        accesses += float(f.sum())
        if MODES[t.mode[w]] == "nested":  # a fetch-low expert's low plane crosses at every use
            fetched += band
            hit_num += float(f.sum()) - band
        elif MODES[t.mode[w]] in ("fetch", "hybrid", "copy") and p < q:
            h = st.hit_rate(l, p, c, q, per_access=True)  # the reported rate and fetches count accesses
            hit_num += float(f[:p].sum()) + h * band
            fetched += (1 - h) * band
        elif MODES[t.mode[w]] == "stream":
            fetched += q - p
            hit_num += float(f[:p].sum())
        else:
            hit_num += float(f[:p].sum())
        hit_den += float(f.sum())
        link_s += float(t.F[w])
    # prefill of one prompt: the same placement, the prompt's tokens in the engine's micro-batches
    ttft_s = prefill_s(s, [tables[l].specs([w]) for l, w in enumerate(choice)], dense_fm, req.prompt_tokens, prefetch,
                       tiers=[tables[l].tiers([w]) for l, w in enumerate(choice)],
                       kv_on_host=problem.fixed[dense_fm].kv_on_host)
    B = s.batch_size
    out = {"tpot_s": step_s, "tokens_per_s": B / step_s, "ttft_s": ttft_s,
           "expert_hit_rate": hit_num / hit_den if hit_den else 1.0,
           "expert_fetches_per_step": fetched, "link_s_per_step": link_s}
    price = s.hardware.price_per_hour_usd
    if price is not None:
        out["cost_per_million_tokens_usd"] = price / (B / step_s * 3600.0) * 1e6
    return out


def _input_notes(s, req: OptimizeRequest) -> tuple[str, ...]:
    """What the plan did not take from its inputs: candidate formats the engine does not run on
    the plan's devices (planner.setup.runnable_formats left them out), and under --objective
    energy / --max-watts the devices whose profile states no idle power (planner.energy counts
    them at 0 W idle)."""
    notes = []
    eng = s.engine
    if eng is not None and req.policy is None:
        unrun = [fm for fm in req.formats
                 if not (eng.supports(s.compute.kind, eng.stored(fm)) or eng.supports(s.host.kind, eng.stored(fm)))]
        if unrun:
            notes.append(f"formats not run by engine {eng.name} on {s.compute.id} or {s.host.id}, left out: "
                         f"{', '.join(unrun)} (planner engines show {eng.name})")
    if req.objective == "energy" or req.max_watts is not None:
        idle_unknown = [d for d in dict.fromkeys((s.compute.id, s.host.id))
                        if s.hardware.devices[d].idle_power_w is None]
        if idle_unknown:
            notes.append(f"idle power: no idle_power_w for {', '.join(idle_unknown)}, counted as 0 W idle, so a plan "
                         "that waits (on its link) looks as frugal as its busy seconds; add idle_power_w to the "
                         "hardware profile")
    return tuple(notes)
