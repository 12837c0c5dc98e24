"""Attention's FLOPs over the cached context (issue 14, fidelity): an engine that states the
share of peak its attention kernels reach (``attention_fraction``: llama.cpp's CPU attention
runs row by row, not as a GEMM) pays the longer of the KV read and those FLOPs, so a CPU
decode slows as the context grows; an engine that states none keeps the KV-read price."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from profiles.engines import bundled_engines, load_engine
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.perf import attention_compute_s, attention_flops, compute_format, dense_step_s


def test_decode_flops_count_every_cached_token_of_every_layer_windows_applied():
    qwen = load_model("qwen3-30b-a3b")  # 48 full-attention layers, 32 heads of 128
    kv = qwen.kv_cache_bytes(4096)
    assert attention_flops(qwen, 1, kv) == pytest.approx(4 * 32 * 128 * 48 * 4096)
    # two sequences each attend to their own cache only: twice the pairs, not four times
    assert attention_flops(qwen, 2, qwen.kv_cache_bytes(4096, batch_size=2)) == pytest.approx(
        2 * attention_flops(qwen, 1, kv))
    oss = load_model("gpt-oss-20b")  # 24 layers, every other one a 128-token window
    assert attention_flops(oss, 1, oss.kv_cache_bytes(4096)) == pytest.approx(4 * 64 * 64 * 12 * (4096 + 128))


def test_mla_counts_the_absorbed_keys_and_values():
    ds = load_model("deepseek-v3")  # 128 heads, kv_lora_rank 512, rope 64, 61 layers
    assert attention_flops(ds, 1, ds.kv_cache_bytes(1000)) == pytest.approx(2 * 128 * (2 * 512 + 64) * 61 * 1000)


def test_prefill_is_causal():
    qwen = load_model("qwen3-30b-a3b")
    n = 512  # one pass from an empty cache: token i attends to i + 1 tokens
    assert attention_flops(qwen, n, qwen.kv_cache_bytes(n), prefill=True) == pytest.approx(
        4 * 32 * 128 * 48 * n * (n + 1) / 2)


def _llamacpp_cpu(tmp_path, fraction: float | None):
    doc = yaml.safe_load(bundled_engines()["llama.cpp"].read_text())
    doc["name"] = "llama.cpp-attention"
    if fraction is None:
        doc["cpu"].pop("attention_fraction", None)
    else:
        doc["cpu"]["attention_fraction"] = {"value": fraction, "source": "test"}
    path = tmp_path / f"attention-{fraction}.yaml"
    path.write_text(yaml.safe_dump(doc))
    _, hw = load_profile("desktop-4090")
    hw = load_engine(str(path)).apply(hw)
    return next(d for d in hw.devices.values() if d.kind == "cpu")


def test_cpu_decode_pays_the_longer_of_kv_read_and_attention_flops(tmp_path):
    model = load_model("qwen3-30b-a3b")
    plain, slow = _llamacpp_cpu(tmp_path, None), _llamacpp_cpu(tmp_path, 0.01)
    assert plain.attention_fraction is None and slow.attention_fraction == 0.01
    short, long_ = model.kv_cache_bytes(64), model.kv_cache_bytes(8192)
    flops_s = attention_flops(model, 1, long_) / (slow.peak_ops_per_s[compute_format(slow, "bf16")] * 0.01)
    assert attention_compute_s(slow, model, 1, long_) == pytest.approx(flops_s)
    assert attention_compute_s(plain, model, 1, long_) == 0.0
    read_s = long_ / (slow.memory_bytes_per_s * slow.efficiency.memory_fraction)
    assert flops_s > read_s  # at 1% of peak the FLOPs, not the read, bound this step
    base = dense_step_s(plain, model, "q4_k", 1, long_)
    assert dense_step_s(slow, model, "q4_k", 1, long_) - base == pytest.approx(flops_s - read_s, rel=1e-9)
    # kernels at the full peak over a short context: the read still bounds it, nothing changes
    fast = _llamacpp_cpu(tmp_path, 1.0)
    assert attention_compute_s(fast, model, 1, short) < short / (fast.memory_bytes_per_s
                                                                 * fast.efficiency.memory_fraction)
    assert dense_step_s(fast, model, "q4_k", 1, short) == dense_step_s(plain, model, "q4_k", 1, short)
    # the same device without the engine's share: bare hardware has none
    assert dataclasses.replace(slow, attention_fraction=None).attention_fraction is None


def test_attention_fraction_is_a_sourced_fraction(tmp_path):
    doc = yaml.safe_load(bundled_engines()["llama.cpp"].read_text())
    doc["cpu"]["attention_fraction"] = {"value": 1.5, "source": "test"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(Exception, match="attention_fraction"):
        load_engine(str(path))
