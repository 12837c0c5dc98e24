"""A CPU-only machine whose memory is short: experts go to the disk and come back through
per-layer caches in DRAM (the DRAM pool is both the compute device's and the host's)."""

from __future__ import annotations

from planner.optimize import OptimizeRequest, optimize

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
