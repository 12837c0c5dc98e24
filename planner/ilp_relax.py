"""The LP relaxation of the placement ILP and the plans it leads to: its bound and reduced
costs (reduced-cost fixing), rounding it, a greedy repair and a one-layer-at-a-time local
search, and the parts by count[nvme] (see :mod:`planner.ilp`'s docstring)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .ilp_model import Problem, _feasible, _limits, _objective, _spills, _time_unit, _usage

def _repair(problem: Problem, times: list[np.ndarray], fronts: list[np.ndarray], choice: list[int],
            dense_fm: str) -> list[int] | None:
    """Greedy repair of a rounded LP solution: while a coupling row is over its limit, make
    the single-layer switch that removes the most excess per second of added time without
    pushing another row over. Returns None if it gets stuck."""
    limit = _limits(problem, dense_fm)
    usage = [_usage(problem, l, fronts[l]) for l in range(len(fronts))]
    pos = [int(np.flatnonzero(fronts[l] == w)[0]) for l, w in enumerate(choice)]
    choice = list(choice)
    scale = np.where(np.isfinite(limit) & (limit > 0), limit, 1.0)
    for _ in range(4 * len(fronts)):
        used = sum(usage[l][pos[l]] for l in range(len(fronts)))
        excess = np.maximum(used - limit * (1 + 1e-12), 0.0) / scale
        if not excess.any():
            return choice
        best = None
        for l in range(len(fronts)):
            delta = (usage[l] - usage[l][pos[l]]) / scale  # [N, R]
            after = (used / scale) + delta
            over_after = np.maximum(after - limit / scale, 0.0)
            gain = excess.sum() - over_after.sum(axis=1)  # excess removed
            dt = times[l][fronts[l]] - times[l][choice[l]]
            ok = gain > 1e-12
            if not ok.any():
                continue
            score = np.where(ok, np.maximum(dt, 0.0) / np.maximum(gain, 1e-300) - 1e-9 * gain, np.inf)
            j = int(np.argmin(score))
            if np.isfinite(score[j]) and (best is None or score[j] < best[0]):
                best = (score[j], l, j)
        if best is None:
            return None
        _, l, j = best
        pos[l], choice[l] = j, int(fronts[l][j])
    return None


def _improve(problem: Problem, times: list[np.ndarray], fronts: list[np.ndarray], choice: list[int],
             dense_fm: str) -> list[int]:
    """Local search from a feasible plan: switch the one layer whose fastest option that still
    fits next to the other layers' use of every coupling row saves the most; until none does."""
    limit = _limits(problem, dense_fm) * (1 + 1e-12)
    usage = [_usage(problem, l, fronts[l]) for l in range(len(fronts))]
    tau = [times[l][fronts[l]] for l in range(len(fronts))]
    pos = [int(np.flatnonzero(fronts[l] == w)[0]) for l, w in enumerate(choice)]
    for _ in range(4 * len(fronts)):
        used = sum(usage[l][pos[l]] for l in range(len(fronts)))
        best = (1e-15, None)  # (seconds saved, layer, option)
        for l in range(len(fronts)):
            room = limit - (used - usage[l][pos[l]])  # [R] what layer l may use
            saved = np.where((usage[l] <= room).all(axis=1), tau[l][pos[l]] - tau[l], -np.inf)
            j = int(np.argmax(saved))
            if saved[j] > best[0]:
                best = (float(saved[j]), (l, j))
        if best[1] is None:
            break
        l, j = best[1]
        pos[l] = j
    return [int(fronts[l][pos[l]]) for l in range(len(fronts))]


