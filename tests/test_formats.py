"""Formats as data: GGUF types from the gguf package, llama.cpp mixes, user YAML formats,
default quantisation errors, and `planner formats list|show|validate`."""

from __future__ import annotations

import json

import pytest
from gguf.constants import GGML_QUANT_SIZES

import profiles.formats as formats_module
from planner.costs import QUANT_ERROR
from profiles.errors import InputError
from profiles.formats import (FORMATS, all_formats, bits_per_weight, default_quant_error, get_format, load_formats,
                              quant_error_for_bits)
from profiles.gguf_formats import MIXES, mix_bits_per_weight, mix_layer_bits, mix_layer_types

HQQ = """\
formats:
  - name: hqq3g64
    bits: 3
    group_size: 64
    scale_dtype: fp16
    zero_dtype: fp16
    kind: int
  - {name: hqq3g64-int8zero, bits: 3, group_size: 64, scale_dtype: fp16, zero_dtype: int8, quant_error: 0.1}
  - {name: hqq4-sym, bits: 4, group_size: 128, scale_dtype: bf16, zero_dtype: null}
"""


@pytest.fixture(autouse=True)
def _no_user_formats(monkeypatch):
    """Each test starts with no user formats and leaves none behind."""
    monkeypatch.setattr(formats_module, "_USER", {})


def _write(tmp_path, text: str, name: str = "formats.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- GGUF types


@pytest.mark.parametrize("name, bits", [("q4_k", 4.5), ("q8_0", 8.5), ("q6_k", 6.5625), ("iq4_nl", 4.5),
                                        ("q2_k", 2.625), ("q4_0", 4.5), ("iq4_xs", 4.25), ("iq2_xxs", 2.0625)])
def test_gguf_type_bits_are_exact(name, bits):
    fmt = get_format(name)
    assert fmt.bits_per_weight == bits and bits_per_weight(name) == bits
    assert fmt.source == "gguf"


def test_every_gguf_type_is_a_format_with_the_package_layout():
    for qtype, (block, nbytes) in GGML_QUANT_SIZES.items():
        fmt = get_format(qtype.name.lower())
        assert fmt.bits_per_weight == 8 * nbytes / block, qtype.name
    q4k = get_format("q4_k")
    assert (q4k.group_size, q4k.block_bytes, q4k.kind) == (256, 144, "int")


def test_gguf_float_types_are_the_builtin_formats():
    assert get_format("f16") is FORMATS["fp16"] and get_format("f32") is FORMATS["fp32"]
    for qtype, (block, nbytes) in GGML_QUANT_SIZES.items():
        name = qtype.name.lower()
        if name in FORMATS:  # bf16, mxfp4: one format, one layout
            assert FORMATS[name].bits_per_weight == 8 * nbytes / block, name
            assert name not in {n for n, f in all_formats().items() if f.source == "gguf"}


def test_builtin_formats_keep_their_numbers():
    assert {n: f.bits_per_weight for n, f in FORMATS.items()} == {
        "fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8 + 32 / 16384, "int8": 8.125, "int4": 4 + 20 / 128,
        "int3": 3 + 19 / 128, "int2": 2 + 18 / 64, "mxfp4": 4.25, "fp6": 6.25, "fp4": 4.25, "ternary": 1.6 + 16 / 256}


# --------------------------------------------------------------------------- llama.cpp mixes


def test_q4_k_m_for_mixtral_raises_ffn_down_on_the_use_more_bits_layers():
    layers = mix_layer_types("q4_k_m", 32)
    more_bits = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i, row in enumerate(layers) if row["ffn_down_exps"] == "q6_k"] == more_bits
    assert {row["ffn_down_exps"] for i, row in enumerate(layers) if i not in more_bits} == {"q4_k"}
    assert {row["ffn_gate_exps"] for row in layers} == {row["ffn_up_exps"] for row in layers} == {"q4_k"}
    assert mix_layer_bits("q4_k_m", 32)[:5] == [5.1875] * 4 + [4.5]
    assert mix_bits_per_weight("q4_k_m", 32) == (16 * (4.5 + 4.5 + 6.5625) / 3 + 16 * 4.5) / 32 == 4.84375
    assert bits_per_weight("q4_k_m") == bits_per_weight("q4_k_m", 32) == 4.84375  # plain: the 32-layer model
    assert bits_per_weight("q4_k_m", 61) == mix_bits_per_weight("q4_k_m", 61) != 4.84375
    assert get_format("q4_k_m").source == "gguf-mix"


