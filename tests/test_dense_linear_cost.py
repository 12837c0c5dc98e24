"""A dense-only per-linear host cost (issue 14): the bundle runs each int8/int4 dense matrix on
a CPU as its own ONNX Runtime call (4 per hidden layer and the head), which the engine probe's
H = 64 grid holds at its tiny, cache-resident size only. The probe times that one-matmul session
past the caches (not the expert's: two matmuls and the activation, whose fixed part priced the
calibration model's int8 dense step 2.8 ms above the runtime) and writes its fixed part beyond
the tiny call as ``kernels.int8: {host_s_per_linear, experts: false}``; the dense step pays it
per linear call, an expert call does not (its ``expert_call_overhead_s`` holds its own).
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from exporters.engine_probe import EngineProbeResult, dense_linear_s, engine_profile_doc
from exporters.engine_probe_kernels import DenseLinearCost, KernelEfficiency, probe_dense_linear
from profiles.engines import ENGINES_DIR, LinearHost, load_engine
from profiles.hardware import HardwareProfile
from profiles.models import load_model
from profiles.perf import dense_step_s, expert_call_s
from profiles.probe import Figure

FIXED, LAUNCH = 35e-6, 20e-6  # the dense linear's fixed part past the caches, the tiny call
EXPERT_FIXED = 95e-6  # the expert kernel's fixed part past the caches: not a dense linear's


def probe_result() -> EngineProbeResult:
    def m(value: float, what: str) -> Figure:
        return Figure(value, f"probe ({what}, 2026-12-07, test machine)")

    kernel = KernelEfficiency(memory_fraction=m(0.4, "rate"), compute_max_fraction=m(0.5, "a"), half_tokens=m(2.0, "h"),
                              call_fixed_s=m(EXPERT_FIXED, "fixed part"), fit={"fmt": "int8"})
    dense = DenseLinearCost(host_s=m(FIXED - LAUNCH, "dense linear's fixed part less the tiny call"),
                            fit={"fmt": "int8"})
    return EngineProbeResult(device_kind="cpu", layer_overhead_s=m(0.9e-3, "layer"),
                             expert_call_overhead_s=m(140e-6, "call"), decode_step_s=m(0.6e-3, "d"),
                             prefill_step_s=m(0.8e-3, "p"), disk_reads={"cold": m(0.3, "cold")}, launch_s=LAUNCH,
                             elapsed_s=30.0, kernel=kernel, dense_linear=dense)


@pytest.fixture
def engines(tmp_path):
    """(the bundled bundle engine, the same with the probe's figures written in)."""
    base = yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text())
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(engine_profile_doc(probe_result(), base), sort_keys=False))
    return load_engine("bundle"), load_engine(path)


def cpu_hardware():
    doc = {"name": "box", "nodes": [{"name": "node", "devices": [
        {"name": "cpu0", "kind": "cpu", "memory_bytes": "64GiB", "memory_bytes_per_s": "20GB/s",
         "peak_ops_per_s": {"fp32": "100GFLOPS", "int8": "50GOPS", "int4": "50GOPS"}, "launch_overhead_s": LAUNCH,
         "cores": 2}]}]}
    return HardwareProfile.model_validate(doc).resolve()


def test_probe_writes_the_dense_linear_cost_for_int8_and_int4(engines):
    _, probed = engines
    assert dense_linear_s(probe_result()) == pytest.approx(FIXED - LAUNCH)
    for fmt in ("int8", "int4"):
        path = probed.profile.cpu.kernels[fmt]
        assert isinstance(path, LinearHost) and not path.experts
        assert path.host_s_per_linear == pytest.approx(FIXED - LAUNCH, rel=1e-3)
        assert path.source.startswith("probe (dense linear's fixed part")
        assert probed.supports("cpu", fmt)
    assert dense_linear_s(dataclasses.replace(probe_result(), dense_linear=None)) == 0.0


def test_the_dense_linear_cost_is_the_dense_sessions_not_the_expert_kernels():
    """The expert kernel's fixed part (two matmuls and the activation in one session) is not
    what a dense linear pays: without a timed dense linear nothing is written, and a fixed
    part no larger than the tiny call leaves int8/int4 native, dropping an earlier probe's cost."""
    base = yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text())
    no_dense = engine_profile_doc(dataclasses.replace(probe_result(), dense_linear=None), base)
    assert no_dense["cpu"].get("kernels", {}).get("int8", "native") == "native"
    earlier = engine_profile_doc(probe_result(), base)
    assert "host_s_per_linear" in earlier["cpu"]["kernels"]["int8"]
    free = DenseLinearCost(host_s=Figure(0.0, "probe (no cost past the tiny call)"), fit={"fmt": "int8"})
    again = engine_profile_doc(dataclasses.replace(probe_result(), dense_linear=free), earlier)
    assert again["cpu"]["kernels"]["int8"] == again["cpu"]["kernels"]["int4"] == "native"


