"""A disk miss of the bundle runtime, timed at several expert sizes (``planner engines probe``).

A miss reads the expert from the drive past the page cache and makes it ready to compute (a
CPU expert: a pre-packed ONNX Runtime session), on the runtime's copy worker: the main thread
hands the job to it and waits for the result (``exporters.runtime.prefetch.Fetcher``), then
runs the fresh session, whose first call costs more than the next (ONNX Runtime allocates
its buffers); what the first call costs past a steady one is part of the miss (the steady
call is priced per expert call). Timed at two or more expert sizes, its
median per size (of a few misses: a mean of six, tried, took one interrupted miss into the
price: 11.7 ms a miss priced against 7 measured at 49% CPU pressure) fitted as
``t = fixed + bytes * per_byte`` gives the engine profile's
``disk_read_overhead_s`` (the fixed part) and ``disk_read_fraction`` (``1 / per_byte`` over
a sequential read of the drive); the copy worker's thread CPU time of each miss (the read
and the session build, not the wait for the drive), fitted the same way, gives
``miss_host_cpu_s`` (the CPU time a miss takes from a CPU compute device's cores:
:func:`profiles.perf.miss_compute_s`); :mod:`exporters.engine_probe` runs it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from profiles.probe import Figure

__all__ = ["expert_reads", "fit_miss_costs"]


def fit_miss_costs(samples: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares of miss seconds on expert bytes, ``t = fixed + bytes * per_byte``.

    Args:
        samples: ``(bytes, seconds)`` of misses (one per expert size: its median).

    Returns:
        ``(fixed_s, per_byte_s)``; a fit with a negative intercept (the fixed part small
        next to the noise) or no positive slope (misses of a few KiB, or a busy machine) is
        refitted through the origin (one rate, no fixed part), so ``fixed_s >= 0`` and
        ``per_byte_s > 0`` for positive times.

    Raises:
        ValueError: fewer than two sizes.
    """
    x = np.array([b for b, _ in samples], dtype=float)  # [S]
    t = np.array([s for _, s in samples], dtype=float)  # [S]
    if len(set(x.tolist())) < 2:
        raise ValueError("the misses must be of at least two sizes to separate fixed and per-byte costs")
    (fixed, per_byte), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], axis=1), t, rcond=None)
    if fixed < 0 or per_byte <= 0:
        fixed, per_byte = 0.0, float(x @ t / (x @ x))
    return float(fixed), float(per_byte)



