"""Run-time expert parallelism: least-loaded rerouting, periodic EPLB re-placement, routing drift."""

from __future__ import annotations

import json

import numpy as np
import pytest

from planner.plan import Inputs, Plan, SolverInfo
from planner.plan_layer import LayerPlan
from profiles.errors import InputError
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.drift import drift
from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import DECODE, PREFILL, Trace, load_trace
from simulator.engine import SimConfig, Simulation
from simulator.ep_runtime import eplb_copies, least_loaded, moved_copies
from simulator.sweep import load_grid, point_specs

HW = "workstation-2x3090-nvlink"


def _plan(model, gpus, owners_per_layer) -> Plan:
    """A hand plan: layer l's expert e homed on ``gpus[owners[l][e][0]]``, replicas on the rest."""
    E = model.num_experts
    layers = []
    for i, owners in enumerate(owners_per_layer):
        layers.append(LayerPlan(moe_layer=i, hidden_layer=model.moe_layer_indices[i],
                                home=tuple(gpus[o[0]] for o in owners), format=("int4",) * E,
                                site=("resident",) * E,
                                replicas=tuple(tuple(gpus[r] for r in o[1:]) for o in owners)))
    inputs = Inputs(hardware=HW, hardware_digest="-", model=model.name, model_digest="-", workload="-",
                    workload_digest="-")
    return Plan(inputs=inputs, objective="latency", batch_size=4, context_tokens=64, compute_device=gpus[0],
                host_device="node/cpu0", layers=tuple(layers), memory={}, predicted={},
                solver=SolverInfo(method="hand"))


def _run(plan, hw, model, trace, **cfg) -> Simulation:
    sim = Simulation(plan, hw, model, trace, SimConfig(**cfg))
    sim.report = sim.run()
    return sim


@pytest.fixture(scope="module")
def setup():
    model = load_model("mixtral-8x7b")
    _, hw = load_profile(HW)
    gpus = [d.id for d in hw.devices_of_kind("gpu")]
    return model, hw, gpus


# ----------------------------------------------------------------------------- rerouting


def test_least_loaded_by_hand():
    # expert 0 has copies on GPUs 0 and 1; expert 4 only on GPU 1; tokens alternate GPUs 0, 1
    cand = np.array([[[0, 1], [1, -1]]] * 4)  # [n=4, K=2, R=2]
    count = np.array([[2, 1]] * 4)
    src = np.array([0, 1, 0, 1])
    dst = least_loaded(cand, count, src, np.ones((4, 2), bool), 2)
    # loads after each call: [1,0] [1,1] | [1,2] [1,3] | [2,3] [2,4] | [3,4] [3,5]
    assert dst.tolist() == [[0, 1], [1, 1], [0, 1], [0, 1]]
    # a zero expert (not real) goes nowhere and adds no load: the next call ties, own GPU wins
    dst = least_loaded(cand[:2], count[:2], src[:2], np.array([[False, False], [True, True]]), 2)
    assert dst.tolist() == [[0, 0], [1, 1]]


def test_reroute_spreads_a_hot_replicated_expert(setup):
    """Every token picks experts 0 (copies on both GPUs) and 4 (GPU 1). Four tokens a step,
    on GPUs 0, 1, 0, 1. Static dispatch keeps expert 0 on each token's own GPU: loads
    [2, 6], max/mean 1.5. Least-loaded (test_least_loaded_by_hand): loads [3, 5], 1.25."""
    model, hw, gpus = setup
    E, L = model.num_experts, model.num_moe_layers
    owners = [[(0, 1)] + [(0,)] * 3 + [(1,)] * 4] * L
    plan = _plan(model, gpus, owners)
    S, P = 4, 3  # 4 sequences of 1 prompt token and 2 decode tokens: every step has 4 tokens
    ids = np.zeros((S * P, L, 2), np.int16)
    ids[:, :, 1] = 4
    phase = np.tile(np.array([PREFILL] + [DECODE] * (P - 1), np.uint8), S)
    trace = Trace(expert_ids=ids, seq_lens=np.full(S, P), phase=phase, num_experts=E,
                  layer_map=tuple(model.moe_layer_indices))
    static = _run(plan, hw, model, trace, batch_size=4)
    moved = _run(plan, hw, model, trace, batch_size=4, ep_reroute=True)
    assert [n for _, n, _, _ in static.steps] == [4, 4, 4]
    assert static.report.metrics["expert_parallel"]["max_over_mean_gpu_load"] == [1.5] * L
    assert moved.report.metrics["expert_parallel"]["max_over_mean_gpu_load"] == [1.25] * L
    assert {r for _, _, r in moved._ep_runtime()["load_log"]} == {1.25}


