"""Engine profiles: loading, the one-line error contract, what they change in the cost model,
and one price per placement (the --compare baselines and the engine exporters agree)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from click.testing import CliRunner

from exporters.engines.accelerate import render_accelerate
from exporters.engines.llamacpp import render_llamacpp
from exporters.engines.rounding import Pricing
from planner.cli import cli
from planner.optimize import OptimizeRequest, optimize
from profiles.engines import bundled_engines, load_engine
from profiles.formats import get_format
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.perf import dense_step_s, expert_call_s

BUNDLE = yaml.safe_load(bundled_engines()["bundle"].read_text())


def test_every_bundled_engine_loads_and_names_its_sources():
    names = set(bundled_engines())
    assert {"bundle", "llama.cpp", "ktransformers", "accelerate", "vllm", "sglang", "hqq-offload",
            "roofline"} <= names
    for name in names:
        e = load_engine(name)
        assert e.name == name and e.profile.sources
        for kind in ("gpu", "cpu", "accelerator"):
            spec = e.kind_spec(kind)
            for what in ("layer_overhead_s", "expert_call_overhead_s"):
                v = getattr(spec, what) if spec else None
                assert v is None or len(v.source) >= 3


def test_roofline_engine_leaves_the_datasheet_roofline_unchanged():
    _, hw = load_profile("desktop-4090")
    seen = load_engine("roofline").apply(hw)
    model = load_model("mixtral-8x7b")
    for did in ("node/gpu0", "node/cpu0"):
        bare, eng = hw.devices[did], seen.devices[did]
        for fmt in ("bf16", "int4"):
            args = (fmt, model.expert_bytes(fmt), model.expert_flops_per_token, 1)
            assert expert_call_s(eng, *args) == expert_call_s(bare, *args)
    assert [l.bytes_per_s for l in seen.links] == [l.bytes_per_s for l in hw.links]


def _engine_file(tmp_path, **changes):
    data = json.loads(json.dumps(BUNDLE))
    for key, value in changes.items():
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_overheads_unpack_and_step_costs_enter_the_roofline(tmp_path):
    """Hand-worked: one int4 expert call on the 4090 with an unpack path and a 100 us call cost."""
    path = _engine_file(tmp_path, **{"gpu.kernels": {"bf16": "native", "int4": {"unpack_weights_per_s": "50G/s",
                                                                                "source": "test"}},
                                     "gpu.expert_call_overhead_s": {"value": "100us", "source": "test"},
                                     "step_overhead_s": {"decode": {"value": "2ms", "source": "test"},
                                                         "prefill": {"value": "7ms", "source": "test"}}})
    _, hw = load_profile("desktop-4090")
    gpu = load_engine(path).apply(hw).devices["node/gpu0"]
    model = load_model("mixtral-8x7b")
    wb = model.expert_bytes("int4")
    params = wb * 8 / get_format("int4").bits_per_weight
    eff = gpu.efficiency
    expected = (params / 50e9 + 2 * params / (gpu.memory_bytes_per_s * eff.memory_fraction)
                + gpu.launch_overhead_s + 100e-6)  # batch 1: memory-bound on the fp16 copy
    assert expert_call_s(gpu, "int4", wb, model.expert_flops_per_token, 1) == pytest.approx(expected, rel=1e-12)
    bare = hw.devices["node/gpu0"]
    assert expert_call_s(gpu, "int4", wb, model.expert_flops_per_token, 1) > 3 * expert_call_s(
        bare, "int4", wb, model.expert_flops_per_token, 1)
    d = dense_step_s(gpu, model, "bf16", 1, 0.0)
    assert dense_step_s(gpu, model, "bf16", 1, 0.0, prefill=True) - d == pytest.approx(5e-3)


def test_weight_only_kernel_reads_stored_bytes_and_computes_at_its_activations_peak(tmp_path):
    """Hand-worked: int4 weights on the 4090 (which states an int4 tensor peak) through a
    W4A16 kernel (``computes_in: bf16``): a one-token call reads the same int4 bytes as the
    native path; a 4096-token call, compute-bound, runs at the bf16 peak, 8x the native int4
    call's compute time (the datasheet ratio); the vLLM profile runs MXFP4 that way."""
    kernels = {"bf16": "native", "int4": {"computes_in": "bf16", "source": "test"}}
    path = _engine_file(tmp_path, **{"gpu.kernels": kernels})
    (tmp_path / "native").mkdir()
    native_path = _engine_file(tmp_path / "native", **{"gpu.kernels": {"bf16": "native", "int4": "native"}})
    _, hw = load_profile("desktop-4090")
    gpu = load_engine(path).apply(hw).devices["node/gpu0"]
    native = load_engine(native_path).apply(hw).devices["node/gpu0"]
    assert gpu.peak_ops_per_s["int4"] == hw.devices["node/gpu0"].peak_ops_per_s["bf16"]
    assert native.peak_ops_per_s["int4"] == hw.devices["node/gpu0"].peak_ops_per_s["int4"]
    model = load_model("mixtral-8x7b")
    wb, fpt = model.expert_bytes("int4"), model.expert_flops_per_token
    assert expert_call_s(gpu, "int4", wb, fpt, 1) == pytest.approx(expert_call_s(native, "int4", wb, fpt, 1), rel=1e-12)
    memory = wb / (gpu.memory_bytes_per_s * gpu.efficiency.memory_fraction)
    fixed = expert_call_s(native, "int4", wb, 0.0, 4096) - memory  # launch + call overhead
    eff = gpu.efficiency.compute_fraction(4096)
    compute = fpt * 4096 / (hw.devices["node/gpu0"].peak_ops_per_s["bf16"] * eff)
    assert compute / 8 > memory  # compute-bound on both paths
    assert expert_call_s(gpu, "int4", wb, fpt * 4096, 4096) == pytest.approx(fixed + compute, rel=1e-9)
    peaks = hw.devices["node/gpu0"].peak_ops_per_s  # int4 1321.2 T, bf16 165.2 T: about 8x
    assert expert_call_s(native, "int4", wb, fpt * 4096, 4096) == pytest.approx(
        fixed + compute * peaks["bf16"] / peaks["int4"], rel=1e-9)
    vllm = load_engine("vllm").kind_spec("gpu").kernels["mxfp4"]
    assert vllm.computes_in == "bf16" and "mxfp4.py" in vllm.source


