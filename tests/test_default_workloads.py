"""Default workloads: one per bundled model preset, from calibrated knob files with their
provenance; quick, deterministic and shaped like the model.

Legend: T = tokens, L = MoE layers, E = router choices, K = top-k.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from profiles.errors import InputError
from profiles.models import ZeroExperts, bundled_models, load_model
from profiles.workload import defaults as defaults_mod
from profiles.workload.defaults import (
    DEFAULT_TOKENS,
    DEFAULTS_DIR,
    default_knobs,
    default_workload,
    defaults_for,
    load_defaults,
)
from profiles.workload.hitrate import lru_curve
from profiles.workload.stats import next_layer_predictability
from profiles.workload.synthetic import DEFAULT_AFFINITY, DEFAULT_SKEW, DEFAULT_TEMPORAL
from profiles.workload.trace import load_trace

LICENCES = {"github.com/deepseek-ai/ESFT": "MIT", "github.com/allenai/OLMoE": "Apache-2.0",
            "github.com/efeslab/fiddler": "Apache-2.0", "github.com/ajtejankar/mixtral-vis-moe": "Apache-2.0"}


_BY_NAME: dict = {}


def _default_by_name(name: str):
    """default_workload(name), generated once in this module (deepseek-v3's takes seconds);
    tests that compare two generations still make the second one themselves."""
    if name not in _BY_NAME:
        _BY_NAME[name] = default_workload(name)
    return _BY_NAME[name]


@pytest.mark.parametrize("name", bundled_models())
def test_every_preset_has_a_default_workload_of_its_shape(name):
    spec = load_model(name)
    t = _default_by_name(name)
    assert t.expert_ids.shape == (t.num_tokens, spec.num_moe_layers, spec.top_k)
    assert DEFAULT_TOKENS <= t.num_tokens < DEFAULT_TOKENS + 64
    assert t.num_experts == spec.num_router_choices and t.layer_map == spec.moe_layer_indices
    assert t.model == name and t.meta["default_workload"]["file"] == f"{name}.json"
    assert t.meta["num_shared_experts"] == spec.num_shared_experts
    assert t.gate_weights is not None and (t.phase == 1).any() and (t.phase == 0).any()


@pytest.mark.parametrize("name", ["deepseek-v3", "mixtral-8x7b"])
def test_default_workloads_are_deterministic(name):
    a, b = _default_by_name(name), default_workload(load_model(name))
    assert np.array_equal(a.expert_ids, b.expert_ids) and np.array_equal(a.gate_weights, b.gate_weights)
    assert a.meta == b.meta
    c = default_workload(name, seed=1, tokens=256)
    assert c.num_tokens == 256 and not np.array_equal(c.expert_ids, a.expert_ids[:256])


@pytest.mark.parametrize("path", sorted(DEFAULTS_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_knob_files_carry_their_provenance(path):
    data = json.loads(path.read_text())
    d = load_defaults(path.stem)
    assert data["preset"] == path.stem and d.family
    assert 0 <= d.temporal <= 1 and 0 <= d.affinity <= 1 and d.prompt_tokens + d.output_tokens >= 1
    depths = [x for x, _ in d.skew_by_depth]
    assert depths[0] == 0.0 and depths[-1] == 1.0 and all(0 <= s <= 3 for _, s in d.skew_by_depth)
    prov = d.provenance
    assert prov["calibrated_from"] and prov["method"] and prov["notes"] and prov["calibration"]
    for source in prov["sources"]:
        assert source["licence"] == LICENCES[source["repository"]]
        assert source["commit"] and source["data"] and source["used_for"]
    assert prov["generated_by"] == "benchmarks/calibrate_defaults.py"


def test_every_preset_and_the_generic_file_exist():
    names = {p.stem for p in DEFAULTS_DIR.glob("*.json")}
    assert set(bundled_models()) | {"generic"} == names


def test_families_use_their_own_data():
    def repos(name):
        return {s["repository"] for s in load_defaults(name).provenance["sources"]}

    assert repos("deepseek-v3") == {"github.com/deepseek-ai/ESFT"}
    assert "github.com/allenai/OLMoE" in repos("olmoe-1b-7b")
    assert {"github.com/efeslab/fiddler", "github.com/ajtejankar/mixtral-vis-moe"} <= repos("mixtral-8x22b")
    for name in ("qwen3-30b-a3b", "gpt-oss-120b", "phi-3.5-moe"):
        assert repos(name) == {"github.com/deepseek-ai/ESFT"}
        assert any("no public routing data" in n for n in load_defaults(name).provenance["notes"])
    assert any("non-adjacent" in n for n in load_defaults("olmoe-1b-7b").provenance["notes"])
    assert any("τ is the ESFT" in n for n in load_defaults("mixtral-8x7b").provenance["notes"])


def test_code_defaults_are_the_esft_calibration():
    d = load_defaults("deepseek-v2-lite")
    assert (DEFAULT_TEMPORAL, DEFAULT_AFFINITY) == (d.temporal, d.affinity)
    assert DEFAULT_SKEW == pytest.approx(np.mean([s for _, s in d.skew_by_depth]), abs=0.01)


def test_deepseek_v2_lite_default_reproduces_the_esft_figures():
    """The default, generated at the source model's own shape, against the mean of the ESFT
    tasks recorded in its file (no ../shared needed)."""
    recorded = load_defaults("deepseek-v2-lite").provenance["calibration"]["averaged_knobs_vs_mean_of_tasks"]
    t = default_workload("deepseek-v2-lite", tokens=8192)
    lru = lru_curve(t.expert_ids, 64)[:, 12].mean()
    recall = next_layer_predictability(t.expert_ids, 64, seq_lens=t.seq_lens).recall.mean()
    assert abs(lru - recorded["lru_hit_rate@12"]["target"]) <= 0.03
    assert abs(recall - recorded["next_layer_recall"]["target"]) <= 0.05


def test_skew_is_scaled_over_depth():
    d = load_defaults("deepseek-v3")  # 26 source layers
    sigma = d.skew_for(58)
    assert len(sigma) == 58
    assert sigma[0] == pytest.approx(d.skew_by_depth[0][1]) and sigma[-1] == pytest.approx(d.skew_by_depth[-1][1])
    assert default_knobs("deepseek-v3").skew == sigma


def test_models_without_a_preset_file_use_their_family():
    mine = dataclasses.replace(load_model("mixtral-8x7b"), name="my-mixtral")
    assert defaults_for(mine).name == "mixtral-8x7b"
    odd = dataclasses.replace(load_model("mixtral-8x7b"), name="odd", architecture="DbrxForCausalLM")
    assert defaults_for(odd).name == "generic"
    t = default_workload(mine, tokens=64)
    assert t.model == "my-mixtral" and t.num_experts == 8


def test_zero_computation_experts_take_the_last_ids():
    spec = dataclasses.replace(load_model("olmoe-1b-7b"), name="olmoe-with-zero", zero_experts=ZeroExperts(null=1, copy=2))
    t = default_workload(spec, tokens=128)
    assert t.num_experts == 67
    assert t.meta["zero_experts"] == {"null": 1, "copy": 2, "constant": 0, "ids": [64, 66]}
    assert t.meta["num_zero_experts"] == 3
    assert (t.expert_ids >= 64).any()  # drawn like any other choice


def test_bad_requests_are_input_errors(tmp_path, monkeypatch):
    with pytest.raises(InputError):
        default_workload("no-such-model")
    with pytest.raises(InputError, match="token count"):
        default_workload("mixtral-8x7b", tokens=0)
    with pytest.raises(InputError, match="no default workload"):
        load_defaults("nothing")
    (tmp_path / "broken.json").write_text('{"knobs": {}}')
    monkeypatch.setattr(defaults_mod, "DEFAULTS_DIR", tmp_path)
    with pytest.raises(InputError, match="malformed") as err:
        load_defaults("broken")
    assert "\n" not in str(err.value)


def test_cli_synth_model_prints_the_provenance(run_cli, tmp_path):
    out = tmp_path / "olmoe.npz"
    r = run_cli("trace", "synth", "--model", "olmoe-1b-7b", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["defaults"]["file"] == "olmoe-1b-7b.json" and data["defaults"]["sources"]
    assert data["tokens"] == DEFAULT_TOKENS and data["moe_layers"] == 16
    t = load_trace(out)
    assert np.array_equal(t.expert_ids, _default_by_name("olmoe-1b-7b").expert_ids)  # same knobs, same trace
    r = run_cli("trace", "synth", "--model", "olmoe-1b-7b", "--out", tmp_path / "o2.npz", "--sequences", "2",
                "--temporal", "0.5")
    assert r.exit_code == 0 and "default workload olmoe-1b-7b.json" in r.output and "temporal" in r.output
    assert load_trace(tmp_path / "o2.npz").num_tokens == 128
