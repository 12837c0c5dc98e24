"""What `simulate` says beside its numbers holds (issue 17 item 8): an expert-parallel plan's
own workload is recognised, a predicted hit rate is shown only where the plan predicts one,
an eviction policy on a plan without cache slots is called out, and TTFT under a closed loop
says it includes queueing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner.cli import cli

TINY_V3 = str(Path(__file__).parent / "data" / "configs" / "deepseek_v3")  # n_group 4: group-limited routing


@pytest.fixture(scope="module")
def ep_plan(tmp_path_factory):
    path = tmp_path_factory.mktemp("ep") / "ep.json"
    res = CliRunner().invoke(cli, ["optimize", "-H", "workstation-2x3090-nvlink", "-m", TINY_V3, "--parallel", "ep",
                                   "--out", str(path)])
    assert res.exit_code == 0, res.output
    return path


def test_an_ep_plans_own_workload_is_not_called_another(ep_plan):
    res = CliRunner().invoke(cli, ["--json", "simulate", "-p", str(ep_plan), "-m", TINY_V3, "--requests", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["warnings"] == []


def test_no_predicted_hit_rate_where_the_plan_predicts_none_and_eviction_without_slots(ep_plan):
    res = CliRunner().invoke(cli, ["simulate", "-p", str(ep_plan), "-m", TINY_V3, "--requests", "2",
                                   "--eviction", "belady"])
    assert res.exit_code == 0, res.output
    assert "--eviction belady changes nothing: the plan has no expert-cache slots" in res.output
    row = next(line for line in res.output.splitlines() if "expert hit rate" in line)
    assert row.count("0.000") == 0 and len([c for c in row.split("│") if c.strip()]) == 2


def test_closed_loop_ttft_says_it_queues(tmp_path):
    plan = tmp_path / "plan.json"
    assert CliRunner().invoke(cli, ["optimize", "-H", "laptop-4060", "-m", "olmoe-1b-7b", "--out", str(plan)]).exit_code == 0
    res = CliRunner().invoke(cli, ["simulate", "-p", str(plan), "--requests", "3"])
    assert res.exit_code == 0, res.output
    assert "TTFT includes queueing: all 3 requests arrive at t = 0" in " ".join(res.output.split())
    res = CliRunner().invoke(cli, ["simulate", "-p", str(plan), "--requests", "3", "--arrival-rate", "1"])
    assert "TTFT includes queueing" not in res.output
