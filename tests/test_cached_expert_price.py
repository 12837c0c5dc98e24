"""Experts run from the engine's expert cache at their own price (issue 14): the bundle runs a
cached CPU expert in a single-thread session of its own, resident and CPU-local ones in the
layer's session on every thread, so a probed bundle profile states a ``cached_efficiency``
beside its ``efficiency``. The planner and the simulator price a cached expert's call with it,
and only those calls: one price per placement."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import yaml

from planner.optimize import OptimizeRequest, optimize
from profiles.engines import ENGINES_DIR, load_engine
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.perf import expert_call_s
from profiles.workload.defaults import default_workload
from profiles.workload.trace import DECODE
from simulator.engine import SimConfig, simulate

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
LAYER_SESSION = {"memory_fraction": 0.6, "compute_max_fraction": 0.8, "half_tokens": 4.0, "source": "probe (test)"}
OWN_SESSION = {"memory_fraction": 0.2, "compute_max_fraction": 0.3, "half_tokens": 4.0, "source": "probe (test)"}


def engine(tmp_path, cached: bool):
    doc = yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text())
    doc["cpu"]["efficiency"] = copy.deepcopy(LAYER_SESSION)
    if cached:
        doc["cpu"]["cached_efficiency"] = copy.deepcopy(OWN_SESSION)
    path = tmp_path / f"bundle-{cached}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cached")
    hw_path = tmp / "cpu-box.yaml"
    hw_path.write_text(PROFILE)
    model = load_model("olmoe-1b-7b")
    trace = default_workload(model).subset_sequences([0, 1])
    trace = dataclasses.replace(trace, phase=np.full(trace.num_tokens, DECODE, np.uint8))
    return tmp, hw_path, model, trace


def test_only_cached_calls_take_the_cached_efficiency(tmp_path):
    _, hw = load_profile(str(_write(tmp_path)))
    cpu = load_engine(engine(tmp_path, True)).apply(hw).devices["node/cpu0"]
    plain = load_engine(engine(tmp_path, False)).apply(hw).devices["node/cpu0"]
    assert cpu.cached_efficiency.memory_fraction == 0.2 and cpu.efficiency.memory_fraction == 0.6
    assert plain.cached_efficiency is None
    n_bytes, flops = 6.3e6, 2.0 * 3 * 2048 * 1024
    for n in (1, 16):
        assert expert_call_s(cpu, "int8", n_bytes, n * flops, n) == expert_call_s(plain, "int8", n_bytes, n * flops, n)
        assert expert_call_s(plain, "int8", n_bytes, n * flops, n, cached=True) == \
            expert_call_s(plain, "int8", n_bytes, n * flops, n)  # none stated: the layer session's price
        assert expert_call_s(cpu, "int8", n_bytes, n * flops, n, cached=True) > \
            1.5 * expert_call_s(cpu, "int8", n_bytes, n * flops, n) - cpu.expert_call_overhead_s
    one = expert_call_s(cpu, "int8", n_bytes, flops, 1, cached=True) - cpu.expert_call_overhead_s - cpu.launch_overhead_s
    assert one == pytest.approx(n_bytes / (50e9 * 0.2))  # memory-bound at the cached share of the bandwidth


def test_a_calibrated_hardware_efficiency_prices_cached_calls_too(tmp_path):
    doc = yaml.safe_load(PROFILE)
    doc["nodes"][0]["devices"][0]["efficiency"] = {"memory_fraction": 0.5, "compute_max_fraction": 0.5,
                                                   "half_tokens": 2.0, "source": "calibrated by planner calibrate"}
    path = tmp_path / "calibrated.yaml"
    path.write_text(yaml.safe_dump(doc))
    cpu = load_engine(engine(tmp_path, True)).apply(load_profile(str(path))[1]).devices["node/cpu0"]
    assert cpu.efficiency.memory_fraction == 0.5 and cpu.cached_efficiency is None


def test_planner_and_simulator_price_cached_experts_alike(box):
    """A disk-offloading CPU plan: the planner's decode step = the simulator's (0.5%) with the
    cached experts' own efficiency, and that plan costs more there than with the layer
    session's efficiency for every call."""
    tmp, hw_path, model, trace = box
    _, hw = load_profile(str(hw_path))
    tpot = {}
    for cached in (True, False):
        path = engine(tmp, cached)
        plan = optimize(OptimizeRequest(hardware=str(hw_path), model="olmoe-1b-7b", trace=trace, formats=("int8",),
                                        engine=str(path))).plan
        assert plan.counts()["site"].get("fetch", 0) > 0 and plan.counts()["site"].get("resident", 0) > 0
        seen = load_engine(path).apply(hw)
        report = simulate(plan, seen, model, trace, SimConfig(batch_size=1, kv_context="plan"))
        assert report.metrics["decode_step_s"]["mean"] == pytest.approx(plan.predicted["tpot_s"], rel=0.005)
        tpot[cached] = plan.predicted["tpot_s"]
    assert tpot[True] > tpot[False]


def _write(tmp_path):
    path = tmp_path / "cpu-box.yaml"
    path.write_text(PROFILE)
    return path
