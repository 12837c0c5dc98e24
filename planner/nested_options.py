"""Nested options: every expert of a layer resident as bit-planes, hot ones fetching their low plane.

Legend: E = routed experts per layer, B = tokens per decode step, b8 = the nested format
(``int8`` as 4 + 4, or ``int4`` as 2 + 2), b4 = its high plane's format (``int4``, or
``int2``; :data:`profiles.nested.NESTED`).

A nested option ``(p, q, b8, 0, b8, home, nested)`` (SPEC_COLUMNS, mode ``nested``) keeps the
whole layer on the compute device, stored as two planes (:mod:`profiles.nested`), by
frequency rank:

- ranks ``[0, p)`` hold both planes (``both``): plain b8 on the device;
- ranks ``[p, q)`` hold the high plane, their low plane lives in ``home`` (host DRAM) and
  crosses the link at every use (``fetch-low``): b8 quality for about half the device bytes;
- ranks ``[q, E)`` hold the high plane alone (``high``) and run on it: b4 quality, nothing
  moves.

Each nestable format the layer may use (it and its high plane's format both in
``Setup.formats`` and runnable on the compute device: :func:`nested_formats`) gets its own options, so a layer may nest int8
(hot int8 / cold int4) or int4 (hot int4 / cold int2), never both in one layer.

With :func:`profiles.nested.nested_use` as the price of each choice (the simulator's too),
with ``t8`` and ``th`` the device seconds of a call on both planes and on the high plane, and
``x`` the seconds of one low plane over the route from ``home``, per step::

    G = sum_{e<q} a_e t8(n_e) + sum_{e>=q} a_e th(n_e)       U = 0
    F = sum_{p<=e<q} a_e x                                    (one fetch per active expert)
    memory: p bytes(b8) + (E - p) high on the device, (q - p) low at home
    error:  sum_{e<q} w_e err_e(b8) + sum_{e>=q} w_e err_e(b4) r(b8)   (r: profiles.nested.HIGH_ERROR)

The device waits for the fetches (no cache keeps a low plane; next-layer prefetch moves none,
so an option's time with prefetch is its time without): at batch 1 a token's layer lasts
``max(D0 + k t8, x + k t8, k x + t8)`` for its ``k`` fetch-low experts and ``D0`` the rest of
its device work (the schedule :func:`planner.layer_schedule.expected_max` prices for misses), else
``G + F``. Offered on request (``Setup.nested``, ``planner optimize --nested``) for an engine
that runs nested experts (its profile's ``nested``), for the nestable formats above, with a
host DRAM home and no critical experts or ``--fix-*`` options in the layer; never with op offload or host DRAM contention pricing,
which this module does not model.
"""

from __future__ import annotations

import numpy as np

from profiles.nested import HIGH_ERROR, NESTED, nested_call_s, nested_use
from profiles.perf import miss_compute_s

from .setup import MODES, N_SPEC, OptionTable, Setup

__all__ = ["NESTED_MODE", "nested_costs", "nested_formats", "nested_specs", "offers_nested", "rows_in"]

NESTED_MODE = MODES.index("nested")


def nested_formats(s: Setup) -> tuple[str, ...]:
    """The nestable formats (:data:`profiles.nested.NESTED`) this problem may choose: the format
    and its high plane's both among the candidate formats (``--formats``: a user who did not
    list int2 gets no expert at int2's quality) and both runnable on the compute device."""
    return tuple(f for f in NESTED if f in s.formats and NESTED[f] in s.formats
                 and s.runs(s.compute, f) and s.runs(s.compute, NESTED[f]))


def offers_nested(s: Setup, layer: int) -> bool:
    """Whether ``layer`` gets nested options (see the module docstring)."""
    if not s.nested:
        return False
    if s.engine is not None and not (s.engine.profile.nested and s.engine.profile.nested.value):
        return False
    if not nested_formats(s):
        return False
    if s.unified or s.dram_contention or s.fixes is not None or s.phase != "decode" or s.prefill_offload:
        return False
    if s.critical and s.critical[layer]:
        return False
    if s.dropped and s.dropped[layer]:
        return False
    return _dram_home(s) is not None


def _dram_home(s: Setup) -> int | None:
    return next((h for h in range(len(s.homes)) if s.in_host_dram(h)), None)


def nested_specs(s: Setup, layer: int) -> np.ndarray:
    """``[N, 7]`` the nested options of ``layer``: per nestable format (:func:`nested_formats`)
    every ``p <= q`` of the rank grid (and E), less the all-``both`` one (plain residency at
    that format, an option already)."""
    if not offers_nested(s, layer):
        return np.zeros((0, N_SPEC), np.int64)
    E = s.stats.num_experts
    grid = sorted({int(g) for g in s.stats.pinned_grid} | {0, E})
    h = _dram_home(s)
    rows = [(p, q, b, 0, b, h, NESTED_MODE) for b in (s.formats.index(f) for f in nested_formats(s))
            for p in grid for q in grid if p <= q and p < E]
    return np.array(rows, np.int64).reshape(-1, N_SPEC)


