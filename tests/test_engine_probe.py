"""`planner engines probe` (exporters/engine_probe.py, issue 14): the least-squares fit of
per-step, per-layer and per-expert-call costs recovers known costs from synthetic timings;
the profile it writes loads as an engine; one tiny real run counts its work (no wall-clock
assertions: the timings depend on the machine and its load).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from exporters.engine_probe import (PROMPT, TINY, EngineProbeResult, StepSample, config_stat, engine_profile_doc,
                                    fit_step_costs, fit_warning, mean_over_median, scaled)
from profiles.engines import ENGINES_DIR, load_engine
from profiles.probe import Figure

# known costs (seconds) the synthetic timings are made of
STEP, LAYER, CALL, PREFILL, TOKEN = 1.5e-3, 0.4e-3, 0.12e-3, 3.0e-3, 20e-6
P = 16  # prompt tokens of the prefills


def synthetic(noise: float, seed: int = 0, token: float = TOKEN) -> list[StepSample]:
    """Decode steps at layers x top-k (N = L * K calls) and prefills (N = L * 6 distinct
    experts of P tokens, each layer ``(P - 1) * token`` dearer than a decode layer), each
    time multiplied by 1 + uniform(-noise, noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for layers in (1, 2, 4):
        for k in (1, 2, 4):
            calls = layers * k
            t = STEP + layers * LAYER + calls * CALL
            out += [StepSample(t * (1 + rng.uniform(-noise, noise)), layers, calls) for _ in range(5)]
        calls = layers * 6
        t = PREFILL + layers * (LAYER + (P - 1) * token) + calls * CALL
        out.append(StepSample(t * (1 + rng.uniform(-noise, noise)), layers, calls, "prefill", tokens=P))
    return out


def test_fit_recovers_known_costs_exactly_without_noise():
    fit = fit_step_costs(synthetic(0.0))
    assert fit["step"] == pytest.approx(STEP, rel=1e-9)
    assert fit["layer"] == pytest.approx(LAYER, rel=1e-9)
    assert fit["call"] == pytest.approx(CALL, rel=1e-9)
    assert fit["prefill_step"] == pytest.approx(PREFILL, rel=1e-9)
    assert fit["prefill_layer"] == pytest.approx(LAYER + (P - 1) * TOKEN, rel=1e-9)
    assert fit["token"] == pytest.approx(TOKEN, rel=1e-9)
    assert fit["prefill_tokens"] == P
    assert fit["rms_rel"] == pytest.approx(0.0, abs=1e-12)
    assert fit["samples"] == 3 * 3 * 5 + 3


def test_a_prefill_layer_no_dearer_than_a_decode_layer_has_no_token_cost():
    fit = fit_step_costs(synthetic(0.0, token=0.0))
    assert fit["token"] == pytest.approx(0.0, abs=1e-15)
    assert fit_step_costs(synthetic(0.0, token=-TOKEN))["token"] == 0.0  # a cheaper prefill layer: none, not < 0
    assert fit["prefill_step"] == pytest.approx(PREFILL, rel=1e-9)
    one_depth = [s for s in synthetic(0.0) if s.phase == "decode" or s.layers == 2]  # no slope over depths
    assert fit_step_costs(one_depth)["token"] == 0.0


def test_fit_recovers_known_costs_within_tolerance_with_noise():
    fit = fit_step_costs(synthetic(0.03, seed=1))
    assert fit["layer"] == pytest.approx(LAYER, rel=0.10)
    assert fit["call"] == pytest.approx(CALL, rel=0.10)
    assert fit["step"] == pytest.approx(STEP, rel=0.10)
    assert fit["prefill_step"] == pytest.approx(PREFILL, rel=0.10)
    assert fit["token"] == pytest.approx(TOKEN, rel=0.25)  # a difference of two slopes, over P - 1 tokens
    assert 0 < fit["rms_rel"] < 0.03


def test_terms_split_at_the_medians_and_scaled_to_the_mean_step():
    """A run's TPOT is a mean; a shared machine delays some steps (right skew). One step in
    five of every configuration here takes 4 ms more: the terms keep the medians' split
    (the delay would move every term of a fit to the means) and are scaled by the grid's
    mean/median: the grid's priced steps sum to its mean steps."""
    delay = 4e-3
    steps = []
    for s in synthetic(0.0):
        steps += [StepSample(s.seconds + (delay if i == 4 else 0.0), s.layers, s.calls, s.phase,
                             f"{s.layers}-{s.calls}-{s.phase}-{s.seconds}", s.tokens) for i in range(5)]
    medians, means = config_stat(steps, np.median), config_stat(steps, np.mean)
    undelayed = {f"{s.layers}-{s.calls}-{s.phase}-{s.seconds}": s.seconds for s in synthetic(0.0)}
    assert {m.config: m.seconds for m in medians} == undelayed  # the medians leave the delays out
    skew = mean_over_median(steps)
    assert skew == pytest.approx(sum(m.seconds for m in means) / sum(m.seconds for m in medians))
    assert skew == pytest.approx(1 + delay / 5 * len(means) / sum(m.seconds for m in medians))
    fit = scaled(fit_step_costs(medians), skew)
    assert fit["layer"] == pytest.approx(LAYER * skew, rel=1e-9) and fit["call"] == pytest.approx(CALL * skew, rel=1e-9)
    assert fit["step"] == pytest.approx(STEP * skew, rel=1e-9)
    assert fit["prefill_step"] == pytest.approx(PREFILL * skew, rel=1e-9)
    assert fit["token"] == pytest.approx(TOKEN * skew, rel=1e-9)
    assert fit["samples"] == len(medians) and fit["prefill_tokens"] == P  # counts are not scaled
    priced = sum(fit["step"] + m.layers * fit["layer"] + m.calls * fit["call"] for m in medians if m.phase == "decode")
    assert priced == pytest.approx(skew * sum(m.seconds for m in medians if m.phase == "decode"), rel=1e-9)


def test_a_fit_the_load_made_is_flagged():
    """Steps that layers and calls do not explain (a busy machine) get a warning line; a fit
    within the residual the quiet dev machine shows does not."""
    assert fit_warning(fit_step_costs(synthetic(0.03, seed=1))) is None
    noisy = fit_step_costs(synthetic(0.6, seed=2))
    assert noisy["rms_rel"] > 0.10
    line = fit_warning(noisy)
    assert line.startswith("warning: the step fit leaves") and "quiet" in line


def test_fit_refuses_layers_and_calls_that_move_together():
    steps = [StepSample(1e-3 * layers, layers, 2 * layers) for layers in (1, 2, 4)]  # calls = 2 x layers
    with pytest.raises(ValueError, match="independently"):
        fit_step_costs(steps)


def result(device_kind: str = "cpu") -> EngineProbeResult:
    def m(value: float, what: str) -> Figure:
        return Figure(value, f"probe ({what}, 2026-12-06, test machine)")

    return EngineProbeResult(device_kind=device_kind, layer_overhead_s=m(0.9e-3, "per layer"),
                             expert_call_overhead_s=m(75e-6, "per call"), decode_step_s=m(2.2e-3, "decode"),
                             prefill_step_s=m(4.5e-3, "prefill"), token_overhead_s=m(21e-6, "per token"),
                             disk_reads={"cold": m(0.21, "cold miss vs sequential"), "warm": m(0.42, "warm")},
                             launch_s=20e-6, elapsed_s=30.0)


def test_written_profile_loads_with_the_measured_numbers(tmp_path):
    base = yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text())
    path = tmp_path / "probed.yaml"
    path.write_text(yaml.safe_dump(engine_profile_doc(result(), base), sort_keys=False))
    engine = load_engine(path)
    p, bundled = engine.profile, load_engine("bundle").profile
    assert p.name == "bundle"
    assert p.cpu.layer_overhead_s.value == pytest.approx(0.9e-3)
    assert p.cpu.expert_call_overhead_s.value == pytest.approx(75e-6)
    assert p.step_overhead_s.decode.value == pytest.approx(2.2e-3)
    assert p.step_overhead_s.prefill.value == pytest.approx(4.5e-3)
    assert p.cpu.token_overhead_s.value == pytest.approx(21e-6)
    assert p.disk_read_fraction.value == pytest.approx(0.21)  # cold unless asked
    for sourced in (p.cpu.layer_overhead_s, p.cpu.expert_call_overhead_s, p.step_overhead_s.decode,
                    p.step_overhead_s.prefill, p.disk_read_fraction, p.cpu.token_overhead_s):
        assert sourced.source.startswith("probe (")
    assert p.gpu == bundled.gpu  # what was not probed stays as bundled
    assert p.cpu.kernels == bundled.cpu.kernels and p.sites == bundled.sites


