"""Memory maps for accelerator (FPGA-like) devices: where every planned expert lives in the
board's memory, in which number format, at which alignment; JSON a board's loader can read.

Legend: E = routed experts per layer, H = hidden size, I = expert intermediate size.

One map per accelerator memory the plan uses (a home of some expert, a layer's cache, or
the compute device). Layout, in this order, every region starting on ``alignment_bytes``:

1. ``runtime``: on the compute device only, the bytes the plan reserves there for the dense
   weights, the KV cache and the activation workspace (the host runtime owns its inside);
2. ``experts``: one region per expert homed here, by (MoE layer, expert id); all experts of
   one format share one internal layout (``layouts[format]``);
3. ``caches``: per layer with cache slots here, ``slots`` regions of the cache format's
   layout, ``stride_bytes`` apart.

Inside an expert (``layouts[format].tensors``), offsets are relative to the expert's offset
and each array starts on ``SUB_ALIGNMENT_BYTES``. Conventions a loader needs:

- weights are ``[out, in]`` row-major (``torch.nn.Linear``): gate ``[I, H]``, up ``[I, H]``,
  down ``[H, I]``; biases (gpt-oss) follow as bf16 vectors;
- little-endian; sub-byte values are packed first element in the lowest bits (int4: element
  ``2j`` in the low nibble of byte ``j``); ternary packs 5 trits per byte in base 3, first
  element least significant, trit ``t`` meaning ``t - 1``;
- quantisation groups are ``group_size`` consecutive elements of a row (along ``in``);
  scales are fp16 for integer formats, an 8-bit power-of-two exponent (e8m0) for the
  microscaling float formats; zero points (asymmetric formats) are unsigned, packed like the
  payload at ``zero_bits``: ``w = (q - zero) * scale``; symmetric int8: ``w = q * scale``;
  fp8 (e4m3) has one fp32 scale per 128 x 128 block, blocks row-major.

Sizes are exact byte counts of that layout, so they differ slightly from the planner's
``bits_per_weight`` estimate (rounding up to whole bytes, 16-bit biases, alignment). The map
is refused when it does not fit the memory.

    python -m exporters.engines.accelerator engines/accelerator-node-fpga0.json   # check a map
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from planner.plan import Plan
from profiles.errors import InfeasibleError, InputError, UserError
from profiles.formats import get_format
from profiles.hardware import Hardware
from profiles.models import ModelSpec

from .rounding import check_plan

__all__ = [
    "ALIGNMENT_BYTES",
    "MAP_FORMAT",
    "SUB_ALIGNMENT_BYTES",
    "accelerator_memories",
    "expert_layout",
    "main",
    "map_file_name",
    "memory_map",
    "verify_memory_map",
]

ALIGNMENT_BYTES = 4096  # region alignment: a page, and a multiple of every AXI/DMA burst size
SUB_ALIGNMENT_BYTES = 64  # array alignment inside an expert: a cache line / 512-bit bus word
MAP_FORMAT = "moe-planner/accelerator-memory-map"
MAP_VERSION = 1
_FP8_BLOCK = 128  # DeepSeek-V3 style fp8: one scale per 128 x 128 block


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _array(offset: int, n_bytes: int) -> dict[str, int]:
    return {"offset": offset, "bytes": n_bytes}


def expert_layout(model: ModelSpec, fmt: str, sub_alignment: int = SUB_ALIGNMENT_BYTES) -> dict[str, Any]:
    """The byte layout of one expert stored in ``fmt`` (see the module docstring).

    Returns:
        ``{"format", "payload_bits", "group_size", "scale_bits", "zero_bits", "size_bytes",
        "tensors": [{"name", "shape", "payload": {offset, bytes}, "scales"?, "zeros"?}]}``.
    """
    f = get_format(fmt)
    H, I = model.hidden_size, model.expert_intermediate_size
    tensors, at = [], 0
    for name, (rows, cols) in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
        entry: dict[str, Any] = {"name": name, "shape": [rows, cols]}
        n_bytes = math.ceil(rows * cols * f.payload_bits / 8)
        entry["payload"] = _array(at, n_bytes)
        at = _align(at + n_bytes, sub_alignment)
        if f.group_size:
            if fmt == "fp8":  # 2-D blocks
                groups = math.ceil(rows / _FP8_BLOCK) * math.ceil(cols / _FP8_BLOCK)
            else:  # runs of group_size along a row
                groups = rows * math.ceil(cols / f.group_size)
            for part, bits in (("scales", f.scale_bits), ("zeros", f.zero_bits)):
                if bits:
                    n_bytes = math.ceil(groups * bits / 8)
                    entry[part] = _array(at, n_bytes)
                    at = _align(at + n_bytes, sub_alignment)
        tensors.append(entry)
    bias = model.expert_bias_params
    if bias:  # gpt-oss: gate and up biases [I], down bias [H]; 16-bit like every quantiser keeps them
        parts = (("gate_bias", I), ("up_bias", I), ("down_bias", H)) if bias == 2 * I + H else (("bias", bias),)
        for name, n in parts:
            tensors.append({"name": name, "shape": [n], "dtype": "bf16", "payload": _array(at, 2 * n)})
            at = _align(at + 2 * n, sub_alignment)
    return {"format": fmt, "payload_bits": f.payload_bits, "group_size": f.group_size, "scale_bits": f.scale_bits,
            "zero_bits": f.zero_bits, "size_bytes": at, "tensors": tensors}


def accelerator_memories(plan: Plan, hardware: Hardware) -> list[str]:
    """Accelerator memory pools the plan uses (compute device, expert homes, caches), sorted."""
    used = {hardware.memory_of(plan.compute_device).id}
    for layer in plan.layers:
        used |= set(layer.home)
        if layer.cache_slots and layer.cache_device:
            used.add(hardware.memory_of(layer.cache_device).id)
    return sorted(m for m in used if m in hardware.memories and hardware.memories[m].tier == "accel")


def map_file_name(memory_id: str) -> str:
    """``node/fpga0`` -> ``accelerator-node-fpga0.json``."""
    return "accelerator-" + memory_id.replace("/", "-") + ".json"


def memory_map(plan: Plan, model: ModelSpec, hardware: Hardware, memory_id: str, *,
               alignment_bytes: int = ALIGNMENT_BYTES, engines_dir: str = "engines") -> dict[str, Any]:
    """The memory map of one accelerator memory (see the module docstring).

    Args:
        plan: a single-node plan for ``model`` on ``hardware``.
        model: the model spec.
        hardware: the resolved hardware.
        memory_id: an accelerator memory pool the plan uses (:func:`accelerator_memories`).
        alignment_bytes: region alignment (default 4096, a power of two).
        engines_dir: the directory the check command names for the map (default
            ``engines``, relative to the bundle).

    Raises:
        InputError: the plan does not match, the memory is not an accelerator's, or the
            alignment is not a power of two.
        InfeasibleError: the map does not fit the memory (the shortfall in bytes is named).
    """
    check_plan(plan, model, hardware)
    if memory_id not in hardware.memories or hardware.memories[memory_id].tier != "accel":
        raise InputError("not an accelerator memory of this hardware", key="memory_id", value=memory_id,
                         expected="one of " + ", ".join(m for m, mem in hardware.memories.items() if mem.tier == "accel")
                         or "an accelerator memory (this hardware has none)", fix="pick an accelerator device")
    if alignment_bytes < 1 or alignment_bytes & (alignment_bytes - 1):
        raise InputError("alignment must be a power of two", key="alignment_bytes", value=alignment_bytes,
                         fix="use e.g. 4096")
    mem = hardware.memories[memory_id]
    layouts: dict[str, dict[str, Any]] = {}

    def layout(fmt: str) -> dict[str, Any]:
        if fmt not in layouts:
            layouts[fmt] = expert_layout(model, fmt)
        return layouts[fmt]

    at = 0
    regions = []
    if memory_id == hardware.memory_of(plan.compute_device).id:
        use = plan.memory.get(memory_id)
        runtime = {k: getattr(use, k) if use else 0.0 for k in ("dense_bytes", "kv_bytes", "workspace_bytes")}
        size = math.ceil(sum(runtime.values()))
        if size:
            regions.append(dict(kind="runtime", offset=0, size_bytes=size, **runtime))
            at = _align(size, alignment_bytes)
    experts = []
    for layer in plan.layers:
        for e, (home, fmt) in enumerate(zip(layer.home, layer.format)):
            if home != memory_id:
                continue
            size = layout(fmt)["size_bytes"]
            experts.append({"moe_layer": layer.moe_layer, "hidden_layer": layer.hidden_layer, "expert": e,
                            "format": fmt, "site": layer.site[e], "offset": at, "size_bytes": size})
            at = _align(at + size, alignment_bytes)
    caches = []
    for layer in plan.layers:
        if layer.cache_slots and layer.cache_device and hardware.memory_of(layer.cache_device).id == memory_id:
            fmt = layer.cache_format or layer.format[0]
            stride = _align(layout(fmt)["size_bytes"], alignment_bytes)
            caches.append({"moe_layer": layer.moe_layer, "hidden_layer": layer.hidden_layer, "format": fmt,
                           "slots": layer.cache_slots, "offset": at, "slot_bytes": layout(fmt)["size_bytes"],
                           "stride_bytes": stride})
            at += stride * layer.cache_slots
    used = at
    capacity = int(mem.capacity_bytes)
    if used > capacity:
        raise InfeasibleError(f"accelerator memory map of {memory_id} needs {used:,} bytes but the memory holds "
                              f"{capacity:,} ({used - capacity:,} short); smallest change: re-plan with "
                              f"fewer experts on {memory_id}, or a smaller alignment than {alignment_bytes}")
    planned = plan.memory.get(memory_id)
    return {
        "format": MAP_FORMAT,
        "version": MAP_VERSION,
        "memory": memory_id,
        "devices": list(mem.devices),
        "model": model.name,
        "plan": {"hardware": plan.inputs.hardware, "compute_device": plan.compute_device,
                 "workload_digest": plan.inputs.workload_digest},
        "capacity_bytes": capacity,
        "alignment_bytes": alignment_bytes,
        "sub_alignment_bytes": SUB_ALIGNMENT_BYTES,
        "byte_order": "little",
        "layouts": layouts,
        "regions": regions,
        "experts": experts,
        "caches": caches,
        "used_bytes": used,
        "free_bytes": capacity - used,
        "planned_expert_bytes": planned.expert_bytes if planned else 0.0,
        "planned_cache_bytes": planned.cache_bytes if planned else 0.0,
        "commands": {"check": f"python -m exporters.engines.accelerator {engines_dir}/{map_file_name(memory_id)}"},
    }


def verify_memory_map(data: dict[str, Any], file: str | Path | None = None) -> None:
    """Check a memory map: known format, aligned, non-overlapping regions inside the memory.

    Raises:
        InputError: the first problem found, in one line.
    """
    def bad(message: str, key: str, value: Any = InputError._UNSET) -> InputError:
        return InputError(message, file=file, key=key, value=value, fix="re-export the bundle with planner export")

    if not isinstance(data, dict) or data.get("format") != MAP_FORMAT:
        raise bad("not an accelerator memory map", "format", data.get("format") if isinstance(data, dict) else None)
    if data.get("version") != MAP_VERSION:
        raise bad("unsupported memory map version", "version", data.get("version"))
    try:
        _check_spans(data, bad)
    except (KeyError, TypeError) as exc:
        raise bad("malformed memory map", str(exc).strip("'")) from None


def _check_spans(data: dict[str, Any], bad) -> None:
    align, capacity, layouts = data["alignment_bytes"], data["capacity_bytes"], data["layouts"]
    spans = [(r["offset"], r["offset"] + r["size_bytes"], f"regions[{i}]") for i, r in enumerate(data["regions"])]
    for i, x in enumerate(data["experts"]):
        if x["format"] not in layouts or layouts[x["format"]]["size_bytes"] != x["size_bytes"]:
            raise bad("expert size does not match its format's layout", f"experts[{i}].size_bytes", x["size_bytes"])
        spans.append((x["offset"], x["offset"] + x["size_bytes"], f"experts[{i}]"))
    for i, c in enumerate(data["caches"]):
        if c["stride_bytes"] < c["slot_bytes"]:
            raise bad("cache stride is smaller than a slot", f"caches[{i}].stride_bytes", c["stride_bytes"])
        spans.append((c["offset"], c["offset"] + c["stride_bytes"] * c["slots"], f"caches[{i}]"))
    end = 0
    for start, stop, key in sorted(spans):
        if start % align:
            raise bad(f"region not aligned to {align} bytes", f"{key}.offset", start)
        if start < end:
            raise bad("region overlaps the previous one", f"{key}.offset", start)
        end = max(end, stop)
    if end > capacity:
        raise bad(f"map ends past the memory's {capacity} bytes", "used_bytes", end)


def main(argv: list[str] | None = None) -> int:
    """``python -m exporters.engines.accelerator MAP.json ...``: check maps, print a summary."""
    from profiles.yamlio import load_json

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m exporters.engines.accelerator MAP.json [...]", file=sys.stderr)
        return 2
    for path in args:
        try:
            data = load_json(path)
            verify_memory_map(data, file=path)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        print(f"{path}: {data['memory']}: {len(data['experts'])} experts, {len(data['caches'])} caches, "
              f"{data['used_bytes']:,} of {data['capacity_bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
