"""CPU matmul throughput per format: fp32 (torch, else numpy), bf16 (torch), int8 and int4
(ONNX Runtime ``MatMulNBits``, weights quantised by onnxruntime's own block quantiser), each
skipped with a reason when its library is missing or it is too slow for the time budget."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from .budget import Clock, best_s, part_s, too_slow
from .kernels import _ort_matmul_model, _ort_session
from .results import Figure, _num, _one_line, _ops_unit
from .settings import BLOCK_SIZE, ProbeSettings

# The first GEMM of each format has this many rows: its time per row sizes the real one.
FIRST_ROWS = 8
# Fewer rows than this measure a matrix-vector product's memory traffic, not a GEMM's throughput.
LEAST_ROWS = 64
GROWTH = 4  # beyond LEAST_ROWS, each size is this many times the last
# A first call this many times over what a format may take is too slow whatever a second says.
SURE_FACTOR = 4

Gemm = Callable[[int], object]  # gemm(rows): one [rows, K] @ [K, N] product


def _cpu_gemms(settings: ProbeSettings, torch, ort, threads: int, share_s: float, fair_s: float,
               clock: Clock = time.perf_counter, only: str | None = None) -> tuple[dict[str, Figure], dict[str, str]]:
    """Throughput of one large GEMM per format: ``({format: ops/s}, {format: why skipped})``.

    Each format gets an even part of what is left of ``share_s`` (its setup, converting
    weights or creating a session, aside). A first :data:`FIRST_ROWS`-row GEMM, timed twice
    (once when the first call alone is :data:`SURE_FACTOR` times over), gives its seconds per
    row; the GEMM then grows, to :data:`LEAST_ROWS` rows and fourfold after, up to ``gemm_m``,
    while the grown one's warm-up and ``gemm_repeats`` timed calls would still fit. A format
    whose warm-up and one timed call of :data:`LEAST_ROWS` rows would take more than an even
    part of ``fair_s`` (the step's part of the budget however late it started) is skipped as
    too slow, except fp32: every profile needs one peak. Any other runs at least that.
    ``only``: measure that format alone, as the first (whatever its speed: a caller that
    needs its peak gets one however busy the machine is).
    """
    m, k = settings.gemm_m, settings.gemm_dim
    n = k
    reps = settings.gemm_repeats
    peaks: dict[str, Figure] = {}
    skipped: dict[str, str] = {}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    # (format, make() -> gemm, its name, the method with {shape}); make() does the setup
    # (conversions, sessions), which is not the format's speed: its time is not in its share
    candidates: list[tuple[str, Callable[[], Gemm], str, str]] = []
    if torch is not None:
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        candidates.append(("fp32", lambda: lambda r: torch.matmul(tx[:r], tw), "torch.matmul fp32",
                           f"torch.matmul fp32 {{shape}}, {threads} threads"))

        def bf16() -> Gemm:
            bx, bw = tx.to(torch.bfloat16), tw.to(torch.bfloat16)
            return lambda r: torch.matmul(bx[:r], bw)

        candidates.append(("bf16", bf16, "torch.matmul bf16", f"torch.matmul bf16 {{shape}}, {threads} threads"))
    else:
        candidates.append(("fp32", lambda: lambda r: np.matmul(x[:r], w), "numpy.matmul fp32",
                           "numpy.matmul fp32 {shape} (BLAS threads)"))
        skipped["bf16"] = "torch is not installed"
    skipped["fp16"] = "not probed on CPUs: fp16 weights run in the bf16/fp32 fallback"
    for fmt, bits in (("int8", 8), ("int4", 4)):
        if ort is None:
            skipped[fmt] = "onnxruntime is not installed"
            continue

        def session(bits: int = bits) -> Gemm:
            s = _ort_session(_ort_matmul_model(w, bits), ort, threads)
            return lambda r: s.run(None, {"x": x[:r]})

        name = f"onnxruntime MatMulNBits bits={bits}"
        candidates.append((fmt, session, name, f"{name} block {BLOCK_SIZE} accuracy_level=4 (int8 activations), "
                                               f"weights quantised by onnxruntime quantize_matmul_{bits}bits, "
                                               f"{{shape}}, {threads} threads"))

    if only is not None:
        candidates = [c for c in candidates if c[0] == only]
    start = clock()
    least = min(LEAST_ROWS, m)
    for i, (fmt, make, name, how) in enumerate(candidates):
        share = part_s(share_s, clock() - start, 1, len(candidates) - i, len(candidates))
        fair = fair_s / len(candidates)
        try:
            gemm = make()
            fmt_start = clock()
            # the first call warms up and is timed too: far too slow already, it is not repeated
            t = best_s(lambda: gemm(FIRST_ROWS), 1, warmup=0, clock=clock)
            if 2 * least * t / FIRST_ROWS < SURE_FACTOR * fair:
                t = min(t, best_s(lambda: gemm(FIRST_ROWS), 1, warmup=0, clock=clock))
        except Exception as exc:  # noqa: BLE001 - an older onnxruntime without 8-bit MatMulNBits or the quantiser
            if i == 0:
                raise
            skipped[fmt] = f"{name} failed: {_one_line(exc)}"
            continue
        rows, first_s = FIRST_ROWS, t
        # grow the GEMM (to LEAST_ROWS, then fourfold) while the next size's calls fit, at this
        # size's seconds per row (an overestimate: the smaller a GEMM, the less efficient): one
        # call and one timed to reach LEAST_ROWS, one and the timed repeats beyond
        while rows < m:
            grown = min(m, max(least, GROWTH * rows))
            calls = 2 if rows < least else 1 + reps
            if calls * t * grown / rows > share - (clock() - fmt_start):
                break
            rows, t = grown, best_s(lambda r=grown: gemm(r), 1, warmup=0, clock=clock)
        if rows < least:
            need_s = 2 * least * first_s / FIRST_ROWS
            if i > 0 and need_s > fair:
                first = (f"a first {FIRST_ROWS}-row {name} reached "
                         f"{_num(2.0 * FIRST_ROWS * k * n / first_s, _ops_unit(fmt))}")
                skipped[fmt] = too_slow(first, f"{least} rows, warmed up and timed once,", need_s, fair)
                continue
            rows = least  # late in the budget, or fp32, which is measured whatever its speed
            gemm(rows)
        # the last call of the growth (or the one above) warmed this size up
        best = best_s(lambda: gemm(rows), reps, warmup=0, budget_s=share - (clock() - fmt_start), clock=clock)
        peaks[fmt] = Figure(2.0 * rows * k * n / best,
                            how.format(shape=f"{rows}x{k} @ {k}x{n}") + f", best of up to {reps}")
    return peaks, skipped
