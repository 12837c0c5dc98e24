"""Offload plans over every GPU of a node (planner.multi_gpu): a tiny two-GPU box whose GPUs
together hold what one cannot, hops priced by hand, brute force, the quality budget, the
simulator's agreement, plan.json and plan_check, and single-GPU plans unchanged."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from planner.ilp import build_problem, pareto_front, solve
from planner.multi_gpu import feasible, hop_s, layer_ranges, node_gpus, objective_s, plan_multi_gpu
from planner.optimize import OptimizeRequest, make_setup, optimize
from planner.plan import Inputs, load_plan
from planner.plan_check import check_plan
from planner.workload_view import planning_stats
from profiles.engines import load_engine
from profiles.errors import InputError
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.synthetic import SyntheticWorkload, generate
from simulator.engine import SimConfig, simulate

L = 4  # MoE layers of the tiny model
TINY_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": L, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
    "num_experts_per_tok": 2, "vocab_size": 128, "tie_word_embeddings": False,
}
LINK_BPS, LINK_LAT_S = 1e8, 1e-6  # each GPU's own PCIe link to the CPU
GPU = """
      - name: {name}
        kind: gpu
        memory_bytes: {hbm}
        memory_bytes_per_s: 300GB/s
        peak_ops_per_s: {bf16: 30TFLOPS, int8: 60TOPS}
        links: [{kind: pcie, to: cpu0, bytes_per_s: 100MB/s, latency_s: 1us}]
"""
HW = """
name: tiny-2gpu
nodes:
  - name: n
    devices:
      - {name: cpu0, kind: cpu, cores: 4, memory_bytes: 2MB, memory_bytes_per_s: 20GB/s,
         peak_ops_per_s: {fp32: 0.2TFLOPS, bf16: 0.4TFLOPS}}
"""
HBM = 450_000  # bytes per GPU: the dense weights and a part of the experts (all bf16 experts: 1.2 MB)


def _box(tmp_path, gpus: int, layers: int = L):
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text(json.dumps(TINY_CONFIG | {"num_hidden_layers": layers}))
    text = HW + "".join(GPU.replace("{name}", f"gpu{g}").replace("{hbm}", str(HBM)) for g in range(gpus))
    (tmp_path / f"hw{gpus}.yaml").write_text(text)
    _, hw = load_profile(tmp_path / f"hw{gpus}.yaml")
    model = load_model(tmp_path / "model")
    trace = generate(SyntheticWorkload(num_layers=layers, num_experts=8, top_k=2, skew=1.0, temporal=0.3, affinity=0.5,
                                       num_sequences=8, prompt_tokens=40, output_tokens=10, seed=0))
    return hw, model, trace


def _setup(tmp_path, gpus: int = 2, layers: int = L):
    hw, model, trace = _box(tmp_path, gpus, layers)
    s = make_setup(hw, model, planning_stats(trace), batch_size=1, context_tokens=64,
                   formats=("bf16", "int8", "int4"), engine=load_engine("roofline"))
    return dataclasses.replace(s, device_reserve=(0.0, 0.0), host_reserve=(0.0, 0.0)), hw, model, trace


INPUTS = Inputs(hardware="tiny-2gpu", hardware_digest="-", model="tiny", model_digest="-", workload="-",
                workload_digest="-", engine="roofline")
REQ = OptimizeRequest(gap=1e-6, prefetch="none")


def _single_gpu_s(s, budget) -> float:
    """The one-GPU ILP's seconds per step for ``s`` (prefetch none, as REQ)."""
    return solve(build_problem(s, budget), prefetch=False, gap=1e-6).objective_s


