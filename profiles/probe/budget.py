"""Time bounds: every measurement runs a small first size, and the real one is sized from it.

The probe has a wall-clock budget (``ProbeSettings.budget_s``: quick 15 s, full 60 s). Each
step gets a share of what is left of it, by weight (:class:`Steps`); inside a step, a first
small run gives the seconds per unit of work (per GEMM row, per byte, per call), and the
functions here turn that and the share into the work to schedule: repeats, rows, bytes,
matrix dimensions, token counts. They take measured seconds, not clocks, so tests give
them made-up rates; :func:`best_s` and :class:`Steps` take the clock as an argument.

A format whose first small run shows that even its smallest real measurement would take more
than its even part of the budget (:meth:`Steps.fair_s`: what it gets on a machine whose earlier
steps kept to their shares) is skipped, and the reason says so (:func:`too_slow`). A late
step measures the formats that are not that slow at their smallest instead of skipping them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .results import Progress, _num

# Plan to this share of the budget: the estimates are rough (a first run's rate), some work
# is not sized at all (importing torch, creating sessions, the first CUDA call), and the
# command's own start-up and the profile's validation are outside the probe's clock (~3 s on
# a busy 2-core machine).
PLANNED_FRACTION = 0.7
# However late a step starts, it gets at least this share of its even part of the budget:
# enough for the smallest measurements, which every profile needs (fp32, one disk read).
LEAST_SHARE_FRACTION = 0.1

Clock = Callable[[], float]


def best_s(fn: Callable[[], object], repeats: int, warmup: int = 1, budget_s: float = math.inf,
           clock: Clock = time.perf_counter) -> float:
    """Fastest of up to ``repeats`` timed calls after ``warmup`` untimed ones (seconds).

    A timed call after the first starts only if one more call as fast as the fastest so far
    still ends within ``budget_s`` of the start (warm-up included).
    """
    start = clock()
    for _ in range(warmup):
        fn()
    best = math.inf
    for i in range(max(1, repeats)):
        if i and clock() - start + best > budget_s:
            break
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def size_that_fits(unit_s: float, share_s: float, calls: float, most: int, least: int, step: int = 1) -> int | None:
    """The largest size, a multiple of ``step`` and at most ``most``, of which ``calls`` calls
    fit in ``share_s`` at ``unit_s`` seconds per unit of size; None when ``least`` does not fit.

    >>> size_that_fits(unit_s=1e-3, share_s=1.0, calls=4, most=512, least=64, step=16)  # 250 rows fit
    240
    """
    fit = share_s / (calls * unit_s) if unit_s > 0 else math.inf
    size = min(most, fit // step * step)
    return int(size) if size >= least else None


def dim_that_fits(first_s: float, first_dim: int, share_s: float, calls: float, most: int, least: int,
                  step: int = 256) -> int | None:
    """The largest ``d`` (a multiple of ``step``, at most ``most``) of which ``calls`` d x d x d
    GEMMs fit in ``share_s``, one at ``first_dim`` having taken ``first_s``; None when ``least`` does not."""
    fit = first_dim * (share_s / (calls * first_s)) ** (1 / 3) if first_s > 0 else math.inf
    d = min(most, fit // step * step)
    return int(d) if d >= least else None


def tokens_that_fit(tokens: tuple[int, ...], call_s: Callable[[int], float], share_s: float,
                    calls: float = 3, least: int = 1) -> tuple[int, ...]:
    """The token counts of a curve whose ``calls`` calls each, at ``call_s(n)`` seconds per
    call, fit in ``share_s`` together; sorted.

    They are taken so that the curve spans what it can: the smallest, the largest, then the
    middle ones by halving (1, 256, 16, 4, 64, 2, 8, 32, 128), each one kept if it still fits;
    the first ``least`` of that order whether they fit or not (a curve needs its two ends).

    >>> tokens_that_fit((1, 2, 4, 8, 16, 32, 64, 128, 256), lambda n: 1e-3 * max(1, n / 16), 0.1)
    (1, 2, 4, 8, 16, 32, 64, 256)
    """
    kept, spent = [], 0.0
    for rank, j in enumerate(_halving_order(len(tokens))):
        cost = calls * call_s(tokens[j])
        if rank < max(1, least) or spent + cost <= share_s:
            kept.append(tokens[j])
            spent += cost
    return tuple(sorted(kept))


def _halving_order(k: int) -> list[int]:
    """Indices 0..k-1: the ends first, then the midpoints, breadth first (9: 0 8 4 2 6 1 3 5 7)."""
    if k <= 2:
        return list(range(k))
    order, spans = [0, k - 1], [(0, k - 1)]
    while spans:
        lo, hi = spans.pop(0)
        if hi - lo > 1:
            mid = (lo + hi) // 2
            order.append(mid)
            spans += [(lo, mid), (mid, hi)]
    return order


def part_s(share_s: float, spent_s: float, weight: float, weight_left: float, weight_total: float) -> float:
    """Seconds for one part of a step of ``share_s`` seconds, ``spent_s`` of them gone: the
    part's ``weight`` of what is left (``weight_left``: this part's and the later ones'), and,
    like :meth:`Steps.share_s`, at least :data:`LEAST_SHARE_FRACTION` of its part of the whole."""
    return max(LEAST_SHARE_FRACTION * share_s * weight / weight_total,
               (share_s - spent_s) * weight / weight_left)


def too_slow(first: str, least: str, need_s: float, fair_s: float) -> str:
    """The reason a format is skipped after its first small run: ``first`` says what that run
    did, ``least`` what the smallest real measurement is, ``fair_s`` what one format may take."""
    return (f"too slow for this mode's time budget: {first}, so {least} would take {_num(need_s, 's')}, "
            f"more than the {_num(fair_s, 's')} one format has")


class Steps:
    """Reports ``(description, fraction done)`` as named steps start; times each step and
    shares the time budget out to them.

    Args:
        weights: step name -> its weight in the progress bar and in the budget.
        progress: called with ``(description, fraction done)``.
        budget_s: the whole probe's wall-clock budget (seconds).
        clock: seconds, monotonic.
    """

    def __init__(self, weights: dict[str, float], progress: Progress | None, budget_s: float = math.inf,
                 clock: Clock = time.perf_counter) -> None:
        self.weights = weights
        self.total = sum(weights.values())
        self.done = 0.0
        self.progress = progress
        self.times: dict[str, float] = {}
        self.budget_s = budget_s
        self.clock = clock
        self.t0 = clock()
        self._current: tuple[str, float] | None = None

    def drop(self, name: str) -> None:
        """A step that will not run: it takes no share of the bar or of the budget."""
        self.total -= self.weights.pop(name)

    def start(self, name: str, description: str) -> None:
        self._finish()
        self._current = (name, self.clock())
        if self.progress:
            self.progress(description, self.done / self.total)

    def share_s(self) -> float:
        """Seconds the current step may take: its weight's part of what is left of the planned
        budget, and at least :data:`LEAST_SHARE_FRACTION` of :meth:`fair_s`."""
        left = PLANNED_FRACTION * self.budget_s - (self.clock() - self.t0)
        return max(LEAST_SHARE_FRACTION * self.fair_s(), left * self._weight() / (self.total - self.done))

    def fair_s(self) -> float:
        """The current step's part of the whole planned budget by its weight, however long the
        steps before it took: what decides whether a format is too slow for the mode."""
        return PLANNED_FRACTION * self.budget_s * self._weight() / self.total

    def _weight(self) -> float:
        if self._current is None:
            raise RuntimeError("no step started")
        return self.weights.get(self._current[0], 0.0)

    def _finish(self) -> None:
        if self._current is not None:
            name, t0 = self._current
            self.times[name] = round(self.clock() - t0, 3)
            self.done += self.weights.get(name, 0.0)
            self._current = None

    def close(self) -> None:
        self._finish()
        if self.progress:
            self.progress("done", 1.0)
