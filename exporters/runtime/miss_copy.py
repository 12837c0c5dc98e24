"""Planned low-bit copies in the bundle (plan.json ``miss_copy``; the planner's profiles/miss_copy.py).

A layer with ``miss_copy = (format, gate_below)`` keeps, besides each ``fetch`` expert's own
weights, a copy at ``format`` (int4 through ONNX Runtime's MatMulNBits layout, int2 packed and
unpacked by torch: formats.py), quantised from the checkpoint by the same quantiser as an
expert planned at that format and stored in the layer's kernels file as ``{e}.copy.{name}``.
The copies live in host memory (pinned with CUDA), read once at load.

A miss of a fetch expert whose step's tokens all weight it below ``gate_below`` (the largest
router weight among the tokens of the step that chose it: :meth:`CopyHome.call_gates`, the
planner's and the simulator's rule, profiles/miss_copy.py) copies the low-bit copy to the
device instead of the full weights (:meth:`CopyHome.load`, counted on the link from host
memory as a fetch); the cache slot then holds the copy, so later hits run it, until it is
evicted (a cache slot holds either). One token that leans on the expert makes the step's
miss load the full weights, whichever token missed first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .expert_home import ExpertWeights
from .metrics import MetricsRecorder
from .planfile import LayerSpec
from .templates import weight_inputs
from .tensorfile import read_tensors

__all__ = ["CopyHome", "copy_arrays", "copy_entry", "copy_experts"]


def copy_experts(spec: LayerSpec) -> list[int]:
    """The experts of ``spec`` that have a low-bit copy (its fetch experts, when it plans copies)."""
    return spec.experts_at("fetch") if spec.miss_copy is not None else []


def copy_entry(spec: LayerSpec) -> dict[str, Any] | None:
    """The kernels manifest's record of the layer's copies (None: it has none)."""
    if spec.miss_copy is None:
        return None
    return {"format": spec.miss_copy[0], "experts": [str(e) for e in copy_experts(spec)]}


def copy_arrays(spec: LayerSpec, source: Any, quantize) -> dict[str, np.ndarray]:
    """The layer's copies as kernels-file arrays: ``{e}.copy.{name}``, each matrix quantised by
    ``quantize(weights [out, in], format, prefix)`` (kernels.quantize)."""
    arrays: dict[str, np.ndarray] = {}
    for e in copy_experts(spec):
        gate_up, down = source.read(spec.hidden_layer, e)
        for prefix, w in (("gate_up", gate_up), ("down", down)):
            for name, a in quantize(w.float().numpy(), spec.miss_copy[0], prefix).items():
                arrays[f"{e}.copy.{name}"] = a
    return arrays


class CopyHome:
    """One layer's low-bit copies in host memory, copied to the device on a low-gate miss."""

    def __init__(self, spec: LayerSpec, weights_file: Any, metrics: MetricsRecorder, *, pin: bool,
                 device_name: str, host_memory: str) -> None:
        self.fmt, self.gate_below = spec.miss_copy
        self.metrics, self.device_name, self.host_memory = metrics, device_name, host_memory
        self.copies: dict[int, dict[str, torch.Tensor]] = {}
        for e in copy_experts(spec):
            t = read_tensors({name: [weights_file.span(f"{e}.copy.{name}")] for name in weight_inputs(self.fmt)})
            self.copies[e] = {k: v.pin_memory() for k, v in t.items()} if pin else t

    @staticmethod
    def call_gates(ids: list[list[int]], gates: list[list[float]], num_experts: int) -> dict[int, float]:
        """Per expert the step calls, its tokens' largest router weight (``ids``/``gates``:
        ``[n][K]``; ids outside ``[0, num_experts)`` skipped; profiles.miss_copy.call_gates)."""
        top: dict[int, float] = {}
        for row, row_gates in zip(ids, gates):
            for e, g in zip(row, row_gates):
                if 0 <= e < num_experts and g > top.get(e, -1.0):
                    top[e] = g
        return top

    def loads(self, gate: float) -> bool:
        """Whether a miss of a call whose largest router weight is ``gate`` loads the copy
        (profiles.miss_copy.loads_copy)."""
        return gate < self.gate_below

    def load(self, e: int, device: torch.device) -> ExpertWeights:
        """Expert ``e``'s copy on ``device``, counted on the link from host memory as a fetch."""
        t = self.copies[e]
        self.metrics.moved(self.host_memory, sum(x.numel() * x.element_size() for x in t.values()), fetch=True,
                           to=self.device_name)
        self.metrics.count("miss_copies", 1)
        return ExpertWeights(self.fmt, {k: x.to(device, non_blocking=x.is_pinned(), copy=True) for k, x in t.items()})
