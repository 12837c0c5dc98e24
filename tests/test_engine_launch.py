"""Kernel launches as the engine pays them: an engine that replays its decode step as a CUDA
graph (llama.cpp, vLLM, SGLang, kTransformers) states its own per-launch seconds in place of
the hardware profile's eager figure, on the vendors whose backend has graphs; an engine that
states none (the bundle, accelerate) keeps the hardware's. Held to hand-worked figures, and bad
values get the one-line error contract (exit 1)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from click.testing import CliRunner

from planner.cli import cli
from profiles.engines import bundled_engines, load_engine
from profiles.hardware import DEFAULT_LAUNCH_OVERHEAD_S, load_profile
from profiles.models import load_model
from profiles.perf import FUSED_MOE_LAUNCHES, dense_step_s

GRAPH_ENGINES = ("llama.cpp", "vllm", "sglang", "ktransformers")


def _gpu(hw):
    return next(d for d in hw.devices.values() if d.kind == "gpu")


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_graph_engines_price_a_launch_below_an_eager_one(engine):
    _, hw = load_profile("workstation-3090")
    spec = load_engine(engine).profile.gpu.launch_overhead_s
    assert spec is not None and spec.source
    gpu = _gpu(load_engine(engine).apply(hw))
    assert gpu.launch_overhead_s == pytest.approx(spec.value)
    assert gpu.launch_overhead_s < DEFAULT_LAUNCH_OVERHEAD_S["gpu"] / 4


@pytest.mark.parametrize("engine", ("bundle", "accelerate"))
def test_eager_engines_keep_the_hardware_launch(engine):
    _, hw = load_profile("workstation-3090")
    assert _gpu(load_engine(engine).apply(hw)).launch_overhead_s == _gpu(hw).launch_overhead_s


def test_dense_step_saves_exactly_the_launches():
    """gpt-oss-20b on an RTX 3090 through llama.cpp: the dense step differs from the same
    engine with eager launches by (the dense weights' roofline call + 2 per hidden layer + the
    fused MoE kernel's per MoE layer) x (eager - graph node) seconds, and nothing else."""
    _, hw = load_profile("workstation-3090")
    model = load_model("gpt-oss-20b")
    graph = _gpu(load_engine("llama.cpp").apply(hw))
    eager = dataclasses.replace(graph, launch_overhead_s=_gpu(hw).launch_overhead_s)
    launches = 1 + 2 * model.num_hidden_layers + FUSED_MOE_LAUNCHES * model.num_moe_layers
    saved = dense_step_s(eager, model, "bf16", 1, 0.0) - dense_step_s(graph, model, "bf16", 1, 0.0)
    assert saved == pytest.approx(launches * (eager.launch_overhead_s - graph.launch_overhead_s), rel=1e-9)
    assert saved > 1e-3  # 121 launches: over a millisecond of a ~5 ms step


def test_launch_applies_only_on_its_vendors():
    """llama.cpp's ROCm build has no HIP graphs by default: an AMD GPU keeps the eager launch,
    an NVIDIA one (or one whose vendor is not stated) gets the graph node's."""
    _, hw = load_profile("workstation-3090")
    engine = load_engine("llama.cpp")
    assert engine.profile.gpu.launch_overhead_s.vendors == ["nvidia"]
    for vendor, graphs in (("amd", False), ("nvidia", True), (None, True)):
        devices = {k: dataclasses.replace(d, vendor=vendor) if d.kind == "gpu" else d for k, d in hw.devices.items()}
        gpu = _gpu(engine.apply(dataclasses.replace(hw, devices=devices)))
        expect = engine.profile.gpu.launch_overhead_s.value if graphs else _gpu(hw).launch_overhead_s
        assert gpu.launch_overhead_s == pytest.approx(expect), vendor


@pytest.mark.parametrize("launch, needle", [
    ({"value": "-2us", "source": "test"}, "must not be negative"),
    ({"value": "2us"}, "source"),
    ({"value": "2us", "source": "test", "vendors": ["acme"]}, "gpu.launch_overhead_s.vendors"),
])
def test_bad_launch_values_get_one_line_and_exit_1(tmp_path, launch, needle):
    data = json.loads(json.dumps(yaml.safe_load(bundled_engines()["llama.cpp"].read_text())))
    data["gpu"]["launch_overhead_s"] = launch
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(cli, ["engines", "validate", str(path)])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output and needle in lines[0], res.output
    assert str(path) in lines[0]
