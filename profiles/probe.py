"""Measure this machine and write it as a hardware profile (`planner profiles probe`).

Legend: H = hidden size, I = expert intermediate size, n = tokens in one expert call,
E = experts cycled through so that their weights do not stay in the caches.

What is measured, and how (every figure keeps its method in :class:`Figure`):

1. the host: CPU model, usable cores, DRAM capacity (``/proc``, ``os``, ``platform``);
2. DRAM read and copy bandwidth: numpy over arrays larger than the caches, one thread per
   core (numpy releases the GIL in reductions and copies), best of N;
3. sequential read bandwidth of the filesystem holding ``directory``: a temporary file is
   written and fsynced, then read with ``O_DIRECT`` (past the page cache), or after
   ``posix_fadvise(DONTNEED)`` where ``O_DIRECT`` is refused; the file is removed;
4. CPU matmul throughput per format: fp32 (torch, else numpy), bf16 (torch), int8 and int4
   (ONNX Runtime ``MatMulNBits``, weights quantised by onnxruntime's own block quantiser),
   each skipped with a reason when its library is missing;
5. the efficiency curve of one gated expert FFN call vs tokens (1, 2, 4, ... 256), cycling
   through E copies of the expert, fitted to :class:`~profiles.hardware.EfficiencySpec`:
   per token count ``fraction(n) = flops(n) / (peak * (t(n) - overhead))`` so that
   :func:`profiles.perf.expert_call_s` gives back the measured call time at every point;
6. with a CUDA GPU (``torch.cuda.is_available()``): host-to-device bandwidth pinned and
   pageable, device memory bandwidth, matmul per format, launch overhead and the same
   FFN efficiency curve, once per distinct GPU model.

torch and onnxruntime are imported inside functions only: ``profiles`` must import without
them (DESIGN.md), and a probe without them measures what it can and says what it skipped.

    result = probe(".", QUICK)
    text = render_profile_yaml(result, name="my-machine")   # loads with load_profile
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import platform
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = [
    "FULL",
    "QUICK",
    "SETTINGS",
    "TINY",
    "CpuFigures",
    "DiskFigures",
    "EfficiencyFit",
    "Figure",
    "GpuFigures",
    "ProbeResult",
    "ProbeSettings",
    "check_directory",
    "check_output",
    "fit_efficiency",
    "probe",
    "profile_name",
    "render_profile_yaml",
    "write_profile",
]

MiB = 2**20
GiB = 2**30
# powers of two from 1 to 256 tokens per expert call: decode (1) up to a prefill chunk
CPU_FFN_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GPU_FFN_TOKENS = CPU_FFN_TOKENS + (512, 1024, 2048, 4096)
# MatMulNBits quantisation block: the GPTQ/AWQ group of profiles.formats (int4, int8)
BLOCK_SIZE = 128


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ProbeSettings:
    """Sizes and repeats of one probe mode. Bigger arrays and more repeats, steadier figures.

    Attributes:
        mode: ``"full"``, ``"quick"`` or ``"tiny"`` (tests: seconds, rough figures).
        dram_bytes: size of each DRAM test array (two are allocated); larger than the caches.
        dram_repeats: best of this many passes.
        disk_bytes: size of the temporary file read back from the disk.
        disk_repeats: reads of it (each past the page cache), best kept.
        gemm_m: rows of the activations in a throughput GEMM; gemm_k = gemm_n = gemm_dim.
        gemm_dim: inner and output dimension of the throughput GEMM.
        gemm_repeats: best of this many GEMMs.
        gemm_budget_s: fewer repeats once one format's GEMMs took this long (at least one).
        ffn_hidden: H of the probed CPU expert (2048: DeepSeek-V2-Lite, Qwen1.5-MoE).
        ffn_intermediate: I of the probed CPU expert (1408, a multiple of 128).
        ffn_tokens: token counts of the CPU efficiency curve.
        ffn_other_tokens: token counts timed for the formats whose curve is not written.
        ffn_working_set_bytes: expert weights cycled through per format (past the caches).
        ffn_point_s: time spent on one token count of the curve, at least 3 calls.
        ffn_formats: formats whose FFN curve is measured (the profile uses one, see
            :data:`CURVE_PREFERENCE`; the others are reported in the JSON only).
        gpu_transfer_bytes: host-to-device copy size.
        gpu_copy_bytes: device-to-device array size for memory bandwidth.
        gpu_gemm_dim: M = K = N of the GPU throughput GEMMs.
        gpu_ffn_hidden, gpu_ffn_intermediate: the GPU expert (Mixtral-8x7B: 4096, 14336).
        gpu_ffn_tokens: token counts of the GPU efficiency curve.
        gpu_ffn_working_set_bytes: GPU expert weights cycled through (past the L2).
        gpu_repeats: best of this many timings of each GPU figure.
        cache_multiple: the DRAM arrays are at least this many times the last-level cache,
            and the CPU expert working set too (up to ``ffn_working_set_bytes``); 0: sizes as given.
    """

    mode: str
    dram_bytes: int
    dram_repeats: int
    disk_bytes: int
    disk_repeats: int
    gemm_m: int
    gemm_dim: int
    gemm_repeats: int
    gemm_budget_s: float
    ffn_hidden: int
    ffn_intermediate: int
    ffn_tokens: tuple[int, ...]
    ffn_other_tokens: tuple[int, ...]
    ffn_working_set_bytes: int
    ffn_point_s: float
    ffn_formats: tuple[str, ...]
    gpu_transfer_bytes: int
    gpu_copy_bytes: int
    gpu_gemm_dim: int
    gpu_ffn_hidden: int
    gpu_ffn_intermediate: int
    gpu_ffn_tokens: tuple[int, ...]
    gpu_ffn_working_set_bytes: int
    gpu_repeats: int
    cache_multiple: float


FULL = ProbeSettings(
    mode="full", dram_bytes=512 * MiB, dram_repeats=5, disk_bytes=1 * GiB, disk_repeats=2,
    gemm_m=1024, gemm_dim=2048, gemm_repeats=5, gemm_budget_s=1.0,
    ffn_hidden=2048, ffn_intermediate=1408, ffn_tokens=CPU_FFN_TOKENS, ffn_other_tokens=CPU_FFN_TOKENS,
    ffn_working_set_bytes=512 * MiB, ffn_point_s=0.4, ffn_formats=("fp32", "bf16", "int8", "int4"),
    gpu_transfer_bytes=512 * MiB, gpu_copy_bytes=1 * GiB, gpu_gemm_dim=8192,
    gpu_ffn_hidden=4096, gpu_ffn_intermediate=14336, gpu_ffn_tokens=GPU_FFN_TOKENS,
    gpu_ffn_working_set_bytes=1 * GiB, gpu_repeats=5, cache_multiple=2.0,
)
QUICK = replace(
    FULL, mode="quick", dram_bytes=256 * MiB, dram_repeats=3, disk_bytes=256 * MiB, disk_repeats=1,
    gemm_m=512, gemm_repeats=3, gemm_budget_s=0.25,
    ffn_other_tokens=(1,), ffn_working_set_bytes=256 * MiB, ffn_point_s=0.12, ffn_formats=("fp32", "int8", "int4"),
    gpu_transfer_bytes=128 * MiB, gpu_copy_bytes=256 * MiB, gpu_gemm_dim=4096, gpu_ffn_tokens=GPU_FFN_TOKENS[:11],
    gpu_ffn_working_set_bytes=768 * MiB, gpu_repeats=3, cache_multiple=1.0,
)
# for tests: every code path, small arrays, figures only roughly right
TINY = replace(
    QUICK, mode="tiny", dram_bytes=16 * MiB, dram_repeats=2, disk_bytes=8 * MiB,
    gemm_m=64, gemm_dim=256, gemm_repeats=2, gemm_budget_s=0.05,
    ffn_hidden=256, ffn_intermediate=256, ffn_tokens=(1, 4, 16), ffn_working_set_bytes=1 * MiB, ffn_point_s=0.01,
    gpu_transfer_bytes=8 * MiB, gpu_copy_bytes=16 * MiB, gpu_gemm_dim=512, gpu_ffn_hidden=256,
    gpu_ffn_intermediate=512, gpu_ffn_tokens=(1, 4, 16), gpu_ffn_working_set_bytes=16 * MiB, gpu_repeats=2,
    cache_multiple=0.0,
)
SETTINGS = {s.mode: s for s in (FULL, QUICK, TINY)}

# The CPU curve written to the profile comes from the first of these that was measured:
# the runtime runs CPU-resident experts through ONNX Runtime's quantised kernels (DESIGN.md).
CURVE_PREFERENCE = ("int4", "int8", "fp32", "bf16")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Figure:
    """One measured (or read) quantity, SI units, and how it was obtained."""

    value: float
    method: str


@dataclass(frozen=True)
class EfficiencyFit:
    """A measured efficiency curve in the profile's representation.

    Attributes:
        format: the format the curve was measured in (its peak is the reference).
        points: ``((tokens, fraction of peak), ...)`` as written to ``efficiency.points``.
        compute_max_fraction, half_tokens: least-squares fit of ``a * n / (n + h)``.
        memory_fraction: share of the DRAM/HBM read bandwidth an expert call streams at.
        peak_ops_per_s: the reference peak the fractions are relative to.
        launch_overhead_s: the fixed cost per call taken off before the fit.
        call_s: measured seconds per call, by format then token count.
        method: how, in one line.
        stream_bytes_per_s: the fastest weight streaming of a one-token call, any format.
    """

    format: str
    points: tuple[tuple[int, float], ...]
    compute_max_fraction: float
    half_tokens: float
    memory_fraction: float
    peak_ops_per_s: float
    launch_overhead_s: float
    call_s: dict[str, dict[int, float]]
    method: str
    stream_bytes_per_s: float = 0.0


@dataclass(frozen=True)
class CpuFigures:
    """The host CPU and its DRAM. Peaks are ops/s per format; ``skipped``: format -> why not."""

    model: str
    cores: Figure
    memory_bytes: Figure
    last_level_cache_bytes: Figure
    dram_read_bytes_per_s: Figure
    dram_copy_bytes_per_s: Figure
    peak_ops_per_s: dict[str, Figure]
    skipped: dict[str, str]
    launch_overhead_s: Figure | None
    efficiency: EfficiencyFit | None
    kernel_bytes_factor: dict[str, Figure] = field(default_factory=dict)  # format -> held / stored bytes


@dataclass(frozen=True)
class DiskFigures:
    """The filesystem holding the probed directory, and the block device under it (best effort)."""

    path: str
    device: str
    model: str
    filesystem: str
    capacity_bytes: Figure
    read_bytes_per_s: Figure
    pcie_gen: int | None = None
    pcie_lanes: int | None = None


@dataclass(frozen=True)
class GpuFigures:
    """One GPU model; ``indices`` are the CUDA devices of that model (measured on the first)."""

    indices: tuple[int, ...]
    model: str
    memory_bytes: Figure
    memory_bytes_per_s: Figure
    copy_bytes_per_s: Figure
    h2d_pinned_bytes_per_s: Figure
    h2d_pageable_bytes_per_s: Figure
    h2d_latency_s: Figure
    peak_ops_per_s: dict[str, Figure]
    skipped: dict[str, str]
    launch_overhead_s: Figure
    kernel_launch_s: Figure
    efficiency: EfficiencyFit | None


@dataclass(frozen=True)
class ProbeResult:
    """Everything one probe measured. ``to_dict()`` is the ``--json`` output."""

    mode: str
    host: str
    started_utc: str
    duration_s: float
    steps_s: dict[str, float]
    versions: dict[str, str]
    cpu: CpuFigures
    disk: DiskFigures | None
    gpus: tuple[GpuFigures, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


Progress = Callable[[str, float], None]  # (step description, fraction done)
Source = Callable[[str, "Figure | str"], None]  # records (profile key, how it was measured)


class _Steps:
    """Reports ``(description, fraction done)`` as named steps start; times each step."""

    def __init__(self, weights: dict[str, float], progress: Progress | None) -> None:
        self.weights = weights
        self.total = sum(weights.values())
        self.done = 0.0
        self.progress = progress
        self.times: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def start(self, name: str, description: str) -> None:
        self._finish()
        self._current = (name, time.perf_counter())
        if self.progress:
            self.progress(description, self.done / self.total)

    def _finish(self) -> None:
        if self._current is not None:
            name, t0 = self._current
            self.times[name] = round(time.perf_counter() - t0, 3)
            self.done += self.weights.get(name, 0.0)
            self._current = None

    def close(self) -> None:
        self._finish()
        if self.progress:
            self.progress("done", 1.0)


# --------------------------------------------------------------------------- entry point


def probe(directory: str | Path = ".", settings: ProbeSettings = FULL, progress: Progress | None = None,
          gpus: bool = True) -> ProbeResult:
    """Measure this machine.

    Args:
        directory: a directory on the filesystem whose read bandwidth is measured; a
            temporary file of ``settings.disk_bytes`` is written there and removed.
        settings: :data:`FULL`, :data:`QUICK` or :data:`TINY`.
        progress: called with ``(step description, fraction done in [0, 1])``.
        gpus: probe CUDA GPUs when torch sees any.

    Raises:
        InputError: ``directory`` is missing, not a directory or not writable.
    """
    directory = check_directory(directory)
    started = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    t0 = time.perf_counter()
    steps = _Steps({"libraries": 1.5, "host": 0.1, "dram": 3.0, "disk": 2.0, "gemm": 3.0, "ffn": 8.0,
                    "gpu": 10.0 if gpus else 0.0}, progress)
    steps.start("libraries", "loading torch and onnxruntime")
    torch, torch_why = _optional("torch")
    ort, ort_why = _optional("onnxruntime")
    has_gpu = bool(gpus and torch is not None and _cuda_available(torch))
    if not has_gpu:
        steps.total -= steps.weights.pop("gpu")
    skipped: dict[str, str] = {}
    if torch is None:
        skipped["torch"] = torch_why
    if ort is None:
        skipped["onnxruntime"] = ort_why
    if gpus and torch is not None and not has_gpu:
        skipped["gpu"] = "torch.cuda.is_available() is False"
    elif not gpus:
        skipped["gpu"] = "not requested"

    steps.start("host", "reading CPU and memory facts")
    others = _OtherLoad()
    cores = _usable_cores()
    model = _cpu_model()
    memory = _memory_bytes()
    llc = _last_level_cache()
    settings = _past_the_cache(settings, llc.value)
    threads = _Threads(torch, cores.value)
    try:
        steps.start("dram", "DRAM read and copy bandwidth")
        a = _big_array(settings.dram_bytes)  # float ones: reused as fp32 expert weights
        read = _dram_read(a, settings.dram_repeats, int(cores.value))
        copy = _dram_copy(a, settings.dram_repeats, int(cores.value))

        steps.start("disk", f"disk read bandwidth in {directory}")
        try:
            disk = _probe_disk(directory, settings.disk_bytes, settings.disk_repeats)
            if disk is None:
                skipped["disk"] = "not enough free space in the directory for the test file"
        except OSError as exc:  # a full or read-only filesystem, a quota: the rest still counts
            disk, skipped["disk"] = None, f"the test file could not be written or read ({exc.strerror or exc})"

        steps.start("gemm", "CPU matmul throughput per format")
        peaks, peak_skips = _cpu_gemms(settings, torch, ort, int(cores.value))

        steps.start("ffn", "expert FFN efficiency curve (CPU)")
        efficiency, overhead, held = _cpu_ffn_curve(settings, a, read.value, peaks, torch, ort, int(cores.value))
        del a
    finally:
        threads.restore()
    if efficiency is not None and efficiency.stream_bytes_per_s > read.value:
        read = Figure(efficiency.stream_bytes_per_s,
                      f"raised to the fastest one-token expert call's weight streaming (numpy: "
                      f"{_num(read.value, 'B/s')}, {read.method})")
    if efficiency is not None and efficiency.peak_ops_per_s > peaks[efficiency.format].value:
        old = peaks[efficiency.format]
        peaks[efficiency.format] = Figure(
            efficiency.peak_ops_per_s, old.method + "; raised to the best expert FFN call, which beat the GEMM")
    cpu = CpuFigures(model=model, cores=cores, memory_bytes=memory, last_level_cache_bytes=llc,
                     dram_read_bytes_per_s=read,
                     dram_copy_bytes_per_s=copy, peak_ops_per_s=peaks, skipped=peak_skips,
                     launch_overhead_s=overhead, efficiency=efficiency, kernel_bytes_factor=held)

    gpu_figures: list[GpuFigures] = []
    if has_gpu:
        steps.start("gpu", "GPU transfers, bandwidth, matmul and FFN curve")
        gpu_figures = _probe_gpus(settings, torch)
    steps.close()
    warnings = []
    if disk is not None and disk.filesystem in IN_MEMORY_FILESYSTEMS:
        warnings.append(f"{directory} is on {disk.filesystem}, which lives in memory: disk0 is not a disk; "
                        "pass --dir on the disk that will hold expert weights")
    busy = others.share()
    if busy is not None and busy > 0.15:
        warnings.append(f"other processes used {busy:.0%} of the CPU time while the probe ran: figures are lower "
                        "than this machine reaches idle; probe again when it is idle")
    return ProbeResult(
        mode=settings.mode, host=socket.gethostname(), started_utc=started,
        duration_s=round(time.perf_counter() - t0, 2), steps_s=steps.times, versions=_versions(torch, ort),
        cpu=cpu, disk=disk, gpus=tuple(gpu_figures), skipped=skipped, warnings=tuple(warnings))


def check_directory(directory: str | Path) -> Path:
    """The directory to probe the disk in, or an :class:`InputError` saying why it cannot be."""
    path = Path(directory).expanduser()
    if not path.exists():
        raise InputError("directory not found", key="--dir", value=str(directory),
                         fix="name an existing directory on the disk to measure")
    if not path.is_dir():
        raise InputError("not a directory", key="--dir", value=str(directory),
                         fix="name a directory on the disk to measure, not a file")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError("directory is not writable (the probe writes a temporary file there)", key="--dir",
                         value=str(directory), fix="name a directory you can write to on the same disk")
    return path.resolve()


# --------------------------------------------------------------------------- host facts


def _optional(name: str):
    """Import an optional library: ``(module, "")`` or ``(None, why it is unavailable)``."""
    import importlib

    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # noqa: BLE001 - an ImportError, or a broken install failing on import
        return None, f"{name} is not installed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def _cuda_available(torch) -> bool:
    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - a broken driver means no GPU to probe
        return False


def _versions(torch, ort) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        out["moe-planner"] = version("moe-planner")
    except PackageNotFoundError:
        pass
    if torch is not None:
        out["torch"] = torch.__version__
        if _cuda_available(torch) and torch.version.cuda:
            out["cuda"] = str(torch.version.cuda)
    if ort is not None:
        out["onnxruntime"] = ort.__version__
    return out


def _usable_cores() -> Figure:
    try:
        usable = len(os.sched_getaffinity(0))
        how = "os.sched_getaffinity (CPUs this process may run on)"
    except AttributeError:  # macOS, Windows
        usable = os.cpu_count() or 1
        how = "os.cpu_count"
    quota = _cgroup_cpu_quota()
    if quota is not None and quota < usable:
        usable, how = max(1, math.floor(quota)), f"cgroup cpu.max quota ({quota:g} CPUs)"
    logical = os.cpu_count() or usable
    physical = _physical_cores()
    detail = f"{logical} logical" + (f", {physical} physical" if physical else "") + " on the machine"
    return Figure(float(usable), f"{how}; {detail}")


class _OtherLoad:
    """Share of the machine's CPU time that other processes took since construction (Linux)."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), time.process_time(), self._busy_s())

    @staticmethod
    def _busy_s() -> float | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def share(self) -> float | None:
        wall0, own0, busy0 = self.start
        busy1 = self._busy_s()
        if busy0 is None or busy1 is None:
            return None
        wall = time.perf_counter() - wall0
        cpus = os.cpu_count() or 1
        others = (busy1 - busy0) - (time.process_time() - own0)
        return max(0.0, others / (wall * cpus)) if wall > 0 else None