# ----------------------------------------------------------------------------- re-placement


def test_eplb_copies_and_moves_by_hand():
    # 4 experts on 2 GPUs, 2 slots each; expert 3 is the hottest, then 0
    copies = np.array([[0], [0], [1], [1], [-1]])
    new = eplb_copies(np.array([30.0, 10.0, 5.0, 40.0]), copies, 2)
    held = {e: set(new[e][new[e] >= 0].tolist()) for e in range(4)}
    assert sorted(len(h) for h in held.values()) == [1, 1, 1, 1]  # 4 slots: no room for copies
    load = [sum(w for e, w in enumerate([30, 10, 5, 40]) if g in held[e]) for g in (0, 1)]
    assert sorted(load) == [40, 45]  # 40+5 | 30+10: the best split
    moves = moved_copies(copies, new, np.array([0, 0, -1]))
    assert sorted(moves) == sorted((e, copies[e, 0], g) for e in range(4) for g in held[e] if g != copies[e, 0])


def _drift_trace(model):
    w = SyntheticWorkload(num_layers=model.num_moe_layers, num_experts=model.num_experts, top_k=2, skew=1.5,
                          num_sequences=24, prompt_tokens=4, output_tokens=24, seed=3)
    return drift(generate(w), seed=1)


def _second_half(sim) -> float:
    log = sim._ep_runtime()["load_log"]
    half = max(d for d, _, _ in log) / 2
    return float(np.mean([r for d, _, r in log if d >= half]))


def test_rebalancing_follows_drift(setup):
    """The first half's placement is EPLB's own (balanced); after the drift the hot experts
    move, and re-placing every 8 decode steps wins back the second half's balance."""
    model, hw, gpus = setup
    trace = _drift_trace(model)
    first = int(np.sum(trace.seq_lens[:trace.meta["drift"]["from_sequence"]]))
    counts = np.stack([np.bincount(trace.expert_ids[:first, l].ravel(), minlength=model.num_experts)
                       for l in range(trace.num_layers)])
    start = np.array([[0]] * model.num_experts + [[-1]])
    owners = []
    for l in range(trace.num_layers):
        c = eplb_copies(counts[l], start, 2)
        owners.append([tuple(g for g in c[e] if g >= 0) for e in range(model.num_experts)])
    plan = _plan(model, gpus, owners)
    fixed = _run(plan, hw, model, trace, batch_size=8, ep_reroute=True)  # logs the load, same dispatch
    moving = _run(plan, hw, model, trace, batch_size=8, ep_reroute=True, ep_rebalance_every=8)
    ep = moving.report.metrics["expert_parallel"]
    assert ep["layer_replacements"] > 0 and ep["replacement_bytes"] > 0
    assert "layer_replacements" not in fixed.report.metrics["expert_parallel"]
    assert _second_half(moving) < _second_half(fixed) - 0.05
    assert sum(moving.report.metrics["link_bytes"].values()) > sum(fixed.report.metrics["link_bytes"].values())


def test_bad_rebalance_period_is_refused(setup):
    model, hw, gpus = setup
    plan = _plan(model, gpus, [[(e % 2,) for e in range(model.num_experts)]] * model.num_moe_layers)
    trace = _drift_trace(model).subset_sequences([0])
    with pytest.raises(InputError, match="ep_rebalance_every"):
        _run(plan, hw, model, trace, ep_rebalance_every=0)


# ----------------------------------------------------------------------------- drift


