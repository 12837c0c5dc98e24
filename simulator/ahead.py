"""A layer's expert work worked out ahead on a virtual clock, without SimPy events.

:meth:`simulator.experts.ExpertWork._classify` sorts a layer's work in a step into work
ready at the router (``block``: device -> seconds) and ``jobs`` that wait on something,
with ``flags`` saying which kinds of job are present (below). When nothing else is in
flight and the layer's own transfers cannot meet, each transfer runs alone (latency +
bytes / bottleneck), the copy engine runs the copies in order and the streams take the
kernels in the order the processes would issue them, so the layer's end is worked out
here with the same floats the processes would make (tests/test_simulator_shortcuts.py).

Speed: this is the simulator's inner loop (one call per MoE layer per step), so the
common cases book streams and links inline: a stream reservation is
:meth:`simulator.resources.Stream.reserve` and a link booking
:meth:`simulator.resources.Network.account`, written out with the same operations in the
same order.
"""

from __future__ import annotations

__all__ = ["AFTER", "COPIES", "DISK", "FETCH", "FILL", "LOCAL_JOB", "PlayAhead", "STREAM_JOB", "WAITING"]

# what a layer's jobs hold (the flags _classify returns beside block and jobs)
FETCH, FILL, LOCAL_JOB, AFTER, STREAM_JOB, DISK = 1, 2, 4, 8, 16, 32
COPIES = FETCH | FILL  # the copy engine's jobs
WAITING = AFTER | STREAM_JOB | DISK  # jobs that only SimPy's processes play out