def _cgroup_cpu_quota() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _physical_cores() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    pairs = set(re.findall(r"physical id\s*:\s*(\d+)[\s\S]*?core id\s*:\s*(\d+)", text))
    return len(pairs) or None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _memory_bytes() -> Figure:
    total, how = None, ""
    try:
        m = re.search(r"^MemTotal:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if m:
            total, how = int(m.group(1)) * 1024, "MemTotal in /proc/meminfo"
    except OSError:
        pass
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        how = "sysconf(SC_PHYS_PAGES) x page size"
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max" and int(limit) < total:
            total, how = int(limit), "cgroup memory.max (below the machine's MemTotal)"
    except (OSError, ValueError):
        pass
    return Figure(float(total), how)


def _available_bytes() -> float:
    try:
        m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if m:
            return int(m.group(1)) * 1024.0
    except OSError:
        pass
    return _memory_bytes().value / 2


def _fit_in_memory(n_bytes: float, share: float = 0.2) -> int:
    """``n_bytes`` or less, whole MiB: one test array may take ``share`` of the available memory."""
    cap = int(_available_bytes() * share)
    return max(4 * MiB, int(min(n_bytes, cap)) // MiB * MiB)


def _last_level_cache() -> Figure:
    """Size of the largest CPU cache (Linux sysfs); 32 MiB when unknown."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        m = re.fullmatch(r"(\d+)([KMG]?)", _read(index / "size"))
        if m:
            sizes.append(int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])
    if sizes:
        return Figure(float(max(sizes)), "largest cache under /sys/devices/system/cpu/cpu0/cache")
    return Figure(32.0 * MiB, "unknown (no sysfs cache entries): 32 MiB assumed")


def _past_the_cache(settings: ProbeSettings, llc_bytes: float) -> ProbeSettings:
    """Settings whose DRAM arrays and CPU expert working set exceed the last-level cache.

    DRAM arrays: at least ``cache_multiple`` x LLC (within 20% of the available memory);
    expert working set: ``cache_multiple`` x LLC, at least 128 MiB, at most the mode's cap
    (and 10% of the available memory: each measured format holds one working set).
    """
    if not settings.cache_multiple:
        return settings
    past = settings.cache_multiple * llc_bytes
    working_set = min(settings.ffn_working_set_bytes, max(past, 128 * MiB))
    return replace(settings, dram_bytes=_fit_in_memory(max(settings.dram_bytes, past)),
                   ffn_working_set_bytes=_fit_in_memory(working_set, share=0.1))


def _big_array(n_bytes: int) -> np.ndarray:
    """``n_bytes`` of float32 ones, on transparent huge pages where the OS offers them (fewer
    page faults to fill it, fewer TLB misses to stream it)."""
    n_bytes = n_bytes // 4 * 4
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf = mmap.mmap(-1, n_bytes)
        buf.madvise(mmap.MADV_HUGEPAGE)
        a = np.frombuffer(buf, dtype=np.float32)
    else:
        a = np.empty(n_bytes // 4, dtype=np.float32)
    a.fill(1.0)
    return a


class _Threads:
    """Pins torch's intra-op threads to the usable cores for the probe; restores them after."""

    def __init__(self, torch, cores: float) -> None:
        self.torch = torch
        self.before = torch.get_num_threads() if torch is not None else None
        if torch is not None:
            torch.set_num_threads(int(cores))

    def restore(self) -> None:
        if self.torch is not None and self.before is not None:
            self.torch.set_num_threads(self.before)


# --------------------------------------------------------------------------- timing


def _best_s(fn: Callable[[], object], repeats: int, warmup: int = 1, budget_s: float = math.inf) -> float:
    """Fastest of ``repeats`` timed calls after ``warmup`` untimed ones (seconds); fewer
    once ``budget_s`` has passed (at least one timed call)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if t - start > budget_s:
            break
    return best


# --------------------------------------------------------------------------- DRAM


def _chunks(n: int, parts: int) -> list[slice]:
    bounds = np.linspace(0, n, parts + 1).astype(int)
    return [slice(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds)]


def _dram_read(a: np.ndarray, repeats: int, threads: int) -> Figure:
    """Read bandwidth: each thread sums its slice of ``a`` (viewed as int64: one add per 8 bytes)."""
    words = a.view(np.int64)
    parts = _chunks(words.size, threads)
    with ThreadPoolExecutor(threads) as pool:
        best = _best_s(lambda: list(pool.map(lambda s: np.add.reduce(words[s]), parts)), repeats)
    return Figure(a.nbytes / best, f"numpy sum over a {_mib(a.nbytes)} array, {threads} threads, "
                  f"best of {repeats} (bytes read / s)")


def _dram_copy(a: np.ndarray, repeats: int, threads: int) -> Figure:
    """Copy bandwidth, STREAM convention: bytes read + bytes written per second."""
    dst = np.empty_like(a)
    parts = _chunks(a.size, threads)
    with ThreadPoolExecutor(threads) as pool:
        best = _best_s(lambda: list(pool.map(lambda s: np.copyto(dst[s], a[s]), parts)), repeats)
    return Figure(2 * a.nbytes / best, f"numpy copyto of a {_mib(a.nbytes)} array, {threads} threads, "
                  f"best of {repeats} (STREAM convention: bytes read + written / s)")


def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


# --------------------------------------------------------------------------- disk


def _probe_disk(directory: Path, n_bytes: int, repeats: int) -> DiskFigures | None:
    """Write ``n_bytes`` to a temporary file in ``directory``, read it back past the page cache."""
    usage = shutil.disk_usage(directory)
    n_bytes = min(n_bytes, int(usage.free * 0.25) // MiB * MiB)
    if n_bytes < 4 * MiB:
        return None
    chunk = min(8 * MiB, n_bytes)
    n_bytes = n_bytes // chunk * chunk
    # random bytes: a compressing filesystem (btrfs, zfs) would read zeros back too fast
    payload = np.random.default_rng(0).integers(0, 256, chunk, dtype=np.uint8).tobytes()
    fd, name = tempfile.mkstemp(prefix=".planner-probe-", suffix=".bin", dir=directory)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            for _ in range(n_bytes // chunk):
                f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        best, how = math.inf, ""
        for _ in range(max(1, repeats)):
            seconds, how = _read_uncached(name, n_bytes, chunk)
            best = min(best, seconds)
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass
    device, model, gen, lanes = _block_device(directory)
    fs = _filesystem_type(directory)
    method = (f"sequential read of a {_mib(n_bytes)} temporary file in {directory} ({fs or 'unknown filesystem'}) "
              f"in {_mib(chunk)} reads, {how}, best of {max(1, repeats)}; file removed")
    if fs in IN_MEMORY_FILESYSTEMS:
        model = model or f"{fs} (memory, not a disk)"
        method += f"; {fs} lives in memory: this is not a disk's bandwidth"
    elif device.startswith("vd") or "virtio" in model:
        method += "; a virtual disk: the hypervisor's own cache may still serve reads"
    return DiskFigures(
        path=str(directory), device=device, model=model, filesystem=fs,
        capacity_bytes=Figure(float(usage.total), f"size of the filesystem holding {directory} (shutil.disk_usage)"),
        read_bytes_per_s=Figure(n_bytes / best, method), pcie_gen=gen, pcie_lanes=lanes)


def _read_uncached(name: str, n_bytes: int, chunk: int) -> tuple[float, str]:
    """Seconds to read the file once past the page cache, and which way was used."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            fd = os.open(name, os.O_RDONLY | direct)
        except OSError:
            fd = -1
        if fd >= 0:
            buf = mmap.mmap(-1, chunk)  # page aligned, as O_DIRECT requires
            try:
                t = time.perf_counter()
                got = 0
                while got < n_bytes:
                    n = os.readv(fd, [buf])
                    if n <= 0:
                        break
                    got += n
                seconds = time.perf_counter() - t
                if got >= n_bytes:
                    return seconds, "O_DIRECT (page cache bypassed)"
            except OSError:
                pass  # the filesystem refuses O_DIRECT reads (tmpfs, some FUSE): drop the cache instead
            finally:
                os.close(fd)
                buf.close()
    fd = os.open(name, os.O_RDONLY)
    try:
        how = "plain reads (this OS can neither bypass nor drop the page cache: the figure may be cached)"
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            how = "posix_fadvise(POSIX_FADV_DONTNEED) before reading (O_DIRECT refused here)"
        elif _nocache(fd):
            how = "fcntl(F_NOCACHE) reads (macOS)"
        buf = bytearray(chunk)
        view = memoryview(buf)
        t = time.perf_counter()
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while f.readinto(view):
                pass
        return time.perf_counter() - t, how
    finally:
        os.close(fd)


IN_MEMORY_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs")


def _filesystem_type(directory: Path) -> str:
    """Type of the filesystem mounted at the longest mount point above ``directory`` (Linux)."""
    best, kind = "", ""
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mount = parts[1].replace("\\040", " ")
            if (str(directory) == mount or str(directory).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def _nocache(fd: int) -> bool:
    """Turn the page cache off for ``fd`` where fcntl has F_NOCACHE (macOS)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return False
    if not hasattr(fcntl, "F_NOCACHE"):
        return False
    fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
    return True


_GT_PER_S_TO_GEN = {"2.5": 1, "5.0": 2, "5": 2, "8.0": 3, "8": 3, "16.0": 4, "16": 4, "32.0": 5, "32": 5,
                    "64.0": 6, "64": 6}


def _block_device(directory: Path) -> tuple[str, str, int | None, int | None]:
    """``(device name, model, pcie gen, pcie lanes)`` of the block device under ``directory``, best effort."""
    try:
        st = os.stat(directory)
        sys_dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    except (OSError, AttributeError):
        return "", "", None, None
    if not sys_dev.exists():
        return "", "", None, None
    if (sys_dev / "partition").exists():
        sys_dev = sys_dev.parent
    name = sys_dev.name
    dev = sys_dev / "device"
    model = _read(dev / "model")
    if not model:
        driver = Path(os.path.realpath(dev / "driver")).name if (dev / "driver").exists() else ""
        model = f"{name} ({driver})" if driver else name
    if _read(sys_dev / "queue" / "rotational") == "1":
        model += ", rotational"
    gen = lanes = None
    for pci in (dev, dev / "device"):
        speed, width = _read(pci / "current_link_speed"), _read(pci / "current_link_width")
        if speed and width:
            m = re.match(r"([\d.]+)\s*GT/s", speed)
            gen = _GT_PER_S_TO_GEN.get(m.group(1)) if m else None
            lanes = int(width) if width.isdigit() and int(width) in (1, 2, 4, 8, 16) else None
            break
    return name, model, gen if lanes else None, lanes if gen else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


# --------------------------------------------------------------------------- CPU matmul


def _cpu_gemms(settings: ProbeSettings, torch, ort, threads: int) -> tuple[dict[str, Figure], dict[str, str]]:
    """Throughput of one large GEMM per format: ``({format: ops/s}, {format: why skipped})``."""
    m, k = settings.gemm_m, settings.gemm_dim
    n = k
    flops = 2.0 * m * k * n
    reps, budget = settings.gemm_repeats, settings.gemm_budget_s
    shape = f"{m}x{k} @ {k}x{n}"
    peaks: dict[str, Figure] = {}
    skipped: dict[str, str] = {}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    if torch is not None:
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        peaks["fp32"] = Figure(flops / _best_s(lambda: torch.matmul(tx, tw), reps, budget_s=budget),
                               f"torch.matmul fp32 {shape}, {threads} threads, best of up to {reps}")
        bx, bw = tx.to(torch.bfloat16), tw.to(torch.bfloat16)
        peaks["bf16"] = Figure(flops / _best_s(lambda: torch.matmul(bx, bw), reps, budget_s=budget),
                               f"torch.matmul bf16 {shape}, {threads} threads, best of up to {reps}")
    else:
        peaks["fp32"] = Figure(flops / _best_s(lambda: np.matmul(x, w), reps, budget_s=budget),
                               f"numpy.matmul fp32 {shape} (BLAS threads), best of up to {reps}")
        skipped["bf16"] = "torch is not installed"
    skipped["fp16"] = "not probed on CPUs: fp16 weights run in the bf16/fp32 fallback"
    for fmt, bits in (("int8", 8), ("int4", 4)):
        if ort is None:
            skipped[fmt] = "onnxruntime is not installed"
            continue
        try:
            session = _ort_session(_ort_matmul_model(w, bits), ort, threads)
            peaks[fmt] = Figure(flops / _best_s(lambda s=session: s.run(None, {"x": x}), reps,
                                                        budget_s=budget),
                                f"onnxruntime MatMulNBits bits={bits} block {BLOCK_SIZE} accuracy_level=4 "
                                f"(int8 activations), weights quantised by onnxruntime quantize_matmul_{bits}bits, "
                                f"{shape}, {threads} threads, best of up to {reps}")
        except Exception as exc:  # noqa: BLE001 - an older onnxruntime without 8-bit MatMulNBits or the quantiser
            skipped[fmt] = f"onnxruntime MatMulNBits bits={bits} failed: {_one_line(exc)}"
    return peaks, skipped


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:160] + "...") if len(text) > 160 else text or type(exc).__name__


# --------------------------------------------------------------------------- ONNX Runtime kernels


def _quantise(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-quantise ``w: [K, N]`` fp32 with onnxruntime's own kernel (the one behind
    ``MatMulNBitsQuantizer``), asymmetric, blocks of 128 along K.

    Returns:
        ``(packed: [N, K/128, 128*bits/8] uint8, scales: [N*K/128] fp32, zero_points: uint8)``.
    """
    from onnxruntime.capi import _pybind_state as ortc

    quantise = {4: ortc.quantize_matmul_4bits, 8: ortc.quantize_matmul_8bits}[bits]
    k, n = w.shape
    per_byte = 8 // bits
    k_blocks = (k + BLOCK_SIZE - 1) // BLOCK_SIZE
    if k_blocks * BLOCK_SIZE != k:
        w = np.pad(w, ((0, k_blocks * BLOCK_SIZE - k), (0, 0)))
    packed = np.zeros((n, k_blocks, BLOCK_SIZE // per_byte), dtype=np.uint8)
    zero_points = np.zeros((n, (k_blocks + per_byte - 1) // per_byte), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    quantise(packed, np.ascontiguousarray(w, dtype=np.float32), scales, zero_points, BLOCK_SIZE, n, k, False)
    return packed, scales.reshape(-1), zero_points.reshape(-1)


def _matmul_nbits(onnx_helper, numpy_helper, name: str, x: str, w: np.ndarray, bits: int, inits: list) -> object:
    k, n = w.shape
    packed, scales, zero_points = _quantise(w, bits)
    inits += [numpy_helper.from_array(packed, f"{name}_q"), numpy_helper.from_array(scales, f"{name}_scales"),
              numpy_helper.from_array(zero_points, f"{name}_zp")]
    return onnx_helper.make_node("MatMulNBits", [x, f"{name}_q", f"{name}_scales", f"{name}_zp"], [f"{name}_y"],
                                 domain="com.microsoft", K=k, N=n, bits=bits, block_size=BLOCK_SIZE,
                                 accuracy_level=4)


def _ort_model(nodes: list, inits: list, k: int, out: str, n: int) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", n])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def _ort_matmul_model(w: np.ndarray, bits: int) -> bytes:
    from onnx import helper, numpy_helper

    inits: list = []
    node = _matmul_nbits(helper, numpy_helper, "w", "x", w, bits, inits)
    return _ort_model([node], inits, w.shape[0], "w_y", w.shape[1])


def _ort_ffn_model(gate: np.ndarray, up: np.ndarray, down: np.ndarray, bits: int) -> bytes:
    """A gated expert FFN: ``down(silu(x @ gate) * (x @ up))``; gate, up: [H, I], down: [I, H]."""
    from onnx import helper, numpy_helper

    inits: list = []
    nodes = [
        _matmul_nbits(helper, numpy_helper, "gate", "x", gate, bits, inits),   # [n, I]
        _matmul_nbits(helper, numpy_helper, "up", "x", up, bits, inits),       # [n, I]
        helper.make_node("Sigmoid", ["gate_y"], ["gate_sig"]),
        helper.make_node("Mul", ["gate_y", "gate_sig"], ["gate_silu"]),
        helper.make_node("Mul", ["gate_silu", "up_y"], ["hidden"]),             # [n, I]
        _matmul_nbits(helper, numpy_helper, "down", "hidden", down, bits, inits),  # [n, H]
    ]
    return _ort_model(nodes, inits, gate.shape[0], "down_y", down.shape[1])


def _ort_session(model: bytes, ort, threads: int, weights: tuple[list[str], list] | None = None):
    """A CPU session as the bundle runtime makes them (exporters/runtime/kernels.py): its own
    intra-op pool of ``threads``, sleeping rather than spinning between runs, so that many
    expert sessions share the cores (spinning pools lose up to 10x on a busy 2-core box);
    ``weights`` (from :func:`_weights_outside`) are fed as in-memory external initializers,
    as the runtime feeds its memory-mapped expert weights."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if weights is not None:
        names, arrays = weights
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _weights_outside(model: bytes) -> tuple[bytes, tuple[list[str], list[np.ndarray]]]:
    """``model`` with its initializers replaced by in-memory external placeholders, and the
    ``(names, arrays)`` a session then takes (:func:`_ort_session`)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    proto = onnx.load_from_string(model)
    names, arrays, placeholders = [], [], []
    for init in proto.graph.initializer:
        array = np.ascontiguousarray(numpy_helper.to_array(init))
        holder = TensorProto(name=init.name, data_type=init.data_type, dims=array.shape,
                             data_location=TensorProto.EXTERNAL)
        holder.external_data.add(key="location", value="in-memory")
        names.append(init.name)
        arrays.append(array)
        placeholders.append(holder)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(placeholders)
    return proto.SerializeToString(), (names, arrays)


# --------------------------------------------------------------------------- CPU FFN curve


def _cpu_ffn_curve(settings: ProbeSettings, dram: np.ndarray, dram_read_bytes_per_s: float,
                   peaks: dict[str, Figure], torch, ort, threads: int
                   ) -> tuple[EfficiencyFit | None, Figure | None, dict[str, Figure]]:
    """Time one gated FFN call per token count, per format, cycling experts; fit the curve.

    The fp32 experts live in the DRAM test array (no new allocation); int8/int4 experts are
    separate onnxruntime sessions of one quantised expert's bytes (the values do not matter
    for timing, so the block quantiser runs once per matrix).
    """
    h, i = settings.ffn_hidden, settings.ffn_intermediate
    rng = np.random.default_rng(1)
    call_s: dict[str, dict[int, float]] = {}
    overhead_s: dict[str, float] = {}
    weight_bytes: dict[str, float] = {}
    notes: dict[str, str] = {}
    held: dict[str, Figure] = {}
    ref = None
    # the first format measured (in CURVE_PREFERENCE order) gets the whole curve; the others
    # only settings.ffn_other_tokens (their one-token call feeds the memory fraction)
    for fmt in sorted(set(settings.ffn_formats) & set(peaks), key=CURVE_PREFERENCE.index):
        tokens = settings.ffn_tokens if ref is None else settings.ffn_other_tokens
        if fmt in ("fp32", "bf16"):
            made = _torch_or_numpy_experts(fmt, dram, h, i, settings, tokens, torch)
        else:
            made = _ort_experts(fmt, h, i, settings, tokens, ort, threads, rng)
        if made is None:
            continue
        calls, tiny_call, wbytes, note, factor = made
        if factor is not None:
            held[fmt] = factor
        overhead_s[fmt] = _best_s(tiny_call, 200 if settings.mode != "tiny" else 20, warmup=5)
        call_s[fmt] = _time_curve(calls, tokens, settings.ffn_point_s)
        weight_bytes[fmt] = wbytes
        notes[fmt] = note
        ref = ref or fmt
    if ref is None:
        return None, None, held
    fit = fit_efficiency(
        call_s, weight_bytes, overhead_s, ref, peaks[ref].value, dram_read_bytes_per_s,
        flops_per_token=2.0 * 3 * h * i,
        method=f"gated FFN H={h} I={i} ({notes[ref]}) timed at n = {', '.join(map(str, settings.ffn_tokens))} "
               f"tokens, fastest call per n; fraction(n) = 2*n*3*H*I / (peak {ref} * (t(n) - overhead))")
    overhead = Figure(overhead_s[ref], f"fastest of 200 {ref} expert FFN calls at H=I=128, 1 token ({notes[ref]}): "
                                       "the fixed cost of one call")
    return fit, overhead, held


def _time_curve(calls: list[Callable[[int], object]], tokens: tuple[int, ...], point_s: float) -> dict[int, float]:
    """Fastest seconds per call at each token count, the experts visited round-robin.

    Up to 16 tokens the call streams its weights, so every expert is visited before one is
    reused (the weights cannot stay in a cache); beyond that the call is compute-bound and
    the first 4 experts suffice. The fastest call is kept, not the median: other processes
    on the machine only ever add time (on 2 busy cores a median doubles).
    """
    stream_max, compute_pool = 16, 4
    out: dict[int, float] = {}
    e = 0
    for n in tokens:
        pool = len(calls) if n <= stream_max else min(len(calls), compute_pool)
        most = max(pool, 5)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < 3 or (len(times) < most and time.perf_counter() - start < point_s):
            call = calls[e % pool]
            e += 1
            t = time.perf_counter()
            call(n)
            times.append(time.perf_counter() - t)
        out[n] = min(times)
    return out


def _expert_count(settings: ProbeSettings, expert_bytes: float) -> int:
    """Experts to cycle so that their weights fill the working set (past the caches)."""
    return max(2, math.ceil(settings.ffn_working_set_bytes / expert_bytes))


def _torch_or_numpy_experts(fmt: str, dram: np.ndarray, h: int, i: int, settings: ProbeSettings,
                            tokens: tuple[int, ...], torch):
    """fp32 experts viewed in the DRAM array (bf16: converted copies); ``call(n)`` runs one."""
    per = 3 * h * i
    if fmt == "bf16" and torch is None:
        return None
    count = min(_expert_count(settings, per * (4 if fmt == "fp32" else 2)), dram.size // per)
    if count < 1:
        return None
    experts = []
    for e in range(count):
        flat = dram[e * per:(e + 1) * per]
        gate, up, down = flat[:h * i].reshape(h, i), flat[h * i:2 * h * i].reshape(h, i), flat[2 * h * i:].reshape(i, h)
        experts.append((gate, up, down))
    if torch is not None:
        dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        experts = [tuple(torch.from_numpy(m).to(dtype) for m in ex) for ex in experts]
        xs = {n: torch.full((n, h), 0.01, dtype=dtype) for n in tokens}
        calls = [lambda n, ex=ex: _torch_ffn(torch, ex, xs[n]) for ex in experts]
        tiny = tuple(torch.full((128, 128), 0.01, dtype=dtype) for _ in range(3))
        x1 = torch.full((1, 128), 0.01, dtype=dtype)
        note = f"torch {fmt}, {count} experts ({_mib(count * per * dtype.itemsize)}) cycled"
        return calls, lambda: _torch_ffn(torch, tiny, x1), per * (4 if fmt == "fp32" else 2), note, None

    xs = {n: np.full((n, h), 0.01, dtype=np.float32) for n in tokens}

    def numpy_ffn(ex, x):
        gate, up, down = ex
        g = x @ gate
        return ((g / (1.0 + np.exp(-g))) * (x @ up)) @ down

    calls = [lambda n, ex=ex: numpy_ffn(ex, xs[n]) for ex in experts]
    tiny = tuple(np.full((128, 128), 0.01, dtype=np.float32) for _ in range(3))
    x1 = np.full((1, 128), 0.01, dtype=np.float32)
    note = f"numpy fp32, {count} experts ({_mib(count * per * 4)}) cycled"
    return calls, lambda: numpy_ffn(tiny, x1), per * 4, note, None


def _ort_experts(fmt: str, h: int, i: int, settings: ProbeSettings, tokens: tuple[int, ...], ort, threads: int,
                 rng):
    """``count`` onnxruntime sessions of one int8/int4 expert; ``call(n)`` runs one."""
    if ort is None:
        return None
    bits = 8 if fmt == "int8" else 4
    scale = 0.02
    gate = (rng.standard_normal((h, i), dtype=np.float32) * scale)
    up = (rng.standard_normal((h, i), dtype=np.float32) * scale)
    down = (rng.standard_normal((i, h), dtype=np.float32) * scale)
    try:
        # the weights live outside the sessions, as the runtime's mapped files do: what a
        # session adds to the process is what it holds of its own
        model, weights = _weights_outside(_ort_ffn_model(gate, up, down, bits))
        expert_bytes = _quantised_bytes(h, i, bits)
        count = _expert_count(settings, expert_bytes)
        tiny_w = np.full((128, 128), 0.01, dtype=np.float32)
        tiny = _ort_session(_ort_ffn_model(tiny_w, tiny_w, tiny_w, bits), ort, threads)
        before = _anon_bytes()
        sessions = [_ort_session(model, ort, threads, weights) for _ in range(count)]
    except Exception:  # noqa: BLE001 - the GEMM step already recorded why this format does not run
        return None
    xs = {n: np.full((n, h), 0.01, dtype=np.float32) for n in tokens}
    x1 = np.full((1, 128), 0.01, dtype=np.float32)
    # first runs allocate: warm every session at the streaming sizes, the first few at the largest
    streaming = [n for n in tokens if n <= 16] or [tokens[0]]
    for s in sessions:
        s.run(None, {"x": xs[streaming[-1]]})
    after = _anon_bytes()
    factor = None
    if before is not None and after is not None and after > before:
        factor = Figure((after - before) / (count * expert_bytes),
                        f"anonymous memory (RssAnon) {count} one-expert MatMulNBits sessions added, run once at "
                        f"{streaming[-1]} tokens, per byte of the expert's {fmt} weights "
                        f"({_mib(count * expert_bytes)}, fed as external initializers): the pre-packed copy, "
                        "scratch and the session itself")
    for s in sessions[:4]:
        s.run(None, {"x": xs[tokens[-1]]})
    calls = [lambda n, s=s: s.run(None, {"x": xs[n]}) for s in sessions]
    note = (f"onnxruntime MatMulNBits bits={bits} accuracy_level=4, {count} expert sessions "
            f"({_mib(count * expert_bytes)}) of {threads} non-spinning threads cycled")
    return calls, lambda: tiny.run(None, {"x": x1}), expert_bytes, note, factor


def _anon_bytes() -> float | None:
    """This process's resident anonymous memory (Linux ``RssAnon``), or None where unknown."""
    for line in _read(Path("/proc/self/status")).splitlines():
        if line.startswith("RssAnon:"):
            return float(line.split()[1]) * 1024
    return None


def _quantised_bytes(h: int, i: int, bits: int) -> float:
    """Bytes of one expert in MatMulNBits layout: payload, fp32 scales and zero points."""
    def matrix(k: int, n: int) -> float:
        blocks = math.ceil(k / BLOCK_SIZE)
        return n * blocks * (BLOCK_SIZE * bits / 8 + 4 + bits / 8)
    return 2 * matrix(h, i) + matrix(i, h)


def fit_efficiency(call_s: dict[str, dict[int, float]], weight_bytes: dict[str, float], overhead_s: dict[str, float],
                   ref: str, peak_ops_per_s: float, read_bytes_per_s: float, flops_per_token: float,
                   method: str) -> EfficiencyFit:
    """Turn measured call times into the profile's efficiency representation.

    With ``t(n)`` the reference format's seconds per call and ``o`` its fixed overhead:

    1. achieved(n) = flops(n) / (t(n) - o); the peak is raised to max achieved if a call beat it;
    2. fraction(n) = achieved(n) / peak: the ``points``; with them :func:`~profiles.perf.expert_call_s`
       gives back t(n) at every measured n (the compute term equals t(n) - o);
    3. memory_fraction = the best weight_bytes / ((t_f(1) - o_f) * read bandwidth) over the formats
       measured at one token: high enough that the memory term never exceeds the measured
       time, so (2) holds. Above 1 (a call streamed faster than the bandwidth test read) it is
       clamped to 1, and the caller should raise the bandwidth to ``stream_bytes_per_s``;
    4. compute_max_fraction, half_tokens: least squares of ``a * n / (n + h)`` to the points
       (used only if someone deletes ``points``).

    Args:
        call_s: seconds per call, ``{format: {tokens: s}}``.
        weight_bytes: bytes of one expert's weights per format.
        overhead_s: fixed seconds per call per format.
        ref: the format whose curve is written.
        peak_ops_per_s: measured GEMM throughput of ``ref``.
        read_bytes_per_s: the device's memory read bandwidth.
        flops_per_token: 2 * 3 * H * I.
        method: how the times were measured, for ``source``.
    """
    times = call_s[ref]
    ovh = overhead_s[ref]
    tokens = sorted(times)
    net = {n: max(times[n] - ovh, 0.05 * times[n]) for n in tokens}
    achieved = {n: flops_per_token * n / net[n] for n in tokens}
    peak = max(peak_ops_per_s, max(achieved.values()))
    points = tuple((n, _clamp_fraction(achieved[n] / peak)) for n in tokens)
    stream = 0.0
    for fmt, per_n in call_s.items():
        first = min(per_n)
        t1 = max(per_n[first] - overhead_s[fmt], 0.05 * per_n[first])
        stream = max(stream, weight_bytes[fmt] / t1)
    a, half = _fit_saturating([n for n, _ in points], [f for _, f in points])
    return EfficiencyFit(format=ref, points=points, compute_max_fraction=a, half_tokens=half,
                         memory_fraction=_clamp_fraction(stream / read_bytes_per_s), peak_ops_per_s=peak,
                         launch_overhead_s=ovh, call_s=call_s, method=method, stream_bytes_per_s=stream)


def _clamp_fraction(x: float) -> float:
    return float(min(1.0, max(1e-4, round(x, 4))))


def _fit_saturating(ns: list[float], fs: list[float]) -> tuple[float, float]:
    """Least squares of ``f(n) = a * n / (n + h)``: grid over h (log-spaced), a in closed form."""
    n = np.asarray(ns, dtype=float)
    f = np.asarray(fs, dtype=float)
    best = (math.inf, 1.0, 1.0)
    for h in np.geomspace(0.01, 1e5, 600):
        g = n / (n + h)
        a = float(np.clip((g @ f) / (g @ g), 1e-4, 1.0))
        err = float(((a * g - f) ** 2).sum())
        if err < best[0]:
            best = (err, a, float(h))
    return round(best[1], 4), float(f"{best[2]:.4g}")


# --------------------------------------------------------------------------- GPU


def _probe_gpus(settings: ProbeSettings, torch) -> list[GpuFigures]:
    """One :class:`GpuFigures` per distinct GPU model; identical GPUs share the first one's figures."""
    groups: dict[str, list[int]] = {}
    for index in range(torch.cuda.device_count()):
        groups.setdefault(torch.cuda.get_device_name(index), []).append(index)
    out = []
    for name, indices in groups.items():
        figures = _probe_gpu(indices[0], settings, torch)
        out.append(replace(figures, indices=tuple(indices), model=name))
    return out


def _cuda_best_s(torch, fn: Callable[[], object], repeats: int, inner: int = 1) -> float:
    """Fastest of ``repeats`` CUDA-event timings of ``inner`` back-to-back calls, per call (s)."""
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(max(1, repeats)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / inner)
    return best


def _wall_best_s(torch, fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall-clock time of ``fn`` followed by a device synchronise (s)."""
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def _probe_gpu(index: int, settings: ProbeSettings, torch) -> GpuFigures:
    """All figures of GPU ``index``; sizes shrink to fit 60% of its free memory."""
    torch.cuda.set_device(index)
    dev = torch.device("cuda", index)
    props = torch.cuda.get_device_properties(index)
    reps = settings.gpu_repeats
    free, total = torch.cuda.mem_get_info(index)
    budget = int(free * 0.6)  # leave room: another process may share the GPU

    transfer_bytes = min(settings.gpu_transfer_bytes, budget // 4) // MiB * MiB or MiB
    pinned, pageable, latency = _gpu_transfers(torch, dev, transfer_bytes, reps)
    copy_bytes = min(settings.gpu_copy_bytes, budget // 3) // MiB * MiB or MiB
    read_bw, copy_bw = _gpu_memory(torch, dev, copy_bytes, reps)
    peaks, skipped = _gpu_gemms(settings, torch, dev, props)
    kernel_s, call_s, ref = _gpu_overheads(torch, dev, reps)
    fit = _gpu_ffn_curve(settings, torch, dev, ref, peaks, read_bw, call_s.value, budget)
    if fit is not None and fit.stream_bytes_per_s > read_bw.value:
        read_bw = Figure(fit.stream_bytes_per_s, f"raised to the fastest one-token expert call's weight streaming "
                                                 f"(sum: {_num(read_bw.value, 'B/s')}, {read_bw.method})")
    if fit is not None and fit.peak_ops_per_s > peaks[ref].value:
        peaks[ref] = Figure(fit.peak_ops_per_s, peaks[ref].method + "; raised to the best expert FFN call")
    return GpuFigures(
        indices=(index,), model=props.name,
        memory_bytes=Figure(float(total), "torch.cuda.mem_get_info total"),
        memory_bytes_per_s=read_bw, copy_bytes_per_s=copy_bw,
        h2d_pinned_bytes_per_s=pinned, h2d_pageable_bytes_per_s=pageable, h2d_latency_s=latency,
        peak_ops_per_s=peaks, skipped=skipped, launch_overhead_s=call_s, kernel_launch_s=kernel_s, efficiency=fit)


def _gpu_transfers(torch, dev, n: int, reps: int) -> tuple[Figure, Figure, Figure]:
    """Host-to-device bandwidth from pinned and from pageable memory, and a tiny copy's latency."""
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    pageable = torch.ones(n, dtype=torch.uint8)
    small_host = torch.empty(64, dtype=torch.uint8, pin_memory=True).fill_(1)
    small_dev = torch.empty(64, dtype=torch.uint8, device=dev)
    how = f"copy_ of {_mib(n)} from {{}} host memory, wall clock to synchronize, best of {reps}"
    return (
        Figure(n / _wall_best_s(torch, lambda: dst.copy_(pinned, non_blocking=True), reps), how.format("pinned")),
        Figure(n / _wall_best_s(torch, lambda: dst.copy_(pageable), reps), how.format("pageable")),
        Figure(_wall_best_s(torch, lambda: small_dev.copy_(small_host, non_blocking=True), max(20, reps)),
               f"64-byte pinned host-to-device copy to synchronize, best of {max(20, reps)}"),
    )


def _gpu_memory(torch, dev, n: int, reps: int) -> tuple[Figure, Figure]:
    """Device memory read bandwidth (a sum) and copy bandwidth (read + written), far above the L2."""
    src = torch.ones(n // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    read = Figure(n / _cuda_best_s(torch, lambda: src.sum(), reps),
                  f"torch sum over a {_mib(n)} fp32 tensor, CUDA events, best of {reps} (bytes read / s)")
    copy = Figure(2 * n / _cuda_best_s(torch, lambda: dst.copy_(src), reps),
                  f"device-to-device copy_ of {_mib(n)}, CUDA events, best of {reps} (bytes read + written / s)")
    return read, copy


def _gpu_gemms(settings: ProbeSettings, torch, dev, props) -> tuple[dict[str, Figure], dict[str, str]]:
    """Throughput of one ``d x d x d`` GEMM per format this GPU and torch build run."""
    d = settings.gpu_gemm_dim
    flops = 2.0 * d ** 3
    reps = settings.gpu_repeats
    peaks: dict[str, Figure] = {}
    skipped: dict[str, str] = {}

    def operands(dtype):
        return torch.randn(d, d, device=dev).to(dtype), torch.randn(d, d, device=dev).to(dtype)

    def fp32():
        a, b = operands(torch.float32)
        return lambda: torch.matmul(a, b)

    def half(dtype):
        def make():
            a, b = operands(dtype)
            return lambda: torch.matmul(a, b)
        return make

    def fp8():
        a = torch.randn(d, d, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(d, d, device=dev).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.tensor(1.0, device=dev)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    def int8():
        a = torch.randint(-64, 64, (d, d), dtype=torch.int8, device=dev)
        b = torch.randint(-64, 64, (d, d), dtype=torch.int8, device=dev)
        return lambda: torch._int_mm(a, b)

    candidates = [("fp32", fp32, "torch.matmul fp32 (TF32 off)")]
    if torch.cuda.is_bf16_supported():
        candidates.append(("bf16", half(torch.bfloat16), "torch.matmul bf16"))
    else:
        skipped["bf16"] = "this GPU does not support bf16"
    candidates.append(("fp16", half(torch.float16), "torch.matmul fp16"))
    if (props.major, props.minor) >= (8, 9) and hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm"):
        candidates.append(("fp8", fp8, "torch._scaled_mm fp8 e4m3 -> bf16"))
    else:
        skipped["fp8"] = f"needs compute capability 8.9+ and torch._scaled_mm (this GPU: {props.major}.{props.minor})"
    if hasattr(torch, "_int_mm"):
        candidates.append(("int8", int8, "torch._int_mm int8 -> int32"))
    else:
        skipped["int8"] = "this torch has no _int_mm"
    skipped["int4"] = "no portable int4 GEMM in torch: int4 weights are dequantised (the bf16 peak applies)"

    with _ieee_fp32(torch):  # fp32 means fp32, not TF32 tensor cores
        for fmt, make, how in candidates:
            try:
                peaks[fmt] = Figure(flops / _cuda_best_s(torch, make(), reps),
                                    f"{how} {d}x{d} @ {d}x{d}, CUDA events, best of {reps}")
            except Exception as exc:  # noqa: BLE001 - a format this GPU or torch build cannot run is skipped
                skipped[fmt] = f"{how} failed: {_one_line(exc)}"
            torch.cuda.empty_cache()
    return peaks, skipped


@contextmanager
def _ieee_fp32(torch):
    """cuBLAS fp32 matmuls without TF32 inside, the caller's setting restored after.

    torch 2.9+ has ``fp32_precision`` and refuses to mix it with the older ``allow_tf32``
    once either was set, so the newer one is tried first.
    """
    matmul = torch.backends.cuda.matmul
    for key, strict in (("fp32_precision", "ieee"), ("allow_tf32", False)):
        try:
            before = getattr(matmul, key)
            setattr(matmul, key, strict)
        except (AttributeError, RuntimeError, ValueError):
            continue
        try:
            yield
        finally:
            setattr(matmul, key, before)
        return
    yield  # neither switch exists: nothing to turn off


def _torch_ffn(torch, expert, x):
    """``down(silu(x @ gate) * (x @ up))``; x: [n, H], gate, up: [H, I], down: [I, H] -> [n, H]."""
    gate, up, down = expert
    return torch.matmul(torch.nn.functional.silu(torch.matmul(x, gate)) * torch.matmul(x, up), down)


def _gpu_overheads(torch, dev, reps: int) -> tuple[Figure, Figure, str]:
    """One tiny kernel's launch, one tiny expert call's cost, and the half format the GPU runs."""
    ref = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if ref == "bf16" else torch.float16
    one = torch.zeros(1, device=dev)
    tiny = tuple(torch.full((128, 128), 0.01, dtype=dtype, device=dev) for _ in range(3))
    x = torch.full((1, 128), 0.01, dtype=dtype, device=dev)
    with torch.inference_mode():
        kernel = _cuda_best_s(torch, lambda: one.add_(1), reps, inner=200)
        call = _cuda_best_s(torch, lambda: _torch_ffn(torch, tiny, x), reps, inner=100)
    return (Figure(kernel, "one tiny add_ kernel, 200 back-to-back, CUDA events"),
            Figure(call, f"{ref} expert FFN call at H=I=128, 1 token (5 kernels), 100 back-to-back, CUDA events; "
                         f"one kernel alone: {_num(kernel, 's')}"),
            ref)


def _gpu_ffn_curve(settings: ProbeSettings, torch, dev, ref: str, peaks: dict[str, Figure], read: Figure,
                   overhead_s: float, budget: int) -> EfficiencyFit | None:
    """The expert FFN efficiency curve on the GPU, cycling experts so weights come from HBM, not L2."""
    if ref not in peaks:
        return None
    dtype = torch.bfloat16 if ref == "bf16" else torch.float16
    h, i = settings.gpu_ffn_hidden, settings.gpu_ffn_intermediate
    expert_bytes = 3 * h * i * 2
    count = max(2, math.ceil(settings.gpu_ffn_working_set_bytes / expert_bytes))
    count = min(count, int(budget * 0.7 // expert_bytes))
    if count < 1:
        return None
    experts = [(torch.full((h, i), 0.01, dtype=dtype, device=dev), torch.full((h, i), 0.01, dtype=dtype, device=dev),
                torch.full((i, h), 0.01, dtype=dtype, device=dev)) for _ in range(count)]
    reps = settings.gpu_repeats
    times: dict[int, float] = {}
    with torch.inference_mode():
        for n in settings.gpu_ffn_tokens:
            x = torch.full((n, h), 0.01, dtype=dtype, device=dev)
            turn = iter(range(10**9))

            def call(x=x, turn=turn):
                _torch_ffn(torch, experts[next(turn) % count], x)

            times[n] = _cuda_best_s(torch, call, reps, inner=count)
    torch.cuda.empty_cache()
    return fit_efficiency(
        {ref: times}, {ref: float(expert_bytes)}, {ref: overhead_s}, ref, peaks[ref].value, read.value,
        flops_per_token=2.0 * 3 * h * i,
        method=f"torch {ref} gated FFN H={h} I={i}, {count} experts cycled, back-to-back calls timed with CUDA "
               f"events, best of {reps}; fraction(n) = 2*n*3*H*I / (peak {ref} * (t(n) - overhead))")


# --------------------------------------------------------------------------- YAML


def _num(value: float, unit: str = "") -> str:
    """3 significant digits with an SI prefix and no space: ``25.3GB/s``, ``321GFLOPS``."""
    from .units import format_bandwidth, format_throughput, format_time

    if unit == "B/s":
        return format_bandwidth(value).replace(" ", "")
    if unit in ("FLOPS", "OPS"):
        return format_throughput(value, unit).replace(" ", "")
    if unit == "s":
        return format_time(value).replace(" ", "")
    return f"{value:.4g}"


def _gib_floor(n_bytes: float) -> str:
    """Capacity in GiB rounded down to 0.01: never states more memory than there is."""
    return f"{math.floor(n_bytes / GiB * 100) / 100:g}GiB"


def _gb_floor(n_bytes: float) -> str:
    return f"{math.floor(n_bytes / 1e9)}GB" if n_bytes >= 1e9 else f"{math.floor(n_bytes / 1e6)}MB"


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


def _c(text: str) -> str:
    return "  # " + " ".join(text.split())


def _ops_unit(fmt: str) -> str:
    return "OPS" if fmt.startswith("int") else "FLOPS"


def render_profile_yaml(result: ProbeResult, name: str) -> str:
    """The hardware profile YAML of a probe: valid for :func:`profiles.hardware.load_profile`.

    The schema has no per-figure provenance field, so every figure carries its method
    twice: a YAML comment on its line, and one ``sources`` entry (``key: method``) that
    survives loading and re-saving.
    """
    cpu, disk = result.cpu, result.disk
    sources = [f"planner profiles probe ({result.mode} mode) on {result.host} at {result.started_utc}, "
               f"{result.duration_s:.1f} s; " + ", ".join(f"{k} {v}" for k, v in result.versions.items())]
    sources += [f"warning: {w}" for w in result.warnings]

    def src(key: str, how: Figure | str) -> None:
        sources.append(f"{key}: {how.method if isinstance(how, Figure) else how}")

    devices = _cpu_lines(cpu, src)
    if disk is not None:
        devices += _disk_lines(disk, src)
    first = 0
    for g in result.gpus:
        devices += _gpu_lines(g, first, src)
        first += len(g.indices)
    if first > 1:
        devices.append("      # GPU-to-GPU links (NVLink) are not probed: add them by hand")

    gpu_text = ", ".join(f"{len(g.indices)}x {g.model}" for g in result.gpus)
    description = (f"probed: {cpu.model}, {int(cpu.cores.value)} cores, {_gib_floor(cpu.memory_bytes.value)} DRAM"
                   + (f", {gpu_text}" if gpu_text else "") + (f", disk {disk.model}" if disk else ""))
    lines = [
        f"# Measured by `planner profiles probe` ({result.mode} mode) on {result.host}, {result.started_utc}.",
        "# peak_ops_per_s are what large GEMMs reached on this machine (not datasheet peaks);",
        "# efficiency is what one expert FFN call reached relative to them, per tokens per call.",
        "# Each figure says how it was measured, in a comment and again under `sources`.",
    ]
    lines += [f"# WARNING: {w}" for w in result.warnings]
    lines += [f"name: {name}", f"description: {_q(description)}", "sources:"]
    lines += [f"  - {_q(s)}" for s in sources]
    lines += ["nodes:", "  - name: node", "    devices:"] + devices
    return "\n".join(lines) + "\n"


def _cpu_lines(cpu: CpuFigures, src: Source) -> list[str]:
    lines = [
        "      - name: cpu0",
        "        kind: cpu",
        f"        model: {_q(cpu.model)}",
        f"        cores: {int(cpu.cores.value)}" + _c(cpu.cores.method),
        f"        memory_bytes: {_gib_floor(cpu.memory_bytes.value)}" + _c(cpu.memory_bytes.method),
        f"        memory_bytes_per_s: {_num(cpu.dram_read_bytes_per_s.value, 'B/s')}"
        + _c("DRAM read: " + cpu.dram_read_bytes_per_s.method),
        f"        # DRAM copy: {_num(cpu.dram_copy_bytes_per_s.value, 'B/s')}, {cpu.dram_copy_bytes_per_s.method}",
    ]
    src("cpu0.cores", cpu.cores)
    src("cpu0.memory_bytes", cpu.memory_bytes)
    src("cpu0.memory_bytes_per_s", "DRAM read, " + cpu.dram_read_bytes_per_s.method)
    src("cpu0 DRAM copy (not in the schema)",
        f"{_num(cpu.dram_copy_bytes_per_s.value, 'B/s')}, {cpu.dram_copy_bytes_per_s.method}")
    lines += _peak_lines("cpu0", cpu.peak_ops_per_s, cpu.skipped, src)
    if cpu.launch_overhead_s is not None:
        lines.append(f"        launch_overhead_s: {_num(cpu.launch_overhead_s.value, 's')}"
                     + _c(cpu.launch_overhead_s.method))
        src("cpu0.launch_overhead_s", cpu.launch_overhead_s)
    if cpu.kernel_bytes_factor:
        lines.append("        kernel_bytes_factor:"
                     + _c("bytes ONNX Runtime holds per stored byte of an expert it runs"))
        for fmt, fig in cpu.kernel_bytes_factor.items():
            lines.append(f"          {fmt}: {fig.value:.3f}" + _c(fig.method))
            src(f"cpu0.kernel_bytes_factor.{fmt}", fig)
    if cpu.efficiency is not None:
        lines += _efficiency_lines(cpu.efficiency, "cpu0", src)
    else:
        lines.append("        # efficiency: not measured (no expert FFN ran); the cpu defaults apply")
    return lines


def _disk_lines(disk: DiskFigures, src: Source) -> list[str]:
    lines = [
        "      - name: disk0",
        "        kind: nvme" + _c("the schema's storage kind, whatever the disk is"),
        f"        model: {_q(disk.model or disk.device or 'unknown disk')}",
        f"        memory_bytes: {_gb_floor(disk.capacity_bytes.value)}" + _c(disk.capacity_bytes.method),
        f"        memory_bytes_per_s: {_num(disk.read_bytes_per_s.value, 'B/s')}" + _c(disk.read_bytes_per_s.method),
        "        links:",
    ]
    src("disk0.memory_bytes", disk.capacity_bytes)
    src("disk0.memory_bytes_per_s", disk.read_bytes_per_s)
    if disk.pcie_gen and disk.pcie_lanes:
        lines.append(f"          - {{kind: pcie, to: cpu0, gen: {disk.pcie_gen}, lanes: {disk.pcie_lanes}}}"
                     + _c("current_link_speed / current_link_width in /sys"))
        src("disk0.links[0]", "PCIe gen and lanes from /sys current_link_speed and current_link_width")
    else:
        lines.append(f"          - {{kind: pcie, to: cpu0, bytes_per_s: {_num(disk.read_bytes_per_s.value, 'B/s')}}}"
                     + _c("link not measured: set to the disk's read bandwidth, so the disk is the bottleneck"))
        src("disk0.links[0]", "not measured: bytes_per_s set to the disk's measured read bandwidth")
    return lines


def _gpu_lines(g: GpuFigures, first: int, src: Source) -> list[str]:
    """One device entry for GPUs ``first .. first + len(g.indices) - 1`` (``count`` when several)."""
    count = len(g.indices)
    if count == 1 and first == 0:
        lines = ["      - name: gpu0"]
    else:
        lines = ["      - name: gpu", f"        count: {count}"] + ([f"        index_from: {first}"] if first else [])
    key = f"gpu{first}" if count == 1 else f"gpu{first}..gpu{first + count - 1}"
    lines += [
        "        kind: gpu",
        f"        model: {_q(g.model)}",
        f"        memory_bytes: {_gib_floor(g.memory_bytes.value)}" + _c(g.memory_bytes.method),
        f"        memory_bytes_per_s: {_num(g.memory_bytes_per_s.value, 'B/s')}" + _c(g.memory_bytes_per_s.method),
        f"        # device copy: {_num(g.copy_bytes_per_s.value, 'B/s')}, {g.copy_bytes_per_s.method}",
    ]
    src(f"{key}.memory_bytes", g.memory_bytes)
    src(f"{key}.memory_bytes_per_s", g.memory_bytes_per_s)
    lines += _peak_lines(key, g.peak_ops_per_s, g.skipped, src)
    lines.append(f"        launch_overhead_s: {_num(g.launch_overhead_s.value, 's')}" + _c(g.launch_overhead_s.method))
    src(f"{key}.launch_overhead_s", g.launch_overhead_s)
    if g.efficiency is not None:
        lines += _efficiency_lines(g.efficiency, key, src)
    pinned, pageable = g.h2d_pinned_bytes_per_s, g.h2d_pageable_bytes_per_s
    lines += [
        "        links:",
        f"          - {{kind: pcie, to: cpu0, bytes_per_s: {_num(pinned.value, 'B/s')}, "
        f"latency_s: {_num(g.h2d_latency_s.value, 's')}}}"
        + _c(f"pinned host-to-device; pageable: {_num(pageable.value, 'B/s')}"),
    ]
    src(f"{key}.links[0].bytes_per_s", "pinned H2D, " + pinned.method)
    src(f"{key} pageable H2D (not in the schema)", f"{_num(pageable.value, 'B/s')}, {pageable.method}")
    src(f"{key}.links[0].latency_s", g.h2d_latency_s)
    return lines


def _peak_lines(key: str, peaks: dict[str, Figure], skipped: dict[str, str], src: Source) -> list[str]:
    lines = ["        peak_ops_per_s:" + _c("what a large GEMM reached here, not a datasheet peak")]
    for fmt, fig in peaks.items():
        lines.append(f"          {fmt}: {_num(fig.value, _ops_unit(fmt))}" + _c(fig.method))
        src(f"{key}.peak_ops_per_s.{fmt}", fig)
    for fmt, why in skipped.items():
        lines.append(f"          # {fmt}: skipped, {why}")
        src(f"{key}.peak_ops_per_s.{fmt}", "skipped, " + why)
    return lines


def _efficiency_lines(fit: EfficiencyFit, key: str, src: Source) -> list[str]:
    points = ", ".join(f"[{n}, {f:g}]" for n, f in fit.points)
    src(f"{key}.efficiency", fit.method)
    return [
        "        efficiency:",
        f"          compute_max_fraction: {fit.compute_max_fraction:g}"
        + _c("least-squares fit of a*n/(n+h) to the points (used only without points)"),
        f"          half_tokens: {fit.half_tokens:g}",
        f"          memory_fraction: {fit.memory_fraction:g}"
        + _c("best share of memory_bytes_per_s a one-token expert call streamed at"),
        f"          points: [{points}]" + _c(f"[tokens, fraction of the {fit.format} peak] measured"),
        f"          source: {_q('measured by planner profiles probe: ' + fit.method)}",
    ]


def write_profile(result: ProbeResult, out: str | Path, name: str | None = None, force: bool = False) -> Path:
    """Render, validate (:func:`~profiles.hardware.load_profile`) and write the profile.

    Raises:
        InputError: ``out`` exists and ``force`` is false, or its directory is missing.
    """
    from .hardware import load_profile

    out = Path(out)
    check_output(out, force)
    name = name or profile_name(out)
    text = render_profile_yaml(result, name)
    fd, tmp = tempfile.mkstemp(prefix=".probe-", suffix=".yaml", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        load_profile(tmp)  # a profile that does not load is a bug here, not a user error
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def check_output(out: str | Path, force: bool) -> None:
    """Refuse an existing ``out`` without ``force``, a directory, or a missing parent."""
    out = Path(out)
    if out.is_dir():
        raise InputError("is a directory, not a file", file=out, key="--out", fix="name a .yaml file to write")
    if out.exists() and not force:
        raise InputError("output file exists", file=out, fix="pass --force to overwrite it, or choose another path")
    if not out.parent.exists():
        raise InputError("directory of the output file not found", file=out, key="--out",
                         fix="create the directory first, or write elsewhere")


def profile_name(out: str | Path) -> str:
    """A profile name from the output file's stem (``my-machine.yaml`` -> ``my-machine``)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(out).stem).strip("-.")
    if not stem or not stem[0].isalpha():
        stem = f"probed-{stem}" if stem else "probed"
    return stem
