"""Every broken file under tests/data/bad gives one line on stderr (file, key, value, fix),
exit code 1 and no traceback, through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

BAD = Path(__file__).parent / "data" / "bad"

# file -> (command before the file, text the one line must contain)
CASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "hw_wrong_unit.yaml": (("profiles", "validate"), ("memory_bytes", "unknown size unit 'GiBs'", "GiB = 2^30")),
    "hw_lowercase_unit.yaml": (("profiles", "validate"), ("memory_bytes_per_s", "case-sensitive")),
    "hw_missing_nodes.yaml": (("profiles", "validate"), ("nodes", "required key is missing")),
    "hw_unknown_key.yaml": (("profiles", "validate"), ("devices[1].memory_size", "unknown key", "Fix:")),
    "hw_negative_size.yaml": (("profiles", "validate"), ("memory_bytes", "must not be negative", "-12GiB")),
    "hw_gpu_no_link.yaml": (("profiles", "validate"), ("gpu0", "has no link", "kind: pcie, to: cpu0")),
    "hw_malformed.yaml": (("profiles", "validate"), ("hw_malformed.yaml:12", "malformed YAML")),
    "hw_link_unknown_target.yaml": (("profiles", "validate"), ("links[0].to", "'cpu9'", "one of cpu0, gpu0")),
    "hw_pcie_without_gen.yaml": (("profiles", "validate"), ("links[0]", "needs gen and lanes")),
    "hw_ternary_on_gpu.yaml": (("profiles", "validate"), ("peak_ops_per_s.ternary", "for accelerators")),
    "hw_no_cpu.yaml": (("profiles", "validate"), ("nodes[0].devices", "needs a cpu device")),
    "hw_wrong_kind.yaml": (("profiles", "validate"), ("devices[1].kind", "'tpu'", "'accelerator'")),
    "hw_bandwidth_without_per_s.yaml": (("profiles", "validate"), ("memory_bytes_per_s", "per-second unit")),
    "hw_not_a_mapping.yaml": (("profiles", "validate"), ("must be a YAML mapping", "'list'")),
    "hw_empty.yaml": (("profiles", "validate"), ("the file is empty",)),
    "hw_unified_mismatch.yaml": (("profiles", "validate"), ("unified link", "same memory_bytes")),
    "hw_duplicate_device.yaml": (("profiles", "validate"), ("devices[1].name", "duplicate device name", "'cpu0'")),
    "hw_efficiency_out_of_range.yaml": (("profiles", "validate"), ("compute_max_fraction", "out of range", "1.5")),
    "hw_cpu_without_cores.yaml": (("profiles", "validate"), ("devices[0].cores", "needs cores")),
    "hw_nvlink_no_bandwidth.yaml": (("profiles", "validate"), ("bytes_per_s", "nvlink link needs bytes_per_s")),
    "hw_count_not_a_number.yaml": (("profiles", "validate"), ("devices[1].count", "wrong type", "'many'")),
    "hw_pcie_bad_lanes.yaml": (("profiles", "validate"), ("links[0].lanes", "got 12", "16")),
    "hw_throughput_as_bandwidth.yaml": (("profiles", "validate"), ("peak_ops_per_s.fp32", "TFLOPS")),
    "model_unknown_architecture.json": (("models", "show"), ("'FooMoeForCausalLM'", "MixtralForCausalLM",
                                                             "num_experts_per_tok")),
    "model_missing_experts.json": (("models", "show"), ("num_local_experts", "missing")),
    "model_topk_over_experts.json": (("models", "show"), ("num_experts_per_tok", "got 12", "at most 8")),
    "model_negative_hidden.json": (("models", "show"), ("hidden_size", "must be positive", "-64")),
    "model_layers_not_a_number.json": (("models", "show"), ("num_hidden_layers", "'four'")),
    "model_malformed.json": (("models", "show"), ("model_malformed.json:7", "malformed JSON")),
    "trace_expert_out_of_range.npz": (("trace", "stats"), ("expert_ids", "out of range", "[0, 8)")),
    "trace_pickled_meta.npz": (("trace", "stats"), ("pickled objects", "never loaded")),
    "trace_seqlens_mismatch.npz": (("trace", "stats"), ("seq_lens", "do not add up")),
}


def test_every_file_in_the_corpus_has_a_case():
    files = {p.name for p in BAD.iterdir() if p.is_file()}
    assert files == set(CASES), "add a case for every broken file (and a file for every case)"
    assert len(files) >= 20


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_file_gives_one_clear_line(run_cli, name):
    command, needles = CASES[name]
    path = BAD / name
    result = run_cli(*command, path)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: ") and str(path) in line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
