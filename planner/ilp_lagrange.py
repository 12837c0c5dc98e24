"""A Lagrangian bound of the placement ILP that keeps host DRAM whole (see :mod:`planner.ilp`).

Where host DRAM holds a few layers' offloaded experts and the rest live on NVMe (DeepSeek-V3
on desktop-4090: 57.5 GB of DRAM for 58 layers of 11.5-22.5 GB each), the LP relaxation
homes fractions of layers in DRAM and its bound lies 1-2% below the best plan, more than
the gap; branching closes that slowly. This bound prices every coupling row but DRAM with
a multiplier and keeps DRAM as a knapsack, solved exactly by dynamic programming over the
layers (one option each):

    L(v) = min_d [dense_d - sum_r v_r lim_r(d)] + min { sum_l (tau_lw + sum_r v_r use_lwr) :
                                                    sum_l dram_lw <= cap[DRAM] }

for multipliers v >= 0 on the other rows r (device bytes, other homes, quality, TTFT; each
scaled by its limit), d over the dense formats within the quality budget. Any v gives a
lower bound on every plan (weak duality); v starts at the LP's duals, where L(v) is at least
the LP bound (keeping DRAM as a constraint instead of pricing it only raises the minimum),
and a subgradient ascent with Polyak steps toward the best plan known lifts it. The DP
counts DRAM in 1/``units`` of its capacity, each option's bytes rounded down: plans that
fit stay feasible in the DP, so the bound stays a bound. Each DP answer is also a plan that
fits DRAM; those that break another row are repaired (planner.ilp_relax) into incumbents.

The work is a fixed number of DP passes, so the answer does not depend on the machine.
"""

from __future__ import annotations

import numpy as np

from .ilp_model import Problem, _feasible, _limits, _objective, _time_unit, _usage
from .ilp_relax import _improve, _repair

# DP grid: DRAM in this many units (each option's bytes rounded down to whole units)
_UNITS = 4096
# subgradient steps (each one DP pass over the layers)
_STEPS = 40


