"""The plan resolved against the hardware, and what things cost there, priced once per run.

Each plan layer becomes an :class:`simulator.experts.ExpertLayer` (who runs each expert,
which cache, what a copy moves); expert calls are priced by token count in one table per
(device, number format), copies and activation round trips per route and size, dense
steps per (tokens, KV bytes). Everything comes from :mod:`profiles.perf` and the topology
(:class:`simulator.resources.Network`); the caches only keep the simulator from asking twice.
"""

from __future__ import annotations

from itertools import compress
from typing import TYPE_CHECKING

import numpy as np

from profiles.errors import InputError
from profiles.nested import nested_call_s, nested_use, plane_format, plane_of
from profiles.perf import activation_bytes, dense_step_s, expert_calls_s, kv_host, miss_compute_s

from .experts import ExpertLayer
from .policies import make_cache
from .trace_stats import future_uses

if TYPE_CHECKING:
    from .scheduler import Request

__all__ = ["Costs", "Pricing"]


class Costs(dict):
    """Seconds of one expert call by its token count, for one device and number format;
    priced on first use, ``BLOCK`` token counts at a time, by ``price(tokens [n]) -> [n]``."""

    __slots__ = ("price",)
    BLOCK = 64

    def __init__(self, price) -> None:
        super().__init__()
        self.price = price

    def __missing__(self, tokens: int) -> float:
        lo = tokens - tokens % self.BLOCK
        self.update(zip(range(lo, lo + self.BLOCK), self.price(np.arange(lo, lo + self.BLOCK)).tolist()))
        return self[tokens]


