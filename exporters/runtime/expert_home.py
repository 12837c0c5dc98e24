"""One layer's experts where the plan keeps them: their weights in a storage format
(:class:`ExpertWeights`) and the reader that brings them from their home (:class:`ExpertHome`),
counting the bytes it moves. :mod:`store` computes with them.
"""

from __future__ import annotations

from typing import Any

import torch

from .formats import dequantize
from .kernels import Kernels
from .metrics import MetricsRecorder
from .nested import assemble, dequantize_high
from .planfile import FLOAT_FORMATS, LayerSpec
from .sessions import CpuLayerKernel
from .templates import float_arrays, weight_inputs

__all__ = ["HIGH_PLANE", "HIGH_PLANES", "ExpertHome", "ExpertWeights", "high_plane"]

HIGH_PLANE = "int8/hi"  # ExpertWeights.fmt of a nested int8 expert's high plane alone (nested.py)
HIGH_PLANES = {"int8/hi": "int8", "int4/hi": "int4"}  # ExpertWeights.fmt of a high plane alone -> its nested format


def high_plane(fmt: str) -> str:
    """:class:`ExpertWeights`' format name of a nested ``fmt`` expert's high plane alone."""
    return f"{fmt}/hi"


class ExpertWeights:
    """One expert's tensors in its storage format.

    Float formats: ``gate_up [2I, H]``, ``down [H, I]`` in the checkpoint's dtype.
    int8/int4: the MatMulNBits tensors of each matrix (``gate_up.q`` ...; see quant.py).
    """

    __slots__ = ("fmt", "kernel", "tensors")

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor]) -> None:
        self.fmt = fmt
        self.tensors = tensors
        self.kernel: CpuLayerKernel | None = None  # set when a CPU device runs it pre-packed

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device, *, pin: bool = False, non_blocking: bool = False) -> ExpertWeights:
        """A copy on ``device`` (always a new copy: a cache slot holds its own memory)."""
        out = {}
        for name, t in self.tensors.items():
            t = t.to(device, non_blocking=non_blocking, copy=True)
            out[name] = t.pin_memory() if pin else t
        return ExpertWeights(self.fmt, out)

    def record_stream(self, stream: Any) -> None:
        for t in self.tensors.values():
            if t.is_cuda:
                t.record_stream(stream)

    def matrices(self, dtype: torch.dtype, hidden: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up [2I, H], down [H, I])`` in ``dtype`` for the matmuls."""
        if self.fmt in FLOAT_FORMATS:
            return self.tensors["gate_up"].to(dtype), self.tensors["down"].to(dtype)
        if self.fmt in HIGH_PLANES:  # a nested expert's half-width copy (nested.py)
            nested = HIGH_PLANES[self.fmt]
            return (dequantize_high(self.tensors, "gate_up", hidden, nested).to(dtype),
                    dequantize_high(self.tensors, "down", inter, nested).to(dtype))
        return (dequantize(self.tensors, "gate_up", self.fmt, hidden).to(dtype),
                dequantize(self.tensors, "down", self.fmt, inter).to(dtype))

    def numpy_inputs(self) -> dict[str, Any]:
        """The CPU kernel's inputs (see templates.weight_inputs)."""
        if self.fmt in FLOAT_FORMATS:
            return float_arrays(self.tensors["gate_up"], self.tensors["down"])
        return {name: self.tensors[name].numpy() for name in weight_inputs(self.fmt)}