class _DramKnapsack:
    """The DP of the module docstring over the options ``fronts``."""

    def __init__(self, problem: Problem, times: list[np.ndarray], fronts: list[np.ndarray], units: int = _UNITS):
        self.problem, self.fronts = problem, fronts
        self.unit = _time_unit(problem, times, fronts)
        self.cost = [times[l][f] / self.unit for l, f in enumerate(fronts)]  # [L][N_l]
        self.use = [_usage(problem, l, f) for l, f in enumerate(fronts)]  # [L][N_l, R]: device, homes..., quality[, ttft]
        self.dram = 1  # the column of the first home (host DRAM)
        cap = problem.caps[problem.setup.homes[0]]
        self.units = units
        # each option's DRAM use in units, rounded down (a relaxation); over the capacity: never fits
        self.weight = [np.floor(u[:, self.dram] * units / cap + 1e-9).astype(np.int64) if cap > 0
                       else np.where(u[:, self.dram] > 0, units + 1, 0) for u in self.use]
        self.dense = [fm for fm in problem.fixed
                      if problem.quality_budget is None or problem.fixed[fm].error <= problem.quality_budget + 1e-12]
        self.limits = {fm: _limits(problem, fm) for fm in self.dense}  # [R] per dense format
        top = np.max([self.limits[fm] for fm in self.dense], axis=0) if self.dense else np.zeros(0)
        self.scale = np.where(np.isfinite(top) & (top > 0), top, 1.0)  # [R] rows scaled by their largest limit
        self.priced = np.isfinite(top)
        self.priced[self.dram] = False  # kept as the knapsack

    def costs(self, v: np.ndarray) -> list[np.ndarray]:
        """``[L][N_l]`` each option's Lagrangian cost at ``v`` (time units)."""
        vs = np.where(self.priced, v, 0.0) / self.scale  # [R] per byte / error / second of each row
        return [self.cost[l] + self.use[l] @ vs for l in range(len(self.fronts))]

    def dense_const(self, v: np.ndarray) -> dict[str, float]:
        """Each dense format's seconds less the priced rows' limits at that format (time units)."""
        vs = np.where(self.priced, v, 0.0) / self.scale
        return {fm: self.problem.fixed[fm].dense_s / self.unit - float(vs[self.priced] @ self.limits[fm][self.priced])
                for fm in self.dense}

    def _step(self, f: np.ndarray, c: np.ndarray, wt: np.ndarray, track: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """One layer of the DP: ``g[u] = min_w c_w + f[u - wt_w]`` (and the minimising option)."""
        U = self.units
        ok = np.flatnonzero(wt <= U)
        idx = ok[np.lexsort((c[ok], wt[ok]))]
        w_sorted = wt[idx]
        best = idx[np.flatnonzero(np.concatenate([[True], w_sorted[1:] != w_sorted[:-1]]))]  # cheapest per weight
        g = np.full(U + 1, np.inf)
        arg = np.full(U + 1, -1, np.int64) if track else None
        for j in best:
            w = int(wt[j])
            cand = f[:U + 1 - w] + c[j]
            if track:
                better = cand < g[w:]
                arg[w:][better] = j
            np.minimum(g[w:], cand, out=g[w:])
        return g, arg

    def evaluate(self, v: np.ndarray, track: bool = False) -> tuple[float, list[int] | None, str]:
        """``(L(v), choice, dense format)``: the bound in seconds and, with ``track``, the DP's plan at ``v``."""
        c = self.costs(v)
        f = np.zeros(self.units + 1)  # f[u]: least cost of the layers so far within u units
        picks = []
        for l in range(len(self.fronts)):
            f, arg = self._step(f, c[l], self.weight[l], track)
            picks.append(arg)
        consts = self.dense_const(v)
        dense_fm = min(consts, key=lambda fm: (consts[fm], fm))
        value = (float(f[self.units]) + consts[dense_fm]) * self.unit
        if not track:
            return value, None, dense_fm
        choice = [0] * len(self.fronts)
        u = self.units
        for l in range(len(self.fronts) - 1, -1, -1):
            j = int(picks[l][u])
            choice[l] = int(self.fronts[l][j])
            u -= int(self.weight[l][j])
        return value, choice, dense_fm

    def option_bounds(self, v: np.ndarray) -> list[np.ndarray]:
        """``[L][N_l]`` seconds: L(v) with each option forced (a bound on every plan that takes
        it), from the DP's forward and backward passes."""
        c = self.costs(v)
        L, U = len(self.fronts), self.units
        fwd = [np.zeros(U + 1)]
        for l in range(L - 1):
            fwd.append(self._step(fwd[-1], c[l], self.weight[l], False)[0])
        bwd = [np.zeros(U + 1)]
        for l in range(L - 1, 0, -1):
            bwd.append(self._step(bwd[-1], c[l], self.weight[l], False)[0])
        bwd = bwd[::-1]  # bwd[l]: the layers after l
        consts = self.dense_const(v)
        const = min(consts.values())
        out = []
        for l in range(L):
            # pair[s] = min_{a + b <= s} fwd[a] + bwd[b]: both non-increasing in their units, so
            # the best split of s is searched over a (O(U) per s: U^2 in all, done once per weight)
            wt = self.weight[l]
            bounds = np.full(len(wt), np.inf)
            for w in np.unique(wt[wt <= U]):
                room = U - int(w)
                pair = float(np.min(fwd[l][:room + 1] + bwd[l][room::-1]))
                rows = wt == w
                bounds[rows] = (pair + c[l][rows] + const) * self.unit
            out.append(bounds)
        return out

    def subgradient(self, choice: list[int], dense_fm: str) -> np.ndarray:
        """``[R]`` the scaled rows' use less their limits at the DP's plan (zero for rows not priced)."""
        pos = [int(np.searchsorted(f, w)) for f, w in zip(self.fronts, choice)]
        used = sum(self.use[l][j] for l, j in enumerate(pos))
        g = (used - self.limits[dense_fm]) / self.scale
        return np.where(self.priced, g, 0.0)


def dram_bound(problem: Problem, times: list[np.ndarray], fronts: list[np.ndarray], duals: np.ndarray,
               upper_s: float, gap: float, steps: int = _STEPS, units: int = _UNITS
               ) -> tuple[float, list[tuple], list[np.ndarray], np.ndarray] | None:
    """``(bound seconds, plans, kept, multipliers)`` of the module docstring: the best L(v) of ``steps``
    subgradient steps from the LP's row duals ``duals`` (``[R]`` per unit of each
    :func:`planner.ilp_model._usage` column, in the LP's time unit,
    :func:`planner.ilp_model._time_unit`), stepping toward ``upper_s`` (the best plan known);
    the DP's plans that are feasible (or repaired), ``(choice, dense, seconds)``; and per layer
    the options of ``fronts`` whose forced L(v) lies below the best plan found (the others
    are in no faster plan); and the multipliers of the best bound (``[R]``, seconds per unit of
    each row scaled by its largest limit; planner.ilp_lagrange2d starts from them). None where no DP applies (no
    home, a TTFT row)."""
    if not problem.setup.homes or problem.ttft is not None or not problem.fixed:
        return None
    ks = _DramKnapsack(problem, times, fronts, units)
    if not ks.dense:
        return None
    v = np.where(ks.priced, np.maximum(duals, 0.0) * ks.scale, 0.0)  # time units per scaled row
    best, best_v, plans, seen = -np.inf, v, [], set()
    theta, since = 1.0, 0
    for _ in range(steps):
        value, choice, dense_fm = ks.evaluate(v, track=True)
        key = (tuple(choice), dense_fm)
        if key not in seen:
            seen.add(key)
            if _feasible(problem, key[0], dense_fm):
                plans.append((key[0], dense_fm, _objective(problem, times, key[0], dense_fm)))
        if value > best * (1 + 1e-12) + 1e-15:
            best, best_v, since = value, v, 0
        else:
            since += 1
            if since >= 3:
                theta, since = theta / 2, 0
        if best >= upper_s * (1 - gap):
            break
        g = ks.subgradient(choice, dense_fm)
        norm = float(g @ g)
        if norm <= 0:
            break  # the DP's plan meets every priced row with equality: L(v) is the optimum here
        v = np.maximum(v + theta * max(upper_s - value, 0.0) / ks.unit / norm * g, 0.0)  # Polyak, in the time unit
    # the DP's plan at the best multipliers, repaired where it breaks a priced row
    _, choice, dense_fm = ks.evaluate(best_v, track=True)
    if not _feasible(problem, tuple(choice), dense_fm):
        fixed = _repair(problem, times, fronts, choice, dense_fm)
        if fixed is not None and _feasible(problem, tuple(fixed), dense_fm):
            choice = _improve(problem, times, fronts, fixed, dense_fm)
            plans.append((tuple(choice), dense_fm, _objective(problem, times, tuple(choice), dense_fm)))
    else:
        plans.append((tuple(choice), dense_fm, _objective(problem, times, tuple(choice), dense_fm)))
    top = min([upper_s] + [p[2] for p in plans])
    if best >= top * (1 - gap):
        return best, plans, fronts, best_v * ks.unit
    forced = ks.option_bounds(best_v)
    kept = [f[b < top * (1 + 1e-9)] for f, b in zip(fronts, forced)]
    return best, plans, kept, best_v * ks.unit
