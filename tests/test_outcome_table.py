"""PlanningStats.outcome_table (the per-token outcomes that price every option at batch 1)
against a token-by-token count from its definition, tiers included: the table tallies cells
by bincount over prefix counts, and must give exactly what counting each token's accesses gives.

Legend: T = tokens, K = top-k, E = experts, G = keys.
"""

from __future__ import annotations

import numpy as np
import pytest

from planner.workload_view import planning_stats
from profiles.workload.synthetic import SyntheticWorkload, generate


@pytest.fixture(scope="module")
def stats():
    trace = generate(SyntheticWorkload(num_layers=2, num_experts=16, top_k=4, skew=1.0, temporal=0.4, affinity=0.5,
                                       num_sequences=5, prompt_tokens=20, output_tokens=12, seed=7))
    return planning_stats(trace)


def _by_token(stats, layer: int, p: int, c: int, q: int, up: np.ndarray | None) -> dict[tuple, float]:
    """cell -> share, each token's accesses counted one at a time (the measured band's stack distance)."""
    grid = stats.pinned_grid
    i = max(int(np.searchsorted(grid, p, side="right")) - 1, 0)
    j = min(int(np.searchsorted(grid, q, side="left")), len(grid) - 1)
    rank, warm, below = (a[:, layer] for a in (stats.access_rank, stats.access_warm, stats.access_below))
    cells: dict[tuple, float] = {}
    for t in range(len(rank)):
        row = [0, 0, 0, 0, 0]
        for k, r in enumerate(rank[t]):
            if r < 0:
                continue
            if r < p:
                row[0] += 1
            elif r >= q:
                row[3] += 1
                row[4] += bool(up is not None and up[r])
            elif warm[t, k] and int(below[t, k, j]) - int(below[t, k, i]) < c:
                row[1] += 1
            else:
                row[2] += 1
        key = tuple(row if up is not None else row[:4])
        cells[key] = cells.get(key, 0.0) + 1.0 / len(rank)
    return cells


@pytest.mark.parametrize("tiered", [False, True])
def test_outcome_table_equals_a_token_by_token_count(stats, tiered):
    rng = np.random.default_rng(3)
    E = stats.num_experts
    keys = np.array([(p, c, q) for p in (0, 2, 4, 8) for q in (4, 8, 12, 16) if q >= p for c in (0, 1, 3, 16)])
    up = None
    if tiered:  # random tiers within each key's tail, one empty
        up = (rng.random((len(keys), E)) < 0.4) & (np.arange(E)[None, :] >= keys[:, 2:3])
        up[0] = False
    key, *cols = stats.outcome_table(1, keys, up=up)
    assert (np.diff(key) >= 0).all()  # grouped by key, in key order
    for g, (p, c, q) in enumerate(keys):
        mine = key == g
        got = {tuple(int(col[m]) for col in cols[:4] + cols[5:]): float(cols[4][m]) for m in np.flatnonzero(mine)}
        want = _by_token(stats, 1, int(p), int(c), int(q), None if up is None else up[g])
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(want[k]) for k in want)
        codes = np.stack(cols[:4] + cols[5:], axis=1)[mine]  # each key's cells in ascending order, once each
        assert len({tuple(r) for r in codes}) == len(codes)
        assert [tuple(r) for r in codes] == sorted(tuple(r) for r in codes)


def test_outcome_table_in_blocks_equals_one_block(stats):
    """Many keys are tallied in blocks (bounded temporaries): the blocks join into one table."""
    keys = np.array([(p, c, 16) for p in range(0, 16, 2) for c in range(0, 9)])
    whole = stats.outcome_table(0, keys)

    small = [stats.outcome_table(0, keys[g:g + 1]) for g in range(len(keys))]
    for col, parts in zip(whole[1:], zip(*(s[1:] for s in small))):
        assert np.array_equal(col, np.concatenate(parts))
    assert np.array_equal(whole[0], np.concatenate([np.full(len(s[0]), g) for g, s in enumerate(small)]))
