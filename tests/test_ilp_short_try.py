"""The short try at all plans before the parts by count[nvme] (planner/ilp.py, "Lumpy homes")
is skipped where it cannot pay: here one part alone has an LP bound below the best plan known,
so the MIP over all plans would be that part's without its count row. DeepSeek-V3 on
desktop-4090 with measured errors spent 6-11 CPU-s of root cuts on that try. Counts the
solver's MIPs, never a clock."""

from __future__ import annotations

import dataclasses

import pytest

from planner import ilp
from planner.ilp import build_problem, solve
from tests.test_planner_ilp import brute_force, tiny_setup


def test_one_part_worth_a_mip_runs_that_part_alone_and_stays_optimal(tmp_path, monkeypatch):
    s = dataclasses.replace(tiny_setup(tmp_path, hbm=100_000, dram=150_000), cache_grid=(0, 2))
    problem = build_problem(s, 0.01)
    counts, mip = [], ilp._mip

    def recorded(problem, times, fronts, warm, count, *args, **kwargs):
        counts.append(count)
        return mip(problem, times, fronts, warm, count, *args, **kwargs)

    monkeypatch.setattr(ilp, "_mip", recorded)
    for prefetch in (False, True):
        counts.clear()
        result = solve(problem, prefetch=prefetch, gap=0.0)
        assert result.objective_s == pytest.approx(brute_force(problem, prefetch), rel=1e-9)
        assert result.status == "optimal"
        assert counts == [1]  # the part with one layer homed on NVMe; before: [None, 1]
