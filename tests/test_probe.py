"""`planner profiles probe`: the measured profile loads, its figures are plausible, the fit
gives back the measured call times, and the CLI refuses what it must.

The probe runs in its TINY mode (small arrays, a few seconds); no test asserts a duration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import pytest

from profiles import probe as P
from profiles.hardware import Device, EfficiencySpec, load_profile
from profiles.probe import run as probe_run
from profiles.probe.budget import PLANNED_FRACTION, Steps, best_s, dim_that_fits, size_that_fits, tokens_that_fit
from profiles.probe.cpu_gemm import _cpu_gemms
from profiles.probe.disk import _read_uncached
from profiles.probe.efficiency import _fit_saturating
from profiles.probe.gpu import _probe_gpus
from profiles.probe.host import kernel_families
from profiles.perf import expert_call_s

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """One TINY probe of this machine, its disk figure taken in a fresh temporary directory."""
    where = tmp_path_factory.mktemp("disk")
    return P.probe(where, P.TINY), where


def _write(result, tmp_path, name="probed"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(P.render_profile_yaml(result, name))
    return path


def test_probed_profile_loads_with_plausible_figures(probed, tmp_path):
    result, where = probed
    path = _write(result, tmp_path)
    _, hw = load_profile(path)
    cpu = hw.devices["node/cpu0"]
    assert cpu.kind == "cpu" and cpu.model == result.cpu.model
    assert cpu.cores == len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpu.cores >= 1
    assert 2**28 <= cpu.memory_bytes <= result.cpu.memory_bytes.value  # rounded down, never up
    assert 1e8 < cpu.memory_bytes_per_s < 1e13  # a slow VM's DRAM .. HBM
    assert 1e8 < result.cpu.dram_copy_bytes_per_s.value < 1e13
    assert 1e8 < cpu.peak_ops_per_s["fp32"] < 1e15
    for fmt, peak in cpu.peak_ops_per_s.items():
        assert 1e7 < peak < 1e16, fmt
    assert 1e-7 < cpu.launch_overhead_s < 0.1
    eff = cpu.efficiency
    assert eff.points is not None and "probe" in eff.source
    tokens = [n for n, _ in eff.points]
    assert tokens == sorted(tokens) == list(P.TINY.ffn_tokens)
    assert all(0 < f <= 1 for _, f in eff.points) and 0 < eff.memory_fraction <= 1
    disk = hw.devices["node/disk0"]
    assert 1e6 < disk.memory_bytes_per_s < 1e12 and disk.memory_bytes > 0
    assert hw.route("node/disk0", "node/cpu0").bottleneck_bytes_per_s == pytest.approx(disk.memory_bytes_per_s)
    assert not list(where.glob(".planner-probe-*")), "the disk test file was left behind"


def test_every_figure_says_how_it_was_measured(probed, tmp_path):
    result, _ = probed
    text = P.render_profile_yaml(result, "probed")
    profile, _ = load_profile(_write(result, tmp_path))
    keys = {s.split(":", 1)[0] for s in profile.sources[1:]}
    assert {"cpu0.cores", "cpu0.memory_bytes", "cpu0.memory_bytes_per_s", "cpu0.peak_ops_per_s.fp32",
            "cpu0.launch_overhead_s", "cpu0.efficiency", "disk0.memory_bytes_per_s"} <= keys
    for line in text.splitlines():
        if line.strip().startswith(("memory_bytes_per_s:", "cores:", "launch_overhead_s:")):
            assert "  # " in line, line  # the method beside the figure
    assert "O_DIRECT" in text or "posix_fadvise" in text or "F_NOCACHE" in text


def test_optional_libraries_are_skipped_with_a_reason(monkeypatch, tmp_path):
    real = probe_run._optional

    def without(name):
        return (None, f"{name} is not installed (test)") if name in ("torch", "onnxruntime") else real(name)

    monkeypatch.setattr(probe_run, "_optional", without)
    result = P.probe(tmp_path, P.TINY)
    assert set(result.cpu.peak_ops_per_s) == {"fp32"}
    assert "numpy" in result.cpu.peak_ops_per_s["fp32"].method
    assert {"bf16", "int8", "int4"} <= set(result.cpu.skipped) and "torch" in result.skipped
    assert result.cpu.efficiency.format == "fp32" and result.gpus == ()
    _, hw = load_profile(_write(result, tmp_path))
    assert hw.devices["node/cpu0"].peak_ops_per_s.keys() == {"fp32"}


def test_a_disk_that_cannot_be_written_is_skipped_not_fatal(monkeypatch, tmp_path):
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(probe_run, "_probe_disk", full)
    result = P.probe(tmp_path, P.TINY)
    assert result.disk is None and "No space left" in result.skipped["disk"]
    _, hw = load_profile(_write(result, tmp_path))
    assert not hw.devices_of_kind("nvme")


def test_profiles_package_does_not_import_torch_or_onnxruntime():
    code = "import sys, profiles.probe; print(sorted({'torch', 'onnxruntime'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _device(fit: P.EfficiencyFit, peak: float, read_bytes_per_s: float, fmt: str = "int4") -> Device:
    eff = EfficiencySpec(compute_max_fraction=fit.compute_max_fraction, half_tokens=fit.half_tokens,
                         memory_fraction=fit.memory_fraction, points=fit.points)
    return Device(id="n/cpu0", node="n", name="cpu0", kind="cpu", model="", memory_bytes=1e11,
                  memory_bytes_per_s=read_bytes_per_s, peak_ops_per_s={fmt: peak},
                  launch_overhead_s=fit.launch_overhead_s, efficiency=eff, cores=8, power_w=None,
                  price_per_hour_usd=None)


def test_fit_gives_back_the_measured_call_times():
    # an int4 expert, H=2048 I=1408: 4.6 MB, 17.3 MFLOP per token; 20 GB/s DRAM, 300 GOPS peak
    flops_per_token, weight_bytes, read, peak, overhead = 2 * 3 * 2048 * 1408, 4.6e6, 20e9, 300e9, 12e-6
    call_s = {"int4": {1: 0.40e-3, 2: 0.42e-3, 4: 0.50e-3, 8: 0.70e-3, 16: 1.10e-3, 32: 2.0e-3, 64: 3.9e-3,
                       128: 7.7e-3, 256: 15.5e-3},
              "fp32": {1: 2.1e-3, 256: 30e-3}}
    fit = P.fit_efficiency(call_s, {"int4": weight_bytes, "fp32": 4 * 3 * 2048 * 1408}, {"int4": overhead,
                           "fp32": 30e-6}, "int4", peak, read, flops_per_token, method="synthetic")
    # the fp32 call streams 34.6 MB in 2.07 ms: 16.7 GB/s, the best share of 20 GB/s
    assert fit.memory_fraction == pytest.approx(4 * 3 * 2048 * 1408 / (2.1e-3 - 30e-6) / read, abs=1e-4)
    assert fit.peak_ops_per_s == peak  # no call beat the GEMM
    dev = _device(fit, peak, read)
    for n, t in call_s["int4"].items():
        assert expert_call_s(dev, "int4", weight_bytes, flops_per_token * n, n) == pytest.approx(t, rel=2e-3), n


def test_fit_raises_the_peak_a_call_beat_and_clamps_fractions():
    fit = P.fit_efficiency({"fp32": {1: 1e-3, 2: 1e-3}}, {"fp32": 1e9}, {"fp32": 0.0}, "fp32", 1e9, 1e9,
                           flops_per_token=1e6, method="synthetic")
    assert fit.peak_ops_per_s == pytest.approx(2e9)  # 2 tokens x 1 MFLOP in 1 ms beat the 1 GFLOPS "peak"
    assert fit.points == ((1, 0.5), (2, 1.0))
    assert fit.memory_fraction == 1.0  # 1 GB in 1 ms at 1 GB/s would be 1000x: clamped,
    assert fit.stream_bytes_per_s == pytest.approx(1e12)  # and the bandwidth to raise to


def test_saturating_fit_recovers_its_parameters():
    ns = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    a, h = _fit_saturating(ns, [0.6 * n / (n + 8.0) for n in ns])
    assert a == pytest.approx(0.6, rel=0.02) and h == pytest.approx(8.0, rel=0.05)


def _gpu(indices, model, fp8=True):
    f = P.Figure
    fit = P.EfficiencyFit(format="bf16", points=((1, 0.002), (64, 0.1), (4096, 0.7)), compute_max_fraction=0.7,
                          half_tokens=300.0, memory_fraction=0.85, peak_ops_per_s=7e14, launch_overhead_s=2e-5,
                          call_s={"bf16": {1: 1e-4, 64: 1.2e-4, 4096: 2e-3}}, method="synthetic")
    peaks = {"fp32": f(5e13, "m"), "bf16": f(7e14, "m"), "int8": f(1.2e15, "m")} | ({"fp8": f(1.3e15, "m")} if fp8
                                                                                     else {})
    return P.GpuFigures(indices=tuple(indices), model=model, memory_bytes=f(80 * 2**30, "m"),
                        memory_bytes_per_s=f(3.0e12, "m"), copy_bytes_per_s=f(2.6e12, "m"),
                        h2d_pinned_bytes_per_s=f(52e9, "m"), h2d_pageable_bytes_per_s=f(20e9, "m"),
                        h2d_latency_s=f(9e-6, "m"), peak_ops_per_s=peaks, skipped={"int4": "no kernel"},
                        launch_overhead_s=f(2e-5, "m"), kernel_launch_s=f(4e-6, "m"), efficiency=fit)


@pytest.mark.parametrize("groups, ids", [
    ([([0], "NVIDIA H100 80GB HBM3")], ["gpu0"]),
    ([([0, 1], "NVIDIA H100 80GB HBM3"), ([2], "NVIDIA L4")], ["gpu0", "gpu1", "gpu2"]),
])
def test_gpu_figures_render_to_a_valid_profile(probed, tmp_path, groups, ids):
    # the GPU path is measured only where CUDA is; its YAML is checked everywhere
    result, _ = probed
    gpus = tuple(_gpu(indices, model, fp8=model != "NVIDIA L4") for indices, model in groups)
    _, hw = load_profile(_write(replace(result, gpus=gpus), tmp_path))
    assert sorted(d.name for d in hw.devices_of_kind("gpu")) == ids
    gpu0 = hw.devices["node/gpu0"]
    assert gpu0.peak_ops_per_s["bf16"] == 7e14 and gpu0.launch_overhead_s == pytest.approx(2e-5)
    assert gpu0.efficiency.points[-1] == (4096, 0.7) and gpu0.memory_bytes_per_s == 3e12
    route = hw.route("node/cpu0", f"node/{ids[-1]}")
    assert [l.bytes_per_s for l in route.links] == [52e9] and route.latency_s == pytest.approx(9e-6)


def _cpu_standing_in_for_cuda(torch):
    """A torch whose ``cuda`` namespace runs on the CPU: the GPU code path, executed here."""

    class Event:
        def __init__(self, enable_timing=False):
            self.t = 0.0

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    class FakeTorch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    fake = FakeTorch("torch")
    fake.cuda = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 3,
        get_device_name=lambda i: "Stand-in A" if i < 2 else "Stand-in B",
        get_device_properties=lambda i: types.SimpleNamespace(name=fake.cuda.get_device_name(i), major=9, minor=0),
        set_device=lambda i: None, mem_get_info=lambda i=None: (8 * 2**30, 16 * 2**30), synchronize=lambda: None,
        Event=Event, is_bf16_supported=lambda: True, empty_cache=lambda: None)
    fake.device = lambda *a, **k: torch.device("cpu")
    fake.bfloat16 = fake.float16 = torch.float32  # half matmuls crawl on most CPUs; the path is what counts
    fake.empty = lambda *a, pin_memory=False, **k: torch.empty(*a, **k)
    return fake


def test_gpu_code_path_runs_on_a_cpu_stand_in(probed, tmp_path):
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny CPU ops: threads only add waiting on a busy machine
    try:
        gpus = _probe_gpus(replace(P.TINY, gpu_gemm_dim=128), _cpu_standing_in_for_cuda(torch), share_s=60.0,
                            fair_s=60.0)
    finally:
        torch.set_num_threads(threads)
    assert [(g.indices, g.model) for g in gpus] == [((0, 1), "Stand-in A"), ((2,), "Stand-in B")]
    for g in gpus:
        assert {"fp32", "bf16", "fp16"} <= set(g.peak_ops_per_s) and "int4" in g.skipped
        assert g.h2d_pinned_bytes_per_s.value > 0 and g.memory_bytes_per_s.value > 0
        assert g.efficiency is not None and [n for n, _ in g.efficiency.points] == list(P.TINY.gpu_ffn_tokens)
    _, hw = load_profile(_write(replace(probed[0], gpus=tuple(gpus)), tmp_path))
    assert sorted(d.name for d in hw.devices_of_kind("gpu")) == ["gpu0", "gpu1", "gpu2"]


@pytest.mark.skipif("not __import__('importlib').util.find_spec('torch') "
                    "or not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_gpu_is_measured_when_present(probed, tmp_path):
    result, _ = probed
    assert result.gpus and result.gpus[0].h2d_pinned_bytes_per_s.value > 1e8
    assert "bf16" in result.gpus[0].peak_ops_per_s or "fp16" in result.gpus[0].peak_ops_per_s
    _, hw = load_profile(_write(result, tmp_path))
    assert hw.devices_of_kind("gpu")


def test_pinned_and_pageable_rates_render_on_the_gpu_link(probed, tmp_path):
    result, _ = probed
    profile, hw = load_profile(_write(replace(result, gpus=(_gpu([0], "NVIDIA H100 80GB HBM3"),)), tmp_path))
    (link,) = hw.route("node/cpu0", "node/gpu0").links
    assert (link.bytes_per_s, link.pageable_bytes_per_s) == (52e9, 20e9)  # pinned, pageable
    keys = {s.split(":", 1)[0] for s in profile.sources}
    assert {"gpu0.links[0].bytes_per_s", "gpu0.links[0].pageable_bytes_per_s"} <= keys


# --------------------------------------------------------------------------- CPU kernel families

SPR_FLAGS = "fpu sse2 avx avx2 fma avx512f avx512bw amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize("flags, families", [
    (SPR_FLAGS, ("avx2", "avx512", "amx")),
    ("fpu sse2 avx avx2 fma avx512f amx_tile", ("avx2", "avx512")),  # tiles without a tile multiply
    ("fpu sse2 avx avx2 fma amx_tile amx_int8", ("avx2", "amx")),
    ("fpu sse2 avx avx2 fma", ("avx2",)),
    ("fpu sse2 avx avx2", ()),  # AVX2 kernels need FMA too
    ("fpu sse2 avx", ()),
])
def test_cpuinfo_flags_map_to_kernel_families(flags, families):
    text = f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    got, method = kernel_families(text)
    assert got == families and "/proc/cpuinfo" in method


def test_kernel_families_read_a_file_and_need_a_flags_line(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor : 0\nflags : {SPR_FLAGS}\n")
    assert kernel_families(path)[0] == ("avx2", "avx512", "amx")
    assert kernel_families("processor : 0\nFeatures : fp asimd evtstrm\n") == ((), "")  # arm64: no x86 families
    assert kernel_families(tmp_path / "missing") == ((), "")


def test_measured_peaks_render_under_the_widest_family(probed, tmp_path):
    result, _ = probed
    cpu = replace(result.cpu, isa=("avx2", "avx512"), isa_method="flags in /proc/cpuinfo (test)")
    profile, hw = load_profile(_write(replace(result, cpu=cpu), tmp_path))
    dev = hw.devices["node/cpu0"]
    assert dev.isa == ("avx2", "avx512")
    assert dev.peak_ops_per_s_by_kernel == {"avx512": dev.peak_ops_per_s}
    assert set(dev.peak_ops_per_s) == set(result.cpu.peak_ops_per_s)
    assert {"cpu0.isa", "cpu0.peak_ops_per_s_by_kernel.avx512"} <= {s.split(":", 1)[0] for s in profile.sources}

    without = replace(result.cpu, isa=(), isa_method="flags in /proc/cpuinfo (test)")  # e.g. an old CPU
    _, hw = load_profile(_write(replace(result, cpu=without), tmp_path, "old"))
    assert hw.devices["node/cpu0"].isa == () and hw.devices["node/cpu0"].peak_ops_per_s_by_kernel == {}


# --------------------------------------------------------------------------- time bounds


class FakeClock:
    """A clock that moves only when told: ``advance(s)``."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def test_repeats_stop_before_the_one_that_would_overrun():
    clock, calls = FakeClock(), []

    def call():
        calls.append(clock())
        clock.advance(0.3)

    assert best_s(call, repeats=5, warmup=1, budget_s=1.0, clock=clock) == pytest.approx(0.3)
    assert len(calls) == 3  # warm-up ends at 0.3 s, timed calls at 0.6 and 0.9 s; a 4th would end at 1.2 s
    calls.clear()
    best_s(call, repeats=5, warmup=1, budget_s=0.1, clock=clock)
    assert len(calls) == 2  # one timed call whatever the budget