def test_token_overhead_prices_each_token_past_the_first_in_every_layer(tmp_path):
    """Hand-worked: a 30 us per-token layer cost adds (P - 1) x 30 us per hidden layer to a
    P-token step, nothing to a one-token step; without it the price is the roofline's."""
    path = _engine_file(tmp_path, **{"gpu.token_overhead_s": {"value": "30us", "source": "test"}})
    _, hw = load_profile("desktop-4090")
    model = load_model("mixtral-8x7b")
    (tmp_path / "bare").mkdir()
    gpu = load_engine(path).apply(hw).devices["node/gpu0"]
    bare = load_engine(_engine_file(tmp_path / "bare")).apply(hw).devices["node/gpu0"]
    assert gpu.token_overhead_s == pytest.approx(30e-6) and bare.token_overhead_s == 0.0
    for tokens, prefill in ((1, False), (1, True), (64, True), (8, False)):
        extra = dense_step_s(gpu, model, "bf16", tokens, 0.0, prefill) - dense_step_s(bare, model, "bf16", tokens, 0.0,
                                                                                   prefill)
        assert extra == pytest.approx(model.num_hidden_layers * (tokens - 1) * 30e-6, abs=1e-15)


def test_fused_experts_launch_per_moe_layer_not_per_expert_call():
    """A fused-MoE engine (llama.cpp's MUL_MAT_ID, vLLM/SGLang fused_moe, kTransformers' CPU
    op): an expert call pays its framework cost but no kernel launch; each MoE layer's dense
    step pays FUSED_MOE_LAUNCHES launches instead. An eager per-expert engine is unchanged."""
    from profiles.perf import FUSED_MOE_LAUNCHES

    assert {e for e, p in bundled_engines().items() if load_engine(p).profile.fused_experts
            and load_engine(p).profile.fused_experts.value} == {"llama.cpp", "ik_llama.cpp", "vllm", "sglang",
                                                           "ktransformers"}
    _, hw = load_profile("desktop-4090")
    model = load_model("qwen3-30b-a3b")
    wb, fl = model.expert_bytes("int4"), model.expert_flops_per_token
    fused = load_engine("llama.cpp").apply(hw).devices["node/gpu0"]
    assert fused.fused_experts
    eager = dataclasses.replace(fused, fused_experts=False)
    assert expert_call_s(eager, "int4", wb, fl, 1) - expert_call_s(fused, "int4", wb, fl, 1) == pytest.approx(
        fused.launch_overhead_s, rel=1e-9)
    assert dense_step_s(fused, model, "bf16", 1, 0.0) - dense_step_s(eager, model, "bf16", 1, 0.0) == pytest.approx(
        model.num_moe_layers * FUSED_MOE_LAUNCHES * fused.launch_overhead_s, rel=1e-9)
    assert not load_engine("accelerate").apply(hw).devices["node/gpu0"].fused_experts


