"""The engine probe's CPU kernel test (exporters/engine_probe_kernels.py, issue 14): it times
the runtime's own expert kernel on experts that hold more than the last-level cache, fits a
fixed part and a rate, and the efficiency it writes is what prices the bundle's CPU kernels
over a probed (not a calibrated) hardware efficiency. No wall-clock assertions.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import numpy as np
import pytest
import yaml

from exporters.engine_probe import EngineProbeResult, engine_profile_doc
from exporters.engine_probe_kernels import (KernelEfficiency, experts_past_cache, fit_fixed_and_rate,
                                            passes_that_fit, probe_kernel_efficiency)
from profiles.engines import ENGINES_DIR, load_engine
from profiles.hardware import HardwareProfile
from profiles.perf import expert_call_s
from profiles.probe import Figure

MiB = 2**20


def test_experts_cycled_hold_more_than_the_last_level_cache():
    llc, expert = 32 * MiB, 1_622_016  # int8 H=512 I=1024
    n = experts_past_cache(llc, expert)
    assert n * expert >= 2 * llc and (n - 1) * expert < 2 * llc
    assert experts_past_cache(llc, 200 * MiB) == 2  # one expert past the cache: still two to cycle
    assert experts_past_cache(llc, expert, 0.0) == 2


def test_passes_are_counted_from_the_first_pass():
    assert passes_that_fit(1e-3, 10, budget_s=0.035) == 3
    assert passes_that_fit(1e-3, 10, budget_s=0.001) == 1  # at least one
    assert passes_that_fit(1e-6, 10, budget_s=10.0) == 5  # at most MOST_PASSES


def test_fixed_part_and_rate_recovered_from_two_sizes():
    fixed, rate = 70e-6, 15e9
    sizes = [1.6e6, 6.5e6, 9e6]
    got_fixed, got_rate = fit_fixed_and_rate(sizes, [fixed + b / rate for b in sizes])
    assert got_fixed == pytest.approx(fixed) and got_rate == pytest.approx(rate)
    with pytest.raises(ValueError, match="two sizes"):
        fit_fixed_and_rate([1e6, 1e6], [1e-4, 1e-4])
    # times that fall with the bytes (noise on small experts): one rate through the origin
    got_fixed, got_rate = fit_fixed_and_rate([1e6, 2e6], [3e-4, 2e-4])
    assert got_fixed == 0.0 and got_rate == pytest.approx((1e12 + 4e12) / (3e-4 * 1e6 + 2e-4 * 2e6))


def test_real_kernels_are_timed_past_the_given_cache():
    """The runtime's int8 kernel really runs, on a working set over the (given) LLC, at every
    size and token count asked; the reference figures are given, so nothing else is measured."""
    pytest.importorskip("onnxruntime", reason="needs the [runtime] extra")
    llc = 1 * MiB
    k = probe_kernel_efficiency("int8", 20e-6, 0.0, llc_bytes=llc, shapes=((128, 128), (128, 256)), tokens=(1, 4),
                                reference=(20e9, 100e9))
    shapes = k.fit["shapes"]
    assert [(s["hidden"], s["intermediate"]) for s in shapes] == [(128, 128), (128, 256)]
    for s in shapes:
        assert s["working_set_bytes"] >= 2 * llc and s["experts"] == experts_past_cache(llc, s["expert_bytes"])
        assert sorted(s["seconds"]) == ["1", "4"] and all(t > 0 for t in s["seconds"].values())
    assert 0 < k.memory_fraction.value <= 1 and 0 < k.compute_max_fraction.value <= 1
    assert k.memory_fraction.method.startswith("probe (")


def test_a_shape_is_timed_at_its_median_pass():
    """Passes of 1, 9 and 2 units (a clock that says so): the kernel's time is the median pass
    over its experts, 2 units / experts (not the luckiest pass, 1 unit, nor a mean that one
    interrupted pass, 9 units, drags up); the warm-up pass is left out."""
    pytest.importorskip("onnxruntime", reason="needs the [runtime] extra")
    durations = itertools.cycle([1.0, 1.0, 9.0, 2.0])  # warm-up pass, then 3 passes, per (shape, n)
    state = {"t": 0.0, "end": False}

    def clock() -> float:
        if state["end"]:
            state["t"] += next(durations)
        state["end"] = not state["end"]
        return state["t"]

    shapes, tokens = ((128, 128), (128, 256)), (1, 4)
    # budget: 3 warm-up passes' worth per (shape, n) -> 3 timed passes each
    k = probe_kernel_efficiency("int8", 20e-6, 3.0 * len(shapes) * len(tokens), llc_bytes=0.0, shapes=shapes,
                                tokens=tokens, multiple=0.0, reference=(20e9, 100e9), clock=clock)
    for s in k.fit["shapes"]:
        assert s["seconds"] == {"1": pytest.approx(2.0 / s["experts"]), "4": pytest.approx(2.0 / s["experts"])}


# ---------------------------------------------------------------- the profile and its use

PROBED_CPU_EFFICIENCY = {"compute_max_fraction": 0.97, "half_tokens": 1.3, "memory_fraction": 0.87,
                         "points": [[1, 0.34], [16, 0.92], [256, 0.89]],
                         "source": "measured by planner profiles probe: gated FFN H=2048 I=1408 (int4)"}


def hardware_doc(efficiency: dict | None) -> dict:
    cpu = {"name": "cpu0", "kind": "cpu", "memory_bytes": "64GiB", "memory_bytes_per_s": "26.1GB/s",
           "peak_ops_per_s": {"fp32": "164GFLOPS", "int8": "132GOPS", "int4": "196GOPS"},
           "launch_overhead_s": 17e-6, "cores": 2}
    if efficiency is not None:
        cpu["efficiency"] = efficiency
    return {"name": "probed", "nodes": [{"name": "node", "devices": [cpu]}]}


def kernel_result() -> EngineProbeResult:
    def m(value: float, what: str) -> Figure:
        return Figure(value, f"probe ({what}, 2026-12-07, test machine)")

    kernel = KernelEfficiency(memory_fraction=m(0.4, "rate over read"), compute_max_fraction=m(0.42, "fit a"),
                              half_tokens=m(2.0, "fit h"), call_fixed_s=m(85e-6, "fixed part"))
    return EngineProbeResult(device_kind="cpu", layer_overhead_s=m(0.9e-3, "per layer"),
                             expert_call_overhead_s=m(75e-6 + 65e-6, "per call"), decode_step_s=m(2.2e-3, "d"),
                             prefill_step_s=m(4.5e-3, "p"), disk_reads={"cold": m(0.3, "cold")}, launch_s=20e-6,
                             elapsed_s=30.0, kernel=kernel)


@pytest.fixture
def probed_engine(tmp_path):
    base = yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text())
    doc = engine_profile_doc(kernel_result(), base)
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_engine(path)


def test_written_profile_carries_the_kernel_efficiency(probed_engine):
    eff = probed_engine.profile.cpu.efficiency
    assert (eff.memory_fraction, eff.compute_max_fraction, eff.half_tokens) == (0.4, 0.42, 2.0)
    assert eff.source.startswith("probe: ") and "memory_fraction: probe (" in eff.source
    assert load_engine("bundle").profile.cpu.efficiency is None  # the bundled profile states none


def cpu_of(doc: dict, engine):
    hw = engine.apply(HardwareProfile.model_validate(doc).resolve())
    return hw.devices["node/cpu0"]


@pytest.mark.parametrize("hardware_eff", [None, PROBED_CPU_EFFICIENCY], ids=["default", "probed"])
def test_probed_engine_efficiency_prices_the_bundles_cpu_kernels(probed_engine, hardware_eff):
    cpu = cpu_of(hardware_doc(copy.deepcopy(hardware_eff)), probed_engine)
    assert cpu.efficiency.memory_fraction == 0.4 and cpu.efficiency.compute_max_fraction == 0.42
    assert cpu.efficiency.points is None  # the hardware's curve was another kernel's
    expert_bytes, flops = 1_622_016, 2.0 * 3 * 512 * 1024
    memory_s = expert_bytes / (26.1e9 * 0.4)
    for n in (1, 64):  # the engine's shares of the hardware's bandwidth and int8 peak
        compute_s = n * flops / (132e9 * 0.42 * n / (n + 2.0))
        assert expert_call_s(cpu, "int8", expert_bytes, n * flops, n) == pytest.approx(
            max(memory_s, compute_s) + 17e-6 + cpu.expert_call_overhead_s)


def test_a_calibrated_hardware_efficiency_still_wins(probed_engine):
    calibrated = {"compute_max_fraction": 0.5, "half_tokens": 1.0, "memory_fraction": 0.6,
                  "source": "calibrated by planner calibrate"}
    cpu = cpu_of(hardware_doc(calibrated), probed_engine)
    assert (cpu.efficiency.memory_fraction, cpu.efficiency.compute_max_fraction) == (0.6, 0.5)


def test_an_engine_efficiency_not_probed_leaves_a_probed_hardware_one(tmp_path):
    base = yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text())
    base["cpu"]["efficiency"] = {"memory_fraction": 0.5, "source": "estimate: typical"}
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    cpu = cpu_of(hardware_doc(copy.deepcopy(PROBED_CPU_EFFICIENCY)), load_engine(path))
    assert cpu.efficiency.memory_fraction == 0.87 and cpu.efficiency.points is not None
    assert np.isclose(cpu.efficiency.compute_fraction(16), 0.92)


# ---------------------------------------------------------------- the paths' thread counts


@pytest.mark.parametrize("cores", [2, 1])
def test_each_cpu_expert_path_is_timed_at_the_runtimes_threads(monkeypatch, cores):
    """The runtime runs resident and CPU-local experts in the layer's session on every thread
    and a cached expert in a session of its own on CACHED_EXPERT_THREADS: the probe builds its
    sessions so, one kernel figure per path (the cached one only where its threads differ)."""
    pytest.importorskip("onnxruntime", reason="needs the [runtime] extra")
    import exporters.runtime.kernels as rk
    from exporters.engine_probe_kernels import probe_runtime_kernels

    built = []

    class Recorded(rk.CpuLayerKernel):
        def __init__(self, *args, threads=None, **kw):
            built.append(threads)
            super().__init__(*args, threads=threads, **kw)

    monkeypatch.setattr(rk, "CpuLayerKernel", Recorded)
    monkeypatch.setattr(rk, "default_threads", lambda: cores)
    past, cached = probe_runtime_kernels("int8", 20e-6, 0.0, llc_bytes=0.0, shapes=((128, 128), (128, 256)),
                                         tokens=(1, 4), multiple=0.0, reference=(20e9, 100e9))
    assert past.fit["threads"] == cores
    if cores > rk.CACHED_EXPERT_THREADS:
        assert cached.fit["threads"] == rk.CACHED_EXPERT_THREADS
        assert (cached.fit["read_bytes_per_s"], cached.fit["peak_ops_per_s"]) == (20e9, 100e9)  # the same reference
        assert sorted(set(built)) == sorted({cores, rk.CACHED_EXPERT_THREADS})
        assert f"{rk.CACHED_EXPERT_THREADS} thread)" in cached.memory_fraction.method
    else:
        assert cached is None and set(built) == {cores}


def test_written_profile_carries_the_cached_experts_efficiency(tmp_path):
    def m(value: float, what: str) -> Figure:
        return Figure(value, f"probe ({what}, 1 thread)")

    result = kernel_result()
    own = KernelEfficiency(memory_fraction=m(0.25, "rate"), compute_max_fraction=m(0.3, "a"), half_tokens=m(3.0, "h"),
                           call_fixed_s=m(90e-6, "fixed"))
    base = yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text())
    doc = engine_profile_doc(dataclasses.replace(result, cached_kernel=own), base)
    assert doc["cpu"]["cached_efficiency"]["memory_fraction"] == 0.25
    assert "cached expert's own session" in doc["cpu"]["cached_efficiency"]["source"]
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    cpu = cpu_of(hardware_doc(None), load_engine(path))
    assert (cpu.efficiency.memory_fraction, cpu.cached_efficiency.memory_fraction) == (0.4, 0.25)
    # re-probed where the paths share their threads: no cached figure is left from before
    assert "cached_efficiency" not in engine_profile_doc(result, doc)["cpu"]
