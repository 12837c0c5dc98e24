"""A multi-device pipeline plan's layout (:mod:`planner.multi_gpu`): whether a choice of
option and device per layer fits (:func:`feasible`), its seconds per step
(:func:`objective_s`), and the moves that refine a solver's layout at no cost
(:func:`polish`: fewer hops; :func:`contiguous`: one range of layers per device).

Legend: L = MoE layers, G = the node's devices that hold layers (GPUs, then accelerators),
``choice[l]`` the option of layer l in its device's table, ``devices[l]`` its device (index
into G).
"""

from __future__ import annotations

import numpy as np

from .ilp_model import Problem
from .pipeline_costs import dense_on, head_bytes, pipeline_step_s

__all__ = ["feasible", "objective_s", "polish", "contiguous"]


def feasible(problems: list[Problem], choice, devices, fm: str, budget: float | None) -> bool:
    """Whether a plan keeps every GPU's capacity, the shared homes' and the quality budget."""
    L, p0 = len(choice), problems[0]
    head = head_bytes(p0.setup, fm)
    for g, p in enumerate(problems):
        mine = [l for l in range(L) if devices[l] == g]
        if fm not in p.fixed:  # a device that cannot run the dense format holds no layer
            if mine:
                return False
            continue
        fc = p.fixed[fm]
        used = sum(float(p.tables[l].dev_bytes[choice[l]]) for l in mine) \
            + dense_on(fc, head, len(mine), L, first=g == 0) + fc.workspace_bytes
        if used > p.caps[p.device_mem] * (1 + 1e-9):
            return False
    for hi, home in enumerate(p0.setup.homes):
        used = sum(float(problems[g].tables[l].home_bytes[w]) for l, (g, w) in enumerate(zip(devices, choice))
                   if problems[g].tables[l].home[w] == hi)
        if used > p0.caps[home] * (1 + 1e-9):
            return False
    if budget is not None:
        err = sum(float(problems[g].tables[l].error[w]) for l, (g, w) in enumerate(zip(devices, choice)))
        if err > budget * p0.importance_total * (1 + 1e-9) + 1e-15 or p0.fixed[fm].error > budget + 1e-12:
            return False
    return True


def polish(problems: list[Problem], times, choice, devices, hop: np.ndarray, fm: str, budget: float | None) -> dict:
    """Fewer hops at no cost: swap the GPUs of two layers, or move one layer, keeping each
    layer's option, while that is feasible and strictly faster (a node-limited MIP may stop
    on a fragmented assignment; on equal GPUs only the hops tell the assignments apart).
    Only layers whose option tables are the same on every GPU move. Returns the new
    ``choice``, ``devices`` and ``objective``."""
    G, L = len(problems), len(choice)
    movable = _movable(problems, L)
    devices = list(devices)
    best = objective_s(problems, times, choice, devices, hop, fm)
    improved = True
    while improved:
        improved = False
        moves = [("move", a, g) for a in range(L) for g in range(G) if movable[a] and g != devices[a]]
        moves += [("swap", a, b) for a in range(L) for b in range(a + 1, L)
                  if movable[a] and movable[b] and devices[a] != devices[b]]
        for kind, a, x in moves:
            trial = list(devices)
            if kind == "move":
                trial[a] = x
            else:
                trial[a], trial[x] = devices[x], devices[a]
            sec = objective_s(problems, times, choice, trial, hop, fm)
            if sec < best * (1 - 1e-12) and feasible(problems, choice, trial, fm, budget):
                devices, best, improved = trial, sec, True
                break
    return {"devices": tuple(devices), "objective": best, "choice": tuple(choice)}


def _movable(problems: list[Problem], L: int) -> list[bool]:
    """``[L]`` whether layer l's option table is the same on every GPU (its option can move)."""
    cols = ("p", "q", "b_res", "c", "b_off", "home", "mode", "k", "b_up")
    return [all(np.array_equal(getattr(problems[0].tables[l], c), getattr(p.tables[l], c))
                for p in problems[1:] for c in cols) for l in range(L)]


def contiguous(problems: list[Problem], times, choice, devices, hop: np.ndarray, fm: str,
               budget: float | None) -> dict:
    """One contiguous range of layers per GPU, when one is feasible and no slower: llama.cpp
    expresses such a layout exactly (``--device`` order and ``--tensor-split`` counts), an
    alternating one only with ``-ot`` rules that leave the KV cache on the split's device.
    Every order of the GPUs the plan uses and every cut of the layers into that many ranges
    is tried, each layer keeping its option (only when every layer's table is the same on
    every GPU, and for up to 3 GPUs); the fastest feasible one no slower than the plan wins
    (ties: the first found, GPUs in index order first). Returns ``choice``, ``devices`` and
    ``objective``."""
    import itertools

    L = len(choice)
    now = objective_s(problems, times, choice, devices, hop, fm)
    out = {"devices": tuple(devices), "objective": now, "choice": tuple(choice)}
    used = sorted(set(devices))
    runs = sum(1 for a, b in zip(devices, devices[1:]) if a != b) + 1
    if runs == len(used) or len(used) > 3 or not all(_movable(problems, L)):
        return out  # already one range per GPU, or out of reach
    best = None
    for order in itertools.permutations(used):
        for cuts in itertools.combinations(range(1, L), len(order) - 1):
            edges = (0, *cuts, L)
            trial = tuple(g for k, g in enumerate(order) for _ in range(edges[k + 1] - edges[k]))
            sec = objective_s(problems, times, choice, trial, hop, fm)
            if sec <= now * (1 + 1e-12) and (best is None or sec < best[0]) \
                    and feasible(problems, choice, trial, fm, budget):
                best = (sec, trial)
    if best is not None:
        out |= {"devices": best[1], "objective": best[0]}
    return out


def objective_s(problems: list[Problem], times, choice, devices, hop: np.ndarray, fm: str) -> float:
    """Seconds per decode step of a plan: layer options on their GPUs, dense shares, hops
    (:func:`planner.pipeline_costs.pipeline_step_s`, the formula the baselines and exporters price with)."""
    layer_s = [times[g][l][w] for l, (g, w) in enumerate(zip(devices, choice))]
    dense_s = [p.fixed[fm].dense_s if fm in p.fixed else float("inf") for p in problems]  # inf: never runs a layer
    return pipeline_step_s(layer_s, dense_s, devices, hop)
