"""CUDA GPUs (``torch.cuda.is_available()``): device memory bandwidth, matmul per format,
launch overhead and the expert FFN efficiency curve, once per distinct GPU model; the
host-to-device copies are in :mod:`.links`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace

from .budget import dim_that_fits, part_s, size_that_fits, tokens_that_fit, too_slow
from .efficiency import fit_efficiency
from .kernels import _torch_ffn
from .links import _gpu_transfers
from .results import EfficiencyFit, Figure, GpuFigures, _mib, _num, _one_line, _ops_unit
from .settings import MiB, ProbeSettings

# A GPU's share of the step, per measurement; the FFN curve gets what is left.
SHARES = {"transfers": 0.15, "memory": 0.1, "gemms": 0.3}
# the first sum that sizes the memory bandwidth test; smaller tests would sit in the L2 (50 MiB on an H100)
FIRST_BYTES = 64 * MiB
LEAST_BYTES = 256 * MiB
# the first GEMM of each format is FIRST_DIM^3 (or the mode's size, if smaller)
FIRST_DIM = 1024


def _probe_gpus(settings: ProbeSettings, torch, share_s: float, fair_s: float) -> list[GpuFigures]:
    """One :class:`GpuFigures` per distinct GPU model; identical GPUs share the first one's figures.
    ``share_s``: the time left for them all; ``fair_s``: what they get however late they start."""
    groups: dict[str, list[int]] = {}
    for index in range(torch.cuda.device_count()):
        groups.setdefault(torch.cuda.get_device_name(index), []).append(index)
    out = []
    start = time.perf_counter()
    for j, (name, indices) in enumerate(groups.items()):
        share = part_s(share_s, time.perf_counter() - start, 1, len(groups) - j, len(groups))
        figures = _probe_gpu(indices[0], settings, torch, share, fair_s / len(groups))
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


def _probe_gpu(index: int, settings: ProbeSettings, torch, share_s: float, fair_s: float) -> GpuFigures:
    """All figures of GPU ``index`` within ``share_s`` (``fair_s``: see :func:`_gpu_gemms`); sizes
    shrink to fit 60% of its free memory."""
    start = time.perf_counter()
    torch.cuda.set_device(index)
    dev = torch.device("cuda", index)
    props = torch.cuda.get_device_properties(index)
    reps = settings.gpu_repeats
    free, total = torch.cuda.mem_get_info(index)
    budget = int(free * 0.6)  # leave room: another process may share the GPU

    transfer_bytes = min(settings.gpu_transfer_bytes, budget // 4) // MiB * MiB or MiB
    pinned, pageable, latency = _gpu_transfers(torch, dev, transfer_bytes, reps, SHARES["transfers"] * share_s)
    copy_bytes = min(settings.gpu_copy_bytes, budget // 3) // MiB * MiB or MiB
    read_bw, copy_bw = _gpu_memory(torch, dev, copy_bytes, reps, SHARES["memory"] * share_s)
    kernel_s, call_s, ref = _gpu_overheads(torch, dev, reps)
    peaks, skipped = _gpu_gemms(settings, torch, dev, props, ref, SHARES["gemms"] * share_s, SHARES["gemms"] * fair_s)
    rest = 1 - sum(SHARES.values())
    fit = _gpu_ffn_curve(settings, torch, dev, ref, peaks, read_bw, call_s.value, budget,
                         part_s(share_s, time.perf_counter() - start, rest, rest, 1.0))
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


def _gpu_memory(torch, dev, n: int, reps: int, share_s: float) -> tuple[Figure, Figure]:
    """Device memory read bandwidth (a sum) and copy bandwidth (read + written), far above the L2;
    ``n`` bytes or fewer, sized by a first :data:`FIRST_BYTES` sum to fit ``share_s``."""
    first = min(n, FIRST_BYTES)
    src = torch.ones(first // 4, dtype=torch.float32, device=dev)
    first_s = _cuda_best_s(torch, lambda: src.sum(), 1)
    least = min(n, LEAST_BYTES)
    # per call: a sum reads the bytes once, a copy reads and writes them
    n = size_that_fits(first_s / first, share_s, calls=3 * (1 + reps), most=n, least=least, step=MiB) or least
    src = torch.ones(n // 4, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    read = Figure(n / _cuda_best_s(torch, lambda: src.sum(), reps),
                  f"torch sum over a {_mib(n)} fp32 tensor, CUDA events, best of {reps} (bytes read / s)")
    copy = Figure(2 * n / _cuda_best_s(torch, lambda: dst.copy_(src), reps),
                  f"device-to-device copy_ of {_mib(n)}, CUDA events, best of {reps} (bytes read + written / s)")
    return read, copy


def _gpu_gemms(settings: ProbeSettings, torch, dev, props, ref: str, share_s: float,
               fair_s: float) -> tuple[dict[str, Figure], dict[str, str]]:
    """Throughput of one ``d x d x d`` GEMM per format this GPU and torch build run.

    Each format gets an even part of what is left of ``share_s``; a first :data:`FIRST_DIM`
    GEMM sizes ``d`` (at most ``gpu_gemm_dim``). A format whose first GEMM, warmed up and timed,
    would take more than an even part of ``fair_s`` (the part however late the step started) is
    skipped as too slow, except fp32 and ``ref``, the half format of the FFN curve.
    """
    reps = settings.gpu_repeats
    peaks: dict[str, Figure] = {}
    skipped: dict[str, str] = {}

    def operands(d, dtype):
        return torch.randn(d, d, device=dev).to(dtype), torch.randn(d, d, device=dev).to(dtype)

    def fp32(d):
        a, b = operands(d, torch.float32)
        return lambda: torch.matmul(a, b)

    def half(dtype):
        def make(d):
            a, b = operands(d, dtype)
            return lambda: torch.matmul(a, b)
        return make

    def fp8(d):
        a = torch.randn(d, d, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(d, d, device=dev).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.tensor(1.0, device=dev)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    def int8(d):
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

    d0 = min(settings.gpu_gemm_dim, FIRST_DIM)
    start = time.perf_counter()
    with _ieee_fp32(torch):  # fp32 means fp32, not TF32 tensor cores
        for i, (fmt, make, how) in enumerate(candidates):
            share = part_s(share_s, time.perf_counter() - start, 1, len(candidates) - i, len(candidates))
            try:
                first_s = _cuda_best_s(torch, make(d0), 1)
                d = dim_that_fits(first_s, d0, share, calls=1 + reps, most=settings.gpu_gemm_dim, least=d0)
                fair = fair_s / len(candidates)
                if 2 * first_s > fair and fmt not in ("fp32", ref):
                    first = f"a first {d0}^3 GEMM reached {_num(2.0 * d0 ** 3 / first_s, _ops_unit(fmt))}, {how}"
                    skipped[fmt] = too_slow(first, "it, warmed up and timed once,", 2 * first_s, fair)
                    continue
                d = d or d0
                peaks[fmt] = Figure(2.0 * d ** 3 / _cuda_best_s(torch, make(d), reps),
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
                   overhead_s: float, budget: int, share_s: float) -> EfficiencyFit | None:
    """The expert FFN efficiency curve on the GPU, cycling experts so weights come from HBM, not L2.

    A first call at the smallest token count and the ``ref`` peak give the expected seconds
    per call; the token counts whose timings (a warm-up and ``gpu_repeats`` rounds over the
    experts) fit ``share_s`` are kept (:func:`~.budget.tokens_that_fit`: spanning the range, two at least).
    """
    if ref not in peaks:
        return None
    dtype = torch.bfloat16 if ref == "bf16" else torch.float16
    h, i = settings.gpu_ffn_hidden, settings.gpu_ffn_intermediate
    flops_per_token = 2.0 * 3 * h * i
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
        x1 = torch.full((settings.gpu_ffn_tokens[0], h), 0.01, dtype=dtype, device=dev)
        first = _cuda_best_s(torch, lambda: _torch_ffn(torch, experts[-1], x1), 1)
        peak = peaks[ref].value
        tokens = tokens_that_fit(settings.gpu_ffn_tokens, lambda n: max(first, overhead_s + n * flops_per_token / peak),
                                 share_s, calls=1 + reps * count, least=2)
        for n in tokens:
            x = torch.full((n, h), 0.01, dtype=dtype, device=dev)
            turn = iter(range(10**9))

            def call(x=x, turn=turn):
                _torch_ffn(torch, experts[next(turn) % count], x)

            times[n] = _cuda_best_s(torch, call, reps, inner=count)
    torch.cuda.empty_cache()
    return fit_efficiency(
        {ref: times}, {ref: float(expert_bytes)}, {ref: overhead_s}, ref, peaks[ref].value, read.value,
        flops_per_token=flops_per_token,
        method=f"torch {ref} gated FFN H={h} I={i}, {count} experts cycled, back-to-back calls timed with CUDA "
               f"events, best of {reps}; fraction(n) = 2*n*3*H*I / (peak {ref} * (t(n) - overhead))")
