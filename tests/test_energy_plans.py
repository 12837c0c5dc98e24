"""Energy-aware plans (issue 16 item 6b, planner/energy.py, profiles/energy.py): one energy
model for planner and simulator; ``--objective energy`` picks a slower, lower-energy plan
than latency on a planted profile; ``--max-watts`` binds; the simulator's joules per token
agree with the planner's.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml

from planner.energy import dense_energy_j, energy_problem, option_energy_j, with_power_cap
from planner.ilp import build_problem
from planner.optimize import OptimizeRequest, make_setup, optimize
from planner.workload_view import planning_stats
from profiles.energy import energy_j
from profiles.errors import InputError
from profiles.hardware import BUNDLED_DIR, load_profile
from profiles.models import load_model
from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import DECODE
from simulator.engine import SimConfig, simulate

L, E = 2, 8
CONFIG = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": L, "num_attention_heads": 32, "num_key_value_heads": 8,
          "num_local_experts": E, "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
          "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "hidden_act": "silu"}
# planted watts: a busy GPU second costs 100x a busy CPU second, so an expert the CPU runs in
# a few times the GPU's time costs a fraction of the energy (GPU 1000 W active, 10 W idle;
# CPU 20 W active, 5 W idle)
GPU_W, GPU_IDLE_W, CPU_W, CPU_IDLE_W = 1000.0, 10.0, 20.0, 5.0


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """``(hardware path, model dir, model, decode-only trace)``: laptop-4060 with the planted watts."""
    directory = tmp_path_factory.mktemp("energy")
    (directory / "config.json").write_text(json.dumps(CONFIG))
    data = yaml.safe_load((BUNDLED_DIR / "laptop-4060.yaml").read_text())
    data["name"] = "laptop-4060-planted-watts"
    for dev in data["nodes"][0]["devices"]:
        if dev["kind"] == "gpu":
            dev["power_w"], dev["idle_power_w"] = f"{GPU_W}W", f"{GPU_IDLE_W}W"
        elif dev["kind"] == "cpu":
            dev["power_w"], dev["idle_power_w"] = f"{CPU_W}W", f"{CPU_IDLE_W}W"
    hw_path = directory / "hw.yaml"
    hw_path.write_text(yaml.safe_dump(data))
    spec = load_model(directory)
    trace = generate(SyntheticWorkload(num_layers=L, num_experts=E, top_k=2, popularity=[[8, 4, 2, 1, 1, 1, 1, 1]] * L,
                                       num_sequences=2, prompt_tokens=8, output_tokens=16, seed=3, model=spec.name))
    trace = dataclasses.replace(trace, phase=np.full(trace.num_tokens, DECODE, np.uint8))
    return hw_path, directory, spec, trace


def plan_for(case, **kw):
    hw_path, directory, _, trace = case
    return optimize(OptimizeRequest(hardware=str(hw_path), model=str(directory), trace=trace, formats=("bf16",),
                                    batch_size=1, compare=False, **kw)).plan


@pytest.fixture(scope="module")
def plans(case):
    return plan_for(case), plan_for(case, objective="energy")


def test_energy_model_by_hand(case):
    """E = sum_d busy_d (P_d - I_d) + I_d T: 2 s GPU, 3 s CPU busy over 10 s, by hand."""
    _, hw = load_profile(case[0])
    busy = {"node/gpu0": 2.0, "node/cpu0": 3.0}
    expected = 2.0 * (GPU_W - GPU_IDLE_W) + 3.0 * (CPU_W - CPU_IDLE_W) + (GPU_IDLE_W + CPU_IDLE_W) * 10.0
    assert energy_j(hw, busy, 10.0) == pytest.approx(expected)  # 1980 + 45 + 150 = 2175 J
    # per option: G s of GPU, U s of CPU, tau s of the step; the dense part busies the GPU
    hw_path, directory, spec, trace = case
    s = make_setup(hw, spec, planning_stats(trace, real_experts=E), batch_size=1, context_tokens=64,
                   formats=("bf16",))
    problem = build_problem(s, None)
    t = problem.tables[0]
    e = option_energy_j(s, t, False)
    assert e == pytest.approx(t.G * (GPU_W - GPU_IDLE_W) + t.U * (CPU_W - CPU_IDLE_W)
                              + (GPU_IDLE_W + CPU_IDLE_W) * t.tau)
    fc = problem.fixed["bf16"]
    assert dense_energy_j(s, fc) == pytest.approx(fc.dense_s * (GPU_W - GPU_IDLE_W + GPU_IDLE_W + CPU_IDLE_W))
    # the energy problem keeps every row and swaps seconds for joules
    ep = energy_problem(problem)
    assert np.array_equal(ep.tables[0].dev_bytes, t.dev_bytes) and np.allclose(ep.tables[0].tau, e)


def test_energy_objective_picks_a_slower_lower_energy_plan(plans):
    """On the planted watts the latency plan keeps experts on the GPU; the energy plan runs
    some on the 20 W CPU instead: slower, fewer joules per token."""
    latency, energy = plans
    assert energy.objective == "energy"
    assert energy.predicted["tpot_s"] > latency.predicted["tpot_s"] * 1.05
    assert energy.predicted["energy_j_per_token"] < latency.predicted["energy_j_per_token"] * 0.95
    on_cpu = lambda plan: sum(site == "local" for lp in plan.layers for site in lp.site)  # noqa: E731
    assert on_cpu(energy) > on_cpu(latency)
    # the latency plan's average power is its energy over its step time
    assert latency.predicted["power_w"] == pytest.approx(latency.predicted["energy_j_per_token"]
                                                         / latency.predicted["tpot_s"])


def test_max_watts_binds(case, plans):
    """A cap between the two plans' average powers: the latency objective gives a plan within
    it (slower than the uncapped one); a cap below anything possible is one clear error."""
    latency, energy = plans
    cap = 0.5 * (latency.predicted["power_w"] + energy.predicted["power_w"])
    assert energy.predicted["power_w"] < cap < latency.predicted["power_w"]
    capped = plan_for(case, max_watts=cap)
    assert capped.predicted["power_w"] <= cap * (1 + 1e-6)
    assert capped.predicted["tpot_s"] > latency.predicted["tpot_s"]
    assert capped.predicted["tpot_s"] <= energy.predicted["tpot_s"] * (1 + 1e-9)  # the fastest within the cap
    from profiles.errors import InfeasibleError

    with pytest.raises(InfeasibleError, match="--max-watts"):
        plan_for(case, max_watts=1.0)


def test_power_cap_row_is_energy_minus_watts_times_time(case):
    """The cap's row: sum_l (e_lw - W tau_lw + k_l) <= W dense_s - e_d + sum_l k_l, k_l >= 0."""
    hw_path, directory, spec, trace = case
    _, hw = load_profile(hw_path)
    s = make_setup(hw, spec, planning_stats(trace, real_experts=E), batch_size=1, context_tokens=64,
                   formats=("bf16",))
    problem = build_problem(s, None)
    capped = with_power_cap(problem, 100.0)
    rows, room = capped.ttft_options[False], capped.ttft_room["bf16"]
    shift = [float(r[0] - (option_energy_j(s, t, False)[0] - 100.0 * t.tau[0])) for r, t in zip(rows, problem.tables)]
    assert all(k >= 0 for k in shift) and all((r >= -1e-12).all() for r in rows)
    fc = problem.fixed["bf16"]
    assert room == pytest.approx(100.0 * fc.dense_s - dense_energy_j(s, fc) + sum(shift))