def test_two_gpus_hold_what_one_cannot(tmp_path):
    s, hw, model, _ = _setup(tmp_path)
    assert node_gpus(s) == ["n/gpu0", "n/gpu1"]
    plan = plan_multi_gpu(s, REQ, INPUTS, 0.01)
    one = _single_gpu_s(s, 0.01)
    assert plan.predicted["tpot_s"] < one * (1 - 1e-3)  # strictly faster than the one-GPU plan
    assert len(plan.layer_devices) == L and set(plan.layer_devices) == {"n/gpu0", "n/gpu1"}
    for g in ("n/gpu0", "n/gpu1"):  # each GPU's capacity holds, counted from the plan's own experts
        use = plan.memory[g]
        assert use.used_bytes <= use.capacity_bytes
        resident = sum(model.expert_bytes(f) for lp, d in zip(plan.layers, plan.layer_devices) if d == g
                       for f, site in zip(lp.format, lp.site) if site == "resident")
        assert use.expert_bytes == pytest.approx(resident)
    for lp, d in zip(plan.layers, plan.layer_devices):  # resident experts and caches on the layer's GPU
        assert all(h == d for h, site in zip(lp.home, lp.site) if site == "resident")
        assert lp.cache_device in (None, d)
    check_plan(plan, hw, model)  # raises on a plan that cannot run (warnings: the dummy digests)
    assert any(n.startswith("multi-GPU pipeline: n/gpu") for n in plan.notes)


def test_hops_priced_by_hand(tmp_path):
    s, *_ = _setup(tmp_path)
    # gpu0 -> cpu0 -> gpu1: two links of 1 us, 64 hidden x 1 token x 2 bytes at 100 MB/s
    one_hop = 2 * LINK_LAT_S + 64 * 2 / LINK_BPS
    assert hop_s(s, "n/gpu0", "n/gpu1", 1) == pytest.approx(one_hop, rel=1e-12)
    assert hop_s(s, "n/gpu1", "n/gpu0", 3) == pytest.approx(2 * LINK_LAT_S + 3 * 64 * 2 / LINK_BPS, rel=1e-12)
    assert hop_s(s, "n/gpu1", "n/gpu1", 1) == 0.0
    plan = plan_multi_gpu(s, REQ, INPUTS, 0.01)
    path = ["n/gpu0", *plan.layer_devices, "n/gpu0"]  # embedding and head on compute_device
    changes = sum(a != b for a, b in zip(path, path[1:]))
    assert changes >= 2
    assert plan.predicted["hop_s_per_step"] == pytest.approx(changes * one_hop, rel=1e-12)


def test_mip_equals_brute_force(tmp_path):
    """Two layers: every device assignment x every dense format x every pair of front
    options (pareto_front per layer and GPU): the least feasible step time is the MIP's."""
    s, *_ = _setup(tmp_path, layers=2)
    budget = 0.01
    plan = plan_multi_gpu(s, REQ, INPUTS, budget)
    gpus = node_gpus(s)
    problems = [build_problem(dataclasses.replace(s, compute=s.hardware.devices[g]), budget) for g in gpus]
    hop = np.array([[hop_s(s, a, b, 1) for b in gpus] for a in gpus])
    times = [p.times(False) for p in problems]
    best = np.inf
    for fm in problems[0].fixed:
        if problems[0].fixed[fm].error > budget:
            continue
        for devices in itertools.product(range(2), repeat=2):
            fronts = [pareto_front(times[g][l], problems[g].tables[l]) for l, g in enumerate(devices)]
            for choice in itertools.product(*fronts):
                if feasible(problems, choice, devices, fm, budget):
                    best = min(best, objective_s(problems, times, choice, devices, hop, fm))
    assert plan.predicted["tpot_s"] == pytest.approx(best, rel=1e-6)


def test_quality_budget_binds(tmp_path):
    s, *_ = _setup(tmp_path)
    loose = plan_multi_gpu(s, REQ, INPUTS, 0.05)
    tight = plan_multi_gpu(s, REQ, INPUTS, 0.002)
    assert tight.quality_error <= 0.002 + 1e-12 and loose.quality_error <= 0.05 + 1e-12
    assert loose.quality_error > 0.002  # the loose plan uses error the tight one may not
    assert tight.predicted["tpot_s"] > loose.predicted["tpot_s"]  # and pays for it


