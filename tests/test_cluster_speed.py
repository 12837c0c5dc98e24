"""Speed-aware expert-parallel balance (GPUs of different speeds) and the placement's bound.

A two-speed toy: one node of two H100s, one of them with a quarter of the memory bandwidth
and peaks (a slow GPU); OLMoE-1B-7B on a small synthetic trace. The bound is checked
against brute force on a tiny instance small enough to enumerate.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import yaml

from planner.cluster import ClusterRequest, placement_metrics, plan_cluster, topology
from planner.cluster.bound import traffic_bound
from planner.cluster.speed import gpu_speeds
from planner.eplb import eplb_global, eplb_speed_aware
from profiles.hardware import BUNDLED_DIR, load_profile
from profiles.models import load_model
from profiles.workload.synthetic import SyntheticWorkload, generate
from simulator.engine import SimConfig, simulate

MODEL = "olmoe-1b-7b"


def _two_speed(path, slow_factor: float = 4.0):
    """One node: ``gpu0`` an H100, ``slow0`` the same card at 1 / ``slow_factor`` bandwidth and peaks."""
    data = yaml.safe_load((BUNDLED_DIR / "cluster-h100-2node.yaml").read_text())
    data["name"] = "two-speed"
    node = data["nodes"][0]
    node["count"] = 1
    devices = []
    for dev in node["devices"]:
        if dev["name"] == "nvme":
            dev["count"] = 1
        if dev["name"] == "gpu":
            dev["count"] = 1
            slow = json.loads(json.dumps(dev))
            slow["name"] = "slow"
            slow["memory_bytes_per_s"] = f"{3.35 / slow_factor:.4f}TB/s"
            slow["peak_ops_per_s"] = {k: f"{_tflops(v) / slow_factor:.3f}TFLOPS" for k, v in dev["peak_ops_per_s"].items()}
            devices.append(slow)
        devices.append(dev)
    node["devices"] = devices
    path.write_text(yaml.safe_dump(data))
    return path


def _tflops(text: str) -> float:
    from profiles.units import parse_throughput

    return parse_throughput(text) / 1e12


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return _two_speed(tmp_path_factory.mktemp("hw") / "two-speed.yaml")


@pytest.fixture(scope="module")
def trace():
    spec = load_model(MODEL)
    return generate(SyntheticWorkload(num_layers=spec.num_moe_layers, num_experts=spec.num_experts, top_k=spec.top_k,
                                      skew=0.8, affinity=0.9, prompt_tokens=24, output_tokens=8, num_sequences=12,
                                      seed=3, model=MODEL))


def test_speeds_follow_the_hardware(toy):
    _, hw = load_profile(toy)
    topo = topology(hw)
    speed = gpu_speeds(hw, topo, load_model(MODEL), "bf16", 256.0, "roofline")
    slow = [i for i, g in enumerate(topo.gpus) if "slow" in g]
    assert len(slow) == 1 and speed.mean() == pytest.approx(1.0)
    assert speed[slow[0]] < 0.7 * speed[1 - slow[0]]  # a quarter of the roofline, plus the same launch costs
    _, same = load_profile("cluster-h100-2node")
    assert np.all(gpu_speeds(same, topology(same), load_model(MODEL), "bf16", 8.0) == 1.0)  # one GPU type


@pytest.fixture(scope="module")
def planned(toy, trace):
    return plan_cluster(ClusterRequest(hardware=str(toy), model=MODEL, trace=trace, engine="roofline",
                                       batch_size=64, context_tokens=256))


def test_speed_aware_placement_puts_less_load_on_the_slow_gpu(planned, trace, toy):
    _, hw = load_profile(toy)
    topo = planned.topology
    slow = next(i for i, g in enumerate(topo.gpus) if "slow" in g)
    spec = load_model(MODEL)
    from planner.cluster import workload_arrays

    load, trans = workload_arrays(trace, spec.num_experts)
    speed = np.array(planned.info["speed"])
    R = planned.num_physical
    blind = eplb_global(load, R, 1, 1, topo.num_gpus)

    def slow_share(p):  # ours may leave slots of the slow GPU empty (-1: planner.cluster.slots)
        from planner.cluster.metrics import distribution

        P = distribution(p, spec.num_experts, topo.num_gpus)  # [L, E, G]
        return float((load * P[:, :, slow]).sum() / load.sum())

    aware = eplb_speed_aware(load, R, topo.num_gpus, speed)
    assert slow_share(blind) == pytest.approx(0.5, abs=0.02)
    assert slow_share(aware) < 0.45
    assert slow_share(planned.placement) < 0.45
    # time balance: the speed-aware layouts' straggler time beats the speed-blind one's
    m_blind = placement_metrics(blind, load, trans, topo, spec.hidden_size, trace.num_tokens, speed=speed)
    m_aware = placement_metrics(aware, load, trans, topo, spec.hidden_size, trace.num_tokens, speed=speed)
    assert m_aware["max_mean_avg"] < m_blind["max_mean_avg"] - 0.05
    assert "eplb-speed" in planned.baselines


def test_speed_aware_simulated_step_beats_speed_blind_eplb(planned, trace, toy):
    _, hw = load_profile(toy)
    spec = load_model(MODEL)
    config = SimConfig(batch_size=12)

    def step(plan):
        return simulate(plan, hw, spec, trace, config).metrics["decode_step_s"]["mean"]

    blind = step(planned.baselines["eplb-global"])
    assert step(planned.baselines["eplb-speed"]) < blind
    assert step(planned.plan) < blind


def test_bound_is_reported_in_the_plan(planned, tmp_path):
    solver = planned.plan.solver
    assert solver.bound is not None and solver.gap is not None
    assert solver.bound <= solver.objective + 1e-15
    assert solver.gap == pytest.approx(1 - solver.bound / solver.objective)
    path = planned.plan.save(tmp_path / "plan.json")
    saved = json.loads(path.read_text())["solver"]
    assert saved["gap"] == pytest.approx(solver.gap) and saved["bound"] == pytest.approx(solver.bound)


def _tiny_instance():
    """2 MoE layers x 4 experts on 2 nodes x 1 GPU, no replicas: 4!/(2!2!)^... placements to enumerate."""
    rng = np.random.default_rng(1)
    trans = rng.integers(0, 9, size=(1, 4, 4)).astype(float)
    load = np.stack([trans[0].sum(1), trans[0].sum(0)]) + 1.0  # [2, 4]
    return load, trans


def test_bound_equals_brute_force_on_a_tiny_instance():
    _, hw = load_profile(_tiny_cluster())
    topo = topology(hw)
    load, trans = _tiny_instance()
    H = 64
    cap = np.array([load[0].sum() * 0.6, load[1].sum() * 0.6])  # some splits break the cap
    best, best_p = np.inf, None
    for a in itertools.permutations(range(4)):
        for b in itertools.permutations(range(4)):
            p = np.array([sorted(a[:2]) + sorted(a[2:]), sorted(b[:2]) + sorted(b[2:])])
            gl = np.stack([[load[l, p[l, :2]].sum(), load[l, p[l, 2:]].sum()] for l in range(2)])
            if (gl.max(1) > cap + 1e-9).any():
                continue
            t = placement_metrics(p, load, trans, topo, H, 10)["traffic_s_per_token"]
            if t < best:
                best, best_p = t, p
    assert best_p is not None
    incumbent = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    exact = traffic_bound(incumbent, load, trans, topo, H, 10, cap)
    bound = traffic_bound(incumbent, load, trans, topo, H, 10, cap, max_layouts=0)
    relaxed = traffic_bound(incumbent, load, trans, topo, H, 10, cap, max_pairs=0, max_layouts=0)
    assert exact.method == "exact" and exact.traffic_s_per_token == pytest.approx(best, rel=1e-9)
    assert bound.method == "milp" and bound.status == "optimal"
    assert bound.traffic_s_per_token == pytest.approx(best, rel=1e-6)
    assert relaxed.method == "relaxation" and relaxed.traffic_s_per_token <= best + 1e-15  # a bound too
    assert bound.traffic_s_per_token <= placement_metrics(incumbent, load, trans, topo, H, 10)["traffic_s_per_token"]


def test_exact_chain_returns_a_placement_with_its_traffic():
    from planner.cluster.exact import chain_optimum, layer_layouts

    assert len(layer_layouts(np.ones(4, np.int64), 2, 2)) == 6  # C(4, 2): which two experts share GPU 0
    assert len(layer_layouts(np.array([2, 1, 1, 1, 1]), 2, 3)) == 6  # the replica on both, 2 of 4 with it
    _, hw = load_profile(_tiny_cluster())
    topo = topology(hw)
    load, trans = _tiny_instance()
    value, p = chain_optimum(np.ones((2, 4), np.int64), load, trans, topo.token_cost_s(64), np.full(2, 1e9))
    assert sorted(p[0].tolist()) == [0, 1, 2, 3] and sorted(p[1].tolist()) == [0, 1, 2, 3]
    assert value / 10 == pytest.approx(placement_metrics(p, load, trans, topo, 64, 10)["traffic_s_per_token"])


def _tiny_cluster():
    import tempfile
    from pathlib import Path

    from conftest import small_cluster

    return small_cluster(Path(tempfile.mkdtemp()) / "tiny.yaml", nodes=2, gpus=1)


def test_relaxation_bounds_every_method_on_the_small_cluster(trace):
    result = plan_cluster(ClusterRequest(hardware=str(_tiny_cluster()), model=MODEL, trace=trace, sweeps=1))
    b = result.info["bound"]
    assert b["method"] == "relaxation"  # too big for the MILP
    for name, m in result.metrics.items():
        # the copies differ between methods, so only ours is held to the bound exactly
        if name == "ours":
            assert b["traffic_s_per_token"] <= m["traffic_s_per_token"] + 1e-15
            assert b["cross_node_fraction"] <= m["cross_node_fraction"] + 1e-12
    assert 0.0 <= result.plan.solver.gap <= 1.0


def test_cli_prints_the_speeds_and_the_gap(run_cli, toy):
    args = ("optimize", "-H", toy, "-m", MODEL, "--parallel", "ep", "--batch", "64", "--context", "512")
    text = run_cli(*args)
    assert text.exit_code == 0, text.output
    assert "load balanced by time" in text.output and "lower bound" in text.output and "gap" in text.output
    data = json.loads(run_cli(*args, "--json").stdout)
    bound = data["summary"]["bound"]
    assert bound["gap"] == pytest.approx(data["plan"]["solver"]["gap"])
    assert bound["status"] == data["plan"]["solver"]["status"] and bound["bound_status"] == "relaxation"
    assert data["summary"]["solver"]["speed"] is not None


def test_small_box_plan_is_the_chain_optimum():
    """Mixtral's 8 experts on 2 GPUs: every layout listed, the plan is the optimum (gap 0)."""
    result = plan_cluster(ClusterRequest(hardware="workstation-2x3090-nvlink", model="mixtral-8x7b",
                                         formats=("int4",), sweeps=1))
    assert result.info["exact_chain"] and result.info["bound"]["method"] == "exact"
    assert result.plan.solver.status == "optimal" and result.plan.solver.gap == pytest.approx(0.0, abs=1e-9)
    for name in ("eplb-global", "eplb-hierarchical"):
        assert result.metrics["ours"]["traffic_s_per_token"] <= result.metrics[name]["traffic_s_per_token"]
