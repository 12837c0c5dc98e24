"""The single-node placement ILP: one option per MoE layer, a multiple-choice knapsack.

Sets
    l in 0..L-1         MoE layers
    w in Omega_l        options of layer l (planner.costs: the top-p experts resident at b_res,
                        c cache slots, the rest at b_off in a home, executed by a mode)
    d in D              formats of the dense (non-expert) weights
    h in H              homes for offloaded experts: host DRAM, NVMe
Parameters (planner.costs)
    tau_lw              seconds option w of layer l lasts per decode step:
                        max(device + fetch stalls, host CPU, link)   (costs.option_time)
    dev_lw, home_lw     bytes on the compute device / in the option's home
    err_lw              importance-weighted quantisation error
    dense_d, bytes_d    dense seconds and bytes (KV cache and workspace added) per format
Variables
    x_lw in {0,1}       layer l takes option w
    y_d in {0,1}        the dense weights use format d
Objective
    min  sum_lw x_lw tau_lw + sum_d y_d dense_d               (seconds per decode step)
Constraints
    one[l]:      sum_w x_lw = 1
    dense:       sum_d y_d = 1
    cap[device]: sum_lw x_lw dev_lw + sum_d y_d bytes_d <= usable device bytes
    cap[h]:      sum_{lw: home(w) = h} x_lw home_lw <= usable bytes of h
    quality:     sum_lw x_lw err_lw <= Q sum_le w_le,   sum_d y_d err_d <= Q

The per-resource max() of FlexGen lives inside tau_lw: each option's busiest resource sets
its time. Solved twice, without and with next-layer prefetch; the faster plan wins.

Structure makes it small. Experts with equal statistics need no variables of their own:
within a layer the option says how many of the most frequent experts are resident, not
which. And options another option beats or ties in every column (time, device bytes, home
bytes, error) are dropped before the model is built (a dominated option is never needed
for an optimum). Then reduced-cost fixing: the LP relaxation (a few fractional layers at
most, one per coupling row) gives a bound LB and reduced costs d_lw; rounding it gives a
feasible plan UB. An option with d_lw > UB - LB cannot appear in any plan better than UB,
so it is left out of the MIP, which then starts from UB. Both steps are exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pulp

from profiles.errors import InfeasibleError
from profiles.units import format_size

from .costs import FixedCosts, OptionTable, Setup, capacity, fixed_costs, layer_options, option_time

__all__ = ["Problem", "SolveResult", "build_problem", "pareto_front", "solve", "explain_infeasible"]


@dataclass(frozen=True, eq=False)
class Problem:
    """Option tables, fixed costs and capacities of one planning problem."""

    setup: Setup
    tables: tuple[OptionTable, ...]  # all options per layer (unpruned: baselines index these)
    fixed: dict[str, FixedCosts]
    caps: dict[str, float]  # memory id -> usable bytes
    device_mem: str
    quality_budget: float | None
    importance_total: float

    def times(self, prefetch: bool) -> list[np.ndarray]:
        """``[L][N_l]`` seconds per step of every option."""
        return [option_time(t, prefetch) for t in self.tables]

    def dense_total_bytes(self, fm: str) -> float:
        fc = self.fixed[fm]
        return fc.dense_bytes + fc.kv_bytes + fc.workspace_bytes


@dataclass(frozen=True)
class SolveResult:
    choice: tuple[int, ...]  # option row per layer (index into Problem.tables[l])
    dense_format: str
    prefetch: bool
    objective_s: float
    status: str
    bound_s: float | None
    gap: float | None
    solve_s: float
    variables: int
    constraints: int
    solver: str


def pareto_front(tau: np.ndarray, t: OptionTable) -> np.ndarray:
    """Rows of options that no other option (same home) beats or ties in every column."""
    cols = np.stack([tau, t.dev_bytes, t.home_bytes, t.error], axis=1)  # [N, 4]
    keep: list[int] = []
    for home in np.unique(t.home):
        rows = np.flatnonzero(t.home == home)
        rows = rows[np.lexsort(cols[rows].T[::-1])]  # sorted: a dominator comes before what it dominates
        kept: list[int] = []
        for i in rows:
            if kept and (cols[kept] <= cols[i] * (1 + 1e-12) + 1e-15).all(axis=1).any():
                continue
            kept.append(i)
        keep += kept
    return np.array(sorted(keep), dtype=int)


def build_problem(s: Setup, quality_budget: float | None, extra: list[np.ndarray] | None = None) -> Problem:
    """Option tables for every layer; ``extra[l]`` adds specs (baselines' choices) to layer l."""
    tables = tuple(layer_options(s, l, None if extra is None else extra[l]) for l in range(s.stats.num_layers))
    fixed = {fm: fixed_costs(s, fm) for fm in s.formats}
    device_mem = s.hardware.memory_of(s.compute.id).id
    caps = {device_mem: capacity(s, device_mem)}
    for h in s.homes:
        caps[h] = capacity(s, h)
    return Problem(setup=s, tables=tables, fixed=fixed, caps=caps, device_mem=device_mem,
                   quality_budget=quality_budget, importance_total=float(s.stats.importance.sum()))


class _WarmHiGHS(pulp.HiGHS):
    """PuLP's HiGHS interface, plus a warm start from the variables' initial values."""

    def callSolver(self, lp):  # noqa: N802 (PuLP's name)
        import highspy

        values = [v.varValue if v.varValue is not None else 0.0 for v in lp.variables()]
        if any(values):
            sol = highspy.HighsSolution()
            sol.col_value = values
            sol.value_valid = True
            lp.solverModel.setSolution(sol)
        lp.solverModel.run()


def solve(problem: Problem, *, prefetch: bool, solver: str = "highs", time_limit_s: float = 30.0,
          gap: float = 0.001, warm: tuple[tuple[int, ...], str] | None = None) -> SolveResult:
    """Solve the ILP of the module docstring.

    Args:
        problem: from :func:`build_problem`.
        prefetch: model next-layer prefetch (predictability from the workload) or none.
        solver: ``highs`` (default) or ``cbc``.
        time_limit_s: solver time limit in seconds.
        gap: relative optimality gap at which the solver may stop.
        warm: ``(choice, dense_format)`` of a feasible plan (a baseline) to start from.

    Raises:
        InfeasibleError: nothing fits; names the binding resource, the shortfall and a way out.
    """
    s = problem.setup
    times = problem.times(prefetch)
    fronts = [pareto_front(tau, t) for tau, t in zip(times, problem.tables)]
    fronts, incumbent = _reduce_by_lp(problem, times, fronts, warm)
    if warm is None or (incumbent is not None and incumbent[2] < _objective(problem, times, *warm)):
        warm = incumbent[:2] if incumbent is not None else warm
    if warm is not None:  # the warm start's options must be in the model
        fronts = [np.union1d(f, [w]) for f, w in zip(fronts, warm[0])]

    prob = pulp.LpProblem("moe_placement", pulp.LpMinimize)
    x = [{int(w): prob.add_variable(f"x_{l}_{w}", cat="Binary") for w in front} for l, front in enumerate(fronts)]
    y = {fm: prob.add_variable(f"y_{fm}", cat="Binary") for fm in problem.fixed}

    # min sum_lw x_lw tau_lw + sum_d y_d dense_d
    prob += (pulp.lpSum(v * float(times[l][w]) for l, xl in enumerate(x) for w, v in xl.items())
             + pulp.lpSum(y[fm] * fc.dense_s for fm, fc in problem.fixed.items()))
    for l, xl in enumerate(x):
        # one[l]: sum_w x_lw = 1
        prob += pulp.lpSum(xl.values()) == 1, f"one[{l}]"
    # dense: sum_d y_d = 1
    prob += pulp.lpSum(y.values()) == 1, "dense"
    # cap[device]: sum x_lw dev_lw + sum_d y_d (dense + KV + workspace) <= usable device bytes
    prob += (pulp.lpSum(v * float(problem.tables[l].dev_bytes[w]) for l, xl in enumerate(x) for w, v in xl.items())
             + pulp.lpSum(y[fm] * problem.dense_total_bytes(fm) for fm in problem.fixed)
             <= problem.caps[problem.device_mem]), "cap[device]"
    for hi, home in enumerate(s.homes):
        # cap[h]: sum_{home(w) = h} x_lw home_lw <= usable bytes of h
        terms = [v * float(problem.tables[l].home_bytes[w]) for l, xl in enumerate(x) for w, v in xl.items()
                 if problem.tables[l].home[w] == hi and problem.tables[l].home_bytes[w]]
        if terms:
            prob += pulp.lpSum(terms) <= problem.caps[home], f"cap[{home}]"
    if problem.quality_budget is not None:
        # quality: sum x_lw err_lw <= Q sum w;   sum_d y_d err_d <= Q
        prob += (pulp.lpSum(v * float(problem.tables[l].error[w]) for l, xl in enumerate(x) for w, v in xl.items())
                 <= problem.quality_budget * problem.importance_total), "quality"
        prob += pulp.lpSum(y[fm] * fc.error for fm, fc in problem.fixed.items()) <= problem.quality_budget, \
            "quality_dense"

    if warm is not None:
        for l, w in enumerate(warm[0]):
            x[l][int(w)].setInitialValue(1)
        y[warm[1]].setInitialValue(1)

    if solver == "highs":
        # objectives are seconds (1e-4 .. 1e1): HiGHS's default absolute gap (1e-6) would end the
        # search early on small models, so only the relative gap may stop it
        engine = _WarmHiGHS(msg=False, timeLimit=time_limit_s, gapRel=gap, gapAbs=1e-15, threads=1, random_seed=0)
    elif solver == "cbc":
        engine = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap, gapAbs=1e-15,
                                   warmStart=warm is not None, threads=1, options=["randomSeed 0"])
    else:
        raise ValueError(f"unknown solver {solver!r}")
    start = time.perf_counter()
    prob.solve(engine)
    elapsed = time.perf_counter() - start
    status = pulp.LpStatus[prob.status]
    if status != "Optimal":
        if status == "Infeasible":
            raise explain_infeasible(problem)
        raise InfeasibleError(f"the {solver} solver stopped with status {status!r} and no plan within "
                              f"{time_limit_s:g} s; raise --time-limit")
    choice = tuple(max(xl, key=lambda w: xl[w].varValue or 0.0) for xl in x)
    dense_fm = max(y, key=lambda fm: y[fm].varValue or 0.0)
    objective = _objective(problem, times, choice, dense_fm)
    if incumbent is not None and incumbent[2] < objective:  # a solver stop never loses a known better plan
        choice, dense_fm, objective = incumbent
    bound, rel_gap = objective, 0.0
    if solver == "highs":
        info = prob.solverModel.getInfo()
        bound = float(info.mip_dual_bound)
        rel_gap = max(0.0, (objective - bound) / objective) if objective > 0 else 0.0
    return SolveResult(choice=choice, dense_format=dense_fm, prefetch=prefetch, objective_s=objective,
                       status="optimal" if rel_gap <= gap + 1e-9 else "time limit", bound_s=bound, gap=rel_gap,
                       solve_s=elapsed, variables=len(prob.variables()), constraints=prob.numConstraints(),
                       solver=solver)


