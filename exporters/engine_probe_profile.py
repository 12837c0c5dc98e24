"""The engine profile ``planner engines probe`` writes from what it measured
(:mod:`exporters.engine_probe`): the bundled profile (or the user's) with the probed keys set.

- the CPU or GPU section's framework costs (per layer, per token of a layer, per expert
  call), the step costs, the CPU kernels' efficiency past the caches, and the disk read
  fraction and fixed cost of the page-cache state asked for;
- on a CPU, the int8/int4 kernel path's cost per dense linear (:func:`dense_linear_s`): the
  bundle runs each such dense matrix as an ONNX Runtime call of its own;
- the ``sources`` entry of the probe, with the machine and the date.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exporters.engine_probe import EngineProbeResult

__all__ = ["dense_linear_s", "engine_profile_doc", "engine_profile_text", "machine_line"]


def machine_line() -> str:
    """This machine in a few words (its name, processor and usable cores), for sources."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.node() or 'this machine'}, {platform.processor() or platform.machine()}, {cores} cores"


def engine_profile_doc(result: EngineProbeResult, base: dict[str, Any], page_cache: str = "cold") -> dict[str, Any]:
    """``base`` (an engine profile document: the bundled bundle.yaml) with the measured numbers.

    ``page_cache`` picks the disk read fraction: ``cold`` for experts read from the drive
    (a disk tier larger than the memory the OS can cache it in: the usual reason to have
    one), ``warm`` where free memory keeps the disk tier's files in the page cache.
    """
    doc = json.loads(json.dumps(base))  # a deep copy of plain data
    kind = doc.setdefault(result.device_kind, {})
    for name in ("layer_overhead_s", "expert_call_overhead_s", "token_overhead_s"):
        m = getattr(result, name)
        if m is not None:
            kind[name] = {"value": _seconds(m.value), "source": m.method}
    doc["step_overhead_s"] = {"decode": {"value": _seconds(result.decode_step_s.value),
                                         "source": result.decode_step_s.method},
                              "prefill": {"value": _seconds(result.prefill_step_s.value),
                                          "source": result.prefill_step_s.method}}
    if result.kernel is not None and result.device_kind == "cpu":
        kind["efficiency"] = _efficiency(result.kernel, "the runtime's CPU expert kernel past the caches")
        kind.pop("cached_efficiency", None)  # a cached expert's session as a layer's, unless timed apart
        if result.cached_kernel is not None:
            kind["cached_efficiency"] = _efficiency(result.cached_kernel, "the runtime's CPU expert kernel past the "
                                                    "caches in a cached expert's own session")
    if result.dense_linear is not None and result.device_kind == "cpu":
        _dense_linear_cost(kind, result)
    if page_cache in result.disk_reads:
        m = result.disk_reads[page_cache]
        doc["disk_read_fraction"] = {"value": round(m.value, 3), "source": m.method}
    if page_cache in result.disk_overheads:
        m = result.disk_overheads[page_cache]
        doc["disk_read_overhead_s"] = {"value": _seconds(m.value), "source": m.method}
    if page_cache in result.miss_host_cpu:  # profiles.engines.MissHostCpu
        m = result.miss_host_cpu[page_cache]
        doc["miss_host_cpu_s"] = {"fixed_s": _seconds(m["fixed_s"]), "per_byte_s": float(f"{m['per_byte_s']:.4g}"),
                                  "source": m["source"]}
    sources = [s for s in doc.get("sources", []) if not str(s).startswith("probe")]
    doc["sources"] = [*sources, f"probe (planner engines probe, {time.strftime('%Y-%m-%d')}, {machine_line()}, "
                                f"{result.elapsed_s:.0f} s)"]
    return doc


def _efficiency(k, what: str) -> dict[str, Any]:
    """An engine profile ``efficiency`` block of a timed kernel (a ``KernelEfficiency``)."""
    return {"memory_fraction": k.memory_fraction.value, "compute_max_fraction": k.compute_max_fraction.value,
            "half_tokens": k.half_tokens.value,
            "source": f"probe: {what} (planner engines probe); memory_fraction: {k.memory_fraction.method}; "
                      f"compute_max_fraction: {k.compute_max_fraction.method}; half_tokens: {k.half_tokens.method}"}


