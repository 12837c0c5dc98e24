"""Op offload in the simulator: prompts in the engine's micro-batches, host-held experts
copied to the GPU and run there once a forward step is large enough.

An engine with op offload (:class:`profiles.engines.OpOffload`, llama.cpp) processes a
prompt in micro-batches of ``micro_batch_tokens`` tokens, each a forward step of its own
(:meth:`OpOffload.prefill`). In a forward step of at least ``min_batch_tokens`` tokens on a
GPU (:func:`profiles.perf.op_offloads`), a layer's experts that would run where they live in
host DRAM (site ``local``) are copied to the compute device instead -- the experts the step
uses (``used-experts``) or all of them (``whole-tensor``), in one transfer over the route
from host memory on the copy engine -- and then run on the compute stream: the copy first,
then the computation. That is the order of :mod:`simulator.experts`' ``stream`` work, so
such a step runs on a second resolution of the layers whose host-held ``local`` experts are
``stream`` experts, and the layer's stream copy moves those bytes (:meth:`OpOffload.stream_in`).
The planner prices the same (:func:`planner.prefill_costs.prefill_s`).

A plan's own prefill sites (``Plan.prefill_offload``, planner.prefill_sites, for an engine
without op offload) run a prompt's pass the same way, for the layers it names only, copying
the experts the pass uses (of ``Plan.prefill_copies`` where it names them: the host CPU runs
the layer's other ``local`` experts meanwhile); decode steps run at the decode sites.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from profiles.engines import OpOffload as OpOffloadSpec
from profiles.perf import micro_batches, op_offloads

if TYPE_CHECKING:
    from .scheduler import Request

__all__ = ["OpOffload"]


class OpOffload:
    """The op-offload actors of :class:`simulator.engine.Simulation` (a mixin: it reads
    ``plan``, ``engine``, ``hw``, ``trace``, ``model``, ``layers``, ``compute_id``, ``compute_mem``,
    ``host_id``, ``net`` and ``bytes_moved``, and calls ``forward_step`` and ``_resolve_layer``)."""

    _offload_spec: OpOffloadSpec | None | bool = False  # False: not looked up yet
    _offload_layers: list | None = None  # the layers with host-held local experts as stream experts
    _offload_host: list[np.ndarray | None] | None = None  # per layer: [E] whether an expert is offloaded
    _offload_copy: dict[int, float] | None = None  # during an offloaded step: layer -> bytes its copy moves

    @property
    def op_offload(self) -> OpOffloadSpec | None:
        """The plan's engine's op offload (None: it has none, or the compute device shares host memory)."""
        if self._offload_spec is False:
            spec = self.engine.op_offload
            host_mem = self.hw.memory_of(self.host_id).id
            self._offload_spec = None if host_mem == self.compute_mem else spec
        return self._offload_spec

    def prefill(self, new: list[Request], rows: np.ndarray):
        """The prompts of ``new`` (trace ``rows``, concatenated) in the engine's micro-batches:
        one forward step each, attention reading each request's prompt so far."""
        spec = self.op_offload
        sizes = micro_batches(len(rows), spec.micro_batch_tokens if spec is not None else None)
        ends = np.cumsum([len(r.prefill_rows) for r in new])  # where each prompt ends in rows
        start = 0
        for n, count in sizes:
            for _ in range(count):
                stop = start + n
                contexts = [(r, int(min(end, stop) - (end - len(r.prefill_rows)))) for r, end in zip(new, ends)
                            if end - len(r.prefill_rows) < stop and end > start]
                yield from self.forward("prefill", rows[start:stop], contexts)
                start = stop

    def forward(self, phase: str, rows: np.ndarray, contexts: list[tuple[Request, int]]):
        """:meth:`simulator.forward.ForwardStep.forward_step`, on the offloading resolution of
        the layers when the engine offloads a step of this many tokens."""
        planned = phase == "prefill" and self.plan.prefill_offload is not None and self.op_offload is None
        if not planned and not op_offloads(self.op_offload, self.hw.devices[self.compute_id], len(rows)):
            yield from self.forward_step(phase, rows, contexts)
            return
        offloaded = self._offloading_layers()
        self._offload_copy = self._copy_bytes(rows)
        saved, self.layers = self.layers, offloaded
        try:
            yield from self.forward_step(phase, rows, contexts)
        finally:
            self.layers, self._offload_copy = saved, None

    def stream_in(self, l: int):
        """A layer's stream copy: in an offloaded step, one transfer of the offloaded experts'
        bytes from host memory (copy engine); otherwise every streamed expert in turn."""
        if self._offload_copy is None or l not in self._offload_copy:
            yield from super().stream_in(l)
            return
        n_bytes = self._offload_copy[l]
        host_mem = self.hw.memory_of(self.host_id).id
        with self.copy_engine(self.compute_id).request() as req:
            yield req
            self.log("expert_fetch", f"L{l} op offload start")
            yield from self.net.transfer(host_mem, self.compute_mem, n_bytes, f"L{l} op offload")
        self.bytes_moved[self.hw.memories[host_mem].tier] += n_bytes
        self.log("expert_fetch", f"L{l} op offload arrived")

    def _offloading_layers(self) -> list:
        """The layers as an offloaded step runs them (resolved once): each layer's ``local``
        experts homed in host DRAM become ``stream`` experts (copied, then run on the compute
        device); a layer without any is the plan's own."""
        if self._offload_layers is None:
            host_mem = self.hw.memory_of(self.host_id).id
            self._offload_layers, self._offload_host = [], []
            chosen = self.plan.prefill_offload if self.op_offload is None else None  # the plan's prefill sites
            copies = self.plan.prefill_copies if chosen is not None else None  # ... and the experts they copy
            for l, (lp, lay) in enumerate(zip(self.plan.layers, self.layers)):
                host = np.array([s == "local" and h == host_mem and (chosen is None or chosen[l])
                                 and (copies is None or e in copies[l])
                                 for e, (s, h) in enumerate(zip(lp.site, lp.home))])
                if not host.any():
                    self._offload_layers.append(lay)
                    self._offload_host.append(None)
                    continue
                site = tuple("stream" if h else s for s, h in zip(lp.site, host))
                off = self._resolve_layer(lp.model_copy(update={"site": site}), l)
                off.cache = lay.cache  # one cache whichever resolution a step runs on
                self._offload_layers.append(off)
                self._offload_host.append(host)
        return self._offload_layers

    def _copy_bytes(self, rows: np.ndarray) -> dict[int, float]:
        """Bytes each offloading layer copies in a step of ``rows``: its host-held experts the
        step's tokens use (``used-experts``) or all of them (``whole-tensor``)."""
        ids = self.trace.expert_ids[rows]  # [n, L, K]
        whole = self.op_offload is not None and self.op_offload.copies == "whole-tensor"
        out = {}
        for l, host in enumerate(self._offload_host):
            if host is None:
                continue
            moved = host.copy()
            if not whole:
                used = np.zeros(len(host), bool)
                e = ids[:, l, :].ravel()
                used[e[(e >= 0) & (e < len(host))]] = True
                moved &= used
            fmt = self.plan.layers[l].format
            out[l] = float(sum(self.expert_bytes(fmt[e]) for e in np.flatnonzero(moved)))
        return out