def _objective(problem: Problem, times: list[np.ndarray], choice: tuple[int, ...], dense_fm: str) -> float:
    return float(sum(times[l][w] for l, w in enumerate(choice)) + problem.fixed[dense_fm].dense_s)


def _feasible(problem: Problem, choice: tuple[int, ...], dense_fm: str) -> bool:
    s, t = problem.setup, problem.tables
    dev = sum(float(t[l].dev_bytes[w]) for l, w in enumerate(choice)) + problem.dense_total_bytes(dense_fm)
    if dev > problem.caps[problem.device_mem] * (1 + 1e-9):
        return False
    for hi, home in enumerate(s.homes):
        used = sum(float(t[l].home_bytes[w]) for l, w in enumerate(choice) if t[l].home[w] == hi)
        if used > problem.caps[home] * (1 + 1e-9):
            return False
    if problem.quality_budget is not None:
        err = sum(float(t[l].error[w]) for l, w in enumerate(choice))
        if err > problem.quality_budget * problem.importance_total * (1 + 1e-9) + 1e-15:
            return False
        if problem.fixed[dense_fm].error > problem.quality_budget + 1e-12:
            return False
    return True


def _usage(problem: Problem, l: int, options: np.ndarray) -> np.ndarray:
    """``[N, R]`` what options of layer l put in each coupling row (device, homes..., quality)."""
    t = problem.tables[l]
    cols = [t.dev_bytes[options]]
    cols += [np.where(t.home[options] == hi, t.home_bytes[options], 0.0) for hi in range(len(problem.setup.homes))]
    cols.append(t.error[options] if problem.quality_budget is not None else np.zeros(len(options)))
    return np.stack(cols, axis=1)


