"""What the bundle runtime's CPU expert kernels reach past the last-level cache (``planner engines probe``).

Legend: H = hidden size, I = expert intermediate size, n = tokens in one expert call,
E = experts cycled through, B = one expert's stored bytes, LLC = the last-level cache.

The decode/prefill grid of :mod:`exporters.engine_probe` runs H = I = 64 experts: their
weights stay in the caches, so it times the runtime's framework costs, never its kernels
where they are memory-bound. The hardware probe (``planner profiles probe``) prices a
kernel at its measured streaming read rate and GEMM peaks times an efficiency curve of its
own expert (an onnxruntime int4 FFN at H = 2048); the runtime's own kernels reach less on
the same machine (int8 MatMulNBits of the runtime's expert template: ~9-13 GB/s of a
26 GB/s stream at n = 1, ~55 of a 132 GOPS peak at n = 16-64 on the 2-core dev machine).

This module times the runtime's own kernel (:class:`exporters.runtime.kernels.CpuLayerKernel`,
one pre-packed onnxruntime session per expert, the expert template the bundle builds) on
random experts of two sizes (:data:`SHAPES`), cycling through E copies of each that hold
at least twice the LLC together (:func:`experts_past_cache`), at n in :data:`TOKENS`, and
measures the two figures the hardware profile's prices are relative to the way the hardware
probe does (:func:`profiles.probe.dram._dram`, :func:`profiles.probe.cpu_gemm._cpu_gemms`). Then

- ``memory_fraction``: ``t(1) = fixed + B / rate`` fitted by least squares over the sizes
  (one size alone folds the fixed part into the rate), ``rate`` over the streaming read rate;
- ``compute_max_fraction``, ``half_tokens``: ``f(n) = 2 n 3 H I / (peak * (t(n) - launch))``
  fitted as ``a n / (n + h)`` (:func:`profiles.probe.efficiency._fit_saturating`), the
  hardware probe's convention;
- ``call_fixed_s``: the fit's fixed part of a call past the caches, which the H = 64 grid
  (caches warm) does not see beyond its own kernel call (``launch_s``).

A dense int8/int4 matrix runs as a session of its own (one ``MatMulNBits``, the runtime's
``CpuMatMulKernel``), not as an expert's (two matmuls and the activation): its fixed part past
the caches is timed on that session (:func:`probe_dense_linear`, square matrices of
:data:`DENSE_SIZES`, the same fit at n = 1). The expert's fixed part, once charged per dense
linear, priced the calibration model's int8 dense step 2.8 ms (33 linears x 84 us) above the
runtime, whose int8 dense step ran no slower than its fp32 one (2-core dev machine: a 512 x 512
int8 linear past the LLC 43 us a call, fixed part 30 us, tiny call 15 us).

Time: the number of passes over the E experts at each (size, n) is counted from one first
call of each (:func:`passes_that_fit`), within ``budget_s``; at least one pass, at most
:data:`MOST_PASSES`; the median pass counts (the first, which warms every session at n, is
left out). A pass is the mean call over E experts; the median over passes leaves out a pass
another process interrupted (the mean pass, tried, priced the kernel at a quarter of its rate
at 100% CPU pressure, as its two-thread calls waited for a core), and, unlike the fastest
pass, is not the luckiest one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from profiles.probe import Figure

__all__ = ["DENSE_SIZES", "SHAPES", "TOKENS", "DenseLinearCost", "KernelEfficiency", "experts_past_cache",
           "fit_fixed_and_rate", "passes_that_fit", "probe_dense_linear", "probe_kernel_efficiency",
           "probe_runtime_kernels"]

SHAPES = ((512, 1024), (1024, 2048))  # (H, I) of the timed experts: Mixtral-like ratios, two sizes for the fit
TOKENS = (1, 4, 16, 64)
CACHE_MULTIPLE = 2.0  # the experts cycled through hold at least this many LLCs
MOST_PASSES = 5
DENSE_SIZES = (512, 1024, 2048)  # K = N of the timed dense matrices (attention projections' range)


@dataclass(frozen=True)
class KernelEfficiency:
    """The runtime's CPU kernel efficiency, relative to this machine's streaming read rate and peak."""

    memory_fraction: Figure
    compute_max_fraction: Figure
    half_tokens: Figure
    call_fixed_s: Figure  # fixed seconds of one call past the caches (launch included)
    fit: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DenseLinearCost:
    """What one dense int8/int4 linear's session call costs past the caches beyond the tiny call."""

    host_s: Figure  # the fit's fixed part less ``launch_s`` (0 at least)
    fit: dict[str, Any] = field(default_factory=dict)