class PlayAhead:
    """Layers worked out ahead, a mixin of :class:`simulator.experts.ExpertWork` (it reads
    ``net``, ``streams``, ``stream``, ``inflight``, ``spans``, ``events``, ``layers``,
    ``compute_id``, ``bytes_moved``, ``call_s``, ``log``, ``layer_wall_s``, ``K`` and the
    memo of ``_classify`` of the simulation)."""

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
        plan_miss = self.cfg.miss == "plan"
        for l in range(first, len(layers)):
            lay = layers[l]
            experts, tokens_of, gate = calls[l]
            known = recipe = None
            if lay.lru_fetch and plan_miss and len(experts) == K:  # serve, classify and play out in one
                free = compute.free_at_s  # the attention: compute.reserve(dense_s, ready_s=t)
                router_at = (free if free > t else t) + dense_s
                compute.free_at_s = router_at
                compute.busy_s += dense_s
                end = self._lru_fetches(l, lay, experts, router_at, compute)
                wall[l] += end - t
                t = end
                continue
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
                end = router_at
                for dev, sec in block.items():
                    st = streams.get(dev) or stream(dev)
                    free = st.free_at_s
                    done = (free if free > router_at else router_at) + sec
                    st.free_at_s = done
                    st.busy_s += sec
                    if done > end:
                        end = done
            else:
                end = ahead(l, router_at, block, jobs, flags)
                if end is None:
                    return t, l, (block, jobs, flags, router_at)
            wall[l] += end - t
            t = end
        return t, len(layers), None

    def _lru_fetches(self, l: int, lay, experts: list[int], router_at: float, compute) -> float:
        """Layer ``l`` of a one-token step whose experts are all fetched through an LRU cache
        or without one (``lay.lru_fetch``), its K distinct experts routed, nothing in flight
        or recorded: ``LRUCache.serve``, ``_classify_one`` and ``_played_ahead`` in one loop,
        with the same floats in the same order. The hits run on the compute stream at the
        router (their seconds added up in rank order), the misses are copied one after
        another and each runs once in. Returns the layer's end."""
        cache, table = lay.cache, lay.fetch_one
        items, slots = (cache.items, cache.slots) if cache is not None else ((), 0)  # no cache: all miss
        hits = 0
        hit_s = None  # the block's seconds on the compute stream
        misses = []
        for e in experts:
            entry = table[e] or self._fetch_entry(lay, e)
            if e in items:
                items.move_to_end(e)
                hits += 1
                hit_s = entry[0] if hit_s is None else hit_s + entry[0]
                continue
            if slots:
                if len(items) >= slots:
                    items.popitem(False)  # the least recently used
                items[e] = None
            misses.append((entry, entry[0]))  # copied in rank order, each its one-token kernel
        K = len(experts)
        self.cache_access[l] += K
        if hits:
            self.cache_hit[l] += hits
        self.expert_calls += K
        self.expert_accesses += K
        return self._book_block(compute, router_at, hit_s, misses)

    def _reserve_blocks(self, block: dict[str, float], router_at: float) -> float:
        """Reserve each device's ``block`` seconds from the router on (``Stream.reserve(sec,
        ready_s=router_at)``); returns when the last ends (the router, if none)."""
        streams, stream = self.streams, self.stream
        end = router_at
        for dev, sec in block.items():
            st = streams.get(dev) or stream(dev)
            free = st.free_at_s
            done = (free if free > router_at else router_at) + sec
            st.free_at_s = done
            st.busy_s += sec
            if done > end:
                end = done
        return end

    def _run_local(self, dev: str, sec: float, acts: tuple, router_at: float) -> float:
        """Experts run where they live on ``dev`` for ``sec`` seconds: the activations out, the
        kernels once they are in, the results back (``acts``: :meth:`_activations`), each
        transfer accounted as ``Network.account`` would; returns when the results are back."""
        p_out, p_back, act, d_out, d_back = acts
        ready = router_at + d_out
        st = self.streams.get(dev) or self.stream(dev)
        free = st.free_at_s
        done = (free if free > ready else ready) + sec
        st.free_at_s = done
        st.busy_s += sec
        back = done + d_back
        if act > 0:  # Network.account of the activations out, then of the results back
            link_bytes, link_busy = self.net.bytes, self.net.busy_s
            if p_out.keys:
                for lid in p_out.link_ids:
                    link_bytes[lid] += act
                x = ready - router_at - p_out.latency_s
                for k in p_out.keys:
                    link_busy[k] += x
            if p_back.keys:
                for lid in p_back.link_ids:
                    link_bytes[lid] += act
                x = back - done - p_back.latency_s
                for k in p_back.keys:
                    link_busy[k] += x
        return back

    def _book_block(self, compute, router_at: float, hit_s: float | None, misses: list) -> float:
        """Book a layer's block of cache hits (``hit_s`` seconds on the compute stream from the
        router) and its misses (``(fetch entry, kernel seconds)`` in copy order: copied one after
        another by the copy engine, each run once in), with the same floats in the same order as
        the processes; returns the layer's end."""
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
            for (_one_s, dur, n_bytes, tier, link_ids, keys, latency_s), sec in misses:
                arrived = engine_free + dur
                if link_ids is not None:  # Network.account(path, n_bytes, engine_free, arrived)
                    for lid in link_ids:
                        link_bytes[lid] += n_bytes
                    x = arrived - engine_free - latency_s
                    for k in keys:
                        link_busy[k] += x
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
        compute.free_at_s, compute.busy_s = free, busy
        return end

    def _fetch_entry(self, lay, e: int) -> tuple:
        """Expert ``e``'s one-token fetch in ``lay`` for :meth:`_lru_fetches`: ``(seconds of its
        kernel, seconds of the copy alone, bytes, source tier, link ids, shared bandwidths,
        latency)``, the link ids None when the copy books no link; made once."""
        copy = lay.copy_info[e]
        if copy is None:
            copy = lay.copy_info[e] = self._copy(lay.home[e], lay.copy_format[e])
        path, n_bytes, dur, tier = copy
        booked = n_bytes > 0 and path.keys
        entry = lay.fetch_one[e] = (lay.cost[e][1], dur, n_bytes, tier, path.link_ids if booked else None,
                                    path.keys, path.latency_s)
        return entry

    def _played_ahead(self, l: int, router_at: float, block: dict[str, float], jobs: list, flags: int) -> float | None:
        """The layer's end time worked out without events, or None when that is not exact.

        Exact when nothing else is in flight (no transfer, no copy-engine user) and the
        layer's own transfers never share a link direction or memory port at the same time:
        then each transfer runs alone (latency + bytes / bottleneck), the copy engine runs
        the fetches in order, and streams take kernels in the order the events would issue
        them. Otherwise the caller plays the layer out with processes.
        """
        if flags & WAITING or self.net.busy or \
                (self.inflight and any(not ev.triggered for ev in self.inflight.values())):
            return None
        if self.spans is not None or self.events is not None:
            return self._copies_ahead(l, router_at, block, jobs, flags)
        if flags & LOCAL_JOB and flags & COPIES:
            return self._tentative_ahead(router_at, block, jobs)
        # nothing recorded, and either no copies (activations, both directions, never share a
        # bandwidth with each other) or no local experts (copies are serial on the copy
        # engine): book as we go
        streams, stream, net = self.streams, self.stream, self.net
        link_bytes, link_busy = net.bytes, net.busy_s
        end = self._reserve_blocks(block, router_at)
        if not flags & COPIES:
            for _, dev, _calls, _tokens, sec, acts in jobs:  # one reservation: the same end as one per call
                back = self._run_local(dev, sec, acts, router_at)
                if back > end:
                    end = back
            return end
        engine_free = router_at  # the copy engine takes fetches and fills in job order
        compute = streams.get(self.compute_id) or stream(self.compute_id)
        free, busy = compute.free_at_s, compute.busy_s  # the compute stream's, kept here meanwhile
        bytes_moved = self.bytes_moved
        for job in jobs:
            if job[0] == "fetch":
                path, n_bytes, dur, tier = job[4]
            else:  # "fill" (no local jobs here)
                path, n_bytes, dur, tier = job[3]
            arrived = engine_free + dur
            if n_bytes > 0 and path.keys:  # Network.account(path, n_bytes, engine_free, arrived)
                for lid in path.link_ids:
                    link_bytes[lid] += n_bytes
                x = arrived - engine_free - path.latency_s
                for k in path.keys:
                    link_busy[k] += x
            bytes_moved[tier] += n_bytes
            engine_free = arrived
            if job[0] == "fetch":  # its kernel once the weights are in: Stream.reserve(sec, ready_s=arrived)
                sec = job[5]
                if free > arrived:
                    arrived = free
                free = arrived = arrived + sec
                busy += sec
            if arrived > end:
                end = arrived
        compute.free_at_s, compute.busy_s = free, busy
        return end

    def _tentative_ahead(self, router_at: float, block: dict[str, float], jobs: list) -> float | None:
        """:meth:`_copies_ahead` of a layer that copies experts and runs local ones, nothing
        recorded: the same reservations worked out on tentative stream clocks (``[free, busy]``
        per stream), kept only when the layer's transfers do not meet."""
        streams, stream = self.streams, self.stream
        tent: dict = {}  # Stream -> [free_at_s, busy_s] while tentative
        end = router_at
        for dev, sec in block.items():  # Stream.reserve(sec, ready_s=router_at)
            st = streams.get(dev) or stream(dev)
            clock = tent.get(st)
            if clock is None:
                clock = tent[st] = [st.free_at_s, st.busy_s]
            free = clock[0]
            done = (free if free > router_at else router_at) + sec
            clock[0] = done
            clock[1] += sec
            if done > end:
                end = done
        compute = streams.get(self.compute_id) or stream(self.compute_id)
        clock = tent.get(compute)
        if clock is None:
            clock = tent[compute] = [compute.free_at_s, compute.busy_s]
        moves: list[tuple] = []  # (path, bytes, start, end, source tier or None for activations)
        chained = True  # every copy takes a positive time: simulator.resources.Network.overlapping
        engine_free = router_at  # the copy engine takes fetches and fills in job order
        for job in jobs:
            kind = job[0]
            if kind == "fetch":
                path, n_bytes, dur, tier = job[4]
            elif kind == "fill":
                path, n_bytes, dur, tier = job[3]
            else:
                continue
            arrived = engine_free + dur
            chained = chained and arrived > engine_free
            moves.append((path, n_bytes, engine_free, arrived, tier))
            engine_free = arrived
            if kind == "fetch":  # its kernel once the weights are in: Stream.reserve(sec, ready_s=arrived)
                sec = job[5]
                free = clock[0]
                arrived = (free if free > engine_free else engine_free) + sec
                clock[0] = arrived
                clock[1] += sec
            if arrived > end:
                end = arrived
        n_copies = len(moves)
        for job in jobs:
            if job[0] != "local":
                continue
            _, dev, _calls, _tokens, sec, (p_out, p_back, act, d_out, d_back) = job
            ready = router_at + d_out
            moves.append((p_out, act, router_at, ready, None))
            st = streams.get(dev) or stream(dev)
            local = tent.get(st)
            if local is None:
                local = tent[st] = [st.free_at_s, st.busy_s]
            free = local[0]
            done = (free if free > ready else ready) + sec  # one reservation: the same end as one per call
            local[0] = done
            local[1] += sec
            back = done + d_back
            moves.append((p_back, act, done, back, None))
            if back > end:
                end = back
        if _meeting(moves, n_copies) if chained else self.net.overlapping(moves):
            return None
        for st, (free, busy) in tent.items():
            st.free_at_s, st.busy_s = free, busy
        link_bytes, link_busy, bytes_moved = self.net.bytes, self.net.busy_s, self.bytes_moved
        for path, n_bytes, start, stop, tier in moves:  # Network.account(path, n_bytes, start, stop)
            if n_bytes > 0 and path.keys:
                for lid in path.link_ids:
                    link_bytes[lid] += n_bytes
                x = stop - start - path.latency_s
                for k in path.keys:
                    link_busy[k] += x
            if tier is not None:
                bytes_moved[tier] += n_bytes
        return end

    def _copies_ahead(self, l: int, router_at: float, block: dict[str, float], jobs: list, flags: int) -> float | None:
        """:meth:`_played_ahead` of a layer that copies experts (or records its kernels and transfers)."""
        # fetches are serial on the copy engine; only results coming back can meet a fetch
        check = flags & LOCAL_JOB and flags & COPIES
        lay = self.layers[l]
        recording, labels = self.events is not None, self.spans is not None
        if check:
            saved = {name: (st.free_at_s, st.busy_s) for name, st in self.streams.items()}
            n_spans = len(self.spans) if labels else 0
            n_events = len(self.events) if recording else 0
        chained = True  # every copy takes a positive time: simulator.resources.Network.overlapping
        moves: list[tuple] = []  # (path, bytes, start, end, name, source tier or None for activations)
        end = router_at
        stream = self.stream
        for dev, sec in block.items():
            done = stream(dev).reserve(sec, labels and f"experts L{l}", ready_s=router_at)
            if done > end:
                end = done
        if flags & COPIES:
            engine_free = router_at  # the copy engine takes fetches and fills in job order
            compute = stream(self.compute_id)
            account, bytes_moved = self.net.account, self.bytes_moved
            for job in jobs:
                kind = job[0]
                if kind == "fetch":
                    _, e, _n, fmt, (path, n_bytes, dur, tier), sec = job
                elif kind == "fill":
                    _, e, fmt, (path, n_bytes, dur, tier) = job
                else:
                    continue
                if recording:
                    self.log("expert_fetch", f"L{l}E{e} start", engine_free)
                arrived = engine_free + dur
                if check or labels:  # booked at the end: once the links are known to be the layer's own
                    chained = chained and arrived > engine_free
                    moves.append((path, n_bytes, engine_free, arrived, labels and f"L{l}E{e} {fmt}", tier))
                else:
                    account(path, n_bytes, engine_free, arrived)
                    bytes_moved[tier] += n_bytes
                engine_free = arrived
                if recording:
                    self.log("expert_fetch", f"L{l}E{e} arrived", engine_free)
                if kind == "fetch":
                    arrived = compute.reserve(sec, labels and f"expert L{l}E{e}", ready_s=engine_free)
                if arrived > end:
                    end = arrived
        n_copies = len(moves) if chained else 0  # back to back on the copy engine
        for job in jobs if flags & LOCAL_JOB else ():
            if job[0] != "local":
                continue
            _, dev, calls, _tokens, sec, (p_out, p_back, act, d_out, d_back) = job
            ready = router_at + d_out
            moves.append((p_out, act, router_at, ready, labels and f"L{l} activations", None))
            st = stream(dev)
            if not labels:  # one reservation: the same end, fewer steps
                ready = st.reserve(sec, ready_s=ready)
            for e, n in calls if labels else ():
                ready = st.reserve(self.call_s(dev, lay.fmt[e], n), f"expert L{l}E{e}", ready_s=ready)
            back = ready + d_back
            moves.append((p_back, act, ready, back, labels and f"L{l} results", None))
            if back > end:
                end = back
        if check and self.net.overlapping(moves, chained=n_copies):
            for name, st in self.streams.items():  # undo the tentative reservations
                st.free_at_s, st.busy_s = saved.get(name, (0.0, 0.0))
            if labels:
                del self.spans[n_spans:]
            if recording:
                del self.events[n_events:]
            return None
        account, bytes_moved = self.net.account, self.bytes_moved
        for path, n_bytes, start, stop, what, tier in moves:
            account(path, n_bytes, start, stop, what)
            if tier is not None:
                bytes_moved[tier] += n_bytes
        return end



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


def _meeting(moves: list[tuple], n_copies: int) -> bool:
    """:meth:`simulator.resources.Network.overlapping` of ``moves`` whose first ``n_copies``
    run back to back, each for a positive time (``(path, bytes, start, end, ...)``): whether
    a later move meets an earlier one or a copy on a shared bandwidth."""
    chain = moves[:n_copies]
    for i in range(n_copies, len(moves)):
        p, _, start, end = moves[i][:4]
        for q, _, s, e, *_ in moves[n_copies:i]:
            if start < e and s < end and _shares(p, q):
                return True
        for q, _, s, e, *_ in chain:  # in time order
            if s >= end:
                break
            if start < e and _shares(p, q):
                return True
    return False


def _shares(p, q) -> bool:
    """Whether paths ``p`` and ``q`` cross a bandwidth in common (kept on ``p``)."""
    known = p.shares.get(q)
    if known is None:
        known = p.shares[q] = not p.key_set.isdisjoint(q.keys)
    return known
