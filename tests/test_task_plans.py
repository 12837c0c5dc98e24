"""Task-specific plans (issue 16 item 6a, planner/task.py): with --drop-below the plan drops the
planted rare experts of the task's trace and keeps the frequent ones, within the quality
budget (dropping stops where the budget is used); the simulator skips the dropped experts
and agrees with the plan's prediction.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from planner.optimize import OptimizeRequest, optimize
from planner.plan import Plan
from planner.task import drop_candidates, drop_levels
from planner.workload_view import planning_stats
from profiles.errors import InputError
from profiles.hardware import BUNDLED_DIR, load_profile
from profiles.models import load_model
from profiles.workload.drop import drop_experts
from profiles.workload.trace import DECODE, Trace
from simulator.engine import SimConfig, simulate

L, E, T = 2, 8, 400
CONFIG = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": L, "num_attention_heads": 32, "num_key_value_heads": 8,
          "num_local_experts": E, "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
          "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "hidden_act": "silu"}


def task_trace() -> Trace:
    """Decode-only, top-2: experts 0-6 in turn at gate 0.5 each; the planted rare expert 7 three
    times in each layer (frequency 0.0075), at gate 0.25 in layer 0 (importance 0.75 / 400
    per token) and 0.5 in layer 1 (1.5 / 400). Total importance: 1 per layer, 2 in all, so
    the drops cost 0.0009375 and 0.001875 of the budget."""
    ids = np.zeros((T, L, 2), np.int64)
    gates = np.full((T, L, 2), 0.5, np.float32)
    for t in range(T):
        ids[t, :, 0], ids[t, :, 1] = (2 * t) % 7, (2 * t + 1) % 7
    for t in (10, 110, 210):
        ids[t, 0, 1], gates[t, 0] = 7, (0.75, 0.25)
        ids[t + 10, 1, 1] = 7
    return Trace(expert_ids=ids, seq_lens=np.array([T]), phase=np.full(T, DECODE, np.uint8), num_experts=E,
                 layer_map=(0, 1), gate_weights=gates, model="task")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """``(hardware path, model dir, trace)``: laptop-4060 cut to a 3 GiB GPU, so some experts run on the CPU."""
    directory = tmp_path_factory.mktemp("task")
    (directory / "config.json").write_text(json.dumps(CONFIG))
    data = yaml.safe_load((BUNDLED_DIR / "laptop-4060.yaml").read_text())
    data["name"] = "laptop-4060-3gib"
    for dev in data["nodes"][0]["devices"]:
        if dev["kind"] == "gpu":
            dev["memory_bytes"] = "3GiB"
    hw_path = directory / "hw.yaml"
    hw_path.write_text(yaml.safe_dump(data))
    return hw_path, directory, task_trace()


def plan_for(case, budget, **kw) -> Plan:
    hw_path, directory, trace = case
    return optimize(OptimizeRequest(hardware=str(hw_path), model=str(directory), trace=trace, formats=("bf16",),
                                    quality_budget=budget, compare=False, **kw)).plan


def test_candidates_cheapest_first_and_levels():
    stats = planning_stats(task_trace(), real_experts=E)
    cands = drop_candidates(stats, 0.01)
    assert [(layer, e) for _, layer, e in cands] == [(0, 7), (1, 7)]
    assert [w for w, _, _ in cands] == pytest.approx([0.75 / T, 1.5 / T])
    # the allowance (budget x total importance) fits both (0.00563), one (0.00188), or none
    assert drop_levels(cands, 0.006) == [0, 1, 2] and drop_levels(cands, 0.003) == [0, 1]
    assert drop_levels(cands, 0.0015) == [0]
    assert drop_candidates(stats, 0.01, critical=((7,), ())) == cands[1:]  # critical experts stay


def test_drops_the_rare_expert_and_keeps_the_frequent(case):
    """Budget 0.0015: dropping layer 0's expert 7 (0.0009375) fits, layer 1's as well
    (0.0028125 in all) does not: the plan drops the one, keeps the other and every frequent
    expert, and says so."""
    plan = plan_for(case, 0.0015, drop_below=0.01)
    assert plan.dropped_experts == ((7,), ())
    assert plan.quality_error == pytest.approx(0.75 / T / 2.0)  # bf16 costs nothing: the drop alone
    assert any(n.startswith("dropped 1 experts: 0:7") for n in plan.notes)
    assert json.loads(plan.to_json())["dropped_experts"] == [[7], []]
    assert Plan.model_validate_json(plan.to_json()).dropped_experts == plan.dropped_experts
    keep = plan_for(case, 0.0015)  # no --drop-below: every expert kept, plan.json as before
    assert keep.dropped_experts == () and "dropped_experts" not in json.loads(keep.to_json())
    # the dropped expert's CPU calls are gone: faster by more than the solver's gap (0.1%)
    assert plan.predicted["tpot_s"] < keep.predicted["tpot_s"] * (1 - 1e-3)


def test_quality_budget_binds(case):
    """A budget below the cheapest drop drops nothing; one above both drops both."""
    assert plan_for(case, 0.0009, drop_below=0.01).dropped_experts == ()
    both = plan_for(case, 0.003, drop_below=0.01)
    assert both.dropped_experts == ((7,), (7,))
    assert both.quality_error == pytest.approx(2.25 / T / 2.0) and both.quality_error <= 0.003


def test_simulator_skips_dropped_experts(case):
    """The simulator runs none of the dropped experts (its accesses are the kept ones) and its
    decode time per token is the plan's prediction."""
    hw_path, directory, trace = case
    plan = plan_for(case, 0.0015, drop_below=0.01)
    _, hw = load_profile(hw_path)
    model = load_model(directory)
    report = simulate(plan, hw, model, trace, SimConfig(batch_size=1, kv_context="plan"))
    assert report.metrics["expert_accesses"] == T * L * 2 - 3  # layer 0's accesses to expert 7 run nothing
    assert report.metrics["decode_step_s"]["mean"] == pytest.approx(plan.predicted["tpot_s"], rel=0.005)
    dropped = drop_experts(trace, plan.dropped_experts, E)
    assert dropped.num_experts == E + 2 and (dropped.expert_ids[:, 0] != 7).all()
    # two dropped experts in one token's top-k stay distinct (slot k -> E + k)
    both = drop_experts(trace, [(0, 1), ()], E)
    assert both.expert_ids[0, 0].tolist() == [E, E + 1] and both.expert_ids[0, 1].tolist() == [0, 1]


