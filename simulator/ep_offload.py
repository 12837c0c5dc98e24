"""Expert parallelism with offload: each GPU serves its own experts as one node would.

An expert-parallel plan with offload (:mod:`planner.cluster.offload`) names per expert the
GPU that serves it (``LayerPlan.owner``) and per layer each GPU's cache
(``LayerPlan.gpu_caches``). After the dispatch, GPU g works out its share of the layer:

* ``resident`` experts, and cache hits, run on g's stream;
* a ``fetch`` miss (no cache: every access) copies the expert from its home over the route
  to g's memory, then runs on g; ``stream`` experts cross every step, used or not;
* a ``hybrid`` miss runs on the host CPU while its weights refill g's cache (not waited for);
* ``local`` experts run on the CPU of their home's node: g's tokens cross to it and back.

The copies of a GPU start at the router (the owner of every expert is fixed, so each GPU
knows what it will serve as soon as the router has run) and are one fluid exchange over the
network (:meth:`simulator.resources.Network.exchange`); compute waits for them and for the
dispatch. The host CPU is one stream shared by the node's GPUs. Everything is worked out
ahead, without events, as the all-to-all is.
"""

from __future__ import annotations

import numpy as np

from profiles.errors import InputError
from profiles.perf import activation_bytes

from .policies import make_cache

__all__ = ["EPOffload"]

EVICTIONS = ("lru", "lfu", "score")  # the policies a GPU cache is built with from its slots alone


class EPOffload:
    """Per-GPU offload of an EP plan (a mixin of :class:`simulator.expert_parallel.ExpertParallel`:
    reads ``plan``, ``hw``, ``model``, ``net``, ``stream``, ``call_s``, ``expert_bytes``,
    ``_dev_mem``, ``eviction`` and the metrics counters of the simulation)."""

    def _ep_offloads(self, l: int) -> bool:
        """Whether layer ``l`` of the plan serves experts per GPU with offload."""
        return bool(self.plan.layers[l].owner)

    def _ep_gpu_end(self, l: int, gpu: str, experts: np.ndarray, tokens: np.ndarray, ids: np.ndarray,
                    router_at: float, dispatch_s: float) -> float:
        """When GPU ``gpu`` has served its ``experts`` (``tokens[i]`` tokens each) at layer ``l``;
        ``ids``: ``[n, K]`` the step's routing at the layer (for the cache's access order)."""
        lp = self.plan.layers[l]
        caches = self.__dict__.setdefault("_ep_caches", {})
        spec = next((c for c in lp.gpu_caches if c.device == gpu), None)
        key = (l, gpu)
        if key not in caches:
            if spec is not None and self.eviction not in EVICTIONS:
                raise InputError("an expert-parallel plan with offload simulates its GPU caches with "
                                 + ", ".join(EVICTIONS), key="--eviction", value=self.eviction,
                                 expected=", ".join(EVICTIONS), fix="pick one of them, or drop --eviction")
            caches[key] = make_cache(self.eviction, spec.slots) if spec is not None else None
        cache = caches[key]
        mem = self._dev_mem(gpu)
        mine = [e for e, o in enumerate(lp.owner) if o == gpu]
        cached = frozenset(e for e in mine if lp.site[e] in ("fetch", "hybrid"))
        first_hit: dict[int, bool] = {}
        if cache is not None and cached:
            # positions by the step's order (only the trace-aware policies, not offered here, read rows)
            first_hit, hits, accesses = cache.serve(ids.tolist(), None, range(ids.shape[0]), ids.shape[1],
                                                    len(lp.site), cached)
            self.cache_access[l] += accesses
            self.cache_hit[l] += hits
        ready_s = waits_s = 0.0  # GPU seconds ready at the dispatch / waiting for copies
        copies: dict[tuple[str, str], float] = {}
        fills: dict[tuple[str, str], float] = {}
        local: dict[str, list] = {}  # CPU -> [seconds, tokens]
        for e, n in zip(experts.tolist(), tokens.tolist()):
            site, fmt = lp.site[e], lp.format[e]
            self.expert_calls += 1
            self.expert_accesses += n
            if site == "resident":
                ready_s += self.call_s(gpu, fmt, n)
                self.resident_access[l] += n
                continue
            if site in ("fetch", "hybrid"):
                moved = spec.format if spec is not None else fmt
                if cache is None:
                    self.cache_access[l] += n  # no slots: every access misses
                if first_hit.get(e, False):
                    ready_s += self.call_s(gpu, moved, n)
                    continue
                route = (lp.home[e], mem)
                if site == "fetch":
                    copies[route] = copies.get(route, 0.0) + self.expert_bytes(moved)
                    waits_s += self.call_s(gpu, moved, n)
                    continue
                if cache is not None:
                    fills[route] = fills.get(route, 0.0) + self.expert_bytes(moved)
            elif site == "stream":
                waits_s += self.call_s(gpu, fmt, n)  # its bytes are counted with the layer's streamed ones below
                continue
            cpu = self._cpu_of(lp.home[e])  # local, or a hybrid miss
            entry = local.setdefault(cpu, [0.0, 0])
            entry[0] += self.call_s(cpu, fmt, n)
            entry[1] += n
            self.local_access[l] += n
        for e in mine:
            if lp.site[e] == "stream":
                route = (lp.home[e], mem)
                copies[route] = copies.get(route, 0.0) + self.expert_bytes(lp.format[e])
        for moves in (copies, fills):
            for (src, _), n_bytes in moves.items():
                self.bytes_moved[self.hw.memories[src].tier] += n_bytes
        arrived = self.net.exchange(copies, router_at, f"ep fetch L{l} {gpu}") if copies else router_at
        if fills:
            self.net.exchange(fills, router_at, f"ep fill L{l} {gpu}")
        stream = self.stream(gpu)
        end = stream.reserve(ready_s, f"experts L{l}", ready_s=dispatch_s) if ready_s else dispatch_s
        if waits_s:
            end = max(end, stream.reserve(waits_s, f"fetched experts L{l}", ready_s=max(dispatch_s, arrived)))
        for cpu, (sec, n) in local.items():
            act = activation_bytes(self.model, min(n, ids.shape[0]))
            cpu_mem = self._dev_mem(cpu)
            there = self.net.exchange({(mem, cpu_mem): act}, dispatch_s, f"to CPU L{l} {gpu}")
            done = self.stream(cpu).reserve(sec, f"local experts L{l} {gpu}", ready_s=there)
            end = max(end, self.net.exchange({(cpu_mem, mem): act}, done, f"from CPU L{l} {gpu}"))
        return end

    def _cpu_of(self, memory_id: str) -> str:
        """The compute device of a host memory (its CPU), else the plan's host device."""
        for d in self.hw.memories[memory_id].devices:
            if self.hw.devices[d].is_compute:
                return d
        return self.plan.host_device
