"""One MIP of the placement ILP (the model of :mod:`planner.ilp`'s docstring over a subset of
each layer's options), built with PuLP and solved by HiGHS or CBC under a node limit."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pulp

from .ilp_model import Problem, _spills, _time_unit

# HiGHS's large-neighbourhood and rounding heuristics (RINS, RENS, ...) find plans the LP
# rounding, repair and local search above already give, and cost DeepSeek-V3's hardest
# part 3-5x the time of the search itself (1.0 s instead of 2.5-5.6 s over seeds 0-4)
_HIGHS_OPTIONS = {f"mip_heuristic_run_{h}": False for h in ("rins", "rens", "root_reduced_cost", "zi_round",
                                                            "shifting")}

# HiGHS's presolve rules that substitute a column defined by an equation out of the model, so
# that the shape counts (see _shapes) would leave nothing to branch on: option presolve_rule_off
# bits 8 and 12, PresolveRuleType kPresolveRuleFreeColSubstitution and kPresolveRuleAggregator
# (the same numbers in HiGHS 1.7 to 1.15)
_PRESOLVE_AGGREGATOR = (1 << 8) | (1 << 12)

# shape counts are offered while the shapes several layers share number fewer than this many per layer
_SHAPES_PER_LAYER = 2


class _HiGHS(pulp.HiGHS):
    """PuLP's HiGHS interface; a node limit (a status PuLP does not know) ends like a time limit."""

    def findSolutionValues(self, lp):  # noqa: N802 (PuLP's name)
        try:
            return super().findSolutionValues(lp)
        except KeyError:  # HighsModelStatus.kSolutionLimit: values are assigned, only the status is new
            if lp.solverModel.getInfo().primal_solution_status == 2:  # a feasible plan was found
                return pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible
            return pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound


@dataclass(frozen=True)
class _MipResult:
    choice: tuple[int, ...] | None  # None: no plan found
    dense_format: str | None
    status: str
    infeasible: bool  # no plan at all
    bound_s: float | None  # the solver's proven lower bound
    solve_s: float
    variables: int
    constraints: int
    timed_out: bool = False  # stopped by the wall-clock time limit (the safety net)


