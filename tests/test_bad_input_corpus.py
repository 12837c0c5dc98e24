"""A corpus of bad inputs, run through the real CLI: each exits 1 (bad input) or 2 (usage)
with exactly one line on stderr, never a traceback.

Every kind of input a user hands the tool is here: hardware profiles, config.json files and
presets, routing traces, plans, sweep grids and command-line values, each broken in the ways
issue 17 found (huge integers, deep nesting, alias bombs, zip bombs, device files, counts that
would expand forever, NaN, unwritable outputs, plans that cannot run on their hardware) and
more. Large files are generated into ``tmp_path`` by the case itself; what bounds the work is
the parsers' limits (:mod:`profiles.limits`), not a timeout here.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner

from planner.cli import cli

HERE = Path(__file__).parent
MIXTRAL_CONFIG = json.loads((HERE / "data" / "configs" / "mixtral" / "config.json").read_text())

# --------------------------------------------------------------------------- hardware profiles

PROFILE = """\
name: corpus-box
description: a small valid profile every case breaks one way
nodes:
  - name: node
    devices:
      - name: cpu0
        kind: cpu
        cores: 16
        memory_bytes: 64GiB
        memory_bytes_per_s: 89.6GB/s
        peak_ops_per_s: {fp32: 2.5TFLOPS, bf16: 5TFLOPS}
      - name: gpu0
        kind: gpu
        memory_bytes: 24GiB
        memory_bytes_per_s: 1008GB/s
        peak_ops_per_s: {bf16: 165TFLOPS}
        links:
          - {kind: pcie, to: cpu0, gen: 4, lanes: 16}
      - name: nvme0
        kind: nvme
        memory_bytes: 2TB
        memory_bytes_per_s: 7GB/s
        links:
          - {kind: pcie, to: cpu0, gen: 4, lanes: 4}
