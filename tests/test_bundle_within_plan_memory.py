"""A bundle needs no more memory than its plan says (issue 18 item 5), measured in a child process.

A small Mixtral-shaped fp32 checkpoint is planned for a CPU-only box whose memory holds about
half of its experts (the rest on a drive, fetched through per-layer caches), exported, and
run by the bundle runtime in a subprocess (``python -m exporters.runtime_memory``): load, a
16-token prefill, 8 decoded tokens. What is measured is the child's anonymous memory above
its baseline (imports and the model's class built on the meta device), at its peak over all
of that: ``VmHWM`` less the mapped file pages (``RssFile``) at the start of each stage, the
peak reset per stage through ``/proc/self/clear_refs`` (Linux; no cgroup needed; the page
cache of the files the runtime reads is not counted, as the runtime reads experts past it).
The plan's memory is everything it counts on the compute device (``MemoryUse.used_bytes``:
experts, cache slots, dense weights, KV cache, workspace: activations, the experts the
runtime stages while fetching, and the runtime's own memory, from the engine profile).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs the [runtime] extra")
pytest.importorskip("transformers", reason="needs the [runtime] extra")
pytest.importorskip("onnxruntime", reason="needs the [runtime] extra")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

from exporters.bundle import write_bundle  # noqa: E402
from exporters.checkpoints import make_random_checkpoint  # noqa: E402
from planner.costs import Setup  # noqa: E402
from planner.optimize import OptimizeRequest, optimize  # noqa: E402
from profiles.hardware import load_profile  # noqa: E402
from profiles.models import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4}  # fp32 expert: 1.5 MiB
WEIGHTS_MIB = 40  # memory the plan may use: dense weights, KV cache, the runtime's own, some of the 48 MiB of experts
PROFILE = """\
name: cpu-box
nodes:
  - name: node
    devices:
      - name: cpu0
        kind: cpu
        cores: 2
        memory_bytes: {memory}B
        memory_bytes_per_s: 20GB/s
        peak_ops_per_s: {{fp32: 200GFLOPS, bf16: 200GFLOPS, int8: 400GOPS}}
      - name: nvme0
        kind: nvme
        memory_bytes: 1TB
        memory_bytes_per_s: 2GB/s
        links:
          - {{kind: pcie, to: cpu0, gen: 4, lanes: 4}}
"""


def planned_bundle(tmp: Path) -> tuple[Path, Path, dict]:
    """(checkpoint, bundle, plan JSON): the checkpoint planned at fp32 for a box with
    ``WEIGHTS_MIB`` of memory left after the planner's compute-device reserve."""
    ckpt = make_random_checkpoint("mixtral", tmp / "ckpt", **SHAPE)
    frac, fixed = Setup.__dataclass_fields__["device_reserve"].default
    path = tmp / "cpu-box.yaml"
    path.write_text(PROFILE.format(memory=round((fixed + WEIGHTS_MIB * 2**20) / (1 - frac))))
    plan = optimize(OptimizeRequest(hardware=str(path), model=str(ckpt / "config.json"), formats=("fp32",),
                                    context_tokens=64)).plan
    profile, hw = load_profile(path)
    write_bundle(plan, model=load_model(ckpt / "config.json"), hardware=hw, profile=profile, out_dir=tmp / "bundle",
                 checkpoint=ckpt)
    return ckpt, tmp / "bundle", json.loads((tmp / "bundle" / "plan.json").read_text())


def run_measured(ckpt: Path, bundle: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "exporters.runtime_memory", "--plan", str(bundle / "plan.json"),
                          "--checkpoint", str(ckpt), "--kernels", str(bundle / "kernels"), "--tokens", "8",
                          "--threads", "1"], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_the_bundle_peaks_within_its_plans_memory(tmp_path):
    ckpt, bundle, plan = planned_bundle(tmp_path)
    sites = {s for layer in plan["layers"] for s in layer["site"]}
    assert {"resident", "fetch"} <= sites  # some experts stay, the others are fetched from the drive
    used = plan["memory"][plan["compute_device"]]
    planned = sum(v for k, v in used.items() if k != "capacity_bytes")
    measured = run_measured(ckpt, bundle)
    assert measured["peak_resets"], "this kernel refused to reset VmHWM (/proc/self/clear_refs)"
    parts = measured["components"]
    # the tensors the runtime holds are the plan's (dense weights, resident experts, cache slots)
    assert parts["resident_experts_bytes"] == used["expert_bytes"]
    assert parts["cache_slots_bytes"] <= used["cache_bytes"]
    peak = measured["anon_peak_above_baseline_bytes"]
    assert peak <= planned, (f"the bundle peaked at {peak / 2**20:.1f} MiB above its baseline, its plan says "
                             f"{planned / 2**20:.1f} MiB: {json.dumps(parts)}")
