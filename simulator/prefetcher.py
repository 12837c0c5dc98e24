"""The prefetcher actor: after layer l's router, fetch its guesses for layer l+1.

The guesses come from the prefetch policy (:data:`simulator.policies.PREFETCH`); they go
into layer l+1's cache over the copy engine, after layer l's own fetches, so they overlap
layer l's compute.

The ``transition`` predictor names every expert that often followed the current ones,
which can be more than the link carries while layer l computes; fetches that do not fit
would delay the demand fetches of layer l+1 and later layers. Its guesses are therefore
capped by the link's idle time during layer l (:meth:`Prefetcher.link_idle_s`), most
probable first. ``next-layer`` guesses at most the step's own experts, and ``oracle`` is
an upper bound, so they are not capped.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LINK_CAPPED", "Prefetcher"]

LINK_CAPPED = ("transition",)  # prefetch policies whose guesses the link's idle time caps


class Prefetcher:
    """The prefetcher of :class:`simulator.engine.Simulation` (a mixin: it reads ``layers``,
    ``prefetch``, ``accuracy``, ``cfg``, ``rng``, ``E``, ``K``, ``_transitions``, ``inflight``,
    ``net``, ``compute_id``, ``compute_mem``, ``call_s``, ``expert_bytes``, ``expert_fetch``,
    ``steals``, ``miss_compute_s``, ``stream`` and ``log`` from the simulation).

    Each prefetch copy's host CPU work (the copy worker's read, as a demand miss's:
    :meth:`simulator.experts.ExpertWork._steal`) is queued on the compute device's stream when
    it starts, where the compute device is the host CPU (``steals``): a copy costs the same
    CPU whether a miss or a guess asked for it."""

    def prefetcher(self, l: int, rows: np.ndarray, step_ids: np.ndarray, current: np.ndarray,
                   idle_s: float | None = None) -> None:
        """Guesses layer ``l``'s experts for this step and starts fetching them into its cache.

        ``idle_s``: seconds of link time the fetches may take (``None``: no cap); guesses
        are issued in the policy's order, most probable first, while they fit.
        """
        lay = self.layers[l]
        if lay.cache is None:
            return
        true_next = list(dict.fromkeys(int(e) for e in step_ids[:, l, :].ravel() if e < self.E))
        ctx = {"accuracy": self.accuracy, "num_experts": self.E, "current": [int(e) for e in current],
               "top_p": self.cfg.transition_top_p,
               "transitions": None if self._transitions is None else self._transitions[l - 1]}
        wanted = [e for e in self.prefetch(true_next, ctx, self.rng) if lay.site[e] in ("fetch", "hybrid")]
        for e in wanted[:lay.cache.slots]:  # more than the cache holds would evict its own guesses
            if e in lay.cache:
                continue
            fmt = lay.cache_format or lay.fmt[e]
            if idle_s is not None:
                idle_s -= self.net.transfer_s(lay.home[e], self.compute_mem, self.expert_bytes(fmt))
                if idle_s < 0:
                    break
            lay.cache.insert(e, int(rows[0]) * self.K)
            lay.copy_held.discard(e)  # a prefetch brings the full weights (profiles.miss_copy)
            self.log("prefetcher", f"L{l}E{e}")
            self.inflight[(l, e)] = self.env.process(self.expert_fetch(l, e, fmt))
            if self.steals:  # the copy worker's host CPU work, taken from a CPU compute device's cores
                self.stream(self.compute_id).reserve(self.miss_compute_s(fmt), "prefetch copy")

    def link_idle_s(self, l: int, block: dict[str, float], jobs: list) -> float:
        """Seconds the copy engine is idle while layer ``l`` computes, estimated from the
        performance model: the longest device's expert work in the layer (``block`` and
        ``jobs`` of :meth:`simulator.experts.ExpertWork._classify`) less the link time of
        the layer's own expert copies (demand fetches, cache fills, streamed experts).
        Activations and other layers' transfers still in flight are left out."""
        lay = self.layers[l]
        busy = dict(block)  # device -> seconds of expert work in this layer
        link_s = 0.0

        def copy_s(e: int, fmt: str) -> float:
            return self.net.transfer_s(lay.home[e], self.compute_mem, self.expert_bytes(fmt))

        for job in jobs:
            kind = job[0]
            if kind == "fetch":
                _, e, n, fmt, *_ = job
                link_s += copy_s(e, fmt)
                busy[self.compute_id] = busy.get(self.compute_id, 0.0) + self.call_s(self.compute_id, fmt, n, True)
            elif kind == "after":
                _, _ev, e, n, fmt = job
                busy[self.compute_id] = busy.get(self.compute_id, 0.0) + self.call_s(self.compute_id, fmt, n, True)
            elif kind == "fill":
                link_s += copy_s(job[1], lay.cache_format or lay.fmt[job[1]])
            elif kind == "local":
                _, dev, _calls, _tokens, seconds, _moves = job
                busy[dev] = busy.get(dev, 0.0) + seconds
            elif kind == "stream":
                link_s += sum(copy_s(e, lay.fmt[e]) for e in lay.streamed)
        return max(max(busy.values(), default=0.0) - link_s, 0.0)