@dataclass(frozen=True, eq=False)
class _Relaxation:
    """The LP relaxation's answer for all plans or for one part (a fixed count[nvme])."""

    lower_s: float  # LB: no plan of the part is faster
    x: np.ndarray  # [n_x + D] LP values: the front options of every layer, then one per dense format
    reduced: np.ndarray  # [n_x] reduced cost of every front option
    weight: np.ndarray  # [n_x] what each option puts in the coupling rows, priced by their duals
    spilled: float  # sum of x over options homed past the first home
    duals: np.ndarray  # [R] the coupling rows' duals in planner.ilp_model._usage's columns (time unit per row unit)

    @property
    def spill_fractional(self) -> bool:
        return abs(self.spilled - round(self.spilled)) > 1e-6

    def dense_fractional(self, n_x: int) -> bool:
        """Whether the LP mixes dense formats (``x[n_x:]``, one value per format, not 0/1)."""
        y = self.x[n_x:]
        return bool((np.minimum(y, 1 - y) > 1e-6).any())


class _Relaxer:
    """The LP relaxation of the ILP over the front options, built once and re-solved (warm) for
    each count[nvme] a part fixes."""

    def __init__(self, problem: Problem, times: list[np.ndarray], fronts: list[np.ndarray]):
        import highspy

        s, tables = problem.setup, problem.tables
        self.problem, self.fronts = problem, fronts
        self.fmts = list(problem.fixed)
        # columns: every front option of every layer, then one per dense format
        self.col_layer = np.concatenate([np.full(len(f), l) for l, f in enumerate(fronts)]).astype(int)
        self.col_opt = np.concatenate(fronts).astype(int)
        n_x, L = len(self.col_opt), len(fronts)
        self.n_x = n_x
        self.unit = _time_unit(problem, times, fronts)  # costs in this unit: O(1), far above the tolerances
        cost = np.concatenate([np.concatenate([times[l][f] for l, f in enumerate(fronts)]),
                               [problem.fixed[fm].dense_s for fm in self.fmts]]) / self.unit

        def column_values(attr: str) -> np.ndarray:
            return np.concatenate([getattr(tables[l], attr)[f] for l, f in enumerate(fronts)]).astype(float)

        nothing = np.zeros(len(self.fmts))
        cap_rows = [(np.concatenate([column_values("dev_bytes"), [problem.dense_total_bytes(fm) for fm in self.fmts]]),
                     problem.caps[problem.device_mem])]
        home_idx, home_b = column_values("home"), column_values("home_bytes")
        for hi, home in enumerate(s.homes):
            cap_rows.append((np.concatenate([np.where(home_idx == hi, home_b, 0.0), nothing]), problem.caps[home]))
        if problem.quality_budget is not None:
            cap_rows.append((np.concatenate([column_values("error"), nothing]),
                             problem.quality_budget * problem.importance_total))
            cap_rows.append((np.concatenate([np.zeros(n_x), [problem.fixed[fm].error for fm in self.fmts]]),
                             problem.quality_budget))
        if problem.ttft is not None:  # one prompt's prefill within the TTFT SLO (its dense part by format)
            top = max(problem.ttft_room.values())
            cap_rows.append((np.concatenate([np.concatenate([problem.ttft[l][f] for l, f in enumerate(fronts)]),
                                             [top - problem.ttft_room[fm] for fm in self.fmts]]), top))
        self.cap_coefs = [c[:n_x] for c, _ in cap_rows]
        self.spills = np.concatenate([[_spills(tables[l], w) for w in f] for l, f in enumerate(fronts)]).astype(float)

        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        n = len(cost)
        h.addCols(n, cost, np.zeros(n), np.ones(n), 0, np.array([], np.int32), np.array([], np.int32), np.array([]))
        starts = np.searchsorted(self.col_layer, np.arange(L + 1))
        for l in range(L):  # one[l]
            idx = np.arange(starts[l], starts[l + 1], dtype=np.int32)
            h.addRow(1.0, 1.0, len(idx), idx, np.ones(len(idx)))
        idx = np.arange(n_x, n, dtype=np.int32)  # dense
        h.addRow(1.0, 1.0, len(idx), idx, np.ones(len(idx)))
        for coefs, upper in cap_rows:
            idx = np.flatnonzero(coefs).astype(np.int32)
            h.addRow(-highspy.kHighsInf, float(upper), len(idx), idx, coefs[idx])
        idx = np.flatnonzero(self.spills).astype(np.int32)  # count[nvme], free unless a part fixes it
        h.addRow(-highspy.kHighsInf, highspy.kHighsInf, len(idx), idx, np.ones(len(idx)))
        self.highs, self.first_cap_row, self.count_row = h, L + 1, L + 1 + len(cap_rows)

    def solve(self, count: int | None = None) -> _Relaxation | None:
        """The relaxation with count[nvme] = ``count`` (None: free); None when it is infeasible."""
        import highspy

        h = self.highs
        inf = highspy.kHighsInf
        h.changeRowBounds(self.count_row, -inf if count is None else float(count), inf if count is None else float(count))
        h.run()
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return None  # infeasible or odd: the MIP will say
        sol = h.getSolution()
        x = np.asarray(sol.col_value)
        duals = np.abs(np.asarray(sol.row_dual)[self.first_cap_row:self.count_row])
        weight = sum((d * c for d, c in zip(duals, self.cap_coefs)), np.zeros(self.n_x))
        # in _usage's columns: device, homes..., quality (zero without a budget), then TTFT
        H = len(self.problem.setup.homes)
        quality = duals[H + 1:H + 2] if self.problem.quality_budget is not None else np.zeros(1)
        ttft = duals[-1:] if self.problem.ttft is not None else np.zeros(0)
        return _Relaxation(lower_s=float(h.getInfo().objective_function_value) * self.unit, x=x,
                           reduced=np.asarray(sol.col_dual)[:self.n_x] * self.unit, weight=weight,
                           spilled=float(self.spills @ x[:self.n_x]),
                           duals=np.concatenate([duals[:H + 1], quality, ttft]))

    def round(self, times: list[np.ndarray], relax: _Relaxation) -> list[tuple]:
        """Feasible plans ``(choice, dense, seconds)`` from the relaxation: each layer takes its
        largest LP value, or its lightest option in the LP's support (so capacities stay met);
        then :func:`_repair` and :func:`_improve`."""
        problem, fronts, x = self.problem, self.fronts, relax.x
        out = []
        for pick in ("max", "light"):
            choice = []
            for l in range(len(fronts)):
                cols = np.flatnonzero(self.col_layer == l)
                support = cols[x[cols] > 1e-7]
                j = support[np.argmax(x[support])] if pick == "max" else support[np.argmin(relax.weight[support])]
                choice.append(int(self.col_opt[j]))
            in_lp = [fm for d, fm in enumerate(self.fmts) if x[self.n_x + d] > 1e-7]
            dense_fm = (self.fmts[int(np.argmax(x[self.n_x:]))] if pick == "max"
                        else min(in_lp, key=problem.dense_total_bytes))
            choice = _repair(problem, times, fronts, choice, dense_fm)
            if choice is not None and _feasible(problem, tuple(choice), dense_fm):
                choice = tuple(_improve(problem, times, fronts, choice, dense_fm))
                out.append((choice, dense_fm, _objective(problem, times, choice, dense_fm)))
        return out

    def fix(self, relax: _Relaxation, upper_s: float) -> list[np.ndarray]:
        """Reduced-cost fixing: the front options that may still be in a plan faster than
        ``upper_s`` (reduced cost within UB - LB)."""
        slack = upper_s - relax.lower_s + 1e-9 * abs(upper_s)
        keep = relax.reduced <= slack
        return [np.sort(self.col_opt[(self.col_layer == l) & keep]) for l in range(len(self.fronts))]

    def count_parts(self, relax: _Relaxation, cutoff_s: float) -> list[tuple[int, _Relaxation]]:
        """The parts count[nvme] = n worth a MIP: LB(n) is convex in n and least at the
        relaxation's own count, so walk out from it both ways until LB(n) reaches the cutoff
        (that part is kept: its LB is the bound of all beyond) or the part is infeasible."""
        parts = []
        low = int(np.floor(relax.spilled))
        for direction, first in ((-1, low), (1, low + 1)):
            n = first
            while 0 <= n <= len(self.fronts):
                part = self.solve(n)
                if part is None:
                    break
                parts.append((n, part))
                if part.lower_s >= cutoff_s:
                    break
                n += direction
        return parts
