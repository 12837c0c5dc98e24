"""The probe's entry point: every measurement in turn, each sized to its share of the mode's
time budget, gathered into one :class:`~.results.ProbeResult`."""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import InputError
from .budget import Steps
from .cpu_ffn import _cpu_ffn_curve
from .cpu_gemm import _cpu_gemms
from .disk import IN_MEMORY_FILESYSTEMS, _probe_disk
from .dram import _dram
from .gpu import _probe_gpus
from .host import (
    _cpu_model,
    _cuda_available,
    _last_level_cache,
    _memory_bytes,
    _optional,
    _OtherLoad,
    _past_the_cache,
    _Threads,
    _usable_cores,
    _versions,
    kernel_families,
)
from .results import CpuFigures, Figure, GpuFigures, ProbeResult, Progress, _num
from .settings import FULL, ProbeSettings

# each step's weight in the progress bar and in the time budget
STEP_WEIGHTS = {"libraries": 1.5, "host": 0.1, "dram": 3.0, "disk": 2.0, "gemm": 3.0, "ffn": 8.0, "gpu": 10.0}


def probe(directory: str | Path = ".", settings: ProbeSettings = FULL, progress: Progress | None = None,
          gpus: bool = True) -> ProbeResult:
    """Measure this machine, in about ``settings.budget_s`` seconds or less.

    Args:
        directory: a directory on the filesystem whose read bandwidth is measured; a
            temporary file of at most ``settings.disk_bytes`` is written there and removed.
        settings: :data:`FULL`, :data:`QUICK` or :data:`TINY`.
        progress: called with ``(step description, fraction done in [0, 1])``.
        gpus: probe CUDA GPUs when torch sees any.

    Raises:
        InputError: ``directory`` is missing, not a directory or not writable.
    """
    directory = check_directory(directory)
    started = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    t0 = time.perf_counter()
    steps = Steps(dict(STEP_WEIGHTS), progress, settings.budget_s)
    steps.start("libraries", "loading torch and onnxruntime")
    torch, torch_why = _optional("torch")
    ort, ort_why = _optional("onnxruntime")
    has_gpu = bool(gpus and torch is not None and _cuda_available(torch))
    if not has_gpu:
        steps.drop("gpu")
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
    isa, isa_method = kernel_families()
    memory = _memory_bytes()
    llc = _last_level_cache()
    settings = _past_the_cache(settings, llc.value)
    threads = _Threads(torch, cores.value)
    try:
        steps.start("dram", "DRAM read and copy bandwidth")
        past_the_cache = int(2 * llc.value)  # the least any array or expert working set holds, whatever the time
        a, read, copy = _dram(settings, int(cores.value), min(settings.dram_bytes, past_the_cache), steps.share_s())

        steps.start("disk", f"disk read bandwidth in {directory}")
        try:
            disk = _probe_disk(directory, settings.disk_bytes, settings.disk_repeats, steps.share_s())
            if disk is None:
                skipped["disk"] = "not enough free space in the directory for the test file"
        except OSError as exc:  # a full or read-only filesystem, a quota: the rest still counts
            disk, skipped["disk"] = None, f"the test file could not be written or read ({exc.strerror or exc})"

        steps.start("gemm", "CPU matmul throughput per format")
        peaks, peak_skips = _cpu_gemms(settings, torch, ort, int(cores.value), steps.share_s(), steps.fair_s())

        steps.start("ffn", "expert FFN efficiency curve (CPU)")
        efficiency, overhead, held = _cpu_ffn_curve(
            settings, a, read.value, peaks, torch, ort, int(cores.value), steps.share_s(),
            least_bytes=min(settings.ffn_working_set_bytes, past_the_cache))
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
                     launch_overhead_s=overhead, efficiency=efficiency, kernel_bytes_factor=held,
                     isa=isa, isa_method=isa_method)

    gpu_figures: list[GpuFigures] = []
    if has_gpu:
        steps.start("gpu", "GPU transfers, bandwidth, matmul and FFN curve")
        gpu_figures = _probe_gpus(settings, torch, steps.share_s(), steps.fair_s())
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
        cpu=cpu, disk=disk, gpus=tuple(gpu_figures), skipped=skipped, warnings=tuple(warnings),
        budget_s=settings.budget_s)


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
