"""`planner optimize` through the CLI: outputs, exit codes, and what it never overwrites."""

import json

import pytest

from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import save_trace


@pytest.fixture(scope="module")
def olmoe_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "olmoe.npz"
    save_trace(generate(SyntheticWorkload(num_layers=16, num_experts=64, top_k=8, num_sequences=8, prompt_tokens=40,
                                          output_tokens=10, seed=1)), path)
    return path


def test_optimize_writes_a_plan_and_prints_json(run_cli, olmoe_trace, tmp_path):
    out = tmp_path / "plan.json"
    result = run_cli("--json", "optimize", "-H", "laptop-4060", "-m", "olmoe-1b-7b", "-t", olmoe_trace, "--compare",
                     "--out", out)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["plan"]["solver"]["status"] == "optimal"
    assert json.loads(out.read_text()) == data["plan"]
    again = run_cli("optimize", "-H", "laptop-4060", "-m", "olmoe-1b-7b", "-t", olmoe_trace, "--out", out)
    assert again.exit_code == 1 and "exists" in again.stderr and "--force" in again.stderr
    forced = run_cli("optimize", "-H", "laptop-4060", "-m", "olmoe-1b-7b", "-t", olmoe_trace, "--out", out, "--force")
    assert forced.exit_code == 0, forced.stderr


def test_infeasible_plan_exits_3_and_names_the_shortfall(run_cli, olmoe_trace):
    # a 1M-token context does not fit next to the model on an 8 GiB laptop GPU
    result = run_cli("optimize", "-H", "laptop-4060", "-m", "olmoe-1b-7b", "-t", olmoe_trace, "--context", "1000000")
    assert result.exit_code == 3, result.output
    line = result.stderr.strip()
    assert line.count("\n") == 0 and "short" in line and "KV cache" in line


@pytest.mark.parametrize("args, needle", [
    (("--formats", "int5"), "unknown number format"),
    (("--critical", "banana"), "MOE_LAYER:EXPERT"),
    (("-m", "mixtral-8x7b"), "does not match the model"),
])
def test_bad_options_are_one_line_exit_1(run_cli, olmoe_trace, args, needle):
    base = ["optimize", "-H", "laptop-4060", "-m", "olmoe-1b-7b", "-t", olmoe_trace]
    result = run_cli(*base, *args)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and needle in result.stderr and "Traceback" not in result.output
