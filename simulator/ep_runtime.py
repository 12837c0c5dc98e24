"""Run-time expert-parallel behaviour: least-loaded rerouting and periodic EPLB re-placement.

Shape legend: n = tokens of a step, K = experts per token, E = routed experts, G = GPUs of
the EP group, R = most copies of one expert. GPU indices are positions in the simulation's
``gpus`` list; ``copies[E + 1, R]`` lists each expert's GPUs (-1 padded, the last row a
never-used sentinel), as :meth:`simulator.expert_parallel.ExpertParallel._ep_plan` builds it.

* :func:`least_loaded` sends each token's expert call to the copy on the GPU with the least
  work assigned so far in the layer (LLEP's idea), in token order.
* :func:`eplb_copies` recomputes a layer's placement from observed routing counts with the
  planner's ``eplb-global`` baseline (:func:`planner.eplb.eplb_global`, pure numpy), and
  :func:`moved_copies` lists the (expert, GPU) copies whose bytes must cross the network.
"""

from __future__ import annotations

import numpy as np

from planner.eplb import eplb_global

__all__ = ["eplb_copies", "least_loaded", "moved_copies"]


def least_loaded(cand: np.ndarray, count: np.ndarray, src: np.ndarray, real: np.ndarray, num_gpus: int) -> np.ndarray:
    """``dst [n, K]``: each real call to the copy whose GPU has the least work (token-expert
    calls) assigned so far in this layer, calls taken in token order then slot order; ties go
    to the token's own GPU, then to the lowest GPU index.

    Args:
        cand: ``[n, K, R]`` GPUs holding each call's expert (-1 padded).
        count: ``[n, K]`` copies of each call's expert (at least 1).
        src: ``[n]`` each token's GPU.
        real: ``[n, K]`` False for zero (null) experts, which go nowhere (their entry is ``src``).

    >>> cand = np.array([[[0, 1]], [[0, 1]], [[0, 1]]]); one = np.ones((3, 1), bool)
    >>> least_loaded(cand, np.full((3, 1), 2), np.array([0, 0, 0]), one, 2)[:, 0].tolist()
    [0, 1, 0]
    """
    load = [0] * num_gpus
    dst = np.repeat(src[:, None], cand.shape[1], axis=1)
    cands, counts, srcs, reals = cand.tolist(), count.tolist(), src.tolist(), real.tolist()
    for i, (s, rows, cnt, ok) in enumerate(zip(srcs, cands, counts, reals)):
        for k, (row, c, r) in enumerate(zip(rows, cnt, ok)):
            if not r:
                continue
            g = row[0] if c == 1 else min(row[:c], key=lambda h: (load[h], h != s, h))
            load[g] += 1
            dst[i, k] = g
    return dst


def eplb_copies(weight: np.ndarray, copies: np.ndarray, num_gpus: int) -> np.ndarray:
    """A layer's new ``copies[E + 1, R']`` from its routing counts ``weight [E]``.

    The layer keeps its number of physical experts (copies held on the EP GPUs, rounded up
    to a multiple of ``num_gpus`` as EPLB needs); EPLB's global policy replicates the hottest
    experts and packs the physical experts evenly over the GPUs. Two copies of one expert
    that EPLB packs on one GPU count once.
    """
    E = copies.shape[0] - 1
    slots = int((copies[:E] >= 0).sum())
    R = max(-(-slots // num_gpus) * num_gpus, -(-E // num_gpus) * num_gpus)
    phy2log = eplb_global(np.asarray(weight, np.float64)[None, :], R, 1, 1, num_gpus)[0]  # [R]
    gpu_of = np.arange(R) // (R // num_gpus)  # slot s lives on GPU s // (R / G)
    owners = [sorted(set(gpu_of[phy2log == e].tolist())) for e in range(E)]
    new = np.full((E + 1, max(len(o) for o in owners)), -1, np.int64)
    for e, own in enumerate(owners):
        new[e, :len(own)] = own
    return new


def moved_copies(old: np.ndarray, new: np.ndarray, node_of: np.ndarray) -> list[tuple[int, int, int]]:
    """``(expert, from GPU, to GPU)`` for every copy ``new`` holds that ``old`` does not; it
    comes from an old holder on the same node when there is one, else the first old holder
    (-1: none on the GPUs, it comes from the host)."""
    moves = []
    for e in range(new.shape[0] - 1):
        held = [g for g in old[e].tolist() if g >= 0]
        for g in new[e].tolist():
            if g < 0 or g in held:
                continue
            near = [h for h in held if node_of[h] == node_of[g]]
            moves.append((e, near[0] if near else held[0] if held else -1, g))
    return moves
