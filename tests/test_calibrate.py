"""Calibration of the synthetic generator: to synthetic targets with known knobs, to
aggregates, to the real ESFT and OLMoE data (skipped without ../shared), and through
`planner trace synth --like`.

Legend: T = tokens, L = MoE layers, E = experts, K = top-k.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ESFT, SHARED_TRACES, needs_esft  # noqa: E402
from profiles.errors import InputError
from profiles.models import load_model
from profiles.workload.aggregate import AggregateWorkload
from profiles.workload.calibrate import (
    DEFAULT_AFFINITY,
    DEFAULT_TEMPORAL,
    calibrate,
    fit_lognormal_skew,
    normalised_mutual_information,
)
from profiles.workload.hitrate import lru_curve
from profiles.workload.importers import import_esft, import_olmoe_counts
from profiles.workload.stats import expert_frequency, next_layer_predictability
from profiles.workload.synthetic import SyntheticWorkload, generate, lognormal_shares
from profiles.workload.trace import load_trace

OLMOE = SHARED_TRACES / "olmoe-mixtral-counts" / "routing_counts.npz"
needs_olmoe = pytest.mark.skipif(not OLMOE.is_file(), reason=f"shared OLMoE counts not found at {OLMOE}")
# a target with known knobs, small enough to calibrate in about a second
KNOWN = SyntheticWorkload(num_layers=8, num_experts=16, top_k=2, skew=0.8, temporal=0.3, affinity=0.6,
                          num_sequences=96, prompt_tokens=24, output_tokens=8, seed=11)


def _fig(report, name):
    f = report.figure(name)
    return f.target, f.achieved


@pytest.mark.parametrize("sigma", [0.0, 0.35, 0.8, 1.4])
@pytest.mark.parametrize("E", [8, 64, 256])
def test_lognormal_fit_recovers_sigma(sigma, E):
    shares = lognormal_shares(E, sigma)[np.random.default_rng(E).permutation(E)]  # order does not matter
    assert fit_lognormal_skew(shares) == pytest.approx(sigma, abs=0.006)


def test_normalised_mutual_information():
    assert normalised_mutual_information(np.diag([50.0, 30.0, 20.0])) == pytest.approx(1.0, abs=0.02)
    assert normalised_mutual_information(np.zeros((3, 3))) == 0.0
    # independent draws: a plain estimate reads dependence, the bias-corrected one far less
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 32, 2000), rng.integers(0, 32, 2000)
    table = np.zeros((32, 32))
    np.add.at(table, (a, b), 1)
    p = table / table.sum()
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    plain = (p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum() / (-(pa * np.log(pa)).sum())
    assert normalised_mutual_information(table) < 0.4 * plain  # about 0.27 of it here


def test_calibration_recovers_a_synthetic_target():
    target = generate(KNOWN)
    w, report = calibrate(target, prompt_tokens=24, output_tokens=8, seed=3)
    lru_t, lru_a = _fig(report, "lru_hit_rate@4")
    rec_t, rec_a = _fig(report, "next_layer_recall")
    assert abs(lru_a - lru_t) <= 0.03 and abs(rec_a - rec_t) <= 0.05
    assert w.temporal == pytest.approx(KNOWN.temporal, abs=0.08)
    assert w.affinity == pytest.approx(KNOWN.affinity, abs=0.12)
    assert report.figure("frequency_tv_mean").achieved < 0.05
    assert report.kind == "trace" and report.search_steps >= 1
    # the workload has the target's shape and the sequence shape asked for
    assert (w.num_layers, w.num_experts, w.top_k) == (8, 16, 2)
    assert w.num_tokens >= target.num_tokens and w.prompt_tokens == 24


def test_calibration_is_deterministic():
    target = generate(KNOWN.with_(num_sequences=48))
    a, ra = calibrate(target, seed=1)
    b, rb = calibrate(target, seed=1)
    assert a == b and ra.to_dict() == rb.to_dict()


def test_lognormal_popularity_carries_sigma_per_layer():
    target = generate(KNOWN.with_(skew=(0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6), temporal=0.0, num_sequences=192))
    w, report = calibrate(target, popularity="lognormal")
    assert w.popularity is None and len(w.skew) == 8
    assert np.all(np.diff(w.skew) > 0)  # the per-layer σ order survives sampling noise
    assert any("log-normal" in n for n in report.notes)
    assert "frequency_tv_mean" not in {f.name for f in report.figures}  # expert order is random
    assert report.figure("sorted_frequency_tv_mean").achieved < 0.05


def test_one_layer_trace_fits_temporal_only():
    target = generate(KNOWN.with_(num_layers=1, affinity=0.0))
    w, report = calibrate(target)
    assert w.affinity == 0.0
    assert "next_layer_recall" not in {f.name for f in report.figures}
    assert abs(report.figure("lru_hit_rate@4").error) <= 0.03


def _aggregate_from(trace, layers=(0, 3, 7), pairs=((0, 3), (3, 7))) -> AggregateWorkload:
    E = trace.num_experts
    freq = expert_frequency(trace.expert_ids, E)[list(layers)]
    tables = []
    for a, b in pairs:  # top-1 at layer a vs top-1 at layer b, one entry per token
        t = np.zeros((E, E), np.int64)
        np.add.at(t, (trace.expert_ids[:, a, 0], trace.expert_ids[:, b, 0]), 1)
        tables.append(t)
    return AggregateWorkload(expert_counts=freq, layer_ids=tuple(layers), transition_counts=np.stack(tables),
                             transition_layers=tuple(pairs), top_k=trace.top_k, model="toy", source="toy counts")


def test_aggregate_with_cross_layer_tables_fits_affinity():
    target = generate(KNOWN.with_(num_sequences=512, affinity=0.7))
    agg = _aggregate_from(target)
    w, report = calibrate(agg)
    t, a = _fig(report, "pair_nmi_top1")
    assert abs(a - t) <= 0.02
    assert w.affinity == pytest.approx(0.7, abs=0.15)
    assert w.temporal == DEFAULT_TEMPORAL  # no token order in counts
    notes = " ".join(report.notes)
    assert "no token order" in notes and "not adjacent" in notes
    assert w.num_layers == 8  # the largest layer with counts + 1
    # layers with counts keep their measured shares; the others are log-normal
    shares = np.asarray(w.popularity)
    measured = agg.expert_counts / agg.expert_counts.sum(axis=1, keepdims=True)
    assert np.allclose(shares[[0, 3, 7]], measured)


def test_aggregate_without_tables_keeps_the_defaults():
    counts = np.array([[5.0, 3, 1, 1], [2, 2, 2, 2]])
    w, report = calibrate(AggregateWorkload(expert_counts=counts, layer_ids=(0, 1), top_k=2))
    assert (w.temporal, w.affinity) == (DEFAULT_TEMPORAL, DEFAULT_AFFINITY)
    assert report.search_steps == 0 and any("no cross-layer counts" in n for n in report.notes)
    assert report.figure("lru_hit_rate@4").target is None


def test_aggregate_takes_the_models_layers():
    counts = np.ones((2, 64))
    w, _ = calibrate(AggregateWorkload(expert_counts=counts, layer_ids=(0, 15)), model=load_model("olmoe-1b-7b"))
    assert (w.num_layers, w.top_k) == (16, 8) and w.layer_map == tuple(range(16))


@pytest.mark.parametrize("agg,model,words", [
    (AggregateWorkload(expert_counts=np.ones((2, 8)), layer_ids=(0, 1)), None, "top-k"),
    (AggregateWorkload(expert_counts=np.ones((2, 8)), layer_ids=(0, 1), top_k=2), "olmoe-1b-7b", "experts"),
    (AggregateWorkload(expert_counts=np.ones((2, 64)), layer_ids=(0, 40), top_k=8), "olmoe-1b-7b", "layers"),
])
def test_bad_aggregate_calibrations(agg, model, words):
    with pytest.raises(InputError) as err:
        calibrate(agg, model=load_model(model) if model else None)
    assert words in str(err.value)


def test_trace_must_match_the_model():
    with pytest.raises(InputError, match="does not match the model"):
        calibrate(generate(KNOWN.with_(num_sequences=4)), model=load_model("mixtral-8x7b"))


def test_bad_popularity_mode():
    with pytest.raises(InputError, match="popularity"):
        calibrate(generate(KNOWN.with_(num_sequences=4)), popularity="zipf")


# ----------------------------------------------------------------------------- real data


@needs_esft
@pytest.mark.parametrize("task", ["summary", "intent"])
def test_calibrated_synthetic_matches_the_esft_trace(task):
    target = import_esft(ESFT, task)
    w, report = calibrate(target)
    synth = generate(w)
    # measured here, independently of the report: LRU at c = 2K = 12, mean over layers
    lru_t = lru_curve(target.expert_ids, 64)[:, 12].mean()
    lru_s = lru_curve(synth.expert_ids, 64)[:, 12].mean()
    assert abs(lru_s - lru_t) <= 0.03
    rec_t = next_layer_predictability(target.expert_ids, 64, seq_lens=target.seq_lens).recall.mean()
    rec_s = next_layer_predictability(synth.expert_ids, 64, seq_lens=synth.seq_lens).recall.mean()
    assert abs(rec_s - rec_t) <= 0.05
    # per-layer frequency distribution: expert by expert, and as sorted curves
    f_t = expert_frequency(target.expert_ids, 64).astype(float)
    f_s = expert_frequency(synth.expert_ids, 64).astype(float)
    p_t, p_s = f_t / f_t.sum(1, keepdims=True), f_s / f_s.sum(1, keepdims=True)
    tv = 0.5 * np.abs(p_t - p_s).sum(axis=1)
    assert tv.mean() < 0.03 and tv.max() < 0.05
    assert np.abs(np.sort(p_t, axis=1) - np.sort(p_s, axis=1)).max() < 0.01
    # the report says the same
    assert report.figure("lru_hit_rate@12").target == pytest.approx(lru_t)
    assert report.figure("lru_hit_rate@12").achieved == pytest.approx(lru_s)
    assert report.figure("frequency_tv_mean").achieved == pytest.approx(tv.mean())


@needs_olmoe
def test_olmoe_counts_fit_affinity_on_non_adjacent_layers():
    agg = import_olmoe_counts(OLMOE, "olmoe/c4")
    w, report = calibrate(agg, model=load_model("olmoe-1b-7b"))
    t, a = _fig(report, "pair_nmi_top1")
    assert abs(a - t) <= 0.01
    assert 0.5 < w.affinity < 1.0
    assert report.figure("frequency_tv_mean").achieved < 0.03
    assert any("0->7, 7->15" in n and "not adjacent" in n for n in report.notes)


@needs_esft
def test_cli_synth_like_esft(run_cli, tmp_path):
    out = tmp_path / "like.npz"
    r = run_cli("trace", "synth", "--like", ESFT, "--task", "law", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)  # nothing but JSON on stdout
    figures = {f["name"]: f for f in data["calibration"]["figures"]}
    assert abs(figures["lru_hit_rate@12"]["error"]) <= 0.03
    assert abs(figures["next_layer_recall"]["error"]) <= 0.05
    t = load_trace(out)
    assert t.num_tokens == data["tokens"] >= 8000 and t.layer_map == tuple(range(1, 27))
    assert t.meta["num_shared_experts"] == 2  # from the ESFT importer's meta


@needs_esft
def test_cli_synth_like_rejects_a_shape(run_cli, tmp_path):
    r = run_cli("trace", "synth", "--like", ESFT, "--task", "law", "--layers", "4", "--out", tmp_path / "x.npz")
    assert r.exit_code == 1 and "--layers" in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_synth_like_an_aggregate_needs_top_k(run_cli, tmp_path):
    src = tmp_path / "counts.json"
    src.write_text(json.dumps({"expert_counts": [[5, 3, 1, 1], [2, 2, 2, 2]]}))
    r = run_cli("trace", "synth", "--like", src, "--out", tmp_path / "x.npz")
    assert r.exit_code == 1 and "--top-k" in r.output
    r = run_cli("trace", "synth", "--like", src, "--top-k", "2", "--sequences", "4", "--out", tmp_path / "x.npz")
    assert r.exit_code == 0, r.output
    assert "no token order" in r.output and load_trace(tmp_path / "x.npz").top_k == 2
    assert "static_hit_rate@4" in r.output and "target" in r.output and "achieved" in r.output  # the table