def test_sizes_fit_their_share():
    # rows of a GEMM at 1 ms per row: 4 calls in 1 s -> 250 rows -> 240 in steps of 16; at most 512
    assert size_that_fits(1e-3, 1.0, calls=4, most=512, least=64, step=16) == 240
    assert size_that_fits(1e-5, 1.0, calls=4, most=512, least=64, step=16) == 512
    assert size_that_fits(1e-1, 1.0, calls=4, most=512, least=64, step=16) is None
    # a disk at 100 MB/s, write + 2 reads in 3 s: 100 MB -> 88 MiB in 8 MiB chunks
    assert size_that_fits(1 / 100e6, 3.0, calls=3, most=2**30, least=2**23, step=2**23) == 88 * 2**20
    # a 1024^3 GEMM took 10 ms; 6 calls in 0.48 s: 8x the work -> 2048
    assert dim_that_fits(0.01, 1024, 0.48, calls=6, most=8192, least=1024) == 2048
    assert dim_that_fits(0.01, 1024, 0.01, calls=6, most=8192, least=1024) is None


def test_curve_keeps_the_tokens_that_fit_spanning_the_range():
    tokens = (1, 2, 4, 8, 16, 32, 64, 128, 256)

    def call_s(n):  # streams its weights up to 16 tokens, compute-bound beyond
        return 1e-3 * max(1.0, n / 16)

    assert tokens_that_fit(tokens, call_s, share_s=1.0) == tokens
    # 3 calls each: 1 (3 ms), 256 (48 ms), 16 (3 ms) fit in 55 ms; 4 (3 ms more) would not
    assert tokens_that_fit(tokens, call_s, share_s=0.055) == (1, 16, 256)
    assert tokens_that_fit(tokens, call_s, share_s=0.01) == (1, 4, 16)  # 256 does not fit: the next ones do
    assert tokens_that_fit(tokens, call_s, share_s=0.0) == (1,)
    assert tokens_that_fit(tokens, call_s, share_s=0.0, least=2) == (1, 256)  # a curve needs its two ends


