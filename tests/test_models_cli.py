"""`planner models list|show` through click's CliRunner: tables, --json, --hardware, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from profiles.formats import FORMATS
from profiles.hardware import load_profile
from profiles.models import bundled_models, load_model

CONFIGS = Path(__file__).parent / "data" / "configs"


def _json(result) -> object:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # nothing but JSON on stdout


def test_list_table_names_every_preset(run_cli):
    result = run_cli("models", "list")
    assert result.exit_code == 0, result.output
    for name in bundled_models():
        assert name in result.stdout
    assert "46.70B" in result.stdout and "12.88B" in result.stdout  # Mixtral-8x7B total / active


@pytest.mark.parametrize("args", [("--json", "models", "list"), ("models", "list", "--json")])
def test_list_json(run_cli, args):
    rows = _json(run_cli(*args))
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(bundled_models())
    v3 = by_name["deepseek-v3"]
    spec = load_model("deepseek-v3")
    assert (v3["num_hidden_layers"], v3["num_moe_layers"], v3["num_experts"], v3["top_k"]) == (61, 58, 256, 8)
    assert v3["total_params"] == spec.total_params
    assert v3["active_params_without_input_embedding"] == spec.active_params(include_input_embedding=False)
    assert v3["published_active_params"] == 36.6e9 and v3["active_counts_input_embedding"] is False


def test_show_table_has_parameters_bytes_and_kv(run_cli):
    result = run_cli("models", "show", "mixtral-8x7b")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for needle in ("mixtral-8x7b", "Parameters", "Weights by number format", "int4", "46.70B",
                   "KV cache (bf16): 128 KiB per token", "published total / active"):
        assert needle in out, needle
    assert "Fits alone?" not in out  # no --hardware, no fit table


def test_show_json_fields(run_cli):
    data = _json(run_cli("models", "show", "deepseek-v3", "--json"))
    spec = load_model("deepseek-v3")
    assert data["total_params"] == spec.total_params and data["attention"] == "mla"
    assert data["moe_layer_indices"] == list(range(3, 61))
    assert (data["n_group"], data["topk_group"], data["num_shared_experts"]) == (8, 4, 1)
    assert data["active_params_as_published"] == spec.active_params(include_input_embedding=False)
    formats = {r["format"]: r for r in data["bytes_by_format"]}
    assert list(formats) == list(FORMATS)
    assert formats["bf16"]["expert_bytes"] == spec.expert_bytes("bf16") == 3 * 7168 * 2048 * 2
    assert formats["int4"]["dense_bytes"] == pytest.approx(spec.dense_bytes("int4"))
    assert data["kv_cache"] == {"format": "bf16", "bytes_per_token": 70272.0, "context_tokens": 4096, "batch_size": 1,
                                "bytes": 70272.0 * 4096, "mamba_state_bytes_per_sequence": 0.0}
    assert data["hardware"] is None and "fit" not in data


def test_show_with_hardware_checks_every_pool_and_format(run_cli):
    data = _json(run_cli("--json", "models", "show", "mixtral-8x7b", "--hardware", "desktop-4090",
                         "--context", "8192", "--batch", "2"))
    _, hw = load_profile("desktop-4090")
    assert len(data["fit"]) == len(hw.memories) * len(FORMATS)
    rows = {(r["memory"], r["format"]): r for r in data["fit"]}
    kv = load_model("mixtral-8x7b").kv_cache_bytes(8192, batch_size=2)
    assert rows[("node/gpu0", "bf16")]["kv_bytes"] == kv == data["kv_cache"]["bytes"]
    assert not rows[("node/gpu0", "bf16")]["fits"] and rows[("node/cpu0", "int8")]["fits"]
    assert rows[("node/gpu0", "bf16")]["free_bytes"] < 0  # the shortfall, in bytes
    assert {r["tier"] for r in data["fit"]} == {m.tier for m in hw.memories.values()}


def test_show_with_hardware_table(run_cli):
    result = run_cli("models", "show", "gpt-oss-20b", "--hardware", "desktop-4090")
    assert result.exit_code == 0, result.output
    assert "Fits alone?" in result.stdout and "node/gpu0" in result.stdout and "short" in result.stdout
    assert "alternate" in result.stdout  # the sliding-window note


def test_context_option_scales_the_kv_cache(run_cli):
    small = _json(run_cli("--json", "models", "show", "qwen3-30b-a3b", "--context", "1024"))
    large = _json(run_cli("--json", "models", "show", "qwen3-30b-a3b", "--context", "8192"))
    assert large["kv_cache"]["bytes"] == 8 * small["kv_cache"]["bytes"]


@pytest.mark.parametrize("directory", ["jamba", "llama4", "longcat_flash", "qwen2_moe"])
def test_show_config_directory(run_cli, directory):
    data = _json(run_cli("--json", "models", "show", CONFIGS / directory))
    assert data["name"] == directory and data["total_params"] == load_model(CONFIGS / directory).total_params
    human = run_cli("models", "show", CONFIGS / directory / "config.json")
    assert human.exit_code == 0 and directory in human.stdout


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path | str, tuple[str, ...]]]:
    tiny = json.loads((CONFIGS / "mixtral" / "config.json").read_text())

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    def config(name: str, **change) -> Path:
        data = dict(tiny)
        for key, value in change.items():
            if value is None:
                data.pop(key)
            else:
                data[key] = value
        return write(name, json.dumps(data, indent=2))

    empty = tmp_path / "empty_dir"
    empty.mkdir()
    return {
        "missing file": (tmp_path / "nope" / "config.json", ("file not found",)),
        "unknown name": ("mixtral-9x9b", ("unknown model", "mixtral-8x7b")),
        "no config.json": (empty, ("holds no config.json",)),
        "malformed JSON": (write("broken.json", '{"hidden_size": 64,,}'), ("broken.json:1", "malformed JSON")),
        "unknown architecture": (config("novel.json", architectures=["NovelMoeForCausalLM"], model_type="novel"),
                                 ("'NovelMoeForCausalLM'", "MixtralForCausalLM", "DeepseekV3ForCausalLM",
                                  "num_experts_per_tok")),
        "missing field": (config("missing.json", num_local_experts=None),
                          ("num_local_experts", "required field for MixtralForCausalLM is missing")),
        "non-positive": (config("zero.json", intermediate_size=0), ("intermediate_size", "must be positive", "got 0")),
        "top-k > experts": (config("topk.json", num_experts_per_tok=12),
                            ("num_experts_per_tok", "top-k is larger", "got 12")),
    }


@pytest.mark.parametrize("case", ["missing file", "unknown name", "no config.json", "malformed JSON",
                                  "unknown architecture", "missing field", "non-positive", "top-k > experts"])
def test_bad_input_is_one_error_line_and_exit_1(run_cli, tmp_path, case):
    target, needles = _bad_files(tmp_path)[case]
    for args in (("models", "show", target), ("--json", "models", "show", target)):
        result = run_cli(*args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output + result.stderr
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        for needle in needles:
            assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
        if isinstance(target, Path):
            assert str(target) in lines[0]


def test_bad_hardware_and_usage_errors(run_cli):
    result = run_cli("models", "show", "mixtral-8x7b", "--hardware", "no-such-profile")
    assert result.exit_code == 1 and result.stderr.startswith("error: unknown hardware profile")
    assert run_cli("models", "show").exit_code == 2                              # missing MODEL
    assert run_cli("models", "show", "mixtral-8x7b", "--context", "-1").exit_code == 1      # a bad value
    assert run_cli("models", "show", "mixtral-8x7b", "--kv-format", "int5").exit_code == 1