def expert_reads(directory: Path, sizes: Sequence[int], experts: int, fmt: str, device: str,
                 src: Callable[[str], str], sequential: tuple[float, str] | None = None
                 ) -> tuple[dict[str, Figure], dict[str, Figure], dict[str, Any]]:
    """The runtime's read of one expert on a miss, at each size (H = I) of ``sizes``, vs a
    sequential read of the drive: ``cold`` (the expert's pages dropped from the page cache
    first) and ``warm`` (read again).

    A miss reads the expert with the runtime's own positional reads into a buffer of its own
    (``TensorFile`` + ``read_tensors``, as ``Kernels.quantised`` does: past the page cache
    where ``O_DIRECT`` is allowed) and makes it ready to compute: on a CPU a quantised expert
    becomes a pre-packed ONNX Runtime session (``PlannedExperts._ready``), on CUDA the
    tensors are copied to the device; both on the runtime's copy worker (``Fetcher``), and on
    a CPU the fresh session's first call past a steady one (see the module docstring). With
    ``O_DIRECT`` a "warm" read reads the drive too,
    and a "cold" one drops nothing first, as the runtime never does before a direct read.
    The median miss of each size is fitted as ``fixed + bytes * per_byte``
    (:func:`fit_miss_costs`). The sequential read is of the largest size's file in 8 MiB
    pieces past the page cache, as ``planner profiles probe`` reads the drive (so the
    fraction applies to its figure); ``sequential``: ``(bytes/s, what it is)``, the drive's
    rate in the hardware profile the engine is priced on, in place of that read (the
    fraction then makes that profile's price of a miss the time measured here).

    Returns:
        ``(read fractions, fixed seconds per miss, the raw figures)``, each keyed by
        ``cold`` / ``warm``; ``({}, {}, {})`` where the page cache cannot be dropped. The raw
        figures' ``host_cpu[state]`` is the copy worker's CPU time per miss (median per size
        of ``time.thread_time`` over the read and the build) fitted as ``fixed_s + bytes x
        per_byte_s``, with its ``source``: the engine profile's ``miss_host_cpu_s``.
    """
    if not hasattr(os, "posix_fadvise"):
        return {}, {}, {}
    from profiles.probe.disk import _read_uncached  # the hardware probe's own read: its disk rate is the reference

    times: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": []}  # state -> [(expert bytes, median s)]
    cpu_times: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": []}  # ... of the worker's CPU time
    seq_rate, how_seq, seq_bytes, direct = 0.0, "", 0, False
    for size in sorted(sizes):
        path = directory / f".engine-probe-experts-{size}.safetensors"
        miss = None
        try:
            miss = _miss_reader(path, size, experts, fmt, device)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            total = path.stat().st_size
            if size == max(sizes) and sequential is None:
                seq_s, how_seq = min(_read_uncached(str(path), total, 8 << 20) for _ in range(2))
                seq_rate, seq_bytes = total / seq_s, total
            for state in ("cold", "warm"):
                # a direct read bypasses the page cache, and the runtime never drops it first:
                # dropping it (DONTNEED) slowed the reads after it on the loaded dev machine
                direct = miss.direct
                drop = state == "cold" and not direct
                before = len(miss.cpu_s)
                ts = [_timed(path, lambda e=e: miss(e), drop=drop) for e in range(experts)]
                times[state].append((total / experts, float(np.median(ts))))
                cpu_times[state].append((total / experts, float(np.median(miss.cpu_s[before:]))))
        finally:
            if miss is not None:
                miss.close()
            path.unlink(missing_ok=True)
    ready = ("read and built into a pre-packed ONNX Runtime session on the runtime's copy worker, plus the "
             "session's first call past a steady one") if not device.startswith("cuda") else \
        "read and copied to the GPU on the runtime's copy worker"
    mib = ", ".join(f"{b / 2**20:.2f}" for b, _ in times["cold"])
    if sequential is not None:
        seq_rate, how_seq = sequential
    fractions, overheads, raw = {}, {}, {"sequential_bytes_per_s": seq_rate, "sizes": list(sizes), "direct": direct}
    for state, how in (("cold", "its pages dropped from the page cache first"),
                       ("warm", "its pages in the page cache")):
        fixed, per_byte = fit_miss_costs(times[state])
        raw[state] = {"misses": [{"bytes": b, "seconds": t} for b, t in times[state]], "fixed_s": fixed,
                      "per_byte_s": per_byte}
        if direct:
            how = "read with O_DIRECT, past the page cache (nothing dropped first)"
        what = (f"one {fmt} expert of {mib} MiB read as a miss reads it, {ready}, {how} (median of "
                f"{experts} per size), least squares t = fixed + bytes / rate")
        against = how_seq if sequential is not None else \
            f"a sequential read of the {seq_bytes / 2**20:.0f} MiB file in 8 MiB pieces, {how_seq}"
        fractions[state] = Figure(min(1.0, 1.0 / per_byte / seq_rate), src(
            f"{what}: rate {1 / per_byte / 1e9:.3f} GB/s, vs {against}: {seq_rate / 1e9:.3f} GB/s; in {directory}"))
        overheads[state] = Figure(fixed, src(f"{what}: the fixed part; in {directory}"))
        cpu_fixed, cpu_per_byte = fit_miss_costs(cpu_times[state])
        raw.setdefault("host_cpu", {})[state] = {
            "misses": [{"bytes": b, "cpu_s": t} for b, t in cpu_times[state]], "fixed_s": cpu_fixed,
            "per_byte_s": cpu_per_byte,
            "source": src(f"the copy worker's thread CPU time (time.thread_time) of {what}: {cpu_fixed * 1e3:.3f} ms "
                          f"+ {cpu_per_byte * 2**20 * 1e3:.3f} ms/MiB; in {directory}")}
    return fractions, overheads, raw


