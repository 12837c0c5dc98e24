"""A CPU-only machine whose memory is short: experts go to the disk and come back through
per-layer caches in DRAM (the DRAM pool is both the compute device's and the host's)."""

from __future__ import annotations

import pytest

from planner.optimize import OptimizeRequest, optimize
from profiles.formats import get_format
from profiles.models import load_model

PROFILE = """\
name: cpu-box
nodes:
  - name: node
    devices:
      - name: cpu0
        kind: cpu
        cores: 16
        memory_bytes: 3GiB
        memory_bytes_per_s: 50GB/s
        peak_ops_per_s: {fp32: 1TFLOPS, bf16: 1TFLOPS, int8: 2TOPS}
      - name: nvme0
        kind: nvme
        memory_bytes: 1TB
        memory_bytes_per_s: 3GB/s
        links:
          - {kind: pcie, to: cpu0, gen: 4, lanes: 4}
"""


def test_cpu_only_box_offloads_to_disk(tmp_path):
    path = tmp_path / "cpu-box.yaml"
    path.write_text(PROFILE)
    plan = optimize(OptimizeRequest(hardware=str(path), model="olmoe-1b-7b", context_tokens=1024)).plan
    homes = plan.counts()["home"]
    assert plan.compute_device == plan.host_device == "node/cpu0"
    assert homes.get("node/nvme0", 0) > 0 and homes.get("node/cpu0", 0) > 0  # some resident, the rest on disk
    assert set(plan.counts()["site"]) <= {"resident", "fetch", "stream"}  # no CPU "local" reads from disk
    used = plan.memory["node/cpu0"]
    assert used.used_bytes <= used.capacity_bytes


def test_the_kernels_pre_packed_copies_count_against_memory(tmp_path):
    """A CPU runs int8/int4 experts in ONNX Runtime sessions that hold a pre-packed copy:
    with kernel_bytes_factor stated, the plan budgets what the sessions hold, not what is
    stored, and keeps fewer experts resident."""
    plans = {}
    for factor in (None, 2.0):
        path = tmp_path / f"cpu-box-{factor}.yaml"
        extra = "" if factor is None else f"        kernel_bytes_factor: {{int8: {factor}, int4: {factor}}}\n"
        path.write_text(PROFILE.replace("        peak_ops_per_s: {fp32", extra + "        peak_ops_per_s: {fp32"))
        plans[factor] = optimize(OptimizeRequest(hardware=str(path), model="olmoe-1b-7b", context_tokens=1024,
                                                 formats=("int8",))).plan
    for factor, plan in plans.items():
        used = plan.memory["node/cpu0"]
        stored = sum(fmt == "int8" for lp in plan.layers for fmt, s in zip(lp.format, lp.site) if s == "resident")
        held_per_expert = used.expert_bytes / stored
        assert used.used_bytes <= used.capacity_bytes
        assert held_per_expert == pytest.approx((factor or 1.0) * load_model("olmoe-1b-7b").expert_bytes("int8"))
        # the dense matrices run in sessions too (exporters/runtime/dense.py); the embedding
        # table is only looked up, by torch
        m = load_model("olmoe-1b-7b")
        assert plan.dense_format == "int8"
        embedding = 0.0 if m.tie_word_embeddings else m.embedding_params * get_format("int8").bits_per_weight / 8
        assert used.dense_bytes == pytest.approx(embedding + (factor or 1.0) * (m.dense_bytes("int8") - embedding))
    resident = {f: p.counts()["site"].get("resident", 0) for f, p in plans.items()}
    assert resident[2.0] < resident[None]