def _mip(problem: Problem, times: list[np.ndarray], fronts: list[np.ndarray],
         warm: tuple[tuple[int, ...], str] | None, count: int | None, solver: str, time_limit_s: float,
         gap: float, max_nodes: int | None = None, seed: int = 0) -> _MipResult:
    """The ILP of the module docstring over the options ``fronts`` (plus count[nvme] = ``count``
    when given), started from ``warm`` when given; the solver stops after ``max_nodes`` nodes,
    or after ``time_limit_s`` seconds of wall clock (the safety net: ``timed_out``)."""
    s = problem.setup
    if warm is not None:  # the warm start's options must be in the model
        fronts = [np.union1d(f, [w]) for f, w in zip(fronts, warm[0])]
    prob = pulp.LpProblem("moe_placement", pulp.LpMinimize)
    x = [{int(w): prob.add_variable(f"x_{l}_{w}", cat="Binary") for w in front} for l, front in enumerate(fronts)]
    y = {fm: prob.add_variable(f"y_{fm}", cat="Binary") for fm in problem.fixed}

    # min sum_lw x_lw tau_lw + sum_d y_d dense_d, in units of `unit` so that the solver's absolute
    # tolerances (about 1e-7) are far below the differences that matter
    unit = _time_unit(problem, times, fronts)
    prob += (pulp.lpSum(v * float(times[l][w] / unit) for l, xl in enumerate(x) for w, v in xl.items())
             + pulp.lpSum(y[fm] * (fc.dense_s / unit) for fm, fc in problem.fixed.items()))
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
    if problem.ttft is not None:
        # TTFT: sum x_lw prefill_lw <= SLO - sum_d y_d dense_prefill_d
        prob += (pulp.lpSum(v * float(problem.ttft[l][w]) for l, xl in enumerate(x) for w, v in xl.items())
                 + pulp.lpSum(y[fm] * (max(problem.ttft_room.values()) - problem.ttft_room[fm]) for fm in problem.fixed)
                 <= max(problem.ttft_room.values())), "ttft"
    # shape[k]: n_k = sum_{lw: shape(w) = k} x_lw, n_k integer: how many layers take option
    # shape k (see planner.ilp: near-equal layers), a variable to branch on
    shapes = _shapes(problem, x)
    for k, members in enumerate(shapes):
        n = prob.add_variable(f"n_{k}", 0, len(members), cat="Integer")
        prob += pulp.lpSum(members) - n == 0, f"shape[{k}]"
    if count is not None:
        # count[nvme]: sum_{lw: home(w) past DRAM} x_lw = n   (one part of the plans, see the docstring)
        prob += pulp.lpSum(v for l, xl in enumerate(x) for w, v in xl.items()
                           if _spills(problem.tables[l], w)) == count, "count[nvme]"

    if warm is not None:
        for l, w in enumerate(warm[0]):
            x[l][int(w)].setInitialValue(1)
        y[warm[1]].setInitialValue(1)

    if solver == "highs":
        # only the relative gap may stop the search (HiGHS's default absolute gap is 1e-6)
        nodes = {} if max_nodes is None else {"mip_max_nodes": int(max_nodes)}
        if shapes:  # HiGHS's presolve would substitute each n_k out of its defining row
            nodes["presolve_rule_off"] = _PRESOLVE_AGGREGATOR
        engine = _HiGHS(msg=False, timeLimit=time_limit_s, gapRel=gap, gapAbs=1e-15, threads=1, random_seed=seed,
                        **_HIGHS_OPTIONS, **nodes)
    else:
        engine = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap, gapAbs=1e-15,
                                   warmStart=warm is not None, threads=1, maxNodes=max_nodes,
                                   options=[f"randomSeed {seed}"])
    start = time.perf_counter()
    prob.solve(engine)
    elapsed = time.perf_counter() - start
    status = pulp.LpStatus[prob.status]
    sizes = {"solve_s": elapsed, "variables": len(prob.variables()), "constraints": prob.numConstraints(),
             "timed_out": elapsed >= time_limit_s}  # CBC says no more; HiGHS's own status below
    bound, found = None, status == "Optimal"  # PuLP says Optimal for any plan found, time limit or not
    if solver == "highs":
        import highspy

        model_status = prob.solverModel.getModelStatus()
        info = prob.solverModel.getInfo()
        empty = model_status == highspy.HighsModelStatus.kInfeasible
        sizes["timed_out"] = model_status == highspy.HighsModelStatus.kTimeLimit
        found = not empty and info.primal_solution_status == 2  # kSolutionStatusFeasible
        status = "Infeasible" if empty else status
        bound = None if empty else float(info.mip_dual_bound) * unit
    if not found:
        return _MipResult(choice=None, dense_format=None, status=status, infeasible=status == "Infeasible",
                          bound_s=bound, **sizes)
    choice = tuple(max(xl, key=lambda w: xl[w].varValue or 0.0) for xl in x)
    dense_fm = max(y, key=lambda fm: y[fm].varValue or 0.0)
    return _MipResult(choice=choice, dense_format=dense_fm, status=status, infeasible=False, bound_s=bound, **sizes)


def _shapes(problem: Problem, x: list[dict]) -> list[list]:
    """The model's option variables by shape, the columns that set an option's bytes (p, c,
    b_res, b_off, home and tier), for each shape more than one layer has (L layers of one
    model hold experts of one size, so a shape costs every layer the same bytes)."""
    groups: dict[tuple, list] = {}
    layers: dict[tuple, set] = {}
    for l, xl in enumerate(x):
        t = problem.tables[l]
        for w, v in xl.items():
            key = tuple(int(col[w]) for col in (t.p, t.c, t.b_res, t.b_off, t.home, t.k, t.b_up))
            groups.setdefault(key, []).append(v)
            layers.setdefault(key, set()).add(l)
    shared = [key for key in sorted(groups) if len(layers[key]) > 1]
    # counts pay where many layers choose among few shapes; where the shapes far outnumber the
    # layers, most shapes go to one layer or none and the counts only slow each node (Mixtral
    # on desktop-3060 at a 0.02 budget: 167 shapes over 32 layers, 2x the seconds per node);
    # DeepSeek-V3 with measured errors (tiers) has 73-97 over 58 layers and needs them
    return [groups[key] for key in shared] if len(shared) < _SHAPES_PER_LAYER * len(x) else []
