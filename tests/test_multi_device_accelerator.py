"""A GPU + FPGA-class accelerator node in a multi-device pipeline plan (issue 19 items 1, 3):
the accelerator holds layers (dense share, resident experts at the formats it states peaks
for) when that beats offloading them over the GPU's slow link, and is left unused when it is
slow; the simulator plays the plan out as predicted; the bundle refuses it (tested in
test_runtime_multi_device)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from planner.multi_gpu import node_gpus, plan_multi_gpu
from planner.optimize import make_setup
from exporters.engines.single import render_engines
from planner.plan import load_plan
from planner.plan_check import check_plan
from planner.workload_view import planning_stats
from profiles.engines import load_engine
from profiles.hardware import load_profile
from profiles.workload.trace import DECODE
from simulator.engine import SimConfig, simulate
from test_multi_gpu import GPU, HBM, HW, INPUTS, REQ, _box, _single_gpu_s

FPGA = """
      - name: fpga0
        kind: accelerator
        memory_bytes: {hbm}
        memory_bytes_per_s: {bw}
        peak_ops_per_s: {{int8: 20TOPS, int4: 40TOPS}}
        links: [{{kind: pcie, to: cpu0, bytes_per_s: 1GB/s, latency_s: 1us}}]
"""


def _setup(tmp_path, bw: str):
    """One GPU of HBM bytes (its link 100 MB/s), a slow host CPU (0.2 GB/s: offloaded experts cost
    about as much there as over the link) and an accelerator of HBM bytes at ``bw``."""
    _, model, trace = _box(tmp_path, 1)
    path = tmp_path / "gpu-fpga.yaml"
    cpu = HW.replace("memory_bytes_per_s: 20GB/s", "memory_bytes_per_s: 0.2GB/s")
    assert cpu != HW
    path.write_text(cpu + GPU.replace("{name}", "gpu0").replace("{hbm}", str(HBM)) + FPGA.format(hbm=HBM, bw=bw))
    _, hw = load_profile(path)
    s = make_setup(hw, model, planning_stats(trace), batch_size=1, context_tokens=64,
                   formats=("bf16", "int8", "int4"), engine=load_engine("roofline"))
    return dataclasses.replace(s, device_reserve=(0.0, 0.0), host_reserve=(0.0, 0.0)), hw, model, trace


def test_a_fast_accelerator_holds_layers_and_beats_the_gpu_alone(tmp_path):
    s, hw, model, trace = _setup(tmp_path, "200GB/s")
    assert node_gpus(s) == ["n/gpu0", "n/fpga0"]
    plan = plan_multi_gpu(s, REQ, INPUTS, 0.01)
    one = _single_gpu_s(s, 0.01)
    assert "n/fpga0" in plan.layer_devices and plan.predicted["tpot_s"] < one * (1 - 1e-3)
    assert plan.solver.gap <= REQ.gap + 1e-9
    for lp, d in zip(plan.layers, plan.layer_devices):
        if d == "n/fpga0":  # what the card holds it computes: only the formats it states a peak for
            assert {f for f, site in zip(lp.format, lp.site) if site == "resident"} <= {"int8", "int4"}
            assert {h for h, site in zip(lp.home, lp.site) if site == "resident"} <= {"n/fpga0"}
    use = plan.memory["n/fpga0"]
    assert 0 < use.used_bytes <= use.capacity_bytes
    check_plan(plan, hw, model)
    assert load_plan(plan.save(tmp_path / "plan.json")).layer_devices == plan.layer_devices  # plan.json records it

    # engines without a backend for the card say so in one line and write nothing
    out = render_engines(plan, model, hw, tmp_path / "bundle")
    assert out.files == () and set(out.skipped) >= {"llama.cpp", "accelerate"}
    assert all("accelerator n/fpga0" in out.skipped[e] and "\n" not in out.skipped[e] for e in ("llama.cpp", "accelerate"))

    # the simulator runs layers on the accelerator as the planner priced them
    decode = dataclasses.replace(trace.subset_sequences([0, 1, 2]))
    decode = dataclasses.replace(decode, phase=np.full(decode.num_tokens, DECODE, np.uint8))
    report = simulate(plan, load_engine("roofline").apply(hw), model, decode, SimConfig(batch_size=1, kv_context="plan"))
    assert report.metrics["decode_step_s"]["mean"] == pytest.approx(plan.predicted["tpot_s"], rel=0.005)


def test_a_slow_accelerator_is_left_unused(tmp_path):
    s, *_ = _setup(tmp_path, "10MB/s")
    plan = plan_multi_gpu(s, REQ, INPUTS, 0.01)
    assert plan.layer_devices is None and "n/fpga0" not in plan.memory
    assert plan.predicted["tpot_s"] == pytest.approx(_single_gpu_s(s, 0.01), rel=1e-6)