def _miss_reader(path: Path, size: int, experts: int, fmt: str, device: str) -> Callable[[int], float]:
    """Write ``experts`` random ``fmt`` experts of H = I = ``size`` to ``path``; returns the
    runtime's miss of expert ``e`` (read past the page cache, made ready to compute, on the
    copy worker; on a CPU the fresh session then run twice), which returns the seconds of its
    steady call (to leave out: the expert call's price has them), with ``.cpu_s``: the worker's
    thread CPU seconds of each load so far, ``.direct``: whether
    its reads bypass the page cache (``O_DIRECT``), and ``.close()``: stop the worker."""
    import torch
    from safetensors.numpy import save_file

    from exporters.runtime.kernels import CACHED_EXPERT_THREADS, CpuLayerKernel, expert_template, weight_inputs
    from exporters.runtime.prefetch import Fetcher
    from exporters.runtime.quant import quantize_matrix
    from exporters.runtime.tensorfile import TensorFile, read_tensors

    rng = np.random.default_rng(0)  # random weights: a compressing filesystem would read zeros faster
    one = {**quantize_matrix(rng.standard_normal((2 * size, size), dtype=np.float32), fmt, "gate_up"),
           **quantize_matrix(rng.standard_normal((size, size), dtype=np.float32), fmt, "down")}
    save_file({f"{e}.{k}": a.copy() for e in range(experts) for k, a in one.items()}, str(path))
    cpu = not device.startswith("cuda")
    templates = {fmt: expert_template(fmt, size, size)} if cpu else {}
    tf = TensorFile(path)  # opened once, its header read, as the runtime keeps each layer's kernels file open
    fetcher = Fetcher(device)  # the runtime's copy worker (a thread; with CUDA its own stream)
    x = {0: np.zeros((1, size), np.float32)}
    cpu_s: list[float] = []  # the worker's thread CPU seconds of each load (read + made ready)

    def load(e: int):
        start = time.thread_time()
        try:
            return _load(e)
        finally:
            cpu_s.append(time.thread_time() - start)

    def _load(e: int):
        tensors = read_tensors({k: [tf.span(f"{e}.{k}")] for k in weight_inputs(fmt)})
        if cpu:  # as PlannedExperts._ready builds a cache slot's
            return CpuLayerKernel(templates, {0: (fmt, {k: t.numpy() for k, t in tensors.items()})},
                                  threads=CACHED_EXPERT_THREADS)
        return [t.to(device, non_blocking=True) for t in tensors.values()]

    def miss(e: int) -> float:
        ready = fetcher.submit(lambda: load(e)).get()  # handed to the worker and waited for, as a miss is
        if not cpu:
            torch.cuda.synchronize()
            return 0.0
        ready.run(x)  # the fresh session's first call: ONNX Runtime allocates its buffers
        start = time.perf_counter()
        ready.run(x)
        return time.perf_counter() - start

    miss.direct = tf.direct
    miss.cpu_s = cpu_s
    miss.close = fetcher.close
    return miss


def _timed(path: Path, fn: Callable[[], float], *, drop: bool) -> float:
    """Seconds of ``fn()`` less the seconds it returns (a part it timed that is priced
    elsewhere), with ``path`` dropped from the page cache first when ``drop``."""
    if drop:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    start = time.perf_counter()
    left_out = fn()
    return time.perf_counter() - start - left_out