def test_probe_times_the_runtimes_dense_linear_session_and_fits_its_fixed_part(monkeypatch):
    """Every timed call is the runtime's one-matmul dense session (``CpuMatMulKernel`` of
    ``matmul_template``, K = N of each size) on one token; with calls that take ``fixed + bytes
    / rate`` on a counted clock, the fit gives back ``fixed``, less the tiny call."""
    from exporters.runtime import kernels as runtime_kernels

    clock = {"now": 0.0}
    built, calls = [], []
    fixed, rate, launch = 30e-6, 20e9, 12e-6

    class Counted(runtime_kernels.CpuMatMulKernel):
        def __init__(self, template, arrays, threads=None):
            super().__init__(template, arrays, threads)
            self.nbytes = sum(a.nbytes for a in arrays.values())
            built.append((template.graph.node[0].op_type, arrays["w.q"].shape[0]))

        def run(self, x):
            calls.append(x.shape)
            clock["now"] += fixed + self.nbytes / rate
            return super().run(x)

    monkeypatch.setattr(runtime_kernels, "CpuMatMulKernel", Counted)
    cost = probe_dense_linear("int8", launch, 0.0, llc_bytes=1.0, sizes=(128, 256), multiple=0.0,
                              clock=lambda: clock["now"])
    assert {op for op, _ in built} == {"MatMulNBits"}
    assert sorted({n for _, n in built}) == [128, 256] and len(built) == 4  # two matrices of each size
    assert {shape for shape in calls} == {(1, 128), (1, 256)}
    assert cost.fit["fixed_s"] == pytest.approx(fixed, rel=1e-6)
    assert cost.fit["rate_bytes_per_s"] == pytest.approx(rate, rel=1e-6)
    assert cost.host_s.value == pytest.approx(fixed - launch, rel=1e-6)
    assert [s["matrices"] for s in cost.fit["sizes"]] == [2, 2]


def test_dense_step_pays_it_per_linear_and_expert_calls_do_not(engines):
    bare, probed = engines
    model = load_model("mixtral-8x7b")
    before, after = (e.apply(cpu_hardware()).devices["node/cpu0"] for e in engines)
    after_same_overheads = dataclasses.replace(after, layer_overhead_s=before.layer_overhead_s,
                                               token_overhead_s=before.token_overhead_s,
                                               step_overhead_s=before.step_overhead_s,
                                               prefill_step_overhead_s=before.prefill_step_overhead_s,
                                               efficiency=before.efficiency)
    linears = model.num_hidden_layers * 4 + 1  # q, k, v, o of every hidden layer and the head
    for fmt in ("int8", "int4"):
        for tokens, prefill in ((1, False), (12, True)):
            gap = (dense_step_s(after_same_overheads, model, fmt, tokens, 1e6, prefill)
                   - dense_step_s(before, model, fmt, tokens, 1e6, prefill))
            assert gap == pytest.approx(linears * (FIXED - LAUNCH), rel=1e-3)
    # a float dense step runs torch matmuls: nothing added
    assert dense_step_s(after_same_overheads, model, "bf16", 1, 1e6) == dense_step_s(before, model, "bf16", 1, 1e6)
    # an expert call pays its own call overhead, not the dense linears' cost
    bytes_, flops = model.expert_bytes("int8"), model.expert_flops_per_token
    same_call = dataclasses.replace(after_same_overheads, expert_call_overhead_s=before.expert_call_overhead_s)
    assert expert_call_s(same_call, "int8", bytes_, flops, 1) == expert_call_s(before, "int8", bytes_, flops, 1)
    assert after.linear_host_s == {} and set(after.dense_linear_host_s) == {"int8", "int4"}


def test_a_host_path_for_experts_too_keeps_its_digest_and_its_price():
    """``experts`` is left out of the dump at its default (true), so the profiles that state a
    per-linear host cost for experts and dense alike (transformers' fp8) keep their digest."""
    path = LinearHost.model_validate({"host_s_per_linear": "30us", "source": "a public measurement"})
    assert path.experts and "experts" not in path.model_dump()
    dense_only = LinearHost.model_validate({"host_s_per_linear": "30us", "experts": False, "source": "probe"})
    assert dense_only.model_dump()["experts"] is False
