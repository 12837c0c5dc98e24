"""The single-node placement ILP: one option per MoE layer, a multiple-choice knapsack.

Sets
    l in 0..L-1         MoE layers
    w in Omega_l        options of layer l (planner.costs: by frequency rank, [0, p) resident at
                        b_res; the rest at b_off in a home, of which [p, q) run by a mode through
                        c cache slots and [q, E) on the CPU where they live; and a tier
                        (k, b_up): the k tail experts of greatest importance-weighted error gain
                        at b_up instead of b_off, planner.format_tiers)
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
    n_k in Z>=0         layers that take option shape k (implied by x; see "Near-equal layers")
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
which. Per-expert formats stay options too: where a layer's experts differ in measured error,
an option's tier is a count vector over formats for its tail (E - q - k at b_off, k at b_up)
assigned in order of each expert's gain w_e (err_e(b_off) - err_e(b_up)), which for given
counts is the least error (every tail expert costs the same bytes at a format), its time
priced exactly from the tokens' own experts (planner.format_tiers). So a cold expert ten
times as sensitive as its neighbours can be stored wider than hotter ones, and a layer may
hold three formats; where every expert of a layer has the same error per format no tier is
offered and the options are the rank structure's alone. Being options, tiers leave the
model, its bound and its certificate as they are. The execution site of each offloaded
rank (split q, mode) only changes tau_lw, so of the options that share memory and error
(p, b_res, c, b_off, home, tier) only the fastest enters the model. More generally, options another option beats or ties in every column
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
cover every plan, so the answer is exact, and the bound is the least over the parts. The
short try is skipped where one part at most is worth solving, or where the parts' LP bounds
already lie more than the gap above the relaxation's (the MIP over all plans must then settle
the count, which the parts do directly).

Near-equal layers. DeepSeek-V3's 58 layers hold experts of one size and differ little in
statistics, so their options come in a few shapes (p, c, b_res, b_off, home, tier: the
columns that set an option's bytes) that nearly every layer has, at times within a few
percent. The LP's fraction (35.8 layers homed on NVMe with 16 cache slots, on desktop-4090
at the int4 budget) then moves to another layer at almost no cost when a branch forbids it
in one, and branching on single options barely lifts the bound: the MIP spent its whole
node budget at a 0.31% gap. So each MIP counts, per shape that several layers have,

    shape[k]:    n_k = sum_{lw: shape(w) = k} x_lw,     n_k integer

and a branch n_k <= 35 forbids the fraction wherever it goes (that part closes in under
100 nodes). The counts add nothing that x does not imply, so plans and bound are unchanged;
they are only offered where the shapes number fewer than twice the layers (elsewhere most
shapes belong to one layer and the counts only slow each node), and HiGHS's presolve is told not to
substitute them out (ilp_mip._PRESOLVE_AGGREGATOR).

Mixed dense formats. Where the LP relaxation blends dense formats, the plans are split by
dense format (y_d = 1), each part with a tight LP (planner.ilp_dense).

Lumpy DRAM. Where host DRAM holds a few layers' offloaded experts whole and the rest live
on NVMe, the LP homes fractions of layers in DRAM (and buys quality with fractions of bf16
layers) and lies 1-2% below the best plan. A Lagrangian bound (planner.ilp_lagrange) prices
every coupling row but DRAM, from the LP's duals, and keeps DRAM as a knapsack solved exactly
by dynamic programming over the layers: DeepSeek-V3 with measured errors on desktop-4090 at
the int4 budget, 1.25% -> 0.2% below the optimum. Where it alone closes the gap no MIP runs;
else forcing each option into the DP bounds every plan that takes it, and the options whose
bound exceeds the best plan leave the MIPs with those the LP's reduced costs fix (4,126 ->
about 1,600 options there, its MIP 7.4 -> 1.4 CPU-s). It runs only where DRAM binds the LP.

Lumpy quality. With measured per-expert errors the budget buys whole layers at a wider
format (DeepSeek-V3 on desktop-4090 at the int8 budget: six layers stream bf16 experts from
NVMe at twice an int8 layer's seconds), and the DRAM bound, pricing quality, buys a fraction of
one: 0.73% below the best plan, and the MIP spent its whole node budget (about 90 CPU-s) at
0.65%. A second Lagrangian bound (planner.ilp_lagrange2d) keeps DRAM and quality both whole,
a two-dimensional DP at the DRAM bound's multipliers for the other rows: 0.11% there. Where it
closes at least half of the DRAM bound's gap, the options whose forced bound lies past the best
plan less the gap leave the MIPs (5,003 -> about 1,600 options), and the least bound among them
(the floor) bounds every plan that takes one, so the certificate is min(the MIPs' bound, floor):
optimal (0.09%) in about 4.5 CPU-s.

HiGHS's time to close a gap is heavy-tailed in its random seed (one part of the laptop
case: 0.6 s with one seed, over two minutes with another), so each MIP runs as restarts with
growing node limits and a new seed each (see solve); node limits, unlike time limits, give
the same plan on any machine. Times enter the solvers in units of the fastest conceivable
step, so that their absolute tolerances (1e-7) sit far below the differences between plans.

Modules: this one holds the solve strategy (LP first, MIP restarts under node limits, the
parts by count[nvme]); :mod:`planner.ilp_dense` the parts by dense format;
:mod:`planner.ilp_model` the problem, its option fronts and feasibility;
:mod:`planner.ilp_relax` the LP relaxation, its rounding, repair and local search;
:mod:`planner.ilp_lagrange` the Lagrangian bound with DRAM kept whole;
:mod:`planner.ilp_lagrange2d` the one with DRAM and quality kept whole;
:mod:`planner.ilp_mip` one MIP (PuLP, HiGHS or CBC).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from profiles.errors import InfeasibleError

from .ilp_dense import by_dense_format
from .ilp_lagrange import dram_bound
from .ilp_lagrange2d import quality_bound
from .ilp_mip import _mip  # solve calls ilp._mip: tests replace it there
from .ilp_model import Problem, _best_of, _feasible, _objective, build_problem, explain_infeasible, pareto_front
from .ilp_relax import _Relaxation, _Relaxer

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
# budget, whose part no seed closes: 0.7% gap). Time per node grows with the options kept:
# DeepSeek-V3 on desktop-4090 (layers homed on NVMe) spends the whole budget at the int4
# budget (about 11 CPU-s, 0.31% gap) until the MIPs counted layers per option shape (see "Near-
# equal layers" above; now optimal in about 3 CPU-s), and with measured per-expert errors and
# their tiers 20-110 CPU-s (gaps 0.06-0.7%; 32-37 CPU-s and 1.2-1.5% without tiers, both
# measured before the shape counts); cpu-server-4090 closes in 2-4. With the DRAM Lagrangian
# ("Lumpy DRAM"): int4 4.3 CPU-s (0.03%); int8 spent the whole budget, about 90 CPU-s at 0.65%
# (part count[nvme] = 54 closed only at its fourth restart, 512 nodes; part 53 then ran out),
# until the bound that keeps quality whole too ("Lumpy quality") left 192 nodes to run.
_FIRST_TRY_NODES = 64
_NODE_BUDGET = 1024
_GLOBAL_TRY_NODES = 16


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
    problem = problem.for_prefetch(prefetch)  # a TTFT SLO's rows for this setting
    times = problem.times(prefetch)
    fronts = _fronts if _fronts is not None else [
        pareto_front(tau, t, None if problem.ttft is None else problem.ttft[l])
        for l, (tau, t) in enumerate(zip(times, problem.tables))]
    if warm is not None and warm[1] not in problem.fixed:
        warm = None  # a plan with a dense format this problem leaves out
    best = None  # (choice, dense format, seconds): the best feasible plan known
    if warm is not None and _feasible(problem, *warm):
        best = (tuple(int(w) for w in warm[0]), warm[1], _objective(problem, times, *warm))
    relaxer = _Relaxer(problem, times, fronts)
    relax = relaxer.solve()
    if relax is not None and relax.dense_fractional(relaxer.n_x):
        return by_dense_format(problem, times, fronts, best, relaxer.fix(relax, np.inf), prefetch=prefetch,
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

    # the Lagrangian bound that keeps host DRAM whole (planner.ilp_lagrange): where it alone
    # closes the gap no MIP runs; else the options in no plan faster than the best known (by
    # it and by the LP's reduced costs) leave the MIPs, and the bound reported is the better one
    lag_bound, floor = -np.inf, np.inf
    if (solver == "highs" and relax is not None and best is not None and relax.lower_s < best[2] * (1 - gap)
            and len(relax.duals) > 1 and relax.duals[1] > 0):  # host DRAM binds the LP (else the DP adds nothing)
        lag = dram_bound(problem, times, fronts, relax.duals, best[2], gap)
        if lag is not None:
            lag_bound, plans, kept, multipliers = lag
            best = _best_of(best, plans)
            if lag_bound < best[2] * (1 - gap):
                fronts = [np.intersect1d(a, b) for a, b in zip(kept, relaxer.fix(relax, best[2]))]
                # quality kept whole too (planner.ilp_lagrange2d, "Lumpy quality"): the options
                # whose forced bound lies past the best plan less the gap leave the MIPs, and
                # the least of their bounds (floor) bounds every plan that takes one
                two = quality_bound(problem, times, fronts, multipliers, lag_bound, best[2], gap)
                if two is not None:
                    two_bound, plans, fronts, floor = two
                    best = _best_of(best, plans)
                    lag_bound = max(lag_bound, two_bound)
            narrowed = _Relaxer(problem, times, fronts) if lag_bound < best[2] * (1 - gap) else None
            relaxed = narrowed.solve() if narrowed is not None else None
            if lag_bound >= best[2] * (1 - gap) or relaxed is None:  # the bounds, or no plan within the options kept
                lag_bound = lag_bound if relaxed is not None else max(lag_bound, min(floor, best[2]))
                kept = relaxer.fix(relax, best[2])
                return SolveResult(choice=best[0], dense_format=best[1], prefetch=prefetch, objective_s=best[2],
                                   status="optimal" if lag_bound >= best[2] * (1 - gap) - 1e-12 else "node limit",
                                   bound_s=min(lag_bound, best[2]),
                                   gap=max(0.0, 1 - lag_bound / best[2]), solve_s=0.0,
                                   variables=sum(len(k) for k in kept) + len(problem.fixed),
                                   constraints=len(kept) + relaxer.count_row, solver=solver, nodes=0)
            relaxer, relax = narrowed, relaxed

    # a layer split between homes in the LP: the MIP over all plans gets a short try (a fixed
    # number of nodes, so the outcome does not depend on the machine), then the parts by
    # count[nvme] take over (see the module docstring)
    lumpy = solver == "highs" and relax is not None and best is not None and relax.spill_fractional
    parts = relaxer.count_parts(relax, best[2] * (1 - gap)) if lumpy else []
    if parts:
        best = _best_of(best, [plan for _, part in parts for plan in relaxer.round(times, part)])
    # the short try is skipped where it cannot pay: with at most one part whose LP bound leaves
    # room below the best plan (the MIP over all plans is then that part's, without its count
    # row and with fewer options fixed), or where the parts' LP bounds already lie more than
    # the gap above the relaxation's, so that the MIP over all plans closes its gap only by
    # settling the count, which the parts do directly (DeepSeek-V3 on desktop-4090 with
    # measured errors: 6-11 CPU-s of root cuts for a bound below the parts' LPs)
    worth = sum(part.lower_s < best[2] * (1 - gap) for _, part in parts)
    lifted = bool(parts) and min(part.lower_s for _, part in parts) - gap * best[2] > relax.lower_s
    bound = relax.lower_s if parts and (worth <= 1 or lifted) else solve_part(None, relax, first_try_only=lumpy)
    if parts and bound < best[2] * (1 - gap):
        # the parts cover every plan (beyond the last one walked to, LB(n) only grows)
        bound = max(bound, min(solve_part(count, part) for count, part in sorted(parts, key=lambda cp: cp[1].lower_s)))
    objective = best[2]
    # plans within the MIPs' options: their bound; plans with an option left out: floor
    bound = min(max(min(bound, floor), lag_bound), objective)
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
