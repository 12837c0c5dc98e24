"""One-token steps worked out ahead in one loop, and fetched experts booked in one pass.

:meth:`StepAhead._step_ahead` runs the layers of a one-token step on one GPU (no
prefetching, nothing recorded, nothing in flight) one after another on a virtual clock, for
as long as each layer can be worked out without events (:mod:`simulator.ahead`); a layer
whose experts are all fetched through an LRU cache (or none) is served, classified and
booked in one loop (:meth:`StepAhead._lru_fetches`), and a cache-less layer's memoised work
is booked from a recipe made once. :meth:`StepAhead._book_block` (also used by
:mod:`simulator.one_pass`) books a block of cache hits and the misses' copies and kernels
with the same floats in the same order as the processes would.
"""

from __future__ import annotations

from operator import itemgetter

from .ahead import COPIES, WAITING

__all__ = ["StepAhead"]


class StepAhead:
    """One-token steps worked out ahead, a mixin of :class:`simulator.experts.ExpertWork` (it
    reads ``layers``, ``streams``, ``stream``, ``net``, ``compute_id``, ``bytes_moved``, ``cfg``,
    ``K``, ``layer_wall_s``, the cache counters, the memo of ``_classify`` and calls
    ``_played_ahead`` and ``_copy`` of the simulation)."""

    def _step_ahead(self, rows, calls: list, ids, gates, t: float, dense_s: float, first: int = 0):
        """The layers of a one-token step on one GPU without prefetching or recording, worked
        out one after another from layer ``first``, in one loop, for as long as each can be
        (:meth:`_played_ahead`); the caller makes sure nothing is in flight.

        A cache-less layer's memoised work (``_classify``) is booked from a recipe made once
        per memo entry: its kernels and activation round trips in the order
        :meth:`_played_ahead` books them.

        Returns:
            ``(t, l, pending)``: the step's virtual clock after the layers done, the first
            layer not done (``L`` when all are) and, when that layer was classified and its
            attention booked, ``(block, jobs, flags, router_at)`` to go on with (else None).
        """
        layers, memo, K = self.layers, self._plain_memo, self.K
        streams, stream, wall = self.streams, self.stream, self.layer_wall_s
        compute = streams.get(self.compute_id) or stream(self.compute_id)
        classify, ahead = self._classify, self._played_ahead
        link_bytes, link_busy = self.net.bytes, self.net.busy_s
        plan_miss = not self.reads_gates
        due = [None, [], []]  # the misses' link bookings not yet added: (path, bytes, seconds), see _book_block
        for l in range(first, len(layers)):
            lay = layers[l]
            experts, tokens_of, gate = calls[l]
            known = recipe = None
            if lay.lru_fetch and plan_miss and len(experts) == K:  # serve, classify and play out in one
                free = compute.free_at_s  # the attention: compute.reserve(dense_s, ready_s=t)
                router_at = (free if free > t else t) + dense_s
                compute.free_at_s = router_at
                compute.busy_s += dense_s
                end = self._lru_fetches(l, lay, experts, router_at, compute, due)
                wall[l] += end - t
                t = end
                continue
            if due[0] is not None:  # the links of the layers before, before anything else books them
                _account(link_bytes, link_busy, *due)
                due = [None, [], []]
            if lay.cache is not None:  # K experts: the token's own ids at this layer, in rank order
                refs = ([experts] if len(experts) == K else ids[:, l, :].tolist(),
                        None if gates is None else gates[:, l, :].tolist())
                block, jobs, flags = classify(l, rows, experts, tokens_of, gate, refs)
            else:
                if memo is not None:  # _classify's memo, looked up as it does
                    known = memo[l].get(tuple(experts) if len(experts) == K else (tuple(experts), tuple(tokens_of)))
                if known is not None:
                    self._memo_lookups += 1
                    known[-1] += 1
                    block, jobs, flags, recipe = known[0], known[1], known[2], known[3]
                else:
                    block, jobs, flags = classify(l, rows, experts, tokens_of, gate, None)
                    memo = self._plain_memo  # classify may drop it
            free = compute.free_at_s  # the attention: compute.reserve(dense_s, ready_s=t)
            router_at = (free if free > t else t) + dense_s
            compute.free_at_s = router_at
            compute.busy_s += dense_s
            if recipe is None and known is not None and not flags & (WAITING | COPIES):
                recipe = known[3] = _recipe(block, jobs, stream)
            if recipe is not None:
                end = router_at
                for st, sec in recipe[0]:  # Stream.reserve(sec, ready_s=router_at)
                    free = st.free_at_s
                    done = (free if free > router_at else router_at) + sec
                    st.free_at_s = done
                    st.busy_s += sec
                    if done > end:
                        end = done
                for st, sec, d_out, d_back, p_out, p_back, act in recipe[1]:
                    ready = router_at + d_out
                    free = st.free_at_s
                    done = (free if free > ready else ready) + sec
                    st.free_at_s = done
                    st.busy_s += sec
                    back = done + d_back
                    if p_out is not None:  # Network.account(p_out, act, router_at, ready), then back
                        for lid in p_out.link_ids:
                            link_bytes[lid] += act
                        x = ready - router_at - p_out.latency_s
                        for k in p_out.keys:
                            link_busy[k] += x
                    if p_back is not None:
                        for lid in p_back.link_ids:
                            link_bytes[lid] += act
                        x = back - done - p_back.latency_s
                        for k in p_back.keys:
                            link_busy[k] += x
                    if back > end:
                        end = back
            elif not jobs:
                end = self._reserve_blocks(block, router_at)
            else:
                end = ahead(l, router_at, block, jobs, flags)
                if end is None:
                    return t, l, (block, jobs, flags, router_at)
            wall[l] += end - t
            t = end
        if due[0] is not None:
            _account(link_bytes, link_busy, *due)
        return t, len(layers), None

    def _lru_fetches(self, l: int, lay, experts: list[int], router_at: float, compute, due: list) -> float:
        """Layer ``l`` of a one-token step whose experts are all fetched through an LRU cache
        or without one (``lay.lru_fetch``), its K distinct experts routed, nothing in flight
        or recorded: ``LRUCache.serve``, ``_classify_one`` and ``_played_ahead`` in one loop,
        with the same floats in the same order. The hits run on the compute stream at the
        router (their seconds added up in rank order), the misses are copied one after
        another and each runs once in (``due``: see :meth:`_book_block`). Returns the layer's end."""
        cache, table = lay.cache, lay.fetch_one
        hits = 0
        hit_s = None  # the block's seconds on the compute stream
        if cache is None:  # every expert misses
            misses = [table[e] or self._fetch_entry(lay, e) for e in experts]
        else:
            items, slots = cache.items, cache.slots
            recent, evict = items.move_to_end, items.popitem
            full = slots and len(items) >= slots  # a full cache stays full: each miss evicts one, loads one
            misses = []
            for e in experts:
                entry = table[e] or self._fetch_entry(lay, e)
                if e in items:
                    recent(e)
                    hits += 1
                    hit_s = entry[0] if hit_s is None else hit_s + entry[0]
                    continue
                if full:
                    evict(False)  # the least recently used
                    items[e] = None
                elif slots:
                    items[e] = None
                    full = len(items) >= slots
                misses.append(entry)  # copied in rank order, each its one-token kernel
        if self.steals and misses:  # the copies' host CPU work, on a CPU compute device (ExpertWork._steal)
            w = sum(self.miss_compute_s(entry[6]) for entry in misses)
            if w:
                hit_s = w if hit_s is None else hit_s + w
        K = len(experts)
        self.cache_access[l] += K
        if hits:
            self.cache_hit[l] += hits
        self.expert_calls += K
        self.expert_accesses += K
        return self._book_block(compute, router_at, hit_s, misses, None, due)

    def _book_block(self, compute, router_at: float, hit_s: float | None, misses: list, secs: list | None = None,
                    due: list | None = None) -> float:
        """Book a layer's block of cache hits (``hit_s`` seconds on the compute stream from the
        router) and its misses (entries of :meth:`_fetch_entry` in copy order, ``secs`` their
        kernels' seconds, default each entry's one-token kernel: copied one after another by
        the copy engine, each run once in), with the same floats in the same order as the
        processes; returns the layer's end.

        A run of misses copied over one path books the path's links after the run
        (:func:`_account`): each link's bytes and each shared bandwidth's busy seconds are
        added up in copy order, from the value it had, as one ``+=`` per copy adds them. With
        ``due`` (``[path, bytes, seconds]`` of a run booked before and not yet added), the run
        goes on from there and is left in ``due``, for the caller to add before anything else
        books a link."""
        end = router_at
        free, busy = compute.free_at_s, compute.busy_s
        if hit_s is not None:  # Stream.reserve(hit_s, ready_s=router_at)
            end = (free if free > router_at else router_at) + hit_s
            free = end
            busy += hit_s
        if misses:
            link_bytes, link_busy, bytes_moved = self.net.bytes, self.net.busy_s, self.bytes_moved
            engine_free = router_at
            run_tier, moved = None, 0.0  # bytes_moved[run_tier], added up in a local meanwhile
            run_path, ns, xs = (None, [], []) if due is None else due  # the run's path, its copies' bytes, busy seconds
            add_n, add_x = ns.append, xs.append
            for (_, dur, n_bytes, tier, path, latency_s, _fmt), sec in zip(misses, _kernel_s(misses) if secs is None
                                                                       else secs):
                arrived = engine_free + dur
                if path is not None:  # Network.account(path, n_bytes, engine_free, arrived), at the run's end
                    if path is not run_path:
                        if run_path is not None:
                            _account(link_bytes, link_busy, run_path, ns, xs)
                            ns, xs = [], []
                            add_n, add_x = ns.append, xs.append
                        run_path = path
                    add_x(arrived - engine_free - latency_s)
                    add_n(n_bytes)
                if tier != run_tier:  # bytes_moved[tier] += n_bytes
                    if run_tier is not None:
                        bytes_moved[run_tier] = moved
                    run_tier, moved = tier, bytes_moved[tier]
                moved += n_bytes
                engine_free = arrived
                if free > arrived:  # its kernel once the weights are in: Stream.reserve(sec, ready_s=arrived)
                    arrived = free
                free = arrived = arrived + sec
                busy += sec
                if arrived > end:
                    end = arrived
            bytes_moved[run_tier] = moved
            if due is not None:
                due[0], due[1], due[2] = run_path, ns, xs
            elif run_path is not None:
                _account(link_bytes, link_busy, run_path, ns, xs)
        compute.free_at_s, compute.busy_s = free, busy
        return end

    def _fetch_entry(self, lay, e: int) -> tuple:
        """Expert ``e``'s one-token fetch in ``lay`` for :meth:`_book_block`: ``(seconds of its
        kernel, seconds of the copy alone, bytes, source tier, path, latency, copy format)``, the path None
        when the copy books no link. Made for the whole layer at its first miss: experts with
        the same home, copy format and price table share one entry."""
        table, made = lay.fetch_one, {}
        for x, key in enumerate(zip(lay.home, lay.copy_format, map(id, lay.cost))):
            entry = made.get(key)
            if entry is None:
                path, n_bytes, dur, tier = self._copy(key[0], key[1])
                booked = n_bytes > 0 and path.keys
                entry = made[key] = (lay.cost[x][1], dur, n_bytes, tier, path if booked else None, path.latency_s,
                                     key[1])
            table[x] = entry
        return table[e]


