"""The discrete-event model: a workload replayed on the hardware under a Plan (SimPy).

Legend: L = MoE layers, E = routed experts, K = top-k, T = trace tokens, n = tokens in a step.

The story of a token, one SimPy process per actor:

1. ``request_source`` releases requests (the workload's sequences): all at t = 0 (closed
   loop), or with Poisson arrivals at ``arrival_rate_per_s``.
2. ``scheduler`` batches them by the run's scheduler policy (:mod:`simulator.schedulers`:
   continuous batching up to ``batch_size`` running requests, static batches, vLLM's
   prefill-first or Sarathi's chunked prefill) while the KV cache (:mod:`simulator.kv_cache`,
   paged blocks in the memory the plan leaves) has room, preempting by the engine's rule
   when it runs out, and runs forward steps of prefill, decode or both.
3. ``layer_step`` (per MoE layer): attention and the dense share of the step run on the
   compute stream; the router's choices come from the trace; each distinct expert of the
   step then runs by its planned site: ``resident`` on the compute stream; ``fetch`` and
   ``hybrid`` through the layer's expert cache (a hit runs on the compute stream; a miss
   starts an ``expert_fetch`` over the route from its home, or for ``hybrid`` runs
   ``local_expert`` on the CPU while the fetch refills the cache); ``local`` on the device
   where it lives, activations crossing the link; ``stream`` copies every streamed expert
   of the layer each step. The layer ends when all of its work and transfers have.
4. ``prefetcher``: after layer l's router, guesses layer l+1's experts (policy registry)
   and fetches them into l+1's cache on the copy engine, overlapping l's compute; the
   ``transition`` guesses only as far as the link's idle time during layer l allows.

Costs come from :mod:`profiles.perf`, the planner's performance model. Kernels on one
stream run in issue order; transfers share link bandwidth (:mod:`simulator.resources`).
Everything random draws from one seeded generator, so runs are deterministic.

With expert parallelism (experts homed on several GPUs), tokens are spread over the GPUs
for attention (data parallel) and every layer dispatches each token to the GPUs that own
its experts and combines the results back (all-to-all on the topology).

This module holds the configuration, the simulation's state and its resources; the
actors live beside it, one concept each, as mixins of :class:`Simulation`:
:mod:`simulator.scheduler` (request source and scheduler, the KV pool),
:mod:`simulator.forward` (the forward step through the layers), :mod:`simulator.op_offload`
(prompts in micro-batches, host-held experts run on the GPU after a copy),
:mod:`simulator.experts` (the expert cache: hit or fetch, then compute),
:mod:`simulator.prefetcher`, :mod:`simulator.expert_parallel` (all-to-all), with the plan
resolved and priced in :mod:`simulator.pricing`, the router's choices in
:mod:`simulator.routing` and what the policies know of the trace in
:mod:`simulator.trace_stats`.

Speed: a layer costs events only when they are needed. Its work is classified once per
(layer, experts) in one-token steps; a layer whose transfers cannot meet is worked out
ahead on a virtual clock (:mod:`simulator.ahead`); one whose transfers meet is replayed by
:mod:`simulator.contention` with the processes' own arithmetic. Processes play out the
rest (prefetching, streamed experts, experts read from disk, recording), and
``play_ahead = False`` plays out every layer with waiting work. A one-token step with
nothing in flight runs its layers in one loop (:mod:`simulator.step_ahead`) until one
needs events; in it a layer whose experts are all fetched (through an LRU cache or none)
is served, classified and booked in one pass (``_lru_fetches``). An LRU cache serves a
long step (a prefill) in numpy (:mod:`simulator.lru_steps`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import simpy

from planner.plan import Plan
from profiles.engines import Engine, load_engine
from profiles.errors import InputError
from profiles.hardware import Hardware
from profiles.models import ModelSpec
from profiles.workload.drop import drop_experts
from profiles.workload.trace import Trace

from .contention import Contention
from .dram import contend_dram
from .expert_parallel import ExpertParallel
from .experts import ExpertWork
from .forward import ForwardStep
from .metrics import SimReport, summarise
from .one_pass import OnePass
from .op_offload import OpOffload
from .policies import miss_policy, prefetch_policy
from .prefetcher import Prefetcher
from .pricing import Pricing
from .resources import Network, Span, Stream
from .scheduler import Request, RequestFlow, requests_of
from .trace_stats import frequency, predictability, transitions

__all__ = ["SimConfig", "Simulation", "simulate"]


@dataclass(frozen=True)
class SimConfig:
    """What to replay and which policies run. ``None`` means: as the plan says.

    Attributes:
        batch_size: most requests running at once (default: the plan's batch size).
        requests: requests to replay (default: every sequence of the trace; more wrap around).
        arrival_rate_per_s: Poisson arrivals; ``None`` releases every request at t = 0.
        batching: the scheduler policy (:data:`simulator.schedulers.SCHEDULER`): ``continuous``
            (admit as slots free up), ``static`` (whole batches), ``vllm`` (prefill first),
            ``sarathi`` (chunked prefill).
        chunk_tokens: ``sarathi``: tokens per step (default 512); ``vllm``: most prompt
            tokens a prefill step admits (default: no limit).
        kv_blocks, kv_bytes: the KV cache's size in blocks, or in bytes (default: the memory
            the plan leaves on the compute device).
        preemption: ``recompute`` or ``swap`` in place of the engine's mode.
        eviction, prefetch, miss: policy names (see :mod:`simulator.policies`).
        prefetch_accuracy: the ``next-layer`` predictor's per-expert accuracy (default:
            the workload's next-layer predictability, as the planner assumes).
        transition_top_p: coverage of the ``transition`` prefetcher.
        kv_context: ``actual`` (each request's real context) or ``plan`` (every request at the
            plan's context length, as the planner prices it).
        ep_token_home: expert parallelism: where a token's output is combined after each
            layer: ``attention`` (its data-parallel GPU) or ``expert`` (its first expert's GPU).
        ep_reroute: expert parallelism: send each call to its expert's copy on the GPU with the
            least work so far in the layer (LLEP), not a static copy (False: SGLang's static).
        ep_rebalance_every: expert parallelism: re-place the experts with EPLB every this many
            decode steps, from the routing seen since the last re-placement (None: never).
        dram_contention: host DRAM as one port shared by CPU expert reads and copies
            (:mod:`simulator.dram`); ``None``: as the plan was priced.
        pd_role: prefill/decode disaggregation (:mod:`simulator.pd`): ``"prefill"`` runs each
            request's prompt only; ``"decode"``: requests arrive prefilled (their prompt's KV
            sent from a prefill pool) and decode the rest; ``None``: both, colocated.
        arrivals_s: each request's arrival time (the decode pool's: when its KV landed);
            ``None``: from ``arrival_rate_per_s``.
        seed: for arrivals and imperfect predictors.
        record: keep every kernel and transfer (Chrome trace) and the event log.
    """

    batch_size: int | None = None
    requests: int | None = None
    arrival_rate_per_s: float | None = None
    batching: str = "continuous"
    chunk_tokens: int | None = None
    kv_blocks: int | None = None
    kv_bytes: float | None = None
    preemption: str | None = None
    eviction: str | None = None
    prefetch: str | None = None
    miss: str = "plan"
    prefetch_accuracy: float | None = None
    transition_top_p: float = 0.8
    kv_context: str = "actual"
    ep_token_home: str = "attention"
    ep_reroute: bool = False
    ep_rebalance_every: int | None = None
    # host DRAM as one port shared by CPU expert reads and copies (simulator.dram); None: as
    # the plan was priced (its inputs.dram_contention)
    dram_contention: bool | None = None
    pd_role: str | None = None  # "prefill" or "decode" in a disaggregated run (simulator.pd)
    arrivals_s: tuple[float, ...] | None = None
    seed: int = 0
    record: bool = False


class Simulation(RequestFlow, ForwardStep, OpOffload, Pricing, ExpertWork, OnePass, Contention, ExpertParallel,
                 Prefetcher):
    """One replay of a workload under a plan. Use :func:`simulate`."""

    play_ahead = True  # work out event-free layers without events (False: always play them out)

    def __init__(self, plan: Plan, hardware: Hardware, model: ModelSpec, trace: Trace, config: SimConfig,
                 engine: Engine | None = None) -> None:
        self._engine = engine  # the plan's engine profile (loaded when first asked for: ``engine``)
        _check_inputs(plan, hardware, model, trace)
        # a plan that drops experts (planner.task): their accesses run nothing, as zero-computation ones
        trace = drop_experts(trace, plan.dropped_experts, model.num_experts)
        self.plan, self.hw, self.model, self.trace, self.cfg = plan, hardware, model, trace, config
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
        # the gate weights decide misses: a miss policy other than "plan", or a plan's low-bit
        # copies (LayerPlan.miss_copy, profiles.miss_copy: a low-gate miss loads the copy)
        self.reads_gates = config.miss != "plan" or any(lp.miss_copy is not None for lp in plan.layers)
        self._init_prices()
        # cache-less layers' classified work (see simulator.experts); the miss policies other
        # than "plan" may read the gate weights, so they classify every time
        self._plain_memo: list[dict] | None = [{} for _ in plan.layers] if not self.reads_gates else None
        self._memo_lookups, self._memo_probed = 0, False
        self._ep_cache: dict[int, dict] = {}
        self._token_gpu: np.ndarray | None = None  # expert parallelism: where each token of the step is
        self._distinct: np.ndarray | None = None  # routing.distinct_rows of the trace, once a step has one token
        self._freq = frequency(trace, self.E) if self.eviction == "static" else None
        # a multi-GPU pipeline plan (Plan.layer_devices): each layer runs on its device, which
        # becomes compute_id while the layer runs; activations hop between devices
        self.layer_dev = [plan.device_of(l) for l in range(len(plan.layers))]
        self.layer_mem = [hardware.memory_of(d).id for d in self.layer_dev]
        self.pipeline = len(set(self.layer_dev)) > 1
        self.layers = []
        for l, lp in enumerate(plan.layers):
            self.compute_id, self.compute_mem = self.layer_dev[l], self.layer_mem[l]
            self.layers.append(self._resolve_layer(lp, l))
        self.compute_id, self.compute_mem = plan.compute_device, hardware.memory_of(plan.compute_device).id
        self.gpus = [self.compute_id] if self.pipeline else \
            sorted({d for lay in self.layers for own in lay.owners for d in own
                    if hardware.devices[d].kind == "gpu"} | {self.compute_id}
                   | {d for lp in plan.layers for d in lp.owner})
        # expert parallelism with offload (LayerPlan.owner): each GPU serves its experts in the all-to-all
        self.ep_offload = any(lp.owner for lp in plan.layers)
        self.inflight: dict[tuple[int, int], simpy.Event] = {}
        self.accuracy = config.prefetch_accuracy
        if self.accuracy is None and self.prefetch_name == "next-layer":
            self.accuracy = predictability(trace)
        self._transitions = transitions(trace, self.E) if self.prefetch_name == "transition" else None
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
        contend = plan.inputs.dram_contention if config.dram_contention is None else config.dram_contention
        self.dram = contend_dram(self) if contend else None  # off: no hook at all

    # ------------------------------------------------------------------ resources

    @property
    def engine(self) -> Engine:
        """The plan's engine profile, loaded once per run (``load_engine`` hashes its file each time)."""
        if self._engine is None:
            self._engine = load_engine(self.plan.inputs.engine)
        return self._engine

    def stream(self, device_id: str) -> Stream:
        if device_id not in self.streams:
            self.streams[device_id] = Stream(self.env, device_id, self.spans)
        return self.streams[device_id]

    def copy_engine(self, device_id: str) -> simpy.Resource:
        """The device's host-to-device copy engine: its transfers run one after another."""
        if device_id not in self.copy_engines:
            self.copy_engines[device_id] = simpy.Resource(self.env, capacity=1)
        return self.copy_engines[device_id]

    def log(self, actor: str, what: str, at_s: float | None = None) -> None:
        if self.events is not None:
            self.events.append((self.env.now if at_s is None else at_s, actor, what))

    # ------------------------------------------------------------------ run

    def run(self) -> SimReport:
        wall = time.perf_counter()
        self.requests = requests_of(self.trace, self.cfg, self.rng)
        self.kv, self.swapped = self._kv_pool(), []
        waiting: list[Request] = []
        self.arrival = self.env.event()
        self.env.process(self.request_source(self.requests, waiting, self.arrival))
        done = self.env.process(self.scheduler(self.requests, waiting))
        self.env.run(until=done)
        self._settle_memo()
        return summarise(self, time.perf_counter() - wall)


def simulate(plan: Plan, hardware: Hardware, model: ModelSpec, trace: Trace,
             config: SimConfig | None = None) -> SimReport:
    """Replay ``trace`` on ``hardware`` (seen through the plan's engine profile) under ``plan``;
    see the module docstring."""
    engine = load_engine(plan.inputs.engine)
    return Simulation(plan, engine.apply(hardware), model, trace, config or SimConfig(), engine).run()


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
