"""The efficiency fit: measured expert call times -> the profile's ``efficiency`` block
(:class:`~profiles.hardware.EfficiencySpec`): per token count ``fraction(n) = flops(n) /
(peak * (t(n) - overhead))``, so that :func:`profiles.perf.expert_call_s` gives back the
measured call time at every point."""

from __future__ import annotations

import math

import numpy as np

from .results import EfficiencyFit


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
