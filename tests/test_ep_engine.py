"""An expert-parallel plan is priced on the engine that runs it: SGLang unless the user names
another (its export writes SGLang and vLLM configs; the bundle runtime runs single-node offload
plans only). The plan records the engine, and the simulator prices it the same way, so the
numbers a sweep prints for an EP layout are an EP engine's, not the bundle runtime's."""

from __future__ import annotations


import pytest

from planner.cluster import ClusterRequest, plan_cluster
from planner.cluster.request import EP_ENGINE
from profiles.engines import load_engine
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.synthetic import SyntheticWorkload, generate
from simulator.engine import SimConfig, simulate

HW, MODEL = "workstation-2x3090-nvlink", "olmoe-1b-7b"


@pytest.fixture(scope="module")
def trace():
    spec = load_model(MODEL)
    return generate(SyntheticWorkload(num_layers=spec.num_moe_layers, num_experts=spec.num_experts, top_k=spec.top_k,
                                      skew=0.8, prompt_tokens=8, output_tokens=8, num_sequences=4, seed=0, model=MODEL))


def _plan(trace, **kw):
    return plan_cluster(ClusterRequest(hardware=HW, model=MODEL, trace=trace, sweeps=1, **kw)).plan


def test_an_ep_plan_records_sglang_by_default(trace):
    plan = _plan(trace)
    assert EP_ENGINE == "sglang"
    assert plan.inputs.engine == "sglang"
    assert plan.inputs.engine_digest is not None


def test_the_simulator_prices_the_engine_the_plan_records(trace):
    """The same placement on SGLang and on the bundle runtime: different step times, and each
    what the simulator gives for a plan that records that engine."""
    _, hw = load_profile(HW)
    model = load_model(MODEL)
    plan = _plan(trace)
    as_bundle = plan.model_copy(update={"inputs": plan.inputs.model_copy(update={"engine": "bundle"})})
    config = SimConfig(requests=4)
    sglang = simulate(plan, hw, model, trace, config).metrics["tpot_s"]["p50"]
    bundle = simulate(as_bundle, hw, model, trace, config).metrics["tpot_s"]["p50"]
    assert sglang != pytest.approx(bundle, rel=1e-3)
    assert load_engine(plan.inputs.engine).name == "sglang"


def test_a_named_engine_is_recorded(trace):
    plan = _plan(trace, engine="vllm")
    assert plan.inputs.engine == "vllm"


def test_the_cli_passes_engine_to_an_ep_plan(tmp_path):
    from click.testing import CliRunner

    from planner.cli import cli
    from planner.plan import load_plan

    out = tmp_path / "plan.json"
    res = CliRunner().invoke(cli, ["optimize", "-H", HW, "-m", MODEL, "--parallel", "ep", "--engine", "vllm",
                                   "--time-limit", "60", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert load_plan(out).inputs.engine == "vllm"


@pytest.mark.parametrize("engine, runs", [("sglang", True), ("vllm", True), ("roofline", True), ("bundle", False),
                                          ("llama.cpp", False), ("accelerate", False), ("ktransformers", False)])
def test_engines_say_whether_they_run_expert_parallel_plans(engine, runs):
    assert load_engine(engine).runs_expert_parallel is runs


def test_an_engine_without_expert_parallelism_is_refused_in_one_line(tmp_path):
    from click.testing import CliRunner

    from planner.cli import cli

    res = CliRunner().invoke(cli, ["optimize", "-H", HW, "-m", MODEL, "--parallel", "ep", "--engine", "llama.cpp"])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "llama.cpp" in lines[0] and "expert-parallel" in lines[0], res.output


def test_auto_does_not_choose_expert_parallelism_for_an_engine_without_it(trace):
    from planner.cluster import parallel_mode

    use, why = parallel_mode("auto", ClusterRequest(hardware=HW, model=MODEL, trace=trace, engine="llama.cpp"))
    assert not use and "llama.cpp" in why
    assert parallel_mode("auto", ClusterRequest(hardware=HW, model=MODEL, trace=trace))[0]
