"""What the engine renderers share: check a Plan against its model and hardware, round its
per-expert placement to an engine's per-layer grid, and write deterministic output (the
pricing of plans with the planner's own cost model is :mod:`exporters.engines.pricing`).

Legend: L = MoE layers, E = routed experts per layer, B = batch (tokens per decode step).

Engines place experts coarser than a Plan does. GGUF (llama.cpp) holds all experts of one
(layer, projection) as one tensor; transformers 5 fuses a layer's experts into 3-D
tensors, so HF accelerate places them per layer. Rounding a plan to such a grid is done in
two steps, the same for every engine:

1. **format** per layer: the storage format holding most of the layer's expert bytes in the
   plan (ties: the wider format, quality first). Weighting by bytes keeps the precision the
   plan paid memory for; an engine that cannot store it (accelerate: bf16 only) overrides it.
2. **placement** per layer: layers are ranked by the share of their expert bytes the plan
   keeps on the compute device (ties: the later layer first, as ``--n-cpu-moe`` offloads the
   first layers), and whole layers go to the compute device in that order while they fit in
   its budget at the engine's byte sizes; the rest go to host memory (then disk, where the
   engine can stream from it). A fill, not a majority vote: it never overflows the device
   and leaves no usable budget idle when the plan's per-expert split would have used it.

A rounded layer runs in one of the planner's modes: ``resident`` on the compute device,
``local`` on the host CPU (llama.cpp computes CPU-buffer experts where they live) or
``stream`` (accelerate copies offloaded modules to the GPU at every forward);
:class:`exporters.engines.pricing.Pricing` prices them as ``planner optimize`` does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.plan import Plan
from profiles.errors import InputError
from profiles.formats import all_formats, get_format
from profiles.hardware import Device, Hardware, load_profile
from profiles.models import ModelSpec, load_model

__all__ = [
    "NotApplicable",
    "RoundedLayer",
    "check_plan",
    "dense_format",
    "device_share",
    "engine_device",
    "fill_layers",
    "fill_order",
    "layer_format",
    "memory_string",
    "resolve_inputs",
    "to_json_text",
]


class NotApplicable(Exception):
    """An engine cannot express this plan at all (an unknown model class, no such device):
    :func:`exporters.engines.single.render_engines` records the reason and skips the engine."""


@dataclass(frozen=True)
class RoundedLayer:
    """One MoE layer after rounding: all its experts in one place and one format.

    Attributes:
        moe_layer: index among MoE layers (the plan's ``LayerPlan.moe_layer``).
        hidden_layer: decoder layer index (GGUF ``blk.N``, HF ``model.layers.N``).
        place: ``"device"`` (the engine's compute device), ``"host"`` (host DRAM) or ``"disk"``.
        format: storage format the cost model prices (a ``profiles.formats`` name).
        mode: ``"resident"``, ``"local"`` or ``"stream"`` (see the module docstring).
        device_share: share of the layer's expert bytes the plan kept on the compute device.
    """

    moe_layer: int
    hidden_layer: int
    place: str
    format: str
    mode: str
    device_share: float


# --------------------------------------------------------------------------- checks


def resolve_inputs(model: ModelSpec | str, hardware: Hardware | str) -> tuple[ModelSpec, Hardware]:
    """Accept a ModelSpec or a model name/path, and a Hardware or a profile name/path."""
    if not isinstance(model, ModelSpec):
        model = load_model(model)
    if not isinstance(hardware, Hardware):
        hardware = load_profile(hardware)[1]
    return model, hardware


def check_plan(plan: Plan, model: ModelSpec, hardware: Hardware) -> None:
    """Refuse a plan that was not made for ``model`` on ``hardware``, in one line.

    Raises:
        InputError: layer or expert counts, decoder-layer indices, devices, memories or
            formats that do not match.
    """
    fix = "plan this model on this hardware with `planner optimize`, or pass the model and hardware the plan names"
    if len(plan.layers) != model.num_moe_layers:
        raise InputError("the plan does not match the model", key="layers",
                         value=f"{len(plan.layers)} MoE layers (a plan for {plan.inputs.model})",
                         expected=f"{model.num_moe_layers} MoE layers ({model.name})", fix=fix)
    for i, layer in enumerate(plan.layers):
        key = f"layers[{i}]"
        if layer.moe_layer != i or layer.hidden_layer != model.moe_layer_indices[i]:
            raise InputError("the plan's layer indices do not match the model", key=key,
                             value=(layer.moe_layer, layer.hidden_layer),
                             expected=f"moe_layer {i}, hidden_layer {model.moe_layer_indices[i]} ({model.name})", fix=fix)
        if len(layer.home) != model.num_experts:
            raise InputError("the plan does not match the model's experts per layer", key=f"{key}.home",
                             value=len(layer.home), expected=f"{model.num_experts} experts ({model.name})", fix=fix)
        for fmt in set(layer.format) | ({layer.cache_format} if layer.cache_format else set()):
            if fmt not in all_formats():
                raise InputError("unknown number format in the plan", key=f"{key}.format", value=fmt,
                                 expected="one of " + ", ".join(all_formats()), fix="regenerate the plan")
        for mem in set(layer.home) | ({layer.cache_device} if layer.cache_device else set()):
            if mem not in hardware.memories and mem not in hardware.devices:
                raise InputError("the plan names a memory this hardware does not have", key=f"{key}.home",
                                 value=mem, expected="one of " + ", ".join(hardware.memories), fix=fix)
    for key, dev in (("compute_device", plan.compute_device), ("host_device", plan.host_device)):
        if dev not in hardware.devices or not hardware.devices[dev].is_compute:
            raise InputError("the plan names a compute device this hardware does not have", key=key, value=dev,
                             expected="a gpu, cpu or accelerator of " + hardware.name, fix=fix)


def dense_format(plan: Plan, model: ModelSpec) -> str:
    """The plan's format for dense (non-expert) weights.

    ``planner optimize`` records it in ``notes`` (``"dense weights: int4"``), which wins;
    then a ``dense_format`` field the plan sets explicitly; else the format whose bytes
    match the planned dense bytes best.
    """
    for note in plan.notes:
        m = re.fullmatch(r"dense weights: (\S+)", note)
        if m and m.group(1) in all_formats():
            return m.group(1)
    explicit = getattr(plan, "dense_format", None)
    if explicit in all_formats() and "dense_format" in plan.model_fields_set:
        return explicit
    planned = plan.memory.get(plan.compute_device)
    dense = planned.dense_bytes if planned is not None else 0.0
    if dense <= 0:
        return "bf16"
    return min(("bf16", "fp8", "int8", "int4"), key=lambda f: abs(model.dense_bytes(f) - dense))


# --------------------------------------------------------------------------- rounding


def layer_format(formats: Sequence[str], model: ModelSpec) -> str:
    """The format holding most of a layer's expert bytes (ties: the wider one)."""
    per = {fmt: formats.count(fmt) * model.expert_bytes(fmt) for fmt in set(formats)}
    return max(per, key=lambda f: (per[f], get_format(f).bits_per_weight, f))


def device_share(plan: Plan, model: ModelSpec, hardware: Hardware) -> list[float]:
    """``[L]`` share of each layer's expert bytes the plan keeps in the compute device's memory
    (a pipeline plan: the layer's own GPU)."""
    out = []
    for l, layer in enumerate(plan.layers):
        mem = hardware.memory_of(plan.device_of(l)).id
        total = sum(model.expert_bytes(f) for f in layer.format)
        on = sum(model.expert_bytes(f) for h, f in zip(layer.home, layer.format) if h == mem)
        out.append(on / total if total else 0.0)
    return out


def fill_order(shares: Sequence[float]) -> list[int]:
    """MoE layers in the order they get the compute device: largest planned share first,
    ties to the later layer (``--n-cpu-moe`` keeps the first layers on the CPU)."""
    return sorted(range(len(shares)), key=lambda l: (-shares[l], -l))


def fill_layers(order: Iterable[int], layer_bytes: Sequence[float], budget_bytes: float) -> set[int]:
    """Layers that get the device: take them in ``order`` while they fit (a layer that does not
    fit is skipped, a smaller later one may still fit)."""
    chosen, used = set(), 0.0
    for l in order:
        if used + layer_bytes[l] <= budget_bytes:
            chosen.add(l)
            used += layer_bytes[l]
    return chosen


def engine_device(plan: Plan, hardware: Hardware) -> Device:
    """The device an engine computes on: the plan's GPU, else the host CPU (llama.cpp and
    transformers have no backend for FPGA-like accelerators)."""
    dev = hardware.devices[plan.compute_device]
    return dev if dev.kind == "gpu" else hardware.devices[plan.host_device]


# --------------------------------------------------------------------------- output helpers


def memory_string(n_bytes: float) -> str:
    """A size string accelerate parses in every version: whole GiB when exact, else whole MiB
    (rounded down). ``GiB`` = 2^30 bytes.

    >>> memory_string(10 * 2**30), memory_string(1.5 * 2**30)
    ('10GiB', '1536MiB')
    """
    mib = max(math.floor(n_bytes / 2**20), 0)
    return f"{mib // 1024}GiB" if mib % 1024 == 0 and mib else f"{mib}MiB"


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.12g}")
    if isinstance(obj, dict):
        return {str(k): _round(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v) for v in obj]
    return obj


def _flat(obj: Any) -> bool:
    scalar = (str, int, float, bool, type(None))
    if isinstance(obj, dict):
        return all(isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(x, scalar) for x in v))
                   for v in obj.values())
    return isinstance(obj, list) and all(isinstance(x, scalar) for x in obj)


