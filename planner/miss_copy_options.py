"""Copy options: a fetch band whose low-gate misses load a low-bit copy (profiles.miss_copy).

A copy option ``(p, q, b_res, c, b_off, home, copy)`` is the fetch option with the same
columns (:mod:`planner.costs`), its ``q - p`` band experts also held at ``Setup.miss_copy``'s
format in host DRAM; a call whose tokens' gate weights are all below the threshold loads the
copy on a miss (:mod:`profiles.miss_copy`, the simulator's and the runtime's rule). With
:mod:`profiles.miss_copy` as the price, per band expert ``e`` (``s_e``, ``g_e`` its share of
calls loading the copy and of gate mass they carry, at the setup's batch (:func:`copy_shares`),
``a_e`` its activity, ``m = 1 - h`` the band's miss rate):

    x      = S x(copy) + (1 - S) x(b_off),  S = sum a_e s_e / sum a_e   seconds of a miss's fetch
    G     += sum_e a_e s_e (t(copy, n_e) - t(b_off, n_e))               calls a copy serves (misses
                                                                        and hits on copy slots)
    error += sum_e w_e (m g_e + (1 - m) s_e) (err_e(copy) - err_e(b_off))
    home  += (q - p) bytes(copy)                                       (the copies, host DRAM)

and every other column is the fetch option's (:func:`planner.costs.option_costs` with ``x``
and the copy's calls): a copy's call is priced at the copy format's cached-expert kernel, as
the simulator runs it (at batch 1 the band's one-token call is ``S t(copy) + (1 - S) t(b_off)``);
cache slots at ``b_off``'s size (a copy fills a slot). Offered on request
(``Setup.miss_copy``, ``OptimizeRequest.miss_copy``) for an engine that fetches and whose
profile says ``miss_copy`` (the bundle, roofline), a DRAM home, fetch options whose format is wider than the copy,
at decode, without op offload or DRAM contention pricing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from profiles.formats import get_format
from profiles.miss_copy import low_gate_shares, with_copies
from profiles.workload.trace import DECODE, Trace

from .setup import MODES, N_SPEC, OptionTable, Setup
from .workload_view import decode_steps

__all__ = ["COPY_MODE", "copy_costs", "copy_shares", "copy_specs", "offers_copies"]

COPY_MODE = MODES.index("copy")
_FETCH = MODES.index("fetch")


def copy_shares(trace: Trace, num_experts: int, gate_below: float, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """``(s, g)`` (``[L, E]`` each, :func:`profiles.miss_copy.low_gate_shares`) of ``trace``'s
    decode calls in steps of ``batch`` sequences (:func:`planner.workload_view.decode_steps`,
    the simulator's continuous batching): a call loads the copy when all its tokens' gates are
    below ``gate_below``, as simulator and runtime decide."""
    step = decode_steps(trace.num_tokens, trace.seq_lens, batch, trace.phase == DECODE)
    return low_gate_shares(trace.expert_ids, trace.gate_weights, num_experts, gate_below, step=step)


def offers_copies(s: Setup, layer: int) -> bool:
    """Whether ``layer`` gets copy options (see the module docstring)."""
    if s.miss_copy is None or s.low_gate is None:
        return False
    if s.engine is not None and not (s.engine_can("fetch") and s.engine.profile.miss_copy
                                     and s.engine.profile.miss_copy.value):
        return False
    if not s.runs(s.compute, s.miss_copy[0]) or s.unified or s.dram_contention or s.phase != "decode" \
            or s.prefill_offload:
        return False
    return bool(s.low_gate[0][layer].any())  # no low-gate access: a copy is never loaded


def copy_specs(s: Setup, layer: int, table: OptionTable) -> np.ndarray:
    """``[N, 7]`` the copy options of ``layer``: its table's fetch options with a band, a DRAM
    home and a format wider than the copy, as copy rows."""
    if not offers_copies(s, layer):
        return np.zeros((0, N_SPEC), np.int64)
    specs = table.specs(np.arange(len(table.p))).astype(np.int64)
    bits = get_format(s.miss_copy[0]).bits_per_weight
    wider = np.array([get_format(fm).bits_per_weight > bits for fm in s.formats])
    keep = (specs[:, 6] == _FETCH) & (specs[:, 1] > specs[:, 0]) & wider[specs[:, 4]] \
        & np.array([s.in_host_dram(int(h)) if s.homes else False for h in specs[:, 5]], bool)
    rows = np.unique(specs[keep], axis=0)
    rows[:, 6] = COPY_MODE
    return rows


def copy_costs(s: Setup, layer: int, specs: np.ndarray) -> OptionTable:
    """Costs of copy options ``specs`` (``[N, 7]``, mode ``copy``): the module docstring."""
    from .costs import option_costs  # costs dispatches copy rows here

    st = s.stats
    specs = np.asarray(specs, np.int64).reshape(-1, N_SPEC)
    fetch = specs.copy()
    fetch[:, 6] = _FETCH
    p, q, bi, c, bo, hi, _ = specs.T
    fmt, _gate = s.miss_copy
    order = st.order[layer]
    f = st.frequency[layer][order]
    w = st.importance[layer][order]
    low_s, low_g = s.low_gate[0][layer][order], s.low_gate[1][layer][order]  # by rank
    act = 1.0 - (1.0 - np.clip(f, 0.0, 1.0)) ** s.batch_size

    def cum(v: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(v)])

    act_c, act_s = cum(act), cum(act * low_s)
    share = (act_s[q] - act_s[p]) / np.maximum(act_c[q] - act_c[p], 1e-300)  # [N] S: a miss is low-gate
    x_copy = np.array([s.transfer_s(s.homes[int(h)], s.expert_bytes(fmt)) for h in hi])
    x_full = np.array([s.transfer_s(s.homes[int(h)], s.expert_bytes(s.formats[int(b)])) for h, b in zip(hi, bo)])
    table = option_costs(s, layer, fetch, fetch_s=with_copies(x_full, x_copy, share), copy_calls=(fmt, low_s))
    h = np.array([st.hit_rate(layer, int(a), int(k), int(b)) for a, k, b in zip(p, c, q)])
    m = 1.0 - h
    d_err = {b: w * (s.errors_of(layer, fmt)[order] - s.errors_of(layer, s.formats[b])[order]) for b in set(bo.tolist())}
    g_c = {b: cum(d * low_g) for b, d in d_err.items()}
    s_c = {b: cum(d * low_s) for b, d in d_err.items()}
    extra = np.array([m[i] * (g_c[b][q[i]] - g_c[b][p[i]]) + (1 - m[i]) * (s_c[b][q[i]] - s_c[b][p[i]])
                      for i, b in enumerate(bo.tolist())])
    return dataclasses.replace(table, error=table.error + extra, mode=specs[:, 6].copy(),
                               home_bytes=table.home_bytes + (q - p) * s.expert_bytes(fmt))
