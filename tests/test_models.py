"""Model specs: HF config.json per architecture, presets against published counts, bytes, KV, errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from profiles.errors import InputError
from profiles.formats import FORMATS, bits_per_weight
from profiles.hardware import load_profile
from profiles.hf_config import ARCHITECTURES, spec_from_config, supported_architectures
from profiles.models import ModelSpec, ZeroExperts, bundled_models, describe_model, load_model, memory_fit

CONFIGS = Path(__file__).parent / "data" / "configs"

REQUIRED_PRESETS = {"mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v2-lite",
                    "deepseek-v3", "olmoe-1b-7b", "gpt-oss-20b", "gpt-oss-120b", "phi-3.5-moe"}

# Exact totals, checked once against transformers 5.23 by building each model on the meta device
# and counting its parameters (not part of the test run: no torch here). DeepSeek-V3 is 14,848
# above transformers' count: 58 layers x 256 `e_score_correction_bias` values, stored in the
# checkpoint but held as buffers by transformers.
PRESET_TOTAL_PARAMS = {
    "deepseek-v2-lite": 15_706_484_224, "deepseek-v3": 671_026_419_200, "gpt-oss-120b": 116_829_156_672,
    "gpt-oss-20b": 20_914_757_184, "mixtral-8x22b": 140_620_634_112, "mixtral-8x7b": 46_702_792_704,
    "olmoe-1b-7b": 6_919_161_856, "phi-3.5-moe": 41_873_153_344, "qwen3-235b-a22b": 235_093_634_560,
    "qwen3-30b-a3b": 30_532_122_624,
}

# Publishers that print too few digits for 1%: each preset's `note` says why (see its YAML).
WIDER_TOLERANCE = {"qwen3-30b-a3b": 0.02, "deepseek-v2-lite": 0.025, "olmoe-1b-7b": 0.015}


# --------------------------------------------------------------------------- presets


def test_required_presets_are_bundled_and_cite_a_source():
    assert REQUIRED_PRESETS <= set(bundled_models())
    for name, path in bundled_models().items():
        text = path.read_text()
        assert text.startswith("# "), f"{name}: start with a comment citing the source"
        assert "huggingface.co" in text and "config.json" in text
        spec = load_model(name)
        assert spec.name == name and spec.published is not None and spec.published.source


@pytest.mark.parametrize("name", sorted(PRESET_TOTAL_PARAMS))
def test_preset_counts_match_published_in_the_publishers_convention(name):
    spec = load_model(name)
    pub = spec.published
    assert spec.total_params == PRESET_TOTAL_PARAMS[name]
    assert pub.tolerance == WIDER_TOLERANCE.get(name, 0.01)
    assert spec.total_params == pytest.approx(pub.total_params, rel=pub.tolerance)
    active = spec.active_params(include_input_embedding=pub.active_counts_input_embedding)
    assert active == pytest.approx(pub.active_params, rel=pub.tolerance)
    if pub.non_embedding_params:
        non_embedding = spec.total_params - spec.embedding_params - spec.lm_head_params
        assert non_embedding == pytest.approx(pub.non_embedding_params, rel=0.01)


@pytest.mark.parametrize("name, total, active, counts_input_embedding", [
    ("mixtral-8x7b", 46.7e9, 12.9e9, True),
    ("mixtral-8x22b", 141e9, 39e9, True),
    ("deepseek-v3", 671e9, 36.6e9, False),   # README_WEIGHTS.md: 36.6B incl. the output head
    ("qwen3-235b-a22b", 235e9, 22e9, True),
    ("gpt-oss-120b", 116.83e9, 5.13e9, False),
    ("gpt-oss-20b", 20.91e9, 3.61e9, False),
    ("phi-3.5-moe", 41.9e9, 6.6e9, True),
])
def test_headline_figures_within_one_percent(name, total, active, counts_input_embedding):
    spec = load_model(name)
    assert spec.total_params == pytest.approx(total, rel=0.01)
    assert spec.active_params(include_input_embedding=counts_input_embedding) == pytest.approx(active, rel=0.01)


def test_the_embedding_convention_matters_and_is_the_publishers():
    # gpt-oss-120b: 5.13B counts the unembedding, not the embedding; with both it would be 5.71B
    oss = load_model("gpt-oss-120b")
    assert oss.active_params(False) == 5_132_849_472
    assert oss.active_params(True) - oss.active_params(False) == 201088 * 2880
    # Mixtral-8x7B: 12.9B counts both tables; without the input embedding it is 12.75B (-1.2%)
    mixtral = load_model("mixtral-8x7b")
    assert mixtral.active_params(True) == 12_879_925_248
    assert abs(mixtral.active_params(False) / 12.9e9 - 1) > 0.01


def test_mixtral_8x7b_hand_worked():
    spec = load_model("mixtral-8x7b")
    per_expert = 3 * 4096 * 14336                      # gate, up, down
    assert spec.params_per_expert == per_expert == 176_160_768
    assert spec.expert_flops_per_token == 2 * per_expert
    assert spec.expert_bytes("bf16") == per_expert * 2
    assert spec.expert_bytes("int4") == pytest.approx(per_expert * (4 + 20 / 128) / 8)
    attention = 4096 * 4096 * 2 + 2 * 4096 * 1024      # q, o + k, v (8 KV heads x 128)
    assert spec.attention_params == 32 * attention
    assert spec.dense_params == 2 * 32000 * 4096 + 32 * attention + 32 * 8 * 4096 + (2 * 32 + 1) * 4096
    assert spec.kv_bytes_per_token("bf16") == 32 * 2 * 8 * 128 * 2  # 128 KiB
    assert spec.kv_cache_bytes(4096, batch_size=2) == 2 * 4096 * 32 * 2 * 8 * 128 * 2
    assert spec.moe_layer_indices == tuple(range(32)) and spec.num_shared_experts == 0


def test_deepseek_v3_shape_mla_groups_shared_and_dense_layers():
    spec = load_model("deepseek-v3")
    assert spec.architecture == "DeepseekV3ForCausalLM" and spec.attention == "mla"
    assert spec.moe_layer_indices == tuple(range(3, 61))  # first_k_dense_replace = 3
    assert (spec.num_experts, spec.top_k, spec.n_group, spec.topk_group) == (256, 8, 8, 4)
    assert (spec.num_shared_experts, spec.shared_expert_intermediate_size) == (1, 2048)
    assert spec.dense_mlp_params == 3 * 3 * 7168 * 18432
    assert spec.shared_expert_params == 58 * 3 * 7168 * 2048
    # MLA caches the compressed latent and the shared RoPE key: (512 + 64) per layer
    assert spec.kv_bytes_per_token("bf16") == 61 * (512 + 64) * 2 == 70_272
    assert any("MTP" in note for note in spec.notes)


def test_deepseek_v2_lite_has_no_query_compression_and_two_shared_experts():
    spec = load_model("deepseek-v2-lite")
    assert spec.q_lora_rank == 0 and spec.kv_lora_rank == 512
    assert spec.moe_layer_indices == tuple(range(1, 27))
    assert spec.num_shared_experts == 2 and spec.n_group == 1
    assert spec.kv_bytes_per_token() == 27 * 576 * 2


def test_gpt_oss_sliding_layers_alternate_and_cap_the_kv_cache():
    spec = load_model("gpt-oss-120b")
    assert spec.attention_window_tokens == (128, None) * 18
    per_layer_token = 2 * 8 * 64 * 2  # K and V, 8 KV heads of 64, bf16
    assert spec.kv_bytes_per_token() == 36 * per_layer_token
    assert spec.kv_cache_bytes(100) == 36 * 100 * per_layer_token  # inside the window: all layers grow
    assert spec.kv_cache_bytes(4096) == (18 * 128 + 18 * 4096) * per_layer_token
    assert spec.expert_bias_params == 2 * 2880 + 2880
    assert any("alternate" in note for note in spec.notes)


def test_bytes_in_every_format_include_group_overhead():
    spec = load_model("qwen3-30b-a3b")
    for name in FORMATS:
        bits = bits_per_weight(name)
        assert spec.expert_bytes(name) == pytest.approx(spec.params_per_expert * bits / 8)
        assert spec.experts_bytes(name) == pytest.approx(spec.expert_bytes(name) * 48 * 128)
        assert spec.dense_bytes(name) == pytest.approx(spec.dense_params * bits / 8)
        assert spec.weight_bytes(name) == pytest.approx(spec.dense_bytes(name) + spec.experts_bytes(name))
    assert spec.expert_bytes("int4") > spec.params_per_expert * 4 / 8  # scales and zeros cost bytes
    with pytest.raises(InputError, match="unknown number format"):
        spec.expert_bytes("int5")


# --------------------------------------------------------------------------- architectures (tiny configs)

# directory -> (architecture, exact total params, MoE layers, shared experts, attention kind)
# Totals were checked against transformers on the meta device, like the presets; LongCat-Flash
# is 32,768 below it because transformers also allocates gate_up_proj rows for the 4 identity
# experts (unused by its forward), which hold no weights in the model.
TINY = {
    "mixtral": ("MixtralForCausalLM", 657_984, (0, 1, 2, 3), 0, "gqa"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", 299_648, (1, 2, 3), 1, "gqa"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", 330_560, (1, 3), 0, "gqa"),
    "olmoe": ("OlmoeForCausalLM", 215_360, (0, 1, 2), 0, "gqa"),
    "deepseek_v2": ("DeepseekV2ForCausalLM", 222_240, (1, 2), 2, "mla"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", 487_552, (2, 3, 4), 1, "mla"),
    "phimoe": ("PhimoeForCausalLM", 116_610, (0, 1), 0, "gqa"),
    "gpt_oss": ("GptOssForCausalLM", 240_288, (0, 1, 2, 3), 0, "gqa"),
    "granitemoe": ("GraniteMoeForCausalLM", 138_624, (0, 1, 2), 0, "gqa"),
    "granitemoeshared": ("GraniteMoeSharedForCausalLM", 184_704, (0, 1, 2), 1, "gqa"),
    "dbrx": ("DbrxForCausalLM", 115_520, (0, 1), 0, "gqa"),
    "jamba": ("JambaForCausalLM", 589_240, (1, 3, 5, 7), 0, "gqa"),
    "llama4": ("Llama4ForConditionalGeneration", 177_216, (1, 3), 1, "gqa"),
    "longcat_flash": ("LongcatFlashForCausalLM", 264_600, (0, 1), 0, "mla"),
    "glm4_moe": ("Glm4MoeForCausalLM", 413_936, (1, 2, 3), 1, "gqa"),  # with e_score_correction_bias (a buffer)
}


def test_every_supported_architecture_has_a_tiny_config():
    assert {TINY[d][0] for d in TINY} | {"Llama4ForCausalLM"} == set(supported_architectures())
    assert {p.name for p in CONFIGS.iterdir() if p.is_dir()} == set(TINY)


@pytest.mark.parametrize("directory", sorted(TINY))
def test_tiny_config_from_directory_and_from_file(directory):
    arch, total, moe_layers, shared, attention = TINY[directory]
    spec = load_model(CONFIGS / directory)
    assert (spec.architecture, spec.total_params, spec.moe_layer_indices) == (arch, total, moe_layers)
    assert (spec.num_shared_experts, spec.attention, spec.name) == (shared, attention, directory)
    assert load_model(CONFIGS / directory / "config.json") == spec
    assert spec.total_params == spec.dense_params + spec.num_moe_layers * spec.num_experts * spec.params_per_expert
    assert spec.active_params() < spec.total_params


def test_tiny_mixtral_counted_by_hand():
    # H=64, I=96, 4 layers, 8 experts, heads 4 x 16, 2 KV heads, V=128, untied
    spec = load_model(CONFIGS / "mixtral")
    attention = 64 * 64 + 2 * 64 * 32 + 64 * 64
    layer = attention + 8 * 3 * 64 * 96 + 8 * 64 + 2 * 64
    assert spec.total_params == 2 * 128 * 64 + 4 * layer + 64
    assert spec.active_params() == 2 * 128 * 64 + 4 * (layer - 6 * 3 * 64 * 96) + 64


def test_qwen2_moe_shared_expert_has_its_own_width_and_gate():
    spec = load_model(CONFIGS / "qwen2_moe")
    assert (spec.shared_expert_intermediate_size, spec.expert_intermediate_size) == (128, 32)
    assert spec.shared_expert_params == 3 * (3 * 64 * 128 + 64)   # 3 MoE layers, gate Linear(H, 1)
    assert spec.dense_mlp_params == 3 * 64 * 160                   # layer 0 is in mlp_only_layers


def test_jamba_moe_every_other_layer_and_mamba_state():
    spec = load_model(CONFIGS / "jamba")
    assert spec.moe_layer_indices == (1, 3, 5, 7)
    assert spec.attention_layer_indices == (2, 6)
    assert spec.mamba_layer_indices == (0, 1, 3, 4, 5, 7)
    d_inner = 2 * 64
    assert spec.mamba_state_elements_per_layer == d_inner * (4 + 8)  # conv + SSM state
    assert spec.kv_bytes_per_token() == 2 * 2 * 2 * 16 * 2         # only the 2 attention layers
    state = 6 * d_inner * 12 * 2
    assert spec.mamba_state_bytes() == state
    assert spec.kv_cache_bytes(10, batch_size=3) == 3 * (10 * 2 * 2 * 2 * 16 * 2 + state)
    assert spec.dense_mlp_params == 4 * 3 * 64 * 96


def test_llama4_interleaved_moe_shared_expert_and_chunked_attention():
    spec = load_model(CONFIGS / "llama4")
    assert spec.moe_layer_indices == (1, 3)                      # interleave_moe_layer_step 2
    assert spec.num_shared_experts == 1 and spec.top_k == 1
    assert spec.dense_mlp_params == 2 * 3 * 64 * 128              # intermediate_size_mlp
    assert spec.attention_window_tokens == (32, 32, 32, None)     # NoPE layer 3 is global
    assert spec.kv_cache_bytes(100) == (3 * 32 + 100) * 2 * 2 * 16 * 2
    assert any("vision" in note for note in spec.notes)


def test_deepseek_v3_tiny_counts_score_correction_bias_and_groups():
    spec = load_model(CONFIGS / "deepseek_v3")
    assert (spec.n_group, spec.topk_group) == (4, 2)
    assert spec.router_params == 3 * (16 * 64 + 16)
    assert spec.q_lora_rank == 48


# --------------------------------------------------------------------------- zero-computation experts


def test_longcat_flash_identity_experts_are_copy_experts_with_no_bytes():
    spec = load_model(CONFIGS / "longcat_flash")
    assert spec.zero_experts == ZeroExperts(copy=4) and spec.num_router_choices == 12
    assert spec.experts_bytes() == 2 * 8 * spec.expert_bytes()   # 8 real experts x 2 layers, nothing for zero ones
    assert spec.attention_layer_indices == (0, 0, 1, 1)          # two attention sublayers per layer
    assert spec.kv_bytes_per_token() == 4 * (32 + 8) * 2


def test_longcat_flash_published_dimensions():
    # LongCat-Flash technical report (arXiv:2509.01322) and meituan-longcat/LongCat-Flash-Chat
    # config.json: 560B total; 18.6B-31.3B activated per token, about 27B on average.
    config = dict(architectures=["LongcatFlashForCausalLM"], hidden_size=6144, ffn_hidden_size=12288,
                  expert_ffn_hidden_size=2048, num_layers=28, num_attention_heads=64, kv_lora_rank=512,
                  q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=512,
                  zero_expert_num=256, zero_expert_type="identity", moe_topk=12, vocab_size=131072)
    spec = spec_from_config(config, name="longcat-flash")
    assert spec.total_params == pytest.approx(560e9, rel=0.01)
    assert spec.active_params(include_input_embedding=False) == pytest.approx(31.3e9, rel=0.01)  # no zero expert picked
    assert spec.active_params(False, real_experts_per_token=8) == pytest.approx(27e9, rel=0.01)


def test_zero_experts_take_no_bytes_and_no_flops_but_count_as_router_choices():
    base = load_model("mixtral-8x7b")
    moepp = dataclasses.replace(base, zero_experts=ZeroExperts(null=1, copy=1, constant=2))
    assert moepp.num_router_choices == 12 and moepp.zero_experts.count == 4
    assert moepp.total_params == base.total_params and moepp.experts_bytes("int4") == base.experts_bytes("int4")
    assert moepp.expert_flops_per_token == base.expert_flops_per_token
    assert moepp.summary()["zero_experts"] == {"null": 1, "copy": 1, "constant": 2}
    with pytest.raises(InputError, match="top_k"):
        dataclasses.replace(base, top_k=9)
    assert dataclasses.replace(moepp, top_k=12).top_k == 12  # 8 real + 4 zero choices
    with pytest.raises(InputError, match="non-negative"):
        ZeroExperts(null=-1)


def test_preset_file_may_declare_zero_experts(tmp_path):
    text = (bundled_models()["mixtral-8x7b"]).read_text().replace("name: mixtral-8x7b", "name: mixtral-moepp")
    text = text.replace("\nconfig:\n", "\nzero_experts: {null: 1, copy: 1, constant: 2}\nconfig:\n")
    path = tmp_path / "mixtral-moepp.yaml"
    path.write_text(text)
    spec = load_model(path)
    assert spec.zero_experts == ZeroExperts(1, 1, 2) and spec.name == "mixtral-moepp"


# --------------------------------------------------------------------------- bad inputs


def _write(tmp_path: Path, config: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def _mixtral_tiny() -> dict:
    return json.loads((CONFIGS / "mixtral" / "config.json").read_text())


def _one_line(exc: InputError) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_missing_file_and_directory_without_config(tmp_path):
    with pytest.raises(InputError) as e:
        load_model(tmp_path / "nope" / "config.json")
    assert "file not found" in _one_line(e.value)
    with pytest.raises(InputError) as e:
        load_model(tmp_path)
    assert "holds no config.json" in _one_line(e.value) and str(tmp_path) in str(e.value)


def test_unknown_name_lists_the_presets():
    with pytest.raises(InputError) as e:
        load_model("mixtral-9x9b")
    assert "mixtral-8x7b" in _one_line(e.value) and "planner models list" in str(e.value)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "hidden_size": 64,\n}\n')
    with pytest.raises(InputError) as e:
        load_model(path)
    assert f"{path}:3" in _one_line(e.value) and "malformed JSON" in str(e.value)


def test_unknown_architecture_lists_supported_ones_and_needed_fields(tmp_path):
    path = _write(tmp_path, {"architectures": ["NovelMoeForCausalLM"], "model_type": "novel_moe"})
    with pytest.raises(InputError) as e:
        load_model(path)
    line = _one_line(e.value)
    assert "'NovelMoeForCausalLM'" in line and "architectures" in line
    for arch in ARCHITECTURES:
        assert arch in line
    for needed in ("num_hidden_layers", "hidden_size", "num_experts_per_tok", "vocab_size"):
        assert needed in line


def test_model_type_alone_selects_the_architecture(tmp_path):
    config = _mixtral_tiny()
    del config["architectures"]
    assert load_model(_write(tmp_path, config)).architecture == "MixtralForCausalLM"
    with pytest.raises(InputError, match="names no architecture"):
        load_model(_write(tmp_path, {"hidden_size": 64}))


@pytest.mark.parametrize("change, needles", [
    ({"intermediate_size": None}, ("intermediate_size", "required field for MixtralForCausalLM is missing")),
    ({"hidden_size": 0}, ("hidden_size", "must be positive", "got 0")),
    ({"num_local_experts": -8}, ("num_local_experts", "must be positive", "got -8")),
    ({"num_experts_per_tok": 9}, ("num_experts_per_tok", "top-k is larger", "got 9", "at most 8")),
    ({"vocab_size": "big"}, ("vocab_size", "must be an integer", "'big'")),
    ({"tie_word_embeddings": "no"}, ("tie_word_embeddings", "true or false")),
    ({"num_key_value_heads": 3}, ("num_key_value_heads", "multiple")),
])
def test_bad_field_gives_one_line_with_file_key_value_and_fix(tmp_path, change, needles):
    config = _mixtral_tiny()
    for key, value in change.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    path = _write(tmp_path, config)
    with pytest.raises(InputError) as e:
        load_model(path)
    line = _one_line(e.value)
    assert line.startswith(str(path)) and "Fix:" in line
    for needle in needles:
        assert needle in line


def test_deepseek_group_and_nested_field_errors(tmp_path):
    config = json.loads((CONFIGS / "deepseek_v3" / "config.json").read_text())
    with pytest.raises(InputError, match="n_group"):
        load_model(_write(tmp_path, config | {"n_group": 3}))
    with pytest.raises(InputError, match="topk_group"):
        load_model(_write(tmp_path, config | {"topk_group": 5}))  # more groups per token than groups
    dbrx = json.loads((CONFIGS / "dbrx" / "config.json").read_text())
    del dbrx["ffn_config"]["moe_top_k"]
    with pytest.raises(InputError) as e:
        load_model(_write(tmp_path, dbrx))
    assert "ffn_config.moe_top_k" in _one_line(e.value) and "DbrxForCausalLM" in str(e.value)


def test_preset_errors_name_the_yaml_line(tmp_path):
    text = bundled_models()["olmoe-1b-7b"].read_text()
    path = tmp_path / "olmoe.yaml"
    path.write_text(text.replace("  num_experts: 64\n", "  num_experts: 0\n"))
    with pytest.raises(InputError) as e:
        load_model(path)
    line_no = text.splitlines().index("  num_experts: 64") + 1
    assert f"{path}:{line_no}: config.num_experts: must be positive" in _one_line(e.value)
    path.write_text(text.replace("name: olmoe-1b-7b", "name: olmoe-1b-7b\nlicence: apache"))
    with pytest.raises(InputError, match="licence: unknown key"):
        load_model(path)
    mixtral = bundled_models()["mixtral-8x7b"].read_text()
    path.write_text(mixtral.replace("  active_counts_input_embedding: true\n",
                                    "  active_counts_input_embedding: true\n  tolerance: 0.03\n"))
    with pytest.raises(InputError, match="published.tolerance: a tolerance above 1% needs a note"):
        load_model(path)


# --------------------------------------------------------------------------- memory fit


def test_memory_fit_adds_weights_and_kv_and_reports_the_shortfall():
    spec = load_model("mixtral-8x7b")
    pools = [SimpleNamespace(id="gpu", tier="hbm", capacity_bytes=24 * 2**30),
             SimpleNamespace(id="cpu", tier="dram", capacity_bytes=64 * 2**30)]
    rows = {(r.memory, r.format): r for r in memory_fit(spec, pools, context_tokens=4096, formats=["bf16", "int4"])}
    assert len(rows) == 4
    kv = spec.kv_cache_bytes(4096)
    gpu_bf16 = rows[("gpu", "bf16")]
    assert gpu_bf16.needed_bytes == spec.weight_bytes("bf16") + kv and not gpu_bf16.fits
    assert gpu_bf16.free_bytes == 24 * 2**30 - gpu_bf16.needed_bytes < 0
    assert rows[("cpu", "int4")].fits and rows[("gpu", "int4")].fits  # 22.6 GiB at int4 + 0.5 GiB KV
    assert 0 < rows[("gpu", "int4")].free_bytes < 2**30


def test_describe_with_a_real_profile_covers_every_pool_and_format():
    _, hw = load_profile("desktop-4090")
    data = describe_model(load_model("gpt-oss-20b"), context_tokens=8192, memories=hw.memories.values())
    assert len(data["fit"]) == len(hw.memories) * len(FORMATS)
    fit = {(r["memory"], r["format"]): r["fits"] for r in data["fit"]}
    assert fit[("node/gpu0", "mxfp4")] and not fit[("node/gpu0", "bf16")]
    assert data["kv_cache"]["context_tokens"] == 8192
    assert [r["format"] for r in data["bytes_by_format"]] == list(FORMATS)
    with pytest.raises(InputError, match="batch size"):
        describe_model(load_model("gpt-oss-20b"), batch_size=0)


def test_model_modules_do_not_import_torch():
    code = "import sys, profiles.models, profiles.hf_config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


def test_spec_is_frozen_and_hashable_parts_are_tuples():
    spec = load_model("olmoe-1b-7b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.top_k = 4  # type: ignore[misc]
    assert isinstance(spec, ModelSpec) and isinstance(spec.moe_layer_indices, tuple)


def test_qwen3_moe_config_saved_by_transformers_5(tmp_path):
    """transformers 5 saves Qwen3-MoE's expert count as num_local_experts; the Hub has num_experts."""
    config = json.loads((CONFIGS / "qwen3_moe" / "config.json").read_text())
    config["num_local_experts"] = config.pop("num_experts")
    assert load_model(_write(tmp_path, config)).num_experts == config["num_local_experts"]