def test_warm_page_cache_picks_the_warm_read_fraction():
    base = yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text())
    assert engine_profile_doc(result(), base, "warm")["disk_read_fraction"]["value"] == pytest.approx(0.42)


def test_a_gpu_probe_fills_the_gpu_section_only(tmp_path):
    base = yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text())
    doc = engine_profile_doc(result("gpu"), base)
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    p, bundled = load_engine(path).profile, load_engine("bundle").profile
    assert p.gpu.layer_overhead_s.value == pytest.approx(0.9e-3)
    assert p.cpu.layer_overhead_s == bundled.cpu.layer_overhead_s


def test_tiny_real_probe_counts_its_work(run_cli, tmp_path):
    """The runtime really runs: every configuration of the tiny grid is timed, the steps
    counted as set, and the profile written loads; no timing is asserted."""
    pytest.importorskip("torch", reason="needs the [runtime] extra")
    pytest.importorskip("onnxruntime", reason="needs the [runtime] extra")
    out = tmp_path / "engine.yaml"
    res = run_cli("engines", "probe", "--tiny", "--out", out, "--dir", tmp_path, "--work", tmp_path / "w", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    configs = len(TINY.layers) * len(TINY.top_k) * 2  # x (resident, cached)
    assert data["fit"]["timed_steps"] == configs * TINY.max_rounds * (TINY.steps_per_round + 1)
    assert data["fit"]["samples"] == configs * 2  # one median per configuration and phase
    decode = [c for c in data["fit"]["configs"] if c["phase"] == "decode"]
    assert sorted((c["layers"], c["calls"]) for c in decode) == sorted(
        (L, L * K) for L in TINY.layers for K in TINY.top_k for _ in range(2))
    assert all(c["seconds"] > 0 for c in data["fit"]["configs"])
    engine = load_engine(out)
    assert engine.profile.cpu.layer_overhead_s.source.startswith("probe (")
    assert {row["what"] for row in data["overheads"]} >= {"layer_overhead_s", "expert_call_overhead_s", "decode",
                                                          "token_overhead_s"}
    assert engine.profile.cpu.token_overhead_s.value >= 0
    assert engine.profile.cpu.token_overhead_s.source.startswith("probe (")
    assert {c["tokens"] for c in data["fit"]["configs"] if c["phase"] == "prefill"} == {len(PROMPT)}
    disk = data["fit"]["disk"]
    assert disk["sizes"] == list(TINY.disk_sizes)
    for state in ("cold", "warm"):  # one median miss per size, at every size the settings name
        sizes = [m["bytes"] for m in disk[state]["misses"]]
        assert len(sizes) == len(TINY.disk_sizes) >= 2 and sizes == sorted(set(sizes))
        assert disk[state]["fixed_s"] >= 0 and disk[state]["per_byte_s"] > 0
    assert data["disk_read_overhead_s"]["cold"] == disk["cold"]["fixed_s"]
    assert engine.profile.disk_read_overhead_s.source.startswith("probe (")
    assert not list(Path(tmp_path).glob(".engine-probe-*"))  # the disk test's files are removed
    res = run_cli("engines", "probe", "--tiny", "--out", out)
    assert res.exit_code == 1 and "--force" in res.output  # no silent overwrite, before any measuring


def test_fractions_are_taken_against_the_hardware_profile_given(run_cli, tmp_path):
    """``--hardware``: the CPU kernel's shares are of that profile's CPU bandwidth and int8
    peak (as the bundle engine sees them) and the disk read fraction of its drive's rate, so
    the profile prices the kernel's rate and a miss's bytes at what the probe measured,
    whatever its own figures; a bad profile is one line, before any measuring."""
    pytest.importorskip("torch", reason="needs the [runtime] extra")
    pytest.importorskip("onnxruntime", reason="needs the [runtime] extra")
    from planner.commands.engines import _references
    from profiles.hardware import load_profile

    _, hw = load_profile("desktop-4090")
    cpu = load_engine("bundle").apply(hw).devices["node/cpu0"]
    ref = _references("desktop-4090")
    assert ref == {"name": "desktop-4090", "read_bytes_per_s": cpu.memory_bytes_per_s,
                   "peak_ops_per_s": cpu.peak_ops_per_s["int8"],
                   "disk_bytes_per_s": hw.devices["node/nvme0"].memory_bytes_per_s}
    out = tmp_path / "engine.yaml"
    res = run_cli("engines", "probe", "--tiny", "--out", out, "--dir", tmp_path, "--work", tmp_path / "w",
                  "--hardware", "desktop-4090", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    kernel, disk = data["fit"]["kernel"], data["fit"]["disk"]
    assert (kernel["read_bytes_per_s"], kernel["peak_ops_per_s"]) == (ref["read_bytes_per_s"], ref["peak_ops_per_s"])
    eff = load_engine(out).profile.cpu.efficiency
    assert eff.memory_fraction == pytest.approx(min(1.0, kernel["rate_bytes_per_s"] / ref["read_bytes_per_s"]),
                                                rel=1e-3, abs=1e-4)
    assert "hardware profile desktop-4090's streaming read" in eff.source
    assert disk["sequential_bytes_per_s"] == ref["disk_bytes_per_s"]
    assert data["disk_read_fraction"]["cold"] == pytest.approx(
        min(1.0, 1 / disk["cold"]["per_byte_s"] / ref["disk_bytes_per_s"]))
    bad = run_cli("engines", "probe", "--tiny", "--out", tmp_path / "x.yaml", "--hardware", tmp_path / "none.yaml")
    assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1
