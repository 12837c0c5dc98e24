"""Copy options: a fetch band whose low-gate misses load a low-bit copy (profiles.miss_copy).

A copy option ``(p, q, b_res, c, b_off, home, copy)`` is the fetch option with the same
columns (:mod:`planner.costs`), its ``q - p`` band experts also held at ``Setup.miss_copy``'s
format in host DRAM; a miss whose gate weight is below the threshold loads the copy. With
:mod:`profiles.miss_copy` as the price (the simulator's too), per band expert ``e`` (``s_e``,
``g_e`` its low-gate count and gate-mass shares, ``a_e`` its activity, ``m = 1 - h`` the
band's miss rate):

    x      = S x(copy) + (1 - S) x(b_off),  S = sum a_e s_e / sum a_e   seconds of a miss's fetch
    error += sum_e w_e (m g_e + (1 - m) s_e) (err_e(copy) - err_e(b_off))
    home  += (q - p) bytes(copy)                                       (the copies, host DRAM)

and every other column is the fetch option's (:func:`planner.costs.option_costs` with ``x``):
calls are priced at ``b_off`` (a copy's call is no slower where the link binds, which is
where copies pay), cache slots at ``b_off``'s size (a copy fills a slot). Offered on request
(``Setup.miss_copy``, ``OptimizeRequest.miss_copy``) for an engine that fetches and whose
profile says ``miss_copy`` (the bundle, roofline), a DRAM home, fetch options whose format is wider than the copy,
at decode, without op offload or DRAM contention pricing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from profiles.formats import get_format

from .setup import MODES, N_SPEC, OptionTable, Setup

__all__ = ["COPY_MODE", "copy_costs", "copy_specs", "offers_copies"]

COPY_MODE = MODES.index("copy")
_FETCH = MODES.index("fetch")


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
    table = option_costs(s, layer, fetch, fetch_s=share * x_copy + (1 - share) * x_full)
    h = np.array([st.hit_rate(layer, int(a), int(k), int(b)) for a, k, b in zip(p, c, q)])
    m = 1.0 - h
    d_err = {b: w * (s.errors_of(layer, fmt)[order] - s.errors_of(layer, s.formats[b])[order]) for b in set(bo.tolist())}
    g_c = {b: cum(d * low_g) for b, d in d_err.items()}
    s_c = {b: cum(d * low_s) for b, d in d_err.items()}
    extra = np.array([m[i] * (g_c[b][q[i]] - g_c[b][p[i]]) + (1 - m[i]) * (s_c[b][q[i]] - s_c[b][p[i]])
                      for i, b in enumerate(bo.tolist())])
    return dataclasses.replace(table, error=table.error + extra, mode=specs[:, 6].copy(),
                               home_bytes=table.home_bytes + (q - p) * s.expert_bytes(fmt))
