"""`--critical` binds on every path: the ILP's own options, the baselines' rows added to it as
warm starts, the --compare baselines, and the CLI (issue 17 item 2)."""

from __future__ import annotations

import json

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.cli import cli
from planner.optimize import OptimizeRequest, optimize
from profiles.workload.synthetic import SyntheticWorkload, generate

L, E = 16, 64
TRACE = generate(SyntheticWorkload(num_layers=L, num_experts=E, top_k=8, num_sequences=4, prompt_tokens=40,
                                   output_tokens=16, seed=5))
FULL = {"bf16", "fp16", "fp32"}


def _critical_kept(plan, critical):
    for l, experts in enumerate(critical):
        for e in experts:
            assert plan.layers[l].format[e] in FULL, (plan.solver.method, l, e, plan.layers[l].format[e])


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, L - 1), st.integers(0, E - 1)), min_size=1, max_size=6))
def test_critical_experts_stay_full_precision_in_the_plan_and_every_baseline(pairs):
    critical = [set() for _ in range(L)]
    for l, e in pairs:
        critical[l].add(e)
    critical = tuple(tuple(sorted(c)) for c in critical)
    res = optimize(OptimizeRequest(hardware="laptop-4060", model="olmoe-1b-7b", trace=TRACE, critical=critical))
    for plan in (res.plan, *res.baselines.values()):
        _critical_kept(plan, critical)


def test_critical_binds_on_the_cli(tmp_path):
    """The issue's case: an expert the planner quantises without --critical stays full precision with it."""
    args = ["optimize", "-H", "laptop-4060", "-m", "olmoe-1b-7b", "--compare"]
    res = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "free.json")])
    assert res.exit_code == 0, res.output
    free = json.loads((tmp_path / "free.json").read_text())
    l, e = next((l, e) for l, layer in enumerate(free["layers"]) for e, f in enumerate(layer["format"]) if f not in FULL)
    res = CliRunner().invoke(cli, args + ["--critical", f"{l}:{e}", "--out", str(tmp_path / "plan.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "plan.json").read_text())["layers"][l]["format"][e] in FULL
