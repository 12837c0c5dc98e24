"""Memory-bandwidth contention in the option prices: host DRAM as one shared port.

Legend: N = options of a layer, M = (option, per-token outcome) pairs, E = routed experts,
b = storage formats.

With ``Setup.dram_contention`` on, a layer's time per step is at least the seconds host DRAM
needs for everything the layer moves through it (:mod:`profiles.dram`):

    D = sum_{CPU calls} port(b_off) + c_home x (bytes copied to the device)   [+ the device's
        own calls when its memory is the host's: a CPU or unified-memory compute device]

(``port(b)``: :func:`profiles.dram.call_port_bytes`, a call's read bytes over the share of the
bandwidth it reaches, so that ``port(b) / dram_bw`` is the call's memory time)
    tau = max(device + stall, cpu, link, D / dram_bw)

the same max() :mod:`planner.costs` takes over the resources a layer uses at once (FlexGen's
overlap rule): at batch 1 per token outcome (:func:`outcome_dram_s`, inside the expectation
``E_t[max(...)]``), at larger batches from the expected bytes (:func:`averaged_dram_s`). The
copies are counted as the link term counts them: with prefetch, the predicted set crosses
too. ``c_home`` is :func:`profiles.dram.copy_factor` (1 from host DRAM, 2 from a disk whose
reads are staged in host memory). Contention off: nothing here runs and every price is as
before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from profiles.dram import call_port_bytes, copy_factor, port_bytes_per_s

from .setup import MODES, Setup

__all__ = ["DramPrices", "averaged_dram_s", "dram_prices", "outcome_dram_s"]


@dataclass(frozen=True)
class DramPrices:
    """What a layer's DRAM bytes are made of, per format and per home."""

    port_bytes_per_s: float  # the host DRAM port's bandwidth
    cpu_read: np.ndarray  # [b] port bytes of one host-CPU expert call (profiles.dram.call_port_bytes)
    dev_read: np.ndarray  # [b] ... one compute-device call, where its memory is host DRAM (else 0)
    copy: np.ndarray  # [homes, b] port bytes of one expert copied from each home to the device


def dram_prices(s: Setup) -> DramPrices:
    """:class:`DramPrices` of ``s`` (its formats, homes, host and compute device)."""
    eb = [s.expert_bytes(fm) for fm in s.formats]
    cpu_read = np.array([call_port_bytes(s.host, fm, b) for fm, b in zip(s.formats, eb)])
    dev_read = np.array([call_port_bytes(s.compute, fm, b) if s.unified else 0.0 for fm, b in zip(s.formats, eb)])
    dst = s.hardware.memory_of(s.compute.id).id
    copy = np.array([[copy_factor(s.hardware, s.host, home, dst) * b for b in eb] for home in s.homes]
                    or [[0.0] * len(eb)])
    return DramPrices(port_bytes_per_s(s.host), cpu_read, dev_read, copy)


def _copies_with_prefetch(copies: np.ndarray, stream: np.ndarray, r: np.ndarray | float) -> np.ndarray:
    """Copied bytes with next-layer prefetch, counted as the link term counts its seconds."""
    return (1 - r) * copies + np.where(stream, 0.0, copies)


def averaged_dram_s(s: Setup, dp: DramPrices, p: np.ndarray, q: np.ndarray, bi: np.ndarray, bo: np.ndarray,
                    bu: np.ndarray, hi: np.ndarray, mode: np.ndarray, act: np.ndarray, act_c: np.ndarray,
                    up: np.ndarray, h: np.ndarray, miss: np.ndarray, offload: np.ndarray,
                    r: float) -> tuple[np.ndarray, np.ndarray]:
    """``([N], [N])`` DRAM seconds per step of each option, without and with prefetch, from the
    expected calls and copies of a step (``act``: ``[E]`` P(active) by rank, ``act_c`` its
    ``[E+1]`` prefix sums, ``up``: ``[N, E]`` tier masks, ``h``: hit rates, ``miss``: expected
    fetches, ``offload``: rows whose DRAM tail the device runs after a copy)."""
    E = s.stats.num_experts
    is_ = {m: mode == MODES.index(m) for m in MODES}
    band = act_c[q] - act_c[p]  # [N] expected band calls
    tail = np.where(offload, 0.0, act_c[E] - act_c[q])  # [N] tail calls on the CPU
    cpu_calls = tail + np.where(is_["local"], band, np.where(is_["hybrid"], (1 - h) * band, 0.0))
    tiered = np.flatnonzero(bu != bo)
    up_calls = np.zeros(len(p))
    up_calls[tiered] = (up[tiered] * act).sum(axis=1)
    reads = cpu_calls * dp.cpu_read[bo] + up_calls * (dp.cpu_read[bu] - dp.cpu_read[bo])
    dev_band = np.where(is_["fetch"] | is_["stream"], band, np.where(is_["hybrid"], h * band, 0.0))
    reads = reads + act_c[p] * dp.dev_read[bi] + dev_band * dp.dev_read[bo]
    per_copy = dp.copy[np.minimum(hi, len(dp.copy) - 1), bo]  # [N]
    copied = np.where(is_["stream"], q - p, np.where(is_["fetch"] | is_["hybrid"], miss, 0.0))
    if offload.any():
        whole = s.engine.op_offload.copies == "whole-tensor"
        copied = copied + np.where(offload, (E - q) if whole else act_c[E] - act_c[q], 0.0)
    copies = copied * per_copy
    bw = dp.port_bytes_per_s
    return (reads + copies) / bw, (reads + _copies_with_prefetch(copies, is_["stream"], r)) / bw


def outcome_dram_s(dp: DramPrices, n_res: np.ndarray, n_hit: np.ndarray, n_miss: np.ndarray, n_local: np.ndarray,
                   mode: np.ndarray, bi: np.ndarray, bo: np.ndarray, hi: np.ndarray, n_band: np.ndarray, r: float,
                   n_up: np.ndarray | None = None, bu: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``([M], [M])`` DRAM seconds of one token's layer for each (option, outcome) pair, without
    and with prefetch (arguments ``[M]``, as :func:`planner.layer_schedule.expected_max` takes them;
    ``bi``, ``bo``, ``hi``, ``bu``: the pair's option's formats and home)."""
    fetch, hybrid, stream = (mode == MODES.index(m) for m in ("fetch", "hybrid", "stream"))
    n_cpu = n_local + np.where(hybrid, n_miss, 0)
    reads = n_cpu * dp.cpu_read[bo]
    if n_up is not None:
        reads = reads + n_up * (dp.cpu_read[bu] - dp.cpu_read[bo])
    on_dev = np.where(fetch | stream, n_hit + n_miss, np.where(hybrid, n_hit, 0))
    reads = reads + n_res * dp.dev_read[bi] + on_dev * dp.dev_read[bo]
    copied = np.where(stream, n_band, np.where(fetch | hybrid, n_miss, 0))
    copies = copied * dp.copy[np.minimum(hi, len(dp.copy) - 1), bo]
    bw = dp.port_bytes_per_s
    return (reads + copies) / bw, (reads + _copies_with_prefetch(copies, stream, np.where(stream, 0.0, r))) / bw