def test_pageable_host_memory_slows_host_to_device_copies(tmp_path):
    _, hw = load_profile("desktop-4090")
    pinned = load_engine(_engine_file(tmp_path)).apply(hw)
    pageable = load_engine(_engine_file(tmp_path, host_memory="pageable")).apply(hw)
    a = pinned.route("node/cpu0", "node/gpu0").bottleneck_bytes_per_s
    b = pageable.route("node/cpu0", "node/gpu0").bottleneck_bytes_per_s
    assert b == pytest.approx(0.6 * a)  # PAGEABLE_FRACTION of the pinned Gen4 x16 rate


def test_cpu_kernel_family_and_sockets(tmp_path):
    profile = yaml.safe_load((load_profile("cpu-server-4090")[0].model_dump_json()))
    cpu = next(d for d in profile["nodes"][0]["devices"] if d["kind"] == "cpu")
    cpu.update(isa=["avx2", "avx512"], sockets=2, cross_socket_bytes_per_s=60e9, memory_bytes_per_s=400e9,
               peak_ops_per_s_by_kernel={"avx2": {"bf16": 1e12}, "avx512": {"bf16": 4e12}})
    path = tmp_path / "hw.yaml"
    path.write_text(yaml.safe_dump(profile))
    _, hw = load_profile(path)
    amx = load_engine(_engine_file(tmp_path, **{"cpu.kernel_family": "amx"})).apply(hw)
    c = amx.devices[next(k for k, d in hw.devices.items() if d.kind == "cpu")]
    assert c.peak_ops_per_s["bf16"] == 4e12  # amx asked, the CPU has avx512 at most
    assert c.memory_bytes_per_s == pytest.approx(120e9)  # interleaved: half the reads cross 60 GB/s
    avx2 = load_engine(_engine_file(tmp_path, **{"cpu.kernel_family": "avx2", "cpu.numa": "aware"})).apply(hw)
    c = avx2.devices[c.id]
    assert c.peak_ops_per_s["bf16"] == 1e12 and c.memory_bytes_per_s == 400e9


def test_engine_efficiency_applies_where_the_hardware_states_none(tmp_path):
    eff = {"memory_fraction": 0.9, "compute_max_fraction": 0.2, "source": "test"}
    engine = load_engine(_engine_file(tmp_path, **{"cpu.efficiency": eff}))
    _, bare = load_profile("desktop-4090")
    cpu = next(d for d in engine.apply(bare).devices.values() if d.kind == "cpu")
    assert (cpu.efficiency.memory_fraction, cpu.efficiency.compute_max_fraction) == (0.9, 0.2)
    assert cpu.efficiency.half_tokens == 1.0 and "test" in cpu.efficiency.source  # the rest stays
    # a profile whose CPU efficiency was measured (probe, calibrate) keeps its measurement
    profile = yaml.safe_load(load_profile("desktop-4090")[0].model_dump_json(exclude_none=True))
    dev = next(d for d in profile["nodes"][0]["devices"] if d["kind"] == "cpu")
    dev["efficiency"] = {"memory_fraction": 0.5, "compute_max_fraction": 0.3, "half_tokens": 2.0, "source": "probe"}
    path = tmp_path / "measured.yaml"
    path.write_text(yaml.safe_dump(profile))
    cpu = next(d for d in engine.apply(load_profile(path)[1]).devices.values() if d.kind == "cpu")
    assert (cpu.efficiency.memory_fraction, cpu.efficiency.compute_max_fraction) == (0.5, 0.3)
    # and the prediction follows: a slower CPU memory makes a CPU expert call slower
    slow = load_engine(_engine_file(tmp_path, **{"cpu.efficiency": dict(eff, memory_fraction=0.3)}))
    calls = [expert_call_s(next(d for d in e.apply(bare).devices.values() if d.kind == "cpu"), "int8", 1e8, 1e6, 1)
             for e in (engine, slow)]
    assert calls[1] > calls[0]


