"""What a placement costs: straggler load per GPU and all-to-all traffic between layers.

Shape legend: L = MoE layers, E = routed experts, R = physical experts per layer,
G = GPUs (EP ranks), N = nodes, T = tokens, K = top-k.

A replicated expert's tokens split evenly over its copies (what SGLang and vLLM dispatch
do), so ``P[l, e, g]`` = copies of e on g / copies of e; ``load[l, g] = sum_e w[l, e]
P[l, e, g]``; traffic ``sum_l sum_ij C[l, i, j] P[l, i]^T D P[l + 1, j]`` (link seconds).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .topology import Topology

__all__ = ["distribution", "node_share", "placement_metrics"]


def distribution(phy2log: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    """``[L, E, G]`` share of each expert's tokens processed on each GPU (even split over copies;
    a slot holding -1 is empty: :mod:`.slots`)."""
    L, R = phy2log.shape
    S = R // num_gpus
    gpu_of_slot = np.broadcast_to(np.arange(R) // S, (L, R))
    layer = np.broadcast_to(np.arange(L)[:, None], (L, R))
    used = phy2log >= 0
    counts = np.zeros((L, num_experts, num_gpus))
    np.add.at(counts, (layer[used], phy2log[used], gpu_of_slot[used]), 1.0)
    return counts / counts.sum(-1, keepdims=True)


def node_share(P: np.ndarray, topo: Topology) -> np.ndarray:
    """``[..., E, N]`` from ``[..., E, G]``."""
    return P.reshape(*P.shape[:-1], topo.num_nodes, topo.gpus_per_node).sum(-1)


def placement_metrics(phy2log: np.ndarray, load: np.ndarray, trans: np.ndarray, topo: Topology,
                      hidden_size: int, num_tokens: int, expert_ids: np.ndarray | None = None,
                      speed: np.ndarray | None = None) -> dict[str, Any]:
    """Straggler load and traffic of a placement.

    Args:
        phy2log: ``[L, R]`` logical expert of every physical slot (slot s on GPU s // S).
        load: ``[L, E]`` tokens per expert.
        trans: ``[L-1, E, E]`` consecutive-layer token pairs.
        topo: the cluster's ranks and link costs.
        hidden_size: H (one token's hidden state is H x 2 bytes on the wire).
        num_tokens: T, tokens of the workload (for the traffic per token).
        expert_ids: ``[T, L, K]`` the trace's routing, for ``nodes_per_token`` (optional).
        speed: ``[G]`` relative GPU speeds (mean 1): ``max_mean`` is then of GPU *time*,
            ``max_g load / speed`` over the balanced ``sum_g load / G``.

    Returns:
        ``max_mean`` ``[L]`` (max / mean per-GPU load), ``max_mean_avg``, ``max_mean_worst``,
        ``cross_gpu_fraction``, ``cross_node_fraction`` (of all consecutive-layer token
        pairs), ``traffic_s_per_token`` (link seconds per token over all layer pairs), and
        with ``expert_ids`` ``nodes_per_token``: the expected number of nodes one token's
        experts of one layer sit on (its dispatch fan-out, what group-limited routing bounds).
    """
    L, E = load.shape
    P = distribution(phy2log, E, topo.num_gpus)  # [L, E, G]
    gpu_load = np.einsum("le,leg->lg", load, P)  # [L, G]
    mean = gpu_load.mean(axis=1)
    gpu_time = gpu_load if speed is None else gpu_load / np.asarray(speed, float)[None, :]  # [L, G]
    max_mean = np.divide(gpu_time.max(axis=1), mean, out=np.ones(L), where=mean > 0)
    PN = node_share(P, topo)  # [L, E, N]
    D = topo.token_cost_s(hidden_size)  # [G, G] seconds per token
    total = same_gpu = same_node = link_s = 0.0
    for l in range(L - 1):
        C = trans[l]
        CP = C @ P[l + 1]  # [E, G]
        total += C.sum()
        same_gpu += float((CP * P[l]).sum())
        same_node += float(((C @ PN[l + 1]) * PN[l]).sum())
        link_s += float((np.einsum("eg,hg->eh", CP, D) * P[l]).sum())
    fan_out = None
    if expert_ids is not None:
        fan = 0.0
        for l in range(L):
            ids = np.asarray(expert_ids[:, l, :], np.int64)  # [T, K]
            share = np.where((ids < E)[..., None], PN[l][np.minimum(ids, E - 1)], 0.0)  # [T, K, N]
            fan += float((1.0 - np.prod(1.0 - share, axis=1)).sum(-1).mean())
        fan_out = fan / L
    return {
        "max_mean": max_mean,
        "nodes_per_token": fan_out,
        "max_mean_avg": float(max_mean.mean()),
        "max_mean_worst": float(max_mean.max()),
        "cross_gpu_fraction": 1.0 - same_gpu / total if total else 0.0,
        "cross_node_fraction": 1.0 - same_node / total if total else 0.0,
        "traffic_s_per_token": link_s / max(num_tokens, 1),
    }

