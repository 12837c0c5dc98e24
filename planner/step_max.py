"""A layer's time at batch > 1: the per-step max of device, host CPU and link, averaged over steps.

A decode step of B sequences waits, in each layer, for the slowest of the compute device, the
host CPU and the link: ``tau = E_s[max(device_s, cpu_s, link_s)]``. The max of the averages,
``max(G, U, F)`` (:func:`planner.layer_schedule.averaged_max`), is below it whenever the resources do
not all stay busy in every step: an expert the CPU runs in one step of three stalls that step
for its whole call, while the device's work in the other two steps does not make up for it
(eight Mixtral-sized layers on desktop-4090, bundle engine, batch 4: the simulated step was
19% over the max of averages). The ILP balances G against U, where that gap is widest.

The steps are the workload's own (:meth:`planner.workload_view.PlanningStats.at_batch`'s
``step_active``: which experts, by rank, each decode step of the batch's continuous lanes
uses). Per step and option ``(p, q, b_res, c, b_off, home, mode)``, with an active expert's
call at its expected tokens per call (the seconds :func:`planner.costs.option_costs` prices):

    device = sum_{active e<p} t_dev(b_res) + band calls on the device + w per copy, with a fetch
             layer's m misses overlapping it: max(device, x + m t, m x + t) (t: one band call;
             the schedule of planner.layer_schedule.expected_max)
    cpu    = sum_{active e>=q} t_cpu(b_off) [+ the hybrid band's misses] + ax (if it runs any)
    link   = misses x   (fetch, hybrid: (1 - h) of the active band experts; stream: (q - p) x)

the band's hits and misses at the option's expected per-call hit rate h (a step's active band
experts each miss with 1 - h: the mean of the step's misses, not their spread). With
prefetch, the predicted share r of a fetch layer's misses no longer stalls the device and the
link carries the predicted set too (as :func:`planner.layer_schedule.averaged_max`); a streamed band
moves and stalls as without (every band expert crosses the link each step, as at batch 1).
"""

from __future__ import annotations

import numpy as np
from scipy.special import binom

from .setup import MODES

__all__ = ["stepped_max"]

_CHUNK = 4096  # option rows per block ([rows, S] arrays)