def test_apply_is_idempotent_and_refuses_a_second_engine():
    _, hw = load_profile("desktop-4090")
    seen = load_engine("bundle").apply(hw)
    assert load_engine("bundle").apply(seen) is seen
    with pytest.raises(ValueError, match="already seen through"):
        load_engine("vllm").apply(seen)


BAD = [
    ({"name": None}, "name: required key is missing"),
    ({"sources": []}, "sources"),
    ({"gpu.kernels.int4": "maybe"}, "gpu.kernels.int4"),
    ({"gpu.kernels.q9_z": "native"}, "unknown number format 'q9_z'"),
    ({"cpu.kernel_family": "sse4"}, "cpu.kernel_family"),
    ({"cpu.kernel_family": None}, "cpu.kernel_family"),
    ({"gpu.layer_overhead_s": {"value": "-3ms", "source": "x"}}, "must not be negative"),
    ({"gpu.layer_overhead_s": {"value": "3 parsecs", "source": "x"}}, "time"),
    ({"gpu.expert_call_overhead_s": {"value": "1ms"}}, "source"),
    ({"gpu.kernels.int8": {"unpack_weights_per_s": "fast", "source": "x"}}, "invalid rate"),
    ({"gpu.kernels.int8": {"computes_in": "bf17", "source": "test"}}, "bf17"),
    ({"host_memory": "swap"}, "host_memory"),
    ({"placement": "node"}, "placement"),
    ({"sites": ["fetch"]}, "every engine runs resident experts"),
    ({"eviction": []}, "needs an eviction policy"),
    ({"prefetch": ["oracle"]}, "without prefetch"),
    ({"disk_read_fraction": {"value": 1.5, "source": "x"}}, "disk_read_fraction"),
    ({"format_aliases": {"int4": "q4_zz"}}, "format_aliases"),
    ({"cpu.efficiency": {"memory_fraction": 1.4, "source": "x"}}, "cpu.efficiency.memory_fraction"),
    ({"gpu.efficiency": {"memory_fraction": 0.7}}, "source"),
    ({"colour": "blue"}, "unknown key"),
    ({"op_offload": {"min_batch_tokens": 1024, "micro_batch_tokens": 512, "copies": "whole-tensor", "source": "ggml"}},
     "no micro-batch reaches the op offload threshold"),
    ({"op_offload": {"min_batch_tokens": 32, "micro_batch_tokens": 512, "copies": "some", "source": "ggml"}},
     "op_offload.copies"),
    ({"op_offload": {"min_batch_tokens": 0, "micro_batch_tokens": 512, "copies": "whole-tensor", "source": "ggml"}},
     "op_offload.min_batch_tokens"),
]


