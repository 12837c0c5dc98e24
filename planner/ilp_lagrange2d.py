"""A Lagrangian bound of the placement ILP that keeps host DRAM *and* the quality budget whole
(see :mod:`planner.ilp`, "Lumpy quality").

With measured per-expert errors the quality budget buys whole layers at a wider format: on
DeepSeek-V3 (desktop-4090, int8 budget) six layers stream bf16 experts from NVMe, each twice
the seconds of an int8 one, and the error they save comes in lumps of one layer. The bound of
:mod:`planner.ilp_lagrange` keeps DRAM whole but prices quality with a multiplier, so it buys
a fraction of such a layer and lies 0.7% below the best plan (LP 1.7%). This one prices only
the other rows (device bytes, the other homes) at the multipliers that bound found, and keeps
both DRAM and quality as a two-dimensional knapsack solved exactly by dynamic programming over
the layers:

    L2(v) = min_d [dense_d - sum_r v_r lim_r(d)] + min { sum_l (tau_lw + sum_r v_r use_lwr) :
                                                         sum_l dram_lw <= cap[DRAM],
                                                         sum_l err_lw <= Q sum w }

Any v >= 0 gives a lower bound on every plan (weak duality), and at equal v it is at least
the one-row bound (a plan within the budget pays no less than its priced error). The DP
counts DRAM in 1/``dram_units`` of its capacity and error in 1/``quality_units`` of the
budget, each option's amounts rounded down, so plans that fit stay feasible in the DP and the
bound stays a bound. Error is counted relative to a reference option per layer (the one-row
DP's plan): most layers take their reference, so their rounding loses nothing, and the state
range is the spread of the error sums, not the whole budget. States that no later layers can
push past the budget merge into one; states past what the later layers can bring back are
dropped: both exact.

Forcing each option into the DP (forward and backward passes) bounds every plan that takes
it; the options whose bound lies past the best plan less the gap leave the MIP, and the least
of their bounds (the floor) bounds every plan that takes one of them. The DP adds in float32
and lowers what it returns by ``_SLACK``. The work is a count of cell updates decided by the
inputs (``_WORK``), never the clock.
"""

from __future__ import annotations

import numpy as np

from .ilp_lagrange import _DramKnapsack
from .ilp_model import Problem, _feasible, _objective
from .ilp_relax import _improve, _repair

# DP grid: DRAM in this many units of its capacity, error in this many units of the budget
_DRAM_UNITS = 1024
_QUALITY_UNITS = 2048
# the options are pruned only where L2 closes at least this fraction of the one-row bound's gap
_LIFT = 0.5
# the most cell updates the DP may take (a work limit: beyond it no bound is computed)
_WORK = 1.5e9
# the DP adds in float32 (twice the cells per second of float64): each option's cost is rounded
# down to float32 and each sum of 58 or so terms rounds by at most a few 1e-7 of it, so every
# value the DP returns is lowered by this fraction to stay a bound
_SLACK = 1e-5