def _repair(problem: Problem, times: list[np.ndarray], fronts: list[np.ndarray], choice: list[int],
            dense_fm: str) -> list[int] | None:
    """Greedy repair of a rounded LP solution: while a coupling row is over its limit, make
    the single-layer switch that removes the most excess per second of added time without
    pushing another row over. Returns None if it gets stuck."""
    s = problem.setup
    limit = np.array([problem.caps[problem.device_mem] - problem.dense_total_bytes(dense_fm)]
                     + [problem.caps[h] for h in s.homes]
                     + [problem.quality_budget * problem.importance_total if problem.quality_budget is not None
                        else np.inf])
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


def _reduce_by_lp(problem: Problem, times: list[np.ndarray], fronts: list[np.ndarray],
                  warm: tuple[tuple[int, ...], str] | None
                  ) -> tuple[list[np.ndarray], tuple[tuple[int, ...], str, float] | None]:
    """Reduced-cost fixing from the LP relaxation (see the module docstring).

    Returns the options to keep per layer and the best feasible plan known
    ``(choice, dense_format, seconds)``, or the fronts unchanged if no plan is known.
    """
    import highspy

    s, tables = problem.setup, problem.tables
    fmts = list(problem.fixed)
    # columns: every front option of every layer, then one per dense format
    col_layer = np.concatenate([np.full(len(f), l) for l, f in enumerate(fronts)])
    col_opt = np.concatenate(fronts)
    n_x, L = len(col_opt), len(fronts)
    cost = np.concatenate([np.concatenate([times[l][f] for l, f in enumerate(fronts)]),
                           [problem.fixed[fm].dense_s for fm in fmts]])
    rows: list[tuple[float, float, dict[int, float]]] = []  # (lower, upper, {col: coef})
    for l in range(L):
        rows.append((1.0, 1.0, {int(j): 1.0 for j in np.flatnonzero(col_layer == l)}))
    rows.append((1.0, 1.0, {n_x + d: 1.0 for d in range(len(fmts))}))

    def column_values(attr: str) -> np.ndarray:
        return np.array([getattr(tables[l], attr)[w] for l, w in zip(col_layer, col_opt)], dtype=float)

    dev = column_values("dev_bytes")
    cap_rows = [(np.concatenate([dev, [problem.dense_total_bytes(fm) for fm in fmts]]),
                 problem.caps[problem.device_mem])]
    home_idx = column_values("home")
    home_b = column_values("home_bytes")
    for hi, home in enumerate(s.homes):
        cap_rows.append((np.concatenate([np.where(home_idx == hi, home_b, 0.0), np.zeros(len(fmts))]),
                         problem.caps[home]))
    if problem.quality_budget is not None:
        cap_rows.append((np.concatenate([column_values("error"), np.zeros(len(fmts))]),
                         problem.quality_budget * problem.importance_total))
        cap_rows.append((np.concatenate([np.zeros(n_x), [problem.fixed[fm].error for fm in fmts]]),
                         problem.quality_budget))
    for coefs, upper in cap_rows:
        rows.append((-highspy.kHighsInf, float(upper), {int(j): float(coefs[j]) for j in np.flatnonzero(coefs)}))

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    n = len(cost)
    h.addCols(n, cost, np.zeros(n), np.ones(n), 0, np.array([], np.int32), np.array([], np.int32), np.array([]))
    for lower, upper, coefs in rows:
        idx = np.fromiter(coefs.keys(), np.int32, len(coefs))
        h.addRow(lower, upper, len(idx), idx, np.fromiter(coefs.values(), float, len(coefs)))
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return fronts, None  # infeasible or odd: let the MIP say so
    sol = h.getSolution()
    x = np.asarray(sol.col_value)
    reduced = np.asarray(sol.col_dual)
    lower_bound = float(h.getInfo().objective_function_value)

    # incumbent: the warm start, or the LP rounded layer by layer (lighter support option
    # first, so capacities stay met), whichever is better
    known = None
    if warm is not None and _feasible(problem, *warm):
        known = (tuple(int(w) for w in warm[0]), warm[1], _objective(problem, times, *warm))
    row_weight = np.abs(np.asarray(sol.row_dual)[L + 1:])
    weight = sum(wgt * coefs[:n_x] for wgt, (coefs, _) in zip(row_weight, cap_rows))
    for pick in ("max", "light"):
        choice = []
        for l in range(L):
            cols = np.flatnonzero(col_layer == l)
            support = cols[x[cols] > 1e-7]
            j = support[np.argmax(x[support])] if pick == "max" else support[np.argmin(weight[support] + 0 * cost[support])]
            choice.append(int(col_opt[j]))
        dense_fm = fmts[int(np.argmax(x[n_x:]))]
        if pick == "light":
            dense_fm = min((fm for d, fm in enumerate(fmts) if x[n_x + d] > 1e-7), key=problem.dense_total_bytes)
        choice = _repair(problem, times, fronts, choice, dense_fm)
        if choice is not None and _feasible(problem, tuple(choice), dense_fm):
            obj = _objective(problem, times, tuple(choice), dense_fm)
            if known is None or obj < known[2]:
                known = (tuple(choice), dense_fm, obj)
    if known is None:
        return fronts, None
    slack = known[2] - lower_bound + 1e-9 * abs(known[2])
    keep = reduced[:n_x] <= slack
    kept = [np.sort(col_opt[(col_layer == l) & keep]) for l in range(L)]
    return kept, known


