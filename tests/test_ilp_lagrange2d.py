"""The Lagrangian bound that keeps host DRAM and the quality budget whole
(planner/ilp_lagrange2d.py) on tiny instances against brute force: it never exceeds the
optimum, every plan that takes an option it leaves out costs at least the floor it reports,
the plans it returns are feasible, and a solve that uses it still finds the optimum with a
true bound. The instances have per-expert (measured) errors, so tiers are offered. No
assertion reads a clock."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from test_planner_ilp import tiny_setup

from planner.ilp import build_problem, pareto_front, solve
from planner.ilp_lagrange import dram_bound
from planner.ilp_lagrange2d import quality_bound
from planner.ilp_model import _feasible, _objective
from planner.ilp_relax import _Relaxer
from planner.costs import QUANT_ERROR


def _measured(tmp_path, hbm, dram, seed=0):
    """The tiny box with each (layer, expert) error its format's constant times a seeded
    lognormal factor, as a measured quality file gives them."""
    s = dataclasses.replace(tiny_setup(tmp_path, hbm=hbm, dram=dram), cache_grid=(0, 2))
    rng = np.random.default_rng(seed)
    shape = (s.stats.num_layers, s.stats.num_experts)
    return dataclasses.replace(s, expert_error={fm: QUANT_ERROR[fm] * rng.lognormal(0.0, 0.8, shape)
                                                for fm in ("bf16", "int8", "int4")})


def _plans(problem, times, fronts):
    """Every feasible plan over the options ``fronts``: ``(seconds, choice, dense)``."""
    out = []
    for dense in problem.fixed:
        for choice in itertools.product(*(map(int, f) for f in fronts)):
            if _feasible(problem, choice, dense):
                out.append((_objective(problem, times, choice, dense), choice, dense))
    return out


CASES = [(150_000, 150_000, 0.01), (250_000, 150_000, 0.01), (200_000, 120_000, 0.04), (150_000, 100_000, 0.006),
         (250_000, 90_000, 0.02)]


@pytest.mark.parametrize("hbm, dram, budget", CASES)
@pytest.mark.parametrize("slack", [0.0, 0.02])
def test_quality_bound_is_a_bound_and_its_floor_bounds_every_plan_it_leaves_out(tmp_path, hbm, dram, budget, slack):
    problem = build_problem(_measured(tmp_path, hbm, dram), budget)
    times = problem.times(False)
    fronts = [pareto_front(tau, t) for tau, t in zip(times, problem.tables)]
    plans = _plans(problem, times, fronts)
    opt = min(p[0] for p in plans)
    relax = _Relaxer(problem, times, fronts).solve()
    lag = dram_bound(problem, times, fronts, relax.duals, opt * 1.05, gap=0.0)
    # small grids: the rounding is coarse, and still the DP must bound every plan
    for units in ((1024, 2048), (16, 8)):
        # lower_s = 0: L2 counts as closing the gap, so the options are pruned whenever any lies past the cut
        out = quality_bound(problem, times, fronts, lag[3], 0.0, opt * (1 + slack), gap=slack, dram_units=units[0],
                            quality_units=units[1])
        if out is None:  # only where quality does not bind the one-row bound
            assert not lag[3][1 + len(problem.setup.homes)] > 0
            continue
        bound, found, kept, floor = out
        assert bound <= opt * (1 + 1e-9)
        for choice, dense, seconds in found:
            assert _feasible(problem, choice, dense)
            assert seconds == pytest.approx(_objective(problem, times, choice, dense))
        kept_sets = [set(map(int, k)) for k in kept]
        left_out = [p for p in plans if any(w not in ks for w, ks in zip(p[1], kept_sets))]
        for seconds, _, _ in left_out:  # every plan left out costs at least the floor
            assert seconds >= floor * (1 - 1e-9)
        # the certificate: the best plan within the options kept, or the floor, bounds the optimum
        within = min((p[0] for p in plans if p not in left_out), default=np.inf)
        assert min(within, floor) <= opt * (1 + 1e-12)


def test_quality_bound_applies_and_solve_stays_exact_with_measured_errors(tmp_path):
    """Where DRAM and the quality budget both bind, the two-row DP runs, bounds the optimum
    and a solve that uses it (gap 0) returns an optimal plan with a bound below it."""
    applied = pruned = 0
    for hbm, dram, budget in CASES:
        problem = build_problem(_measured(tmp_path, hbm, dram), budget)
        times = problem.times(False)
        fronts = [pareto_front(tau, t) for tau, t in zip(times, problem.tables)]
        opt = min(p[0] for p in _plans(problem, times, fronts))
        relax = _Relaxer(problem, times, fronts).solve()
        lag = dram_bound(problem, times, fronts, relax.duals, opt, gap=0.0)
        out = quality_bound(problem, times, fronts, lag[3], lag[0], opt, gap=0.0)
        if out is not None:
            applied += 1
            assert out[0] <= opt * (1 + 1e-9)
            pruned += np.isfinite(quality_bound(problem, times, fronts, lag[3], 0.0, opt * 1.02, gap=0.02)[3])
        result = solve(problem, prefetch=False, gap=0.0)
        assert result.objective_s == pytest.approx(opt, rel=1e-9)
        assert result.bound_s <= opt * (1 + 1e-9)
    assert applied >= 1 and pruned >= 1  # the cases exercise the DP and its pruning, not only the guards