def stepped_max(active: np.ndarray, p: np.ndarray, q: np.ndarray, qk: np.ndarray, bi: np.ndarray, bo: np.ndarray,
                mode: np.ndarray, h: np.ndarray, x: np.ndarray, w_miss: np.ndarray, r: float, ax: float,
                t_dev: np.ndarray, t_cached: np.ndarray, t_cpu: np.ndarray,
                tier_cpu: np.ndarray | None = None, dram: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``([N], [N])`` seconds of each option's layer per step, without and with prefetch.

    ``active``: ``[S, E]`` bool by rank, the experts each step uses; ``p, q, qk, bi, bo, mode,
    h, x, w_miss``: ``[N]`` per option (``qk``: where the CPU's tail starts, ``x``: seconds of
    one fetch, ``w_miss``: compute seconds of a copy's host work); ``t_dev, t_cached, t_cpu``:
    ``[b, E]`` one call's seconds by format and rank on the device, from the device's expert
    cache, on the host CPU; ``tier_cpu``: ``[N, E]`` extra CPU seconds of a tier's experts
    (:mod:`planner.format_tiers`), or None; ``ax``: the hidden state's round trip to the CPU;
    ``dram``: with ``Setup.dram_contention``, ``(cpu_read [b], dev_read [b], copy [N], port
    bytes/s, tier_read [N, E] or None)``: the host DRAM port's seconds of the step's calls and
    copies join the max (:func:`planner.dram.averaged_dram_s`'s bytes, per step).
    """
    a = np.asarray(active, np.float64)  # [S, E]
    S = a.shape[0]

    def prefix(t: np.ndarray) -> np.ndarray:  # [b, S, E+1] per step, sums over the first ranks
        return np.concatenate([np.zeros((t.shape[0], S, 1)), np.cumsum(a[None] * t[:, None, :], axis=2)], axis=2)

    dev_p, cached_p, cpu_p = prefix(t_dev), prefix(t_cached), prefix(t_cpu)
    count_p = np.concatenate([np.zeros((S, 1)), np.cumsum(a, axis=1)], axis=1)  # [S, E+1]
    E = a.shape[1]
    fetch, hybrid, stream, local = (mode == MODES.index(m) for m in ("fetch", "hybrid", "stream", "local"))
    via_cache = fetch | hybrid
    tau, tau_pf = np.zeros(len(p)), np.zeros(len(p))
    s_ix = np.arange(S)[None, :]
    for lo in range(0, len(p), _CHUNK):
        n = slice(lo, lo + _CHUNK)
        P, Q, QK, BI, BO = (v[n, None] for v in (p, q, qk, bi, bo))
        H = h[n, None]

        def at(pre: np.ndarray, fmt: np.ndarray, rank: np.ndarray) -> np.ndarray:  # [rows, S]
            return pre[fmt, s_ix, rank]

        res = at(dev_p, BI, P)
        band_dev = np.where(via_cache[n, None], at(cached_p, BO, Q) - at(cached_p, BO, P),
                            at(dev_p, BO, Q) - at(dev_p, BO, P))
        band_cpu = at(cpu_p, BO, Q) - at(cpu_p, BO, P)
        k_band = count_p[s_ix, Q] - count_p[s_ix, P]
        k_tail = count_p[s_ix, np.full_like(QK, E)] - count_p[s_ix, QK]
        cpu = at(cpu_p, BO, np.full_like(QK, E)) - at(cpu_p, BO, QK)
        if tier_cpu is not None:
            cpu = cpu + tier_cpu[n] @ a.T
        pre_idle = (k_tail == 0) & np.where(local[n, None], k_band == 0, True)
        cpu = cpu + np.where(local[n, None], 1.0, 0.0) * band_cpu
        per_dev, per_cpu = band_dev / np.maximum(k_band, 1), band_cpu / np.maximum(k_band, 1)  # one active band expert
        streamed = (Q - P).astype(np.float64)
        r_n = np.where(stream[n, None], 0.0, r)  # streamed weights move every step anyway
        for weight, m in _miss_counts(np.where(via_cache[n, None], k_band, 0.0), 1 - H):
            # m of the step's active band experts miss: fetched (fetch, hybrid), run on the CPU (hybrid)
            copies = np.where(stream[n, None], streamed, m)
            dev = res + np.where(hybrid[n, None], band_dev - m * per_dev, np.where(local[n, None], 0.0, band_dev))
            dev = dev + w_miss[n, None] * copies
            busy = cpu + np.where(hybrid[n, None], m * per_cpu, 0.0)
            busy = busy + ax * ~(pre_idle & ((m == 0) | ~hybrid[n, None]))
            link = copies * x[n, None] * (fetch | hybrid | stream)[n, None]
            stall = np.where((fetch | stream)[n, None], link, 0.0)
            # fetch without prefetch: the misses' copies overlap the resident and hit experts
            # (layer_schedule.expected_max's schedule: max(D0 + m t, x + m t, m x + t), t one band call)
            overlapped = np.maximum(np.maximum(dev, x[n, None] + m * per_dev), m * x[n, None] + per_dev)
            device = np.where(fetch[n, None] & (m > 0), overlapped, dev + stall)
            link_pf = (1 - r_n) * link + np.where(stream[n, None], 0.0, link)
            port = port_pf = 0.0
            if dram is not None:
                cpu_read, dev_read, per_copy, port_bw, tier_read = dram
                cpu_calls = k_tail + np.where(local[n, None], k_band, np.where(hybrid[n, None], m, 0.0))
                dev_band = np.where((fetch | stream)[n, None], k_band, np.where(hybrid[n, None], k_band - m, 0.0))
                reads = cpu_calls * cpu_read[BO] + count_p[s_ix, P] * dev_read[BI] + dev_band * dev_read[BO]
                if tier_read is not None:
                    reads = reads + tier_read[n] @ a.T
                moved = copies * per_copy[n, None]
                port = (reads + moved) / port_bw
                port_pf = (reads + (1 - r) * moved + np.where(stream[n, None], 0.0, moved)) / port_bw
            tau[n] += (weight * np.maximum(np.maximum(np.maximum(device, busy), link), port)).mean(axis=1)
            tau_pf[n] += (weight * np.maximum(np.maximum(np.maximum(dev + (1 - r_n) * stall, busy), link_pf),
                                              port_pf)).mean(axis=1)
    return tau, tau_pf


def _miss_counts(k: np.ndarray, miss: np.ndarray, exact_up_to: int = 24, nodes: int = 9):
    """``(weight, m)`` pairs (``[rows, S]`` each, weights summing to 1 per entry): the number
    ``m`` of misses among ``k`` active band experts, each missing with probability ``miss``
    (``[rows, 1]``): the binomial's every value while ``k <= exact_up_to``, else Gauss-Hermite
    nodes of its normal approximation, clipped to ``[0, k]``."""
    kmax = int(k.max(initial=0))
    if kmax <= exact_up_to:
        stay = 1 - miss
        for m in range(kmax + 1):  # the pmf in closed form (scipy.stats' pmf checks its arguments per call: 10x slower)
            yield np.where(m <= k, binom(k, m) * miss ** m * stay ** np.maximum(k - m, 0), 0.0), np.full_like(k, m)
        return
    z, w = np.polynomial.hermite.hermgauss(nodes)
    mean, sd = k * miss, np.sqrt(k * miss * (1 - miss))
    for zi, wi in zip(z, w):
        yield np.full_like(k, wi / np.sqrt(np.pi)), np.clip(mean + np.sqrt(2) * sd * zi, 0.0, k)
