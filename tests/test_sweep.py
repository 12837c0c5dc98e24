"""`planner sweep`: grid files, hardware knobs, the Pareto front, parallel runs equal serial."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.commands.sweep import evaluate_point
from profiles.errors import InputError
from profiles.hardware import HardwareProfile, load_profile
from simulator.sweep import (
    Grid,
    grid_points,
    load_grid,
    pareto_front,
    point_profile,
    point_specs,
    run_sweep,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "whatif_sweep"

SMALL = """\
name: small
base: {hardware: desktop-3060, model: olmoe-1b-7b}
vary:
  batch: [1, 2]
costs:
  batch: {"1": 0.01, "2": 0.02}
simulate: {requests: 2}
"""


def _rows_without_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("plan_s", "simulate_s")} for r in rows]


def test_points_are_the_cartesian_product_in_file_order(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nbase: {hardware: desktop-4090, model: mixtral-8x7b}\n"
                    "vary: {gpu: [desktop-4090, desktop-5090], dram: [64GiB, 128GiB]}\n")
    grid = load_grid(path)
    assert grid_points(grid) == [{"gpu": "desktop-4090", "dram": "64GiB"}, {"gpu": "desktop-4090", "dram": "128GiB"},
                                 {"gpu": "desktop-5090", "dram": "64GiB"}, {"gpu": "desktop-5090", "dram": "128GiB"}]


def test_hardware_knobs_change_the_profile():
    grid = Grid.model_validate({"name": "g", "base": {"hardware": "desktop-4090", "model": "mixtral-8x7b"}})
    doc = point_profile(grid, {"gpu": "desktop-5090", "dram": "128GiB", "pcie_gen": 5, "nvme_count": 2}, "p0")
    hw = HardwareProfile.model_validate(doc).resolve()
    _, donor = load_profile("desktop-5090")
    gpu = hw.devices_of_kind("gpu")[0]
    assert gpu.model == donor.devices_of_kind("gpu")[0].model and gpu.id == "node/gpu0"
    assert hw.devices_of_kind("cpu")[0].memory_bytes == 128 * 2**30
    assert len(hw.devices_of_kind("nvme")) == 2
    assert hw.route("node/cpu0", "node/gpu0").bottleneck_bytes_per_s > load_profile("desktop-4090")[1].route(
        "node/cpu0", "node/gpu0").bottleneck_bytes_per_s  # PCIe 5 is faster
    cluster = Grid.model_validate({"name": "c", "base": {"hardware": "cluster-h100-2node", "model": "deepseek-v3"}})
    hw2 = HardwareProfile.model_validate(point_profile(cluster, {"nodes": 4, "gpu_count": 4}, "p1")).resolve()
    assert len(hw2.devices_of_kind("gpu")) == 16 and len(hw2.nodes) == 4
    single = Grid.model_validate({"name": "s", "base": {"hardware": "node-h100-sxm", "model": "deepseek-v3"}})
    with pytest.raises(InputError, match="not connected"):  # copies of a node need a cluster switch
        point_profile(single, {"nodes": 2}, "p2")


@pytest.mark.parametrize("text, key", [
    ("name: g\nbase: {hardware: desktop-4090, model: m}\nvary: {colour: [red]}\n", "vary.colour"),
    ("name: g\nbase: {hardware: desktop-4090, model: m}\nvary: {dram: []}\n", "vary.dram"),
    ("name: g\nbase: {hardware: desktop-4090}\n", "base.model"),
    ("name: g\nbase: {hardware: desktop-4090, model: m}\ncosts: {gpu: {a: 1}}\n", "costs.gpu"),
])
def test_bad_grids_are_one_line(tmp_path, text, key):
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        load_grid(path)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_pareto_front_by_hand():
    rows = [{"status": "ok", "cost_per_hour_usd": c, "tokens_per_s": t} for c, t in
            [(1.0, 10.0), (2.0, 9.0), (2.0, 20.0), (3.0, 20.0 + 1e-9), (4.0, 30.0)]]
    rows.append({"status": "infeasible: too big", "cost_per_hour_usd": 0.5})
    assert pareto_front(rows) == [0, 2, 4]  # (2, 9) is beaten; (3, 20) is no faster than (2, 20)


def test_parallel_and_ray_runs_equal_the_serial_run(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(SMALL)
    grid = load_grid(path)
    specs = point_specs(grid, tmp_path / "out")
    serial = run_sweep(specs, evaluate_point)
    assert [r["status"] for r in serial] == ["ok", "ok"]
    assert serial[1]["tokens_per_s"] > serial[0]["tokens_per_s"]  # batch 2 shares the weight reads
    assert serial[0]["cost_per_hour_usd"] == 0.01
    pooled = run_sweep(specs, evaluate_point, jobs=2)
    assert _rows_without_timing(pooled) == _rows_without_timing(serial)
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'moe-planner[ray]')")
    on_ray = run_sweep(specs, evaluate_point, jobs=2, ray_address="local")
    assert _rows_without_timing(on_ray) == _rows_without_timing(serial)


def test_sweep_cli_writes_table_and_plot(tmp_path, run_cli):
    path = tmp_path / "g.yaml"
    path.write_text(SMALL.replace("batch: [1, 2]", "batch: [1]").replace('"2": 0.02', '"3": 0.03'))
    out = tmp_path / "out"
    r = run_cli("--json", "sweep", path, "--out", out)
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["pareto"] == [0] and data["rows"][0]["status"] == "ok"
    for name in ("results.csv", "results.md", "results.json", "pareto.png", "hardware/p000.yaml"):
        assert (out / name).stat().st_size > 0
    again = run_cli("sweep", path, "--out", out)
    assert again.exit_code == 1 and "--force" in again.stderr


def test_infeasible_point_is_a_row_not_a_crash(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: tight\nbase: {hardware: desktop-3060, model: olmoe-1b-7b, objective: throughput}\n"
                    "vary: {batch: [100000]}\nsimulate: {requests: 1}\n")  # a KV cache no memory holds
    grid = load_grid(path)
    rows = run_sweep(point_specs(grid, tmp_path / "out"), evaluate_point)
    assert rows[0]["status"].startswith("infeasible")


def test_shipped_grids_load():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        grid = load_grid(path)
        assert grid_points(grid)
