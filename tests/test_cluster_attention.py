"""Data-parallel attention shares on a mixed cluster (planner.cluster.attention): the planner
decides how many of a step's sequences each GPU runs attention for, the plan records it and
the simulator prices it (the two-speed toy of test_cluster_speed: one H100 and one slow card)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from planner.cluster import ClusterRequest, plan_cluster, topology
from planner.cluster.attention import attention_shares
from planner.plan import Plan, apportion
from profiles.engines import load_engine
from profiles.errors import InputError
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.perf import dense_step_s
from simulator.engine import SimConfig, simulate
from test_cluster_speed import MODEL, _two_speed, trace  # noqa: F401  (trace is a fixture)


def test_apportion_sums_and_keeps_zero_shares_at_zero():
    assert apportion(10, [1, 1]) == [5, 5]
    assert apportion(7, [1, 1, 1]) == [3, 2, 2]  # the remainder to the lower index
    assert apportion(9, [0.0, 2.0, 1.0]) == [0, 6, 3]
    assert apportion(1, [0.0, 1.0, 1.0]) == [0, 1, 0]
    for n in range(0, 40):
        out = apportion(n, [0.1, 0.0, 0.7, 0.2])
        assert sum(out) == n and out[1] == 0
    with pytest.raises(ValueError):
        apportion(3, [0.0, 0.0])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return _two_speed(tmp_path_factory.mktemp("hw") / "two-speed.yaml", slow_factor=4.0)


@pytest.fixture(scope="module")
def planned(toy, trace):  # noqa: F811
    return plan_cluster(ClusterRequest(hardware=str(toy), model=MODEL, trace=trace, engine="roofline",
                                       batch_size=16, context_tokens=256, sweeps=1))


def _stage(hw, topo, model, counts, fmt="bf16", context=256):
    """The attention stage of ``counts`` sequences per GPU, priced directly (0 for a GPU without any)."""
    from planner.cluster.attention import _compute_of

    kv1 = model.kv_cache_bytes(context, batch_size=1)
    seen = load_engine("roofline").apply(hw)
    return max(dense_step_s(seen.devices[_compute_of(seen, g)], model, fmt, int(n), n * kv1) if n else 0.0
               for g, n in zip(topo.gpus, counts))


def test_planner_gives_the_slow_gpu_fewer_sequences_and_a_shorter_stage(toy):
    _, hw = load_profile(toy)
    topo = topology(hw)
    model = load_model(MODEL)
    got = attention_shares(load_engine("roofline").apply(hw), topo, model, "bf16", 16, 256, np.full(2, 1e12))
    slow = next(i for i, g in enumerate(topo.gpus) if "slow" in g)
    assert got.counts.sum() == 32 and got.counts[slow] < 16
    assert got.stage_s < got.equal_s
    assert got.stage_s == pytest.approx(_stage(hw, topo, model, got.counts))
    assert got.equal_s == pytest.approx(_stage(hw, topo, model, [16, 16]))
    # no split of 32 sequences over the two GPUs has a shorter attention stage (brute force)
    assert got.stage_s <= min(_stage(hw, topo, model, [n, 32 - n]) for n in range(33)) * (1 + 1e-12)
    # memory binds: the fast GPU holds at most 20 sequences' KV cache
    kv1 = model.kv_cache_bytes(256, batch_size=1)
    free = np.full(2, 1e12)
    free[1 - slow] = 20.5 * kv1
    capped = attention_shares(load_engine("roofline").apply(hw), topo, model, "bf16", 16, 256, free)
    assert capped.counts[1 - slow] <= 20 and capped.counts.sum() == 32


def test_one_gpu_type_keeps_equal_shares():
    _, hw = load_profile("cluster-h100-2node")
    topo = topology(hw)
    got = attention_shares(load_engine("sglang").apply(hw), topo, load_model(MODEL), "bf16", 8, 512,
                           np.full(topo.num_gpus, 1e12))
    assert got.equal and np.all(got.counts == 8)


def test_plan_records_the_shares_and_baselines_keep_equal_ones(planned, tmp_path):
    plan = planned.plan
    assert plan.attention_shares is not None and sum(plan.attention_shares.values()) == pytest.approx(1.0)
    assert all(p.attention_shares is None for p in planned.baselines.values())
    seq = planned.info["attention"]["sequences"]
    for g, n in zip(planned.topology.gpus, seq):  # each GPU's KV cache is its own sequences'
        assert plan.memory[g].kv_bytes == pytest.approx(n * load_model(MODEL).kv_cache_bytes(256, batch_size=1))
    text = plan.to_json()
    assert json.loads(text)["attention_shares"] == pytest.approx(plan.attention_shares)
    loaded = Plan.model_validate_json(text)
    assert loaded.attention_shares == plan.attention_shares and loaded.to_json() == text
    assert "attention_shares" not in planned.baselines["eplb-global"].to_json()


def test_bad_shares_are_one_clear_error(planned, tmp_path):
    from planner.plan import load_plan

    data = json.loads(planned.plan.to_json())
    g = next(iter(data["attention_shares"]))
    data["attention_shares"][g] += 0.5
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="attention_shares.*summing to 1"):
        load_plan(path)
    data["attention_shares"] = {"nowhere/gpu9": 1.0}
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="attention_shares.nowhere/gpu9"):
        load_plan(path)


def test_simulator_prices_the_shares_it_is_given(planned, toy, trace):  # noqa: F811
    """The same placement with the planned shares, with equal shares and with the shares
    reversed: the simulator runs each as written (the reversed one is slower, so it prices the
    shares rather than assuming them), and the planned one beats equal shares."""
    _, hw = load_profile(toy)
    spec = load_model(MODEL)
    config = SimConfig(batch_size=32, requests=32)
    plan = planned.plan
    gpus = planned.topology.gpus
    reverse = dict(zip(gpus, reversed([plan.attention_shares[g] for g in gpus])))

    def run(shares):
        return simulate(plan.model_copy(update={"attention_shares": shares}), hw, spec, trace, config).metrics

    shared, equal, reversed_ = run(plan.attention_shares), run(None), run(reverse)
    step = {k: m["decode_step_s"]["mean"] for k, m in (("planned", shared), ("equal", equal), ("rev", reversed_))}
    assert step["planned"] < step["equal"] < step["rev"]
    slow = next(g for g in gpus if "slow" in g)
    key = next(k for k in shared["busy_s"] if k.endswith(slow.split("/")[-1]))
    assert shared["busy_s"][key] < equal["busy_s"][key] < reversed_["busy_s"][key]


def test_kv_pool_is_what_the_tightest_attention_gpu_allows(planned):
    from simulator.kv_cache import kv_budget_bytes

    plan = planned.plan
    gpus = list(planned.topology.gpus)
    free = {g: plan.memory[g].capacity_bytes - plan.memory[g].used_bytes + plan.memory[g].kv_bytes for g in gpus}
    pooled = kv_budget_bytes(plan.model_copy(update={"attention_shares": None}), gpus)
    assert pooled == pytest.approx(sum(free.values()))
    want = min(free[g] / s for g, s in plan.attention_shares.items() if s > 0)
    assert kv_budget_bytes(plan, gpus) == pytest.approx(want)
    half = dict.fromkeys(gpus, 0.5)  # each GPU holds half the sequences: twice the smaller free memory
    assert kv_budget_bytes(plan.model_copy(update={"attention_shares": half}), gpus) == pytest.approx(
        2 * min(free.values()))
