"""The expert-parallel cluster planner (planner/cluster/) and its `planner optimize` hook.

Small instances only: OLMoE-1B-7B (16 MoE layers x 64 experts, top-8) on a 2-node x 2-GPU
cut of the H100 cluster profile, with a few hundred synthetic tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from planner.cluster import (
    ClusterRequest,
    cluster_applies,
    default_redundant,
    group_limited,
    place_experts,
    placement_metrics,
    plan_cluster,
    topology,
    workload_arrays,
)
from planner.eplb import eplb_global
from profiles.errors import InfeasibleError, InputError
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import save_trace
from conftest import small_cluster  # noqa: E402

MODEL = "olmoe-1b-7b"


@pytest.fixture(scope="module")
def cluster_yaml(tmp_path_factory):
    return small_cluster(tmp_path_factory.mktemp("hw") / "tiny.yaml")


@pytest.fixture(scope="module")
def trace():
    spec = load_model(MODEL)
    return generate(SyntheticWorkload(num_layers=spec.num_moe_layers, num_experts=spec.num_experts, top_k=spec.top_k,
                                      skew=0.8, affinity=0.9, prompt_tokens=24, output_tokens=8, num_sequences=12,
                                      seed=3, model=MODEL))


def _valid(phy2log: np.ndarray, E: int, G: int) -> None:
    S = phy2log.shape[1] // G
    for row in phy2log:
        assert set(row.tolist()) == set(range(E))  # every expert somewhere
        for g in range(G):
            slots = row[g * S:(g + 1) * S]
            assert len(set(slots.tolist())) == S  # no two copies of one expert on a GPU


def test_topology_ranks_and_link_costs(cluster_yaml):
    _, hw = load_profile(cluster_yaml)
    topo = topology(hw)
    assert topo.gpus == ("node0/gpu0", "node0/gpu1", "node1/gpu0", "node1/gpu1")
    assert topo.node_of.tolist() == [0, 0, 1, 1]
    nvlink, ib = topo.cost_s_per_byte[0, 1], topo.cost_s_per_byte[0, 2]
    assert nvlink == pytest.approx(1 / 450e9) and ib == pytest.approx(1 / 50e9)


def test_topology_needs_gpus():
    _, hw = load_profile("desktop-alveo-u280")
    with pytest.raises(InputError, match="needs GPUs"):
        topology(hw)


@pytest.mark.parametrize("E,G,expected", [(256, 64, 64), (256, 16, 32), (64, 4, 8), (8, 16, 8), (256, 8, 32)])
def test_default_redundant(E, G, expected):
    assert default_redundant(E, G) == expected


def test_ours_keeps_eplb_balance_and_cuts_traffic(cluster_yaml, trace):
    _, hw = load_profile(cluster_yaml)
    topo = topology(hw)
    load, trans = workload_arrays(trace, 64)
    R = 64 + default_redundant(64, 4)
    ours, info = place_experts(load, trans, topo, R, hidden_size=2048, time_limit_s=60)
    _valid(ours, 64, 4)
    warm = eplb_global(load, R, 1, 1, 4)
    m_ours = placement_metrics(ours, load, trans, topo, 2048, trace.num_tokens)
    m_warm = placement_metrics(warm, load, trans, topo, 2048, trace.num_tokens)
    # per layer: never above EPLB global's straggler + the slack (1% of the mean)
    assert (m_ours["max_mean"] <= m_warm["max_mean"] + 0.01 + 1e-9).all()
    assert m_ours["traffic_s_per_token"] <= m_warm["traffic_s_per_token"]
    assert m_ours["cross_node_fraction"] < 0.9 * m_warm["cross_node_fraction"]
    assert info["layers_improved"] > 0 and not info["stopped_by_time_limit"]


def test_metrics_by_hand(cluster_yaml):
    _, hw = load_profile(cluster_yaml)
    topo = topology(hw)
    # 2 layers x 4 experts on 4 GPUs, one slot each; layer 1 swaps GPUs of experts 0 and 1
    phy2log = np.array([[0, 1, 2, 3], [1, 0, 2, 3]])
    load = np.array([[3.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    trans = np.zeros((1, 4, 4))
    trans[0, 0, 0] = 2  # expert 0 -> 0: GPU0 -> GPU1, same node
    trans[0, 2, 2] = 1  # same GPU
    trans[0, 3, 0] = 1  # GPU3 -> GPU1: across nodes
    m = placement_metrics(phy2log, load, trans, topo, hidden_size=1, num_tokens=1)
    assert m["max_mean"].tolist() == [2.0, 1.0]
    assert m["cross_gpu_fraction"] == pytest.approx(3 / 4)
    assert m["cross_node_fraction"] == pytest.approx(1 / 4)
    assert m["traffic_s_per_token"] == pytest.approx(2 * 2 / 450e9 + 2 / 50e9)


def test_group_limited_routing(trace):
    limited = group_limited(trace, n_group=8, topk_group=2, num_experts=64)
    groups = limited.expert_ids.astype(int) // 8  # [T, L, K]
    distinct = (np.sort(groups, axis=-1)[..., 1:] != np.sort(groups, axis=-1)[..., :-1]).sum(-1) + 1
    assert distinct.max() <= 2
    for t in range(0, limited.num_tokens, 37):
        assert len(set(limited.expert_ids[t, 0].tolist())) == limited.top_k
    assert limited.meta["group_limited"]["redrawn_choices"] > 0
    again = group_limited(limited, n_group=8, topk_group=2, num_experts=64)
    assert (again.expert_ids == limited.expert_ids).all()  # an obeying trace is unchanged
    assert group_limited(trace, 1, 1) is trace


def test_plan_cluster_builds_a_plan(cluster_yaml, trace):
    result = plan_cluster(ClusterRequest(hardware=str(cluster_yaml), model=MODEL, trace=trace, time_limit_s=60))
    plan = result.plan
    assert len(plan.layers) == 16 and result.num_physical == 72
    per_gpu: dict[str, int] = {}
    for layer in plan.layers:
        assert set(layer.site) == {"resident"}
        for home, reps in zip(layer.home, layer.replicas):
            assert home not in reps
            for g in (home, *reps):
                per_gpu[g] = per_gpu.get(g, 0) + 1
    assert per_gpu == {g: 18 * 16 for g in result.topology.gpus}
    assert set(plan.memory) == set(result.topology.gpus)
    assert plan.predicted["max_mean_load"] <= plan.predicted["eplb-global.max_mean_load"] + 0.01
    assert set(result.baselines) == {"eplb-global", "eplb-hierarchical", "linear", "round-robin"}
    assert plan.to_json() == plan_cluster(ClusterRequest(hardware=str(cluster_yaml), model=MODEL, trace=trace,
                                                         time_limit_s=60)).plan.to_json()


def test_redundant_count_must_divide(cluster_yaml, trace):
    with pytest.raises(InputError, match="divide evenly") as err:
        plan_cluster(ClusterRequest(hardware=str(cluster_yaml), model=MODEL, trace=trace, redundant_experts=3))
    assert "use 0 or 4" in str(err.value)


def test_memory_shortfall_is_infeasible(cluster_yaml):
    with pytest.raises(InfeasibleError, match="short by"):
        plan_cluster(ClusterRequest(hardware=str(cluster_yaml), model="deepseek-v3", formats=("bf16",)))


def test_when_the_cluster_planner_applies(cluster_yaml):
    assert cluster_applies("auto", str(cluster_yaml), MODEL)
    assert not cluster_applies("auto", "desktop-4090", "mixtral-8x7b")
    assert not cluster_applies("offload", str(cluster_yaml), MODEL)
    assert cluster_applies("ep", "desktop-4090", MODEL)
    assert not cluster_applies("auto", str(cluster_yaml), "deepseek-v3", ("bf16",))  # does not fit: offload


def test_cli_ep_plan_with_compare(run_cli, cluster_yaml, trace, tmp_path):
    trace_path = save_trace(trace, tmp_path / "trace.npz")
    out = tmp_path / "plan.json"
    r = run_cli("--json", "optimize", "-H", cluster_yaml, "-m", MODEL, "-t", trace_path, "--compare", "--out", out)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    s = data["summary"]
    assert s["mode"] == "expert-parallel" and s["layout"]["slots_per_gpu"] == 18
    assert [b["method"] for b in s["baselines"]] == ["eplb-global", "eplb-hierarchical", "linear", "round-robin"]
    assert s["plan"]["cross_node_fraction"] < s["baselines"][0]["cross_node_fraction"]
    assert out.is_file() and data["files"] == [str(out)]


def test_cli_bad_redundant_count_is_one_line(run_cli, cluster_yaml):
    r = run_cli("optimize", "-H", cluster_yaml, "-m", MODEL, "--parallel", "ep", "--redundant-experts", "3")
    assert r.exit_code == 1
    assert "--redundant-experts" in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_help_documents_parallel(run_cli):
    r = run_cli("optimize", "--help")
    assert "--parallel [auto|ep|pipeline|offload]" in r.output and "--redundant-experts" in r.output