@pytest.mark.parametrize("changes, needle", BAD, ids=[c[1][:30] for c in BAD])
def test_bad_engine_profiles_get_one_line_and_exit_1(tmp_path, changes, needle):
    path = _engine_file(tmp_path, **changes)
    for args in (["engines", "validate", str(path)], ["optimize", "--engine", str(path)]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 1, (args, res.output)
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in res.output and needle in lines[0], res.output
        assert str(path) in lines[0]


@pytest.mark.parametrize("text", ["", "- a list\n", "name: [unclosed\n"])
def test_malformed_engine_files(tmp_path, text):
    path = tmp_path / "e.yaml"
    path.write_text(text)
    res = CliRunner().invoke(cli, ["engines", "validate", str(path)])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1


def test_unknown_engine_name_is_one_line():
    res = CliRunner().invoke(cli, ["optimize", "--engine", "tensorrt-llm"])
    assert res.exit_code == 1 and "unknown engine" in res.output and "planner engines list" in res.output


def test_engines_cli_list_and_show_json():
    res = CliRunner().invoke(cli, ["--json", "engines", "list"])
    assert res.exit_code == 0
    assert {r["name"] for r in json.loads(res.output)} == set(bundled_engines())
    res = CliRunner().invoke(cli, ["--json", "engines", "show", "llama.cpp"])
    assert json.loads(res.output)["placement"] == "tensor"
    res = CliRunner().invoke(cli, ["engines", "show", "bundle", "--yaml"])
    assert yaml.safe_load(res.output)["name"] == "bundle"


def test_engines_show_renders_every_kernel_path_of_every_bundled_engine():
    """Each path kind (native, unpack, host cost per linear, weight-only) has its table row."""
    for name in bundled_engines():
        res = CliRunner().invoke(cli, ["engines", "show", name])
        assert res.exit_code == 0 and "Traceback" not in res.output, (name, res.output[-400:])
    res = CliRunner().invoke(cli, ["engines", "show", "vllm"])
    assert "weight-only, computes in bf16" in res.output


def test_engines_show_says_which_plan_features_the_engine_runs():
    """The capability flags the planner reads (expert_parallel, uneven_ranks, nested, miss_copy,
    kv_offload) are shown, so a user sees why a flag is refused on an engine."""
    outputs = {e: CliRunner().invoke(cli, ["engines", "show", e]).output for e in ("sglang", "bundle", "roofline")}
    lines = {e: next(x for x in out.splitlines() if x.startswith("also runs:")) for e, out in outputs.items()}
    assert lines["sglang"] == "also runs: expert parallelism"
    assert "nested int8/int4 planes" in lines["bundle"] and "expert parallelism" not in lines["bundle"]
    assert "uneven EP ranks" in lines["roofline"]
    # the bundle's GPU unpacks int8/int4 at every call: said beside nested planes (why plans rarely hold them)
    assert "nested planes run on its GPU's unpack path (int8" in " ".join(outputs["bundle"].split())
    assert "unpack path" not in outputs["roofline"]


@pytest.fixture(scope="module")
def default_result(default_optimize):
    return default_optimize


def test_engine_plans_only_what_it_runs():
    res = optimize(OptimizeRequest(engine="llama.cpp"))
    plan = res.plan
    assert plan.inputs.engine == "llama.cpp" and plan.prefetch == "none"
    sites = {s for layer in plan.layers for s in layer.site}
    assert sites <= {"resident", "local"}
    assert all(layer.cache_slots == 0 for layer in plan.layers)
    for layer in plan.layers:  # per tensor: a layer's experts share one site and one format
        assert len(set(layer.site)) == 1 and len(set(layer.format)) == 1
    # llama.cpp stores int4/int8 as Q4_K/Q8_0: the planner sizes and prices those
    assert {f for layer in plan.layers for f in layer.format} <= {"bf16", "q8_0", "q4_k"}


def test_compare_prices_each_baseline_on_its_own_engine(default_result):
    engines = {name: b.inputs.engine for name, b in default_result.baselines.items()}
    assert engines["llama.cpp"] == "llama.cpp" and engines["accelerate"] == "accelerate"
    assert default_result.plan.inputs.engine == "bundle"


def test_a_baseline_that_wins_on_another_engine_says_how_to_plan_for_it(default_result):
    from planner.report import summary_data

    best = summary_data(default_result, compare=True)["best_baseline"]
    if best["speedup"] < 1 and best["engine"] != "bundle":
        assert f"planner optimize --engine {best['engine']}" in best["hint"]
    else:
        assert best["hint"] is None
    # planned for that engine, the hint goes away: the plan is at least as fast as its baselines there
    if best["hint"]:
        again = summary_data(optimize(OptimizeRequest(engine=best["engine"])), compare=True)["best_baseline"]
        assert again["hint"] is None or again["engine"] != best["engine"]


@pytest.mark.parametrize("name, render", [("llama.cpp", render_llamacpp), ("accelerate", render_accelerate)])
def test_exporter_and_compare_baseline_give_one_price(default_result, name, render):
    """The baseline's placement exported for its engine is priced exactly as --compare prices it."""
    base = default_result.baselines[name]
    _, hw = load_profile("desktop-4090")
    model = load_model("mixtral-8x7b")
    cfg = render(base, model, hw, Pricing(base, model, hw, engine=name))
    rounded = cfg["predicted"]["rounded"]["tokens_per_s"]
    assert rounded == pytest.approx(base.predicted["tokens_per_s"], rel=1e-12)
    if name == "llama.cpp":
        assert cfg["n_cpu_moe"]["predicted"]["tokens_per_s"] == pytest.approx(rounded, rel=1e-12)
        assert f"--n-cpu-moe {cfg['n_cpu_moe']['moe_layers_on_cpu']}" in base.notes[-1]
