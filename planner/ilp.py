"""The single-node placement ILP: one option per MoE layer, a multiple-choice knapsack.

Sets
    l in 0..L-1         MoE layers
    w in Omega_l        options of layer l (planner.costs: by frequency rank, [0, p) resident at
                        b_res; the rest at b_off in a home, of which [p, q) run by a mode through
                        c cache slots and [q, E) on the CPU where they live)
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
    count[nvme]: sum_{lw: home(w) > 0} x_lw = n          (one part of the plans; see below)

The per-resource max() of FlexGen lives inside tau_lw: each option's busiest resource sets
its time. Solved twice, without and with next-layer prefetch; the faster plan wins.

Structure makes it small. Experts with equal statistics need no variables of their own:
within a layer the option says how many of the most frequent experts are resident, not
which; the execution site of each offloaded rank (split q, mode) only changes tau_lw, so
of the options that share memory and error (p, b_res, c, b_off, home) only the fastest
enters the model. More generally, options another option beats or ties in every column
(time, device bytes, home bytes, error) are dropped before the model is built (a dominated
option is never needed for an optimum).

Then reduced-cost fixing: the LP relaxation (a few fractional layers at most, one per
coupling row) gives a bound LB and reduced costs d_lw; rounding it (then a greedy repair
and a one-layer-at-a-time local search) gives a feasible plan UB, as may the warm start.
An option with d_lw > UB - LB cannot appear in any plan better than UB, so it is left out
of the MIP. If LB >= UB (1 - gap) no MIP is needed. The best plan known is never lost, but
HiGHS is not handed it as a MIP start: from a start it tends to search around it and can
miss, for minutes, a gap it closes in a second without one.

Lumpy homes. A layer's offloaded experts share one home, so when host DRAM cannot hold
every layer's, the LP relaxation homes a fraction of one layer on NVMe; rounding that
layer can cost more than the gap (2% for Mixtral on the 8 GB laptop at the int8 budget),
and branching on single options closes such a gap slowly. Unless the MIP over all plans
closes its gap within a short try, the plans are then split by the number n of layers homed
past DRAM, each part a MIP of its own with

    count[nvme]: sum_{lw: home(w) > 0} x_lw = n

The LP bound LB(n) is convex in n and least at the relaxation's own (fractional) count, so
the parts worth solving (LB(n) < UB (1 - gap)) are found by walking out from it; the parts
cover every plan, so the answer is exact, and the bound is the least over the parts.

Mixed dense formats. The LP relaxation may also blend dense formats (a fraction of bf16 dense
weights that do not fit with a fraction of int4 ones), a bound 20% below the optimum for
DeepSeek-V3 on cpu-server-4090; the plans are then split by dense format (y_d = 1), each part
with a tight LP, solved least bound first (see _by_dense_format).

HiGHS's time to close a gap is heavy-tailed in its random seed (one part of the laptop
case: 0.6 s with one seed, over two minutes with another), so each MIP runs as restarts with
growing node limits and a new seed each (see solve); node limits, unlike time limits, give
the same plan on any machine. Times enter the solvers in units of the fastest conceivable
step, so that their absolute tolerances (1e-7) sit far below the differences between plans.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import pulp

from profiles.errors import InfeasibleError
from profiles.units import format_size

from .costs import FixedCosts, OptionTable, Setup, capacity, fixed_costs, layer_options, option_costs, option_time

__all__ = ["Problem", "SolveResult", "build_problem", "pareto_front", "solve", "explain_infeasible"]

# Work limits, so that a plan depends on its inputs alone, never on the machine's load.
# HiGHS restarts: the first stops after _FIRST_TRY_NODES nodes, each next one, with the next
# seed, after twice as many, while the solve's _NODE_BUDGET (the node limits of all its MIPs
# together, dense-format parts included) lasts; CBC runs once with the whole budget. Where the
# plans can be split by count[nvme], the MIP over all of them gets one try of
# _GLOBAL_TRY_NODES nodes first (those that close their gap at all need 1-15 on the
# benchmark's cases). A solve that stops on the budget reports its gap ("node limit"); the
# wall-clock limit is only a safety net ("time limit", noted in the plan). The budget keeps a
# solve to about 15 CPU-s on the hardest case known (Mixtral on laptop-4060 at the int8
# budget, whose part no seed closes: 0.7% gap), DeepSeek-V3 needs a tenth of it.
_FIRST_TRY_NODES = 64
_NODE_BUDGET = 1024
_GLOBAL_TRY_NODES = 16
# HiGHS's large-neighbourhood and rounding heuristics (RINS, RENS, ...) find plans the LP
# rounding, repair and local search above already give, and cost DeepSeek-V3's hardest
# part 3-5x the time of the search itself (1.0 s instead of 2.5-5.6 s over seeds 0-4)
_HIGHS_OPTIONS = {f"mip_heuristic_run_{h}": False for h in ("rins", "rens", "root_reduced_cost", "zi_round",
                                                            "shifting")}


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
    timed_out: bool = False  # the wall-clock safety net stopped the search (the plan may depend on the load)
    nodes: int = 0  # node limits of the MIPs run, summed (the work spent of _NODE_BUDGET)


def pareto_front(tau: np.ndarray, t: OptionTable) -> np.ndarray:
    """Rows of options that no other option (same home) beats or ties in every column."""
    cols = np.stack([tau, t.dev_bytes, t.home_bytes, t.error], axis=1)  # [N, 4]
    # 1. options with the same memory and error (they differ in split and mode): the fastest
    #    (then the first row) stands for them all, found by one sort instead of the loop below
    by_use = np.lexsort((np.arange(len(tau)), tau, t.error, t.home_bytes, t.dev_bytes, t.home))
    use = np.stack([t.home, t.dev_bytes, t.home_bytes, t.error], axis=1)[by_use]
    first = np.concatenate([[True], (use[1:] != use[:-1]).any(axis=1)]) if len(tau) else np.zeros(0, bool)
    fastest = by_use[first]
    # 2. within options of equal device bytes and error (they differ in the home bytes a split
    #    or mode holds), a row that an earlier one beats or ties exactly in time and home bytes
    #    goes by one sort and a running minimum; whatever it dominates, its dominator does too,
    #    so step 3 finds the same front among far fewer rows
    g = fastest[np.lexsort((fastest, tau[fastest], t.home_bytes[fastest], t.error[fastest], t.dev_bytes[fastest],
                            t.home[fastest]))]  # by group, then home bytes, then time
    if len(g):
        key = np.stack([t.home[g], t.dev_bytes[g], t.error[g]], axis=1)
        seg = np.concatenate([[0], np.cumsum((key[1:] != key[:-1]).any(axis=1))])  # [n] group of each row
        rank = np.unique(tau[g], return_inverse=True)[1].ravel().astype(np.int64)  # [n] time rank, ties equal
        # one running minimum serves every group: ranks lifted so that each group lies below
        # the one before (integers, so exact), and the first row of a group compares with nothing
        lifted = rank - seg * (len(g) + 1)
        before = np.concatenate([[np.iinfo(np.int64).max], np.minimum.accumulate(lifted)[:-1]])
        first_of_group = np.concatenate([[True], seg[1:] != seg[:-1]])
        fastest = g[first_of_group | (before > lifted)]
    # 3. the pareto front of those, per home: sorted, a dominator comes before what it
    #    dominates, so a row stays iff no earlier row beats or ties it in every column
    keep: list[np.ndarray] = []
    for home in np.unique(t.home):
        rows = fastest[t.home[fastest] == home]
        rows = rows[np.lexsort(cols[rows].T[::-1])]
        c = cols[rows]  # [n, 4]
        dominated = np.zeros(len(rows), bool)
        for i0 in range(0, len(rows), 512):  # [512, n, 4] comparisons at a time
            i1 = min(i0 + 512, len(rows))
            covers = (c[None, :, :] <= c[i0:i1, None, :] * (1 + 1e-12) + 1e-15).all(axis=2)  # [i, j]: j covers i
            earlier = np.arange(len(rows))[None, :] < np.arange(i0, i1)[:, None]
            dominated[i0:i1] = (covers & earlier).any(axis=1)
        keep.append(rows[~dominated])
    return np.sort(np.concatenate(keep)).astype(int) if keep else np.zeros(0, int)


def build_problem(s: Setup, quality_budget: float | None, extra: list[np.ndarray] | None = None,
                  grid: bool = True) -> Problem:
    """Option tables for every layer; ``extra[l]`` adds specs (baselines' choices) to layer l;
    ``grid=False`` keeps only those (pricing given placements, no search)."""
    if grid:
        tables = tuple(layer_options(s, l, None if extra is None else extra[l]) for l in range(s.stats.num_layers))
    else:
        tables = tuple(option_costs(s, l, np.unique(extra[l], axis=0)) for l in range(s.stats.num_layers))
    # dense weights run on the compute device: only formats the engine runs there
    fixed = {fm: fixed_costs(s, fm) for fm in s.formats if s.runs(s.compute, fm)}
    device_mem = s.hardware.memory_of(s.compute.id).id
    caps = {device_mem: capacity(s, device_mem)}
    for h in s.homes:
        caps[h] = capacity(s, h)
    return Problem(setup=s, tables=tables, fixed=fixed, caps=caps, device_mem=device_mem,
                   quality_budget=quality_budget, importance_total=float(s.stats.importance.sum()))


class _HiGHS(pulp.HiGHS):
    """PuLP's HiGHS interface; a node limit (a status PuLP does not know) ends like a time limit."""

    def findSolutionValues(self, lp):  # noqa: N802 (PuLP's name)
        try:
            return super().findSolutionValues(lp)
        except KeyError:  # HighsModelStatus.kSolutionLimit: values are assigned, only the status is new
            if lp.solverModel.getInfo().primal_solution_status == 2:  # a feasible plan was found
                return pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible
            return pulp.LpStatusNotSolved, pulp.LpSolutionNoSolutionFound


def solve(problem: Problem, *, prefetch: bool, solver: str = "highs", time_limit_s: float = 30.0,
          gap: float = 0.001, warm: tuple[tuple[int, ...], str] | None = None,
          incumbent_s: float | None = None, _fronts: list[np.ndarray] | None = None,
          _node_budget: int = _NODE_BUDGET) -> SolveResult:
    """Solve the ILP of the module docstring.

    The search is bounded by work (node limits), so the same inputs give the same plan on a
    busy machine and an idle one; ``status`` is ``optimal`` (gap closed), ``node limit`` (the
    work limits ran out first; ``gap`` says how far it got) or ``time limit`` (the wall-clock
    safety net stopped it: ``timed_out``, and the plan may differ from run to run).

    Args:
        problem: from :func:`build_problem`.
        prefetch: model next-layer prefetch (predictability from the workload) or none.
        solver: ``highs`` (default) or ``cbc``.
        time_limit_s: wall-clock safety net, seconds: each MIP stops after this long, and no
            MIP starts after this long in all (parts not started are left to their LP bounds).
        gap: relative optimality gap at which the solver may stop.
        warm: ``(choice, dense_format)`` of a feasible plan (a baseline) to start from.
        incumbent_s: seconds per step of a plan known otherwise (the other prefetch setting):
            when the LP bound says no plan here beats it by more than ``gap``, no MIP runs.

    Raises:
        InfeasibleError: nothing fits; names the binding resource, the shortfall and a way out.
    """
    if solver not in ("highs", "cbc"):
        raise ValueError(f"unknown solver {solver!r}")
    deadline = time.perf_counter() + time_limit_s
    times = problem.times(prefetch)
    fronts = _fronts if _fronts is not None else [pareto_front(tau, t) for tau, t in zip(times, problem.tables)]
    if warm is not None and warm[1] not in problem.fixed:
        warm = None  # a plan with a dense format this problem leaves out
    best = None  # (choice, dense format, seconds): the best feasible plan known
    if warm is not None and _feasible(problem, *warm):
        best = (tuple(int(w) for w in warm[0]), warm[1], _objective(problem, times, *warm))
    relaxer = _Relaxer(problem, times, fronts)
    relax = relaxer.solve()
    if relax is not None and relax.dense_fractional(relaxer.n_x):
        return _by_dense_format(problem, times, fronts, best, relaxer.fix(relax, np.inf), prefetch=prefetch,
                                solver=solver, time_limit_s=time_limit_s, gap=gap, incumbent_s=incumbent_s,
                                node_budget=_node_budget)
    if relax is not None:
        best = _best_of(best, relaxer.round(times, relax))
    sizes: list[tuple[int, int]] = []  # (variables, constraints) of each MIP solved
    mip_s: list[float] = []
    timed_out = False
    nodes_left = _node_budget

    def solve_part(count: int | None, part: _Relaxation | None, first_try_only: bool = False) -> float:
        """MIP over the plans with count[nvme] = ``count`` (None: all); returns its lower bound.

        HiGHS's time to close a gap is heavy-tailed in its random seed (the same part: 0.6 s
        with one seed, minutes with another), so it runs as restarts: seed k stops after
        64 * 2^k nodes, until the gap closes or the solve's node budget would run out. Node
        limits, unlike time limits, give the same answer on any machine.
        """
        nonlocal best, timed_out, nodes_left
        if part is not None and best is not None and part.lower_s >= best[2] * (1 - gap):
            return part.lower_s  # the LP bound alone says no plan here improves by more than the gap
        bound = part.lower_s if part is not None else -np.inf
        kept = fronts if part is None or best is None else relaxer.fix(part, best[2])
        # HiGHS is not handed the best plan as its start: from a start it tends to search around
        # it and may not close a gap it closes in a second without (the best plan is kept anyway)
        start = best[:2] if best is not None and solver == "cbc" else None
        for restart in range(1 if first_try_only or solver == "cbc" else 64):
            nodes = (_GLOBAL_TRY_NODES if first_try_only else nodes_left if solver == "cbc"
                     else _FIRST_TRY_NODES * 2 ** restart)
            if nodes > nodes_left or nodes <= 0:
                break  # the work limit: the part keeps the bound it has
            if time.perf_counter() >= deadline:  # the safety net: recorded, never a plan's normal end
                timed_out = True
                break
            nodes_left -= nodes
            # each MIP gets the whole time limit: one that shrank with the wall clock would steer
            # the search differently from run to run (plans must not depend on the machine's load)
            mip = _mip(problem, times, kept, start, count, solver, time_limit_s, gap, nodes, seed=restart)
            sizes.append((mip.variables, mip.constraints))
            mip_s.append(mip.solve_s)
            timed_out |= mip.timed_out
            if mip.infeasible:
                if count is None:
                    raise explain_infeasible(problem)
                return np.inf  # no plan has this count
            if mip.choice is not None and _feasible(problem, mip.choice, mip.dense_format):
                best = _best_of(best, [(mip.choice, mip.dense_format)], problem, times)
            if mip.bound_s is not None or (best is not None and not mip.timed_out):
                bound = max(bound, mip.bound_s if mip.bound_s is not None else best[2])  # CBC (via PuLP): no bound
            if first_try_only or mip.timed_out or (best is not None and bound >= best[2] * (1 - gap)):
                break
        if best is None:
            raise InfeasibleError(f"the {solver} solver found no plan within its work limit ({_node_budget} nodes)"
                                  + (f" or {time_limit_s:g} s (--time-limit)" if timed_out else "")
                                  + "; run with --debug to see the model")
        return bound

    if incumbent_s is not None and relax is not None and best is not None and relax.lower_s >= incumbent_s * (1 - gap):
        # the other setting's plan is as fast as any plan here can be (within the gap): no MIP
        kept = relaxer.fix(relax, best[2])
        return SolveResult(choice=best[0], dense_format=best[1], prefetch=prefetch, objective_s=best[2],
                           status="optimal" if relax.lower_s >= best[2] * (1 - gap) else "node limit",
                           bound_s=min(relax.lower_s, best[2]), gap=max(0.0, 1 - relax.lower_s / best[2]),
                           solve_s=0.0, variables=sum(len(k) for k in kept) + len(problem.fixed),
                           constraints=len(kept) + relaxer.count_row, solver=solver, nodes=0)

    # a layer split between homes in the LP: the MIP over all plans gets a short try (a fixed
    # number of nodes, so the outcome does not depend on the machine), then the parts by
    # count[nvme] take over (see the module docstring)
    lumpy = solver == "highs" and relax is not None and best is not None and relax.spill_fractional
    bound = solve_part(None, relax, first_try_only=lumpy)
    if lumpy and bound < best[2] * (1 - gap):
        parts = relaxer.count_parts(relax, best[2] * (1 - gap))
        best = _best_of(best, [plan for _, part in parts for plan in relaxer.round(times, part)])
        # the parts cover every plan (beyond the last one walked to, LB(n) only grows)
        bound = max(bound, min(solve_part(count, part) for count, part in sorted(parts, key=lambda cp: cp[1].lower_s)))
    objective = best[2]
    bound = min(bound, objective)
    rel_gap = max(0.0, (objective - bound) / objective) if objective > 0 else 0.0
    if not sizes:  # the LP bound certified the plan: report the model it would have been
        kept = relaxer.fix(relax, objective)
        sizes.append((sum(len(k) for k in kept) + len(problem.fixed), len(kept) + relaxer.count_row))
    variables, constraints = max(sizes)
    status = "optimal" if rel_gap <= gap + 1e-9 else "time limit" if timed_out else "node limit"
    return SolveResult(choice=best[0], dense_format=best[1], prefetch=prefetch, objective_s=objective,
                       status=status, bound_s=bound, gap=rel_gap, solve_s=sum(mip_s), variables=variables,
                       constraints=constraints, solver=solver, timed_out=timed_out,
                       nodes=_node_budget - nodes_left)


def _by_dense_format(problem: Problem, times: list[np.ndarray], fronts: list[np.ndarray], best: tuple | None,
                     kept: list[np.ndarray], *, prefetch: bool, solver: str, time_limit_s: float, gap: float,
                     incumbent_s: float | None, node_budget: int) -> SolveResult:
    """Solve the plans by dense format, one part each (y_d = 1), when the LP relaxation mixes
    formats: a fraction of bf16 dense weights that do not fit with a fraction of int4 ones is
    no plan, and such a mix makes the LP bound weak (20% below the optimum for DeepSeek-V3 on
    cpu-server-4090) where each part's LP is tight. The parts cover every plan; the most
    promising (least LP bound) runs first, and a part whose LP bound cannot beat the best plan
    known by more than the gap runs no MIP.
    """
    parts = []
    for fm in problem.fixed:
        part = dataclasses.replace(problem, fixed={fm: problem.fixed[fm]})
        relax = _Relaxer(part, times, fronts).solve()
        if relax is not None:  # else no plan has this dense format
            parts.append((relax.lower_s, fm, part))
    if not parts:
        raise explain_infeasible(problem)
    results: list[SolveResult] = []
    bound = np.inf
    nodes_left = node_budget
    for lower_s, fm, part in sorted(parts, key=lambda p: (p[0], p[1])):
        known = min([r.objective_s for r in results] + ([best[2]] if best is not None else [])
                    + ([incumbent_s] if incumbent_s is not None else []), default=np.inf)
        if lower_s >= known * (1 - gap):
            bound = min(bound, lower_s)
            continue
        warm = best[:2] if best is not None and best[1] == fm else None
        try:
            r = solve(part, prefetch=prefetch, solver=solver, time_limit_s=time_limit_s, gap=gap, warm=warm,
                      incumbent_s=known if np.isfinite(known) else None, _fronts=fronts, _node_budget=nodes_left)
        except InfeasibleError:  # no plan found within what is left of the budget: the LP bound stands
            bound = min(bound, lower_s)
            continue
        nodes_left -= r.nodes
        results.append(r)
        bound = min(bound, r.bound_s if r.bound_s is not None else r.objective_s)
    found = [(r.choice, r.dense_format, r.objective_s) for r in results] + ([best] if best is not None else [])
    if not found:  # every part bounded by the other prefetch setting's plan, and none of our own
        fm = min(parts, key=lambda p: p[0])[1]
        return solve(dataclasses.replace(problem, fixed={fm: problem.fixed[fm]}), prefetch=prefetch, solver=solver,
                     time_limit_s=time_limit_s, gap=gap, _fronts=fronts, _node_budget=nodes_left)
    choice, dense_fm, objective = min(found, key=lambda f: f[2])
    bound = min(bound, objective)
    rel_gap = max(0.0, (objective - bound) / objective) if objective > 0 else 0.0
    timed_out = any(r.timed_out for r in results)
    status = "optimal" if rel_gap <= gap + 1e-9 else "time limit" if timed_out else "node limit"
    # no MIP ran: report the model over every part (``kept``: the front options) it would have been
    variables, constraints = max(((r.variables, r.constraints) for r in results),
                                 default=(sum(len(k) for k in kept) + len(problem.fixed), len(kept) + 1))
    return SolveResult(choice=choice, dense_format=dense_fm, prefetch=prefetch, objective_s=objective, status=status,
                       bound_s=bound, gap=rel_gap, solve_s=sum(r.solve_s for r in results), variables=variables,
                       constraints=constraints, solver=solver, timed_out=timed_out, nodes=node_budget - nodes_left)


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


def _time_unit(problem: Problem, times: list[np.ndarray], fronts: list[np.ndarray]) -> float:
    """Seconds of the fastest conceivable step (every layer at its fastest option): the unit
    the solvers see times in."""
    fastest = sum(float(times[l][f].min()) for l, f in enumerate(fronts) if len(f))
    return max(fastest + min(fc.dense_s for fc in problem.fixed.values()), 1e-12)


def _objective(problem: Problem, times: list[np.ndarray], choice: tuple[int, ...], dense_fm: str) -> float:
    return float(sum(times[l][w] for l, w in enumerate(choice)) + problem.fixed[dense_fm].dense_s)


def _best_of(best: tuple | None, plans: list[tuple], problem: Problem | None = None,
             times: list[np.ndarray] | None = None) -> tuple | None:
    """The fastest of ``best`` and ``plans``: ``(choice, dense, seconds)`` triples, or pairs that
    get their seconds from ``times`` (those must be feasible)."""
    for plan in plans:
        if len(plan) == 2:
            plan = (tuple(int(w) for w in plan[0]), plan[1], _objective(problem, times, *plan))
        if best is None or plan[2] < best[2]:
            best = plan
    return best


def _spills(t: OptionTable, w: int) -> bool:
    """Whether option w keeps offloaded experts in a home past the first (NVMe past host DRAM)."""
    return bool(t.home[w] > 0 and t.home_bytes[w] > 0)


def _spilled(problem: Problem, choice: tuple[int, ...]) -> int:
    """How many layers of a plan keep offloaded experts past the first home."""
    return sum(_spills(t, w) for t, w in zip(problem.tables, choice))


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


def _limits(problem: Problem, dense_fm: str) -> np.ndarray:
    """``[R]`` what the layers may put in each coupling row next to dense weights at ``dense_fm``."""
    return np.array([problem.caps[problem.device_mem] - problem.dense_total_bytes(dense_fm)]
                    + [problem.caps[h] for h in problem.setup.homes]
                    + [problem.quality_budget * problem.importance_total if problem.quality_budget is not None
                       else np.inf])


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
        return _Relaxation(lower_s=float(h.getInfo().objective_function_value) * self.unit, x=x,
                           reduced=np.asarray(sol.col_dual)[:self.n_x] * self.unit, weight=weight,
                           spilled=float(self.spills @ x[:self.n_x]))

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


def explain_infeasible(problem: Problem) -> InfeasibleError:
    """Name the binding resource, the shortfall in bytes and the smallest change that fits."""
    s = problem.setup
    dense_fm = min(problem.fixed, key=problem.dense_total_bytes)
    device_min = sum(float(t.dev_bytes.min()) for t in problem.tables) + problem.dense_total_bytes(dense_fm)
    cap_dev = problem.caps[problem.device_mem]
    if device_min > cap_dev:
        # the usable bytes are the capacity less the runtime reserve (CUDA context, allocator
        # slack): a bigger device gains only (1 - fraction) of each added byte
        frac, fixed = s.device_reserve
        total = s.hardware.memories[problem.device_mem].capacity_bytes
        needed_total = (device_min + fixed) / (1 - frac)
        short = device_min - cap_dev
        kv = problem.fixed[dense_fm].kv_bytes
        hint = (f"a shorter --context or smaller --batch (the KV cache alone takes {format_size(kv)})" if kv >= short
                else f"a device with at least {format_size(needed_total)} ({format_size(needed_total - total)} more), "
                     f"or a lower bitwidth for the dense weights")
        return InfeasibleError(
            f"{problem.device_mem} needs {format_size(device_min)} even with the fewest bytes on it (dense weights at "
            f"{dense_fm}, KV cache, no resident experts) but has {format_size(cap_dev)} usable of "
            f"{format_size(total)} (the runtime keeps {frac:.0%} + {format_size(fixed)} free); {format_size(short)} "
            f"short; smallest change: {hint}")
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
            f"the budget (uniform int4 costs {s.uniform_error('int4') if 'int4' in s.quant_error else 0:g}) or add "
            "memory for wider formats")
    return InfeasibleError("no placement satisfies every constraint; run with --debug to see the model")
