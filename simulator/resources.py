"""Simulated hardware resources: in-order streams and bandwidth-shared links.

- :class:`Stream` is one in-order execution queue (a GPU compute stream, the CPU running one
  expert at a time, an accelerator engine): work starts when the stream is free and runs
  for a known duration. Reserving at the current simulated time keeps the queue FIFO.
- :class:`Network` moves bytes between memories over the routes of the hardware topology.
  Every link direction and every memory's port is a shared bandwidth: ``n`` transfers that
  cross it at once each get ``1/n`` of it, and a transfer runs at the smallest share along
  its route (processor sharing), so concurrent transfers slow each other. A transfer alone
  takes ``latency + bytes / bottleneck``, exactly :meth:`profiles.hardware.Route.transfer_s`.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import defaultdict
from dataclasses import dataclass

import simpy

from profiles.hardware import Hardware

__all__ = ["Network", "Span", "Stream"]


@dataclass(frozen=True)
class Span:
    """One kernel or transfer, for the Chrome trace: ``[start_s, end_s)`` on ``resource``."""

    resource: str
    name: str
    start_s: float
    end_s: float
    args: tuple = ()


class Stream:
    """An in-order queue of work with known durations (FIFO by the time work is issued)."""

    def __init__(self, env: simpy.Environment, name: str, spans: list[Span] | None = None) -> None:
        self.env = env
        self.name = name
        self.free_at_s = 0.0
        self.busy_s = 0.0
        self.spans = spans  # None: do not record

    def reserve(self, duration_s: float, what: str = "", ready_s: float | None = None) -> float:
        """Queue ``duration_s`` of work that can start at ``ready_s`` (default: now); return its end."""
        start = self.env.now if ready_s is None else ready_s
        if self.free_at_s > start:
            start = self.free_at_s
        end = start + duration_s
        self.free_at_s = end
        self.busy_s += duration_s
        if self.spans is not None and duration_s > 0:
            self.spans.append(Span(self.name, what, start, end))
        return end


@dataclass(eq=False)
class _Flow:
    keys: tuple[str, ...]
    remaining_bytes: float
    done: object  # a SimPy event to succeed, or what the caller of open_flow keeps with the flow
    rate: float = 0.0


@dataclass(eq=False)  # one object per (src, dst): compared and hashed by identity
class _Path:
    src: str  # memories
    dst: str
    keys: tuple[str, ...]  # shared bandwidths crossed: link directions and memory ports
    link_ids: tuple[str, ...]
    latency_s: float
    bottleneck_bytes_per_s: float = math.inf

    def __post_init__(self) -> None:
        self.key_set = frozenset(self.keys)
        # each link and shared bandwidth crossed once (simulator.step_ahead books runs of copies)
        self.crosses_once = len(self.key_set) == len(self.keys) and len(set(self.link_ids)) == len(self.link_ids)
        self.shares: dict[_Path, bool] = {}  # other path -> whether it crosses one of ours (simulator.ahead)


class Network:
    """Bandwidth-shared transfers between memories (see the module docstring)."""

    def __init__(self, env: simpy.Environment, hardware: Hardware, spans: list[Span] | None = None) -> None:
        self.env = env
        self.hw = hardware
        self.spans = spans
        self.bandwidth: dict[str, float] = {}
        self.active: dict[str, int] = defaultdict(int)
        self.busy_s: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, float] = defaultdict(float)
        self._flows: set[_Flow] = set()
        self._paths: dict[tuple[str, str], _Path] = {}
        self._last_s = 0.0
        self._version = 0
        self._in_transit = 0  # transfers started and not finished (latency included)

    @property
    def busy(self) -> bool:
        """Whether any transfer is under way."""
        return self._in_transit > 0

    def path(self, src: str, dst: str) -> _Path:
        """The shared bandwidths a transfer from memory ``src`` to ``dst`` crosses."""
        key = (src, dst)
        if key not in self._paths:
            route = self.hw.route(src, dst)
            keys, ids = [], []
            if route.links:
                node = self.hw.memories[route.src].devices
                at = next(d for d in node if d in (route.links[0].a, route.links[0].b))
                for link in route.links:
                    nxt = link.b if link.a == at else link.a
                    k = f"{link.kind} {at}->{nxt}"
                    self.bandwidth[k] = link.bytes_per_s
                    keys.append(k)
                    ids.append(link.id)
                    at = nxt
                for mem, port in ((route.src, "read"), (route.dst, "write")):
                    k = f"{mem} {port}"
                    self.bandwidth[k] = self.hw.memories[mem].bytes_per_s
                    keys.append(k)
            bottleneck = min((self.bandwidth[k] for k in keys), default=math.inf)
            self._paths[key] = _Path(src, dst, tuple(keys), tuple(ids), route.latency_s, bottleneck)
        return self._paths[key]

    def transfer(self, src: str, dst: str, n_bytes: float, what: str = ""):
        """SimPy process body: move ``n_bytes`` from ``src`` to ``dst``; ends when they have arrived."""
        p = self.path(src, dst)
        if not p.keys or n_bytes <= 0:
            return
        start = self.env.now
        self._in_transit += 1
        if p.latency_s > 0:
            yield self.env.timeout(p.latency_s)
        flow = self.open_flow(p, n_bytes, self.env.now, self.env.event())
        self._reschedule()
        yield flow.done
        self._in_transit -= 1
        if self.spans is not None:
            self.spans.append(Span(f"link {src}->{dst}", what, start, self.env.now, (("bytes", n_bytes),)))

    def transfer_s(self, src: str, dst: str, n_bytes: float) -> float:
        """Seconds the transfer takes alone (no contention)."""
        p = self._paths.get((src, dst)) or self.path(src, dst)
        if not p.keys or n_bytes <= 0:
            return 0.0
        return p.latency_s + n_bytes / p.bottleneck_bytes_per_s

    def overlapping(self, moves: list[tuple], chained: int = 0) -> bool:
        """Whether any two of ``moves`` (path, bytes, start_s, end_s, ...) share a bandwidth at once.

        The first ``chained`` moves run back to back, each for a positive time (each starts as
        the one before ends, as the copy engine's do): they cannot meet one another, so only
        the other moves are compared with them, by bisection.
        """
        chain, rest = moves[:chained], moves[chained:]
        ends = [m[3] for m in chain]
        seen: dict[str, list[tuple[float, float]]] = {}
        for p, _, start, end, *_ in rest:
            for k in p.keys:
                spans = seen.setdefault(k, [])
                for s, e in spans:
                    if start < e and s < end:
                        return True
                spans.append((start, end))
            i = bisect_right(ends, start)  # the first chained move still under way at start
            while i < len(chain) and chain[i][2] < end:
                if not p.key_set.isdisjoint(chain[i][0].keys):
                    return True
                i += 1
        return False

    def account(self, p: _Path, n_bytes: float, start_s: float, end_s: float, what: str = "") -> None:
        """Book a transfer over ``p`` (:meth:`path`) worked out ahead (alone on its route) as if
        it had been played out."""
        if not p.keys or n_bytes <= 0:
            return
        link_bytes, busy = self.bytes, self.busy_s
        for lid in p.link_ids:
            link_bytes[lid] += n_bytes
        x = end_s - start_s - p.latency_s
        for k in p.keys:
            busy[k] += x
        if self.spans is not None:
            self.spans.append(Span(f"link {p.src}->{p.dst}", what, start_s, end_s, (("bytes", n_bytes),)))

    def exchange(self, moves: dict[tuple[str, str], float], start_s: float, what: str = "") -> float:
        """An all-to-all worked out ahead: every move starts at ``start_s`` and all share links.

        Fluid model: the exchange lasts as long as its most loaded bandwidth needs
        (``sum of bytes crossing it / its bandwidth``) plus the longest route latency.
        Returns when the last byte has arrived.
        """
        load: dict[str, float] = defaultdict(float)
        latency = 0.0
        for (src, dst), n_bytes in moves.items():
            p = self.path(src, dst)
            latency = max(latency, p.latency_s)
            for k in p.keys:
                load[k] += n_bytes
            for lid in p.link_ids:
                self.bytes[lid] += n_bytes
        if not load:
            return start_s
        for k, b in load.items():
            self.busy_s[k] += b / self.bandwidth[k]
        end = start_s + latency + max(b / self.bandwidth[k] for k, b in load.items())
        if self.spans is not None:
            self.spans.append(Span("all-to-all", what, start_s, end, (("bytes", sum(moves.values())),)))
        return end

    # -- processor sharing: the arithmetic takes the clock as an argument, so that SimPy's
    # processes (transfer) and a layer worked out without events (simulator.contention)
    # compute the same floats in the same order

    def open_flow(self, p: _Path, n_bytes: float, now: float, done: object) -> _Flow:
        """Start moving ``n_bytes`` over ``p`` at ``now`` (its latency has passed); ``done`` goes
        with the flow (a SimPy event to succeed, or what a caller needs). :meth:`reflow` next."""
        for lid in p.link_ids:
            self.bytes[lid] += n_bytes
        flow = _Flow(p.keys, float(n_bytes), done)
        self._advance(now)
        self._flows.add(flow)
        for k in flow.keys:
            self.active[k] += 1
        return flow

    def reflow(self) -> float | None:
        """New rates for every flow; returns the seconds until the first one finishes (None: no
        flows). A wake-up planned before is stale from now on."""
        self._version += 1
        if not self._flows:
            return None
        soonest = math.inf
        for f in self._flows:
            f.rate = min(self.bandwidth[k] / self.active[k] for k in f.keys)
            soonest = min(soonest, max(f.remaining_bytes, 0.0) / f.rate)
        return soonest

    def close_flows(self, now: float) -> list[_Flow]:
        """Drain every flow up to ``now`` and take out the finished ones. :meth:`reflow` next."""
        self._advance(now)
        # a flow is done when less than a nanosecond of work is left (float round-off)
        finished = [f for f in self._flows if f.remaining_bytes <= f.rate * 1e-9]
        active = self.active
        for f in finished:
            self._flows.discard(f)
            for k in f.keys:
                active[k] -= 1
                if not active[k]:
                    del active[k]  # only bandwidths in use are kept: _advance walks them all
        return finished

    def _advance(self, now: float) -> None:
        """Drain every active flow at its current rate up to ``now``."""
        dt = now - self._last_s
        if dt > 0:
            for f in self._flows:
                f.remaining_bytes -= f.rate * dt
            busy = self.busy_s
            for k in self.active:
                busy[k] += dt
        self._last_s = now

    def _reschedule(self) -> None:
        """New rates for every flow; wake up when the first one finishes."""
        soonest = self.reflow()
        if soonest is None:
            return
        wake = self.env.timeout(soonest)
        version = self._version
        wake.callbacks.append(lambda _ev: self._on_wake(version))

    def _on_wake(self, version: int) -> None:
        if version != self._version:
            return  # the flows changed since this wake-up was planned
        for f in self.close_flows(self.env.now):
            f.done.succeed()
        self._reschedule()
