"""The synthetic generator, its calibration to real routing, and the default workloads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from profiles.errors import InputError
from profiles.models import bundled_models, load_model
from profiles.workload.calibrate import calibrate, measure, zipf_skew
from profiles.workload.defaults import default_spec
from profiles.workload.stats import routing_entropy_bits, expert_frequency
from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import DECODE, PREFILL, save_trace

SMALL = SyntheticWorkload(num_layers=6, num_experts=16, top_k=2, num_sequences=24, prompt_tokens=30,
                          output_tokens=10, seed=5)


def test_same_knobs_same_bytes(tmp_path):
    a, b = save_trace(generate(SMALL), tmp_path / "a.npz"), save_trace(generate(SMALL), tmp_path / "b.npz")
    assert a.read_bytes() == b.read_bytes()
    assert generate(SMALL.with_(seed=6)).expert_ids.tobytes() != generate(SMALL).expert_ids.tobytes()


def test_shape_phases_and_distinct_experts():
    t = generate(SMALL)
    assert t.expert_ids.shape == (24 * 40, 6, 2) and t.seq_lens.tolist() == [40] * 24
    assert (t.phase.reshape(24, 40)[:, :30] == PREFILL).all() and (t.phase.reshape(24, 40)[:, 30:] == DECODE).all()
    assert (t.expert_ids[:, :, 0] != t.expert_ids[:, :, 1]).all()


@pytest.mark.parametrize("knob, values, stat, rising", [
    ("skew", (0.0, 0.8, 1.6), "entropy", False),
    ("temporal", (0.0, 0.4, 0.8), "overlap", True),
    ("affinity", (0.0, 0.5, 1.0), "predictability", True),
])
def test_each_knob_moves_its_statistic(knob, values, stat, rising):
    figures = []
    for v in values:
        t = generate(SMALL.with_(**{knob: v}))
        if stat == "entropy":
            figures.append(float(routing_entropy_bits(expert_frequency(t.expert_ids, 16)).mean()))
        else:
            figures.append(measure(t)[stat])
    assert figures == sorted(figures, reverse=not rising), figures


@pytest.mark.parametrize("change, key", [({"top_k": 20}, "top_k"), ({"temporal": 1.5}, "temporal"),
                                         ({"skew": -1.0}, "skew"), ({"num_sequences": 0}, "num_sequences")])
def test_bad_knobs_are_input_errors(change, key):
    with pytest.raises(InputError) as err:
        SMALL.with_(**change)
    assert err.value.key == key


def test_zipf_skew_recovers_the_exponent():
    ranks = np.arange(1, 65, dtype=float)
    assert zipf_skew(ranks ** -1.3) == pytest.approx(1.3, abs=0.01)
    assert zipf_skew(np.ones(64)) == pytest.approx(0.0, abs=0.01)


@pytest.fixture(scope="module")
def esft_calibration(request):
    from conftest import SHARED_TRACES
    from profiles.workload.importers import import_esft

    path = SHARED_TRACES / "esft-deepseek-v2-lite" / "routing_top6.npz"
    if not path.is_file():
        pytest.skip(f"real routing traces not found at {SHARED_TRACES} (../shared/traces beside the repo)")
    target = import_esft(path, "summary")
    return target, calibrate(target)


def test_calibrated_synthetic_matches_the_real_trace(esft_calibration):
    target, (w, report) = esft_calibration
    K = target.top_k
    assert report.target["lru_2k"] == pytest.approx(measure(target)["lru_2k"])
    assert abs(report.achieved["lru_2k"] - report.target["lru_2k"]) <= 0.03  # LRU at c = 2K
    assert abs(report.achieved["predictability"] - report.target["predictability"]) <= 0.05
    assert report.achieved["frequency_tv"] <= 0.15  # per-layer frequency distribution
    # a fresh trace from the fitted knobs, at the planner's default length, keeps the LRU figure
    fresh = generate(w.with_(num_sequences=60, prompt_tokens=40, output_tokens=0, seed=11))
    assert abs(measure(fresh)["lru_2k"] - report.target["lru_2k"]) <= 0.03
    assert fresh.top_k == K


def test_aggregate_calibration_says_what_it_cannot_match(shared_traces):
    from profiles.workload.importers import import_olmoe_counts

    agg = import_olmoe_counts(shared_traces / "olmoe-mixtral-counts" / "routing_counts.npz", "olmoe/arxiv")
    w, report = calibrate(agg, steps=1, rounds=1)
    assert w.num_layers == max(agg.layer_ids) + 1 and w.num_experts == 64
    assert any("no token order" in n for n in report.notes)


@pytest.mark.parametrize("name", sorted(bundled_models()))
def test_every_preset_has_a_deterministic_default_workload(name):
    model = load_model(name)
    spec = default_spec(model)
    a, b = generate(spec), generate(spec)
    assert a.expert_ids.shape[1:] == (model.num_moe_layers, model.top_k)
    assert a.num_experts == model.num_experts
    assert a.layer_map == tuple(model.moe_layer_indices)
    assert a.expert_ids.tobytes() == b.expert_ids.tobytes()
    assert "default workload" in a.meta["note"]


def test_default_files_name_their_source():
    from profiles.workload.defaults import DEFAULTS_DIR

    for path in DEFAULTS_DIR.glob("*.json"):
        data = json.loads(path.read_text())
        assert data["calibrated_from"] and "skew_by_depth" in data
        if data["family"] != "generic":
            assert "licence" in data["provenance"] or "Apache" in data["provenance"]


def test_synth_cli(run_cli, tmp_path):
    out = tmp_path / "t.npz"
    ok = run_cli("--json", "trace", "synth", "--model", "olmoe-1b-7b", "--sequences", "4", "--out", out)
    assert ok.exit_code == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["layers"] == 16 and data["experts"] == 64 and out.is_file()
    again = run_cli("trace", "synth", "--model", "olmoe-1b-7b", "--out", out)
    assert again.exit_code == 1 and "--force" in again.stderr
    shapeless = run_cli("trace", "synth", "--out", tmp_path / "x.npz")
    assert shapeless.exit_code == 1 and "--layers" in shapeless.stderr
    knobs = run_cli("trace", "synth", "--layers", "4", "--experts", "8", "--top-k", "2", "--temporal", "0.5",
                    "--out", tmp_path / "k.npz")
    assert knobs.exit_code == 0, knobs.stderr