def test_simulator_agrees_on_two_gpu_plan(tmp_path):
    """Batch 1, one sequence decoding: the simulated step = the prediction (0.5%), layers on
    their own GPUs, fetches over their own links, hops played out."""
    s, hw, model, trace = _setup(tmp_path)
    plan = plan_multi_gpu(s, dataclasses.replace(REQ, prefetch="none"), INPUTS, 0.01)
    assert len(set(plan.layer_devices)) == 2
    from profiles.workload.trace import DECODE

    decode = dataclasses.replace(trace.subset_sequences([0, 1, 2]),)
    decode = dataclasses.replace(decode, phase=np.full(decode.num_tokens, DECODE, np.uint8))
    report = simulate(plan, load_engine("roofline").apply(hw), model, decode,
                      SimConfig(batch_size=1, kv_context="plan"))
    assert report.metrics["decode_step_s"]["mean"] == pytest.approx(plan.predicted["tpot_s"], rel=0.005)


def test_plan_json_round_trip_and_check(tmp_path):
    s, hw, model, _ = _setup(tmp_path)
    plan = plan_multi_gpu(s, REQ, INPUTS, 0.01)
    path = plan.save(tmp_path / "plan.json")
    again = load_plan(path)
    assert again.to_json() == path.read_text() == plan.to_json()  # floats rounded to 12 digits in both
    assert again.layer_devices == plan.layer_devices and again.layers == plan.layers
    assert [again.device_of(l) for l in range(L)] == list(plan.layer_devices)
    # plan_check refuses a layer on the CPU, and a resident expert away from its layer's GPU
    bad = plan.model_copy(update={"layer_devices": ("n/cpu0",) + plan.layer_devices[1:]})
    with pytest.raises(InputError, match=r"layer_devices\[0\]"):
        check_plan(bad, hw, model)
    flipped = tuple("n/gpu1" if d == "n/gpu0" else "n/gpu0" for d in plan.layer_devices)
    with pytest.raises(InputError, match="resident expert must live on its layer's device"):
        check_plan(plan.model_copy(update={"layer_devices": flipped}), hw, model)
    with pytest.raises(InputError, match="one compute device per MoE layer"):
        check_plan(plan.model_copy(update={"layer_devices": plan.layer_devices[:-1]}), hw, model)


def test_single_gpu_plans_unchanged(tmp_path):
    """On a one-GPU box the flag changes nothing: byte-identical plan.json, no layer_devices key."""
    hw, model, trace = _box(tmp_path, 1)
    req = OptimizeRequest(hardware="desktop-3060", model=str(tmp_path / "model"), trace=trace, engine="roofline")
    before = optimize(req).plan.to_json()
    after = optimize(dataclasses.replace(req, multi_gpu=True)).plan.to_json()
    assert after == before and "layer_devices" not in before


def test_layer_ranges():
    assert layer_ranges(("a", "a", "b", "b", "b", "a")) == "a: layers 0-1, b: layers 2-4, a: layer 5"


def test_export_bundles_a_multi_gpu_plan_with_each_gpu_as_its_cuda_device(tmp_path):
    """A 2-GPU plan is bundled: devices.json maps each of its GPUs to its own CUDA device (the
    runtime runs each layer there; tests/test_runtime_multi_device.py runs one)."""
    from exporters.bundle import write_bundle

    s, hw, model, _ = _setup(tmp_path)
    plan = plan_multi_gpu(s, REQ, INPUTS, 0.01)
    assert len(set(plan.layer_devices)) == 2
    profile, _ = load_profile(tmp_path / "hw2.yaml")
    write_bundle(plan, model=model, hardware=hw, profile=profile, out_dir=tmp_path / "bundle")
    devices = json.loads((tmp_path / "bundle" / "devices.json").read_text())["devices"]
    assert devices == {"n/gpu0": {"torch": "cuda:0", "kind": "gpu"}, "n/gpu1": {"torch": "cuda:1", "kind": "gpu"}}