def to_json_text(obj: Any) -> str:
    """Deterministic, diff-friendly JSON: sorted keys, floats to 12 significant digits, nested
    objects indented, flat lists and flat objects inside lists on one line each."""
    def dump(o: Any, indent: str) -> str:
        if isinstance(o, dict) and o:
            inner = indent + " "
            items = [f"{inner}{json.dumps(k)}: {dump(v, inner)}" for k, v in sorted(o.items())]
            return "{\n" + ",\n".join(items) + "\n" + indent + "}"
        if isinstance(o, list) and o and not _flat(o):
            inner = indent + " "
            items = [inner + (json.dumps(v, sort_keys=True) if _flat(v) else dump(v, inner)) for v in o]
            return "[\n" + ",\n".join(items) + "\n" + indent + "]"
        return json.dumps(o, sort_keys=True)
    return dump(_round(obj), "") + "\n"


def write_text(path: Path, text: str, executable: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    if executable:
        path.chmod(0o755)
    return path


def __getattr__(name: str) -> Any:
    """``Pricing``, ``Prediction`` and ``rounding_report`` moved to :mod:`exporters.engines.pricing`
    (which imports this module); importing them from here still works."""
    if name in ("Pricing", "Prediction", "rounding_report"):
        from . import pricing

        return getattr(pricing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