def test_mix_rules_hand_worked():
    q2k, q3k, q4k, q5k = 2.625, 3.4375, 4.5, 5.5
    assert "q2_k" not in MIXES and MIXES["q2_k-mix"] == "q2_k"  # q2_k is the type
    assert mix_bits_per_weight("q2_k-mix", 32) == pytest.approx((2 * q2k + q3k) / 3)  # ffn_down always Q3_K
    assert [r["ffn_down_exps"] for r in mix_layer_types("q3_k_m", 32)[:3]] == ["q5_k", "q5_k", "q4_k"]  # i < n/16
    assert [r["ffn_down_exps"] for r in mix_layer_types("q4_k_s", 32)[3:5]] == ["q5_k", "q4_k"]  # i < n/8
    assert mix_bits_per_weight("q3_k_l", 32) == pytest.approx((2 * q3k + q5k) / 3)
    iq3_xs = mix_layer_types("iq3_xs", 32)  # gate/up lowered in the middle three quarters
    assert [iq3_xs[i]["ffn_gate_exps"] for i in (3, 4, 27, 28)] == ["iq3_s", "iq3_xxs", "iq3_xxs", "iq3_s"]
    # IQ4_XS raises the first eighth's ffn_down only without an importance matrix
    assert mix_layer_types("iq4_xs-mix", 32)[3]["ffn_down_exps"] == "q5_k"
    assert mix_layer_types("iq4_xs-mix", 32, imatrix=True)[3]["ffn_down_exps"] == "iq4_xs"
    # IQ2_XXS needs an imatrix anyway; its first eighth's ffn_down is Q2_K
    assert [r["ffn_down_exps"] for r in mix_layer_types("iq2_xxs-mix", 32)[3:5]] == ["q2_k", "iq2_xxs"]
    assert set(mix_layer_types("mxfp4_moe", 32)[0].values()) == {"mxfp4"}
    for plain in ("q8_0", "q6_k", "q4_1"):  # file types whose expert tensors are all one type are that type
        assert plain not in MIXES and f"{plain}-mix" not in MIXES
        assert mix_bits_per_weight(plain, 32) == bits_per_weight(plain)


def test_mix_over_moe_layers_and_row_fallback():
    # 4 layers: use_more_bits holds for i >= 7*4//8 = 3 and (i - 0) % 3 == 2
    assert [r["ffn_down_exps"] for r in mix_layer_types("q4_k_m", 4)] == ["q4_k", "q4_k", "q6_k", "q6_k"]
    assert mix_bits_per_weight("q4_k_m", 4, moe_layers=[0, 1]) == 4.5
    # rows that do not hold whole 256-weight blocks fall back as llama.cpp does (Qwen1.5-MoE I = 1408)
    rows = mix_layer_types("q4_k_m", 32, hidden_size=2048, intermediate_size=1408)
    assert (rows[0]["ffn_down_exps"], rows[4]["ffn_down_exps"], rows[0]["ffn_gate_exps"]) == ("q8_0", "q5_0", "q4_k")
    with pytest.raises(InputError, match="MoE layer indices"):
        mix_bits_per_weight("q4_k_m", 4, moe_layers=[4])


# --------------------------------------------------------------------------- user formats


def test_user_format_bits_and_registration(tmp_path):
    loaded = load_formats(_write(tmp_path, HQQ))
    assert [f.name for f in loaded] == ["hqq3g64", "hqq3g64-int8zero", "hqq4-sym"]
    assert bits_per_weight("hqq3g64") == 3 + (16 + 16) / 64 == 3.5
    assert bits_per_weight("hqq3g64-int8zero") == 3 + (16 + 8) / 64
    assert bits_per_weight("hqq4-sym") == 4 + 16 / 128
    assert get_format("hqq3g64").source == "user" and "hqq3g64" in all_formats()
    assert default_quant_error("hqq3g64-int8zero") == 0.1  # stated
    assert default_quant_error("hqq3g64") == quant_error_for_bits(3.5)  # interpolated
    assert load_formats(_write(tmp_path, HQQ)) == loaded  # loading the same file again is harmless


def test_validate_only_does_not_register(tmp_path):
    load_formats(_write(tmp_path, HQQ), register=False)
    with pytest.raises(InputError, match="unknown number format"):
        get_format("hqq3g64")


def test_a_second_file_cannot_redefine_a_loaded_name(tmp_path):
    load_formats(_write(tmp_path, HQQ))
    other = _write(tmp_path, "formats:\n  - {name: hqq3g64, bits: 2}\n", "other.yaml")
    with pytest.raises(InputError, match="different format of this name is already loaded"):
        load_formats(other)


# --------------------------------------------------------------------------- quantisation error


def test_builtin_errors_are_the_planners():
    assert {n: f.quant_error for n, f in FORMATS.items()} == QUANT_ERROR
    for name in ("int2", "int3", "int4", "int8"):  # the anchors interpolate to themselves
        assert quant_error_for_bits(FORMATS[name].bits_per_weight) == pytest.approx(QUANT_ERROR[name])


