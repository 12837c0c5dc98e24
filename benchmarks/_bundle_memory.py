"""A bundle's memory by component, measured (``python -m exporters.runtime_memory`` in a child
without a memory limit) next to what its plan counts: ``bench_bundle_vs_accelerate``'s
``memory_components`` tables.

Measured: anonymous memory above the child's baseline (imports, the model's class on the meta
device), from ``/proc/self/status`` (see exporters/runtime_memory.py). The tensors the runtime
holds (dense weights, resident experts, cache slots) are counted from its objects; what ONNX
Runtime sessions hold (int8/int4 experts and dense matrices a CPU runs) is not a tensor and
lands in ``runtime_own`` with the runtime's own memory, as the ``note`` says.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _provenance import ROOT

TOKENS = 8


def measure(bundle: Path, ckpt: Path) -> dict:
    """The meter's JSON for ``bundle`` run on ``ckpt`` (load, a 16-token prefill, ``TOKENS`` decoded)."""
    out = subprocess.run([sys.executable, "-m", "exporters.runtime_memory", "--plan", str(bundle / "plan.json"),
                          "--checkpoint", str(ckpt), "--kernels", str(bundle / "kernels"), "--tokens", str(TOKENS)],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        return {"failed": out.stderr[-2000:]}
    return json.loads(out.stdout)


def components(planned: dict, staging: float, runtime: float, measured: dict) -> dict:
    """``{"rows": [...], "peak": ...}``: each component's planned and measured bytes.

    Args:
        planned: the plan's ``MemoryUse`` of the compute device (expert_bytes, cache_bytes, ...).
        staging, runtime: of its workspace, the runtime's staged experts and own memory
            (planner.costs.runtime_memory); the rest of the workspace is activations.
        measured: :func:`measure`'s JSON.
    """
    if "failed" in measured:
        return measured
    c = measured["components"]
    sessions = c["cache_slots_in_onnx_sessions"] > 0 or c["resident_experts_bytes"] < planned["expert_bytes"]
    rows = [
        ("resident_experts", planned["expert_bytes"], c["resident_experts_bytes"], "torch tensors"),
        ("cache_slots", planned["cache_bytes"], c["cache_slots_bytes"], "torch tensors of the ready slots"),
        ("dense_weights", planned["dense_bytes"], c["dense_weights_bytes"], "the model's parameters and buffers"),
        ("kv_cache", planned["kv_bytes"], c["kv_cache_bytes"],
         f"planned for the plan's context; measured at the {TOKENS + 16} tokens held"),
        ("staging_and_activations", planned["workspace_bytes"] - runtime, c["step_transient_bytes"], "a step's peak less its end (experts staged while fetched, activations)"),
        ("runtime_own", runtime, c["untracked_bytes"],
         "anonymous memory no tensor above accounts for" + (" (includes what ONNX Runtime sessions hold: "
                                                            "int8/int4 experts and dense matrices)" if sessions else "")),
    ]
    table = [{"component": name, "planned_bytes": p, "measured_bytes": m, "how_measured": how}
             for name, p, m, how in rows]
    plan_total = sum(v for k, v in planned.items() if k != "capacity_bytes")
    peak, sampled = measured["anon_peak_above_baseline_bytes"], measured["sampled_anon_peak_above_baseline_bytes"]
    return {"rows": table, "load_transient_bytes": c["load_transient_bytes"],
            "peak": {"planned_bytes": plan_total, "measured_bytes": peak, "within_plan": peak <= plan_total,
                     "sampled_bytes": sampled, "sampled_within_plan": sampled <= plan_total,
                     "how_measured": measured["what"] + "; measured_bytes: the anonymous peak's upper bound (VmHWM "
                                                         "less the mapped file pages at each stage's start: library "
                                                         "pages mapped during a stage count), sampled_bytes: its lower "
                                                         "bound (RssAnon read every millisecond)"},
            "stages": measured["stages"]}
