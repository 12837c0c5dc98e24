"""What an engine makes of a chip beyond its device kind: the ik_llama.cpp profile's CPU
kernels, an efficiency per chip vendor (llama.cpp's Metal backend on an Apple GPU), a host
cost per linear call of one format (transformers' fp8 path) and an MoE block that visits every
expert (transformers 4.51's eager loop). Each part is held to a hand-worked figure, and bad
values get the one-line error contract (exit 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from planner.cli import cli
from profiles.engines import bundled_engines, load_engine
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.perf import ATTENTION_LINEARS, LINEARS_PER_EXPERT, dense_step_s, expert_call_s, unrouted_visits_s

ROOT = Path(__file__).resolve().parents[1]
APPLE = ROOT / "benchmarks" / "fidelity" / "hardware" / "apple-m2-max-96gb.yaml"
BUNDLE = yaml.safe_load(bundled_engines()["bundle"].read_text())


def _engine_file(tmp_path, **changes):
    data = json.loads(json.dumps(BUNDLE))
    for key, value in changes.items():
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _device(hw, kind):
    return next(d for d in hw.devices.values() if d.kind == kind)


# --------------------------------------------------------------------------- ik_llama.cpp


def test_ik_llama_prices_cpu_prefill_faster_and_decode_alike():
    """Same CPU, same Q4_K expert: ik_llama.cpp's IQK GEMM kernels make a 64-token (prompt)
    call about 3.3x faster than mainline's (its discussion #357 ratio), while a 1-token
    (decode) call, bound by memory, stays within its 4% memory share."""
    assert "ik_llama.cpp" in bundled_engines()
    _, hw = load_profile("desktop-4090")
    model = load_model("qwen3-30b-a3b")
    wb, fl = model.expert_bytes("q4_k"), model.expert_flops_per_token
    ik = _device(load_engine("ik_llama.cpp").apply(hw), "cpu")
    main = _device(load_engine("llama.cpp").apply(hw), "cpu")
    ratio = (expert_call_s(main, "q4_k", wb, fl * 64, 64) - main.expert_call_overhead_s) / (
        expert_call_s(ik, "q4_k", wb, fl * 64, 64) - ik.expert_call_overhead_s)
    assert ratio == pytest.approx(ik.efficiency.compute_max_fraction / main.efficiency.compute_max_fraction, rel=1e-9)
    assert 3.0 < ratio < 3.6
    decode = expert_call_s(main, "q4_k", wb, fl, 1) / expert_call_s(ik, "q4_k", wb, fl, 1)
    assert 1.0 < decode < 1.06
    # the GPU side is mainline's
    ik_gpu, main_gpu = (_device(load_engine(e).apply(hw), "gpu").efficiency for e in ("ik_llama.cpp", "llama.cpp"))
    assert ik_gpu.model_copy(update={"source": ""}) == main_gpu.model_copy(update={"source": ""})


def test_engines_list_shows_ik_llama():
    res = CliRunner().invoke(cli, ["--json", "engines", "list"])
    assert res.exit_code == 0 and "ik_llama.cpp" in {r["name"] for r in json.loads(res.output)}


# --------------------------------------------------------------------------- efficiency per vendor


def test_vendor_efficiency_applies_only_on_that_vendors_chip():
    engine = load_engine("llama.cpp")
    block = engine.kind_spec("gpu").efficiency_by_vendor["apple"]
    _, apple = load_profile(APPLE)
    assert _device(apple, "gpu").vendor == "apple"
    metal = _device(engine.apply(apple), "gpu").efficiency
    assert (metal.memory_fraction, metal.compute_max_fraction, metal.half_tokens) == (
        block.memory_fraction, block.compute_max_fraction, block.half_tokens)
    assert "on apple" in metal.source
    # an NVIDIA GPU (vendor stated or not) keeps the engine's own efficiency
    cuda = engine.kind_spec("gpu").efficiency
    _, desk = load_profile("desktop-4090")
    for hw in (desk, _with_vendor(desk, "nvidia")):
        eff = _device(engine.apply(hw), "gpu").efficiency
        assert (eff.memory_fraction, eff.compute_max_fraction) == (cuda.memory_fraction, cuda.compute_max_fraction)
    # and the CPU of the Apple machine is untouched by a gpu-section block
    assert _device(engine.apply(apple), "cpu").efficiency.memory_fraction == engine.kind_spec(
        "cpu").efficiency.memory_fraction


def test_vendor_efficiency_changes_the_price():
    """Hand-worked: a 1-token Mixtral q4_0 expert call on the M2 Max's GPU is memory-bound at
    the Metal block's share of 400 GB/s (with the CUDA block's compute share and half_tokens 8
    it was compute-bound)."""
    engine = load_engine("llama.cpp")
    _, apple = load_profile(APPLE)
    gpu = _device(engine.apply(apple), "gpu")
    model = load_model("mixtral-8x7b")
    wb, fl = model.expert_bytes("q4_0"), model.expert_flops_per_token
    mem = gpu.efficiency.memory_fraction
    assert expert_call_s(gpu, "q4_0", wb, fl, 1) == pytest.approx(
        wb / (400e9 * mem) + gpu.expert_call_overhead_s, rel=1e-9)


def _with_vendor(hw, vendor):
    import dataclasses

    devices = {k: (dataclasses.replace(d, vendor=vendor) if d.kind == "gpu" else d) for k, d in hw.devices.items()}
    return dataclasses.replace(hw, devices=devices)


# --------------------------------------------------------------------------- host cost per linear, expert loop


def test_fp8_host_cost_per_linear_and_the_all_experts_loop(tmp_path):
    """Hand-worked on an eager engine: an fp8 expert call pays 3 linears x 100 us on top of
    its kernel; a dense step pays 4 attention linears per hidden layer; with the all-experts
    loop each MoE layer pays, per expert no token routes to, the call overhead and its 3
    linears' host time (Qwen3-30B-A3B at one token: 128 * (1 - 8/128) = 120 experts)."""
    kernels = {"bf16": "native", "fp8": {"host_s_per_linear": "100us", "source": "test"}}
    plain = load_engine(_engine_file(tmp_path, **{"gpu.kernels": {"bf16": "native", "fp8": "native"}}))
    (tmp_path / "a").mkdir()
    host = load_engine(_engine_file(tmp_path / "a", **{"gpu.kernels": kernels}))
    (tmp_path / "b").mkdir()
    loop = load_engine(_engine_file(tmp_path / "b", **{"gpu.kernels": kernels,
                                                       "gpu.expert_loop": {"value": "all", "source": "test"}}))
    _, hw = load_profile("desktop-4090")
    g0, g1, g2 = (_device(e.apply(hw), "gpu") for e in (plain, host, loop))
    model = load_model("qwen3-30b-a3b")
    wb, fl = model.expert_bytes("fp8"), model.expert_flops_per_token
    assert expert_call_s(g1, "fp8", wb, fl, 1) - expert_call_s(g0, "fp8", wb, fl, 1) == pytest.approx(
        LINEARS_PER_EXPERT * 100e-6, rel=1e-9)
    assert expert_call_s(g1, "bf16", wb, fl, 1) == expert_call_s(g0, "bf16", wb, fl, 1)  # other formats: no cost
    d0, d1, d2 = (dense_step_s(g, model, "fp8", 1, 0.0) for g in (g0, g1, g2))
    assert d1 - d0 == pytest.approx(model.num_hidden_layers * ATTENTION_LINEARS * 100e-6, rel=1e-9)
    assert unrouted_visits_s(g1, model, "fp8", 1) == 0.0  # routed-only engine
    per_layer = 120 * (g2.expert_call_overhead_s + 3 * 100e-6)
    assert unrouted_visits_s(g2, model, "fp8", 1) == pytest.approx(per_layer, rel=1e-9)
    assert d2 - d1 == pytest.approx(model.num_moe_layers * per_layer, rel=1e-9)
    # a prompt routes to every expert: nothing left to visit empty
    assert unrouted_visits_s(g2, model, "fp8", 4096) < 1e-9