def test_drift_relabels_the_second_half_only():
    w = SyntheticWorkload(num_layers=3, num_experts=16, top_k=2, skew=1.0, num_sequences=4, prompt_tokens=2,
                          output_tokens=3, seed=0)
    trace = generate(w)
    out = drift(trace, seed=5)
    start = out.meta["drift"]["from_token"]
    assert out.meta["drift"]["from_sequence"] == 2 and start == 10
    assert np.array_equal(out.expert_ids[:start], trace.expert_ids[:start])
    for l in range(3):  # one permutation per layer maps the old ids onto the new
        before, after = trace.expert_ids[start:, l].ravel(), out.expert_ids[start:, l].ravel()
        mapping = dict(zip(before.tolist(), after.tolist()))
        assert all(mapping[b] == a for b, a in zip(before.tolist(), after.tolist()))
        assert len(set(mapping.values())) == len(mapping)
    assert not np.array_equal(out.expert_ids[start:], trace.expert_ids[start:])
    with pytest.raises(InputError, match="drift"):
        drift(trace, at=1.0)


def test_synth_drift_cli(tmp_path, run_cli):
    out = tmp_path / "drift.npz"
    args = ("trace", "synth", "--layers", "2", "--experts", "8", "--top-k", "2", "--out", out)
    r = run_cli("--json", *args, "--sequences", "4", "--drift")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["drift"] == {"from_sequence": 2, "from_token": 128, "seed": 0}
    assert load_trace(out).meta["drift"]["from_token"] == 128
    bad = run_cli(*args, "--sequences", "1", "--drift", "--force")
    assert bad.exit_code == 1 and "--sequences" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("knob, value", [("reroute", 1), ("reroute", "always"), ("rebalance_every", 0), ("rebalance_every", 2.5)])
def test_sweep_refuses_bad_runtime_knobs_in_one_line(tmp_path, knob, value):
    path = tmp_path / "g.yaml"
    path.write_text(f"name: g\nbase: {{hardware: workstation-2x3090-nvlink, model: olmoe-1b-7b}}\n"
                    f"vary: {{{knob}: [{value}]}}\n")
    with pytest.raises(InputError) as e:
        load_grid(path)
    assert f"vary.{knob}[0]" in str(e.value) and "\n" not in str(e.value)


def test_sweep_passes_runtime_knobs_to_the_simulator(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nbase: {hardware: workstation-2x3090-nvlink, model: olmoe-1b-7b}\n"
                    "vary: {reroute: [false, true], rebalance_every: [null, 4]}\n")
    specs = point_specs(load_grid(path), tmp_path / "out")
    assert [(s["reroute"], s["rebalance_every"]) for s in specs] == [(False, None), (False, 4), (True, None), (True, 4)]


def test_simulate_cli_runs_the_balancing_flags_on_an_ep_plan_and_refuses_them_elsewhere(ep_plan, tmp_path, run_cli):
    out = tmp_path / "m.json"
    r = run_cli("simulate", "-p", ep_plan, "--requests", "4", "--batch", "4", "--reroute", "--rebalance-every", "2",
                "--out", out)
    assert r.exit_code == 0, r.output
    assert "EPLB re-placements" in r.output and "max/mean GPU load" in r.output
    ep = json.loads(out.read_text())["expert_parallel"]
    assert ep["layer_replacements"] > 0 and ep["replacement_bytes"] > 0
    plain = tmp_path / "plain.json"
    assert run_cli("simulate", "-p", ep_plan, "--requests", "4", "--batch", "4", "--out", plain).exit_code == 0
    assert "layer_replacements" not in json.loads(plain.read_text())["expert_parallel"]
    one = tmp_path / "one.json"
    assert run_cli("optimize", "-H", "desktop-3060", "-m", "olmoe-1b-7b", "--out", one).exit_code == 0
    r = run_cli("simulate", "-p", one, "--reroute")
    assert r.exit_code == 1 and "this plan is not one" in r.output and "Traceback" not in r.output


def test_sweep_marks_a_runtime_knob_on_a_plan_that_is_not_expert_parallel(tmp_path):
    """reroute / rebalance_every change nothing on a single-GPU plan: the sweep's row says so
    (as `planner simulate --reroute` refuses), not a 'reroute True' row equal to 'False'."""
    from planner.commands.sweep import evaluate_point

    path = tmp_path / "g.yaml"
    path.write_text("name: g\nbase: {hardware: desktop-4090, model: olmoe-1b-7b}\n"
                    "vary: {reroute: [true]}\nsimulate: {requests: 2}\n")
    row = evaluate_point(point_specs(load_grid(path), tmp_path / "out")[0])
    assert row["status"].startswith("error: ") and "reroute" in row["status"], row["status"]
    assert "not expert-parallel" in row["status"] and "\n" not in row["status"]
