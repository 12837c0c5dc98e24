"""The efficiency curve of one gated expert FFN call on the CPU vs tokens (1, 2, 4, ... 256),
cycling through E copies of the expert so that their weights come from DRAM, not the caches.

Legend: H = hidden size, I = expert intermediate size, n = tokens in one expert call,
E = experts cycled through.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .budget import best_s, part_s, tokens_that_fit
from .efficiency import fit_efficiency
from .kernel_bytes import _anon_bytes, _held_factor
from .kernels import _ort_ffn_model, _ort_session, _quantised_bytes, _torch_ffn, _weights_outside
from .results import EfficiencyFit, Figure, _mib
from .settings import CURVE_PREFERENCE, ProbeSettings

# A format's part of the step, in token counts: building and warming its experts counts as 2.
SETUP_WEIGHT = 2
# The most of a format's part that creating onnxruntime expert sessions may take.
SETUP_FRACTION = 0.3
# Each token count is timed at least this many times (the fastest is kept).
LEAST_CALLS = 3


class _Experts(NamedTuple):
    """The experts of one format, ready to time."""

    calls: list[Callable[[int], object]]  # calls[e](n): expert e on n tokens
    tiny_call: Callable[[], object]  # one expert at H = I = 128, 1 token: the fixed cost of a call
    weight_bytes: float  # of one expert
    note: str  # how they were made, for the method
    held: Figure | None  # the kernel-bytes factor, where measured
    warm_each_size: bool  # the first run at a new token count allocates (onnxruntime): warm it


def _cpu_ffn_curve(settings: ProbeSettings, dram: np.ndarray, dram_read_bytes_per_s: float,
                   peaks: dict[str, Figure], torch, ort, threads: int, share_s: float, least_bytes: float,
                   ) -> tuple[EfficiencyFit | None, Figure | None, dict[str, Figure]]:
    """Time one gated FFN call per token count, per format, cycling experts; fit the curve.

    The fp32 experts live in the DRAM test array (no new allocation); int8/int4 experts are
    separate onnxruntime sessions of one quantised expert's bytes (the values do not matter
    for timing, so the block quantiser runs once per matrix). However short the time, the
    experts of a format hold ``least_bytes`` at least (past the caches).

    Time: each format gets a part of ``share_s`` by its token counts (:data:`SETUP_WEIGHT`
    more for its experts). Its first call at the smallest token count and its GEMM peak give
    the expected seconds per call at every n; the curve keeps the token counts whose
    :data:`LEAST_CALLS` calls fit (:func:`~.budget.tokens_that_fit`: spanning the range, two at
    least), the rest of the part spread over them.
    """
    h, i = settings.ffn_hidden, settings.ffn_intermediate
    flops_per_token = 2.0 * 3 * h * i
    rng = np.random.default_rng(1)
    call_s: dict[str, dict[int, float]] = {}
    overhead_s: dict[str, float] = {}
    weight_bytes: dict[str, float] = {}
    notes: dict[str, str] = {}
    held: dict[str, Figure] = {}
    ref = None
    # the first format measured (in CURVE_PREFERENCE order) gets the whole curve; the others
    # only settings.ffn_other_tokens (their one-token call feeds the memory fraction)
    formats = sorted(set(settings.ffn_formats) & set(peaks), key=CURVE_PREFERENCE.index)
    weights = [SETUP_WEIGHT + len(settings.ffn_tokens if j == 0 else settings.ffn_other_tokens)
               for j in range(len(formats))]
    start = time.perf_counter()
    for j, fmt in enumerate(formats):
        share = part_s(share_s, time.perf_counter() - start, weights[j], sum(weights[j:]), sum(weights))
        fmt_start = time.perf_counter()
        tokens = settings.ffn_tokens if ref is None else settings.ffn_other_tokens
        if fmt in ("fp32", "bf16"):
            made = _torch_or_numpy_experts(fmt, dram, h, i, settings, tokens, torch)
        else:
            made = _ort_experts(fmt, h, i, settings, tokens, ort, threads, rng, SETUP_FRACTION * share, least_bytes)
        if made is None:
            continue
        if made.held is not None:
            held[fmt] = made.held
        overhead = best_s(made.tiny_call, 200 if settings.mode != "tiny" else 20, warmup=5, budget_s=0.05 * share)
        first = best_s(lambda: made.calls[0](tokens[0]), 1)
        peak = peaks[fmt].value

        def expected_s(n: int, first=first, overhead=overhead, peak=peak) -> float:
            return max(first, overhead + n * flops_per_token / peak)

        left = share - (time.perf_counter() - fmt_start)
        # the written curve needs two points at least
        kept = tokens_that_fit(tokens, expected_s, left, calls=LEAST_CALLS, least=2 if ref is None else 1)
        if made.warm_each_size:  # the largest on the first experts the curve visits beyond 16 tokens
            for call in made.calls[:4]:
                call(kept[-1])
        spare = left - sum(LEAST_CALLS * expected_s(n) for n in kept)
        point_s = min(settings.ffn_point_s, max(0.0, spare / len(kept)))
        overhead_s[fmt] = overhead
        call_s[fmt] = _time_curve(made.calls, kept, point_s)
        weight_bytes[fmt] = made.weight_bytes
        notes[fmt] = made.note
        ref = ref or fmt
    if ref is None:
        return None, None, held
    timed = ", ".join(map(str, call_s[ref]))
    fit = fit_efficiency(
        call_s, weight_bytes, overhead_s, ref, peaks[ref].value, dram_read_bytes_per_s,
        flops_per_token=flops_per_token,
        method=f"gated FFN H={h} I={i} ({notes[ref]}) timed at n = {timed} tokens, fastest call per n; "
               f"fraction(n) = 2*n*3*H*I / (peak {ref} * (t(n) - overhead))")
    overhead = Figure(overhead_s[ref], f"fastest of up to 200 {ref} expert FFN calls at H=I=128, 1 token "
                                       f"({notes[ref]}): the fixed cost of one call")
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
        while len(times) < LEAST_CALLS or (len(times) < most and time.perf_counter() - start < point_s):
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
                            tokens: tuple[int, ...], torch) -> _Experts | None:
    """fp32 experts viewed in the DRAM array (bf16: converted copies)."""
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
        return _Experts(calls, lambda: _torch_ffn(torch, tiny, x1), per * (4 if fmt == "fp32" else 2), note, None,
                        warm_each_size=False)

    xs = {n: np.full((n, h), 0.01, dtype=np.float32) for n in tokens}

    def numpy_ffn(ex, x):
        gate, up, down = ex
        g = x @ gate
        return ((g / (1.0 + np.exp(-g))) * (x @ up)) @ down

    calls = [lambda n, ex=ex: numpy_ffn(ex, xs[n]) for ex in experts]
    tiny = tuple(np.full((128, 128), 0.01, dtype=np.float32) for _ in range(3))
    x1 = np.full((1, 128), 0.01, dtype=np.float32)
    note = f"numpy fp32, {count} experts ({_mib(count * per * 4)}) cycled"
    return _Experts(calls, lambda: numpy_ffn(tiny, x1), per * 4, note, None, warm_each_size=False)


def _ort_experts(fmt: str, h: int, i: int, settings: ProbeSettings, tokens: tuple[int, ...], ort, threads: int,
                 rng, setup_s: float, least_bytes: float) -> _Experts | None:
    """onnxruntime sessions of one int8/int4 expert, as many as fill the working set; fewer
    where creating them (timed on the first) would take more than ``setup_s``, but never
    fewer than hold ``least_bytes``."""
    if ort is None:
        return None
    bits = 8 if fmt == "int8" else 4
    scale = 0.02
    gate = (rng.standard_normal((h, i), dtype=np.float32) * scale)
    up = (rng.standard_normal((h, i), dtype=np.float32) * scale)
    down = (rng.standard_normal((i, h), dtype=np.float32) * scale)
    xs = {n: np.full((n, h), 0.01, dtype=np.float32) for n in tokens}
    x1 = np.full((1, 128), 0.01, dtype=np.float32)
    # first runs allocate: every session is warmed at the streaming sizes
    streaming = [n for n in tokens if n <= 16] or [tokens[0]]
    try:
        # the weights live outside the sessions, as the runtime's mapped files do: what a
        # session adds to the process is what it holds of its own
        model, weights = _weights_outside(_ort_ffn_model(gate, up, down, bits))
        expert_bytes = _quantised_bytes(h, i, bits)
        wanted = _expert_count(settings, expert_bytes)
        tiny_w = np.full((128, 128), 0.01, dtype=np.float32)
        tiny = _ort_session(_ort_ffn_model(tiny_w, tiny_w, tiny_w, bits), ort, threads)
        before = _anon_bytes()
        t = time.perf_counter()
        sessions = [_ort_session(model, ort, threads, weights)]
        sessions[0].run(None, {"x": xs[streaming[-1]]})
        least = min(wanted, max(2, math.ceil(least_bytes / expert_bytes)))
        count = min(wanted, max(least, int(setup_s / (time.perf_counter() - t))))
        sessions += [_ort_session(model, ort, threads, weights) for _ in range(count - 1)]
    except Exception:  # noqa: BLE001 - the GEMM step already recorded why this format does not run
        return None
    for s in sessions[1:]:
        s.run(None, {"x": xs[streaming[-1]]})
    factor = _held_factor(before, _anon_bytes(), count, expert_bytes, fmt, streaming[-1])
    calls = [lambda n, s=s: s.run(None, {"x": xs[n]}) for s in sessions]
    cut = f", cut from {wanted} to fit the time budget" if count < wanted else ""
    note = (f"onnxruntime MatMulNBits bits={bits} accuracy_level=4, {count} expert sessions "
            f"({_mib(count * expert_bytes)}{cut}) of {threads} non-spinning threads cycled")
    return _Experts(calls, lambda: tiny.run(None, {"x": x1}), expert_bytes, note, factor, warm_each_size=True)