def _kernel_s(entries: list[tuple]):
    """The one-token kernel seconds of :meth:`StepAhead._fetch_entry` entries, in order."""
    return map(itemgetter(0), entries)


def _account(link_bytes: dict, link_busy: dict, path, ns: list[float], xs: list[float]) -> None:
    """``Network.account`` of a run of copies over ``path``, ``ns`` their bytes and ``xs`` their
    busy seconds in copy order: each link's bytes and each bandwidth's seconds added up from
    its own value in that order, as one ``+=`` per copy does."""
    if not path.crosses_once:
        for n_bytes, x in zip(ns, xs):  # a link or bandwidth crossed twice: each copy in turn
            for lid in path.link_ids:
                link_bytes[lid] += n_bytes
            for k in path.keys:
                link_busy[k] += x
        return
    for lid in path.link_ids:
        v = link_bytes[lid]
        for n_bytes in ns:
            v += n_bytes
        link_bytes[lid] = v
    for k in path.keys:
        v = link_busy[k]
        for x in xs:
            v += x
        link_busy[k] = v


def _recipe(block: dict[str, float], jobs: list, stream) -> tuple:
    """A memoised layer's bookings with its streams looked up (``stream``: name -> Stream):
    ``((stream, seconds) per device ready at the router, (stream, seconds, seconds out,
    seconds back, path out, path back, bytes) per device running local experts)``, a path
    None when nothing crosses it."""
    ready = tuple((stream(dev), sec) for dev, sec in block.items())
    local = tuple((stream(dev), sec, d_out, d_back, p_out if act > 0 and p_out.keys else None,
                   p_back if act > 0 and p_back.keys else None, act)
                  for _, dev, _calls, _tokens, sec, (p_out, p_back, act, d_out, d_back) in jobs)
    return ready, local
