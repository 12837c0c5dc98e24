"""Our expert-parallel placement: ``phy2log [L, R]``, the logical expert of every physical
slot (slot s on GPU s // S), for the least all-to-all traffic at (almost) EPLB's balance.

Shape legend: L = MoE layers, E = routed experts, R = physical experts per layer, G = GPUs,
N = nodes, S = R / G slots per GPU, B = load draws.

Objective: minimise traffic (:func:`~planner.cluster.metrics.placement_metrics`) subject to
``max load <= cap[l]``, where ``cap[l]`` is EPLB global's straggler load plus
``balance_slack`` x the mean: the balance of the best-balanced baseline (almost) and the
traffic of a topology-aware one.

Solver (a decomposition, numpy only, no MILP: DeepSeek-V3 on 64 GPUs must plan in
seconds): copies per expert by EPLB's replication rule; warm start = EPLB global for every
layer (a layer where EPLB put two copies of one expert on one GPU is re-packed with one copy
per GPU: a plan cannot express the pair, and it wastes a slot); then sweeps over the layers
(forward, backward, forward, ...), each re-placing one layer given its neighbours:
(1) copies to nodes in bands of equal load rank, cheapest match first, then pairwise swaps
that lower the traffic cost under the node load cap; (2) inside each node, copies to GPUs
by balanced packing, then swaps under the GPU load cap. A layer keeps its new placement
only when it meets the cap and does not cost more traffic than before, so the result is
never worse than the warm start on either count. On a small box, where every layer's
layouts can be listed (:mod:`.exact`), the layer chain's optimum at the same caps (the
draws' included) replaces the sweeps' result when it has less traffic.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from profiles.errors import InputError
from profiles.workload.trace import Trace

from ..eplb import eplb_global, eplb_speed_aware, replicate_experts
from .exact import chain_optimum
from .metrics import distribution
from .packing import by_bands, pack, pack_drawn, swaps
from .topology import Topology
from .workload import LOAD_RESAMPLES, PRIOR_TOKENS, expected_load, sequence_loads

__all__ = ["EXPECTED_SLACK", "place_experts", "place_for"]

# Replicas are chosen against this upper quantile of each expert's load over the draws.
LOAD_QUANTILE = 0.9
# Standard deviations of a node's load over the draws that count against its load cap.
NODE_Z = 1.0
# Straggler load allowed above the warm start's (EPLB global) on the draws' average max / mean:
# wider than on the sample (0.01), since the draws' spread, not a fitted 1%, is what unseen
# tokens bring; what it buys is the cross-node cut.
EXPECTED_SLACK = 0.06


def _layer_cost(l: int, placement: np.ndarray, logcnt: np.ndarray, trans: np.ndarray, D: np.ndarray) -> np.ndarray:
    """``[E, G]`` traffic cost (link seconds) of serving all of expert e's tokens at layer l on
    GPU g, given where layers l - 1 and l + 1 are placed.

    ``placement`` is ``[L, R]`` phy2log, slot s on GPU s // S; a copy carries 1 / copies of its
    expert's pairs.
    """
    L, R = placement.shape
    G = D.shape[0]
    E = trans.shape[1]
    cost = np.zeros((E, G))
    # pairs reaching GPU h from the other layer, summed slot by slot (slots are grouped by GPU);
    # einsum, not BLAS, for [E, G] x [G, G]: small GEMMs thrash a threaded BLAS on busy cores
    if l > 0:
        row = placement[l - 1]
        pairs = trans[l - 1][row] / logcnt[l - 1, row][:, None]  # [R, E]: copy -> expert at l
        at_gpu = pairs.reshape(G, R // G, E).sum(1)  # [G, E]
        cost += np.einsum("he,hg->eg", at_gpu, D)
    if l < L - 1:
        row = placement[l + 1]
        pairs = trans[l][:, row] / logcnt[l + 1, row][None, :]  # [E, R]
        at_gpu = pairs.reshape(E, G, R // G).sum(2)  # [E, G]
        cost += np.einsum("eh,gh->eg", at_gpu, D)
    return cost


def _capped_copies(load: np.ndarray, num_physical: int, num_gpus: int) -> np.ndarray:
    """``[L, E]`` copies per expert by EPLB's rule (each extra copy to the expert with the
    largest load per copy), never more copies than GPUs: two copies on one GPU serve nothing."""
    _, _, logcnt = replicate_experts(load, num_physical)
    if logcnt.max() <= num_gpus:
        return logcnt
    L, E = load.shape
    logcnt = np.ones((L, E), np.int64)
    for _ in range(E, num_physical):
        per_copy = np.where(logcnt < num_gpus, load / logcnt, -np.inf)
        logcnt[np.arange(L), np.argmax(per_copy, axis=1)] += 1
    return logcnt


def _drawn_max_mean(samples: np.ndarray, share: np.ndarray, inv: np.ndarray) -> float:
    """Max / mean GPU time averaged over load draws ``samples [B, E]`` under ``share [E, G]``
    (``inv [G]``: time per token, 1 / speed; the mean is the balanced time, total / G)."""
    gpu = np.einsum("be,eg->bg", samples, share)  # [B, G]
    return float(((gpu * inv).max(1) / np.maximum(gpu.mean(1), 1e-12)).mean())


def _drawn_keep(samples: np.ndarray, inv: np.ndarray, robust_cap: np.ndarray):
    """A layout test for :func:`.exact.chain_optimum`: the draws' average max / mean GPU time
    within the layer's cap (as :func:`_drawn_max_mean`, for ``K`` layouts at once)."""

    def keep(l: int, share: np.ndarray) -> np.ndarray:
        gpu = np.einsum("be,keg->kbg", samples[:, l], share)  # [K, B, G]
        drawn = ((gpu * inv).max(2) / np.maximum(gpu.mean(2), 1e-12)).mean(1)  # [K]
        return drawn <= robust_cap[l] + 1e-12

    return keep