"""


def _sub(old: str, new: str, count: int = 1) -> Callable[[], str]:
    def make() -> str:
        assert old in PROFILE, old
        return PROFILE.replace(old, new, count)
    return make


def _alias_bomb() -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\nname: bomb\nnodes: *a8\n"


def _many_aliases() -> str:
    return "anchor: &x 1\nlist: [" + ", ".join(["*x"] * 500) + "]\n" + PROFILE


PROFILE_TEXTS: dict[str, Callable[[], str]] = {
    "int_400_digits": _sub("memory_bytes: 24GiB", "memory_bytes: " + "9" * 400),
    "int_5000_digits": _sub("memory_bytes: 24GiB", "memory_bytes: " + "9" * 5000),
    "float_overflow_size": _sub("memory_bytes: 24GiB", "memory_bytes: 1e400GiB"),
    "inf_size": _sub("memory_bytes: 24GiB", "memory_bytes: .inf"),
    "nan_bandwidth": _sub("memory_bytes_per_s: 1008GB/s", "memory_bytes_per_s: .nan"),
    "nan_throughput": _sub("bf16: 165TFLOPS", "bf16: .nan"),
    "node_count_100000": _sub("  - name: node\n", "  - name: node\n    count: 100000\n"),
    "device_count_1000000": _sub("      - name: gpu0\n", "      - name: gpu\n        count: 1000000\n"),
    "cluster_too_many_devices": lambda: PROFILE.replace("  - name: node\n", "  - name: node\n    count: 256\n").replace(
        "      - name: nvme0\n", "      - name: nvme\n        count: 16\n"),
    "index_from_huge": _sub("      - name: gpu0\n", "      - name: gpu\n        count: 2\n        index_from: "
                            "99999999999999\n"),
    "count_zero": _sub("      - name: gpu0\n", "      - name: gpu\n        count: 0\n"),
    "count_negative": _sub("      - name: gpu0\n", "      - name: gpu\n        count: -3\n"),
    "count_fraction": _sub("      - name: gpu0\n", "      - name: gpu\n        count: 1.5\n"),
    "count_bool": _sub("      - name: gpu0\n", "      - name: gpu\n        count: true\n"),
    "alias_bomb": _alias_bomb,
    "too_many_aliases": _many_aliases,
    "duplicate_top_key": lambda: "name: first\n" + PROFILE,
    "duplicate_device_key": _sub("        cores: 16\n", "        cores: 16\n        cores: 32\n"),
    "duplicate_flow_key": _sub("{bf16: 165TFLOPS}", "{bf16: 165TFLOPS, bf16: 1TFLOPS}"),
    "deep_nesting": lambda: "name: deep\nnodes: " + "[" * 100_000 + "]" * 100_000 + "\n",
    "deep_mapping": lambda: "name: deep\nnodes:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 200)) + "  " * 200 + "v: 1\n",
    "python_tag": lambda: "name: !!python/object/apply:os.system ['true']\nnodes: []\n",
    "binary_garbage": lambda: "\x00\x01\x02",
    "tab_indent": lambda: PROFILE.replace("    devices:", "\tdevices:"),
    "memory_as_list": _sub("memory_bytes: 24GiB", "memory_bytes: [24, GiB]"),
    "memory_as_bool": _sub("memory_bytes: 24GiB", "memory_bytes: yes"),
    "memory_as_mapping": _sub("memory_bytes: 24GiB", "memory_bytes: {GiB: 24}"),
    "bandwidth_no_unit_string": _sub("memory_bytes_per_s: 1008GB/s", "memory_bytes_per_s: fast"),
    "peaks_as_list": _sub("peak_ops_per_s: {bf16: 165TFLOPS}", "peak_ops_per_s: [165TFLOPS]"),
    "links_as_string": _sub("        links:\n          - {kind: pcie, to: cpu0, gen: 4, lanes: 16}\n",
                            "        links: pcie\n"),
    "link_gen_9": _sub("gen: 4, lanes: 16", "gen: 9, lanes: 16"),
    "link_to_self": _sub("to: cpu0, gen: 4, lanes: 16", "to: gpu0, gen: 4, lanes: 16"),
    "nodes_empty": lambda: "name: empty\nnodes: []\n",
    "nodes_mapping": lambda: "name: empty\nnodes: {node: 1}\n",
    "name_with_space": _sub("name: corpus-box", "name: corpus box"),
    "name_not_a_string": _sub("name: corpus-box", "name: [1, 2]"),
    "cores_zero": _sub("cores: 16", "cores: 0"),
    "cores_huge": _sub("cores: 16", "cores: " + "1" * 50),
    "price_negative": _sub("  - name: node\n", "  - name: node\n    price_per_hour_usd: -1\n"),
    "sockets_99": _sub("cores: 16", "cores: 16\n        sockets: 99"),
    "efficiency_nan": _sub("        cores: 16\n", "        cores: 16\n        efficiency: {memory_fraction: .nan}\n"),
    "efficiency_points_unsorted": _sub("        cores: 16\n", "        cores: 16\n        efficiency: {points: "
                                       "[[16, 0.3], [1, 0.1]]}\n"),
    "switch_with_memory": lambda: PROFILE + "switches:\n  - {name: sw, kind: switch, memory_bytes: 1GiB}\n",
    "only_a_string": lambda: "just some words\n",
    "only_a_number": lambda: "42\n",
    "json_not_yaml_mapping": lambda: '["name", "nodes"]',
    "unterminated_quote": _sub("name: corpus-box", 'name: "corpus-box'),
}

# files that are no YAML at all, or too large
PROFILE_FILES: dict[str, Callable[[Path], str]] = {
    "dev_zero": lambda tmp: "/dev/zero",
    "dev_urandom": lambda tmp: "/dev/urandom",
    "directory": lambda tmp: str(tmp),
    "missing": lambda tmp: str(tmp / "nope.yaml"),
    "fifo": lambda tmp: _fifo(tmp / "fifo.yaml"),
    "file_50MB": lambda tmp: _big_file(tmp / "big.yaml", PROFILE, 50 << 20),
    "not_utf8": lambda tmp: _write_bytes(tmp / "latin1.yaml", "name: caf\xe9\n".encode("latin-1")),
}


def _fifo(path: Path) -> str:
    import os

    os.mkfifo(path)
    return str(path)


def _big_file(path: Path, head: str, size: int) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(head)
        line = "# " + "x" * 1021 + "\n"
        for _ in range(size // len(line) + 1):
            fh.write(line)
    return str(path)


def _write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# --------------------------------------------------------------------------- config.json and presets


def _config(**changes) -> Callable[[], str]:
    def make() -> str:
        data = dict(MIXTRAL_CONFIG)
        for k, v in changes.items():
            if v is _DROP:
                data.pop(k, None)
            else:
                data[k] = v
        return json.dumps(data)
    return make


_DROP = object()


def _config_text(key: str, literal: str) -> Callable[[], str]:
    """A config with ``key``'s value written as raw JSON text (NaN, huge literals)."""
    def make() -> str:
        data = dict(MIXTRAL_CONFIG, **{key: "@@"})
        return json.dumps(data).replace('"@@"', literal)
    return make


