"""DeepSeek EPLB (expert-parallel load balancer) in numpy, and vLLM's static placements.

Shape legend: L = MoE layers, E = logical (routed) experts, R = physical experts (E plus
the redundant copies), G = GPUs (EP ranks), N = nodes, X = most copies of one expert.

Physical slot ``s`` lives on GPU ``s // (R / G)``; GPU ``g`` of node ``n`` is global GPU
``n * (G / N) + g``. Re-implemented from the public description of DeepSeek's ``eplb.py``
(see ../shared/REFERENCE.md, "DeepSeek EPLB"): its published example gives exactly the
published ``phy2log`` (tests/test_eplb.py).

    phy2log, log2phy, logcnt = rebalance_experts(weight, 16, 4, 2, 8)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from profiles.errors import InputError

__all__ = [
    "PLACEMENTS",
    "balanced_packing",
    "eplb_global",
    "eplb_hierarchical",
    "eplb_speed_aware",
    "linear_placement",
    "rebalance_experts",
    "replicate_experts",
    "round_robin_placement",
]


def _check(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] < 1:
        raise InputError("expert load must be a 2-D array", key="weight", value=w.shape, expected="[layers, experts]")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise InputError("expert load must be finite and non-negative", key="weight",
                         fix="pass token counts or frequencies")
    E = w.shape[1]
    for key, value in (("num_replicas", num_replicas), ("num_groups", num_groups), ("num_nodes", num_nodes),
                       ("num_gpus", num_gpus)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError("must be a positive integer", key=key, value=value)
    if num_replicas < E:
        raise InputError("fewer physical than logical experts", key="num_replicas", value=num_replicas,
                         expected=f">= {E}", fix="count every expert once plus its redundant copies")
    if num_replicas % num_gpus:
        raise InputError("physical experts must divide evenly over the GPUs", key="num_replicas", value=num_replicas,
                         expected=f"a multiple of {num_gpus} GPUs",
                         fix=f"use {-(-num_replicas // num_gpus) * num_gpus} physical experts")
    if num_gpus % num_nodes:
        raise InputError("GPUs must divide evenly over the nodes", key="num_gpus", value=num_gpus,
                         expected=f"a multiple of {num_nodes} nodes")
    return w


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``n`` weighted items into ``num_packs`` packs of ``n / num_packs`` items each,
    heaviest item first into the lightest pack that still has room (lowest index on ties).

    Args:
        weight: ``[X, n]`` item weights, one packing per row.
        num_packs: packs; must divide ``n``.

    Returns:
        ``(pack_index, rank_in_pack)``, both ``[X, n]`` int64.
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        idx = np.broadcast_to(np.arange(n), (rows, n)).copy()
        return idx, np.zeros((rows, n), np.int64)
    pack_index = np.full((rows, n), -1, np.int64)
    rank_in_pack = np.full((rows, n), -1, np.int64)
    for i in range(rows):
        load = np.zeros(num_packs)
        items = np.zeros(num_packs, np.int64)
        for item in np.argsort(-weight[i], kind="stable"):
            open_load = np.where(items < per_pack, load, np.inf)
            pack = int(np.argmin(open_load))
            pack_index[i, item] = pack
            rank_in_pack[i, item] = items[pack]
            load[pack] += weight[i, item]
            items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add ``num_physical - n`` redundant copies, each to the expert whose load per copy is
    then the largest (lowest id on ties).

    Args:
        weight: ``[X, n]`` load per logical expert.
        num_physical: physical experts per row (``>= n``).

    Returns:
        ``(phy2log [X, num_physical], rank [X, num_physical], logcnt [X, n])``: the logical
        expert of each physical one, which copy of it this is, and copies per logical expert.
    """
    rows, n = weight.shape
    phy2log = np.broadcast_to(np.arange(num_physical) % max(n, 1), (rows, num_physical)).copy()
    rank = np.zeros((rows, num_physical), np.int64)
    logcnt = np.ones((rows, n), np.int64)
    arange = np.arange(rows)
    for i in range(n, num_physical):
        hottest = np.argmax(weight / logcnt, axis=1)
        phy2log[:, i] = hottest
        rank[:, i] = logcnt[arange, hottest]
        logcnt[arange, hottest] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    L, E = weight.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    phy_per_gpu = num_physical // num_gpus

    # 1. pack expert groups onto nodes (heaviest group first, equal group counts per node);
    #    "mlog" numbers the logical experts node by node
    tokens_per_group = weight.reshape(L, num_groups, group_size).sum(-1)  # [L, groups]
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(L, E)  # [L, E]
    mlog2log = _inverse(log2mlog)

    # 2. replicate inside each node: the expert with the largest load per copy gets the next copy
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, -1).reshape(L * num_nodes, E // num_nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical // num_nodes)

    # 3. pack each node's physical experts onto its GPUs (equal counts per GPU)
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, -1)
    pack_index, rank_in_pack = balanced_packing(tokens_per_phy, num_gpus // num_nodes)
    phy2pphy = pack_index * phy_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, -1)  # [L*N, R/N]
    pphy2mlog = (pphy2mlog.reshape(L, num_nodes, -1)
                 + np.arange(0, E, E // num_nodes).reshape(1, -1, 1)).reshape(L, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, -1)  # [L, R]
    pphyrank = np.take_along_axis(phyrank, pphy2phy, -1).reshape(L, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, -1)  # [L, E]
    return pphy2log, pphyrank, logcnt


def rebalance_experts(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSeek EPLB: replicate and place experts so that every GPU gets a similar load.

    Hierarchical when ``num_groups % num_nodes == 0`` (expert groups packed onto nodes, so
    group-limited routing keeps a token's experts on few nodes), else global (one group, one
    node).

    Args:
        weight: ``[L, E]`` load of every logical expert (token counts or frequencies).
        num_replicas: R, physical experts per layer (E plus the redundant ones); a multiple of G.
        num_groups: expert groups (DeepSeek ``n_group``; E must divide by it for the
            hierarchical policy).
        num_nodes: N, server nodes.
        num_gpus: G, GPUs in all; a multiple of N.

    Returns:
        ``phy2log [L, R]``: logical expert of each physical slot; ``log2phy [L, E, X]``:
        physical slots of each logical expert, padded with -1; ``logcnt [L, E]``: copies.
    """
    w = _check(weight, num_replicas, num_groups, num_nodes, num_gpus)
    L, E = w.shape
    if num_groups % num_nodes == 0 and E % num_groups == 0:
        phy2log, phyrank, logcnt = _hierarchical(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = _hierarchical(w, num_replicas, 1, 1, num_gpus)
    max_copies = int(logcnt.max())
    log2phy = np.full((L, E * max_copies), -1, np.int64)
    np.put_along_axis(log2phy, phy2log * max_copies + phyrank,
                      np.broadcast_to(np.arange(num_replicas), (L, num_replicas)), axis=1)
    return phy2log, log2phy.reshape(L, E, max_copies), logcnt


# --------------------------------------------------------------------------- placements
# Every placement takes (weight [L, E], R, n_group, N, G) and returns phy2log [L, R].


def eplb_global(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """EPLB's global policy (one group, one node): the best balance, blind to topology."""
    return rebalance_experts(weight, num_replicas, 1, 1, num_gpus)[0]


def eplb_hierarchical(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> np.ndarray:
    """EPLB's hierarchical policy: groups packed onto nodes, replicas kept inside a node.

    Falls back to the global policy where the groups do not divide over the nodes (as EPLB does).
    """
    return rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)[0]


def eplb_speed_aware(weight: np.ndarray, num_replicas: int, num_gpus: int, speed: np.ndarray) -> np.ndarray:
    """EPLB global for GPUs of different speeds: the same copies (:func:`replicate_experts`),
    then every copy, heaviest first, to the GPU with room (and no copy of its expert yet)
    whose *time* ``(load + w) / speed`` is then the least, so a faster GPU takes more tokens.

    Args:
        weight: ``[L, E]`` load of every logical expert.
        num_replicas: R, a multiple of G.
        num_gpus: G.
        speed: ``[G]`` relative tokens per second of every GPU (:func:`planner.cluster.gpu_speeds`).

    Returns:
        ``phy2log [L, R]``, slots of GPU g at ``g * R / G ...``, experts sorted within a GPU.
    """
    w = _check(weight, num_replicas, 1, 1, num_gpus)
    speed = np.asarray(speed, dtype=np.float64)
    if speed.shape != (num_gpus,) or not np.all(np.isfinite(speed)) or (speed <= 0).any():
        raise InputError("GPU speeds must be positive, one per GPU", key="speed", value=speed.shape,
                         expected=f"[{num_gpus}] positive numbers")
    L, E = w.shape
    per_gpu = num_replicas // num_gpus
    phy2log, _, logcnt = replicate_experts(w, num_replicas)
    out = np.empty((L, num_replicas), np.int64)
    for l in range(L):
        items = phy2log[l]
        size = w[l, items] / logcnt[l, items]  # [R] tokens per copy
        load = np.zeros(num_gpus)
        count = np.zeros(num_gpus, np.int64)
        held = np.zeros((num_gpus, E), bool)
        gpu = np.empty(num_replicas, np.int64)
        for m in np.argsort(-size, kind="stable"):
            full = count >= per_gpu
            bad = full | held[:, items[m]]
            if bad.all():  # more copies than GPUs with room: share one (EPLB would too)
                bad = full
            b = int(np.argmin(np.where(bad, np.inf, (load + size[m]) / speed)))
            gpu[m] = b
            load[b] += size[m]
            count[b] += 1
            held[b, items[m]] = True
        out[l] = np.concatenate([np.sort(items[gpu == g]) for g in range(num_gpus)])
    return out


def linear_placement(weight: np.ndarray, num_replicas: int, num_groups: int = 1, num_nodes: int = 1,
                     num_gpus: int = 1) -> np.ndarray:
    """vLLM ``--expert-placement-strategy linear``: experts in id order, GPU ``g`` holds a
    contiguous block; redundant slots hold experts ``0, 1, ...`` again (vLLM's initial
    EPLB layout)."""
    w = _check(weight, num_replicas, 1, 1, num_gpus)
    L, E = w.shape
    return np.broadcast_to(np.arange(num_replicas) % E, (L, num_replicas)).copy()


def round_robin_placement(weight: np.ndarray, num_replicas: int, num_groups: int = 1, num_nodes: int = 1,
                          num_gpus: int = 1) -> np.ndarray:
    """vLLM ``--expert-placement-strategy round_robin``: the linear order dealt out over the
    GPUs, so GPU ``g`` holds experts ``g, g + G, g + 2G, ...``."""
    linear = linear_placement(weight, num_replicas, num_groups, num_nodes, num_gpus)
    per_gpu = num_replicas // num_gpus
    # slot s of GPU g holds the (s * G + g)-th physical expert of the linear order
    order = (np.arange(per_gpu)[None, :] * num_gpus + np.arange(num_gpus)[:, None]).reshape(-1)
    return linear[:, order]


PLACEMENTS: dict[str, Callable[..., np.ndarray]] = {}


def _register(name: str, fn: Callable[..., np.ndarray]) -> None:
    if name in PLACEMENTS:
        raise ValueError(f"placement {name!r} registered twice")
    PLACEMENTS[name] = fn


_register("eplb-global", eplb_global)
_register("eplb-hierarchical", eplb_hierarchical)
_register("linear", linear_placement)
_register("round-robin", round_robin_placement)