class _TwoRowKnapsack:
    """The DP of the module docstring over the options of ``ks`` at multipliers ``v``."""

    def __init__(self, ks: _DramKnapsack, v: np.ndarray, ref: list[int], dram_units: int, quality_units: int):
        problem = ks.problem
        self.ks, self.U = ks, dram_units
        qcol = 1 + len(problem.setup.homes)  # planner.ilp_model._usage: device, homes..., quality
        vq = np.array(v, float)
        vq[qcol] = 0.0  # quality is kept, not priced
        self.cost = cost = ks.costs(vq)
        self.const = min(ks.dense_const(vq).values())
        cap = problem.caps[problem.setup.homes[0]]
        budget = problem.quality_budget * problem.importance_total
        unit_q = budget / quality_units
        ref_err = [float(ks.use[l][j, qcol]) for l, j in enumerate(ref)]
        # error relative to the reference, in units, rounded down (a relaxation, as DRAM's bytes)
        self.smax = int(np.floor((budget - sum(ref_err)) / unit_q + 1e-9))
        self.cost32 = []  # per layer [K]: the keys' costs in float32, rounded down
        self.keys = []  # per layer [K, 3]: DRAM units, error units, cost; least cost per (DRAM, error)
        self.members = []  # per layer [N_l]: the key of each option (-1: its DRAM never fits)
        for l, c in enumerate(cost):
            u = ks.use[l]
            a = (np.floor(u[:, ks.dram] * dram_units / cap + 1e-9).astype(np.int64) if cap > 0
                 else np.where(u[:, ks.dram] > 0, dram_units + 1, 0))
            q = np.floor((u[:, qcol] - ref_err[l]) / unit_q + 1e-9).astype(np.int64)
            fits = a <= dram_units
            pairs, which = np.unique(np.stack([a[fits], q[fits]], axis=1), axis=0, return_inverse=True)
            least = np.full(len(pairs), np.inf)
            np.minimum.at(least, which.ravel(), c[fits])
            member = np.full(len(c), -1)
            member[fits] = which.ravel()
            self.keys.append(np.column_stack([pairs.astype(float), least]))
            self.cost32.append(np.nextafter(least.astype(np.float32), np.float32(-np.inf)))
            self.members.append(member)
        self.qmin = np.array([k[:, 1].min() for k in self.keys], np.int64)
        self.qmax = np.array([k[:, 1].max() for k in self.keys], np.int64)

    def work(self) -> float:
        """Cell updates of a backward pass and the option bounds' forward pass: per layer, its
        keys times the DRAM units times the error states of the arrays they read."""
        lo = hi = 0
        later_min = np.concatenate([np.cumsum(self.qmin[::-1])[::-1][1:], [0]])
        later_max = np.concatenate([np.cumsum(self.qmax[::-1])[::-1][1:], [0]])
        cells = 0.0
        for l, keys in enumerate(self.keys):
            cells += 2 * len(keys) * (self.U + 1) * (hi - lo + 1)
            lo, hi = max(lo + int(self.qmin[l]), self.smax - int(later_max[l])), min(hi + int(self.qmax[l]),
                                                                                   self.smax - int(later_min[l]))
            if lo > hi:
                break
        return cells

    @staticmethod
    def _undominated(keys: np.ndarray) -> np.ndarray:
        """The rows of the keys no other key beats or ties in DRAM, error and cost (with the DP's monotone
        arrays such a key adds nothing)."""
        order = np.lexsort((keys[:, 1], keys[:, 0], keys[:, 2]))
        kept: list[int] = []
        for i in order:
            a, q, _ = keys[i]
            if not any(keys[j, 0] <= a and keys[j, 1] <= q for j in kept):
                kept.append(int(i))
        return np.sort(kept)

    def _step(self, f: np.ndarray, lo: int, hi: int, l: int, nlo: int, nhi: int) -> np.ndarray:
        """One layer of the DP: ``g[u, s] = min_k c_k + f[u - a_k, s - q_k]`` over error states
        ``[lo, hi]`` -> ``[nlo, nhi]``: targets below ``nlo`` merge into it, those above ``nhi`` go."""
        U = self.U
        g = np.full((U + 1, nhi - nlo + 1), np.inf, np.float32)
        keys, cost = self.keys[l], self.cost32[l]
        for k in self._undominated(keys):
            a, q, c = int(keys[k, 0]), int(keys[k, 1]), cost[k]
            s_hi = min(hi, nhi - q)  # the last source state whose target is kept
            if s_hi < lo:
                continue
            s_mid = max(lo, nlo - q)  # the first source state whose target is not merged
            if s_mid <= s_hi:
                tgt = g[a:, s_mid + q - nlo:s_hi + q - nlo + 1]
                np.minimum(tgt, f[:U + 1 - a, s_mid - lo:s_hi - lo + 1] + c, out=tgt)
            if s_mid > lo:  # merged into the lowest state: the least of them (f non-increasing)
                col = g[a:, 0]
                np.minimum(col, f[:U + 1 - a, min(s_mid - 1, s_hi) - lo] + c, out=col)
        np.minimum.accumulate(g, axis=1, out=g)  # within s: no more than within s + 1
        return g

    def sweep(self, layers: list[int], keep: bool = False) -> tuple[list, float]:
        """The DP over ``layers`` in that order: ``f[u, s]`` the least cost of those so far with
        DRAM within ``u`` units and error within ``lo + s`` units (both non-increasing). Returns
        the arrays before each layer ``(f, lo)`` when ``keep`` (float32) and the least cost of
        them all (time units, dense part included, lowered by ``_SLACK``)."""
        U, smax = self.U, self.smax
        qmin, qmax = self.qmin[layers], self.qmax[layers]
        later_min = np.concatenate([np.cumsum(qmin[::-1])[::-1][1:], [0]])  # sum over the layers after
        later_max = np.concatenate([np.cumsum(qmax[::-1])[::-1][1:], [0]])
        f, lo, hi = np.zeros((U + 1, 1), np.float32), 0, 0
        saved = []
        for i, l in enumerate(layers):
            if keep:
                saved.append((f, lo))
            nlo = max(lo + int(qmin[i]), smax - int(later_max[i]))  # below: every later choice fits
            nhi = min(hi + int(qmax[i]), smax - int(later_min[i]))  # above: no later choice fits
            if nlo > nhi:
                return saved, np.inf
            f, lo, hi = self._step(f, lo, hi, l, nlo, nhi), nlo, nhi
        return saved, float(f[U, -1]) * (1 - _SLACK) + self.const

    def backward(self) -> tuple[list, float]:
        """``(after, L2)``: per layer l the DP's array over the layers after l (float32; error
        states from its ``lo``), and the bound (time units)."""
        L = len(self.keys)
        saved, value = self.sweep(list(range(L - 1, -1, -1)), keep=True)
        return saved[::-1], value  # saved[i]: before reverse step i, over the last i layers

    def plan(self, after: list) -> list[int] | None:
        """The DP's plan (an option position per layer) from the arrays ``after``: each layer
        in turn takes the key of least cost plus cost to go within the DRAM and error left."""
        u, t, picks = self.U, self.smax, []
        for l, (b, blo) in enumerate(after):
            keys = self.keys[l]
            a, q = keys[:, 0].astype(np.int64), keys[:, 1].astype(np.int64)
            rest = np.minimum(t - q, blo + b.shape[1] - 1) - blo  # within every later sum past the array's end
            ok = (a <= u) & (rest >= 0)
            if not ok.any():
                return None
            go = np.full(len(keys), np.inf)
            go[ok] = b[u - a[ok], rest[ok]]
            k = int(np.argmin(keys[:, 2] + go))
            member = np.flatnonzero(self.members[l] == k)
            picks.append(int(member[np.argmin(self.cost[l][member])]))
            u, t = u - int(a[k]), t - int(q[k])
        return picks

    def option_bounds(self, after: list) -> list[np.ndarray]:
        """``[L][N_l]`` the bound with each option forced (time units), from the arrays
        ``after`` and a forward pass."""
        L = len(after)
        layers_fwd = list(range(L))
        U, smax = self.U, self.smax
        qmin, qmax = self.qmin[layers_fwd], self.qmax[layers_fwd]
        later_max = np.concatenate([np.cumsum(qmax[::-1])[::-1][1:], [0]])
        later_min = np.concatenate([np.cumsum(qmin[::-1])[::-1][1:], [0]])
        out = [None] * L
        f, lo, hi = np.zeros((U + 1, 1), np.float32), 0, 0
        for i, l in enumerate(layers_fwd):
            b, blo = after[l]  # over the layers after l: error sums from blo on (states t: within blo + t)
            bhi = blo + b.shape[1] - 1
            keys = self.keys[l]
            bounds = np.full(len(keys), np.inf)
            for k, (a, q, c) in enumerate(keys):
                a, q = int(a), int(q)
                # error within s before (states lo..hi), q here, within t = smax - q - s after
                # (states blo..bhi; past bhi: every later sum, so bhi); DRAM within u before and
                # U - a - u after (b's rows reversed)
                s0 = max(lo, smax - q - bhi)  # the first s whose t lies within b's states
                s1 = min(hi, smax - q - blo)  # the last s whose t is no less than blo
                least = np.inf
                if s0 <= s1:  # t runs down from smax - q - s0 to smax - q - s1
                    t0, t1 = smax - q - s0 - blo, smax - q - s1 - blo
                    bs = b[U - a::-1, t0:t1 - 1:-1] if t1 > 0 else b[U - a::-1, t0::-1]
                    least = float(np.min(f[:U + 1 - a, s0 - lo:s1 - lo + 1] + bs))
                last = min(s0 - 1, hi, s1)  # the s below s0 all meet b at bhi; f is least at the last of them
                if last >= lo:
                    least = min(least, float(np.min(f[:U + 1 - a, last - lo] + b[U - a::-1, bhi - blo])))
                bounds[k] = least * (1 - _SLACK) + c
            member = self.members[l]
            out[l] = np.where(member >= 0, bounds[np.maximum(member, 0)], np.inf) + self.const
            # the forward step over layer l
            nlo = max(lo + int(qmin[i]), smax - int(later_max[i]))
            nhi = min(hi + int(qmax[i]), smax - int(later_min[i]))
            if nlo > nhi:
                break
            f, lo, hi = self._step(f, lo, hi, l, nlo, nhi), nlo, nhi
        return out


