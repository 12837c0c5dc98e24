"""Expert work of one MoE layer in one step: hit or fetch, then compute.

Each distinct expert of the step runs by its planned site: ``resident`` on the compute
stream; ``fetch`` and ``hybrid`` through the layer's expert cache (a hit runs on the
compute stream; a miss starts an ``expert_fetch`` over the route from its home, or for
``hybrid`` runs ``local_experts`` on the CPU while the fetch refills the cache); ``local``
on the device where it lives, activations crossing the link; ``stream`` copies every
streamed expert of the layer each step. ``_classify`` sorts the step's experts into work
ready at the router and work that waits; ``_played_ahead`` works a layer out without
events when that is exact; ``_start`` plays it out with processes otherwise.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import simpy

from profiles.perf import activation_bytes

__all__ = ["ExpertLayer", "ExpertWork", "route", "route_small"]

# cache-less layers: their work for a given (layer, step size, experts, token counts) is worked out once
# and kept (block and jobs are read, never changed, by the callers); at most this many entries,
# and none once the first PLAIN_MEMO_PROBE lookups found mostly new combinations
PLAIN_MEMO_ENTRIES = 1 << 16
PLAIN_MEMO_PROBE = 4096


@dataclass
class ExpertLayer:
    """One MoE layer of the plan, resolved against the hardware."""

    site: list[str]
    fmt: list[str]
    home: list[str]
    owners: list[tuple[str, ...]]  # compute devices holding a copy (EP: owning GPU first)
    cache: object | None
    cache_format: str | None
    streamed: list[int]
    on_disk: frozenset[int] = frozenset()  # experts homed on NVMe

    def __post_init__(self) -> None:
        self.via_cache = [s == "fetch" or s == "hybrid" for s in self.site]  # accesses the cache sees


class ExpertWork:
    """The expert actors of :class:`simulator.engine.Simulation`: a mixin over the
    simulation's resolved layers, streams, copy engines, network, in-flight fetches,
    miss policy and metrics counters (see ``Simulation.__init__``)."""

    def _classify(self, l: int, rows: np.ndarray, routed, refs):
        """Sort the step's experts at layer ``l`` into work ready at the router (``block``:
        device -> seconds) and work that waits on something (``jobs``); update the cache.

        The cache sees the step's accesses one by one, token after token in rank order (the
        contract of :mod:`profiles.workload.hitrate`, which the runtime follows too); an
        expert's first access in the step decides where it runs, later ones only count.
        ``refs``: ``(ids [n][K], gates [n][K] or None)`` of the step at this layer, as lists.
        """
        lay, cache = self.layers[l], self.layers[l].cache
        key = None
        if cache is None and self._plain_memo is not None:  # the same experts, the same work
            key = (l, len(rows), tuple([(e, n) for e, n, _g, _first in routed]))
            known = self._plain_memo.get(key)
            self._memo_lookups += 1
            if self._memo_lookups == PLAIN_MEMO_PROBE and len(self._plain_memo) > PLAIN_MEMO_PROBE // 2:
                self._plain_memo = None  # mostly new combinations (many experts): not worth keeping
            if known is not None:
                block, jobs, tokens, resident, local_n, missed = known
                self.expert_calls += len(routed)
                self.expert_accesses += tokens
                self.resident_access[l] += resident
                self.local_access[l] += local_n
                self.cache_access[l] += missed
                return block, jobs
        ep = len(self.gpus) > 1
        block: dict[str, float] = defaultdict(float)
        jobs: list = []
        local: list[tuple[int, int]] = []  # experts run where they live, by device below
        K, E = self.K, self.E
        first_hit: dict[int, bool] = {}
        if cache is not None:
            via_cache, access = lay.via_cache, cache.access
            layer_ids, layer_gates = refs
            router = cache.scores_router
            hits = accesses = 0
            for t, row in enumerate(layer_ids):
                p0 = int(rows[t]) * K  # positions in the workload: token x K + rank
                token_gates = layer_gates[t] if layer_gates is not None else None
                if router:  # the token's router scores reach the cache before its experts do
                    scores = token_gates if token_gates is not None else [1.0] * len(row)
                    chosen = [(e, s) for e, s in zip(row, scores) if e < E]
                    cache.route([e for e, _ in chosen], [s for _, s in chosen])
                for k, e in enumerate(row):
                    if e < E and via_cache[e]:
                        h = access(e, p0 + k, token_gates[k] if token_gates is not None else 1.0)
                        hits += h
                        accesses += 1
                        if e not in first_hit:
                            first_hit[e] = h
            self.cache_access[l] += accesses
            self.cache_hit[l] += hits
        site_of, fmt_of, owners = lay.site, lay.fmt, lay.owners
        call_s, compute_id = self.call_s, self.compute_id
        self.expert_calls += len(routed)
        tokens = resident = local_n = missed = 0
        for e, n, g, _first in routed:
            tokens += n
            site = site_of[e]
            if site == "resident":
                resident += n
                if not ep:  # with expert parallelism the all-to-all runs them (_all_to_all)
                    dev = owners[e][0]
                    block[dev] += call_s(dev, fmt_of[e], n)
            elif site == "local":
                local_n += n
                local.append((e, n))
            elif site == "fetch" or site == "hybrid":
                fmt = lay.cache_format or fmt_of[e]
                if cache is None:
                    missed += n  # no slots: every access misses
                elif first_hit[e]:
                    pending = self.inflight.get((l, e))
                    if pending is not None and not pending.triggered:
                        jobs.append(("after", pending, e, n, fmt))
                    else:
                        block[compute_id] += call_s(compute_id, fmt, n)
                    continue
                action = self.miss(site, n, g, None if self.cfg.miss == "plan" else self._miss_costs(l, e))
                if action == "local":
                    local_n += n
                    local.append((e, n))
                    if cache is not None:
                        jobs.append(("fill", e))
                else:
                    jobs.append(("fetch", e, n, "int4" if action == "low-bit" else fmt))
            else:  # stream: computed on the device once the layer's streamed weights are in
                block[compute_id] += call_s(compute_id, fmt_of[e], n)
        self.expert_accesses += tokens
        self.resident_access[l] += resident
        self.local_access[l] += local_n
        self.cache_access[l] += missed
        if local:
            by_device: dict[str, list] = defaultdict(list)
            for e, n in local:
                by_device[owners[e][0]].append((e, n))
            for dev, calls in by_device.items():
                jobs.append(("local", dev, calls, min(len(rows), sum(n for _, n in calls))))
        if lay.streamed:
            jobs.append(("stream",))
        if key is not None and self._plain_memo is not None and len(self._plain_memo) < PLAIN_MEMO_ENTRIES:
            self._plain_memo[key] = (block, jobs, tokens, resident, local_n, missed)
        return block, jobs

    def _played_ahead(self, l: int, router_at: float, block: dict[str, float], jobs: list) -> float | None:
        """The layer's end time worked out without events, or None when that is not exact.

        Exact when nothing else is in flight (no transfer, no copy-engine user) and the
        layer's own transfers never share a link direction or memory port at the same time:
        then each transfer runs alone (latency + bytes / bottleneck), the copy engine runs
        the fetches in order, and streams take kernels in the order the events would issue
        them. Otherwise the caller plays the layer out with processes.
        """
        kinds = {j[0] for j in jobs}
        if self.net.busy or not kinds <= {"fetch", "fill", "local"} or \
                (self.inflight and any(not ev.triggered for ev in self.inflight.values())):
            return None
        # activations (both directions) never share a bandwidth with each other, and fetches
        # are serial on the copy engine; only results coming back can meet a fetch
        check = "local" in kinds and len(kinds) > 1
        lay, net, transfer_s = self.layers[l], self.net, self.transfer_s
        recording = self.events is not None
        if check:
            saved = {name: (st.free_at_s, st.busy_s) for name, st in self.streams.items()}
            n_spans = len(self.spans) if self.spans is not None else 0
            n_events = len(self.events) if self.events is not None else 0
        labels = self.spans is not None  # names of kernels and transfers: only for the Chrome trace
        moves: list[tuple[str, str, float, float, float, str, bool]] = []  # (src, dst, bytes, start, end, what, weights)

        def move(src: str, dst: str, n_bytes: float, start: float, what: str, weights: bool = True) -> float:
            end = start + transfer_s(src, dst, n_bytes)
            moves.append((src, dst, n_bytes, start, end, what, weights))
            return end

        end = router_at
        for dev, sec in block.items():
            done = self.stream(dev).reserve(sec, labels and f"experts L{l}", ready_s=router_at)
            if done > end:
                end = done
        engine_free = router_at  # the copy engine takes fetches and fills in job order
        compute_id, compute_mem, home = self.compute_id, self.compute_mem, lay.home
        compute, call_s, expert_bytes = self.stream(compute_id), self.call_s, self.expert_bytes
        for job in jobs:
            kind = job[0]
            if kind == "fetch":
                _, e, n, fmt = job
                if recording:
                    self.log("expert_fetch", f"L{l}E{e} start", engine_free)
                n_bytes, src = expert_bytes(fmt), home[e]
                arrived = engine_free + transfer_s(src, compute_mem, n_bytes)
                moves.append((src, compute_mem, n_bytes, engine_free, arrived, labels and f"L{l}E{e} {fmt}", True))
                engine_free = arrived
                if recording:
                    self.log("expert_fetch", f"L{l}E{e} arrived", engine_free)
                done = compute.reserve(call_s(compute_id, fmt, n), labels and f"expert L{l}E{e}", ready_s=engine_free)
                if done > end:
                    end = done
            elif kind == "fill":
                e = job[1]
                fmt = lay.cache_format or lay.fmt[e]
                if recording:
                    self.log("expert_fetch", f"L{l}E{e} start", engine_free)
                engine_free = move(home[e], compute_mem, expert_bytes(fmt), engine_free, labels and f"L{l}E{e} {fmt}")
                if recording:
                    self.log("expert_fetch", f"L{l}E{e} arrived", engine_free)
                if engine_free > end:
                    end = engine_free
        for job in jobs:
            if job[0] == "local":
                _, dev, calls, tokens = job
                if lay.on_disk and any(e in lay.on_disk for e, _ in calls):
                    break  # weights read from disk on the way: leave it to the processes
                dev_mem = self._dev_mem(dev)
                act = activation_bytes(self.model, tokens)
                ready = move(compute_mem, dev_mem, act, router_at, labels and f"L{l} activations", False)
                stream = self.stream(dev)
                if self.spans is None:  # one reservation: the same end, fewer steps
                    ready = stream.reserve(sum(self.call_s(dev, lay.fmt[e], n) for e, n in calls), ready_s=ready)
                for e, n in calls if self.spans is not None else ():
                    ready = stream.reserve(self.call_s(dev, lay.fmt[e], n), f"expert L{l}E{e}", ready_s=ready)
                end = max(end, move(dev_mem, compute_mem, act, ready, labels and f"L{l} results", False))
        else:
            if not check or not net.overlapping([m[:5] for m in moves]):
                account, tier, bytes_moved = net.account, self._tier, self.bytes_moved
                for src, dst, n_bytes, start, stop, what, weights in moves:
                    account(src, dst, n_bytes, start, stop, what)
                    if weights:
                        bytes_moved[tier[src]] += n_bytes
                return end
        for name, st in self.streams.items():  # undo the tentative reservations
            st.free_at_s, st.busy_s = saved.get(name, (0.0, 0.0))
        if self.spans is not None:
            del self.spans[n_spans:]
        if self.events is not None:
            del self.events[n_events:]
        return None

    def _start(self, l: int, block: dict[str, float], jobs: list, ids: np.ndarray) -> list[simpy.Event]:
        """Start the layer's work at the router; the layer ends when all of it has (sync)."""
        env, lay = self.env, self.layers[l]
        waits = []
        stream_done = env.process(self.stream_in(l)) if lay.streamed else None
        if stream_done is not None:
            waits.append(stream_done)
        for dev, sec in block.items():
            if dev == self.compute_id and stream_done is not None:
                waits.append(env.process(self.run_after(stream_done, dev, sec, f"experts L{l}")))
            else:
                waits.append(env.timeout(max(self.stream(dev).reserve(sec, f"experts L{l}") - env.now, 0.0)))
        for job in jobs:
            kind = job[0]
            if kind == "fetch":
                waits.append(env.process(self.fetch_then_run(l, *job[1:])))
            elif kind == "after":
                _, ev, e, n, fmt = job
                waits.append(env.process(self.run_after(ev, self.compute_id, self.call_s(self.compute_id, fmt, n),
                                                        f"expert L{l}E{e}")))
            elif kind == "local":
                waits.append(env.process(self.local_experts(l, *job[1:])))
            elif kind == "fill":
                waits.append(env.process(self.expert_fetch(l, job[1], lay.cache_format or lay.fmt[job[1]])))
        return waits

    def expert_fetch(self, l: int, e: int, fmt: str):
        """Copies expert ``e`` of layer ``l`` from its home to the compute device (copy engine)."""
        lay = self.layers[l]
        n_bytes = self.model.expert_bytes(fmt)
        with self.copy_engine(self.compute_id).request() as req:
            yield req
            self.log("expert_fetch", f"L{l}E{e} start")
            yield from self.net.transfer(lay.home[e], self.compute_mem, n_bytes, f"L{l}E{e} {fmt}")
        self.bytes_moved[self.hw.memories[lay.home[e]].tier] += n_bytes
        self.log("expert_fetch", f"L{l}E{e} arrived")

    def fetch_then_run(self, l: int, e: int, n: int, fmt: str):
        yield from self.expert_fetch(l, e, fmt)
        end = self.stream(self.compute_id).reserve(self.call_s(self.compute_id, fmt, n), f"expert L{l}E{e}")
        yield self.env.timeout(max(end - self.env.now, 0.0))

    def run_after(self, ready: simpy.Event, device: str, seconds: float, what: str):
        yield ready
        yield self.env.timeout(max(self.stream(device).reserve(seconds, what) - self.env.now, 0.0))

    def local_experts(self, l: int, dev: str, calls: list[tuple[int, int]], tokens: int):
        """Runs experts where their weights live (the CPU, an accelerator): the step's hidden
        states cross over once, the device runs the experts one after another, the summed
        results cross back once."""
        lay = self.layers[l]
        dev_mem = self.hw.memory_of(dev).id
        act = activation_bytes(self.model, tokens)
        yield from self.net.transfer(self.compute_mem, dev_mem, act, f"L{l} activations")
        stream = self.stream(dev)
        for e, n in calls:
            if self.hw.memories[lay.home[e]].tier == "nvme":  # read the weights into memory first
                n_bytes = self.model.expert_bytes(lay.fmt[e])
                yield from self.net.transfer(lay.home[e], dev_mem, n_bytes, f"L{l}E{e} read")
                self.bytes_moved["nvme"] += n_bytes
            end = stream.reserve(self.call_s(dev, lay.fmt[e], n), f"expert L{l}E{e}")
        yield self.env.timeout(max(end - self.env.now, 0.0))
        yield from self.net.transfer(dev_mem, self.compute_mem, act, f"L{l} results")

    def stream_in(self, l: int):
        """Copies every streamed expert of layer ``l`` to the compute device (accelerate's offload)."""
        lay = self.layers[l]
        for e in lay.streamed:
            yield from self.expert_fetch(l, e, lay.fmt[e])

    def _miss_costs(self, l: int, e: int) -> dict:
        lay = self.layers[l]
        fmt = lay.cache_format or lay.fmt[e]
        home = lay.home[e]
        x = self.net.transfer_s(home, self.compute_mem, self.model.expert_bytes(fmt))
        host = self.host_id
        ax = 2 * self.net.transfer_s(self.compute_mem, self.hw.memory_of(host).id, activation_bytes(self.model, 1))
        return {"fetch_s": lambda n: x + self.call_s(self.compute_id, fmt, n),
                "local_s": lambda n: self.call_s(host, lay.fmt[e], n) + ax * n,
                "gate_threshold": 0.1}


