"""Prefill/decode disaggregation (issue 15 item 5): two pools, the KV cache sent between them.

The hand-checkable runs use test_goodput's tiny model (two MoE layers of four experts, all
resident) with both pools on the same desktop box, so a disaggregated request differs from
a colocated one by exactly its KV transfer.
"""

from __future__ import annotations

import json

import pytest
import yaml

from profiles.errors import InputError
from profiles.hardware import load_profile
from simulator.engine import SimConfig, simulate
from simulator.pd import kv_route_s, pool_profiles, simulate_disaggregated
from simulator.sweep import _profile_doc
from tests import test_goodput
from tests.test_goodput import _hardware, _plan, _trace

tiny = test_goodput.tiny  # the module's fixture

ROUTE = (2e-3, 1e9)  # 2 ms and 1 GB/s between the pools: transfers far above float noise


@pytest.mark.parametrize("scheduler", ["continuous", "vllm", "sarathi"])
def test_one_request_pays_exactly_its_kv_transfer(tiny, scheduler):
    hw, plan, trace = _hardware("desktop-4090"), _plan(tiny, 1), _trace(1)
    cfg = SimConfig(requests=1, batching=scheduler)
    col = simulate(plan, hw, tiny, trace, cfg).metrics["per_request"][0]
    pd = simulate_disaggregated((plan, hw), (plan, hw), tiny, trace, cfg, ROUTE)
    got = pd.metrics["per_request"][0]
    transfer = ROUTE[0] + 16 * tiny.kv_bytes_per_token() / ROUTE[1]  # a 16-token prompt's KV
    assert got["ttft_s"] == pytest.approx(col["ttft_s"], rel=1e-12)  # the same prefill
    assert len(got["tpot_s"]) == len(col["tpot_s"]) == 20  # the same tokens
    assert got["tpot_s"][0] - col["tpot_s"][0] == pytest.approx(transfer, rel=1e-9)
    assert got["tpot_s"][1:] == pytest.approx(col["tpot_s"][1:], rel=1e-12)  # the same decode steps
    assert pd.metrics["kv_transfer"]["bytes"] == 16 * tiny.kv_bytes_per_token()
    assert pd.metrics["output_tokens"] == 21


def test_transfers_to_one_decode_gpu_queue(tiny):
    hw, plan, trace = _hardware("desktop-4090"), _plan(tiny, 2), _trace(2)
    pd = simulate_disaggregated((plan, hw), (plan, hw), tiny, trace, SimConfig(requests=2, batching="vllm"), ROUTE)
    one = ROUTE[0] + 16 * tiny.kv_bytes_per_token() / ROUTE[1]
    # both prompts are prefilled in one step, so the second transfer waits for the first
    assert pd.metrics["kv_transfer"]["seconds"]["mean"] == pytest.approx(1.5 * one, rel=1e-9)
    ttft = [r["ttft_s"] for r in pd.metrics["per_request"]]
    assert ttft[0] == ttft[1]


def test_roles_and_arrivals_reach_the_requests(tiny):
    hw, plan, trace = _hardware("desktop-4090"), _plan(tiny, 2), _trace(2)
    pre = simulate(plan, hw, tiny, trace, SimConfig(requests=2, pd_role="prefill")).metrics
    assert [len(r["tpot_s"]) for r in pre["per_request"]] == [0, 0] and pre["output_tokens"] == 2
    dec = simulate(plan, hw, tiny, trace, SimConfig(requests=2, pd_role="decode", arrivals_s=(0.5, 0.25))).metrics
    assert dec["prefill_steps"] == 0 and dec["output_tokens"] == 40
    assert [r["arrival_s"] for r in dec["per_request"]] == [0.25, 0.5]  # released in time order
    with pytest.raises(InputError, match="one arrival time per request"):
        simulate(plan, hw, tiny, trace, SimConfig(requests=2, arrivals_s=(0.0,)))
    with pytest.raises(InputError, match="unknown prefill/decode role"):
        simulate(plan, hw, tiny, trace, SimConfig(requests=2, pd_role="both"))