def test_glm_4_5_counts_as_published(tmp_path):
    """GLM-4.5's config.json (zai-org/GLM-4.5): 355B total, 32B active as Z.ai counts them (MTP
    layer excluded here; its ~5B make the published 355B with the 92 decoder layers)."""
    config = dict(architectures=["Glm4MoeForCausalLM"], model_type="glm4_moe", hidden_size=5120,
                  intermediate_size=12288, moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=1,
                  num_experts_per_tok=8, first_k_dense_replace=3, num_hidden_layers=92, num_nextn_predict_layers=1,
                  num_attention_heads=96, num_key_value_heads=8, head_dim=128, n_group=1, topk_group=1,
                  partial_rotary_factor=0.5, use_qk_norm=False, attention_bias=True, vocab_size=151552,
                  tie_word_embeddings=False)
    spec = load_model(_write(tmp_path, config))
    assert spec.architecture == "Glm4MoeForCausalLM" and spec.num_moe_layers == 89 and spec.num_experts == 160
    assert 345e9 < spec.total_params < 356e9
    assert 31e9 < spec.active_params() < 34e9


def test_tied_embeddings_active_with_and_without_the_table(tmp_path):
    """Granite-3.0-3B-A800M (ibm-granite config.json): 3.3B total; "A800M" counts neither the
    embedding lookup nor the tied head (with them it is 10% over)."""
    config = dict(architectures=["GraniteMoeForCausalLM"], model_type="granitemoe", hidden_size=1536,
                  num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8, intermediate_size=512,
                  num_local_experts=40, num_experts_per_tok=8, vocab_size=49155, tie_word_embeddings=True)
    spec = load_model(_write(tmp_path, config))
    assert spec.total_params == pytest.approx(3.3e9, rel=0.01)
    assert spec.active_params(include_input_embedding=False) == pytest.approx(800e6, rel=0.015)
    assert spec.active_params() - spec.active_params(include_input_embedding=False) == spec.embedding_params
