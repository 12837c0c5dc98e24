"""Fewer expert slots on slow GPUs (planner.cluster.slots): levelled slot counts, layouts
with empty slots, their metrics, and a mixed-cluster plan the simulator runs faster."""

from __future__ import annotations

import numpy as np
import pytest

from planner.cluster.metrics import distribution
from planner.cluster.slots import slot_counts, trim_slots


def test_slot_counts_level_the_expert_stage_within_the_spare_copies():
    assert slot_counts(np.array([2.0, 2.0, 1.0, 1.0]), 4, 4).tolist() == [2, 2, 4, 4]
    assert slot_counts(np.array([2.0, 2.0, 1.0, 1.0]), 4, 3).tolist() == [3, 3, 4, 4]  # 2 more would need 4
    assert slot_counts(np.array([2.0, 2.0, 1.0, 1.0]), 4, 1).tolist() == [4, 4, 4, 4]
    assert slot_counts(np.array([1.5, 1.0]), 4, 8).tolist() == [2, 4]  # then the fast GPU is the straggler
    assert slot_counts(np.ones(4), 4, 8).tolist() == [4, 4, 4, 4]  # one GPU type: unchanged


def _layout(rng, L=3, E=6, G=3, S=3):
    """Random valid phy2log: every expert once, the rest replicas, no two copies on a GPU."""
    rows = []
    while len(rows) < L:
        row = np.concatenate([rng.permutation(E), rng.choice(E, G * S - E, replace=False)])
        rng.shuffle(row)
        if all(len(set(row[g * S:(g + 1) * S])) == S for g in range(G)):
            rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("seed", range(6))
def test_trim_slots_empties_the_slow_gpus_surplus_and_keeps_every_expert(seed):
    rng = np.random.default_rng(seed)
    L, E, G, S = 3, 6, 3, 3
    p = _layout(rng, L, E, G, S)
    load = rng.random((L, E)) + 0.1
    counts = np.array([1, 3, 3])  # GPU 0 keeps one slot: 2 of the 3 spare copies go
    out = trim_slots(p, counts, load)
    for l in range(L):
        row = out[l]
        for g in range(G):
            mine = row[g * S:(g + 1) * S]
            assert (mine >= 0).sum() == counts[g]
            assert len(set(mine[mine >= 0].tolist())) == (mine >= 0).sum()  # no two copies on a GPU
        assert set(row[row >= 0].tolist()) == set(range(E))  # every expert keeps a copy
        assert (row >= 0).sum() == G * S - 2
    P = distribution(out, E, G)
    assert np.allclose(P.sum(-1), 1.0) and np.all(P[:, :, 0].sum(-1) <= 1.0)


# ---------------------------------------------------------------- a mixed-cluster plan

from planner.cluster import ClusterRequest, plan_cluster  # noqa: E402
from profiles.errors import InputError  # noqa: E402
from profiles.hardware import load_profile  # noqa: E402
from profiles.models import load_model  # noqa: E402
from simulator.engine import SimConfig, simulate  # noqa: E402
from test_cluster_speed import MODEL, _two_speed, trace  # noqa: E402,F401  (trace is a fixture)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return _two_speed(tmp_path_factory.mktemp("hw") / "two-speed.yaml", slow_factor=4.0)


@pytest.fixture(scope="module")
def plans(toy, trace):  # noqa: F811
    req = dict(hardware=str(toy), model=MODEL, trace=trace, engine="roofline", batch_size=16, context_tokens=256,
               sweeps=1)
    # roofline states uneven_ranks, so its default (ranks="engine") is "uneven"
    return plan_cluster(ClusterRequest(**req)), plan_cluster(ClusterRequest(**req, ranks="shares"))


def test_slow_gpu_holds_fewer_experts_and_every_expert_keeps_a_copy(plans):
    uneven, even = plans
    gpus = uneven.topology.gpus
    slow = next(i for i, g in enumerate(gpus) if "slow" in g)
    counts = uneven.info["slots"]
    S = uneven.num_physical // len(gpus)
    assert counts is not None and counts[slow] < S and even.info["slots"] is None
    for lp in uneven.plan.layers:
        held = {g: 0 for g in gpus}
        for home, reps in zip(lp.home, lp.replicas):
            for g in (home, *reps):
                held[g] += 1
        assert [held[g] for g in gpus] == counts
    assert uneven.plan.memory[gpus[slow]].expert_bytes < even.plan.memory[gpus[slow]].expert_bytes
    assert any("expert slots per GPU" in n for n in uneven.plan.notes)
    # the bound still bounds ours (the relaxation: a GPU keeps at most S slots)
    assert uneven.info["bound"]["method"] == "relaxation"
    assert uneven.plan.solver.bound <= uneven.plan.solver.objective + 1e-15