def explain_infeasible(problem: Problem) -> InfeasibleError:
    """Name the binding resource, the shortfall in bytes and the smallest change that fits."""
    s = problem.setup
    dense_fm = min(problem.fixed, key=problem.dense_total_bytes)
    device_min = sum(float(t.dev_bytes.min()) for t in problem.tables) + problem.dense_total_bytes(dense_fm)
    cap_dev = problem.caps[problem.device_mem]
    if device_min > cap_dev:
        short = device_min - cap_dev
        kv = problem.fixed[dense_fm].kv_bytes
        hint = (f"a shorter --context or smaller --batch (the KV cache alone takes {format_size(kv)})" if kv >= short
                else f"a GPU with {format_size(short)} more memory, or a lower bitwidth for the dense weights")
        return InfeasibleError(
            f"{problem.device_mem} is {format_size(short)} short even with the fewest bytes on it (dense weights at "
            f"{dense_fm}, KV cache, no resident experts); smallest change: {hint}")
    homes_cap = sum(problem.caps[h] for h in s.homes)
    need = sum(float(t.home_bytes.min()) for t in problem.tables) - (cap_dev - device_min)
    if need > homes_cap:
        short = need - homes_cap
        lowest = min(s.formats, key=s.expert_bytes)
        nvme = "" if len(s.homes) > 1 else ", an NVMe drive in the profile"
        return InfeasibleError(
            f"the experts do not fit: at {lowest} the offloaded experts need {format_size(need)} beyond the GPU and "
            f"host memory{' and NVMe' if len(s.homes) > 1 else ''} offer {format_size(homes_cap)} "
            f"({format_size(short)} short); smallest change: {format_size(short)} more DRAM{nvme}, "
            f"or a lower bitwidth (--formats bf16,int8,int4,int3)")
    if problem.quality_budget is not None:
        return InfeasibleError(
            f"no placement meets --quality-budget {problem.quality_budget:g} within memory; smallest change: raise "
            f"the budget (uniform int4 costs {s.quant_error.get('int4', 0):g}) or add memory for wider formats")
    return InfeasibleError("no placement satisfies every constraint; run with --debug to see the model")
