"""Batch size as a decision: the highest tokens/s under TPOT and TTFT SLOs, with a certificate.

The ILP plans one batch size at a time (its step time prices that many sequences' expert calls
and KV reads; its memory holds that many sequences' KV cache). This outer search chooses the
batch size. It is exact up to a stated gap, not a doubling heuristic:

* step*(b), the best step time at batch b, never falls as b grows: a plan that fits b + 1
  sequences fits b (less KV), and every term of the step time grows with the tokens in a step.
  So each solve's lower bound L(b) (the ILP's certified bound) bounds every larger batch too:
  for any b' >= b, step*(b') >= L(b).
* TPOT is the step time, so once L(b) > SLO every batch >= b misses it (certified infeasible);
  a batch whose memory does not fit makes every larger one infeasible as well.
* tokens/s at b' in (a, c) -- an interval between two solved batches -- is at most
  (c - 1) / L(a); at a solved batch b at most b / L(b).

Best-first over intervals: split the interval with the highest bound at its midpoint until no
unsolved batch can beat the incumbent by more than the gap (or ``max_solves`` solves are spent:
a work limit, so the answer does not depend on the machine's load). The gap is
(bound - incumbent) / bound, the ILP's definition mirrored for a maximisation; it includes the
chosen batch's own ILP gap. A TTFT SLO is a constraint of each solve (one prompt's prefill is
a sum of per-layer option terms, :func:`planner.prefill_costs.prefill_options_s`), and the least TTFT
never falls as the batch grows either (the KV cache only takes memory away), so a batch where
it cannot be met ends the range like one that does not fit. Where a solve does not bind it (a
pipeline plan over several GPUs) it is checked on the plan: a plan that misses it is no
incumbent, and its batch keeps its bound.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from profiles.errors import InfeasibleError

from .plan import BatchSearch, Plan

__all__ = ["search_batch", "MAX_SOLVES"]

MAX_SOLVES = 24  # ILP solves per search (a work limit): doubling to 1,024 is 11, the rest refine


@dataclass(frozen=True)
class _Point:
    batch: int
    plan: Plan | None  # None: does not fit in memory
    lower_s: float  # certified lower bound on step*(batch); inf when it does not fit
    exact: bool = False  # solved to gap 0

    def meets(self, slo_tpot_s: float | None, slo_ttft_s: float | None) -> bool:
        if self.plan is None:
            return False
        p = self.plan.predicted
        return ((slo_tpot_s is None or p["tpot_s"] <= slo_tpot_s)
                and (slo_ttft_s is None or p["ttft_s"] <= slo_ttft_s))


def _lower_s(plan: Plan) -> float:
    """The ILP's certified lower bound on the step time at this batch (the plan's own time where none)."""
    b = plan.solver.bound
    return float(b) if b is not None and b > 0 else float(plan.predicted["tpot_s"])


def search_batch(solve_at: Callable[[int, bool], Plan], *, slo_tpot_s: float | None, slo_ttft_s: float | None,
                 max_batch: int, gap: float, max_solves: int = MAX_SOLVES) -> tuple[Plan, BatchSearch]:
    """The plan with the most tokens/s among batch sizes 1..``max_batch`` meeting both SLOs.

    ``solve_at(b, exact)`` plans batch ``b`` (to gap 0 when ``exact``; raises InfeasibleError
    when it does not fit). A batch whose plan misses TPOT while its bound does not (the ILP's
    own gap straddles the SLO) is solved again exactly when it could beat the incumbent. Returns
    the chosen plan and the search's certificate; raises InfeasibleError when no batch meets the SLOs.
    """
    points: dict[int, _Point] = {}
    stop = max_batch + 1  # every batch >= stop is out: past max_batch, does not fit, or certified to miss TPOT
    solves = 0

    def solve(b: int, exact: bool = False) -> None:
        nonlocal stop, solves
        solves += 1
        try:
            plan = solve_at(b, exact)
        except InfeasibleError:
            if b == 1:
                raise  # its own explanation of what does not fit
            points[b] = _Point(b, None, float("inf"), exact)
            stop = min(stop, b)
            return
        points[b] = pt = _Point(b, plan, _lower_s(plan), exact)
        if slo_tpot_s is not None and pt.lower_s > slo_tpot_s:
            stop = min(stop, b)

    solve(1)
    b = 2
    while b < stop and solves < max_solves:  # doubling: brackets where TPOT or memory runs out
        solve(b)
        b *= 2
    if stop > max_batch and max_batch not in points and solves < max_solves:
        solve(max_batch)  # the range's end

    def intervals() -> list[tuple[float, int, int]]:
        """(-bound, lo, hi) per gap between solved batches below ``stop`` holding an unsolved batch:
        any batch lo < b < hi makes at most (hi - 1) / L(lo) tokens/s."""
        done = sorted(x for x in points if x < stop)
        return [(-(hi - 1) / points[lo].lower_s, lo, hi) for lo, hi in zip(done, done[1:] + [stop]) if hi - lo > 1]

    def solved() -> list[tuple[float, int, int]]:
        """(-bound, b, b) per solved batch below ``stop``: at most b / L(b) tokens/s."""
        return [(-p.batch / p.lower_s, p.batch, p.batch) for p in points.values() if p.batch < stop]

    def incumbent() -> _Point | None:
        ok = [p for p in points.values() if p.meets(slo_tpot_s, slo_ttft_s)]
        return max(ok, key=lambda p: (p.plan.predicted["tokens_per_s"], -p.batch), default=None)

    while solves < max_solves:
        best = incumbent()
        target = best.plan.predicted["tokens_per_s"] if best is not None else 0.0
        todo = [x for x in intervals() + [p for p in solved() if not points[p[1]].exact]
                if -x[0] * (1.0 - gap) > target]
        if not todo:
            break
        _, lo, hi = min(todo)  # the highest bound first
        if lo == hi:
            solve(lo, exact=True)
        else:
            solve((lo + hi) // 2)
    best = incumbent()
    if best is None:
        what = " and ".join(f"{n} <= {v * 1e3:g} ms" for n, v in (("TPOT", slo_tpot_s), ("TTFT", slo_ttft_s))
                            if v is not None)
        raise InfeasibleError(f"no batch size up to {max_batch} meets {what}; smallest change: relax the SLO, "
                              f"or use faster hardware")
    tps = best.plan.predicted["tokens_per_s"]
    ub = max([-x[0] for x in intervals() + solved()] + [tps])
    g = (ub - tps) / ub
    cert = BatchSearch(slo_tpot_s=slo_tpot_s, slo_ttft_s=slo_ttft_s, max_batch=max_batch,
                       solved=tuple(sorted(points)), solves=solves, batch=best.batch, tokens_per_s=tps,
                       tokens_per_s_bound=ub, gap=g, status="optimal" if g <= gap + 1e-9 else "open gap")
    return best.plan, cert
