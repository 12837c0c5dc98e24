"""Mixed dense formats: the single-node ILP (:mod:`planner.ilp`) solved as one part per dense format.

The LP relaxation may blend dense formats (a fraction of bf16 dense weights that do not fit
with a fraction of int4 ones), a bound 20% below the optimum for DeepSeek-V3 on
cpu-server-4090; the plans are then split by dense format (y_d = 1), each part with a tight
LP, solved least bound first, each by :func:`planner.ilp.solve` with its dense format fixed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from profiles.errors import InfeasibleError

from .ilp_model import Problem, explain_infeasible
from .ilp_relax import _Relaxer

if TYPE_CHECKING:
    from .ilp import SolveResult

__all__ = ["by_dense_format"]


def by_dense_format(problem: Problem, times: list[np.ndarray], fronts: list[np.ndarray], best: tuple | None,
                    kept: list[np.ndarray], *, prefetch: bool, solver: str, time_limit_s: float, gap: float,
                    incumbent_s: float | None, node_budget: int) -> SolveResult:
    """Solve the plans by dense format, one part each (y_d = 1), when the LP relaxation mixes
    formats: a fraction of bf16 dense weights that do not fit with a fraction of int4 ones is
    no plan, and such a mix makes the LP bound weak (20% below the optimum for DeepSeek-V3 on
    cpu-server-4090) where each part's LP is tight. The parts cover every plan; the most
    promising (least LP bound) runs first, and a part whose LP bound cannot beat the best plan
    known by more than the gap runs no MIP.
    """
    from .ilp import SolveResult, solve  # each part is a solve of its own (ilp imports this module)

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
