"""Prefill pricing: the seconds one prompt's prefill takes (the TTFT), per layer option and in all.

A prompt runs as the engine's micro-batches, each a forward pass priced as a step of its n
tokens (:func:`planner.costs.option_costs` at ``phase="prefill"``, op offload included), plus
the dense work outside the MoE layers; with ``Setup.prefill_choice`` each option runs at the
fastest of its prefill sites (:mod:`planner.prefill_sites`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from profiles.perf import dense_step_s, micro_batches

from .costs import option_costs
from .setup import N_SPEC, Setup
from .step_costs import option_time


def prefill_options_s(s: Setup, layer: int, specs: np.ndarray, prompt_tokens: int, prefetch: bool,
                      tiers: np.ndarray | None = None) -> np.ndarray:
    """``[N]`` seconds layer ``layer`` adds to one prompt's prefill under each option
    ``specs`` (``[N, 7]``; ``tiers`` ``[N, 2]``): its part of :func:`prefill_s`, so a TTFT
    is linear in the options chosen (``+`` :func:`prefill_dense_s`). With ``s.prefill_choice``
    each option's prefill runs at the fastest of its prefill sites (:func:`prefill_sites_s`)."""
    return prefill_sites_s(s, layer, specs, prompt_tokens, prefetch, tiers)[0]


def prefill_sites_s(s: Setup, layer: int, specs: np.ndarray, prompt_tokens: int, prefetch: bool,
                    tiers: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``([N] seconds, [N] copied)`` of each option's prompt pass at its fastest prefill site
    (:mod:`planner.prefill_sites`): ``copied`` = 0, the decode sites; ``k > 0``, the first
    (most used) ``k`` ranks of its host-held tail copied to the compute device and run there
    while the host CPU runs the rest (``k`` at least the tail: all of it). Without
    ``s.prefill_choice``, the decode sites alone."""
    best = _prefill_total(s, layer, specs, prompt_tokens, prefetch, tiers)
    copied = np.zeros(len(best), np.int64)
    if s.prefill_choice:
        for k in reversed(prefill_copy_counts(s)):  # all first: a tie keeps the plainer site
            t = _prefill_total(s, layer, specs, prompt_tokens, prefetch, tiers, offload=True, copied=k)
            better = t < best
            best, copied = np.where(better, t, best), np.where(better, k, copied)
    return best, copied


def prefill_copy_counts(s: Setup) -> list[int]:
    """How many of a tail's most used ranks a prefill site may copy (``E``: all of any tail):
    every count on small layers, 16 steps on wide ones; with DRAM contention all only (its
    price, :mod:`planner.dram`, takes a whole tail's copy)."""
    E = s.stats.num_experts
    if s.dram_contention:
        return [E]
    return sorted({-(-E * j // 16) for j in range(1, 17)} if E > 16 else set(range(1, E + 1)))


def _prefill_total(s: Setup, layer: int, specs: np.ndarray, prompt_tokens: int, prefetch: bool,
                   tiers: np.ndarray | None = None, offload: bool = False, copied: int | None = None) -> np.ndarray:
    """``[N]`` :func:`prefill_options_s` at the decode sites or, ``offload``, with the first
    ``copied`` ranks (None: all) of each option's host-held tail copied to the compute device
    per pass (``inf`` for a tier's row: its copies are priced at one format)."""
    op_offload = s.engine.op_offload if s.engine is not None else None
    specs = np.asarray(specs, dtype=np.int64).reshape(-1, N_SPEC)
    total = np.zeros(len(specs))
    for n, count in micro_batches(prompt_tokens, op_offload.micro_batch_tokens if op_offload else None):
        step = dataclasses.replace(s, batch_size=n, phase="prefill", prefill_choice=False, prefill_offload=offload,
                                   prefill_copied=copied if offload else None)
        total += count * option_time(option_costs(step, layer, specs, tiers), prefetch)
    if offload and tiers is not None:
        total = np.where(np.asarray(tiers, np.int64).reshape(-1, 2)[:, 0] > 0, np.inf, total)
    return total


def prefill_dense_s(s: Setup, dense_format: str, prompt_tokens: int, kv_on_host: bool = False) -> float:
    """Seconds of one prompt's prefill outside the MoE layers (:func:`prefill_s`'s dense part;
    ``kv_on_host``: the KV cache in host DRAM, :meth:`Setup.kv_host`)."""
    op_offload = s.engine.op_offload if s.engine is not None else None
    site = s.kv_host() if kv_on_host else None
    total, done = 0.0, 0
    for n, count in micro_batches(prompt_tokens, op_offload.micro_batch_tokens if op_offload else None):
        for _ in range(count):
            done += n
            total += dense_step_s(s.compute, s.model, dense_format, n, float(s.model.kv_cache_bytes(done)), prefill=True,
                                  kv_on_host=site)
    return total


def prefill_s(s: Setup, specs: Sequence[np.ndarray], dense_format: str, prompt_tokens: int,
              prefetch: bool, tiers: Sequence[np.ndarray] | None = None, kv_on_host: bool = False) -> float:
    """Seconds to prefill one prompt of ``prompt_tokens`` tokens (the TTFT) with one option per
    layer (``specs[l]``: ``[1, 7]``, SPEC_COLUMNS; ``tiers[l]``: ``[1, 2]``, its tier, if any).

    The prompt runs as the engine's micro-batches (:func:`profiles.perf.micro_batches`: one
    pass of the whole prompt unless the engine states ``op_offload.micro_batch_tokens``),
    each a forward pass of its n tokens: the layers as :func:`option_costs` prices a step of
    n tokens (op offload included, :func:`planner.costs._offloading`), the dense work as
    :func:`profiles.perf.dense_step_s` with attention reading the KV cache of this one
    sequence so far (the tokens of the passes before and of this one).
    """
    layers = sum(float(prefill_options_s(s, l, sp, prompt_tokens, prefetch, None if tiers is None else tiers[l])[0])
                 for l, sp in enumerate(specs))
    return layers + prefill_dense_s(s, dense_format, prompt_tokens, kv_on_host)