def test_pool_profiles_and_the_route_between_them():
    doc = _profile_doc("cluster-h100-2node")
    pre, dec = pool_profiles(doc, 1)
    assert (pre["nodes"][0]["count"], dec["nodes"][0]["count"]) == (1, 1)
    assert doc["nodes"][0]["count"] == 2  # the cluster's own document is left as it was
    for bad in (0, 2):
        with pytest.raises(InputError, match="at least one node"):
            pool_profiles(doc, bad)
    one = {**doc, "nodes": [{**doc["nodes"][0], "count": 1}]}
    with pytest.raises(InputError, match="two nodes or more") as err:  # not 'an integer in [1, 0]'
        pool_profiles(one, 1)
    assert "[1, 0]" not in str(err.value)
    _, hw = load_profile("cluster-h100-2node")
    # GPU to GPU across nodes: the two ConnectX-7 NICs at 400 Gb/s, one hop each way
    assert kv_route_s(hw, 1) == (pytest.approx(1e-5), pytest.approx(50e9))


def test_sweep_compares_colocated_and_disaggregated(tmp_path, run_cli):
    from tests.conftest import small_cluster

    cluster = small_cluster(tmp_path / "c.yaml")
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "pd", "base": {"hardware": str(cluster), "model": "olmoe-1b-7b",
                                                           "batch": 4},
                                    "vary": {"pd_split": [None, 1]}, "simulate": {"requests": 8}}))
    res = run_cli("sweep", str(grid), "--out", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "out/results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert "kv_transfer_bytes" not in rows[0] and rows[1]["kv_transfer_bytes"] > 0
    for role in ("prefill", "decode"):  # every pool's profile is where the sweep says
        assert (tmp_path / f"out/hardware/p001-{role}.yaml").exists()
    grid.write_text(grid.read_text().replace("- 1", "- 2"))
    res = run_cli("sweep", str(grid), "--out", str(tmp_path / "out2"))
    assert res.exit_code == 1 and "at least one node" in res.output and "Traceback" not in res.output


def test_grid_formats_reach_the_plans_and_bad_ones_are_refused(tmp_path, run_cli, monkeypatch):
    import planner.optimize
    from planner.commands.sweep import evaluate_point
    from simulator.sweep import load_grid, point_specs

    seen = []
    real = planner.optimize.optimize
    monkeypatch.setattr(planner.optimize, "optimize", lambda req: seen.append(req.formats) or real(req))
    grid = tmp_path / "g.yaml"
    grid.write_text("name: f\nbase: {hardware: desktop-4090, model: olmoe-1b-7b, formats: [int4]}\n")
    row = evaluate_point({**point_specs(load_grid(grid), tmp_path / "out")[0], "requests": 2})
    assert row["status"] == "ok" and seen == [("int4",)]
    grid.write_text("name: f\nbase: {hardware: desktop-4090, model: olmoe-1b-7b, formats: [int5]}\n")
    res = run_cli("sweep", str(grid), "--out", str(tmp_path / "o2"))
    assert res.exit_code == 1 and "int5" in res.output and "Traceback" not in res.output


def test_sweep_help_names_every_serving_knob(run_cli):
    """A user reads the sweep's knobs in --help: pd_split beside reroute and rebalance_every."""
    out = " ".join(run_cli("sweep", "--help").output.split())
    for knob in ("pd_split", "reroute", "rebalance_every", "dram_contention", "scheduler", "chunk_tokens",
                 "kv_memory", "arrival_rate"):
        assert knob in out, knob


def test_a_disaggregated_run_rates_its_goodput_in_plain_json(tiny):
    """The goodput ladder of a pd_split point writes goodput.json: every figure of the combined
    run and of its SLO row is a plain float or bool (numpy scalars made json.dumps raise, a
    traceback at the end of a `planner sweep` with pd_split and SLOs)."""
    from simulator.goodput import GoodputSettings, rate_row

    hw, plan, trace = _hardware("desktop-4090"), _plan(tiny, 2), _trace(2)
    pd = simulate_disaggregated((plan, hw), (plan, hw), tiny, trace, SimConfig(requests=2, arrival_rate_per_s=4.0),
                                ROUTE)
    row = rate_row(4.0, pd.metrics, None, GoodputSettings(slo_ttft="2s", slo_tpot="100ms"))
    assert row["meets"] is True
    json.dumps({"metrics": pd.metrics, "row": row})
