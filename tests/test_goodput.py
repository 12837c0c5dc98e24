"""Goodput (issue 15 item 6): SLO attainment, the rate ladder, and curves monotone in capacity.

The simulated cases use the hand-worked tiny model of test_kv_scheduler (two MoE layers of
four experts, every expert resident on the GPU): requests of a 16-token prompt and 20
decode tokens, replayed under Poisson arrivals whose times at rate r are one seeded
pattern scaled by 1/r.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from planner.plan import Inputs, Plan, SolverInfo
from planner.plan_layer import LayerPlan
from profiles.engines import load_engine
from profiles.errors import InputError
from profiles.hardware import HardwareProfile
from profiles.models import load_model
from profiles.workload.trace import DECODE, PREFILL, Trace
from simulator.engine import SimConfig, simulate
from simulator.goodput import GoodputSettings, goodput_ladder, rate_row, slo_attainment
from simulator.sweep import Grid, load_grid, point_profile, with_goodput

CONFIG = Path(__file__).parent / "data/configs/mixtral/config.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = json.loads(CONFIG.read_text())
    config.update(num_hidden_layers=2, hidden_size=1024, intermediate_size=4096, num_local_experts=4,
                  num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=128)
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(config))
    return load_model(path)


def _trace(n: int, prompt: int = 16, decode: int = 20) -> Trace:
    T = n * (prompt + decode)
    t = np.arange(T)
    ids = np.stack([np.stack([t % 4, (t + 1) % 4], 1), np.stack([(t + 2) % 4, (t + 3) % 4], 1)], 1)
    phase = np.tile(np.r_[np.full(prompt, PREFILL), np.full(decode, DECODE)], n).astype(np.uint8)
    return Trace(expert_ids=ids, seq_lens=np.full(n, prompt + decode), phase=phase, num_experts=4, layer_map=(0, 1))


def _plan(model, batch: int) -> Plan:
    inputs = Inputs(hardware="desktop-4090", hardware_digest="-", model=model.name, model_digest="-", workload="-",
                    workload_digest="-", engine="vllm")
    layer = {"home": ("node/gpu0",) * 4, "format": ("bf16",) * 4, "site": ("resident",) * 4}
    lps = tuple(LayerPlan(moe_layer=i, hidden_layer=model.moe_layer_indices[i], **layer) for i in range(2))
    return Plan(inputs=inputs, objective="latency", batch_size=batch, context_tokens=64, compute_device="node/gpu0",
                host_device="node/cpu0", layers=lps, memory={}, predicted={}, solver=SolverInfo(method="hand"))


def _hardware(gpu: str):
    """desktop-4090 with the GPU of the bundled profile ``gpu`` (the sweep's ``gpu`` knob)."""
    grid = Grid.model_validate({"name": "g", "base": {"hardware": "desktop-4090", "model": "m"}})
    return load_engine("vllm").apply(HardwareProfile.model_validate(point_profile(grid, {"gpu": gpu}, "p")).resolve())


def _ladder(model, slo: GoodputSettings, *, gpu="desktop-4090", batch=4, requests=24, seed=0, **cfg) -> dict:
    hw, plan, trace = _hardware(gpu), _plan(model, batch), _trace(requests)

    def run(rate):
        rep = simulate(plan, hw, model, trace, SimConfig(arrival_rate_per_s=rate, batching="vllm", seed=seed, **cfg))
        return rate_row(rate, rep.metrics, rep.serving, slo)

    return goodput_ladder(run, slo)


# ----------------------------------------------------------------------------- attainment and the ladder


def test_slo_attainment_by_hand():
    slo = GoodputSettings(slo_ttft="1s", slo_tpot="100ms")
    per_request = [
        {"ttft_s": 0.5, "tpot_s": [0.05, 0.05]},  # meets both
        {"ttft_s": 1.5, "tpot_s": [0.05]},  # TTFT misses
        {"ttft_s": 0.9, "tpot_s": [0.05, 0.2]},  # mean TPOT 125 ms misses (one gap under 100 ms)
        {"ttft_s": 1.0, "tpot_s": []},  # one output token: judged on TTFT, at the SLO exactly
        {"ttft_s": None, "tpot_s": []},  # produced nothing
    ]
    assert slo_attainment(per_request, slo) == {"ttft": 3 / 5, "tpot": 3 / 5, "both": 2 / 5}
    ttft_only = GoodputSettings(slo_ttft=1.0)
    assert slo_attainment(per_request, ttft_only) == {"ttft": 3 / 5, "tpot": 4 / 5, "both": 3 / 5}


def _fake(share_of):
    """A run whose SLO share is ``share_of(rate)``; records the rates it was asked for."""
    asked = []
    slo = GoodputSettings(slo_tpot=0.1)

    def run(rate):
        asked.append(rate)
        share = share_of(rate)
        return {"rate_rps": rate, "slo_share": share, "meets": share >= slo.share}
    return run, asked


def test_bracket_then_bisect_by_hand():
    """Meets up to 3 req/s: 1, 2 meet, 4 misses (bracket); bisect 3 (meets), 3.5, 3.25, 3.125 (miss)."""
    run, asked = _fake(lambda r: 1.0 if r <= 3 else 0.5)
    result = goodput_ladder(run, GoodputSettings(slo_tpot=0.1))
    assert asked == [1.0, 2.0, 4.0, 3.0, 3.5, 3.25, 3.125]
    assert result["goodput_rps"] == 3.0 and result["bounded"]
    assert [r["rate_rps"] for r in result["rates"]] == sorted(asked)
    # the first rate misses: halve until one meets, then bisect
    run, asked = _fake(lambda r: 1.0 if r <= 0.3 else 0.0)
    result = goodput_ladder(run, GoodputSettings(slo_tpot=0.1, bisect_steps=2))
    assert asked == [1.0, 0.5, 0.25, 0.375, 0.3125] and result["goodput_rps"] == 0.25


def test_fixed_ladder_goodput_is_below_the_first_miss():
    """Rates 1, 2, 4, 8: 4 misses and 8 meets again (noise): the goodput is 2, bounded."""
    run, asked = _fake(lambda r: {1: 1.0, 2: 0.95, 4: 0.85, 8: 0.9}[r])
    result = goodput_ladder(run, GoodputSettings(slo_tpot=0.1, rates=[8, 1, 4, 2]))
    assert asked == [1.0, 2.0, 4.0, 8.0] and result["goodput_rps"] == 2.0 and result["bounded"]
    run, _ = _fake(lambda r: 1.0)
    assert goodput_ladder(run, GoodputSettings(slo_tpot=0.1, rates=[1, 2]))["bounded"] is False
    run, _ = _fake(lambda r: 0.0)
    assert goodput_ladder(run, GoodputSettings(slo_tpot=0.1, rates=[1, 2]))["goodput_rps"] == 0.0


@pytest.mark.parametrize("doc, match", [
    ({}, "slo_ttft, slo_tpot or both"),
    ({"slo_tpot": "100 parsecs"}, "unknown time unit"),
    ({"slo_tpot": "0ms"}, "positive time"),
    ({"slo_tpot": "1s", "rates": []}, "non-empty list"),
    ({"slo_tpot": "1s", "rates": [1, -2]}, "positive requests/s"),
    ({"slo_tpot": "1s", "share": 1.5}, "less than or equal to 1"),
])
def test_bad_goodput_settings_are_refused(doc, match):
    with pytest.raises(ValidationError, match=match):
        GoodputSettings.model_validate(doc)


# ----------------------------------------------------------------------------- simulated: the curve's shape


def test_slo_share_falls_as_the_rate_rises(tiny):
    """Batch 1, 6 identical requests, each served in S seconds (its prefill p, then 20 decodes),
    TTFT SLO 1.5 S. At 0.01 req/s each arrives to an idle GPU: TTFT = p, all meet. At 10^6 req/s
    all arrive within microseconds and request i waits i S: TTFT ~ i S + p, so requests 0 and 1
    meet (p < S/2) and 2..5 do not: 2/6. Between, the share never rises with the rate."""
    model = tiny
    hw, plan, trace = _hardware("desktop-4090"), _plan(model, 1), _trace(6)
    alone = simulate(plan, hw, model, _trace(1), SimConfig(batching="vllm")).metrics
    S, p = alone["makespan_s"], alone["ttft_s"]["p50"]
    assert p < S / 2
    slo = GoodputSettings(slo_ttft=1.5 * S, rates=[0.01, 0.1 / S, 0.3 / S, 1 / S, 3 / S, 10 / S, 1e6])
    result = goodput_ladder(
        lambda r: rate_row(r, simulate(plan, hw, model, trace, SimConfig(arrival_rate_per_s=r, batching="vllm",
                                                                         seed=3)).metrics, None, slo), slo)
    shares = [row["slo_share"] for row in result["rates"]]
    assert shares[0] == 1.0 and shares[-1] == pytest.approx(2 / 6)
    assert all(b <= a for a, b in zip(shares, shares[1:])), shares
    assert 0 < result["goodput_rps"] < 1e6 and result["bounded"]


def test_goodput_is_monotone_in_kv_memory(tiny):
    """More KV blocks (3 .. 12 for requests of 3 blocks, batch 4) never lower the goodput: the
    small pools preempt (recompute), which the larger ones do not need to."""
    slo = GoodputSettings(slo_ttft="15ms", slo_tpot="1ms", start_rps=32, bisect_steps=3)
    ladders = [_ladder(tiny, slo, kv_blocks=blocks) for blocks in (3, 6, 12)]
    goodputs = [lad["goodput_rps"] for lad in ladders]
    assert all(b >= a for a, b in zip(goodputs, goodputs[1:])), goodputs
    assert goodputs[0] < goodputs[-1]  # the pool binds: capacity is what moves the goodput here
    assert any(row["preemptions"] for row in ladders[0]["rates"])


def test_goodput_is_monotone_in_gpu_speed(tiny):
    """The same plan on an RTX 3060, 4090 and 5090 (faster memory and compute in that order)."""
    slo = GoodputSettings(slo_ttft="15ms", slo_tpot="1ms", start_rps=32, bisect_steps=3)
    goodputs = [_ladder(tiny, slo, gpu=gpu)["goodput_rps"] for gpu in ("desktop-3060", "desktop-4090", "desktop-5090")]
    assert all(b >= a for a, b in zip(goodputs, goodputs[1:])) and goodputs[0] < goodputs[-1], goodputs


def test_goodput_is_monotone_in_batch(tiny):
    """A larger batch (1, 2, 4 running at once) never lowers the goodput of a model whose step
    time hardly grows with its tokens (every expert resident, memory-bound). Not a law: on an
    offload plan a larger batch fetches more experts per step and can lower the goodput under
    a TPOT SLO (examples/serving_capacity: Qwen3-30B-A3B on a 4090, batch 1 beats batch 4)."""
    slo = GoodputSettings(slo_ttft="15ms", slo_tpot="1ms", start_rps=32, bisect_steps=3)
    goodputs = [_ladder(tiny, slo, batch=b)["goodput_rps"] for b in (1, 2, 4)]
    assert all(b >= a for a, b in zip(goodputs, goodputs[1:])) and goodputs[0] < goodputs[-1], goodputs


# ----------------------------------------------------------------------------- the grid and the CLI flags


def test_goodput_flags_and_grid_checks(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nbase: {hardware: desktop-4090, model: m}\ngoodput: {slo_tpot: 100ms}\n")
    grid = load_grid(path)
    assert grid.goodput.slo_tpot == 0.1 and grid.goodput.rates is None and grid.goodput.share == 0.9
    grid = with_goodput(grid, path, slo_ttft="2s", slo_tpot=None, share=0.95, rates="4,0.5,1")
    assert (grid.goodput.slo_ttft, grid.goodput.slo_tpot, grid.goodput.share) == (2.0, 0.1, 0.95)
    assert grid.goodput.rates == [0.5, 1.0, 4.0]
    with pytest.raises(InputError, match="--rates"):
        with_goodput(grid, path, rates="1,fast")
    with pytest.raises(InputError, match="--slo-ttft") as e:
        with_goodput(grid, path, slo_ttft="2 fortnights")
    assert "\n" not in str(e.value)
    path.write_text("name: g\nbase: {hardware: desktop-4090, model: m}\nvary: {arrival_rate: [1, 2]}\n"
                    "goodput: {slo_tpot: 100ms}\n")
    with pytest.raises(InputError, match="vary.arrival_rate"):
        load_grid(path)
    path.write_text("name: g\nbase: {hardware: desktop-4090, model: m}\ngoodput: {slo_tpot: 1 week}\n")
    with pytest.raises(InputError, match="goodput.slo_tpot"):
        load_grid(path)


@pytest.mark.parametrize("knob, value", [("scheduler", "fifo"), ("chunk_tokens", 0), ("kv_memory", "lots"),
                                         ("arrival_rate", -1)])
def test_bad_serving_knob_values_are_one_line(tmp_path, knob, value):
    path = tmp_path / "g.yaml"
    path.write_text(f"name: g\nbase: {{hardware: desktop-4090, model: m}}\nvary: {{{knob}: [{value}]}}\n")
    with pytest.raises(InputError, match=f"vary.{knob}") as e:
        load_grid(path)
    assert "\n" not in str(e.value)


def test_sweep_varies_serving_knobs_and_writes_goodput(tmp_path, run_cli):
    """OLMoE on an RTX 3060, Sarathi with 64-token chunks, a KV cache of 12 MiB (96 tokens of
    128 KiB: one 64-token request and a half) or 1 GiB: the small cache preempts and its
    goodput is lower; the flags add the ladder to a grid without a goodput block."""
    path = tmp_path / "g.yaml"
    path.write_text("name: kv\nbase: {hardware: desktop-3060, model: olmoe-1b-7b, batch: 4}\n"
                    "vary: {scheduler: [sarathi], chunk_tokens: [64], kv_memory: [12MiB, 1GiB]}\n"
                    "simulate: {requests: 8}\n")
    out = tmp_path / "out"
    r = run_cli("--json", "sweep", path, "--out", out, "--slo-ttft", "2s", "--slo-tpot", "100ms", "--rates", "1,4,16")
    assert r.exit_code == 0, r.stderr
    small, large = json.loads(r.stdout)["rows"]
    assert small["preemptions"] > 0 == large["preemptions"]
    assert [row["rate_rps"] for row in small["goodput"]["rates"]] == [1.0, 4.0, 16.0]
    assert small["goodput_rps"] < large["goodput_rps"] == 16.0 and not large["goodput"]["bounded"]
    for name in ("goodput.csv", "goodput.json", "goodput.png"):
        assert (out / name).stat().st_size > 0
    lines = (out / "goodput.csv").read_text().splitlines()
    assert lines[0].startswith("point,rate_rps,slo_share") and len(lines) == 1 + 2 * 3
    assert "goodput_rps" in (out / "results.csv").read_text().splitlines()[0]
    table = run_cli("sweep", path, "--out", out, "--force", "--slo-tpot", "100ms", "--rates", "16")
    shown = table.stdout + table.stderr
    assert table.exit_code == 0 and ">= 16 req/s" in shown and "Share of requests meeting the SLOs" in shown