def test_uneven_slots_simulate_faster_than_even_ones(plans, toy, trace):  # noqa: F811
    uneven, even = plans
    _, hw = load_profile(toy)
    spec = load_model(MODEL)
    config = SimConfig(batch_size=32, requests=32)

    def step(plan):
        return simulate(plan, hw, spec, trace, config).metrics["decode_step_s"]["mean"]

    # here the tokens start on the fast GPU (attention shares), which holds a copy of every
    # replicated expert, so the slow GPU's replica copies got no tokens even before they went
    ours, blind = step(uneven.plan), step(even.baselines["eplb-global"])
    assert ours <= step(even.plan) and ours < step(even.baselines["eplb-speed"]) < blind


def test_sglang_export_refuses_uneven_ranks_and_names_the_flag(plans, toy, trace, tmp_path):  # noqa: F811
    from exporters.engines.sglang import write_sglang

    uneven, shares = plans
    assert shares.plan.attention_shares is not None and shares.info["slots"] is None
    for plan, what in ((uneven.plan, "share of the sequences|physical experts"), (shares.plan, "share of the sequences")):
        with pytest.raises(InputError, match=what) as err:
            write_sglang(plan, tmp_path / "a")
        assert "--ranks even" in str(err.value)
    even = plan_cluster(ClusterRequest(hardware=str(toy), model=MODEL, trace=trace, engine="roofline", batch_size=16,
                                       context_tokens=256, sweeps=1, ranks="even"))
    assert even.plan.attention_shares is None and even.info["slots"] is None
    assert write_sglang(even.plan, tmp_path / "b").files


def test_engines_without_uneven_ranks_plan_what_they_run(toy, trace):  # noqa: F811
    """SGLang gives every rank the same share and slots: its plans (ranks="engine") do too,
    and asking for more on it is possible only by name (--ranks uneven)."""
    req = dict(hardware=str(toy), model=MODEL, trace=trace, engine="sglang", batch_size=16, context_tokens=256,
               sweeps=1)
    default = plan_cluster(ClusterRequest(**req))
    assert default.plan.attention_shares is None and default.info["slots"] is None
    asked = plan_cluster(ClusterRequest(**req, ranks="uneven"))
    assert asked.plan.attention_shares is not None or asked.info["slots"] is not None
    with pytest.raises(InputError, match="ranks"):
        plan_cluster(ClusterRequest(**req, ranks="lopsided"))


def test_cli_ranks_even_keeps_every_gpu_at_s(run_cli, toy):
    import json

    args = ("optimize", "-H", toy, "-m", MODEL, "--parallel", "ep", "--engine", "roofline", "--batch", "16",
            "--context", "512", "--json")
    uneven = json.loads(run_cli(*args).stdout)["summary"]["solver"]
    even = json.loads(run_cli(*args, "--ranks", "even").stdout)["summary"]["solver"]
    assert uneven["slots"] is not None and even["slots"] is None and even["attention"] is None
    text = run_cli(*args[:-1]).output
    assert "expert slots per GPU" in text and "attention: sequences per GPU" in text


def test_bound_with_empty_slots_is_below_the_brute_force_optimum():
    """2 MoE layers x 4 experts on 2 nodes x 1 GPU, 3 slots each, GPU 0 keeping 2: every
    placement with the incumbent's copies enumerated; relaxation <= optimum <= incumbent."""
    import itertools

    from planner.cluster import placement_metrics, topology
    from planner.cluster.bound import traffic_bound
    from test_cluster_speed import _tiny_cluster

    _, hw = load_profile(_tiny_cluster())
    topo = topology(hw)
    rng = np.random.default_rng(4)
    trans = rng.integers(0, 9, size=(1, 4, 4)).astype(float)
    load = np.stack([trans[0].sum(1), trans[0].sum(0)]) + 1.0  # [2, 4]
    incumbent = trim_slots(np.array([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 2, 1]]), np.array([2, 3]), load)
    assert ((incumbent[:, :3] >= 0).sum(1) == 2).all() and ((incumbent[:, 3:] >= 0).sum(1) == 3).all()
    copies = [np.bincount(r[r >= 0], minlength=4) for r in incumbent]

    def rows(c):
        for a in itertools.combinations(range(4), 2):
            rest = c - np.bincount(a, minlength=4)
            if rest.min() >= 0 and rest.max() <= 1 and rest.sum() == 3:
                yield list(a) + [-1] + np.nonzero(rest)[0].tolist()

    best = min(placement_metrics(np.array([r0, r1]), load, trans, topo, 64, 10)["traffic_s_per_token"]
               for r0 in rows(copies[0]) for r1 in rows(copies[1]))
    bound = traffic_bound(incumbent, load, trans, topo, 64, 10, np.full(2, 1e9))
    ours = placement_metrics(incumbent, load, trans, topo, 64, 10)["traffic_s_per_token"]
    assert bound.method == "relaxation" and bound.traffic_s_per_token > 0.5 * best  # not a trivial bound
    assert bound.traffic_s_per_token <= best * (1 + 1e-12) and best <= ours * (1 + 1e-12)