def test_step_shares_follow_the_clock():
    clock = FakeClock()
    steps = Steps({"a": 1.0, "b": 1.0, "c": 2.0}, None, budget_s=8.0 / PLANNED_FRACTION, clock=clock)  # plans 8 s
    steps.start("a", "")
    assert steps.share_s() == pytest.approx(2.0)  # 8 s * 1/4
    clock.advance(5.0)  # a overran its share
    steps.start("b", "")
    assert steps.share_s() == pytest.approx(1.0)  # 3 s left * 1/3
    clock.advance(0.5)
    steps.start("c", "")
    assert steps.share_s() == pytest.approx(2.5)  # 2.5 s left * 2/2
    assert steps.fair_s() == pytest.approx(4.0)  # 8 s * 2/4, however late c started: what decides "too slow"
    clock.advance(10.0)
    assert steps.share_s() == pytest.approx(0.4)  # the budget is spent: the floor, 10% of the fair share
    steps.close()
    assert steps.times == {"a": 5.0, "b": 0.5, "c": 10.0}


class FakeTensor:
    """Rows and a dtype; what the CPU GEMM step does with a tensor."""

    def __init__(self, rows: int, dtype: str) -> None:
        self.rows, self.dtype = rows, dtype

    def __getitem__(self, rows: slice) -> "FakeTensor":
        return FakeTensor(len(range(self.rows)[rows]), self.dtype)

    def to(self, dtype: str) -> "FakeTensor":
        return FakeTensor(self.rows, dtype)