CONFIG_TEXTS: dict[str, Callable[[], str]] = {
    "int_5000_digits": _config_text("hidden_size", "9" * 5000),
    "int_400_digits": _config_text("hidden_size", "9" * 400),
    "deep_nesting_100000": lambda: '{"architectures": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "deep_nesting_500": lambda: '{"architectures": ' + "[" * 500 + "]" * 500 + "}",
    "float_1e308_hidden": _config_text("hidden_size", "1e308"),
    "float_1e308_layers": _config_text("num_hidden_layers", "1e308"),
    "float_1e20_vocab": _config_text("vocab_size", "1e20"),
    "nan_hidden": _config_text("hidden_size", "NaN"),
    "infinity_experts": _config_text("num_local_experts", "Infinity"),
    "minus_infinity_topk": _config_text("num_experts_per_tok", "-Infinity"),
    "layers_1000000": _config(num_hidden_layers=1_000_000),
    "experts_1000000": _config(num_local_experts=1_000_000),
    "topk_1000000": _config(num_experts_per_tok=1_000_000),
    "hidden_2_pow_40": _config(hidden_size=2**40),
    "hidden_as_text": _config(hidden_size="4096"),
    "hidden_fraction": _config(hidden_size=64.5),
    "hidden_bool": _config(hidden_size=True),
    "hidden_zero": _config(hidden_size=0),
    "hidden_list": _config(hidden_size=[64]),
    "heads_not_dividing": _config(num_key_value_heads=3),
    "sliding_window_negative": _config(sliding_window=-1),
    "topk_over_experts": _config(num_experts_per_tok=9),
    "architectures_not_list": _config(architectures="MixtralForCausalLM", model_type=_DROP),
    "architectures_numbers": _config(architectures=[1, 2], model_type=_DROP),
    "no_architecture": _config(architectures=_DROP, model_type=_DROP),
    "unknown_architecture": _config(architectures=["TeleportForCausalLM"], model_type="teleport"),
    "tie_embeddings_text": _config(tie_word_embeddings="no"),
    "config_is_list": lambda: "[1, 2, 3]",
    "config_is_string": lambda: '"mixtral"',
    "config_empty": lambda: "",
    "config_truncated": lambda: json.dumps(MIXTRAL_CONFIG)[:40],
    "trailing_comma": lambda: json.dumps(MIXTRAL_CONFIG)[:-1] + ",}",
    "layer_types_wrong_length": _config(layer_types=["full_attention"]),
    "deepseek_group_mismatch": lambda: json.dumps(dict(json.loads((HERE / "data" / "configs" / "deepseek_v3" /
                                                                   "config.json").read_text()), n_group=7)),
    "qwen_mlp_only_huge": lambda: json.dumps(dict(json.loads((HERE / "data" / "configs" / "qwen2_moe" /
                                                              "config.json").read_text()),
                                                  mlp_only_layers=[10**20])),
}

PRESET_TEXTS: dict[str, str] = {
    "preset_zero_experts_float": "name: p\nsource: s\nzero_experts: {copy: 1.0e+308}\nconfig: {}\n",
    "preset_published_huge": "name: p\nsource: s\npublished: {total_params: 1.0e+308, active_params: 1, "
                             "active_counts_input_embedding: true, source: s}\nconfig: {}\n",
    "preset_config_not_mapping": "name: p\nsource: s\nconfig: [1, 2]\n",
    "preset_layers_huge": "name: p\nsource: s\nconfig: {architectures: [MixtralForCausalLM], num_hidden_layers: "
                          "1000000, hidden_size: 64, intermediate_size: 96, num_attention_heads: 4, "
                          "num_local_experts: 8, num_experts_per_tok: 2, vocab_size: 128}\n",
    "preset_duplicate_key": "name: p\nname: q\nsource: s\nconfig: {}\n",
    "preset_alias_bomb": _alias_bomb(),
}

# --------------------------------------------------------------------------- routing traces


def _trace_arrays(T: int = 6, L: int = 2, K: int = 2, E: int = 8) -> dict[str, np.ndarray]:
    ids = np.stack([np.stack([np.array([(t + l) % E, (t + l + 1) % E])[:K] for l in range(L)]) for t in range(T)])
    return dict(expert_ids=ids.astype(np.uint8).reshape(T, L, K), seq_lens=np.array([T], np.int32),
                phase=np.zeros(T, np.uint8),
                meta=np.array(json.dumps({"format_version": 1, "model": "m", "num_experts": E,
                                          "layer_map": list(range(L)), "source": "corpus"})))


def _npz(path: Path, **override) -> str:
    arrays = _trace_arrays()
    for k, v in override.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return str(path)


def _meta(**changes) -> np.ndarray:
    meta = {"format_version": 1, "model": "m", "num_experts": 8, "layer_map": [0, 1], "source": "corpus"}
    meta.update(changes)
    return np.array(json.dumps(meta))


def _declared_bomb(path: Path, shape: tuple[int, ...], dtype: str = "|u1") -> str:
    """An .npz whose expert_ids header declares ``shape``, with almost no data behind it."""
    buf = io.BytesIO()  # the .npy magic and header, then 1 KB where gigabytes are declared
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    buf.write(b"\x00" * 1024)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("expert_ids.npy", buf.getvalue())
        for name, arr in (("seq_lens", np.array([1], np.int32)), ("meta", _meta())):
            b = io.BytesIO()
            np.save(b, arr)
            zf.writestr(f"{name}.npy", b.getvalue())
    return str(path)


def _real_bomb(path: Path) -> str:
    """A real zip bomb: 330 MB of zeros deflated to ~0.3 MB, written in chunks."""
    header = io.BytesIO()
    tokens = (330 << 20) // 12
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (tokens, 2, 6)})
    chunk = bytes(12 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("expert_ids.npy", "w", force_zip64=True) as fh:
            fh.write(header.getvalue())
            for _ in range(tokens * 12 // len(chunk)):
                fh.write(chunk)
    return str(path)


TRACE_FILES: dict[str, Callable[[Path], str]] = {
    "num_experts_text": lambda p: _npz(p, meta=_meta(num_experts="eight")),
    "num_experts_text_digits": lambda p: _npz(p, meta=_meta(num_experts="8")),
    "num_experts_float": lambda p: _npz(p, meta=_meta(num_experts=8.5)),
    "num_experts_huge": lambda p: _npz(p, meta=_meta(num_experts=10**9)),
    "num_experts_negative": lambda p: _npz(p, meta=_meta(num_experts=-1)),
    "num_experts_zero": lambda p: _npz(p, meta=_meta(num_experts=0)),
    "num_experts_list": lambda p: _npz(p, meta=_meta(num_experts=[8])),
    "num_experts_50_digits": lambda p: _npz(p, meta=np.array('{"num_experts": ' + "9" * 50 + "}")),
    "meta_deep_nesting": lambda p: _npz(p, meta=np.array('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")),
    "meta_not_json": lambda p: _npz(p, meta=np.array("not json")),
    "meta_list": lambda p: _npz(p, meta=np.array("[1, 2]")),
    "meta_numeric_array": lambda p: _npz(p, meta=np.arange(3)),
    "meta_nan": lambda p: _npz(p, meta=np.array('{"num_experts": NaN}')),
    "format_version_2": lambda p: _npz(p, meta=_meta(format_version=2)),
    "layer_map_text": lambda p: _npz(p, meta=_meta(layer_map=["a", "b"])),
    "layer_map_wrong_length": lambda p: _npz(p, meta=_meta(layer_map=[0])),
    "layer_map_huge": lambda p: _npz(p, meta=_meta(layer_map=[0, 10**12])),
    "zero_tokens": lambda p: _npz(p, expert_ids=np.zeros((0, 2, 2), np.uint8), seq_lens=np.zeros(0, np.int32),
                                  phase=np.zeros(0, np.uint8)),
    "zero_layers": lambda p: _npz(p, expert_ids=np.zeros((6, 0, 2), np.uint8), meta=_meta(layer_map=[])),
    "zero_top_k": lambda p: _npz(p, expert_ids=np.zeros((6, 2, 0), np.uint8)),
    "ids_float": lambda p: _npz(p, expert_ids=np.zeros((6, 2, 2), np.float32)),
    "ids_2d": lambda p: _npz(p, expert_ids=np.zeros((6, 2), np.uint8)),
    "ids_out_of_range": lambda p: _npz(p, expert_ids=np.full((6, 2, 2), 200, np.uint8)),
    "ids_repeated": lambda p: _npz(p, expert_ids=np.zeros((6, 2, 2), np.uint8)),
    "seq_lens_negative": lambda p: _npz(p, seq_lens=np.array([-6], np.int32)),
    "seq_lens_float": lambda p: _npz(p, seq_lens=np.array([6.0])),
    "seq_lens_missing": lambda p: _npz(p, seq_lens=None),
    "phase_bad": lambda p: _npz(p, phase=np.full(6, 7, np.uint8)),
    "gate_nan": lambda p: _npz(p, gate_weights=np.full((6, 2, 2), np.nan, np.float32)),
    "gate_wrong_shape": lambda p: _npz(p, gate_weights=np.ones((3, 2), np.float32)),
    "object_array": lambda p: _write_object_npz(p),
    "declared_bomb_4GB": lambda p: _declared_bomb(p, (1 << 30, 2, 2)),
    "declared_bomb_huge_shape": lambda p: _declared_bomb(p, (10**15, 60, 8)),
    "declared_bomb_object": lambda p: _declared_bomb(p, (4, 2, 2), "|O"),
    "entries_over_limit": lambda p: _declared_bomb(p, (40 << 20, 1, 2)),
    "zip_bomb_330MB": _real_bomb,
    "not_a_zip": lambda p: _write_bytes(p, b"this is text, not a zip file\n"),
    "empty_file": lambda p: _write_bytes(p, b""),
    "truncated_zip": lambda p: _truncated(p),
}


def _write_object_npz(path: Path) -> str:
    with open(path, "wb") as fh:
        np.savez(fh, expert_ids=np.array([{"a": 1}], dtype=object), seq_lens=np.array([1]), meta=_meta())
    return str(path)


def _truncated(path: Path) -> str:
    _npz(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


# --------------------------------------------------------------------------- sweep grids

GRID_BASE = "name: g\nbase: {hardware: desktop-4090, model: olmoe-1b-7b}\nsimulate: {requests: 1}\n"

GRID_TEXTS: dict[str, str] = {
    "points_10_6": "name: g\nbase: {hardware: desktop-4090, model: olmoe-1b-7b}\nvary:\n"
                   + "".join(f"  {k}: [{', '.join(str(i + 1) for i in range(n))}]\n"
                             for k, n in (("batch", 100), ("gpu_count", 100), ("nvme_count", 100))),
    "points_10_12": "name: g\nbase: {hardware: desktop-4090, model: olmoe-1b-7b}\nvary:\n"
                    + "".join(f"  {k}: [{', '.join(str(i + 1) for i in range(n))}]\n"
                              for k, n in (("batch", 10000), ("gpu_count", 10000), ("nvme_count", 10000))),
    "negative_batch": GRID_BASE + "vary: {batch: [1, -4]}\n",
    "zero_batch": GRID_BASE + "vary: {batch: [0]}\n",
    "batch_text": GRID_BASE + "vary: {batch: [many]}\n",
    "base_negative_batch": "name: g\nbase: {hardware: desktop-4090, model: olmoe-1b-7b, batch: -1}\n",
    "base_context_huge": "name: g\nbase: {hardware: desktop-4090, model: olmoe-1b-7b, context: 1000000000000}\n",
    "base_objective_unknown": "name: g\nbase: {hardware: desktop-4090, model: olmoe-1b-7b, objective: fastest}\n",
    "unknown_eviction": GRID_BASE + "vary: {eviction: [lru, nonsense]}\n",
    "unknown_prefetch": GRID_BASE + "vary: {prefetch: [psychic]}\n",
    "unknown_miss": GRID_BASE + "vary: {miss: [shrug]}\n",
    "unknown_objective": GRID_BASE + "vary: {objective: [fastest]}\n",
    "unknown_parallel": GRID_BASE + "vary: {parallel: [sideways]}\n",
    "unknown_knob": GRID_BASE + "vary: {colour: [red]}\n",
    "empty_knob": GRID_BASE + "vary: {batch: []}\n",
    "nodes_100000": GRID_BASE + "vary: {nodes: [100000]}\n",
    "gpu_count_negative": GRID_BASE + "vary: {gpu_count: [-1]}\n",
    "pcie_gen_9": GRID_BASE + "vary: {pcie_gen: [9]}\n",
    "dram_words": GRID_BASE + "vary: {dram: [lots]}\n",
    "eviction_as_list": GRID_BASE + "vary: {eviction: [[lru]]}\n",
    "requests_huge": "name: g\nbase: {hardware: desktop-4090, model: olmoe-1b-7b}\nsimulate: {requests: 10000000000}\n",
    "arrival_nan": "name: g\nbase: {hardware: desktop-4090, model: olmoe-1b-7b}\nsimulate: {arrival_rate_per_s: .nan}\n",
    "every_point_fails": "name: g\nbase: {hardware: desktop-4090, model: no-such-model}\nvary: {batch: [1, 2]}\n",
    "duplicate_knob": GRID_BASE + "vary: {batch: [1], batch: [2]}\n",
    "alias_bomb": _alias_bomb(),
}

# --------------------------------------------------------------------------- plans


@pytest.fixture(scope="module")
def plan_data(tmp_path_factory) -> dict:
    """A real plan (the bundled default: Mixtral-8x7B on the RTX 4090 desktop), as JSON data."""
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    result = CliRunner().invoke(cli, ["optimize", "--out", str(path)])
    assert result.exit_code == 0, result.output
    return json.loads(path.read_text())


def _layer0(plan: dict, **changes) -> dict:
    plan["layers"][0].update(changes)
    return plan


def _all_layers(plan: dict, **changes) -> dict:
    for lp in plan["layers"]:
        lp.update({k: (v(lp) if callable(v) else v) for k, v in changes.items()})
    return plan


def _drop_layer(plan: dict) -> dict:
    plan["layers"] = plan["layers"][:-1]
    return plan


def _renumber(plan: dict) -> dict:
    plan["layers"][1]["moe_layer"] = 0
    return plan


PLAN_EDITS: dict[str, Callable[[dict], dict]] = {
    # 1.2 TB / bf16 experts that no GPU holds
    "all_bf16_resident_on_gpu": lambda p: _all_layers(p, home=lambda lp: ["node/gpu0"] * len(lp["home"]),
                                                      format=lambda lp: ["bf16"] * len(lp["home"]),
                                                      site=lambda lp: ["resident"] * len(lp["home"])),
    "int8_experts_beyond_gpu": lambda p: _all_layers(p, home=lambda lp: ["node/gpu0"] * len(lp["home"]),
                                                     format=lambda lp: ["int8"] * len(lp["home"])),
    "cache_slots_10_9": lambda p: _layer0(p, cache_slots=10**9, cache_device="node/gpu0"),
    "cache_slots_over_experts": lambda p: _layer0(p, cache_slots=9, cache_device="node/gpu0"),
    "cache_on_unknown_device": lambda p: _layer0(p, cache_slots=1, cache_device="node/gpu9"),
    "resident_on_nvme": lambda p: _layer0(p, home=["node/nvme0"] + p["layers"][0]["home"][1:],
                                          site=["resident"] + p["layers"][0]["site"][1:]),
    "local_on_nvme": lambda p: _layer0(p, home=["node/nvme0"] + p["layers"][0]["home"][1:],
                                       site=["local"] + p["layers"][0]["site"][1:]),
    "two_layers_numbered_0": _renumber,
    "layer_dropped": _drop_layer,
    "hidden_layer_wrong": lambda p: _layer0(p, hidden_layer=31),
    "expert_missing": lambda p: _layer0(p, home=p["layers"][0]["home"][:-1], format=p["layers"][0]["format"][:-1],
                                        site=p["layers"][0]["site"][:-1]),
    "replica_on_home": lambda p: _layer0(p, replicas=[[h] for h in p["layers"][0]["home"]]),
    "replica_unknown_memory": lambda p: _layer0(p, replicas=[["node/gpu5"]] + [[] for _ in p["layers"][0]["home"][1:]]),
    "unknown_gpu": lambda p: dict(p, compute_device="node/gpu7"),
    "compute_on_nvme": lambda p: dict(p, compute_device="node/nvme0"),
    "host_is_gpu": lambda p: dict(p, host_device="node/gpu0"),
    "home_unknown_memory": lambda p: _layer0(p, home=["node/gpu3"] + p["layers"][0]["home"][1:]),
    "dense_format_int1": lambda p: dict(p, dense_format="int1"),
    "expert_format_int42": lambda p: _layer0(p, format=["int42"] + p["layers"][0]["format"][1:]),
    "cache_format_unknown": lambda p: _layer0(p, cache_slots=1, cache_device="node/gpu0", cache_format="fp5"),
    "memory_unknown_pool": lambda p: dict(p, memory=dict(p["memory"], **{"node/tpu0": p["memory"]["node/gpu0"]})),
    "site_teleport": lambda p: _layer0(p, site=["teleport"] + p["layers"][0]["site"][1:]),
    "format_version_2": lambda p: dict(p, format_version=2),
    "batch_size_zero": lambda p: dict(p, batch_size=0),
    "eviction_nonsense": lambda p: dict(p, eviction="nonsense"),
    "prefetch_psychic": lambda p: dict(p, prefetch="psychic"),
    "objective_unknown": lambda p: dict(p, objective="fastest"),
    "extra_key": lambda p: dict(p, colour="red"),
    "inputs_missing": lambda p: {k: v for k, v in p.items() if k != "inputs"},
    "layers_not_a_list": lambda p: dict(p, layers="all"),
}

PLAN_TEXTS: dict[str, Callable[[dict], str]] = {
    "plan_is_list": lambda p: "[]",
    "plan_malformed": lambda p: json.dumps(p)[:100],
    "plan_deep_nesting": lambda p: '{"format_version": 1, "layers": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "plan_5000_digit_batch": lambda p: json.dumps(dict(p, batch_size="@@")).replace('"@@"', "9" * 5000),
    "plan_nan_predicted": lambda p: json.dumps(dict(p, batch_size="@@")).replace('"@@"', "NaN"),
}

# --------------------------------------------------------------------------- the cases

# name -> builder(tmp_path, plan_path) -> argv; plan_path is a valid plan.json (made once)
Case = Callable[[Path, Path], list[str]]
CASES: dict[str, Case] = {}


def _text_case(prefix: str, texts: dict, suffix: str, argv: Callable[[str], list[str]]) -> None:
    for name, make in texts.items():
        def case(tmp: Path, plan: Path, make=make) -> list[str]:
            path = tmp / f"input{suffix}"
            path.write_text(make() if callable(make) else make, encoding="utf-8")
            return argv(str(path))
        CASES[f"{prefix}/{name}"] = case


_text_case("profile", PROFILE_TEXTS, ".yaml", lambda f: ["profiles", "validate", f])
_text_case("config", CONFIG_TEXTS, ".json", lambda f: ["models", "show", f])
_text_case("preset", PRESET_TEXTS, ".yaml", lambda f: ["models", "show", f])
_text_case("grid", GRID_TEXTS, ".yaml", lambda f: ["sweep", f, "--out", str(Path(f).parent / "out")])
for _name, _make in PROFILE_FILES.items():
    CASES[f"profile-file/{_name}"] = lambda tmp, plan, m=_make: ["profiles", "validate", m(tmp)]
for _name, _make in list(PROFILE_FILES.items())[:4]:
    CASES[f"optimize-hardware/{_name}"] = lambda tmp, plan, m=_make: ["optimize", "-H", m(tmp)]
    CASES[f"optimize-model/{_name}"] = lambda tmp, plan, m=_make: ["optimize", "-m", m(tmp) if m(tmp) != str(tmp)
                                                                   else str(tmp / "nodir")]
for _name, _make in TRACE_FILES.items():
    CASES[f"trace/{_name}"] = lambda tmp, plan, m=_make: ["trace", "stats", m(tmp / "t.npz")]
for _name in ("num_experts_text", "declared_bomb_4GB", "zero_tokens", "zero_layers"):
    CASES[f"optimize-trace/{_name}"] = lambda tmp, plan, m=TRACE_FILES[_name]: ["optimize", "-t", m(tmp / "t.npz")]


def _plan_case(edit: Callable[[dict], dict] | None, text: Callable[[dict], str] | None,
               argv: Callable[[str, Path], list[str]]) -> Case:
    def case(tmp: Path, plan: Path) -> list[str]:
        data = json.loads(plan.read_text())
        path = tmp / "bad-plan.json"
        path.write_text(text(data) if text else json.dumps(edit(data)), encoding="utf-8")
        return argv(str(path), tmp)
    return case


PLAN_CONSUMERS = {
    "simulate": lambda f, tmp: ["simulate", "--plan", f, "--requests", "1"],
    "export": lambda f, tmp: ["export", f, "--out", str(tmp / "bundle")],
    "plan-check": lambda f, tmp: ["plan", "check", f],
}
for _consumer, _argv in PLAN_CONSUMERS.items():
    for _name, _edit in PLAN_EDITS.items():
        CASES[f"plan-{_consumer}/{_name}"] = _plan_case(_edit, None, _argv)
    for _name, _text in PLAN_TEXTS.items():
        CASES[f"plan-{_consumer}/{_name}"] = _plan_case(None, _text, _argv)


def _parent_is_file(tmp: Path, name: str) -> str:
    blocker = tmp / "a-file"
    blocker.write_text("x")
    return str(blocker / name)


OPTION_CASES: dict[str, Case] = {
    "optimize/batch_1e8_text": lambda tmp, plan: ["optimize", "--batch", "1e8"],
    "optimize/batch_1e8": lambda tmp, plan: ["optimize", "--batch", "100000000"],
    "optimize/context_1e12": lambda tmp, plan: ["optimize", "--context", "1000000000000"],
    "optimize/prompt_tokens_1e12": lambda tmp, plan: ["optimize", "--prompt-tokens", "1000000000000"],
    "optimize/prompt_longer_than_context": lambda tmp, plan: ["optimize", "--context", "1024", "--prompt-tokens",
                                                              "2048"],
    "optimize/quality_budget_nan": lambda tmp, plan: ["optimize", "--quality-budget", "nan"],
    "optimize/quality_budget_inf": lambda tmp, plan: ["optimize", "--quality-budget", "inf"],
    "optimize/quality_budget_negative": lambda tmp, plan: ["optimize", "--quality-budget", "-1"],
    "optimize/slo_nan": lambda tmp, plan: ["optimize", "--slo-tpot", "nan"],
    "optimize/gap_nan": lambda tmp, plan: ["optimize", "--gap", "nan"],
    "optimize/time_limit_inf": lambda tmp, plan: ["optimize", "--time-limit", "inf"],
    "optimize/eviction_nonsense": lambda tmp, plan: ["optimize", "--eviction", "nonsense"],
    "optimize/prefetch_nonsense": lambda tmp, plan: ["optimize", "--prefetch", "nonsense"],
    "optimize/policy_nonsense": lambda tmp, plan: ["optimize", "--policy", "nonsense"],
    "optimize/engine_nonsense": lambda tmp, plan: ["optimize", "--engine", "nonsense"],
    "optimize/formats_int1": lambda tmp, plan: ["optimize", "--formats", "int1"],
    "optimize/critical_out_of_range": lambda tmp, plan: ["optimize", "--critical", "99:99"],
    "optimize/critical_words": lambda tmp, plan: ["optimize", "--critical", "first:last"],
    "optimize/fix_cache_slots_negative": lambda tmp, plan: ["optimize", "--fix-cache-slots", "-1"],
    "optimize/n_cpu_moe_huge": lambda tmp, plan: ["optimize", "--policy", "llama.cpp", "--n-cpu-moe", "1000000000"],
    "optimize/cache_slots_huge": lambda tmp, plan: ["optimize", "--policy", "lru-offload", "--cache-slots",
                                                    "1000000000"],
    "optimize/gpu_memory_words": lambda tmp, plan: ["optimize", "--policy", "accelerate", "--gpu-memory", "lots"],
    "optimize/out_parent_is_file": lambda tmp, plan: ["optimize", "--out", _parent_is_file(tmp, "plan.json")],
    "optimize/out_is_directory": lambda tmp, plan: ["optimize", "--out", str(tmp), "--force"],
    "optimize/report_parent_is_file": lambda tmp, plan: ["optimize", "--report", _parent_is_file(tmp, "report")],
    "optimize/out_in_proc": lambda tmp, plan: ["optimize", "--out", "/proc/no-such-dir/plan.json"],
    "optimize/trace_missing": lambda tmp, plan: ["optimize", "-t", str(tmp / "nope.npz")],
    "simulate/eviction_nonsense": lambda tmp, plan: ["simulate", "-p", str(plan), "--eviction", "nonsense"],
    "simulate/prefetch_nonsense": lambda tmp, plan: ["simulate", "-p", str(plan), "--prefetch", "nonsense"],
    "simulate/miss_nonsense": lambda tmp, plan: ["simulate", "-p", str(plan), "--miss", "nonsense"],
    "simulate/batch_zero": lambda tmp, plan: ["simulate", "-p", str(plan), "--batch", "0"],
    "simulate/batch_1e8": lambda tmp, plan: ["simulate", "-p", str(plan), "--batch", "100000000"],
    "simulate/requests_zero": lambda tmp, plan: ["simulate", "-p", str(plan), "--requests", "0"],
    "simulate/requests_1e12": lambda tmp, plan: ["simulate", "-p", str(plan), "--requests", "1000000000000"],
    "simulate/arrival_nan": lambda tmp, plan: ["simulate", "-p", str(plan), "--arrival-rate", "nan"],
    "simulate/arrival_inf": lambda tmp, plan: ["simulate", "-p", str(plan), "--arrival-rate", "inf"],
    "simulate/accuracy_nan": lambda tmp, plan: ["simulate", "-p", str(plan), "--prefetch-accuracy", "nan"],
    "simulate/out_parent_is_file": lambda tmp, plan: ["simulate", "-p", str(plan), "--out",
                                                      _parent_is_file(tmp, "m.json")],
    "simulate/trace_out_parent_is_file": lambda tmp, plan: ["simulate", "-p", str(plan), "--trace-out",
                                                            _parent_is_file(tmp, "t.json")],
    "simulate/plots_parent_is_file": lambda tmp, plan: ["simulate", "-p", str(plan), "--plots",
                                                        _parent_is_file(tmp, "plots")],
    "simulate/out_in_proc": lambda tmp, plan: ["simulate", "-p", str(plan), "--requests", "1", "--out",
                                               "/proc/no-such-dir/m.json"],
    "simulate/trace_out_in_proc": lambda tmp, plan: ["simulate", "-p", str(plan), "--requests", "1",
                                                     "--trace-out", "/proc/no-such-dir/t.json"],
    "simulate/plan_missing": lambda tmp, plan: ["simulate", "-p", str(tmp / "nope.json")],
    "simulate/plan_dev_zero": lambda tmp, plan: ["simulate", "-p", "/dev/zero"],
    "simulate/hardware_too_small": lambda tmp, plan: ["simulate", "-p", str(plan), "-H", "desktop-3060"],
    "simulate/model_other": lambda tmp, plan: ["simulate", "-p", str(plan), "-m", "olmoe-1b-7b"],
    "simulate/trace_bomb": lambda tmp, plan: ["simulate", "-p", str(plan), "-t",
                                              _declared_bomb(tmp / "b.npz", (1 << 30, 32, 2))],
    "simulate/trace_other_model": lambda tmp, plan: ["simulate", "-p", str(plan), "-t", _npz(tmp / "t.npz")],
    "export/for_smaller_gpu": lambda tmp, plan: ["export", str(plan), "--out", str(tmp / "b"), "-H", "desktop-3060"],
    "export/unknown_hardware": lambda tmp, plan: ["export", str(plan), "--out", str(tmp / "b"), "-H", "nonesuch"],
    "export/out_parent_is_file": lambda tmp, plan: ["export", str(plan), "--out", _parent_is_file(tmp, "bundle")],
    "models/context_1e12": lambda tmp, plan: ["models", "show", "mixtral-8x7b", "--context", "1000000000000"],
    "models/batch_1e8": lambda tmp, plan: ["models", "show", "mixtral-8x7b", "--batch", "100000000"],
    "models/hardware_dev_zero": lambda tmp, plan: ["models", "show", "mixtral-8x7b", "--hardware", "/dev/zero"],
    "plan/schema_extra_argument": lambda tmp, plan: ["plan", "schema", "extra"],
    "plan/check_missing": lambda tmp, plan: ["plan", "check", str(tmp / "nope.json")],
    "cli/unknown_command": lambda tmp, plan: ["teleport"],
    "cli/unknown_option": lambda tmp, plan: ["optimize", "--warp-speed"],
}
CASES.update(OPTION_CASES)
USAGE_CASES = {"cli/unknown_command", "cli/unknown_option", "plan/schema_extra_argument"}


def test_the_corpus_is_large_and_covers_every_input():
    assert len(CASES) >= 150
    kinds = {name.split("/")[0] for name in CASES}
    assert {"profile", "profile-file", "config", "preset", "trace", "grid", "plan-simulate", "plan-export",
            "plan-plan-check", "optimize", "simulate", "export"} <= kinds


@pytest.fixture(scope="module")
def plan_path(plan_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(json.dumps(plan_data), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_line(name, tmp_path, plan_path):
    argv = CASES[name](tmp_path, plan_path)
    result = CliRunner().invoke(cli, argv, catch_exceptions=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{name}: {type(result.exception).__name__}: {result.exception}")
    usage = name in USAGE_CASES  # a command line click cannot parse: exit 2; every bad value: exit 1
    assert result.exit_code == (2 if usage else 1), f"{name}: exit {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"{name}: {result.stderr}"
    assert lines[0].startswith("error: "), lines[0]


def test_a_failed_sweep_leaves_nothing_behind(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID_TEXTS["every_point_fails"], encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["sweep", str(grid), "--out", str(out)])
    assert result.exit_code == 1 and "every point of the sweep failed" in result.stderr
    assert not out.exists()


def test_duplicate_yaml_key_names_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(PROFILE_TEXTS["duplicate_device_key"](), encoding="utf-8")
    result = CliRunner().invoke(cli, ["profiles", "validate", str(path)])
    assert result.exit_code == 1
    assert re.search(r"dup\.yaml:9: duplicate key 'nodes\[0\]\.devices\[0\]\.cores' \(first on line 8\)",
                     result.stderr), result.stderr


def test_plan_schema_is_the_plan_model():
    from planner.plan import Plan

    result = CliRunner().invoke(cli, ["plan", "schema"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == json.loads(json.dumps(Plan.model_json_schema()))
