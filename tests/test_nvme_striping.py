"""A node's NVMe drives are striped: a second drive adds capacity and read bandwidth, so
`nvme_count: 2` changes the plan where drive bandwidth binds (issue 17 item 3)."""

from __future__ import annotations

import pytest
import yaml

from planner.optimize import OptimizeRequest, optimize
from profiles.hardware import load_profile


def _profile(tmp_path, drives: int, dram: str = "12GiB"):
    data = yaml.safe_load(load_profile("desktop-4090")[0].model_dump_json())
    for dev in data["nodes"][0]["devices"]:
        if dev["kind"] == "nvme":
            dev["count"] = drives
        if dev["kind"] == "cpu":
            dev["memory_bytes"] = dram  # too little DRAM: most offloaded experts live on the drives
    path = tmp_path / f"nvme{drives}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_two_drives_are_one_striped_pool_with_twice_the_bandwidth(tmp_path):
    _, one = load_profile(_profile(tmp_path, 1))
    _, two = load_profile(_profile(tmp_path, 2))
    [m1] = [m for m in one.memories.values() if m.tier == "nvme"]
    [m2] = [m for m in two.memories.values() if m.tier == "nvme"]
    assert m2.striped and m2.devices == ("node/nvme00", "node/nvme01") and m2.id == "node/nvme00"
    assert m2.capacity_bytes == 2 * m1.capacity_bytes
    r1, r2 = one.route(m1.id, "node/gpu0"), two.route(m2.id, "node/gpu0")
    assert r2.bottleneck_bytes_per_s == pytest.approx(2 * r1.bottleneck_bytes_per_s)  # 3 GB/s drives, x4 links


def test_a_second_drive_changes_the_plan_where_drive_bandwidth_binds(tmp_path):
    plans = [optimize(OptimizeRequest(hardware=str(_profile(tmp_path, n)), model="mixtral-8x22b", engine="roofline"))
             for n in (1, 2)]
    on_disk = [sum(h.startswith("node/nvme") for layer in p.plan.layers for h in layer.home) for p in plans]
    assert on_disk[0] > 0  # the case needs the drives
    assert plans[1].plan.predicted["tpot_s"] < plans[0].plan.predicted["tpot_s"]