def place_experts(load: np.ndarray, trans: np.ndarray, topo: Topology, num_physical: int, *,
                  balance_slack: float = 0.01, sweeps: int = 2, time_limit_s: float = 300.0,
                  hidden_size: int = 1, max_swaps: int = 64, load_samples: np.ndarray | None = None,
                  quantile: float = LOAD_QUANTILE, speed: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Our placement (see the module docstring): ``phy2log [L, R]`` and solver facts.

    Args:
        load: ``[L, E]`` tokens per expert.
        trans: ``[L-1, E, E]`` consecutive-layer token pairs.
        topo: ranks and link costs.
        num_physical: R, a multiple of G.
        balance_slack: allowed straggler load above EPLB global's, as a fraction of the mean.
        sweeps: passes over the layers (forward, backward, ...).
        time_limit_s: wall-clock safety net: stop starting new layers after this many seconds
            (the plan stays valid, but then depends on the machine's load: ``stopped_by_time_limit``).
            The work itself is bounded by ``sweeps`` and ``max_swaps``.
        hidden_size: H, scales the link cost (the traffic objective is in link seconds).
        max_swaps: improving swaps per layer solve, between nodes and inside each node.
        load_samples: ``[B, L, E]`` draws of the load a new workload could bring (see
            :func:`expected_load`; ``load`` is then their expectation). With them, copies go
            to the experts with the largest ``quantile`` of load per copy over the draws (an
            uncertain expert gets a replica, which splits its noise over two GPUs), and a layer
            keeps a new placement only if its max / mean load averaged over the draws stays
            within ``balance_slack`` of the warm start's: balance on unseen tokens, not on the
            sample (co-locating experts that the same sequences pick would fit the sample and
            break on the next one).
        quantile: the upper quantile of the draws that replicas are chosen against.
        speed: ``[G]`` relative expert speed of every GPU (:func:`.speed.gpu_speeds`, mean 1);
            loads, caps and balance are then times (tokens / speed), the warm start is
            :func:`~planner.eplb.eplb_speed_aware`, and a node's speed is its GPUs' mean.
            ``None`` or all equal: token balance, the speed-blind placer exactly.
    """
    t0 = time.perf_counter()
    L, E = load.shape
    G, N, GN = topo.num_gpus, topo.num_nodes, topo.gpus_per_node
    S = num_physical // G
    D = topo.token_cost_s(hidden_size)  # [G, G]
    blind = speed is None or np.allclose(speed, speed[0])
    speed = np.ones(G) if blind else np.asarray(speed, float)  # [G]
    inv = 1.0 / speed  # [G] time per token
    node_speed = speed.reshape(N, GN).mean(1)  # [N]
    warm = eplb_global(load, num_physical, 1, 1, G) if blind else eplb_speed_aware(load, num_physical, G, speed)
    # EPLB's rule, at most one copy per GPU; against an upper quantile of the load when known
    upper = load if load_samples is None else np.quantile(load_samples, quantile, axis=0)  # [L, E]
    logcnt = _capped_copies(upper, num_physical, G)
    for l in range(L):
        # EPLB may give an expert more copies than there are GPUs, or pack two copies of one
        # expert on one GPU; a plan cannot say that (and it wastes a slot): re-pack such a
        # layer with one copy per GPU
        row = warm[l]
        if len({(s // S, e) for s, e in enumerate(row.tolist())}) < num_physical or \
                not np.array_equal(np.bincount(row, minlength=E), logcnt[l]):
            expert = np.repeat(np.arange(E), logcnt[l])
            gpu = pack(load[l, expert] / logcnt[l, expert], expert, G, S, None if blind else speed)
            warm[l] = np.concatenate([np.sort(expert[gpu == g]) for g in range(G)])
    P = distribution(warm, E, G)  # [L, E, G]
    gpu_load = np.einsum("le,leg->lg", load, P)
    mean = gpu_load.mean(axis=1)  # [L] the balanced time (tokens / G at mean speed 1)
    cap = (gpu_load * inv).max(axis=1) + balance_slack * mean  # [L] a GPU's time
    if load_samples is not None:  # the same cap, on the draws' average max / mean
        robust_cap = np.array([_drawn_max_mean(load_samples[:, l], P[l], inv) for l in range(L)]) + balance_slack
    placement = warm.copy()
    improved = tried = 0
    stopped = False
    node_gpus = [np.arange(n * GN, (n + 1) * GN) for n in range(N)]
    for sweep in range(sweeps):
        order = range(L) if sweep % 2 == 0 else range(L - 1, -1, -1)
        for l in order:
            if time.perf_counter() - t0 > time_limit_s:
                stopped = True
                break
            tried += 1
            expert = np.repeat(np.arange(E), logcnt[l])  # [R] items: copies
            weight = load[l, expert] / logcnt[l, expert]
            if load_samples is not None:
                drawn = (load_samples[:, l, expert] / logcnt[l, expert]).T  # [R, B]
            cost_e = _layer_cost(l, placement, logcnt, trans, D)  # [E, G], independent of layer l's own placement
            cost_g = cost_e[expert] / logcnt[l, expert][:, None]  # [R, G]
            best = None
            for tighten in (0.5, 0.0):
                cap_n = GN * mean[l] * (1.0 + max(cap[l] / max(mean[l], 1e-12) - 1.0, 0.0) * tighten)
                cost_n = cost_g.reshape(len(expert), N, GN).mean(-1)  # [R, N]
                node = by_bands(cost_n, weight, N)
                if load_samples is None:
                    node = swaps(cost_n, weight, expert, node, N, cap_n, False, max_swaps, speed=None if blind else node_speed)
                else:  # the cap on mean + z sd of a node's load over the draws, z sd as the warm start's worst node
                    dev = drawn - drawn.mean(1, keepdims=True)  # [R, B]
                    warm_node = topo.node_of[np.argsort(warm[l], kind="stable") // S]  # [R] items, by expert
                    warm_sd = np.sqrt([(dev[warm_node == n].sum(0) ** 2).mean() for n in range(N)]) / node_speed
                    node = swaps(cost_n, weight, expert, node, N, cap_n + NODE_Z * warm_sd.max(), False, max_swaps,
                                 dev=dev, z=NODE_Z, speed=None if blind else node_speed)
                gpu = np.empty(len(expert), np.int64)
                for n in range(N):
                    items = np.flatnonzero(node == n)
                    sub_cost = cost_g[np.ix_(items, node_gpus[n])]
                    sp = None if blind else speed[node_gpus[n]]
                    if load_samples is None:
                        start = pack(weight[items], expert[items], GN, S, sp)
                        local = swaps(sub_cost, weight[items], expert[items], start, GN, cap[l], True, max_swaps,
                                      speed=sp)
                    else:  # inside a node the link is fast: balance on the draws, not the sample
                        local = pack_drawn(drawn[items], expert[items], GN, S, max_swaps, sp)
                    gpu[items] = node_gpus[n][local]
                gl = np.bincount(gpu, weights=weight, minlength=G) * inv
                dup = len(set(zip(gpu.tolist(), expert.tolist()))) < len(expert)
                if gl.max() <= cap[l] + 1e-9 and not dup:
                    best = gpu
                    break
            if best is None:
                continue
            row = np.concatenate([np.sort(expert[best == g]) for g in range(G)])
            new_share = distribution(row[None, :], E, G)[0]  # [E, G]
            if load_samples is not None and _drawn_max_mean(load_samples[:, l], new_share, inv) > robust_cap[l] + 1e-12:
                continue
            if (cost_e * new_share).sum() <= (cost_e * P[l]).sum() + 1e-15:
                placement[l] = row
                P[l] = new_share
                improved += 1
        if stopped:
            break
    # a small box: every layout of every layer can be listed, so take the chain's optimum
    # (at the same caps, the draws' included) when it beats the sweeps
    keep = None if load_samples is None else _drawn_keep(load_samples, inv, robust_cap)
    exact = None if stopped else chain_optimum(logcnt, load, trans, D, cap, None if blind else speed, keep=keep)
    if exact is not None:
        current = sum(float(np.einsum("ig,ij,gh,jh->", P[l], trans[l], D, P[l + 1])) for l in range(L - 1))
        if exact[0] < current * (1 - 1e-12):
            placement, improved = exact[1], improved + 1
    info = {"warm_start": "eplb-global" if blind else "eplb-speed", "sweeps": sweeps, "layer_solves": tried, "layers_improved": improved,
            "stopped_by_time_limit": stopped, "balance_slack": balance_slack, "exact_chain": exact is not None,
            "solve_s": time.perf_counter() - t0, "_cap": cap, "_load": load}  # the bound's (assemble pops them)
    return placement, info


def place_for(plan_for: str, trace: Trace, load: np.ndarray, trans: np.ndarray, topo: Topology, num_physical: int, *,
              balance_slack: float | None = None, seed: int = 0, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`place_experts` for the trace's expected load (``plan_for="expected"``) or its
    sample counts (``"sample"``); ``load``, ``trans``: :func:`.workload.workload_arrays` of ``trace``."""
    if plan_for == "sample":
        slack = 0.01 if balance_slack is None else balance_slack
        placement, info = place_experts(load, trans, topo, num_physical, balance_slack=slack, **kwargs)
        return placement, info | {"plan_for": "sample"}
    if plan_for != "expected":
        raise InputError("unknown load to plan for", key="plan_for", value=plan_for, expected="expected or sample")
    slack = EXPECTED_SLACK if balance_slack is None else balance_slack
    expected, draws = expected_load(sequence_loads(trace, load.shape[1]), seed=seed)
    placement, info = place_experts(expected, trans, topo, num_physical, balance_slack=slack, load_samples=draws,
                                    **kwargs)
    return placement, info | {"plan_for": "expected", "load_resamples": LOAD_RESAMPLES,
                              "prior_tokens": PRIOR_TOKENS, "replica_quantile": LOAD_QUANTILE, "node_z": NODE_Z}
