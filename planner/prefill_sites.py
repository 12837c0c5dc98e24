"""Separate prefill and decode execution sites (issue 15 item 3, the sound subset): one
residency, two sets of sites. A plan made under a TTFT SLO (``--slo-ttft``) may run, per MoE
layer, the experts that decode runs on the host CPU where they live (ranks ``[q, E)`` homed in
host DRAM) on the compute device during a prompt's pass instead: the pass copies the ones its
tokens use over the host->device route, then the device runs them, as llama.cpp's op offload
does by itself past its threshold (:func:`planner.costs._offload_copy_s`: one transfer per
pass, then the computation). Decode is unchanged: a prompt's hundreds of tokens per expert
pay for the copy, a decode step's one does not. Per expert: the pass may copy only the ``k``
most used of them (ranks ``[q, q + k)``) while the host CPU runs the rest at the same time, so
the layer lasts the longer of the two instead of all of it on one side (``k`` over every count
on layers of up to 16 experts, 16 steps on wider ones: :func:`planner.prefill_costs.prefill_copy_counts`).

In the ILP (:mod:`planner.ilp`) the choice is per (layer, option) and touches only the TTFT
row: each option's prefill seconds are the least over its sites (the decode sites and every
``k``; :func:`planner.prefill_costs.prefill_sites_s` with ``Setup.prefill_choice``), so the model, its
bound and its certificate are those of the TTFT SLO already, over the sites offered. Memory: the copies go through
the runtime's staging buffers (``runtime_memory.staging_experts``, already on the device row),
one expert after another, so residency, cache slots and the device row are the decode
plan's; the two phases share them. Offered where the engine can copy an expert to the device
and run it there (a ``fetch`` site) and does not decide for itself (no ``op_offload``).

The plan records the sites as ``Plan.prefill_offload`` (per MoE layer; absent: prefill runs at
the decode sites) and ``Plan.prefill_copies`` (per layer the experts copied, where some layer
copies fewer than all), the simulator runs a prompt's pass of such a layer with those host-held
local experts copied and run on the device and the others on the CPU (:mod:`simulator.op_offload`),
and so does the bundle runtime (``exporters/runtime/store.py``: the fetcher's one-ahead copies, no cache slot
kept; it overlaps copies with compute, where the price is one copy, then the computation).

With both SLOs (``--slo-ttft``, ``--slo-tpot``) these are the plan's two phase plans: TTFT is
met by the prefill sites, TPOT by the decode sites, and ``planner optimize`` prints which each
phase runs (:func:`planner.report.phases_data`).

Why the phases share one residency (no second placement for prefill): a prompt's pass calls
every expert of every layer (512 tokens, top-2 of 8 under even routing: an expert is left out
with probability (6/8)^512), so whatever set the device holds during the pass, every other
expert crosses the link or runs on the CPU once per pass, which is what these sites price. A
prefill residency only changes which experts stay, and switching to it and back adds the
swapped experts' copies without removing any.

Not built: a prefill site for the cached band (its misses are fetched in both phases), and
the per-expert split under --dram-contention (whose price takes a whole tail's copy).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .costs import Setup
from .prefill_costs import prefill_sites_s

__all__ = ["offers_prefill_sites", "with_prefill_choice", "prefill_copies"]


def offers_prefill_sites(s: Setup) -> bool:
    """Whether the engine can run a prompt's host-held experts on the compute device by the
    planner's choice: it copies experts there (``fetch``) and has no op offload of its own."""
    engine = s.engine
    return (not s.unified and s.compute.kind == "gpu" and (engine is None or engine.op_offload is None)
            and s.engine_can("fetch"))


def with_prefill_choice(s: Setup, ttft: tuple[float, int] | None) -> Setup:
    """``s`` with per-layer prefill sites to choose where a TTFT SLO asks for them (``ttft``)."""
    return dataclasses.replace(s, prefill_choice=True) if ttft is not None and offers_prefill_sites(s) else s


def prefill_copies(s: Setup, specs: list[np.ndarray], tiers: list[np.ndarray], prompt_tokens: int,
                   prefetch: bool) -> tuple[tuple[int, ...], ...] | None:
    """Per layer (its option ``specs[l]`` ``[1, 7]``, tier ``tiers[l]`` ``[1, 2]``) the experts
    (ids) a prompt's pass copies to the compute device and runs there: the most used ``k`` of
    its host-held tail at the option's fastest prefill site (:func:`planner.prefill_costs.prefill_sites_s`;
    empty: the decode sites); None where the planner does not choose, or no layer copies."""
    if not s.prefill_choice:
        return None
    out = []
    for l, (sp, tr) in enumerate(zip(specs, tiers)):
        k = int(prefill_sites_s(s, l, sp, prompt_tokens, prefetch, tr)[1][0])
        q, dropped = int(np.asarray(sp).reshape(-1)[1]), set(s.dropped[l]) if s.dropped else set()
        ids = s.stats.order[l][q:q + k] if k else ()
        out.append(tuple(sorted(int(e) for e in ids if int(e) not in dropped)))
    return tuple(out) if any(out) else None
