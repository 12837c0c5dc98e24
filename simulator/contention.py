"""A layer whose transfers share links, worked out without SimPy events.

When a layer's own transfers meet on a link direction or memory port (a fetch from host
memory and the results of the CPU's experts coming back over the same PCIe direction),
:meth:`simulator.experts.ExpertWork._played_ahead` cannot price each transfer alone, and
:meth:`simulator.experts.ExpertWork._start` plays the layer out with processes: one per
fetch (copy engine, latency, flow, kernel), one per device running local experts
(activations out, kernels, results back), every flow change a wake-up event. That costs
tens of events per layer.

:meth:`Contention._worked_out` replays the same story with a small event loop of its own:
the same copy-engine order, the same stream reservations at the same times, and the
network's processor sharing through the same methods (:meth:`simulator.resources.Network.
open_flow`, ``reflow``, ``close_flows``) on the same clock values, so every float comes out
as the processes would make it. Where SimPy's ordering of simultaneous events could change
a result (a transfer starting at the very instant another one finishes), or the step's
clock could not land exactly on the layer's end, it gives up and the processes run.
"""

from __future__ import annotations

import heapq
import math

from .ahead import WAITING

__all__ = ["Contention"]


class _GiveUp(Exception):
    """The replay cannot promise the processes' results; play the layer out with them."""