def experts_past_cache(llc_bytes: float, expert_bytes: float, multiple: float = CACHE_MULTIPLE) -> int:
    """Experts to cycle through so that their weights hold ``multiple`` x the LLC (2 at least)."""
    return max(2, math.ceil(multiple * llc_bytes / expert_bytes))


def passes_that_fit(first_call_s: float, experts: int, budget_s: float, most: int = MOST_PASSES) -> int:
    """Passes over ``experts`` calls of ``first_call_s`` each that fit ``budget_s`` (1 to ``most``)."""
    if first_call_s <= 0:
        return most
    return int(min(most, max(1, budget_s // (first_call_s * experts))))


def fit_fixed_and_rate(nbytes: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """Least squares of ``t = fixed + bytes / rate``: ``(fixed seconds, bytes per second)``.

    Times that do not grow with the bytes (small experts timed on a busy machine) are
    refitted through the origin (one rate, no fixed part), as
    :func:`exporters.engine_probe_disk.fit_miss_costs` does: the probe finishes with a
    rough figure rather than stopping after its measuring.

    Raises:
        ValueError: fewer than two sizes.
    """
    if len(set(nbytes)) < 2:
        raise ValueError("the fit needs experts of two sizes at least")
    x, t = np.asarray(nbytes, dtype=float), np.asarray(seconds, dtype=float)  # [S], [S]
    (fixed, per_byte), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], axis=1), t, rcond=None)
    if per_byte <= 0:
        fixed, per_byte = 0.0, float(x @ t / (x @ x))
    return max(float(fixed), 0.0), 1.0 / float(per_byte)


def probe_kernel_efficiency(fmt: str, launch_s: float, budget_s: float, *, llc_bytes: float | None = None,
                            shapes: Sequence[tuple[int, int]] = SHAPES, tokens: Sequence[int] = TOKENS,
                            multiple: float = CACHE_MULTIPLE, reference: tuple[float, float] | None = None,
                            reference_s: float = 4.0, stamp: str = "", reference_from: str = "",
                            clock: Callable[[], float] = time.perf_counter,
                            threads: int | None = None) -> KernelEfficiency:
    """Time the runtime's ``fmt`` expert kernel (int8/int4) past the LLC and fit its efficiency.

    Args:
        fmt: int8 or int4 (the onnxruntime MatMulNBits kernels the runtime runs on the CPU).
        launch_s: the fastest tiny call (the hardware profile's ``launch_overhead_s``), taken
            off each call before the compute fraction.
        budget_s: seconds for the timed passes (the reference measurements take about 4 s more).
        llc_bytes: the last-level cache (default: sysfs, :func:`profiles.probe.host._last_level_cache`).
        multiple: the experts cycled through hold this many LLCs (0: two experts, for tests).
        reference: ``(read bytes/s, peak ops/s of fmt)``; default: measured here, first, as
            the hardware probe does, in about ``reference_s`` seconds. Given from the hardware
            profile the engine is priced on (``reference_from`` names it), the fractions make
            that profile's price of this kernel the time measured here, whatever the load did
            to the two probes' figures in between.
        threads: the sessions' intra-op threads, as the runtime builds the path timed (default:
            the runtime's own, :func:`exporters.runtime.kernels.default_threads`, its layer
            sessions of resident and CPU-local experts; ``CACHED_EXPERT_THREADS`` for a cached
            expert's own session). The reference figures are measured at the default.
    """
    from exporters.runtime.formats import quantize
    from exporters.runtime.kernels import CpuLayerKernel, default_threads, expert_template, kernel_format

    if llc_bytes is None:
        from profiles.probe.host import _last_level_cache

        llc_bytes = _last_level_cache().value
    rng = np.random.default_rng(0)
    read_bps, peak = reference or _reference(fmt, default_threads(), llc_bytes, reference_s)
    threads = threads or default_threads()
    whose = reference_from or "this machine's"
    per_shape = budget_s / (len(shapes) * len(tokens))
    timed: dict[tuple[int, int], dict[int, float]] = {}
    sizes: dict[tuple[int, int], dict[str, float]] = {}
    for h, i in shapes:
        template = {kernel_format(fmt): expert_template(fmt, h, i)}
        arrays: dict[str, np.ndarray] = {}
        for prefix, shape in (("gate_up", (2 * i, h)), ("down", (h, i))):
            arrays.update(quantize(rng.standard_normal(shape, dtype=np.float32), fmt, prefix))
        expert_bytes = float(sum(a.nbytes for a in arrays.values()))
        count = experts_past_cache(llc_bytes, expert_bytes, multiple)
        kernels = [CpuLayerKernel(template, {0: (fmt, {k: v.copy() for k, v in arrays.items()})}, threads=threads)
                   for _ in range(count)]
        sizes[(h, i)] = {"expert_bytes": expert_bytes, "experts": count, "working_set_bytes": count * expert_bytes}
        timed[(h, i)] = {}
        for n in tokens:
            x = {0: np.ones((n, h), np.float32)}
            start = clock()
            for k in kernels:  # the first pass warms every session at this n (onnxruntime allocates)
                k.run(x)
            passes = passes_that_fit((clock() - start) / count, count, per_shape)
            per_pass = []
            for _ in range(passes):
                start = clock()
                for k in kernels:
                    k.run(x)
                per_pass.append((clock() - start) / count)
            timed[(h, i)][n] = float(np.median(per_pass))
        del kernels
    fixed, rate = fit_fixed_and_rate([sizes[s]["expert_bytes"] for s in shapes], [timed[s][min(tokens)] for s in shapes])
    from profiles.probe.efficiency import _fit_saturating

    ns, fs = [], []
    for h, i in shapes:
        for n, t in timed[(h, i)].items():
            ns.append(float(n))
            fs.append(2.0 * n * 3 * h * i / (peak * max(t - launch_s, 1e-9)))
    top, half = _fit_saturating(ns, fs)
    mib = ", ".join(f"{sizes[s]['working_set_bytes'] / 2**20:.0f}" for s in shapes)
    what = (f"{fmt} onnxruntime expert kernel of the runtime (one pre-packed session per expert, {threads} "
            f"thread{'s' if threads > 1 else ''}) at H x I = "
            f"{', '.join(f'{h}x{i}' for h, i in shapes)}, cycling {', '.join(str(sizes[s]['experts']) for s in shapes)} "
            f"experts ({mib} MiB, "
            f">= {CACHE_MULTIPLE:g} x the {llc_bytes / 2**20:.0f} MiB LLC), median pass per n in {list(tokens)}"
            f"{'; ' + stamp if stamp else ''}")
    return KernelEfficiency(
        memory_fraction=Figure(_fraction(rate / read_bps),
                               f"probe (t(1) = fixed + bytes / rate by least squares over the {what}: {rate / 1e9:.2f} GB/s "
                               f"over {whose} streaming read {read_bps / 1e9:.2f} GB/s)"),
        compute_max_fraction=Figure(top, f"probe (f(n) = 2n*3*H*I / ({whose} peak {fmt} {peak / 1e9:.0f} GOPS * "
                                         f"(t(n) - {launch_s * 1e6:.0f} us)) fitted as a*n/(n+h) over the {what})"),
        half_tokens=Figure(half, "probe (the same fit's h)"),
        call_fixed_s=Figure(fixed, f"probe (the fixed part of t(1) over the {what})"),
        fit={"fmt": fmt, "llc_bytes": llc_bytes, "read_bytes_per_s": read_bps, "peak_ops_per_s": peak,
             "rate_bytes_per_s": rate, "fixed_s": fixed, "threads": threads,
             "shapes": [{"hidden": h, "intermediate": i, **sizes[(h, i)],
                         "seconds": {str(n): t for n, t in timed[(h, i)].items()}} for h, i in shapes]})


def probe_runtime_kernels(fmt: str, launch_s: float, budget_s: float, **kw) -> tuple[KernelEfficiency,
                                                                                   KernelEfficiency | None]:
    """The kernel as the runtime runs it (:func:`probe_kernel_efficiency`, ``kw`` its options):
    in a layer's session on the runtime's threads (resident and CPU-local experts) and, where
    the runtime gives a cached expert's own session fewer (``CACHED_EXPERT_THREADS``: no pool to
    start on a miss), in such a session too, against the same reference figures (measured
    once, by the first); else None: the engine profile's ``cached_efficiency`` prices those calls."""
    from exporters.runtime.kernels import CACHED_EXPERT_THREADS, default_threads

    past = probe_kernel_efficiency(fmt, launch_s, budget_s, **kw)
    if CACHED_EXPERT_THREADS >= default_threads():
        return past, None
    kw = {**kw, "reference": (past.fit["read_bytes_per_s"], past.fit["peak_ops_per_s"]),
          "llc_bytes": past.fit["llc_bytes"]}
    return past, probe_kernel_efficiency(fmt, launch_s, budget_s, **kw, threads=CACHED_EXPERT_THREADS)

def probe_dense_linear(fmt: str, launch_s: float, budget_s: float, *, llc_bytes: float,
                       sizes: Sequence[int] = DENSE_SIZES, multiple: float = CACHE_MULTIPLE, stamp: str = "",
                       clock: Callable[[], float] = time.perf_counter, threads: int | None = None) -> DenseLinearCost:
    """Time the runtime's dense ``fmt`` linear (``CpuMatMulKernel`` of ``matmul_template``, as
    ``exporters.runtime.dense`` builds it) on one token past the LLC, square matrices of
    ``sizes``, cycling through copies that hold ``multiple`` LLCs (0: two, for tests); fit
    ``t = fixed + bytes / rate`` and return ``fixed - launch_s``: what a dense linear adds to
    the tiny call the grid's layers hold, its bytes being priced by the roofline."""
    from exporters.runtime.formats import quantize
    from exporters.runtime.kernels import CpuMatMulKernel, default_threads, matmul_template

    rng = np.random.default_rng(1)
    threads = threads or default_threads()
    per_size = budget_s / len(sizes)
    nbytes, seconds, counts = [], [], []
    for k in sizes:
        arrays = quantize(rng.standard_normal((k, k), dtype=np.float32), fmt, "w")
        size = float(sum(a.nbytes for a in arrays.values()))
        count = experts_past_cache(llc_bytes, size, multiple)
        template = matmul_template(fmt, k, k)
        kernels = [CpuMatMulKernel(template, {n: a.copy() for n, a in arrays.items()}, threads) for _ in range(count)]
        x = np.ones((1, k), np.float32)
        start = clock()
        for kernel in kernels:  # the first pass warms every session
            kernel.run(x)
        passes = passes_that_fit((clock() - start) / count, count, per_size)
        per_pass = []
        for _ in range(passes):
            start = clock()
            for kernel in kernels:
                kernel.run(x)
            per_pass.append((clock() - start) / count)
        nbytes.append(size)
        seconds.append(float(np.median(per_pass)))
        counts.append(count)
        del kernels
    fixed, rate = fit_fixed_and_rate(nbytes, seconds)
    what = (f"{fmt} onnxruntime dense linear of the runtime (one pre-packed MatMulNBits session per matrix, {threads} "
            f"thread{'s' if threads > 1 else ''}) at K = N = {', '.join(map(str, sizes))}, cycling "
            f"{', '.join(map(str, counts))} matrices past the {llc_bytes / 2**20:.0f} MiB LLC, median pass at n = 1"
            f"{'; ' + stamp if stamp else ''}")
    return DenseLinearCost(
        host_s=Figure(max(fixed - launch_s, 0.0), f"probe (the fixed part of t(1) = fixed + bytes / rate by least "
                                                  f"squares over the {what}: {fixed * 1e6:.0f} us, less the tiny call "
                                                  f"the grid's layers hold, {launch_s * 1e6:.0f} us)"),
        fit={"fmt": fmt, "fixed_s": fixed, "rate_bytes_per_s": rate, "threads": threads, "llc_bytes": llc_bytes,
             "sizes": [{"k": k, "bytes": b, "matrices": c, "seconds": t}
                       for k, b, c, t in zip(sizes, nbytes, counts, seconds)]})


def _fraction(x: float) -> float:
    return float(min(1.0, max(1e-4, round(x, 4))))


def _reference(fmt: str, threads: int, llc_bytes: float, share_s: float) -> tuple[float, float]:
    """This machine's streaming read rate and ``fmt`` GEMM peak, measured as the hardware probe
    measures ``memory_bytes_per_s`` and ``peak_ops_per_s`` (its quick settings) in about
    ``share_s``: a quarter for the read, the rest for the ``fmt`` GEMM."""
    from dataclasses import replace

    from profiles.probe.cpu_gemm import _cpu_gemms
    from profiles.probe.dram import _dram
    from profiles.probe.host import _optional
    from profiles.probe.settings import QUICK

    torch, _ = _optional("torch")
    ort, _ = _optional("onnxruntime")
    least = int(2 * llc_bytes)
    settings = replace(QUICK, dram_bytes=max(QUICK.dram_bytes, least))
    _, read, _ = _dram(settings, threads, least, share_s / 4)
    # only the format it needs, so no time budget skips it on a busy machine
    peaks, skipped = _cpu_gemms(settings, torch, ort, threads, share_s * 3 / 4, share_s * 3 / 4, only=fmt)
    if fmt not in peaks:
        raise RuntimeError(f"no {fmt} GEMM peak on this machine: {skipped.get(fmt, 'not measured')}")
    return read.value, peaks[fmt].value