def route_small(ids: list, gates: list | None, E: int, K: int) -> list[tuple[int, int, float, int]]:
    """:func:`route` for a handful of tokens, in plain Python (``ids``: ``[n][K]`` lists)."""
    seen: dict[int, list] = {}
    for t, row in enumerate(ids):
        token_gates = gates[t] if gates is not None else None
        for k, e in enumerate(row):
            if e >= E:
                continue
            g = token_gates[k] if token_gates is not None else 1.0
            entry = seen.get(e)
            if entry is None:
                seen[e] = [e, 1, g, t * K + k]
            else:
                entry[1] += 1
                entry[2] += g
    return [(e, n, gsum / n, first) for e, n, gsum, first in seen.values()]


def route(ids: np.ndarray, gates: np.ndarray | None, E: int) -> list[tuple[int, int, float, int]]:
    """Distinct experts of a step in first-use order (token, then rank), with their token
    counts, mean gate weight and their first use (token x K + rank within the step). Zero experts are dropped."""
    flat = ids.ravel()
    uniq, first, counts = np.unique(flat, return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    uniq, first, counts = uniq[order], first[order], counts[order]
    if gates is not None:
        sums = np.bincount(flat, weights=gates.ravel().astype(float), minlength=int(flat.max()) + 1)
        gate = sums[uniq] / counts
    else:
        gate = np.ones(len(uniq))
    keep = uniq < E
    return list(zip(uniq[keep].tolist(), counts[keep].tolist(), gate[keep].tolist(), first[keep].tolist()))
