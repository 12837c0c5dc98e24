"""Layers of a step of several tokens worked out in one pass, without events.

:meth:`simulator.experts.ExpertWork._classify` sorts a layer's expert calls into ``block``
and ``jobs``, and :meth:`simulator.ahead.PlayAhead._played_ahead` books them. For the two
commonest layers of a batched decode step with nothing in flight or recorded, this module
does both in one pass with the same floats in the same order, without building the jobs:

- ``plain_local`` layers (no cache, every expert resident or local, none read from disk):
  the resident experts' seconds add up per device in first-use order and run at the
  router; each device running local experts gets the step's hidden states, runs them in
  one reservation and sends the results back (:meth:`OnePass._plain_layer`);
- ``lru_fetch`` layers (every expert fetched, through an LRU cache or none): the cache
  serves the step's accesses, hits run on the compute stream at the router and misses are
  copied one after another, each run once in (:meth:`OnePass._fetch_layer`).
"""

from __future__ import annotations

from .experts import RESIDENT

__all__ = ["OnePass"]


class OnePass:
    """A mixin of :class:`simulator.engine.Simulation` (it reads ``layers``, ``streams``,
    ``stream``, ``net``, ``compute_id``, ``bytes_moved``, ``K``, ``E``, ``trace``, the metrics counters,
    ``_activations`` and ``_fetch_entry``)."""

    _routed: bool | None = None  # whether the trace names routed experts only (ids < E); None: not looked yet

    def _plain_layer(self, l: int, n_rows: int, experts: list[int], tokens_of: list[int], router_at: float) -> float:
        """Layer ``l`` (``plain_local``) of a step of ``n_rows`` tokens: its end."""
        lay = self.layers[l]
        code, runner, cost, local_cost = lay.code, lay.runner, lay.cost, lay.local_cost
        if lay.plain_devices is not None:  # one device runs the resident experts, one the local ones
            res_dev, loc_dev = lay.plain_devices
            res_s = loc_s = 0.0  # the seconds block[dev] and local[dev][1] below add up, in the same order
            resident = local_n = 0  # every call serves one token or more
            for e, n in zip(experts, tokens_of):
                if code[e] == RESIDENT:
                    resident += n
                    res_s += cost[e][n]
                else:
                    local_n += n
                    loc_s += local_cost[e][n]
            self.expert_calls += len(experts)
            self.expert_accesses += resident + local_n
            self.resident_access[l] += resident
            self.local_access[l] += local_n
            end = self._reserve_blocks({res_dev: res_s}, router_at) if resident else router_at
            if local_n:
                back = self._run_local(loc_dev, loc_s, self._activations(loc_dev, min(n_rows, local_n)), router_at)
                if back > end:
                    end = back
            return end
        block: dict[str, float] = {}  # device -> seconds of resident experts
        local: dict[str, list] = {}  # device -> [tokens, seconds] of local experts
        tokens = resident = 0
        for e, n in zip(experts, tokens_of):
            tokens += n
            dev = runner[e]
            if code[e] == RESIDENT:
                resident += n
                block[dev] = block.get(dev, 0.0) + cost[e][n]
                continue
            work = local.get(dev)
            if work is None:
                work = local[dev] = [0, 0.0]
            work[0] += n
            work[1] += local_cost[e][n]
        self.expert_calls += len(experts)
        self.expert_accesses += tokens
        self.resident_access[l] += resident
        self.local_access[l] += tokens - resident
        end = self._reserve_blocks(block, router_at)
        for dev, (n, sec) in local.items():  # activations out, the kernels, results back
            back = self._run_local(dev, sec, self._activations(dev, min(n_rows, n)), router_at)
            if back > end:
                end = back
        return end

    def _fetch_layer(self, l: int, ids_l: list, experts: list[int], tokens_of: list[int], router_at: float) -> float:
        """Layer ``l`` (``lru_fetch``) of a step, ``ids_l`` its accesses (``[n][K]``, as
        :meth:`simulator.policies.LRUCache.serve` takes them): its end."""
        lay = self.layers[l]
        cache, cost = lay.cache, lay.cost
        if cache is not None:  # every expert of the layer is fetched: all routed ids are its cache's
            if self._routed is None:
                self._routed = bool(self.trace.expert_ids.max() < self.E)  # no zero-computation ids
            first_hit, hits, accesses = cache.serve(ids_l, None, None, self.K, self.E,
                                                    None if self._routed else lay.cached)
            self.cache_access[l] += accesses
            self.cache_hit[l] += hits
        else:
            first_hit = None
        table, fetch_entry = lay.fetch_one, self._fetch_entry
        hit_s = None  # the block's seconds on the compute stream
        misses, secs = [], []  # fetch entries, seconds of their kernels
        miss, sec = misses.append, secs.append
        tokens = 0
        for e, n in zip(experts, tokens_of):
            tokens += n
            if first_hit is not None and first_hit[e]:
                hit_s = cost[e][n] if hit_s is None else hit_s + cost[e][n]
            else:
                miss(table[e] or fetch_entry(lay, e))
                sec(cost[e][n])
        if self.steals and misses:  # the copies' host CPU work, on a CPU compute device (ExpertWork._steal)
            w = sum(self.miss_compute_s(entry[6]) for entry in misses)
            if w:
                hit_s = w if hit_s is None else hit_s + w
        self.expert_calls += len(experts)
        self.expert_accesses += tokens
        if cache is None:
            self.cache_access[l] += tokens  # no slots: every access misses
        compute = self.streams.get(self.compute_id) or self.stream(self.compute_id)
        return self._book_block(compute, router_at, hit_s, misses, secs)  # misses in first-use order
