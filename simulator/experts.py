"""Expert work of one MoE layer in one step: hit or fetch, then compute.

Each distinct expert of the step runs by its planned site: ``resident`` on the compute
stream; ``fetch`` and ``hybrid`` through the layer's expert cache (a hit runs on the
compute stream; a miss starts an ``expert_fetch`` over the route from its home, or for
``hybrid`` runs ``local_experts`` on the CPU while the fetch refills the cache); ``local``
on the device where it lives, activations crossing the link; ``stream`` copies every
streamed expert of the layer each step. ``_classify`` sorts the step's experts into work
ready at the router and work that waits; ``_played_ahead`` works a layer out without
events when that is exact (:mod:`simulator.ahead`); ``_start`` plays it out with processes
otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import compress, repeat

import numpy as np
import simpy

from profiles.miss_copy import call_gates, loads_copy
from profiles.perf import activation_bytes

from .ahead import AFTER, DISK, FETCH, FILL, LOCAL_JOB, STREAM_JOB, PlayAhead
from .policies import LRUCache
from .step_ahead import StepAhead

__all__ = ["ExpertLayer", "ExpertWork"]

# cache-less layers: their work in a one-token step is worked out once per (layer, experts) and kept
# (block and jobs are read, never changed, by the callers); at most this many entries per layer,
# and none once the first PLAIN_MEMO_PROBE lookups found mostly new combinations
PLAIN_MEMO_ENTRIES = 1 << 16
PLAIN_MEMO_PROBE = 4096


# how an expert of a layer runs (ExpertLayer.code)
RESIDENT, LOCAL, VIA_CACHE, STREAM = 0, 1, 2, 3
_CODE = {"resident": RESIDENT, "local": LOCAL, "fetch": VIA_CACHE, "hybrid": VIA_CACHE, "stream": STREAM}


@dataclass
class ExpertLayer:
    """One MoE layer of the plan, resolved against the hardware.

    ``cost[e]`` prices expert ``e``'s call by token count where it runs when no transfer
    waits (its runner, or the compute device for a cache hit or a streamed expert);
    ``local_cost[e]`` where its weights are computed on a miss run locally (its runner,
    its stored format). Both map tokens -> seconds (:meth:`simulator.pricing.Pricing.costs`).
    """

    site: list[str]
    fmt: list[str]
    home: list[str]
    owners: list[tuple[str, ...]]  # compute devices holding a copy (EP: owning GPU first)
    cache: object | None
    cache_format: str | None
    streamed: list[int]
    on_disk: frozenset[int] = frozenset()  # experts homed on NVMe
    cost: list = field(default_factory=list)
    local_cost: list = field(default_factory=list)
    # planned low-bit copies (LayerPlan.miss_copy, profiles.miss_copy): a low-gate miss of a
    # fetch expert loads its copy; ``copy_held`` the experts whose cache slot holds a copy
    miss_copy: object | None = None

    def __post_init__(self) -> None:
        self.code = [_CODE[s] for s in self.site]
        self.runner = [own[0] for own in self.owners]
        self.cached = frozenset(compress(range(len(self.code)), map(VIA_CACHE.__eq__, self.code)))  # what the cache sees
        self.copy_format = [self.cache_format or f for f in self.fmt]  # what a fetch or fill moves
        self.copy_info: list[tuple | None] = [None] * len(self.fmt)  # Pricing._copy of the above, once used
        self.one: list[tuple | None] = [None] * len(self.fmt)  # ExpertWork._one_token's entries, once used
        # every expert fetched, through an LRU cache or none (simulator.step_ahead.StepAhead._lru_fetches)
        self.lru_fetch = (self.cache is None or type(self.cache) is LRUCache) and not self.streamed and \
            set(self.site) <= {"fetch"} and self.miss_copy is None
        self.fetch_one: list[tuple | None] = [None] * len(self.fmt)  # _lru_fetches' entries, once used
        self.copy_held: set[int] = set()
        self.copy_cost: list | None = None  # the copy's call seconds by tokens (Pricing.costs), once used
        # no cache, every expert resident or local, none on disk (simulator.one_pass.OnePass._plain_layer)
        self.plain_local = self.cache is None and not self.streamed and not self.on_disk and \
            set(self.code) <= {RESIDENT, LOCAL}
        # such a layer's (resident, local) runners when each kind has one at most (None: more)
        self.plain_devices = None
        if self.plain_local:
            res = {r for r, c in zip(self.runner, self.code) if c == RESIDENT}
            loc = {r for r, c in zip(self.runner, self.code) if c != RESIDENT}
            if len(res) <= 1 and len(loc) <= 1:
                self.plain_devices = (next(iter(res), None), next(iter(loc), None))


class ExpertWork(PlayAhead, StepAhead):
    """The expert actors of :class:`simulator.engine.Simulation`: a mixin over the
    simulation's resolved layers, streams, copy engines, network, in-flight fetches,
    miss policy and metrics counters (see ``Simulation.__init__``)."""

    def _classify(self, l: int, rows: np.ndarray, experts: list[int], tokens_of: list[int],
                  gates: list[float] | None, refs):
        """Sort the step's expert calls at layer ``l`` (:func:`simulator.routing.route_step`)
        into work ready at the router (``block``: device -> seconds) and work that waits on
        something (``jobs``); update the cache. Returns ``(block, jobs, flags)``, ``flags``
        the job kinds present (``FETCH | FILL | ...``).

        The cache sees the step's accesses one by one, token after token in rank order (the
        contract of :mod:`profiles.workload.hitrate`, which the runtime follows too); an
        expert's first access in the step decides where it runs, later ones only count.
        ``refs``: ``(ids [n][K], gates [n][K] or None)`` of the step at this layer, as lists, for
        a layer with a cache; None for one without.
        """
        key = None
        if refs is None and self._plain_memo is not None and len(rows) == 1:  # the same experts, the same work
            # K distinct experts of one token serve one token each; otherwise the counts join the key
            key = tuple(experts) if len(experts) == self.K else (tuple(experts), tuple(tokens_of))
            known = self._plain_memo[l].get(key)
            self._memo_lookups += 1
            if known is not None:
                known[-1] += 1  # its counts are added up once the memo goes (_settle_memo)
                return known[0], known[1], known[2]
            if self._memo_lookups >= PLAIN_MEMO_PROBE and not self._memo_probed:
                self._memo_probed = True
                if sum(map(len, self._plain_memo)) > PLAIN_MEMO_PROBE // 2:
                    self._settle_memo()  # mostly new combinations (many experts): not worth keeping
                    key = None
        lay = self.layers[l]
        ep = len(self.gpus) > 1
        if len(rows) == 1 and len(experts) == self.K and not ep and not self.reads_gates:
            return self._classify_one(l, lay, rows, experts, refs, key)
        cache = lay.cache
        block: dict[str, float] = {}
        jobs: list = []
        flags = 0
        local: dict[str, list] = {}  # device -> [calls (e, n), tokens, seconds]: experts run where they live
        first_hit: dict[int, bool] = {}
        if cache is not None:
            first_hit, hits, accesses = cache.serve(refs[0], refs[1], rows, self.K, self.E, lay.cached)
            self.cache_access[l] += accesses
            self.cache_hit[l] += hits
        code, runner, cost, local_cost, on_disk = lay.code, lay.runner, lay.cost, lay.local_cost, lay.on_disk
        compute_id, inflight, miss = self.compute_id, self.inflight, self.miss
        plan_miss = self.cfg.miss == "plan"
        self.expert_calls += len(experts)
        tokens = resident = local_n = missed = 0
        top = self._call_gates(l, rows) if lay.miss_copy is not None else None  # the copy's rule (profiles.miss_copy)
        for e, n, g in zip(experts, tokens_of, gates if gates is not None else repeat(1.0)):
            tokens += n
            c = code[e]
            if c == RESIDENT:
                resident += n
                if not ep:  # with expert parallelism the all-to-all runs them (_all_to_all)
                    dev = runner[e]
                    block[dev] = block.get(dev, 0.0) + cost[e][n]
                continue
            if c == VIA_CACHE:
                if cache is None:
                    missed += n  # no slots: every access misses
                elif first_hit[e]:
                    pending = inflight.get((l, e)) if inflight else None
                    if pending is not None and not pending.triggered:
                        jobs.append(("after", pending, e, n, lay.copy_format[e]))
                        flags |= AFTER
                    else:  # a slot a low-gate miss filled runs the copy (profiles.miss_copy)
                        held = e in lay.copy_held
                        block[compute_id] = block.get(compute_id, 0.0) + (self._copy_cost(lay)[n] if held else
                                                                          cost[e][n])
                    continue
                if plan_miss:  # as planned: hybrid experts run a miss where they live
                    action = "local" if lay.site[e] == "hybrid" else "fetch"
                else:
                    action = miss(lay.site[e], n, g, self._miss_costs(l, e))
                if lay.miss_copy is not None and lay.site[e] == "fetch":
                    if action == "fetch" and loads_copy(top.get(e, 1.0), lay.miss_copy.gate_below):
                        low = self._copy(lay.home[e], lay.miss_copy.format)
                        jobs.append(("fetch", e, n, lay.miss_copy.format, low, self._copy_cost(lay)[n]))
                        flags |= FETCH
                        lay.copy_held.add(e)
                        continue
                    lay.copy_held.discard(e)  # a full fetch replaces the slot's copy
                copy = lay.copy_info[e]
                if copy is None:
                    copy = lay.copy_info[e] = self._copy(lay.home[e], lay.copy_format[e])
                if action == "fetch":
                    jobs.append(("fetch", e, n, lay.copy_format[e], copy, cost[e][n]))
                    flags |= FETCH
                    continue
                if action == "low-bit":
                    low = self._copy(lay.home[e], "int4")
                    jobs.append(("fetch", e, n, "int4", low, self.call_s(compute_id, "int4", n, True)))
                    flags |= FETCH
                    continue
                if cache is not None:
                    jobs.append(("fill", e, lay.copy_format[e], copy))
                    flags |= FILL
            elif c == STREAM:  # computed on the device once the layer's streamed weights are in
                block[compute_id] = block.get(compute_id, 0.0) + cost[e][n]
                continue
            # run where the weights live: a local expert, or a miss the policy runs locally
            local_n += n
            dev = runner[e]
            entry = local.get(dev)
            if entry is None:
                entry = local[dev] = [[], 0, 0.0]
            entry[0].append((e, n))
            entry[1] += n
            entry[2] += local_cost[e][n]
            if on_disk and e in on_disk:
                flags |= DISK
        self.expert_accesses += tokens
        self.resident_access[l] += resident
        self.local_access[l] += local_n
        self.cache_access[l] += missed
        if local:
            flags |= LOCAL_JOB
            for dev, (calls, n, sec) in local.items():
                n = min(len(rows), n)
                jobs.append(("local", dev, calls, n, sec, self._activations(dev, n)))
        if lay.streamed:
            jobs.append(("stream",))
            flags |= STREAM_JOB
        if self.steals and flags & (FETCH | FILL | STREAM_JOB):
            self._steal(block, jobs, lay)
        if key is not None and len(self._plain_memo[l]) < PLAIN_MEMO_ENTRIES:
            self._plain_memo[l][key] = [block, jobs, flags, None, len(experts), tokens, resident, local_n, missed, 0]
        return block, jobs, flags

    def _classify_one(self, l: int, lay: ExpertLayer, rows: np.ndarray, experts: list[int], refs, key):
        """:meth:`_classify` of a one-token step whose K experts are distinct and routed, on
        one GPU with the planned miss handling: the same work, from entries made once per
        (layer, expert) (:meth:`_one_entry`), and the same memo."""
        cache, one, compute_id = lay.cache, lay.one, self.compute_id
        block: dict[str, float] = {}
        jobs: list = []
        flags = 0
        local = None  # device -> [calls (e, 1), tokens, seconds]
        if cache is not None:
            first_hit, hits, accesses = cache.serve(refs[0], refs[1], rows, self.K, self.E, lay.cached)
            self.cache_access[l] += accesses
            self.cache_hit[l] += hits
        inflight = self.inflight
        resident = local_n = missed = 0
        for e in experts:
            entry = one[e] or self._one_entry(lay, e)
            c = entry[0]
            if c == RESIDENT:
                resident += 1
                dev = entry[1]
                block[dev] = block.get(dev, 0.0) + entry[2]
                continue
            if c == VIA_CACHE:
                if cache is None:
                    missed += 1  # no slots: every access misses
                elif first_hit[e]:
                    pending = inflight.get((l, e)) if inflight else None
                    if pending is not None and not pending.triggered:
                        jobs.append(("after", pending, e, 1, lay.copy_format[e]))
                        flags |= AFTER
                    else:
                        block[compute_id] = block.get(compute_id, 0.0) + entry[2]
                    continue
                if entry[5]:  # a fetched expert (a hybrid one runs its miss where it lives)
                    jobs.append(entry[4])
                    flags |= FETCH
                    continue
                if cache is not None:
                    jobs.append(entry[4])
                    flags |= FILL
            elif c == STREAM:
                block[compute_id] = block.get(compute_id, 0.0) + entry[2]
                continue
            local_n += 1
            dev = entry[1]
            if local is None:
                local = {}
            work = local.get(dev)
            if work is None:
                work = local[dev] = [[], 0, 0.0]
            work[0].append((e, 1))
            work[1] += 1
            work[2] += entry[3]
            if entry[6]:
                flags |= DISK
        self.expert_calls += len(experts)
        self.expert_accesses += len(experts)
        self.resident_access[l] += resident
        self.local_access[l] += local_n
        self.cache_access[l] += missed
        if local:
            flags |= LOCAL_JOB
            for dev, (calls, n, sec) in local.items():
                jobs.append(("local", dev, calls, 1, sec, self._activations(dev, 1)))
        if lay.streamed:
            jobs.append(("stream",))
            flags |= STREAM_JOB
        if self.steals and flags & (FETCH | FILL | STREAM_JOB):
            self._steal(block, jobs, lay)
        if key is not None and len(self._plain_memo[l]) < PLAIN_MEMO_ENTRIES:
            self._plain_memo[l][key] = [block, jobs, flags, None, len(experts), len(experts), resident, local_n,
                                        missed, 0]
        return block, jobs, flags

    def _steal(self, block: dict[str, float], jobs: list, lay: ExpertLayer) -> None:
        """Add the host CPU work of the step's copies (fetches, fills, streamed experts) to the
        compute device's work ready at the router, where the compute device is the host CPU
        (``self.steals``): the copy worker runs on its cores (:meth:`Pricing.miss_compute_s`;
        the planner adds the same seconds to a layer's device work, planner.costs)."""
        w = sum(self.miss_compute_s(job[3] if job[0] == "fetch" else job[2]) for job in jobs
                if job[0] == "fetch" or job[0] == "fill")
        w += sum(self.miss_compute_s(lay.fmt[e]) for e in lay.streamed)
        if w:
            block[self.compute_id] = block.get(self.compute_id, 0.0) + w

    def _one_entry(self, lay: ExpertLayer, e: int) -> tuple:
        """Expert ``e``'s one-token call in ``lay``: ``(code, runner, seconds where it runs
        when nothing waits, seconds where it lives, its fetch or fill job or None, whether a
        miss fetches it, whether it is read from disk)``, made once."""
        c, job = lay.code[e], None
        fetches = c == VIA_CACHE and lay.site[e] != "hybrid"
        if c == VIA_CACHE:
            copy = lay.copy_info[e]
            if copy is None:
                copy = lay.copy_info[e] = self._copy(lay.home[e], lay.copy_format[e])
            job = ("fetch", e, 1, lay.copy_format[e], copy, lay.cost[e][1]) if fetches else \
                ("fill", e, lay.copy_format[e], copy)
        entry = lay.one[e] = (c, lay.runner[e], lay.cost[e][1], lay.local_cost[e][1], job, fetches,
                              bool(lay.on_disk) and e in lay.on_disk)
        return entry

    def _settle_memo(self) -> None:
        """Add the counts of every reuse of memoised work to the metrics, and drop the memo."""
        for l, memo in enumerate(self._plain_memo or ()):
            for *_, calls, tokens, resident, local_n, missed, uses in memo.values():
                self.expert_calls += uses * calls
                self.expert_accesses += uses * tokens
                self.resident_access[l] += uses * resident
                self.local_access[l] += uses * local_n
                self.cache_access[l] += uses * missed
        self._plain_memo = None

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
                waits.append(env.process(self.fetch_then_run(l, *job[1:4])))
            elif kind == "after":
                _, ev, e, n, fmt = job
                waits.append(env.process(self.run_after(ev, self.compute_id, self.call_s(self.compute_id, fmt, n, True),
                                                        f"expert L{l}E{e}")))
            elif kind == "local":
                waits.append(env.process(self.local_experts(l, *job[1:4])))
            elif kind == "fill":
                waits.append(env.process(self.expert_fetch(l, job[1], job[2])))
        return waits

    def expert_fetch(self, l: int, e: int, fmt: str):
        """Copies expert ``e`` of layer ``l`` from its home to the compute device (copy engine)."""
        lay = self.layers[l]
        n_bytes = self.expert_bytes(fmt)  # Pricing's: a nested expert's low plane (profiles.nested)
        # the layer's own device and link (a prefetch for l runs while l - 1 computes)
        with self.copy_engine(self.layer_dev[l]).request() as req:
            yield req
            self.log("expert_fetch", f"L{l}E{e} start")
            yield from self.net.transfer(lay.home[e], self.layer_mem[l], n_bytes, f"L{l}E{e} {fmt}")
        self.bytes_moved[self.hw.memories[lay.home[e]].tier] += n_bytes
        self.log("expert_fetch", f"L{l}E{e} arrived")

    def fetch_then_run(self, l: int, e: int, n: int, fmt: str):
        yield from self.expert_fetch(l, e, fmt)
        end = self.stream(self.compute_id).reserve(self.call_s(self.compute_id, fmt, n, True), f"expert L{l}E{e}")
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

    def _call_gates(self, l: int, rows: np.ndarray) -> dict[int, float]:
        """Per expert the step calls at layer ``l``, the largest gate weight of its tokens
        (:func:`profiles.miss_copy.call_gates`; empty without gate weights: no copy loads)."""
        gw = self.trace.gate_weights
        if gw is None:
            return {}
        return call_gates(self.trace.expert_ids[rows, l], gw[rows, l], self.E)

    def _copy_cost(self, lay: ExpertLayer) -> list:
        """Seconds of a low-bit copy's call on the compute device by tokens (its own kernel)."""
        if lay.copy_cost is None:
            lay.copy_cost = self.costs(self.compute_id, lay.miss_copy.format, cached=True)
        return lay.copy_cost

    def _miss_costs(self, l: int, e: int) -> dict:
        lay = self.layers[l]
        fmt = lay.cache_format or lay.fmt[e]
        home = lay.home[e]
        x = self.net.transfer_s(home, self.compute_mem, self.model.expert_bytes(fmt))
        host = self.host_id
        ax = 2 * self.net.transfer_s(self.compute_mem, self.hw.memory_of(host).id, activation_bytes(self.model, 1))
        return {"fetch_s": lambda n: x + self.call_s(self.compute_id, fmt, n, True),
                "local_s": lambda n: self.call_s(host, lay.fmt[e], n) + ax * n,
                "gate_threshold": 0.1}

