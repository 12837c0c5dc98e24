"""Near-equal layers (planner/ilp.py, "Near-equal layers"; issue 18 item 2): each MIP counts the
layers that take each option shape, so a branch can forbid a fraction that would otherwise move
from layer to layer. DeepSeek-V3 on desktop-4090 at the int4 budget spent the whole node budget
at a 0.31% gap without the counts; with them it closes its gap. No assertion reads a clock.
"""

from __future__ import annotations

import numpy as np
import pytest

from planner.costs import QUANT_ERROR
from planner.ilp import build_problem, pareto_front
from planner.ilp_mip import _shapes
from planner.ilp_relax import _Relaxer
from planner.optimize import OptimizeRequest, optimize


@pytest.fixture(scope="module")
def dsv3():
    return optimize(OptimizeRequest(hardware="desktop-4090", model="deepseek-v3", quality_budget=QUANT_ERROR["int4"]))


def test_deepseek_v3_on_desktop_4090_closes_its_gap_within_the_node_budget(dsv3):
    solver = dsv3.plan.solver
    assert solver.status == "optimal", (solver.status, solver.gap)  # was "node limit" at a 0.31% gap
    assert solver.gap <= 0.001


def test_a_shape_holds_options_of_several_layers_with_equal_bytes(dsv3):
    problem = build_problem(dsv3.setup, QUANT_ERROR["int4"])
    times = problem.times(False)
    relaxer = _Relaxer(problem, times, [pareto_front(tau, t) for tau, t in zip(times, problem.tables)])
    fronts = relaxer.fix(relaxer.solve(), dsv3.plan.solver.objective)  # the options a MIP of the solve sees
    x = [{int(w): (l, int(w)) for w in front} for l, front in enumerate(fronts)]  # stand-ins for the variables
    shapes = _shapes(problem, x)
    assert 0 < len(shapes) < len(fronts)  # the layers outnumber the shapes: counts are offered
    seen = [m for members in shapes for m in members]
    assert len(seen) == len(set(seen))  # an option counts in one shape at most
    for members in shapes:
        assert len({l for l, _ in members}) > 1
        for col in ("dev_bytes", "home_bytes", "home"):
            values = [float(getattr(problem.tables[l], col)[w]) for l, w in members]
            assert np.allclose(values, values[0], rtol=1e-12), col
    # the first two layers alone share more shapes than they are layers: no counts
    assert _shapes(problem, x[:2]) == []