def nested_costs(s: Setup, layer: int, specs: np.ndarray) -> OptionTable:
    """Costs of nested options ``specs`` (``[N, 7]``, mode ``nested``): the module docstring."""
    specs = np.asarray(specs, np.int64).reshape(-1, N_SPEC)
    formats = np.unique(specs[:, 2])
    if len(formats) > 1:  # each nested format prices apart, rows kept in order
        parts = [(np.flatnonzero(specs[:, 2] == b), nested_costs(s, layer, specs[specs[:, 2] == b])) for b in formats]
        order = np.argsort(np.concatenate([rows for rows, _ in parts]), kind="stable")
        return OptionTable(**{k: np.concatenate([getattr(t, k) for _, t in parts])[order]
                              for k in OptionTable.__dataclass_fields__})
    st = s.stats
    E, B = st.num_experts, s.batch_size
    p, q, bi, c, bo, hi, mode = specs.T
    fmt = s.formats[int(bi[0])] if len(specs) else next(iter(NESTED))
    f = st.frequency[layer][st.order[layer]]  # [E] by rank
    w = st.importance[layer][st.order[layer]]
    act = 1.0 - (1.0 - np.clip(f, 0.0, 1.0)) ** B
    tokens = np.where(act > 0, B * f / np.maximum(act, 1e-300), 1.0)

    def cum(v: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(v)])

    t8 = nested_call_s(s.compute, s.model, fmt, "both", tokens)  # [E]
    th = nested_call_s(s.compute, s.model, fmt, "high", tokens)
    dev8, devh, act_c = cum(act * t8), cum(act * th), cum(act)
    err8 = cum(w * s.errors_of(layer, fmt)[st.order[layer]])
    err4 = cum(w * s.errors_of(layer, NESTED[fmt])[st.order[layer]] * HIGH_ERROR[fmt])  # the high plane alone
    both, low = nested_use(s.model, fmt, "both"), nested_use(s.model, fmt, "fetch-low")
    x = np.array([s.transfer_s(s.homes[int(h)], low.fetch_bytes) for h in hi])  # [N] one low plane
    w_low = miss_compute_s(s.compute, s.host, low.fetch_bytes)  # a low plane's host CPU work, on a CPU compute device
    G = dev8[q] + devh[E] - devh[q] + (act_c[q] - act_c[p]) * w_low
    F = (act_c[q] - act_c[p]) * x
    U = np.zeros(len(specs))
    dev_bytes = p * both.device_bytes + (E - p) * low.device_bytes
    home_bytes = (q - p) * low.host_bytes
    error = err8[q] + err4[E] - err4[q]
    if B == 1 and st.access_rank is not None and len(specs):
        t8_1 = float(nested_call_s(s.compute, s.model, fmt, "both", np.ones(1))[0])
        th_1 = float(nested_call_s(s.compute, s.model, fmt, "high", np.ones(1))[0])
        keys, key_of = np.unique(np.stack([p, c, q], axis=1), axis=0, return_inverse=True)
        key, n_res, n_hit, n_miss, n_local, share = st.outcome_table(layer, keys)
        tau = np.zeros(len(specs))
        for i in range(len(specs)):  # a few dozen options: the outcomes of each one's (p, q)
            o = key == int(key_of.ravel()[i])
            k = n_miss[o]
            d0 = n_res[o] * t8_1 + n_local[o] * th_1 + k * w_low
            dev = np.where(k > 0, np.maximum(np.maximum(d0 + k * t8_1, x[i] + k * t8_1), k * x[i] + t8_1), d0)
            tau[i] = float((share[o] * dev).sum())
    else:
        tau = G + F
    zero = np.zeros(len(specs), np.int64)
    return OptionTable(p=p.copy(), q=q.copy(), b_res=bi.copy(), c=c.copy(), b_off=bo.copy(), home=hi.copy(),
                       mode=mode.copy(), G=G, U=U, F=F, dev_bytes=dev_bytes, home_bytes=home_bytes, error=error,
                       tau=tau, tau_prefetch=tau.copy(), k=zero, b_up=bo.copy())


def rows_in(plain: tuple[OptionTable, ...], nested: tuple[OptionTable, ...], choice: tuple[int, ...]) -> tuple[int, ...] | None:
    """``choice`` (a row per layer of the ``plain`` tables) as rows of the ``nested`` tables, the
    same option found by its spec columns and tier; None where one has no match. The nested
    tables hold every plain option (nested rows come on top), so the plain plan is a plan of the
    nested problem at the same price: its warm start, so that offering more never plans slower."""
    out = []
    for t, n, w in zip(plain, nested, choice):
        key = np.concatenate([t.specs([w])[0], t.tiers([w])[0]])
        rows = np.arange(len(n))
        same = np.flatnonzero((np.concatenate([n.specs(rows), n.tiers(rows)], axis=1) == key).all(axis=1))
        if not len(same):
            return None
        out.append(int(same[np.argmin(n.tau[same])]))  # equal specs price equally; the fastest if not
    return tuple(out)