def dense_linear_s(result: EngineProbeResult) -> float:
    """Seconds a dense int8/int4 linear's ONNX Runtime call costs past the caches beyond the
    tiny call the grid's layers hold: the fixed part of the dense linear's own session timed
    past the caches less ``launch_s`` (:func:`exporters.engine_probe_kernels.probe_dense_linear`),
    not the expert kernel's (an expert's session runs two matmuls and the activation); 0
    where the probe did not time it."""
    return result.dense_linear.host_s.value if result.dense_linear is not None else 0.0


def _dense_linear_cost(kind: dict[str, Any], result: EngineProbeResult) -> None:
    """Set the CPU kernel path of int8/int4 to a per-dense-linear host cost (:func:`dense_linear_s`).

    The bundle runs each int8/int4 dense matrix on a CPU as its own pre-packed ONNX Runtime
    session call (exporters/runtime/dense.py): 4 per hidden layer and the head. The H = 64
    grid holds them in its layer cost at their tiny size, where the weights stay in the
    caches; past the caches each call also pays its session call's fixed part, timed on that
    one-matmul session past the caches. Expert calls do not pay it (``experts: false``: their
    own fixed part is in ``expert_call_overhead_s``). A fixed part no larger than the tiny call
    leaves int8/int4 native (a host cost written by an earlier probe is dropped)."""
    extra = dense_linear_s(result)
    if extra <= 0:
        kernels = kind.get("kernels", {})
        for name in ("int8", "int4"):
            if isinstance(kernels.get(name), dict) and "host_s_per_linear" in kernels[name]:
                kernels[name] = "native"
        return
    kernels = kind.setdefault("kernels", {})
    fmt = result.dense_linear.fit.get("fmt", "int8")
    for name in ("int8", "int4"):
        current = kernels.get(name)
        if current == "native" or (isinstance(current, dict) and "host_s_per_linear" in current):
            kernels[name] = {"host_s_per_linear": _seconds(extra), "experts": False, "source": (
                f"{result.dense_linear.host_s.method}; per dense linear, an ONNX Runtime call of its own; {name} runs "
                f"the same MatMulNBits session call as {fmt}")}


def engine_profile_text(doc: dict[str, Any], result: EngineProbeResult, previous: str | None = None) -> str:
    """``doc`` (from :func:`engine_profile_doc`) as YAML text. With ``previous``, the text of
    the profile it replaces (the bundled bundle.yaml when that is re-probed), only the probed
    keys' lines change in it, so its comments stay (:func:`exporters.profile_text.update_yaml_text`);
    otherwise, or where that cannot be done, the whole document is written."""
    import yaml

    from exporters.profile_text import update_yaml_text

    if previous is not None:
        keys = [(result.device_kind, "layer_overhead_s"), (result.device_kind, "expert_call_overhead_s")]
        # a key the text lacks goes after the one before it (same section)
        keys += [(result.device_kind, "token_overhead_s")] if result.token_overhead_s is not None else []
        keys += [("step_overhead_s", "decode"), ("step_overhead_s", "prefill")]
        keys += [(result.device_kind, k) for k in ("efficiency", "cached_efficiency")
                 if k in doc.get(result.device_kind, {})]
        keys += [(result.device_kind, "kernels")] if result.dense_linear is not None else []
        keys += [(None, k) for k in ("disk_read_fraction", "disk_read_overhead_s", "miss_host_cpu_s") if k in doc]
        text = update_yaml_text(previous, doc, keys, sources_prefix="probe")
        if text is not None:
            return text
    return (f"# planner engines probe: the bundle runtime measured on this machine in {result.elapsed_s:.0f} s\n"
            + yaml.safe_dump(doc, sort_keys=False))


def _seconds(value: float) -> str:
    return f"{value * 1e6:.1f}us" if value < 1e-3 else f"{value * 1e3:.3f}ms"