def _fake_torch(clock: FakeClock, row_s: dict[str, float], calls: list[tuple[str, int]]):
    """A torch whose matmul takes ``row_s[dtype]`` seconds per activation row on ``clock``."""

    def matmul(x, w):
        calls.append((x.dtype, x.rows))
        clock.advance(x.rows * row_s[x.dtype])

    return types.SimpleNamespace(from_numpy=lambda a: FakeTensor(a.shape[0], "fp32"), matmul=matmul,
                                 bfloat16="bf16")


@pytest.mark.parametrize("bf16_row_s, bf16_rows", [
    (2e-3, [8, 8, 64, 64, 64, 64]),  # grows to 64 rows; 256 (2 s) would not fit the 1.76 s left; 3 repeats
    (3e-2, [8, 8]),  # 64 rows, warmed up and timed, would take 3.8 s, over its fair 2 s: too slow, skipped
    (1.0, [8]),  # the first call alone is over 4x its fair 2 s: not timed again
])
def test_gemm_sizes_adapt_to_the_first_run(bf16_row_s, bf16_rows):
    clock, calls = FakeClock(), []
    torch = _fake_torch(clock, {"fp32": 1e-4, "bf16": bf16_row_s}, calls)
    peaks, skipped = _cpu_gemms(P.QUICK, torch, None, threads=2, share_s=2.0, fair_s=4.0, clock=clock)
    # fp32: the first 8 rows twice, grown to 64, 256 and 512 (QUICK's gemm_m), then 3 repeats
    assert [r for d, r in calls if d == "fp32"] == [8, 8, 64, 256, 512, 512, 512, 512]
    assert peaks["fp32"].value == pytest.approx(2 * 2048 * 2048 / 1e-4) and "512x2048" in peaks["fp32"].method
    assert [r for d, r in calls if d == "bf16"] == bf16_rows
    if bf16_rows[-1] == 64:
        assert "64x2048" in peaks["bf16"].method and "bf16" not in skipped
    else:
        assert "bf16" not in peaks and skipped["bf16"].startswith("too slow")
        assert "64 rows" in skipped["bf16"] and "time budget" in skipped["bf16"]
    assert "onnxruntime is not installed" in skipped["int8"]