class Pricing:
    """Resolution and prices of :class:`simulator.engine.Simulation` (a mixin: it reads
    ``hw``, ``model``, ``plan``, ``cfg``, ``trace``, ``net``, ``gpus``, ``layers``,
    ``compute_id``, ``compute_mem``, ``host_id``, ``eviction``, ``dense_format`` and ``_freq``)."""

    def _init_prices(self) -> None:
        self._costs: dict[tuple[str, str, bool], Costs] = {}
        self._bytes_cache: dict[str, float] = {}
        self._mem_cache: dict[str, str] = {}
        self._transfer_cache: dict[tuple[str, str, float], float] = {}
        self._copies: dict[tuple[str, str], tuple] = {}
        self._acts: dict[tuple[str, int], tuple] = {}
        self._kv: dict[int, float] = {}  # context tokens -> KV bytes of one request
        self._kv_plan: dict[int, float] = {}  # batch size -> KV bytes at the plan's context
        self._dense: dict[tuple[int, float, bool], dict[str, float]] = {}
        self._runners: dict[tuple[str, str, str], str] = {}
        # a copy's host CPU work taken from the compute device's cores, by (device, format) (miss_compute_s);
        # `steals`: whether there is any (the compute device is the host CPU, the engine states it)
        self._miss_cpu: dict[tuple[str, str], float] = {}
        self.steals = self.compute_id == self.host_id and self.hw.devices[self.host_id].miss_host_cpu_s != (0.0, 0.0)
        self._tier = {m: mem.tier for m, mem in self.hw.memories.items()}  # memory -> "hbm", "dram", "nvme", ...
        self._nvme = frozenset(m for m, tier in self._tier.items() if tier == "nvme")
        self._kv_on_host = None  # the plan's KV cache in host memory: where the engine reads it (profiles.perf.KVHost)
        if self.plan.kv_cache == "host":
            spec = self.engine.kv_offload
            if spec is None:
                raise InputError(f"engine {self.plan.inputs.engine} cannot keep the KV cache in host memory",
                                 key="kv_cache", value="host", fix="re-plan with planner optimize --kv-cache device")
            self._kv_on_host = kv_host(self.hw, self.plan.compute_device, self.plan.host_device, spec)

    def _resolve_layer(self, lp, l: int) -> ExpertLayer:
        # a layer's E experts share a few (home, site) and (device, format) pairs: each is
        # resolved once, its owners tuple and price table shared (they are only read)
        if any(lp.planes):  # nested experts (profiles.nested): fetch-low ones fetch their low plane at each use
            lp = self._nested_view(lp)
        runner = self._runner
        runs = {key: (runner(*key),) for key in set(zip(lp.home, lp.site))}
        owners = [runs[key] for key in zip(lp.home, lp.site)]
        for e, reps in enumerate(lp.replicas):
            if reps:
                owners[e] = (*owners[e], *(runner(r, lp.site[e]) for r in reps))
        cache = None
        if lp.cache_slots:
            future = future_uses(self.trace, l) if self.eviction == "belady" else None
            cache = make_cache(self.eviction, lp.cache_slots, future=future,
                               frequency=None if self._freq is None else self._freq[l])
        streamed = [e for e, s in enumerate(lp.site) if s == "stream"]
        on_disk = frozenset(compress(range(len(lp.home)), map(self._nvme.__contains__, lp.home)))
        lay = ExpertLayer(list(lp.site), list(lp.format), list(lp.home), owners, cache, lp.cache_format, streamed,
                          on_disk, miss_copy=lp.miss_copy)
        costs, compute = self.costs, self.compute_id
        table = {key: costs(*key) for key in set(zip(lay.runner, lay.fmt))}
        lay.local_cost = [table[key] for key in zip(lay.runner, lay.fmt)]
        # a hit, a fetched or a streamed expert runs on the compute device (None: where it lives)
        here = [lay.copy_format[e] if site in ("fetch", "hybrid") else lay.fmt[e] if site == "stream" else None
                for e, site in enumerate(lay.site)]
        # ... from the engine's expert cache if fetched (fetch, hybrid): at the cached experts' price
        cached = [site in ("fetch", "hybrid") for site in lay.site]
        table = {(fmt, c): costs(compute, fmt, c) for fmt, c in set(zip(here, cached)) if fmt is not None}
        lay.cost = [local if fmt is None else table[(fmt, c)] for fmt, c, local in zip(here, cached, lay.local_cost)]
        return lay

    def _nested_view(self, lp):
        """A layer with nested experts as the simulator runs it: a fetch-low expert is a ``fetch``
        expert of a cacheless layer (plan validation holds it so) homed in host DRAM whose copy
        moves the low plane and whose call runs at its format; a high one a resident expert
        whose call reads the high plane (:func:`profiles.nested.plane_format`, priced by
        :meth:`costs` and :meth:`expert_bytes` through :func:`profiles.nested.nested_use`)."""
        host = self.hw.memory_of(self.plan.host_device).id
        planes = [p or "both" for p in lp.planes]
        return lp.model_copy(update={
            "site": tuple("fetch" if p == "fetch-low" else s for p, s in zip(planes, lp.site)),
            "home": tuple(host if p == "fetch-low" else h for p, h in zip(planes, lp.home)),
            "format": tuple(plane_format(f, p) if p != "both" else f for p, f in zip(planes, lp.format)),
            "planes": ()})

    def _runner(self, memory_id: str, site: str) -> str:
        """The compute device that runs an expert homed in ``memory_id`` at ``site`` (cached)."""
        key = (memory_id, site, self.compute_id)  # a pipeline plan's layers have their own compute devices
        dev = self._runners.get(key)
        if dev is None:
            dev = self._runners[key] = self._find_runner(memory_id, site)
        return dev

    def _find_runner(self, memory_id: str, site: str) -> str:
        # a hybrid expert runs a miss where its weights live, as a local one does (its hits
        # run on the compute device from the cache)
        if site in ("fetch", "stream"):
            return self.compute_id
        mem = self.hw.memories[memory_id]
        if mem.id == self.compute_mem:
            return self.compute_id
        for d in mem.devices:
            if self.hw.devices[d].is_compute and (site in ("local", "hybrid") or self.hw.devices[d].kind == "gpu"):
                return d
        return self.host_id  # NVMe-resident experts computed "locally" run on the host CPU

    def costs(self, device_id: str, fmt: str, cached: bool = False) -> Costs:
        """Seconds of an expert call on ``device_id`` in ``fmt`` by token count (one table per pair;
        ``cached``: an expert run from the engine's expert cache, :func:`profiles.perf.efficiency_of`)."""
        if cached and self.hw.devices[device_id].cached_efficiency is None:
            cached = False  # the same price: one table
        table = self._costs.get((device_id, fmt, cached))
        if table is None and plane_of(fmt) is not None:  # a nested expert's call (profiles.nested)
            dev, (base, planes) = self.hw.devices[device_id], plane_of(fmt)
            table = self._costs[(device_id, fmt, cached)] = Costs(
                lambda tokens: nested_call_s(dev, self.model, base, planes, tokens))
        if table is None:
            dev, n_bytes, flops = self.hw.devices[device_id], self.model.expert_bytes(fmt), \
                self.model.expert_flops_per_token
            table = self._costs[(device_id, fmt, cached)] = Costs(  # the same floats as expert_call_s, by the array
                lambda tokens: expert_calls_s(dev, fmt, n_bytes, flops, tokens, cached))
        return table

    def call_s(self, device_id: str, fmt: str, tokens: int, cached: bool = False) -> float:
        return self.costs(device_id, fmt, cached)[tokens]

    def transfer_s(self, src: str, dst: str, n_bytes: float) -> float:
        """Seconds a transfer takes alone (:meth:`simulator.resources.Network.transfer_s`, cached)."""
        key = (src, dst, n_bytes)
        sec = self._transfer_cache.get(key)
        if sec is None:
            sec = self._transfer_cache[key] = self.net.transfer_s(src, dst, n_bytes)
        return sec

    def _copy(self, src: str, fmt: str) -> tuple:
        """An expert copy from memory ``src`` to the compute device: ``(path, bytes, seconds
        alone, source tier)`` (cached)."""
        info = self._copies.get((src, fmt, self.compute_mem))
        if info is None:
            n_bytes = self.expert_bytes(fmt)
            info = self._copies[(src, fmt, self.compute_mem)] = (self.net.path(src, self.compute_mem), n_bytes,
                                               self.transfer_s(src, self.compute_mem, n_bytes), self._tier[src])
        return info

    def _activations(self, device_id: str, tokens: int) -> tuple:
        """Hidden states of ``tokens`` tokens to a device and back: ``(path out, path back,
        bytes, seconds out, seconds back)``, each alone (cached)."""
        info = self._acts.get((device_id, tokens, self.compute_mem))
        if info is None:
            dev_mem, act, net = self._dev_mem(device_id), activation_bytes(self.model, tokens), self.net
            info = self._acts[(device_id, tokens, self.compute_mem)] = (
                net.path(self.compute_mem, dev_mem), net.path(dev_mem, self.compute_mem), act,
                self.transfer_s(self.compute_mem, dev_mem, act), self.transfer_s(dev_mem, self.compute_mem, act))
        return info

    def _hop_s(self, src: str, dst: str, tokens: int) -> float:
        """Seconds the step's hidden states (bf16) take from device ``src`` to ``dst`` (a pipeline
        plan's hop; planner.multi_gpu.hop_s prices the same route)."""
        if src == dst:
            return 0.0
        return self.transfer_s(self._dev_mem(src), self._dev_mem(dst), tokens * self.model.hidden_size * 2)

    def miss_compute_s(self, fmt: str) -> float:
        """Compute-device seconds one copy of a ``fmt`` expert takes from the compute: its host
        CPU work where the compute device is the host CPU (:func:`profiles.perf.miss_compute_s`,
        as the planner prices it); the bytes are :meth:`expert_bytes`'s (a nested low plane)."""
        key = (self.compute_id, fmt)  # a pipeline's layers compute on their own devices
        w = self._miss_cpu.get(key)
        if w is None:
            w = self._miss_cpu[key] = miss_compute_s(self.hw.devices[self.compute_id], self.hw.devices[self.host_id],
                                                     self.expert_bytes(fmt))
        return w

    def expert_bytes(self, fmt: str) -> float:
        n_bytes = self._bytes_cache.get(fmt)
        if n_bytes is None:
            nested = plane_of(fmt)  # a nested expert: what a copy moves (low plane), what the device holds (high)
            use = nested_use(self.model, *nested) if nested is not None else None
            n_bytes = self._bytes_cache[fmt] = float(self.model.expert_bytes(fmt)) if use is None else \
                use.fetch_bytes or use.device_bytes
        return n_bytes

    def _dev_mem(self, device_id: str) -> str:
        """The memory pool of a device (cached)."""
        if device_id not in self._mem_cache:
            self._mem_cache[device_id] = self.hw.memory_of(device_id).id
        return self._mem_cache[device_id]

    def _kv_bytes(self, contexts: list[tuple[Request, int]]) -> float:
        """KV cache the step's attention reads: every request's context, or the plan's (cached per size)."""
        kv = self._kv
        if self.cfg.kv_context == "plan":
            n = len(contexts)
            if n not in self._kv_plan:
                self._kv_plan[n] = self.model.kv_cache_bytes(self.plan.context_tokens, batch_size=n)
            return self._kv_plan[n]
        for _, ctx in contexts:
            if ctx not in kv:
                kv[ctx] = self.model.kv_cache_bytes(ctx)
        return sum(kv[ctx] for _, ctx in contexts)

    def _dense_split(self, tokens: int, kv_bytes: float, prefill: bool = False,
                     gpus: tuple[str, ...] | None = None) -> dict[str, float]:
        """Per MoE layer, seconds of dense work on each GPU (attention is data parallel over them; cached).
        ``gpus``: these instead of ``self.gpus`` (a pipeline layer's own device)."""
        key = (tokens, kv_bytes, prefill, gpus)
        out = self._dense.get(key)
        if out is not None:
            return out
        out = self._dense[key] = {}
        if gpus is None and len(self.gpus) > 1 and self.plan.attention_shares is not None:
            # expert parallelism with planned attention shares: each GPU its tokens and their KV
            # (Plan.attention_counts, as the all-to-all sends them); a GPU with none runs no attention
            for g, n in zip(self.gpus, self.plan.attention_counts(tokens, self.gpus)):
                if n:
                    out[g] = dense_step_s(self.hw.devices[g], self.model, self.dense_format, n, kv_bytes * n / tokens,
                                          prefill=prefill, kv_on_host=self._kv_on_host) / len(self.layers)
            return out
        gpus = self.gpus if gpus is None else gpus
        G = len(gpus)
        for g in gpus:
            share = -(-tokens // G) if G > 1 else tokens
            dev = self.hw.devices[g]
            out[g] = dense_step_s(dev, self.model, self.dense_format, share, kv_bytes / G,
                                  prefill=prefill, kv_on_host=self._kv_on_host) / len(self.layers)
        return out
