"""A layer's seconds per step from its option's busy times: the max over the resources it uses at once.

At batch 1 (:func:`expected_max`) a token waits for the slowest resource its own experts use,
so a layer lasts ``E_t[max(device_t, cpu_t, link_t)]`` over the workload's per-token outcomes;
from expected busy times (:func:`averaged_max`) it is ``max(G + stall, U, link)``, right when a
step holds many tokens and the fallback where the workload's decode steps are unknown
(:mod:`planner.step_max` prices the steps themselves). Both without and with prefetch;
:func:`planner.costs.option_costs` calls them on its options' costs.
"""

from __future__ import annotations

import numpy as np

from .setup import MODES


def _stalls(mode: np.ndarray) -> np.ndarray:
    """``[N]`` whether the compute device waits for the option's fetches (fetch, stream)."""
    return (mode == MODES.index("fetch")) | (mode == MODES.index("stream"))


def averaged_max(G: np.ndarray, U: np.ndarray, F: np.ndarray, mode: np.ndarray, r: float,
                  prefetch: bool) -> np.ndarray:
    """``[N]`` layer seconds per step from expected busy times: ``max(G + (1 - pi r) S, U, (1 - pi r) F + pi F)``
    (``r = 0`` for a streamed band, as at batch 1: every band expert crosses the link each step).

    Right when a step holds many tokens (their work interleaves on every resource); at batch 1
    :func:`expected_max` is used instead, at batch > 1 :func:`planner.step_max.stepped_max`
    where the workload's steps are known (this is its fallback, and the op-offload rows').
    """
    streams = mode == MODES.index("stream")
    pi_r = np.where(streams, 0.0, r) if prefetch else 0.0  # streamed weights move every step anyway
    stall = np.where(_stalls(mode), F, 0.0)
    link = (1 - pi_r) * F + (np.where(streams, 0.0, F) if prefetch else 0.0)
    return np.maximum(np.maximum(G + (1 - pi_r) * stall, U), link)


def expected_max(n_res: np.ndarray, n_hit: np.ndarray, n_miss: np.ndarray, n_local: np.ndarray, mode: np.ndarray,
                  t_res: np.ndarray, t_off: np.ndarray, t_cpu: np.ndarray, x: np.ndarray, n_band: np.ndarray,
                  r: float, ax: float, n_up: np.ndarray | None = None,
                  t_up: np.ndarray | None = None, w_miss: np.ndarray | float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seconds of one token's layer at batch 1 for one per-token outcome of one option, without
    and with prefetch, and the CPU's busy seconds (all arguments and results ``[M]``, one entry
    per (option, outcome) pair; the layer's expected time is their mean over the outcomes' shares).

    A token waits for the slowest resource it uses, so the layer lasts
    ``E_t[max(device_t, cpu_t, link_t)]``, not the max of the averages: an expert the CPU runs
    for one token in ten still stalls that token. An outcome is a token's (resident, hit,
    miss, local) expert counts (:meth:`PlanningStats.outcome_table`); ``t_*`` are one-token
    call seconds, ``x`` the seconds of one fetch, ``n_band`` the band's experts (what
    ``stream`` moves every step), ``ax`` the hidden state's round trip to the CPU.

    The schedule is the runtime's (and the simulator's): after the router the device runs
    the resident experts and the hits (``D0``) while the copy engine fetches the ``k`` misses
    one after another, each run as soon as it has arrived and the device is free, so
    ``device = max(D0 + k t, x + k t, k x + t)`` (``k >= 1``; the longest of the chains
    "all device work first", "first fetch, then every miss" and "every fetch, then the last
    miss"); streamed experts all arrive before the device starts (``n_band x + D``). The CPU
    gets the token's hidden state once, runs its experts one after another and sends the
    sum back: ``cpu = ax + n t_cpu`` when it runs any; ``n_up`` of the ``n_local`` are a
    tier's experts (:mod:`planner.format_tiers`), whose calls take ``t_up`` instead.
    ``w_miss``: the compute seconds each copy's host CPU work takes where the compute device
    is the host CPU (:func:`profiles.perf.miss_compute_s`), added to the device's work, with
    prefetch for every copy the link carries (the predicted set's too).
    """
    fetch, hybrid, stream = (mode == MODES.index(m) for m in ("fetch", "hybrid", "stream"))
    on_dev = np.where(fetch | stream, n_hit + n_miss, np.where(hybrid, n_hit, 0))  # band calls on the device
    dev = n_res * t_res + on_dev * t_off
    dev = dev + w_miss * np.where(stream, n_band, np.where(fetch | hybrid, n_miss, 0))  # the copies' CPU work
    n_cpu = n_local + np.where(hybrid, n_miss, 0)
    cpu = n_cpu * t_cpu + np.where(n_cpu > 0, ax, 0.0)
    if n_up is not None:
        cpu = cpu + n_up * (t_up - t_cpu)
    miss_x = np.where(stream, n_band * x, np.where(fetch | hybrid, n_miss * x, 0.0))
    stall = np.where(fetch | stream, miss_x, 0.0)
    # fetch without prefetch: the misses' copies overlap the resident and hit experts
    overlapped = np.maximum(np.maximum(dev, x + n_miss * t_off), n_miss * x + t_off)
    dev_fetch = np.where(fetch & (n_miss > 0), overlapped, np.where(stream, dev + stall, dev))
    out = [np.maximum(np.maximum(dev_fetch, cpu), miss_x)]
    pi_r = np.where(stream, 0.0, r)  # with prefetch: streamed weights move every step anyway
    link = (1 - pi_r) * miss_x + np.where(stream, 0.0, miss_x)
    # the predicted set's copies (right and wrong guesses, as the link carries them) take their CPU work too
    pf_cpu = w_miss * (1 - pi_r) * np.where(fetch | hybrid, n_miss, 0)
    out.append(np.maximum(np.maximum(dev + pf_cpu + (1 - pi_r) * stall, cpu), link))
    return out[0], out[1], cpu