def test_a_format_asked_for_alone_is_measured_however_slow():
    """The engine probe needs one format's peak (``only``): a budget that skips that format
    when it is measured among the others (the machine busy) still measures it alone."""
    clock = FakeClock()
    torch = _fake_torch(clock, {"fp32": 1e-4, "bf16": 3e-2}, [])
    _, skipped = _cpu_gemms(P.QUICK, torch, None, threads=2, share_s=2.0, fair_s=4.0, clock=clock)
    assert skipped["bf16"].startswith("too slow")
    calls = []
    torch = _fake_torch(clock, {"fp32": 1e-4, "bf16": 3e-2}, calls)
    peaks, skipped = _cpu_gemms(P.QUICK, torch, None, threads=2, share_s=2.0, fair_s=4.0, clock=clock, only="bf16")
    assert set(peaks) == {"bf16"} and "bf16" not in skipped and "64x2048" in peaks["bf16"].method
    assert {d for d, _ in calls} == {"bf16"}


def test_disk_read_falls_back_to_fadvise_without_o_direct(monkeypatch, tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(2**20))
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    seconds, how = _read_uncached(str(path), 2**20, 2**18)
    assert seconds > 0 and ("posix_fadvise" in how or "F_NOCACHE" in how or "plain" in how)


@pytest.mark.parametrize("out, name", [("my-machine.yaml", "my-machine"), ("my machine!.yaml", "my-machine"),
                                       ("9x.yml", "probed-9x"), ("...yaml", "probed")])
