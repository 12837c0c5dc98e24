"""Which options a layer has: the grid of ``(p, q, b_res, c, b_off, home, mode)`` rows
(:data:`planner.setup.SPEC_COLUMNS`) the ILP chooses from, narrowed to what the engine can
run, what the user fixed (``--fix-*``) and what keeps critical experts at full precision.
"""

from __future__ import annotations

import numpy as np

from profiles.errors import InputError

from .setup import MODES, N_SPEC, Setup

__all__ = ["engine_runs", "keeps_critical", "option_specs"]


def option_specs(s: Setup, layer: int) -> np.ndarray:
    """``[N, 7]`` the grid of options the ILP chooses from (columns: SPEC_COLUMNS).

    p runs over the workload's rank grid and E; q over the grid points above p and E (below
    E only for the DRAM home, whose CPU computes the ranks past q); c over
    :meth:`Setup.cache_sizes`, smaller than the band. The offloaded format is never wider
    than the resident one (the cold experts are offloaded); ``local`` and ``hybrid`` compute
    on the CPU that holds the first home (host DRAM).
    """
    E = s.stats.num_experts
    rows = []
    full = _full_format(s)
    crit = _critical_by_rank(s, layer)
    homes = range(len(s.homes))  # never the compute device's own pool (make_setup)
    # the CPU computes where the weights live only in its own DRAM (a disk-homed expert would
    # have to be read first, which the costs below do not price)
    cpu_home = {hi for hi in homes if s.homes[hi] == s.hardware.memory_of(s.host.id).id}
    grid = sorted({int(p) for p in s.stats.pinned_grid} | {E})
    # a fixed resident count or cache size need not be a grid point (hit rates interpolate)
    pinned = grid if s.fixes is None or s.fixes.pinned(layer) is None else [s.fixes.pinned(layer)]
    sizes = s.cache_sizes() if s.fixes is None or s.fixes.slots(layer) is None else [s.fixes.slots(layer)]
    fetch, local, hybrid, stream = (MODES.index(m) for m in ("fetch", "local", "hybrid", "stream"))
    for p in pinned:
        for bi, br in enumerate(s.formats):
            if crit[:p].any() and br != full:
                continue  # a resident critical expert stays at full precision
            if p == E:
                rows.append((p, E, bi, 0, bi, 0, fetch))
                continue
            for bo_i, bo in enumerate(s.formats):
                if s.expert_bytes(bo) > s.expert_bytes(br) or (p == 0 and bo != br):
                    continue  # cold experts never wider than hot ones; p = 0: one spelling
                if crit[p:].any() and bo != full:
                    continue
                for hi in homes:
                    for q in (g for g in grid if g > p and (hi in cpu_home or g == E)):
                        for c in sizes:
                            if c >= q - p and c > 0:
                                continue  # a cache that holds the whole band is residency, not a cache
                            rows.append((p, q, bi, c, bo_i, hi, fetch))
                            if hi in cpu_home and c > 0:
                                rows.append((p, q, bi, c, bo_i, hi, hybrid))
                    if hi in cpu_home:
                        rows.append((p, p, bi, 0, bo_i, hi, local))
                    rows.append((p, E, bi, 0, bo_i, hi, stream))
    specs = np.array(rows, dtype=np.int64).reshape(-1, N_SPEC)
    specs = specs[_engine_runs_rows(s, specs)]
    if len(specs) and s.fixes is not None:
        specs = specs[s.fixes.allows(s, layer, specs)]
        if not len(specs):
            raise InputError("no option of this layer satisfies the --fix-* options together", key=f"layer {layer}",
                             fix="loosen them (a cache needs more offloaded experts than slots and an engine with "
                                 "a cache; resident experts run on the compute device)")
    if not len(specs):
        raise InputError("no way to place this layer's experts", key=f"layer {layer}",
                         fix="add host memory, use formats the devices support, or an engine that can offload "
                             "(planner engines list)")
    return specs


def _engine_runs_rows(s: Setup, specs: np.ndarray) -> np.ndarray:
    """``[N]`` :func:`engine_runs` of every row of ``specs``, asked once per kind of row: of p
    and q it reads only whether they are 0, E or equal, so the grid's 10^5 rows are a few
    hundred questions."""
    if s.engine is None or not len(specs):
        return np.ones(len(specs), bool)
    E = s.stats.num_experts
    p, q, bi, c, bo, _, mode = specs.T
    kind = np.stack([p == 0, p == E, q == p, q == E, c > 0, bi, bo, mode], axis=1).astype(np.int64)  # [N, 8]
    _, first, inverse = np.unique(kind, axis=0, return_index=True, return_inverse=True)
    answer = np.array([engine_runs(s, tuple(int(v) for v in specs[i])) for i in first], bool)
    return answer[inverse.ravel()]


def engine_runs(s: Setup, row: tuple) -> bool:
    """Whether the engine can run option ``row`` (SPEC_COLUMNS): its sites, its cache, its
    placement granularity and its kernels on the devices the option uses."""
    if s.engine is None:
        return True
    p, q, bi, c, bo, _, mode = row
    E = s.stats.num_experts
    name = MODES[mode]
    if p == E:  # everything resident
        return s.runs(s.compute, s.formats[bi])
    if name not in s.engine.modes and not (name == "fetch" and q == p):
        return False
    if c > 0 and not s.engine.has_cache:
        return False
    if s.engine.profile.placement != "expert" and (p not in (0, E) or q not in (p, E)):
        return False  # per tensor / per layer: a layer's experts share one site
    if p > 0 and not s.runs(s.compute, s.formats[bi]):
        return False
    off = s.formats[bo]
    on_device = name in ("fetch", "hybrid", "stream") and q > p
    on_cpu = name in ("local", "hybrid") or q < E
    return (not on_device or s.runs(s.compute, off)) and (not on_cpu or s.runs(s.host, off))


def _full_format(s: Setup) -> str:
    return min(s.formats, key=lambda fm: s.quant_error.get(fm, 0.0))


def keeps_critical(s: Setup, specs: np.ndarray) -> bool:
    """Whether one option per layer (``[L, 7]``) keeps every critical expert at full precision."""
    return all(bool(_keeps_critical(s, l, np.asarray(specs[l:l + 1], dtype=np.int64))[0]) for l in range(len(specs)))


def _keeps_critical(s: Setup, layer: int, specs: np.ndarray) -> np.ndarray:
    """``[N]`` whether each option keeps the layer's critical experts at full precision."""
    crit = _critical_by_rank(s, layer)
    if not crit.any():
        return np.ones(len(specs), bool)
    full = s.formats.index(_full_format(s))
    p, b_res, b_off = specs[:, 0], specs[:, 2], specs[:, 4]
    first = int(np.argmax(crit))  # the most frequent critical rank
    last = len(crit) - 1 - int(np.argmax(crit[::-1]))  # the least frequent one
    resident_ok = (first >= p) | (b_res == full)  # a critical rank below p is resident at b_res
    offloaded_ok = (last < p) | (b_off == full)  # ... at or past p it is offloaded at b_off
    return resident_ok & offloaded_ok


def _critical_by_rank(s: Setup, layer: int) -> np.ndarray:
    """``[E]`` whether the expert at each frequency rank is critical (full precision)."""
    E = s.stats.num_experts
    crit = np.zeros(E, bool)
    if s.critical and s.critical[layer]:
        rank = np.empty(E, int)
        rank[s.stats.order[layer]] = np.arange(E)
        crit[rank[list(s.critical[layer])]] = True
    return crit
