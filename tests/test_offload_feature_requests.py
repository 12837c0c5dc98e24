"""--nested and --miss-copy that no plan could use are refused in one line, exit 1.

Before, `planner optimize --nested --engine llama.cpp` (an engine without nested planes), or
`--nested --formats bf16,int8` (int8 nests as two int4 planes, and int4 is not a candidate),
planned without them and said nothing: the user asked for a feature and silently got a plan
without it. Cases where the ILP is offered the feature and does not choose it stay plans."""

from __future__ import annotations

import pytest

CASES = {
    "nested on an engine without planes": (("--nested", "--engine", "llama.cpp"), ("--nested", "llama.cpp")),
    "nested without a format's half": (("--nested", "--formats", "bf16,int8"), ("--nested", "int4")),
    "nested with bf16 only": (("--nested", "--formats", "bf16"), ("--nested", "int8")),
    "copies on an engine without them": (("--miss-copy", "int4:0.3", "--engine", "llama.cpp"),
                                         ("--miss-copy", "llama.cpp")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_feature_no_plan_could_use_is_one_line(run_cli, name):
    args, needles = CASES[name]
    res = run_cli("optimize", "--parallel", "offload", *args)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output
    for needle in needles:
        assert needle in res.output, res.output