def test_profile_name_from_the_output_file(out, name):
    assert P.profile_name(out) == name


# --------------------------------------------------------------------------- CLI


def test_cli_writes_the_profile_and_prints_json(run_cli, tmp_path):
    out = tmp_path / "my-machine.yaml"
    result = run_cli("--json", "profiles", "probe", "--tiny", "--out", out, "--dir", tmp_path)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # nothing but JSON on stdout
    assert data["file"] == str(out) and data["name"] == "my-machine" and data["mode"] == "tiny"
    assert data["cpu"]["dram_read_bytes_per_s"]["value"] > 0 and data["cpu"]["peak_ops_per_s"]["fp32"]["method"]
    profile, hw = load_profile(out)
    assert profile.name == "my-machine" and "node/cpu0" in hw.devices
    planned = run_cli("--json", "optimize", "--hardware", out, "-m", "olmoe-1b-7b")
    assert planned.exit_code == 0, planned.output  # the planner takes a probed profile as it is

    again = run_cli("profiles", "probe", "--tiny", "--out", out, "--dir", tmp_path)
    assert again.exit_code == 1 and again.stdout == ""
    line = again.stderr.strip()
    assert "\n" not in line and "exists" in line and "--force" in line

    out.write_text("stale")
    forced = run_cli("profiles", "probe", "--tiny", "--out", out, "--dir", tmp_path, "--force", "--name", "box")
    assert forced.exit_code == 0, forced.output
    assert load_profile(out)[0].name == "box" and "wrote" in forced.stdout


@pytest.mark.parametrize("kind, needle", [("missing", "directory not found"), ("file", "not a directory")])
def test_cli_bad_dir_is_one_line_exit_1(run_cli, tmp_path, kind, needle):
    out, bad = tmp_path / "p.yaml", tmp_path / kind
    if kind == "file":
        bad.write_text("not a directory")
    result = run_cli("profiles", "probe", "--tiny", "--out", out, "--dir", bad)
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and needle in line and "--dir" in line
    assert not out.exists()


def test_cli_out_in_a_missing_directory_is_exit_1(run_cli, tmp_path):
    result = run_cli("profiles", "probe", "--tiny", "--out", tmp_path / "nope" / "p.yaml")
    assert result.exit_code == 1 and "directory of the output file not found" in result.stderr