class Contention:
    """The event-free replay of :class:`simulator.engine.Simulation` (a mixin: it reads
    ``env``, ``net``, ``layers``, ``streams``, ``stream``, ``call_s``, ``compute_id``,
    ``_copy``, ``inflight``, ``events``, ``spans`` and ``bytes_moved``)."""

    def _worked_out(self, l: int, block: dict[str, float], jobs: list, flags: int) -> float | None:
        """When layer ``l``'s work, started now (at its router), ends, as :meth:`_start`'s
        processes would play it out; its reservations and transfers are booked. None when
        that cannot be promised: nothing is booked then.

        Only layers of fetches, cache fills and local experts not read from disk, with
        nothing else in flight and nothing recorded, are replayed.
        """
        net = self.net
        if flags & WAITING or self.events is not None or self.spans is not None or net.busy or \
                (self.inflight and any(not ev.triggered for ev in self.inflight.values())):
            return None
        saved = ({name: (st.free_at_s, st.busy_s) for name, st in self.streams.items()}, dict(net.busy_s),
                 dict(net.bytes), dict(net.active), net._last_s, net._version, dict(self.bytes_moved))
        try:
            return self._replay(l, block, jobs)
        except _GiveUp:
            streams, busy, link_bytes, active, net._last_s, net._version, moved = saved
            for name in list(self.streams):
                if name in streams:
                    self.streams[name].free_at_s, self.streams[name].busy_s = streams[name]
                else:
                    del self.streams[name]  # made by the replay: the processes make it again
            for live, old in ((net.busy_s, busy), (net.bytes, link_bytes), (net.active, active),
                              (self.bytes_moved, moved)):
                live.clear()
                live.update(old)
            net._flows.clear()
            return None

    def _replay(self, l: int, block: dict[str, float], jobs: list) -> float:
        """The layer's processes on a clock of its own. The network's processor sharing is
        :meth:`simulator.resources.Network.open_flow`, ``reflow``, ``close_flows`` and
        ``_advance`` written out over plain lists (a flow: ``[keys, bytes left, rate, then]``),
        the same floats in the same order; ``then`` says what the arrival starts:
        ``(COPY, i)`` the copy engine's next copy, ``(COMPUTED, job)`` a device's local
        experts, ``(DONE,)`` the end of a wait."""
        net, lay, now = self.net, self.layers[l], self.env.now
        bandwidth, active, busy_s, link_bytes = net.bandwidth, net.active, net.busy_s, net.bytes
        stream, call_s, bytes_moved, compute_id = self.stream, self.call_s, self.bytes_moved, self.compute_id
        ends: list[float] = []  # when each of the layer's waits ends (the layer ends with the last)
        timers: list[tuple] = []  # heap of (time, order, path, bytes, then): transfers starting after their latency
        flows: list[list] = []
        order = reflows = 0
        last_s = net._last_s
        wake_at = math.inf  # the network's next wake-up (only the latest one is live)
        copies = [job for job in jobs if job[0] in ("fetch", "fill")]  # the copy engine's queue, in order

        def advance(t: float) -> None:  # Network._advance
            nonlocal last_s
            dt = t - last_s
            if dt > 0:
                for f in flows:
                    f[1] -= f[2] * dt
                for k in active:
                    busy_s[k] += dt
            last_s = t

        def reflow(t: float) -> None:  # Network.reflow, and the wake-up it plans
            nonlocal reflows, wake_at
            reflows += 1
            if not flows:
                wake_at = math.inf
                return
            soonest = math.inf
            for f in flows:
                rate = math.inf
                for k in f[0]:
                    r = bandwidth[k] / active[k]
                    if r < rate:
                        rate = r
                f[2] = rate
                left = f[1]
                x = (0.0 if 0.0 > left else left) / rate
                if x < soonest:
                    soonest = x
            wake_at = t + soonest

        def transfer(path, n_bytes: float, start: float, then: tuple) -> None:
            """A transfer's process: its latency, then a flow; ``then`` once it has arrived."""
            nonlocal order
            if not path.keys or n_bytes <= 0:  # the process goes on at once
                arrived(then, start)
            elif path.latency_s > 0:
                order += 1
                heapq.heappush(timers, (start + path.latency_s, order, path, n_bytes, then))
            else:
                flow(path, n_bytes, start, then)

        def flow(path, n_bytes: float, t: float, then: tuple) -> None:  # Network.open_flow, then reflow
            for lid in path.link_ids:
                link_bytes[lid] += n_bytes
            f = [path.keys, float(n_bytes), 0.0, then]
            advance(t)
            flows.append(f)
            for k in path.keys:
                active[k] += 1
            reflow(t)

        def copy(i: int, t: float) -> None:  # expert_fetch: the copy engine is free at t
            job = copies[i]
            path, n_bytes, _alone_s, _tier = job[4] if job[0] == "fetch" else job[3]
            transfer(path, n_bytes, t, (_COPY, i))

        def arrived(then: tuple, t: float) -> None:
            nonlocal order
            kind = then[0]
            if kind == _DONE:
                ends.append(t)
            elif kind == _COPY:
                i = then[1]
                job = copies[i]
                fetch = job[0] == "fetch"
                _path, n_bytes, _alone_s, tier = job[4] if fetch else job[3]
                bytes_moved[tier] += n_bytes
                if fetch:  # fetch_then_run: the kernel once the weights are in
                    end = stream(compute_id).reserve(job[5], ready_s=t)
                    ends.append(t + max(end - t, 0.0))
                else:
                    ends.append(t)
                if i + 1 < len(copies):
                    copy(i + 1, t)
            else:  # _COMPUTED: local_experts: the kernels, then the results back
                _, dev, calls, _tokens, _seconds, (_p_out, p_back, act, _out_s, _back_s) = then[1]
                st = stream(dev)
                for e, n in calls:
                    end = st.reserve(call_s(dev, lay.fmt[e], n), ready_s=t)
                order += 1
                heapq.heappush(timers, (t + max(end - t, 0.0), order, None, act, (_BACK, p_back)))

        try:
            for dev, sec in block.items():  # as _start: reserved at the router, waited for by a timeout
                end = stream(dev).reserve(sec)
                ends.append(now + max(end - now, 0.0))
            for job in jobs:  # processes in job order: the first fetch holds the copy engine
                if job[0] == "local":
                    transfer(job[5][0], job[5][2], now, (_COMPUTED, job))
            if copies:
                copy(0, now)
            while timers or wake_at < math.inf:
                if timers and timers[0][0] < wake_at:
                    t, _, path, n_bytes, then = heapq.heappop(timers)
                    if path is None:  # the results go back: a transfer of their own
                        transfer(then[1], n_bytes, t, (_DONE,))
                    else:
                        flow(path, n_bytes, t, then)
                    continue
                if timers and timers[0][0] == wake_at:
                    raise _GiveUp  # a transfer starts as another finishes: SimPy's event order decides
                t = wake_at
                advance(t)  # Network.close_flows: a flow is done with under a nanosecond of work left
                finished = [f for f in flows if f[1] <= f[2] * 1e-9]
                if len(finished) > 1:
                    raise _GiveUp  # the network's set of flows decides their order
                for f in finished:
                    flows.remove(f)
                    for k in f[0]:
                        active[k] -= 1
                        if not active[k]:
                            del active[k]
                reflow(t)
                for f in finished:
                    arrived(f[3], t)
            net._last_s = last_s
            net._version += reflows
            end = max(ends)
            if now + (end - now) != end:
                raise _GiveUp  # the step's clock could not land on the layer's end
            return end
        finally:  # the helpers above refer to each other (a reference cycle per layer, left to the
            # garbage collector otherwise: most of its work in a long one-token replay)
            advance = reflow = transfer = flow = copy = arrived = None  # noqa: F841


# what an arrival starts (Contention._replay)
_DONE, _COPY, _COMPUTED, _BACK = 0, 1, 2, 3