def test_default_quant_error_is_monotone_in_bits(tmp_path):
    load_formats(_write(tmp_path, HQQ))
    interpolated = sorted((f.bits_per_weight, default_quant_error(n)) for n, f in all_formats().items()
                          if f.quant_error is None or f.name in ("int2", "int3", "int4", "int8"))
    assert len(interpolated) > 50  # every GGUF type, mix and unstated user format
    for (b0, e0), (b1, e1) in zip(interpolated, interpolated[1:]):
        assert e1 <= e0 + 1e-12, (b0, e0, b1, e1)
    grid = [quant_error_for_bits(b / 8) for b in range(4, 160)]
    assert all(b <= a for a, b in zip(grid, grid[1:])) and grid[0] == 1.0 and grid[-1] == 0.0
    assert default_quant_error("q4_k_m") < default_quant_error("q4_k") < default_quant_error("q3_k_m")
    assert default_quant_error("f16") == 0.0


# --------------------------------------------------------------------------- CLI


def test_cli_list_json_and_table(run_cli, tmp_path):
    result = run_cli("--json", "formats", "list", "--file", _write(tmp_path, HQQ))
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert {r["source"] for r in rows.values()} == {"builtin", "gguf", "gguf-mix", "user"}
    assert rows["q6_k"]["bits_per_weight"] == 6.5625 and rows["q6_k"]["block_bytes"] == 210
    assert rows["q4_k_m"]["bits_per_weight"] == 4.84375 and rows["hqq3g64"]["bits_per_weight"] == 3.5
    table = run_cli("formats", "list", "--source", "gguf-mix")
    assert table.exit_code == 0 and "q4_k_m" in table.stdout and "q6_k " not in table.stdout


def test_cli_show_mix_per_layer(run_cli):
    data = json.loads(run_cli("formats", "show", "q4_k_m", "--layers", "32", "--json").stdout)
    assert data["bits_per_weight"] == 4.84375 and len(data["layers"]) == 32
    assert data["layers"][6]["ffn_down_exps"] == "q6_k" and data["layers"][7]["ffn_down_exps"] == "q4_k"
    table = run_cli("formats", "show", "q4_k_m")
    assert table.exit_code == 0 and "27-31" in table.stdout and "q6_k" in table.stdout
    q8 = json.loads(run_cli("formats", "show", "q8_0", "--json").stdout)
    assert (q8["bits_per_weight"], q8["group_size"], q8["block_bytes"]) == (8.5, 32, 34)


def test_cli_validate_good_file(run_cli, tmp_path):
    result = run_cli("formats", "validate", _write(tmp_path, HQQ), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["valid"] and [f["bits_per_weight"] for f in data["formats"]][0] == 3.5
    assert "hqq3g64" not in formats_module._USER  # validate registers nothing


@pytest.mark.parametrize("text, needles", [
    ("formats:\n  - name: a\n    bits: 3\n    colour: red\n", ("formats[0].colour", "unknown key", ":4")),
    ("formats:\n  - {name: a, bits: -3}\n", ("formats[0].bits", "out of range", "-3")),
    ("formats:\n  - {name: a, bits: 3}\n  - {name: a, bits: 4}\n", ("formats[1].name", "duplicate format name")),
    ("formats:\n  - {name: q4_k_m, bits: 3}\n", ("formats[0].name", "gguf-mix format 'q4_k_m'")),
    ("formats:\n  - {name: int4, bits: 3}\n", ("builtin format 'int4'",)),
    ("- {name: a, bits: 3}\n", ("must be a YAML mapping", "'list'")),
    ("formats:\n  - {name: Hqq, bits: 3}\n", ("formats[0].name", "'Hqq'", "lowercase")),
    ("formats:\n  - {name: a, bits: 3, group_size: 64}\n", ("scale_dtype", "needs a scale per group")),
    ("formats:\n  - {name: a, bits: 3, group_size: 64, scale_dtype: fp12}\n", ("'fp12'", "'fp16'")),
    ("", ("the file is empty",)),
])
def test_cli_bad_formats_file_one_line(run_cli, tmp_path, text, needles):
    result = run_cli("formats", "validate", _write(tmp_path, text))
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_cli_missing_file_and_unknown_name(run_cli, tmp_path):
    missing = run_cli("formats", "validate", tmp_path / "nope.yaml")
    assert missing.exit_code == 1 and "file not found" in missing.stderr and missing.stderr.count("\n") == 1
    unknown = run_cli("formats", "show", "q4_k_x")
    assert unknown.exit_code == 1 and "unknown number format 'q4_k_x'" in unknown.stderr
