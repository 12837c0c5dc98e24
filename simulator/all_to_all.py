"""An all-to-all between GPUs, worked out in numpy: :meth:`simulator.resources.Network.exchange`
for a whole ``[G, G]`` matrix of bytes at once.

Expert parallelism runs two exchanges per MoE layer per step (dispatch and combine), each
over up to ``G (G - 1)`` GPU pairs whose routes cross a few link directions; the per-pair
Python loop of ``exchange`` was most of a DeepSeek-V3 cluster run's time. Here each
memory tuple's routes are resolved once into an incidence list (pair -> link directions,
pair -> links), and an exchange is two ``bincount`` calls.

The floats are ``exchange``'s: the bytes of a pair are whole numbers (token counts times the
hidden size times 2), so their sums are exact in any order below 2**53 bytes; each link
direction's busy seconds and the exchange's end are computed from the same sums as there,
and a link's running byte total takes the step's sum in one addition only while that total
is a whole number (else pair by pair, in ``exchange``'s order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .resources import Network, Span

__all__ = ["exchange_matrix"]


@dataclass(frozen=True)
class _Incidence:
    keys: tuple[str, ...]  # link directions and memory ports crossed by some pair
    key_pair: np.ndarray  # [n] pair index (s * G + d) of each (pair, key) entry
    key_idx: np.ndarray  # [n] its key's index in keys
    links: tuple[str, ...]
    link_pair: np.ndarray  # [m] pair index of each (pair, link) entry, in exchange's order
    link_idx: np.ndarray  # [m]
    latency: np.ndarray  # [G * G] route latency of each pair (0 on the diagonal)
    offdiag: np.ndarray  # [G * G] bool: s != d


def _incidence(net: Network, mems: tuple[str, ...]) -> _Incidence:
    cache = net.__dict__.setdefault("_all_to_all", {})
    inc = cache.get(mems)
    if inc is None:
        G = len(mems)
        keys: dict[str, int] = {}
        links: dict[str, int] = {}
        kp, ki, lp, li = [], [], [], []
        latency = np.zeros(G * G)
        for s in range(G):
            for d in range(G):
                if s == d:
                    continue
                p = net.path(mems[s], mems[d])
                latency[s * G + d] = p.latency_s
                for k in p.keys:
                    kp.append(s * G + d)
                    ki.append(keys.setdefault(k, len(keys)))
                for lid in p.link_ids:
                    lp.append(s * G + d)
                    li.append(links.setdefault(lid, len(links)))
        as_int = (lambda v: np.array(v, np.int64))
        inc = cache[mems] = _Incidence(tuple(keys), as_int(kp), as_int(ki), tuple(links), as_int(lp), as_int(li),
                                       latency, ~np.eye(G, dtype=bool).ravel())
    return inc


def exchange_matrix(net: Network, mems: tuple[str, ...], moved: np.ndarray, start_s: float, what: str = "") -> float:
    """``net.exchange`` of ``moved[s, d]`` bytes (whole numbers) from memory ``mems[s]`` to
    ``mems[d]`` for every pair with ``s != d``; returns when the last byte has arrived."""
    inc = _incidence(net, mems)
    b = np.asarray(moved, float).ravel()
    live = (b > 0) & inc.offdiag
    if not live.any():
        return start_s
    latency = float(inc.latency[live].max(initial=0.0))
    crossed = live[inc.key_pair]
    if not crossed.any():
        return start_s
    load = np.bincount(inc.key_idx[crossed], weights=b[inc.key_pair[crossed]], minlength=len(inc.keys))
    used = np.bincount(inc.key_idx[crossed], minlength=len(inc.keys)) > 0
    link_hit = live[inc.link_pair]
    if link_hit.any():
        rows, idx = inc.link_pair[link_hit], inc.link_idx[link_hit]
        sums = np.bincount(idx, weights=b[rows], minlength=len(inc.links))
        for j in np.flatnonzero(np.bincount(idx, minlength=len(inc.links))).tolist():
            lid = inc.links[j]
            total = net.bytes[lid]
            if float(total).is_integer():
                net.bytes[lid] = total + float(sums[j])
            else:  # a fractional total: add pair by pair, as exchange does
                for x in b[rows[idx == j]].tolist():
                    net.bytes[lid] += x
    longest = 0.0
    for j in np.flatnonzero(used).tolist():
        k = inc.keys[j]
        sec = float(load[j]) / net.bandwidth[k]
        net.busy_s[k] += sec
        longest = max(longest, sec)
    end = start_s + latency + longest
    if net.spans is not None:
        net.spans.append(Span("all-to-all", what, start_s, end, (("bytes", float(sum(b[live].tolist()))),)))
    return end