class ExpertHome:
    """Reads one layer's experts from where the plan keeps them, counting bytes moved.

    Host-tier experts are read once, at load, into (pinned, with CUDA) host memory; disk-tier
    experts are read from the checkpoint (float formats) or kernels file (int8/int4) at every
    use, past the page cache (:mod:`tensorfile`). A copy to the device is counted on the link
    from the expert's home to ``device_name`` (the layer's plan device).
    """

    def __init__(self, spec: LayerSpec, source: Any, kernels: Kernels, metrics: MetricsRecorder, *,
                 pin: bool, keep_host: set[int], device_name: str = "device", host_memory: str = "host") -> None:
        self.spec, self.source, self.kernels, self.metrics = spec, source, kernels, metrics
        self.device_name, self.host_memory = device_name, host_memory
        self.sizes: dict[int, int] = {}  # expert -> bytes in its stored format (once read)
        self.host: dict[int, ExpertWeights] = {}
        for e in sorted(keep_host):
            w = self.read(e)
            self.host[e] = ExpertWeights(w.fmt, {k: t.pin_memory() for k, t in w.tensors.items()}) if pin else w
        # planned low-bit copies (miss_copy.py): in host memory, a low-gate miss fetches one
        self.copies = None
        if spec.miss_copy is not None:
            from .miss_copy import CopyHome  # it builds on this module's ExpertWeights

            self.copies = CopyHome(spec, kernels.weights_file(spec.moe_layer), metrics, pin=pin,
                                   device_name=device_name, host_memory=host_memory)
        # nested fetch-low experts: their low planes wait in host memory, fetched at every use
        self.low: dict[int, dict[str, torch.Tensor]] = {}
        for e in (e for e in range(spec.num_experts) if spec.planes_of(e) == "fetch-low"):
            low = kernels.planes(spec.moe_layer, e, ("ql",), spec.format[e])
            self.low[e] = {k: t.pin_memory() for k, t in low.items()} if pin else low

    def load_low(self, e: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Expert ``e``'s low plane on ``device``, counted on the link from the host's memory."""
        low = self.low[e]
        self.metrics.moved(self.host_memory, sum(t.numel() * t.element_size() for t in low.values()), fetch=True,
                           to=self.device_name)
        return {k: t.to(device, non_blocking=t.is_pinned(), copy=True) for k, t in low.items()}

    def read(self, e: int) -> ExpertWeights:
        """Read expert ``e`` from the checkpoint / kernels file (CPU tensors); a nested one as
        what its planes hold on the device: its format (int8, int4) assembled from both, or the
        high plane alone."""
        fmt = self.spec.format[e]
        planes = self.spec.planes_of(e)
        if planes == "both":
            t = self.kernels.planes(self.spec.moe_layer, e, ("qh", "ql"), fmt)
            w = ExpertWeights(fmt, assemble(t, t, fmt=fmt))
        elif planes:
            w = ExpertWeights(high_plane(fmt), self.kernels.planes(self.spec.moe_layer, e, ("qh",), fmt))
        elif fmt in FLOAT_FORMATS:
            gate_up, down = self.source.read(self.spec.hidden_layer, e)
            w = ExpertWeights(fmt, {"gate_up": gate_up, "down": down})
        else:
            w = ExpertWeights(fmt, self.kernels.quantised(self.spec.moe_layer, e, fmt))
        self.sizes[e] = w.nbytes
        return w

    def size(self, e: int) -> int:
        """Expert ``e``'s bytes in its stored format (an expert of the same format stands in
        for one not read yet)."""
        fmt = self.spec.format[e]
        return self.sizes.get(e) or max((n for x, n in self.sizes.items() if self.spec.format[x] == fmt), default=0)

    def load(self, e: int, device: torch.device | None = None, *, fetch: bool = False,
             prefetch: bool = False) -> ExpertWeights:
        """Expert ``e`` from its home, on ``device`` (None: stays on the CPU).

        One copy of the weights per load: an expert read from disk is already a buffer of its
        own (:mod:`tensorfile`), so on a CPU device it is the slot's memory as it is; a host
        expert is copied (the slot must not share the host copy), except into a CPU session
        that keeps its own pre-packed copy (see :meth:`PlannedExperts._ready`).
        """
        w = self.host.get(e)
        fresh = w is None
        if fresh:
            w = self.read(e)
        self.metrics.moved(self.spec.home[e], w.nbytes, fetch=fetch, prefetch=prefetch,
                           to=None if device is None else self.device_name)
        if device is None:
            return w
        if device.type == "cpu" and (fresh or w.fmt not in FLOAT_FORMATS):
            return ExpertWeights(w.fmt, w.tensors)
        return w.to(device, non_blocking=any(t.is_pinned() for t in w.tensors.values()))
