"""The discrete-event model: a workload replayed on the hardware under a Plan (SimPy).

Legend: L = MoE layers, E = routed experts, K = top-k, T = trace tokens, n = tokens in a step.

The story of a token, one SimPy process per actor:

1. ``request_source`` releases requests (the workload's sequences): all at t = 0 (closed
   loop), or with Poisson arrivals at ``arrival_rate_per_s``.
2. ``scheduler`` batches them (continuous batching up to ``batch_size`` running requests,
   or static batches) and runs forward steps: one prefill step for newly admitted prompts,
   then decode steps with the next token of every running request.
3. ``layer_step`` (per MoE layer): attention and the dense share of the step run on the
   compute stream; the router's choices come from the trace; each distinct expert of the
   step then runs by its planned site: ``resident`` on the compute stream; ``fetch`` and
   ``hybrid`` through the layer's expert cache (a hit runs on the compute stream; a miss
   starts an ``expert_fetch`` over the route from its home, or for ``hybrid`` runs
   ``local_expert`` on the CPU while the fetch refills the cache); ``local`` on the device
   where it lives, activations crossing the link; ``stream`` copies every streamed expert
   of the layer each step. The layer ends when all of its work and transfers have.
4. ``prefetcher``: after layer l's router, guesses layer l+1's experts (policy registry)
   and fetches them into l+1's cache on the copy engine, overlapping l's compute.

Costs come from :mod:`profiles.perf`, the planner's performance model. Kernels on one
stream run in issue order; transfers share link bandwidth (:mod:`simulator.resources`).
Everything random draws from one seeded generator, so runs are deterministic.

With expert parallelism (experts homed on several GPUs), tokens are spread over the GPUs
for attention (data parallel) and every layer dispatches each token to the GPUs that own
its experts and combines the results back (all-to-all on the topology).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import simpy

from planner.plan import Plan
from profiles.engines import load_engine
from profiles.errors import InputError
from profiles.hardware import Hardware
from profiles.models import ModelSpec
from profiles.perf import activation_bytes, dense_step_s, expert_call_s
from profiles.workload.trace import DECODE, Trace

from .metrics import SimReport, summarise
from .policies import make_cache, miss_policy, prefetch_policy
from .resources import Network, Span, Stream

__all__ = ["SimConfig", "simulate"]


@dataclass(frozen=True)
class SimConfig:
    """What to replay and which policies run. ``None`` means: as the plan says.

    Attributes:
        batch_size: most requests running at once (default: the plan's batch size).
        requests: requests to replay (default: every sequence of the trace; more wrap around).
        arrival_rate_per_s: Poisson arrivals; ``None`` releases every request at t = 0.
        batching: ``continuous`` (admit as slots free up) or ``static`` (whole batches).
        eviction, prefetch, miss: policy names (see :mod:`simulator.policies`).
        prefetch_accuracy: the ``next-layer`` predictor's per-expert accuracy (default:
            the workload's next-layer predictability, as the planner assumes).
        transition_top_p: coverage of the ``transition`` prefetcher.
        kv_context: ``actual`` (each request's real context) or ``plan`` (every request at the
            plan's context length, as the planner prices it).
        ep_token_home: expert parallelism: where a token's output is combined after each
            layer: ``attention`` (its data-parallel GPU) or ``expert`` (its first expert's GPU).
        seed: for arrivals and imperfect predictors.
        record: keep every kernel and transfer (Chrome trace) and the event log.
    """

    batch_size: int | None = None
    requests: int | None = None
    arrival_rate_per_s: float | None = None
    batching: str = "continuous"
    eviction: str | None = None
    prefetch: str | None = None
    miss: str = "plan"
    prefetch_accuracy: float | None = None
    transition_top_p: float = 0.8
    kv_context: str = "actual"
    ep_token_home: str = "attention"
    seed: int = 0
    record: bool = False


@dataclass(eq=False)
class Request:
    rid: int
    arrival_s: float
    prompt_rows: np.ndarray  # trace rows of the prompt (prefill), may be empty
    decode_rows: np.ndarray  # trace rows fed back one per decode step
    next_decode: int = 0
    prefilled: bool = False
    admitted_s: float | None = None  # when the scheduler let it in (TTFT counts from arrival)
    token_s: list[float] = field(default_factory=list)  # when each output token was ready

    @property
    def done(self) -> bool:
        return self.prefilled and self.next_decode >= len(self.decode_rows)

    @property
    def context(self) -> int:
        return len(self.prompt_rows) + self.next_decode


@dataclass
class _Layer:
    """One MoE layer of the plan, resolved against the hardware."""

    site: list[str]
    fmt: list[str]
    home: list[str]
    owners: list[tuple[str, ...]]  # compute devices holding a copy (EP: owning GPU first)
    cache: object | None
    cache_format: str | None
    streamed: list[int]


class Simulation:
    """One replay of a workload under a plan. Use :func:`simulate`."""

    play_ahead = True  # work out event-free layers without events (False: always play them out)

    def __init__(self, plan: Plan, hardware: Hardware, model: ModelSpec, trace: Trace, config: SimConfig) -> None:
        self.plan, self.hw, self.model, self.trace, self.cfg = plan, hardware, model, trace, config
        _check_inputs(plan, hardware, model, trace)
        self.env = simpy.Environment()
        self.rng = np.random.default_rng(config.seed)
        self.spans: list[Span] | None = [] if config.record else None
        self.events: list[tuple[float, str, str]] | None = [] if config.record else None
        self.net = Network(self.env, hardware, self.spans)
        self.compute_id = plan.compute_device
        self.compute_mem = hardware.memory_of(plan.compute_device).id
        self.host_id = plan.host_device
        self.streams: dict[str, Stream] = {}
        self.copy_engines: dict[str, simpy.Resource] = {}
        self.E = model.num_experts
        self.K = trace.expert_ids.shape[2]
        self.batch_size = config.batch_size or plan.batch_size
        self.dense_format = plan.dense_format
        self.eviction = config.eviction or plan.eviction
        self.prefetch_name = config.prefetch or ("none" if plan.prefetch == "none" else plan.prefetch)
        self.prefetch = prefetch_policy(self.prefetch_name)
        self.miss = miss_policy(config.miss)
        self._call_cache: dict[tuple[str, str, int], float] = {}
        self._bytes_cache: dict[str, float] = {}
        self._mem_cache: dict[str, str] = {}
        self._ep_cache: dict[int, dict] = {}
        self._token_gpu: np.ndarray | None = None  # expert parallelism: where each token of the step is
        self._freq = _frequency(trace, self.E) if self.eviction == "static" else None
        self.layers = [self._resolve_layer(lp, l) for l, lp in enumerate(plan.layers)]
        self.gpus = sorted({d for lay in self.layers for own in lay.owners for d in own
                            if hardware.devices[d].kind == "gpu"} | {self.compute_id})
        self.inflight: dict[tuple[int, int], simpy.Event] = {}
        self.accuracy = config.prefetch_accuracy
        if self.accuracy is None and self.prefetch_name == "next-layer":
            self.accuracy = _predictability(trace)
        self._transitions = _transitions(trace, self.E) if self.prefetch_name == "transition" else None
        # metrics
        self.cache_access = [0] * len(self.layers)
        self.cache_hit = [0] * len(self.layers)
        self.resident_access = [0] * len(self.layers)
        self.local_access = [0] * len(self.layers)
        self.expert_calls = 0  # kernel calls: one per distinct expert per step
        self.expert_accesses = 0  # token-expert pairs
        self.bytes_moved: dict[str, float] = defaultdict(float)
        self.layer_wall_s = [0.0] * len(self.layers)  # summed over steps (plain lists: faster to bump)
        self.ep_tokens = self.ep_cross_gpu = self.ep_cross_node = 0  # expert parallelism: routed tokens
        self.ep_load_ratio = [0.0] * len(self.layers)  # summed max/mean GPU load per step
        self.ep_layer_steps = [0] * len(self.layers)
        self.steps: list[tuple[str, int, float, float]] = []  # (phase, tokens, start, end)
        self.requests: list[Request] = []

    # ------------------------------------------------------------------ resolution

    def stream(self, device_id: str) -> Stream:
        if device_id not in self.streams:
            self.streams[device_id] = Stream(self.env, device_id, self.spans)
        return self.streams[device_id]

    def copy_engine(self, device_id: str) -> simpy.Resource:
        """The device's host-to-device copy engine: its transfers run one after another."""
        if device_id not in self.copy_engines:
            self.copy_engines[device_id] = simpy.Resource(self.env, capacity=1)
        return self.copy_engines[device_id]

    def _resolve_layer(self, lp, l: int) -> _Layer:
        owners = []
        for e, (home, site) in enumerate(zip(lp.home, lp.site)):
            devs = [self._runner(home, site)]
            if lp.replicas and lp.replicas[e]:
                devs += [self._runner(r, site) for r in lp.replicas[e]]
            owners.append(tuple(devs))
        cache = None
        if lp.cache_slots:
            future = _future_uses(self.trace, l) if self.eviction == "belady" else None
            cache = make_cache(self.eviction, lp.cache_slots, future=future,
                               frequency=None if self._freq is None else self._freq[l])
        streamed = [e for e, s in enumerate(lp.site) if s == "stream"]
        return _Layer(list(lp.site), list(lp.format), list(lp.home), owners, cache, lp.cache_format, streamed)

    def _runner(self, memory_id: str, site: str) -> str:
        """The compute device that runs an expert homed in ``memory_id`` at ``site``."""
        if site in ("fetch", "hybrid", "stream"):
            return self.compute_id
        mem = self.hw.memories[memory_id]
        if mem.id == self.compute_mem:
            return self.compute_id
        for d in mem.devices:
            if self.hw.devices[d].is_compute and (site == "local" or self.hw.devices[d].kind == "gpu"):
                return d
        return self.host_id  # NVMe-resident experts computed "locally" run on the host CPU

    def call_s(self, device_id: str, fmt: str, tokens: int) -> float:
        key = (device_id, fmt, tokens)
        if key not in self._call_cache:
            dev = self.hw.devices[device_id]
            self._call_cache[key] = expert_call_s(dev, fmt, self.model.expert_bytes(fmt),
                                                  self.model.expert_flops_per_token * tokens, tokens)
        return self._call_cache[key]

    def expert_bytes(self, fmt: str) -> float:
        if fmt not in self._bytes_cache:
            self._bytes_cache[fmt] = float(self.model.expert_bytes(fmt))
        return self._bytes_cache[fmt]

    def _dev_mem(self, device_id: str) -> str:
        """The memory pool of a device (cached)."""
        if device_id not in self._mem_cache:
            self._mem_cache[device_id] = self.hw.memory_of(device_id).id
        return self._mem_cache[device_id]

    def log(self, actor: str, what: str, at_s: float | None = None) -> None:
        if self.events is not None:
            self.events.append((self.env.now if at_s is None else at_s, actor, what))

    # ------------------------------------------------------------------ actors

    def request_source(self, requests: list[Request], waiting: list[Request], arrived: simpy.Event):
        """Releases requests at their arrival times."""
        for r in requests:
            if r.arrival_s > self.env.now:
                yield self.env.timeout(max(r.arrival_s - self.env.now, 0.0))
            self.log("request_source", f"request {r.rid} arrives")
            waiting.append(r)
            if not self.arrival.triggered:
                self.arrival.succeed()

    def scheduler(self, requests: list[Request], waiting: list[Request]):
        """Admits requests into the running batch and runs forward steps until all are done."""
        running: list[Request] = []
        finished = 0
        while finished < len(requests):
            if not waiting and not running:
                self.arrival = self.env.event()
                yield self.arrival
                continue
            room = self.batch_size - len(running)
            if self.cfg.batching == "static" and running:
                room = 0
            admitted = waiting[:room]
            del waiting[:room]
            running += admitted
            for r in admitted:
                r.admitted_s = self.env.now
            if admitted:
                self.log("scheduler", "admit " + ",".join(str(r.rid) for r in admitted))
            new = [r for r in running if not r.prefilled]
            if new:
                rows = np.concatenate([r.prompt_rows for r in new])
                if len(rows):
                    yield from self.forward_step("prefill", rows, [(r, len(r.prompt_rows)) for r in new])
                for r in new:
                    r.prefilled = True
                    if len(r.prompt_rows):
                        r.token_s.append(self.env.now)
            decoding = [r for r in running if r.next_decode < len(r.decode_rows)]
            if decoding:
                rows = np.array([r.decode_rows[r.next_decode] for r in decoding])
                yield from self.forward_step("decode", rows, [(r, r.context + 1) for r in decoding])
                for r in decoding:
                    r.next_decode += 1
                    r.token_s.append(self.env.now)
            for r in [r for r in running if r.done]:
                running.remove(r)
                finished += 1
                self.log("scheduler", f"request {r.rid} done")

    def forward_step(self, phase: str, rows: np.ndarray, contexts: list[tuple[Request, int]]):
        """One forward pass of ``rows`` (trace rows) through every MoE layer.

        A layer whose work is all ready at its router (resident experts, cache hits, no
        prefetch) is played out by reserving its streams ahead at a virtual time ``t``; real
        simulated time catches up at the next layer that waits on a transfer, and at the end
        of the step. Nothing else touches those streams meanwhile, so the times are the same.
        """
        env = self.env
        start = t = env.now
        self.log("scheduler", f"{phase} step of {len(rows)} tokens")
        if self.cfg.kv_context == "plan":
            kv = self.model.kv_cache_bytes(self.plan.context_tokens, batch_size=len(contexts))
        else:
            kv = sum(self.model.kv_cache_bytes(ctx) for _, ctx in contexts)
        dense_by_gpu = self._dense_split(len(rows), kv)
        self._token_gpu = None
        ids = self.trace.expert_ids[rows]  # [n, L, K]
        gates = self.trace.gate_weights[rows] if self.trace.gate_weights is not None else None
        small = len(rows) <= 4  # pure Python beats numpy on a handful of tokens
        ids_list = ids.tolist() if small else None
        gates_list = gates.tolist() if (small and gates is not None) else None
        L = len(self.layers)
        recording = self.events is not None
        compute = self.stream(self.compute_id)
        single = len(dense_by_gpu) == 1
        dense_s = dense_by_gpu.get(self.compute_id, 0.0)
        for l in range(L):
            if small:
                routed = _route_small([r[l] for r in ids_list], None if gates_list is None else [g[l] for g in gates_list],
                                      self.E, self.K)
            else:
                routed = _route(ids[:, l, :], None if gates is None else gates[:, l, :], self.E)
            refs = None
            if self.layers[l].cache is not None:
                refs = ([r[l] for r in ids_list] if small else ids[:, l, :].tolist(),
                        None if gates is None else ([g[l] for g in gates_list] if small else gates[:, l, :].tolist()))
            block, jobs = self._classify(l, rows, routed, refs)
            if single:
                router_at = compute.reserve(dense_s, recording and f"attention L{l}", ready_s=t)
            else:
                router_at = max(self.stream(g).reserve(d, recording and f"attention L{l}", ready_s=t)
                                for g, d in dense_by_gpu.items())
            ep_end = self._all_to_all(l, ids[:, l, :], router_at) if len(self.gpus) > 1 else router_at
            prefetch = self.prefetch_name != "none" and l + 1 < L
            if not jobs and not prefetch:
                end = ep_end
                for dev, sec in block.items():
                    done = self.stream(dev).reserve(sec, recording and f"experts L{l}", ready_s=router_at)
                    end = max(end, done)
                self.layer_wall_s[l] += end - t
                t = end
                if recording:
                    self.log("layer_step", f"L{l} done", t)
                continue
            if not prefetch and self.play_ahead:
                end = self._played_ahead(l, router_at, block, jobs)
                if end is not None:
                    end = max(end, ep_end)
                    self.layer_wall_s[l] += end - t
                    t = end
                    if recording:
                        self.log("layer_step", f"L{l} done", t)
                    continue
            yield env.timeout(max(router_at - env.now, 0.0))
            self.log("layer_step", f"L{l} routed")
            waits = self._start(l, block, jobs, ids)
            if ep_end > router_at:
                waits.append(env.timeout(max(ep_end - env.now, 0.0)))
            if prefetch:  # after the layer's own fetches, which the copy engine serves first
                self.prefetcher(l + 1, rows, ids, [e for e, *_ in routed])
            yield env.all_of(waits)
            self.layer_wall_s[l] += env.now - t
            t = env.now
            self.log("layer_step", f"L{l} done")
        if t > env.now:
            yield env.timeout(max(t - env.now, 0.0))
        self.steps.append((phase, len(rows), start, env.now))

    def _dense_split(self, tokens: int, kv_bytes: float) -> dict[str, float]:
        """Per MoE layer, seconds of dense work on each GPU (attention is data parallel over them)."""
        G = len(self.gpus)
        out = {}
        for g in self.gpus:
            share = -(-tokens // G) if G > 1 else tokens
            dev = self.hw.devices[g]
            out[g] = dense_step_s(dev, self.model, self.dense_format, share, kv_bytes / G) / len(self.layers)
        return out

    def _classify(self, l: int, rows: np.ndarray, routed, refs):
        """Sort the step's experts at layer ``l`` into work ready at the router (``block``:
        device -> seconds) and work that waits on something (``jobs``); update the cache.

        The cache sees the step's accesses one by one, token after token in rank order (the
        contract of :mod:`profiles.workload.hitrate`, which the runtime follows too); an
        expert's first access in the step decides where it runs, later ones only count.
        ``refs``: ``(ids [n][K], gates [n][K] or None)`` of the step at this layer, as lists.
        """
        lay = self.layers[l]
        ep = len(self.gpus) > 1
        block: dict[str, float] = defaultdict(float)
        jobs: list = []
        local: list[tuple[int, int]] = []  # experts run where they live, by device below
        K, E = self.K, self.E
        first_hit: dict[int, bool] = {}
        if lay.cache is not None:
            cache, site_of = lay.cache, lay.site
            layer_ids, layer_gates = refs
            hits = accesses = 0
            for t, row in enumerate(layer_ids):
                p0 = int(rows[t]) * K  # positions in the workload: token x K + rank
                for k, e in enumerate(row):
                    if e < E and (site_of[e] == "fetch" or site_of[e] == "hybrid"):
                        h = cache.access(e, p0 + k, layer_gates[t][k] if layer_gates is not None else 1.0)
                        hits += h
                        accesses += 1
                        first_hit.setdefault(e, h)
            self.cache_access[l] += accesses
            self.cache_hit[l] += hits
        for e, n, g, _first in routed:
            self.expert_calls += 1
            self.expert_accesses += n
            site = lay.site[e]
            if site == "resident":
                self.resident_access[l] += n
                if not ep:  # with expert parallelism the all-to-all runs them (_all_to_all)
                    dev = lay.owners[e][0]
                    block[dev] += self.call_s(dev, lay.fmt[e], n)
            elif site == "fetch" or site == "hybrid":
                fmt = lay.cache_format or lay.fmt[e]
                if lay.cache is None:
                    self.cache_access[l] += n  # no slots: every access misses
                elif first_hit[e]:
                    pending = self.inflight.get((l, e))
                    if pending is not None and not pending.triggered:
                        jobs.append(("after", pending, e, n, fmt))
                    else:
                        block[self.compute_id] += self.call_s(self.compute_id, fmt, n)
                    continue
                action = self.miss(site, n, g, None if self.cfg.miss == "plan" else self._miss_costs(l, e))
                if action == "local":
                    self.local_access[l] += n
                    local.append((e, n))
                    if lay.cache is not None:
                        jobs.append(("fill", e))
                else:
                    jobs.append(("fetch", e, n, "int4" if action == "low-bit" else fmt))
            elif site == "local":
                self.local_access[l] += n
                local.append((e, n))
            else:  # stream: computed on the device once the layer's streamed weights are in
                block[self.compute_id] += self.call_s(self.compute_id, lay.fmt[e], n)
        by_device: dict[str, list] = defaultdict(list)
        for e, n in local:
            by_device[lay.owners[e][0]].append((e, n))
        for dev, calls in by_device.items():
            jobs.append(("local", dev, calls, min(len(rows), sum(n for _, n in calls))))
        if lay.streamed:
            jobs.append(("stream",))
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
        lay, net = self.layers[l], self.net
        recording = self.events is not None
        if check:
            saved = {name: (st.free_at_s, st.busy_s) for name, st in self.streams.items()}
            n_spans = len(self.spans) if self.spans is not None else 0
            n_events = len(self.events) if self.events is not None else 0
        moves: list[tuple[str, str, float, float, float, str, bool]] = []  # (src, dst, bytes, start, end, what, weights)

        def move(src: str, dst: str, n_bytes: float, start: float, what: str, weights: bool = True) -> float:
            end = start + net.transfer_s(src, dst, n_bytes)
            moves.append((src, dst, n_bytes, start, end, what, weights))
            return end

        end = router_at
        for dev, sec in block.items():
            end = max(end, self.stream(dev).reserve(sec, f"experts L{l}", ready_s=router_at))
        engine_free = router_at  # the copy engine takes fetches and fills in job order
        compute = self.stream(self.compute_id)
        for job in jobs:
            if job[0] == "fetch":
                _, e, n, fmt = job
                if recording:
                    self.log("expert_fetch", f"L{l}E{e} start", engine_free)
                engine_free = move(lay.home[e], self.compute_mem, self.expert_bytes(fmt), engine_free,
                                   f"L{l}E{e} {fmt}")
                if recording:
                    self.log("expert_fetch", f"L{l}E{e} arrived", engine_free)
                end = max(end, compute.reserve(self.call_s(self.compute_id, fmt, n), f"expert L{l}E{e}",
                                               ready_s=engine_free))
            elif job[0] == "fill":
                fmt = lay.cache_format or lay.fmt[job[1]]
                if recording:
                    self.log("expert_fetch", f"L{l}E{job[1]} start", engine_free)
                engine_free = move(lay.home[job[1]], self.compute_mem, self.expert_bytes(fmt), engine_free,
                                   f"L{l}E{job[1]} {fmt}")
                if recording:
                    self.log("expert_fetch", f"L{l}E{job[1]} arrived", engine_free)
                end = max(end, engine_free)
        for job in jobs:
            if job[0] == "local":
                _, dev, calls, tokens = job
                if any(self.hw.memories[lay.home[e]].tier == "nvme" for e, _ in calls):
                    break  # weights read from disk on the way: leave it to the processes
                dev_mem = self._dev_mem(dev)
                act = activation_bytes(self.model, tokens)
                ready = move(self.compute_mem, dev_mem, act, router_at, f"L{l} activations", False)
                stream = self.stream(dev)
                if self.spans is None:  # one reservation: the same end, fewer steps
                    ready = stream.reserve(sum(self.call_s(dev, lay.fmt[e], n) for e, n in calls), ready_s=ready)
                for e, n in calls if self.spans is not None else ():
                    ready = stream.reserve(self.call_s(dev, lay.fmt[e], n), f"expert L{l}E{e}", ready_s=ready)
                end = max(end, move(dev_mem, self.compute_mem, act, ready, f"L{l} results", False))
        else:
            if not check or not net.overlapping([m[:5] for m in moves]):
                for src, dst, n_bytes, start, stop, what, weights in moves:
                    net.account(src, dst, n_bytes, start, stop, what)
                    if weights:
                        self.bytes_moved[self.hw.memories[src].tier] += n_bytes
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

    def _all_to_all(self, l: int, ids: np.ndarray, router_at: float) -> float:
        """Expert parallelism at layer ``l``: when the layer's dispatch, expert work and combine end.

        Token i of a step starts on GPU ``i mod G`` (data-parallel attention). Each of its
        experts runs on a GPU holding a copy: its own GPU when it holds one, else copy
        ``source mod copies`` (a static per-source choice, as SGLang's static dispatch makes,
        which splits a replicated expert's tokens evenly over its copies). After the layer
        the token's combined output lives on its source GPU (``ep_token_home="attention"``,
        the usual dispatch/combine) or on the GPU of its first expert (``"expert"``: the
        ExFlow idea, where inter-layer affinity keeps the next dispatch local).
        Dispatch and combine are all-to-all exchanges of hidden states: every pair's bytes
        start together and share the links of their routes, so an exchange lasts as long as
        its most loaded link direction needs (a fluid model) plus the longest route latency.
        Each GPU runs its experts in order between the two.
        """
        plan = self._ep_plan(l)
        n = ids.shape[0]
        G = len(self.gpus)
        if self._token_gpu is None or len(self._token_gpu) != n:
            self._token_gpu = np.arange(n) % G
        src = self._token_gpu[:, None]  # [n, 1]
        real = ids < self.E
        e_ids = np.where(real, ids, self.E)  # zero experts: the sentinel row, no copies
        cand = plan["copies"][e_ids]  # [n, K, R] GPU indices holding a copy, -1 padded
        count = np.maximum((cand >= 0).sum(axis=2), 1)  # [n, K]
        static = np.take_along_axis(cand, (src % count)[:, :, None], axis=2)[:, :, 0]
        dst = np.where((cand == src[:, :, None]).any(axis=2), src, static)  # [n, K]
        srcs = np.broadcast_to(src, dst.shape)[real]
        dsts = dst[real]
        node = plan["node_of"]
        # tokens per (GPU, expert) and the hidden states each GPU pair exchanges
        work = np.bincount(dsts * self.E + e_ids[real], minlength=G * self.E).reshape(G, self.E)
        dispatch_pairs = np.bincount(srcs * G + dsts, minlength=G * G).reshape(G, G)
        home = np.where(real[:, 0], dst[:, 0], src[:, 0]) if self.cfg.ep_token_home == "expert" else src[:, 0]
        homes = np.broadcast_to(home[:, None], dst.shape)[real]
        combine_pairs = np.bincount(dsts * G + homes, minlength=G * G).reshape(G, G)
        self._token_gpu = home
        self.ep_tokens += int(real.sum())
        self.ep_cross_gpu += int((srcs != dsts).sum())
        self.ep_cross_node += int((node[srcs] != node[dsts]).sum())
        load = work.sum(axis=1)
        self.ep_load_ratio[l] += float(load.max() / max(load.mean(), 1e-300))
        self.ep_layer_steps[l] += 1
        dispatch = self._exchange(dispatch_pairs, router_at, f"dispatch L{l}")
        end = dispatch
        lay = self.layers[l]
        for g in np.nonzero(load)[0]:
            dev = self.gpus[g]
            sec = sum(self.call_s(dev, lay.fmt[e], int(c)) for e, c in zip(np.nonzero(work[g])[0],
                                                                          work[g][work[g] > 0]))
            end = max(end, self.stream(dev).reserve(sec, f"experts L{l}", ready_s=dispatch))
        return self._exchange(combine_pairs, end, f"combine L{l}")

    def _ep_plan(self, l: int) -> dict:
        """Per layer: ``copies[E, R]`` GPU indices holding each expert (-1 padded); ``node_of[G]``."""
        if l not in self._ep_cache:
            index = {g: i for i, g in enumerate(self.gpus)}
            owners = [[index[o] for o in own if o in index] for own in self.layers[l].owners]
            R = max(len(o) for o in owners)
            copies = np.full((self.E + 1, R), -1, np.int64)  # the last row: a never-used sentinel
            for e, own in enumerate(owners):
                copies[e, :len(own)] = own
            nodes = sorted({self.hw.devices[g].node for g in self.gpus})
            node_of = np.array([nodes.index(self.hw.devices[g].node) for g in self.gpus] + [-1])
            self._ep_cache[l] = {"copies": copies, "node_of": node_of}
        return self._ep_cache[l]

    def _exchange(self, pairs: np.ndarray, start: float, what: str) -> float:
        """An all-to-all of ``pairs[src, dst]`` hidden states starting at ``start``; returns its end."""
        moves = {}
        for s_i, d_i in zip(*np.nonzero(pairs)):
            if s_i != d_i:
                moves[(self._dev_mem(self.gpus[s_i]), self._dev_mem(self.gpus[d_i]))] = \
                    activation_bytes(self.model, int(pairs[s_i, d_i]))
        return self.net.exchange(moves, start, what)

    def prefetcher(self, l: int, rows: np.ndarray, step_ids: np.ndarray, current: np.ndarray) -> None:
        """Guesses layer ``l``'s experts for this step and starts fetching them into its cache."""
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
            lay.cache.insert(e, int(rows[0]) * self.K)
            self.log("prefetcher", f"L{l}E{e}")
            self.inflight[(l, e)] = self.env.process(self.expert_fetch(l, e, lay.cache_format or lay.fmt[e]))

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

    # ------------------------------------------------------------------ run

    def run(self) -> SimReport:
        wall = time.perf_counter()
        self.requests = _requests(self.trace, self.cfg, self.rng)
        waiting: list[Request] = []
        self.arrival = self.env.event()
        self.env.process(self.request_source(self.requests, waiting, self.arrival))
        done = self.env.process(self.scheduler(self.requests, waiting))
        self.env.run(until=done)
        return summarise(self, time.perf_counter() - wall)


def simulate(plan: Plan, hardware: Hardware, model: ModelSpec, trace: Trace,
             config: SimConfig | None = None) -> SimReport:
    """Replay ``trace`` on ``hardware`` (seen through the plan's engine profile) under ``plan``;
    see the module docstring."""
    hardware = load_engine(plan.inputs.engine).apply(hardware)
    return Simulation(plan, hardware, model, trace, config or SimConfig()).run()


# ---------------------------------------------------------------------------- helpers


def _check_inputs(plan: Plan, hw: Hardware, model: ModelSpec, trace: Trace) -> None:
    if len(plan.layers) != trace.num_layers:
        raise InputError("the trace and the plan disagree on the number of MoE layers", key="layers",
                         value=(trace.num_layers, len(plan.layers)), expected=str(len(plan.layers)),
                         fix="simulate with a trace of the plan's model")
    if plan.layers and len(plan.layers[0].home) != model.num_experts:
        raise InputError("the plan and the model disagree on the number of experts", key="layers[0].home",
                         value=len(plan.layers[0].home), expected=str(model.num_experts),
                         fix="simulate the plan with the model it was made for")
    for dev in (plan.compute_device, plan.host_device):
        if dev not in hw.devices:
            raise InputError("the plan names a device the hardware profile lacks", key="compute_device",
                             value=dev, expected=", ".join(hw.devices), fix="simulate on the plan's hardware profile")
    for lp in plan.layers:
        for home in set(lp.home) | {r for reps in lp.replicas for r in reps}:
            if home not in hw.memories:
                raise InputError("the plan names a memory the hardware profile lacks", key=f"layers[{lp.moe_layer}]",
                                 value=home, expected=", ".join(hw.memories),
                                 fix="simulate on the plan's hardware profile")


def _route_small(ids: list, gates: list | None, E: int, K: int) -> list[tuple[int, int, float, int]]:
    """:func:`_route` for a handful of tokens, in plain Python (``ids``: ``[n][K]`` lists)."""
    seen: dict[int, list] = {}
    for t, row in enumerate(ids):
        for k, e in enumerate(row):
            if e >= E:
                continue
            g = gates[t][k] if gates is not None else 1.0
            if e in seen:
                seen[e][1] += 1
                seen[e][2] += g
            else:
                seen[e] = [e, 1, g, t * K + k]
    return [(e, n, gsum / n, first) for e, n, gsum, first in seen.values()]


def _route(ids: np.ndarray, gates: np.ndarray | None, E: int) -> list[tuple[int, int, float, int]]:
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


def _requests(trace: Trace, cfg: SimConfig, rng: np.random.Generator) -> list[Request]:
    starts = np.concatenate([[0], np.cumsum(trace.seq_lens)[:-1]]).astype(np.int64)
    S = len(trace.seq_lens)
    n = cfg.requests or S
    if n < 1:
        raise InputError("at least one request is needed", key="--requests", value=n, expected=">= 1",
                         fix="pass --requests 1 or more")
    if cfg.arrival_rate_per_s is not None and cfg.arrival_rate_per_s <= 0:
        raise InputError("the arrival rate must be positive", key="--arrival-rate", value=cfg.arrival_rate_per_s,
                         expected="> 0 requests/s", fix="omit it for all requests at t = 0")
    if cfg.arrival_rate_per_s:
        arrivals = np.cumsum(rng.exponential(1.0 / cfg.arrival_rate_per_s, size=n))
    else:
        arrivals = np.zeros(n)
    out = []
    for i in range(n):
        s = i % S
        rows = np.arange(starts[s], starts[s] + trace.seq_lens[s])
        decode = trace.phase[rows] == DECODE
        out.append(Request(i, float(arrivals[i]), rows[~decode], rows[decode]))
    return out


def _frequency(trace: Trace, E: int) -> np.ndarray:
    """``[L, E]`` accesses per expert over the whole trace."""
    ids = trace.expert_ids.astype(np.int64)
    L = ids.shape[1]
    layer = np.broadcast_to(np.arange(L)[None, :, None], ids.shape)
    ok = ids < E
    return np.bincount((layer * E + ids)[ok], minlength=L * E).reshape(L, E).astype(float)


def _future_uses(trace: Trace, l: int) -> dict[int, list[int]]:
    """Positions (token x K + rank) at which layer ``l`` uses each expert, ascending."""
    ids = trace.expert_ids[:, l, :].astype(np.int64).ravel()
    order = np.argsort(ids, kind="stable")
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    return {int(ids[g[0]]): g.tolist() for g in np.split(order, bounds) if len(g)}


def _transitions(trace: Trace, E: int) -> np.ndarray:
    """``[L-1, E, E]`` counts of (expert at l, expert at l+1) pairs over the trace's tokens."""
    ids = trace.expert_ids.astype(np.int64)
    _T, L, K = ids.shape
    out = np.zeros((max(L - 1, 0), E, E))
    for l in range(L - 1):
        a = np.repeat(ids[:, l, :], K, axis=1).ravel()
        b = np.tile(ids[:, l + 1, :], (1, K)).ravel()
        ok = (a < E) & (b < E)
        out[l] = np.bincount(a[ok] * E + b[ok], minlength=E * E).reshape(E, E)
    return out


def _predictability(trace: Trace) -> float:
    from profiles.workload.stats import next_layer_predictability

    if trace.num_layers < 2:
        return 0.0
    recall = next_layer_predictability(trace.expert_ids.astype(np.int64), trace.num_experts,
                                       seq_lens=trace.seq_lens).recall
    return float(np.mean(recall))
