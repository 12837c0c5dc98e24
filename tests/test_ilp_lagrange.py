"""The Lagrangian bound that keeps host DRAM whole (planner/ilp_lagrange.py) on tiny instances
against brute force: it never exceeds the optimum, it is at least the LP bound it starts from,
the options it keeps hold an optimal plan, and the plans it returns are feasible. No assertion
reads a clock."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from test_planner_ilp import brute_force, tiny_setup

from planner.ilp import build_problem, pareto_front, solve
from planner.ilp_lagrange import dram_bound
from planner.ilp_model import _feasible, _objective
from planner.ilp_relax import _Relaxer


def _optimum(problem, times, fronts) -> tuple[float, tuple, str]:
    """The best plan over the options ``fronts``, by trying every combination."""
    best = (np.inf, None, None)
    for dense in problem.fixed:
        for choice in itertools.product(*(map(int, f) for f in fronts)):
            if _feasible(problem, choice, dense):
                seconds = _objective(problem, times, choice, dense)
                if seconds < best[0]:
                    best = (seconds, choice, dense)
    return best


@pytest.mark.parametrize("hbm, dram, budget", [(150_000, 150_000, 0.01), (250_000, 150_000, 0.01),
                                               (200_000, 120_000, 0.04), (250_000, 150_000, None)])
def test_dram_bound_is_a_bound_and_keeps_an_optimal_plan(tmp_path, hbm, dram, budget):
    s = dataclasses.replace(tiny_setup(tmp_path, hbm=hbm, dram=dram), cache_grid=(0, 2))
    problem = build_problem(s, budget)
    times = problem.times(False)
    fronts = [pareto_front(tau, t) for tau, t in zip(times, problem.tables)]
    relax = _Relaxer(problem, times, fronts).solve()
    opt, choice, dense = _optimum(problem, times, fronts)
    assert opt == pytest.approx(brute_force(problem, False), rel=1e-12)  # the fronts hold an optimum
    out = dram_bound(problem, times, fronts, relax.duals, opt * 1.05, gap=0.0)
    assert out is not None
    bound, plans, kept, _ = out
    assert bound <= opt * (1 + 1e-9)
    assert bound >= relax.lower_s * (1 - 1e-6)  # from the LP's duals: keeping DRAM whole only lifts it
    for plan_choice, plan_dense, seconds in plans:
        assert _feasible(problem, plan_choice, plan_dense)
        assert seconds == pytest.approx(_objective(problem, times, plan_choice, plan_dense))
        assert seconds >= opt * (1 - 1e-12)
    if kept is not fronts:  # the options of an optimal plan survive the fixing
        assert all(int(w) in set(map(int, k)) for w, k in zip(choice, kept))


def test_dram_bound_lifts_the_lp_bound_where_dram_holds_a_fraction_of_a_layer(tmp_path):
    """DRAM for one layer's offloaded experts and a half: the LP homes the half, the DP cannot."""
    s = dataclasses.replace(tiny_setup(tmp_path, hbm=150_000, dram=150_000), cache_grid=(0, 2))
    problem = build_problem(s, 0.01)
    times = problem.times(False)
    fronts = [pareto_front(tau, t) for tau, t in zip(times, problem.tables)]
    relax = _Relaxer(problem, times, fronts).solve()
    opt = brute_force(problem, False)
    bound, _, _, _ = dram_bound(problem, times, fronts, relax.duals, opt, gap=0.0)
    assert relax.duals[1] > 0  # DRAM binds the LP
    assert bound > relax.lower_s * (1 + 1e-6)
    assert bound <= opt * (1 + 1e-9)
    result = solve(problem, prefetch=False, gap=0.0)  # the solve that uses it still finds the optimum
    assert result.objective_s == pytest.approx(opt, rel=1e-9)
    assert result.bound_s <= opt * (1 + 1e-9)
