"""The planned expert store: a drop-in for a transformers 5 experts module.

Legend: R = rows (tokens) in the step, K = experts per token (top-k), E = routed experts,
H = hidden size, I = expert intermediate size.

transformers 5 MoE blocks (Mixtral, Qwen3-MoE, OLMoE, DeepSeek-V3) route and then call
``experts(hidden_states [R, H], top_k_index [R, K], top_k_weights [R, K]) -> [R, H]``; an
index equal to E is a null expert (skipped). :class:`PlannedExperts` has that signature and
computes what the eager experts compute, expert by expert in ascending id, each output
scaled by its gate weight and added into its tokens' rows, with every expert where the plan
puts it:

- ``resident``: weights on the compute device, computed by torch;
- ``fetch``: through the layer's cache; a miss copies the weights from their home (host
  DRAM, or the checkpoint / kernels file on disk) to the device;
- ``hybrid``: through the cache; a hit computes on the device, a miss computes on the CPU
  (ONNX Runtime) while the weights are copied into the cache in the background;
- ``local``: on the CPU through ONNX Runtime, from host memory (or read from disk);
- ``stream``: copied to the device at every step, used or not.

Cache accounting follows :mod:`cache` (rank order within a token, demand loading). The
first access of an expert in a step decides where it computes in that step.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .cache import ExpertCache
from .expert_home import HIGH_PLANE, ExpertHome, ExpertWeights
from .formats import UNPACK_FORMATS
from .metrics import MetricsRecorder
from .nested import assemble
from .planfile import QUANT_FORMATS, LayerSpec
from .prefetch import Fetcher, Slot
from .sessions import CACHED_EXPERT_THREADS, CpuLayerKernel, CpuStreamKernel
from .templates import kernel_format

# HIGH_PLANE, ExpertHome and ExpertWeights live in expert_home.py; named here as before
__all__ = ["HIGH_PLANE", "ExpertHome", "ExpertWeights", "Placeholder", "PlannedExperts"]


class Placeholder(nn.Module):
    """Parameter-less stand-in put into MoE blocks before the dense weights load."""

    def __init__(self, hidden_layer: int) -> None:
        super().__init__()
        self.hidden_layer = hidden_layer

    def forward(self, *args, **kwargs):  # pragma: no cover - replaced before any forward
        raise RuntimeError("the planned expert store was not attached to this layer")


class PlannedExperts(nn.Module):
    """One MoE layer's experts, as planned. Called like the transformers experts module.

    Args:
        spec: the layer's plan.
        home: where its weights come from.
        device: the torch device of the layer's plan device (``home.device_name``).
        act: the expert activation (``ACT2FN[config.hidden_act]``).
        hidden, inter: H and I.
        cache: the layer's cache bookkeeping.
        fetcher: the copy engine of the layer's plan device (shared by its layers).
        cpu_kernel: ORT session for host-homed CPU experts (or None).
        stream_kernels: format family -> ORT template session for disk-homed CPU experts.
        metrics: the shared recorder.
        layer_index: position of this layer in the plan (for metrics).
        threads: intra-op threads of the ONNX Runtime sessions this layer builds.
    """

    def __init__(self, spec: LayerSpec, home: ExpertHome, device: torch.device, act: Callable, hidden: int,
                 inter: int, cache: ExpertCache, fetcher: Fetcher, cpu_kernel: CpuLayerKernel | None,
                 stream_kernels: dict[str, CpuStreamKernel], metrics: MetricsRecorder, layer_index: int,
                 threads: int | None = None) -> None:
        super().__init__()
        self.spec, self.home, self.device, self.act = spec, home, device, act
        self.hidden, self.inter = hidden, inter
        self.cache, self.fetcher, self.metrics, self.layer_index = cache, fetcher, metrics, layer_index
        self.cpu_kernel, self.stream_kernels = cpu_kernel, stream_kernels
        self.templates, self.threads = home.kernels.templates, threads
        self.num_experts = spec.num_experts
        # loading moves bytes too; the runtime resets the metrics before the first step
        # resident experts the layer's ONNX Runtime session holds (a CPU compute device) run there
        self.resident_on_cpu = set(spec.experts_at("resident")) & set(cpu_kernel.experts if cpu_kernel else ())
        self.resident = {e: home.load(e, device) for e in spec.experts_at("resident") if e not in self.resident_on_cpu}
        self.slots: dict[int, Slot] = {}
        for e in cache.preloaded():  # static: loaded beforehand
            self.slots[e] = Slot(self._ready(home.load(e, device)))
        self._place()
        # set by the runtime (link_next): the next MoE layer's (router, store) for prefetching,
        # kept in a tuple so that nn.Module does not register them as children
        self._next: tuple[nn.Module, PlannedExperts] | None = None
        self.prefetch_policy = "none"
        self.oracle: Any = None  # [T, L, K] routing for oracle prefetch
        self.token_cursor = 0

    def _place(self) -> None:
        """Tell the metrics where this layer's experts are held and computed (``placement``)."""
        name, spec = self.home.device_name, self.spec
        for w in self.resident.values():
            for t in w.tensors.values():
                if t.device.type != self.device.type or self.device.index not in (None, t.device.index):  # a bug
                    raise RuntimeError(f"layer {spec.moe_layer}: a resident expert is on {t.device}, not {self.device}")
        host = self.metrics.host
        compute = {"resident": name, "fetch": name, "stream": name, "local": host, "hybrid": f"{name}|{host}"}
        record = {"moe_layer": spec.moe_layer, "hidden_layer": spec.hidden_layer, "device": name,
                  "torch_device": str(self.device),
                  "experts": [name if s == "resident" else h for s, h in zip(spec.site, spec.home)],
                  "compute": [compute[s] for s in spec.site], "cache_slots": self.cache.slots}
        resident = sum(w.nbytes for w in self.resident.values()) + sum(self.home.size(e) for e in self.resident_on_cpu)
        self.metrics.place(self.layer_index, record, resident)

    # -- the step ------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        rows = hidden_states.shape[0]
        on_device, on_cpu = self._route(top_k_index.tolist(), top_k_weights.tolist())
        for e in self.spec.experts_at("stream"):  # copied at every step, used or not
            if e in on_device:
                on_device[e] = self.fetcher.submit(lambda e=e: self.home.load(e, self.device, fetch=True), start=False)
            else:
                self.home.load(e, self.device, fetch=True)
        used = sorted(set(on_device) | on_cpu)
        where = {}
        for e in used:  # the eager module's order: by top-k position, then token
            pos, tok = torch.where(top_k_index.T == e)
            where[e] = (tok, pos)
        outputs: dict[int, torch.Tensor] = {}
        # launched first: on CUDA they overlap the CPU experts; the ready ones (resident, hits)
        # before those still being copied, whose copies overlap them (outputs are summed in
        # id order below, whatever order they were computed in)
        order = sorted(on_device, key=lambda e: (not on_device[e].ready, e))
        # this step's copies start one ahead of the compute, so at most two are staged at a time
        # (holding all of them at once, a prefill step that misses most of a layer held most of
        # its experts); the next layer's prefetches start after the last of them, as the
        # simulator orders them
        copies = [on_device[e] for e in order if not on_device[e].ready]
        prefetches = self._prefetch_next(hidden_states, rows)
        for slot in copies[:1] or prefetches:
            slot.start()
        for e in order:
            slot = on_device.pop(e)  # the step's last reference to a copy no cache slot keeps
            if copies and slot is copies[0]:
                copies.pop(0)
                for nxt in copies[:1] or prefetches:
                    nxt.start()
            outputs[e] = self._compute(slot.get(), hidden_states[where[e][0]])
        if on_cpu:
            outputs.update(self._run_cpu({e: hidden_states[where[e][0]] for e in on_cpu}, hidden_states))
        for e in used:
            tok, pos = where[e]
            y = outputs[e] * top_k_weights[tok, pos, None]
            # index_put_ rather than index_add_: the same sums (a token meets an expert once),
            # but index_add_ opens a parallel region even for one row (~50 us to wake torch's
            # threads on a CPU, milliseconds when other processes hold the cores)
            final.index_put_((tok,), y.to(final.dtype), accumulate=True)
        self.token_cursor += rows
        self.metrics.cache_held(self.layer_index, sum(self.home.size(e) for e in self.cache.members))
        return final

    def _compute(self, w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        """One expert on the compute device: ``x [T, H] -> y [T, H]``."""
        if w.kernel is not None:
            y = w.kernel.run({0: x.detach().to(torch.float32).numpy()})[0]
            return torch.from_numpy(y).to(x.dtype)
        gate_up, down = w.matrices(x.dtype, self.hidden, self.inter)
        gate, up = nn.functional.linear(x, gate_up).chunk(2, dim=-1)
        return nn.functional.linear(self.act(gate) * up, down)

    def _ready(self, w: ExpertWeights) -> ExpertWeights:
        """Weights entering the cache, made ready to compute.

        On a CPU compute device an int8/int4 expert gets its own ONNX Runtime session with
        the weights pre-packed (MatMulNBits), built as it is loaded (in the background when
        prefetched); dequantising at every call, or feeding the weights to a session with
        every call, measured 25-35x slower per call than a pre-packed session. The session
        runs on the calling thread (``CACHED_EXPERT_THREADS``: no thread pool to start on a
        miss and join on an eviction). The session
        copies the weights it is given (ONNX Runtime's ``AddExternalInitializers``), so the
        slot lets its read buffer go: holding both held each cached expert twice.
        """
        if self.device.type == "cpu" and w.fmt in QUANT_FORMATS:
            w.kernel = CpuLayerKernel(self.templates, {0: (w.fmt, w.numpy_inputs())}, threads=CACHED_EXPERT_THREADS)
            w.tensors = {}
        return w

    def _route(self, ids: list[list[int]], gates: list[list[float]]) -> tuple[dict[int, Slot], set[int]]:
        """Walk the accesses in order (tokens, then rank); decide where each expert runs
        (``gates``: their router weights; a low-gate miss may load a low-bit copy, miss_copy.py).

        Returns ``(device experts -> slot, CPU experts)``. Streamed experts are added later.
        """
        sites, cache, m, layer = self.spec.site, self.cache, self.metrics, self.layer_index
        on_device: dict[int, Slot] = {}
        on_cpu: set[int] = set()
        copies: dict[int, Slot] = {}  # experts copied in this step (fetched, or filled after a hybrid miss)
        counts: Counter = Counter()
        low = self.home.copies
        top = low.call_gates(ids, gates, self.num_experts) if low is not None else None  # the copy's rule
        for row, row_gates in zip(ids, gates):
            for e, g in zip(row, row_gates):
                if not 0 <= e < self.num_experts:
                    continue  # a null expert
                site = sites[e]
                first = e not in on_device and e not in on_cpu
                if e in self.home.low:  # nested fetch-low: the low plane comes (a miss, as the simulator counts it)
                    counts["miss"] += 1
                    if e not in on_device:  # once per step; its format (int8, int4) assembled from the planes
                        fmt = self.spec.format[e]
                        on_device[e] = self.fetcher.submit(lambda e=e, fmt=fmt: self._ready(ExpertWeights(
                            fmt, assemble(self.resident[e].tensors, self.home.load_low(e, self.device), fmt=fmt))),
                            start=False)
                    continue
                if site == "resident":
                    counts["resident"] += 1
                    if e in self.resident_on_cpu:
                        on_cpu.add(e)
                    else:
                        on_device.setdefault(e, Slot(self.resident[e]))
                    continue
                if site in ("local", "stream"):
                    counts["other"] += 1
                    if site == "local" and self.spec.prefill_offload and m.phase == "prefill" \
                            and self.spec.tier[e] == "host" and (not self.spec.prefill_copies
                                                                 or e in self.spec.prefill_copies):
                        # the plan's prefill site: copied for this pass (the CPU runs the others)
                        if e not in on_device:
                            on_device[e] = self.fetcher.submit(
                                lambda e=e: self._ready(self.home.load(e, self.device, fetch=True)), start=False)
                    elif site == "local":
                        on_cpu.add(e)
                    else:
                        on_device.setdefault(e, None)  # filled with this step's copy
                    continue
                hit, evicted, loaded = cache.access(e)
                counts["hit" if hit else "miss"] += 1
                for v in evicted:
                    self.slots.pop(v, None)
                if hit:
                    slot = self.slots[e]
                    if slot.prefetched:
                        slot.prefetched = False
                        m.count("prefetch_hits")
                    if first:
                        on_device[e] = slot
                elif site == "fetch":
                    # missed again within the step (evicted by a later token): the step's copy
                    # serves it, as in the simulator: one copy per expert and step
                    slot = on_device.get(e) or copies.get(e)
                    if slot is None and low is not None and low.loads(top[e]):  # its low-bit copy (kept by the slot)
                        slot = copies[e] = self.fetcher.submit(lambda e=e: self._ready(low.load(e, self.device)),
                                                               start=False)
                    if slot is None:  # copied in the background while the ready experts compute (forward starts it)
                        slot = copies[e] = self.fetcher.submit(
                            lambda e=e: self._ready(self.home.load(e, self.device, fetch=True)), start=False)
                    on_device[e] = slot
                    if loaded:
                        self.slots[e] = slot
                else:  # hybrid miss: the CPU computes, the weights come for next time
                    if first:
                        on_cpu.add(e)
                    if loaded:
                        slot = on_device.get(e) or copies.get(e)
                        if slot is None:
                            slot = copies[e] = self.fetcher.submit(
                                lambda e=e: self._ready(self.home.load(e, self.device, fetch=True)))
                        self.slots[e] = slot
        for kind, n in counts.items():
            m.access(layer, kind, n)
        return on_device, on_cpu

    def _run_cpu(self, xs: dict[int, torch.Tensor], like: torch.Tensor) -> dict[int, torch.Tensor]:
        """CPU experts through ONNX Runtime: host-homed in one layer session, disk-homed one by one."""
        host = {e: x.detach().to("cpu", torch.float32).numpy() for e, x in xs.items()}
        ys = {}
        in_session = {e: x for e, x in host.items() if self.cpu_kernel is not None and e in self.cpu_kernel.experts}
        if in_session:
            ys.update(self.cpu_kernel.run(in_session))
        for e in sorted(set(host) - set(in_session)):
            w = self.home.host.get(e) or self.home.load(e)  # disk experts are read on demand (counted)
            if w.fmt in UNPACK_FORMATS:  # no ONNX Runtime kernel: torch unpacks, then matmuls
                ys[e] = self._compute(w, torch.from_numpy(host[e])).detach().numpy()
            else:
                ys[e] = self.stream_kernels[kernel_format(w.fmt)].run(host[e], w.numpy_inputs())
        self.metrics.count("cpu_expert_calls", len(ys))
        return {e: torch.from_numpy(y).to(like.device, like.dtype) for e, y in ys.items()}

    # -- prefetching the next layer ------------------------------------------------------

    def link_next(self, router: nn.Module, store: PlannedExperts) -> None:
        """The next MoE layer: its router predicts, its cache receives the prefetches."""
        self._next = (router, store)

    def _prefetch_next(self, hidden_states: torch.Tensor, rows: int) -> list[Slot]:
        """Put the next layer's predicted experts into its cache; returns their copies, not
        started (the caller starts them after this layer's own)."""
        if self.prefetch_policy == "none" or self._next is None:
            return []
        router, nxt = self._next
        if not nxt.spec.cached or nxt.cache.slots <= 0:
            return []
        if self.prefetch_policy == "oracle" and self.oracle is not None:
            layer = nxt.layer_index
            chosen = self.oracle[self.token_cursor:self.token_cursor + rows, layer].reshape(-1).tolist()
        else:
            # Pre-gated style: the next layer's router applied to this layer's input
            with torch.no_grad():  # on the next layer's device: its router runs there
                chosen = router(hidden_states.to(nxt.device))[2].reshape(-1).tolist()
        ranked = [e for e, _ in Counter(e for e in chosen if 0 <= e < nxt.num_experts).most_common()]
        wanted = [e for e in ranked if nxt.spec.site[e] in ("fetch", "hybrid")][:nxt.cache.slots]
        deferred = []
        for e in wanted:
            loaded, evicted = nxt.cache.insert(e)
            for v in evicted:
                nxt.slots.pop(v, None)
            if loaded:
                nxt.slots[e] = nxt.fetcher.submit(  # over the next layer's device's link
                    lambda e=e: nxt._ready(nxt.home.load(e, nxt.device, prefetch=True)), prefetched=True, start=False)
                deferred.append(nxt.slots[e])
        return deferred