def quality_bound(problem: Problem, times: list[np.ndarray], fronts: list[np.ndarray], multipliers: np.ndarray,
                  lower_s: float, upper_s: float, gap: float, dram_units: int = _DRAM_UNITS, quality_units: int = _QUALITY_UNITS
                  ) -> tuple[float, list[tuple], list[np.ndarray], float] | None:
    """``(bound seconds, plans, kept, floor seconds)`` of the module docstring at the one-row
    bound's ``multipliers`` (:func:`planner.ilp_lagrange.dram_bound`): L2; the DP's plan,
    repaired where it breaks a priced row, ``(choice, dense, seconds)``; per layer the options
    of ``fronts`` whose forced bound lies below ``(1 - gap)`` times the best plan known (no
    plan that takes another improves on it by more than the gap); and the least forced bound
    of the options left out (a bound on every plan that takes one; inf when none is). Options
    are left out only where L2 closes at least ``_LIFT`` of the gap between the one-row bound
    ``lower_s`` and the best plan (else ``fronts`` come back whole). None
    where the DP does not apply (no quality budget, no home, a TTFT row, quality not priced)
    or would take more than ``_WORK`` cell updates."""
    if problem.quality_budget is None or not problem.setup.homes or problem.ttft is not None or not problem.fixed:
        return None
    ks = _DramKnapsack(problem, times, fronts)
    multipliers = np.asarray(multipliers, float) / ks.unit  # in this DP's time unit (that of its options)
    qcol = 1 + len(problem.setup.homes)
    if not ks.dense or not multipliers[qcol] > 0:
        return None  # no dense format within the budget (the one-row bound says), or quality does not bind
    _, choice, _ = ks.evaluate(multipliers, track=True)
    ref = [int(np.searchsorted(f, w)) for f, w in zip(fronts, choice)]
    tk = _TwoRowKnapsack(ks, multipliers, ref, dram_units, quality_units)
    if tk.work() > _WORK:
        return None
    after, value = tk.backward()
    bound = value * ks.unit
    plans = []
    picks = tk.plan(after) if np.isfinite(value) else None
    if picks is not None:
        choice = [int(f[j]) for f, j in zip(fronts, picks)]
        vq = np.array(multipliers, float)
        vq[qcol] = 0.0
        consts = ks.dense_const(vq)
        dense_fm = min(consts, key=lambda fm: (consts[fm], fm))
        if not _feasible(problem, tuple(choice), dense_fm):
            choice = _repair(problem, times, fronts, choice, dense_fm)
        if choice is not None and _feasible(problem, tuple(choice), dense_fm):
            choice = _improve(problem, times, fronts, choice, dense_fm)
            plans.append((tuple(choice), dense_fm, _objective(problem, times, tuple(choice), dense_fm)))
    top = min([upper_s] + [p[2] for p in plans])
    if bound >= top * (1 - gap) or bound - lower_s < _LIFT * (top - lower_s):
        # closed; or quality's lumps are not what keeps the gap open: the options stay as they
        # are (pruned to within the gap, the MIP finds a plan no better, in more time: DeepSeek-V3
        # on desktop-4090 at the int4 budget, the bound lifted by 0.08% of the 0.6% left, 1 -> 2 CPU-s)
        return bound, plans, fronts, np.inf
    forced = [b * ks.unit for b in tk.option_bounds(after)]
    cut = top * (1 - gap)
    kept = [f[b < cut] for f, b in zip(fronts, forced)]
    floor = min((float(b[b >= cut].min()) for b in forced if (b >= cut).any()), default=np.inf)
    return bound, plans, kept, floor