def test_polish_removes_hops_it_can(tmp_path):
    """Layers on alternating GPUs with their smallest options: every layer fits on the first
    GPU, so polish moves them there and saves exactly the four hops, and never leaves a plan
    infeasible."""
    from planner.multi_gpu import polish

    s, *_ = _setup(tmp_path)
    gpus = node_gpus(s)
    problems = [build_problem(dataclasses.replace(s, compute=s.hardware.devices[g]), 0.05) for g in gpus]
    times = [p.times(False) for p in problems]
    hop = np.array([[hop_s(s, a, b, 1) for b in gpus] for a in gpus])
    choice = tuple(int(np.argmin(t.dev_bytes)) for t in problems[0].tables)
    fm = "int4"
    alternating = (0, 1, 0, 1)
    before = objective_s(problems, times, choice, alternating, hop, fm)
    assert feasible(problems, choice, alternating, fm, None)
    out = polish(problems, times, choice, alternating, hop, fm, None)
    assert out["devices"] == (0, 0, 0, 0) and feasible(problems, choice, out["devices"], fm, None)
    assert out["objective"] == pytest.approx(before - 4 * hop[0, 1], rel=1e-12)


def test_equal_gpus_share_one_option_table(tmp_path):
    """Three equal GPUs: build_problem runs once, and the shared tables, fixed costs and
    capacities are what each GPU's own build gives; a GPU with other memory gets its own."""
    from planner.multi_gpu_equal import identical, shared_problems

    s, hw, *_ = _setup(tmp_path, gpus=3)
    setups = [dataclasses.replace(s, compute=hw.devices[g]) for g in node_gpus(s)]
    built = []
    problems = shared_problems(setups, 0.01, build=lambda su, b: built.append(su.compute.id) or build_problem(su, b))
    assert built == ["n/gpu0"] and identical(problems)
    for p, su in zip(problems, setups):
        own = build_problem(su, 0.01)
        assert p.device_mem == own.device_mem and p.caps == own.caps and p.fixed == own.fixed
        for a, b in zip(p.tables, own.tables):
            assert all(np.array_equal(getattr(a, c), getattr(b, c)) for c in ("dev_bytes", "home_bytes", "error", "b_off"))
            assert np.array_equal(option_time_of(a), option_time_of(b))
    bigger = dataclasses.replace(hw.devices["n/gpu2"], memory_bytes=2 * HBM)
    odd = dataclasses.replace(setups[2], compute=bigger)
    built.clear()
    assert not identical(shared_problems(setups[:2] + [odd], 0.01,
                                         build=lambda su, b: built.append(su.compute.id) or build_problem(su, b)))
    assert built == ["n/gpu0", "n/gpu2"]


def option_time_of(t):
    from planner.costs import option_time

    return option_time(t, False)


def test_equal_gpus_plan_is_certified(tmp_path):
    """Three equal GPUs (pooled relaxation): the plan keeps every GPU's capacity, each GPU holds
    one contiguous range, and the reported bound is below the plan and at most its gap away."""
    s, hw, model, _ = _setup(tmp_path, gpus=3, layers=6)
    plan = plan_multi_gpu(s, REQ, INPUTS, 0.01)
    info = plan.solver
    assert info.bound <= info.objective and info.gap == pytest.approx((info.objective - info.bound) / info.objective)
    p0 = build_problem(s, 0.01)  # one GPU's variables (the per-GPU MIP has three times as many, and hops)
    assert info.variables == sum(len(pareto_front(tau, t)) for tau, t in zip(p0.times(False), p0.tables))
    devices = plan.layer_devices or ("n/gpu0",) * 6
    runs = [d for k, d in enumerate(devices) if k == 0 or devices[k - 1] != d]
    assert len(runs) == len(set(runs))
    for g in set(devices):
        assert plan.memory[g].used_bytes <= plan.memory[g].capacity_bytes
    check_plan(plan, hw, model)


def test_equal_gpus_fall_back_to_the_per_gpu_mip(tmp_path, monkeypatch):
    """When the contiguous ranges leave a GPU without a plan, the part is solved by the MIP over
    (layer, option, GPU): a plan still comes back, within capacity and certified."""
    import planner.multi_gpu as mg

    s, hw, model, _ = _setup(tmp_path, gpus=3, layers=6)
    pooled = plan_multi_gpu(s, REQ, INPUTS, 0.01)
    monkeypatch.setattr(mg, "per_gpu", lambda *a, **k: None)
    plan = plan_multi_gpu(s, REQ, INPUTS, 0.01)
    assert plan.solver.variables > pooled.solver.variables  # three GPUs' options and the hops
    assert plan.solver.bound <= plan.solver.objective
    check_plan(plan, hw, model)