def test_bad_dropped_experts_are_one_line(case, tmp_path):
    from planner.plan import load_plan

    data = json.loads(plan_for(case, 0.0015, drop_below=0.01).to_json())
    data["dropped_experts"] = [[9], []]
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"dropped_experts\[0\]"):
        load_plan(tmp_path / "plan.json")


def test_cli_drop_below(case, run_cli, tmp_path):
    from profiles.workload.trace import save_trace

    hw_path, directory, trace = case
    path = save_trace(trace, tmp_path / "task.npz")
    args = ("optimize", "-H", hw_path, "-m", directory, "-t", path, "--formats", "bf16", "--parallel", "offload",
            "--quality-budget", "0.0015", "--drop-below", "0.01")
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    assert "dropped 1 experts: 0:7" in res.output
    res = run_cli(*args, "--objective", "cost")
    assert res.exit_code == 1 and "--drop-below" in res.output and "Traceback" not in res.output


def test_engines_that_cannot_drop_say_so(case, tmp_path):
    """llama.cpp and accelerate route over every expert: one line each, no config written."""
    from exporters.engines.single import render_engines

    hw_path, directory, trace = case
    plan = plan_for(case, 0.0015, drop_below=0.01)
    out = render_engines(plan, str(directory / "config.json"), str(hw_path), tmp_path, trace=trace)
    assert out.files == () and set(out.skipped) == {"llama.cpp", "accelerate"}
    assert all("drops 1 experts" in why for why in out.skipped.values())


@pytest.mark.parametrize("command", ["optimize", "simulate"])
def test_task_without_a_trace_is_one_line(command, run_cli, tmp_path, default_optimize):
    """--task names a task inside --trace's file: without --trace it was silently ignored
    (the plan came from the model's default workload, not the task's routing)."""
    args = ["optimize", "--task", "summary"]
    if command == "simulate":
        args = ["simulate", "--plan", default_optimize.plan.save(tmp_path / "plan.json"), "--task", "summary"]
    res = run_cli(*args)
    assert res.exit_code == 1, res.output
    assert "--task" in res.output and "--trace" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
