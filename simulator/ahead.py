"""A layer's expert work worked out ahead on a virtual clock, without SimPy events.

:meth:`simulator.experts.ExpertWork._classify` sorts a layer's work in a step into work
ready at the router (``block``: device -> seconds) and ``jobs`` that wait on something,
with ``flags`` saying which kinds of job are present (below). When nothing else is in
flight and the layer's own transfers cannot meet, each transfer runs alone (latency +
bytes / bottleneck), the copy engine runs the copies in order and the streams take the
kernels in the order the processes would issue them, so the layer's end is worked out
here with the same floats the processes would make (tests/test_simulator_shortcuts.py).
Whole one-token steps worked out in one loop, and fetched experts booked in one pass,
are in :mod:`simulator.step_ahead`.

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