def test_accelerate_prices_transformers_fp8_slower_than_bf16():
    """The bundled accelerate profile: transformers' fp8 linears cost host time, so a
    Qwen3-30B-A3B decode step in fp8 is slower than in bf16 although it reads half the bytes."""
    _, hw = load_profile("desktop-4090")
    gpu = _device(load_engine("accelerate").apply(hw), "gpu")
    assert gpu.visits_every_expert and gpu.linear_host_s["fp8"] > 0
    model = load_model("qwen3-30b-a3b")
    step = {fmt: dense_step_s(gpu, model, fmt, 1, 0.0) + model.num_moe_layers * model.top_k * expert_call_s(
        gpu, fmt, model.expert_bytes(fmt), model.expert_flops_per_token, 1) for fmt in ("bf16", "fp8")}
    assert step["fp8"] > 2 * step["bf16"]


# --------------------------------------------------------------------------- bad values


BAD = [
    ({"gpu.efficiency_by_vendor": {"qualcomm": {"memory_fraction": 0.5, "source": "test"}}},
     "gpu.efficiency_by_vendor"),
    ({"gpu.efficiency_by_vendor": {"apple": {"memory_fraction": 1.5, "source": "test"}}},
     "gpu.efficiency_by_vendor.apple.memory_fraction"),
    ({"gpu.efficiency_by_vendor": {"apple": {"memory_fraction": 0.5}}}, "source"),
    ({"gpu.kernels.fp8": {"host_s_per_linear": "-5us", "source": "test"}}, "must not be negative"),
    ({"gpu.kernels.fp8": {"host_s_per_linear": "100us"}}, "source"),
    ({"gpu.expert_loop": {"value": "some", "source": "test"}}, "gpu.expert_loop.value"),
]


@pytest.mark.parametrize("changes, needle", BAD, ids=[c[1][:40] for c in BAD])
def test_bad_engine_values_get_one_line_and_exit_1(tmp_path, changes, needle):
    path = _engine_file(tmp_path, **changes)
    res = CliRunner().invoke(cli, ["engines", "validate", str(path)])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output and needle in lines[0], res.output
    assert str(path) in lines[0]


@pytest.mark.parametrize("device, vendor, needle", [("gpu0", "acme", "vendor"), ("ssd0", "apple", "does not compute")])
def test_bad_hardware_vendor_is_one_line(tmp_path, device, vendor, needle):
    data = yaml.safe_load(APPLE.read_text())
    dev = next(d for d in data["nodes"][0]["devices"] if d["name"] == device)
    dev["vendor"] = vendor
    path = tmp_path / "hw.yaml"
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(cli, ["profiles", "validate", str(path)])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and str(path) in lines[0], res.output


def test_profiles_without_the_new_fields_keep_their_digest():
    """An unstated vendor, vendor block or expert loop is left out of the dump, so the digests
    that existing plans recorded still match."""
    p, _ = load_profile("desktop-4090")
    assert "vendor" not in json.dumps(p.model_dump(mode="json"))
    d = load_engine("vllm").profile.model_dump(mode="json")
    assert "efficiency_by_vendor" not in d["gpu"] and "expert_loop" not in d["gpu"]