def test_simulator_energy_agrees_with_the_planner(case, plans):
    """Batch 1, decode only: the simulator's joules per token (profiles.energy over its
    streams' busy time and its makespan) = the plan's prediction within 1% (0.01% measured)."""
    hw_path, _, spec, trace = case
    _, hw = load_profile(hw_path)
    for plan in plans:
        report = simulate(plan, hw, spec, trace, SimConfig(batch_size=1, kv_context="plan"))
        per_token = report.metrics["energy_j"] / report.metrics["output_tokens"]
        assert per_token == pytest.approx(plan.predicted["energy_j_per_token"], rel=0.01)


def test_energy_needs_the_devices_power(case):
    """A profile without the compute device's power: one clear error naming the key."""
    hw_path, directory, _, trace = case
    data = yaml.safe_load(hw_path.read_text())
    for dev in data["nodes"][0]["devices"]:
        dev.pop("power_w", None), dev.pop("idle_power_w", None)
    bare = hw_path.parent / "bare.yaml"
    bare.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="power_w"):
        optimize(OptimizeRequest(hardware=str(bare), model=str(directory), trace=trace, formats=("bf16",),
                                 objective="energy", compare=False))


def test_idle_power_above_active_is_refused(case):
    data = yaml.safe_load(case[0].read_text())
    data["nodes"][0]["devices"][0]["idle_power_w"] = "500W"
    bad = case[0].parent / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="idle_power_w"):
        load_profile(bad)


def test_cli_energy_objective_and_cap(case, plans, run_cli, tmp_path):
    """`planner optimize --objective energy --max-watts W`: the plan's objective, its power within
    the cap, and the summary's energy rows."""
    from profiles.workload.trace import save_trace

    hw_path, directory, _, trace = case
    trace_path = save_trace(trace, tmp_path / "trace.npz")
    cap = 0.5 * (plans[0].predicted["power_w"] + plans[1].predicted["power_w"])
    args = ("optimize", "-H", hw_path, "-m", directory, "-t", trace_path, "--formats", "bf16", "--batch", "1",
            "--parallel", "offload")
    res = run_cli(*args, "--objective", "energy", "--max-watts", cap, "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)["plan"]
    assert plan["objective"] == "energy" and plan["predicted"]["power_w"] <= cap * (1 + 1e-6)
    res = run_cli(*args, "--max-watts", "1")
    assert res.exit_code == 3 and "--max-watts" in res.output and "Traceback" not in res.output
