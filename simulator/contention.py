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
        net, lay, now = self.net, self.layers[l], self.env.now
        compute_id = self.compute_id
        ends: list[float] = []  # when each of the layer's waits ends (the layer ends with the last)
        timers: list[tuple] = []  # heap of (time, order, action): transfers starting after their latency
        order = 0
        wake_at = math.inf  # the network's next wake-up (only the latest one is live)

        def at(time: float, action) -> None:
            nonlocal order
            order += 1
            heapq.heappush(timers, (time, order, action))

        def transfer(path, n_bytes: float, start: float, then) -> None:
            """A transfer's process: its latency, then a flow; ``then(time)`` once it has arrived."""
            if not path.keys or n_bytes <= 0:  # the process goes on at once
                then(start)
            elif path.latency_s > 0:
                at(start + path.latency_s, lambda t: flow(path, n_bytes, t, then))
            else:
                flow(path, n_bytes, start, then)

        def flow(path, n_bytes: float, t: float, then) -> None:
            nonlocal wake_at
            net.open_flow(path, n_bytes, t, then)
            soonest = net.reflow()
            wake_at = t + soonest if soonest is not None else math.inf

        copies = [job for job in jobs if job[0] in ("fetch", "fill")]  # the copy engine's queue, in order

        def copy(i: int, t: float) -> None:  # expert_fetch: the copy engine is free at t
            job = copies[i]
            path, n_bytes, _alone_s, tier = job[4] if job[0] == "fetch" else job[3]

            def arrived(t: float) -> None:
                self.bytes_moved[tier] += n_bytes
                if job[0] == "fetch":  # fetch_then_run: the kernel once the weights are in
                    end = self.stream(compute_id).reserve(job[5], ready_s=t)
                    ends.append(t + max(end - t, 0.0))
                else:
                    ends.append(t)
                if i + 1 < len(copies):
                    copy(i + 1, t)

            transfer(path, n_bytes, t, arrived)

        def local(job) -> None:  # local_experts: activations out, the kernels, results back
            _, dev, calls, _tokens, _seconds, (p_out, p_back, act, _out_s, _back_s) = job

            def computed(t: float) -> None:
                stream = self.stream(dev)
                for e, n in calls:
                    end = stream.reserve(self.call_s(dev, lay.fmt[e], n), ready_s=t)
                at(t + max(end - t, 0.0), lambda t2: transfer(p_back, act, t2, ends.append))

            transfer(p_out, act, now, computed)

        for dev, sec in block.items():  # as _start: reserved at the router, waited for by a timeout
            end = self.stream(dev).reserve(sec)
            ends.append(now + max(end - now, 0.0))
        for job in jobs:  # processes in job order: the first fetch holds the copy engine
            if job[0] == "local":
                local(job)
        if copies:
            copy(0, now)
        while timers or wake_at < math.inf:
            if timers and timers[0][0] < wake_at:
                t, _, action = heapq.heappop(timers)
                action(t)
                continue
            if timers and timers[0][0] == wake_at:
                raise _GiveUp  # a transfer starts as another finishes: SimPy's event order decides
            t = wake_at
            finished = net.close_flows(t)
            soonest = net.reflow()
            wake_at = t + soonest if soonest is not None else math.inf
            for f in finished:
                f.done(t)
        end = max(ends)
        if now + (end - now) != end:
            raise _GiveUp  # the step's clock could not land on the layer's end
        return end
