"""Expert-parallel cluster planning: which GPU owns which expert, which experts get
replicas, and what the layout costs in straggler load and all-to-all traffic.

Shape legend: L = MoE layers, E = routed experts, R = physical experts per layer (E plus
the redundant copies), G = GPUs (EP ranks), N = nodes, S = R / G slots per GPU,
T = tokens, K = top-k.

Model (per MoE layer l):

* sets: experts e, GPUs g (ranks in natural order of their ids, node by node), nodes n;
* parameters: load ``w[l, e]`` (tokens routed to e), transitions ``C[l, i, j]`` (token
  pairs that pick i at layer l and j at l + 1, all K x K rank pairs; ExFlow / MoETuner),
  link cost ``D[g, h]`` = seconds to move one token's hidden state (H x 2 bytes) over the
  bottleneck of the hardware route from g to h (0 on one GPU; NVLink inside a node,
  InfiniBand across nodes);
* decisions: copies ``c[l, e] >= 1`` with ``sum_e c = R``; the GPU of every copy, S per GPU,
  no two copies of one expert on one GPU. A replicated expert's tokens split evenly over
  its copies (what SGLang and vLLM dispatch do), so ``P[l, e, g]`` = copies of e on g / c;
* load: ``load[l, g] = sum_e w[l, e] P[l, e, g]``; straggler ``max_g load[l, g]``;
* traffic: ``sum_l sum_ij C[l, i, j] P[l, i]^T D P[l + 1, j]`` (link seconds), and the
  fractions of token pairs whose consecutive experts sit on another GPU / another node;
* memory: S x L experts + dense weights + KV cache per GPU within its HBM.

Objective: minimise traffic subject to ``max load <= cap[l]``, where ``cap[l]`` is EPLB
global's straggler load plus ``balance_slack`` x the mean: the balance of the best-balanced
baseline (almost) and the traffic of a topology-aware one.

Solver (a decomposition, numpy only, no MILP: DeepSeek-V3 on 64 GPUs must plan in
seconds): copies per expert by EPLB's replication rule; warm start = EPLB global for every
layer (a layer where EPLB put two copies of one expert on one GPU is re-packed with one copy
per GPU: a plan cannot express the pair, and it wastes a slot); then sweeps over the layers (forward, backward, forward, ...), each re-placing one
layer given its neighbours: (1) copies to nodes, greedy by regret under slot and load caps,
then pairwise swaps that lower the traffic cost; (2) inside each node, copies to GPUs by
balanced packing, then swaps under the GPU load cap. A layer keeps its new placement only
when it meets the cap and does not cost more traffic than before, so the result is never
worse than the warm start on either count.

Group-limited routing (DeepSeek ``n_group`` / ``topk_group``): a token's experts come from
at most ``topk_group`` groups. :func:`group_limited` imposes that on a workload that lacks
it (the synthetic default workloads do; a recorded trace already obeys it and is left
unchanged); EPLB's hierarchical policy is the baseline built for it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from profiles.errors import InfeasibleError, InputError
from profiles.hardware import Hardware, load_profile
from profiles.models import ModelSpec, load_model
from profiles.workload.stats import expert_frequency, transition_counts
from profiles.workload.trace import Trace

from .eplb import PLACEMENTS, eplb_global, replicate_experts
from .plan import Inputs, LayerPlan, MemoryUse, Plan, SolverInfo, digest, workload_digest

__all__ = [
    "METHODS",
    "PARALLEL_MODES",
    "ClusterRequest",
    "ClusterResult",
    "Topology",
    "cluster_applies",
    "cluster_summary",
    "default_redundant",
    "expected_load",
    "group_limited",
    "place_experts",
    "place_for",
    "placement_metrics",
    "plan_cluster",
    "plan_from_placement",
    "render_cluster",
    "sequence_loads",
    "run_cluster_cli",
    "topology",
    "workload_arrays",
]

PARALLEL_MODES = ("auto", "ep", "offload")
METHODS = ("ours", *PLACEMENTS)
# Activations travel between GPUs in bf16: 2 bytes per hidden element.
ACTIVATION_BYTES = 2
# Weight of plain popularity against the previous layer's transitions in a group-limited redraw.
_REDRAW_SMOOTHING = 0.05
# Default redundancy: at least E / 8 extra physical experts (DeepSeek-V3 serves 256 experts
# with 32 redundant ones on 32 prefill GPUs), rounded up so that E + R divides over the GPUs.
REDUNDANT_FRACTION = 1 / 8
# Expected load (planning for unseen tokens, not the sample): bootstrap draws of the sequences,
# a Dirichlet prior of this many pseudo-tokens per layer spread over the experts, and replicas
# chosen against this upper quantile of each expert's load over the draws.
LOAD_RESAMPLES = 32
PRIOR_TOKENS = 256.0
LOAD_QUANTILE = 0.9
# Standard deviations of a node's load over the draws that count against its load cap.
NODE_Z = 1.0
# Straggler load allowed above the warm start's (EPLB global) on the draws' average max / mean:
# wider than on the sample (0.01), since the draws' spread, not a fitted 1%, is what unseen
# tokens bring; what it buys is the cross-node cut.
EXPECTED_SLACK = 0.06


# --------------------------------------------------------------------------- topology


def _natural_key(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


@dataclass(frozen=True, eq=False)
class Topology:
    """The GPUs of a cluster as EP ranks.

    Attributes:
        gpus: ``[G]`` GPU memory ids in rank order (natural order: ``node2`` before ``node10``).
        node_of: ``[G]`` node index of every rank.
        nodes: node names, in order.
        cost_s_per_byte: ``[G, G]`` 1 / bottleneck bandwidth of the route between two GPUs (0 on the diagonal).
        link_kinds: ``[G, G]`` the slowest link kind on each route (``""`` on the diagonal).
    """

    gpus: tuple[str, ...]
    node_of: np.ndarray
    nodes: tuple[str, ...]
    cost_s_per_byte: np.ndarray
    link_kinds: np.ndarray

    @property
    def num_gpus(self) -> int:
        return len(self.gpus)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes


def topology(hw: Hardware) -> Topology:
    """EP ranks of ``hw``'s GPUs and the link cost between every two of them.

    Raises:
        InputError: no GPU, or nodes with different GPU counts (EP needs equal ranks per node).
    """
    gpus = sorted({hw.memory_of(d.id).id for d in hw.devices_of_kind("gpu")}, key=_natural_key)
    if not gpus:
        raise InputError("expert parallelism needs GPUs; the profile has none", value=hw.name,
                         fix="use a profile with GPUs, or --parallel offload")
    node_names = sorted({hw.devices[g].node for g in gpus}, key=_natural_key)
    node_of = np.array([node_names.index(hw.devices[g].node) for g in gpus])
    per_node = np.bincount(node_of)
    if len(set(per_node.tolist())) != 1:
        raise InputError("nodes hold different numbers of GPUs", value=dict(zip(node_names, per_node.tolist())),
                         expected="the same GPU count on every node (EP ranks per node)",
                         fix="plan the equal nodes only, or use --parallel offload")
    gpus = sorted(gpus, key=lambda g: (node_of[gpus.index(g)], _natural_key(g)))
    node_of = np.array([node_names.index(hw.devices[g].node) for g in gpus])
    G = len(gpus)
    cost = np.zeros((G, G))
    kinds = np.full((G, G), "", dtype=object)
    for a in range(G):
        for b in range(a + 1, G):
            route = hw.route(gpus[a], gpus[b])
            cost[a, b] = cost[b, a] = 1.0 / route.bottleneck_bytes_per_s
            slow = min(route.links, key=lambda link: link.bytes_per_s).kind if route.links else ""
            kinds[a, b] = kinds[b, a] = slow
    return Topology(gpus=tuple(gpus), node_of=node_of, nodes=tuple(node_names), cost_s_per_byte=cost,
                    link_kinds=kinds)


def default_redundant(num_experts: int, num_gpus: int) -> int:
    """Smallest R - E >= E / 8 with E + (R - E) a multiple of the GPU count."""
    r = math.ceil(num_experts * REDUNDANT_FRACTION)
    return r + (-(num_experts + r)) % num_gpus


def _check_redundant(redundant: int, num_experts: int, num_gpus: int) -> None:
    if redundant < 0 or (num_experts + redundant) % num_gpus:
        lo = redundant - (num_experts + redundant) % num_gpus
        options = sorted({x for x in (lo, lo + num_gpus) if x >= 0})
        raise InputError("experts plus redundant experts must divide evenly over the GPUs", key="--redundant-experts",
                         value=redundant, expected=f"E + R a multiple of {num_gpus} GPUs (E = {num_experts})",
                         fix="use " + " or ".join(str(x) for x in options))


# --------------------------------------------------------------------------- workload


def group_limited(trace: Trace, n_group: int, topk_group: int, *, num_experts: int | None = None,
                  seed: int = 0) -> Trace:
    """``trace`` with DeepSeek group-limited routing imposed: per token and layer, only the
    ``topk_group`` groups with the largest sum of their top-2 gate weights keep their
    experts; a choice in any other group is redrawn from the kept groups, in proportion to
    how often the token's (limited) experts at the previous layer are followed by it in the
    original trace (plus a little popularity), so the redraw keeps the inter-layer affinity
    a router's scores would have.

    Groups are contiguous id ranges of ``E / n_group`` experts (DeepSeek's layout). A token
    already within ``topk_group`` groups keeps all its choices, so a trace recorded from a
    group-limited model is returned unchanged. Ids ``>= num_experts`` (zero-computation
    experts) are left alone.
    """
    E = trace.num_experts if num_experts is None else int(num_experts)
    if n_group <= 1 or topk_group >= n_group or E % n_group:
        return trace
    gs = E // n_group
    ids = trace.expert_ids.astype(np.int64).copy()  # [T, L, K]
    T, L, K = ids.shape
    if topk_group * gs < K:
        return trace
    gates = (trace.gate_weights.astype(np.float64) if trace.gate_weights is not None
             else np.broadcast_to(1.0 / (1.0 + np.arange(K)), ids.shape))
    freq = expert_frequency(ids, trace.num_experts)[:, :E].astype(float)  # [L, E]
    after = np.zeros((max(L - 1, 0), E + 1, E), np.float32)  # [L-1, E + 1, E], before the limit; row E: zero experts
    after[:, :E, :] = transition_counts(ids, trace.num_experts)[:, :E, :E]
    rng = np.random.default_rng(seed)
    rows = np.arange(T)[:, None]
    before = np.tril(np.ones((K, K), bool), -1)  # [k, j]: j ranks before k
    changed = 0
    for l in range(L):
        idl, g = ids[:, l, :], gates[:, l, :]  # [T, K]
        real = idl < E
        grp = np.where(real, idl // gs, n_group)  # zero experts: a dummy group
        # gates are stored in descending order, so a group's first two entries are its top-2
        same = grp[:, :, None] == grp[:, None, :]  # [T, k, j]
        occurrence = (same & before[None]).sum(-1)  # [T, K]
        score = np.zeros((T, n_group + 1))
        np.add.at(score, (np.broadcast_to(rows, grp.shape), grp), np.where(occurrence < 2, g, 0.0))
        score[:, n_group] = -np.inf
        keep_rank = np.argsort(-score[:, :n_group], axis=1, kind="stable")[:, :topk_group]  # [T, topk_group]
        kept = np.zeros((T, n_group + 1), bool)
        kept[rows, keep_rank] = True
        kept[:, n_group] = True
        drop = real & ~kept[rows, grp]  # [T, K]
        if not drop.any():
            continue
        need = np.flatnonzero(drop.any(axis=1))  # tokens with a choice to redraw
        sub_ids, sub_drop = idl[need], drop[need]
        allowed = kept[need][:, np.arange(E) // gs]  # [T', E]
        sub_rows = np.broadcast_to(np.arange(len(need))[:, None], sub_ids.shape)
        allowed[sub_rows[sub_ids < E], sub_ids[sub_ids < E]] = False
        share = np.broadcast_to(freq[l] / max(freq[l].sum(), 1.0), (len(need), E))
        if l > 0:
            # follow the token's experts at the previous layer, as its router scores would
            prev = np.minimum(ids[need, l - 1, :], E)  # [T', K], already group-limited; E: a zero expert
            follow = np.zeros((len(need), E), np.float32)  # [T', E]
            for k in range(K):
                follow += after[l - 1][prev[:, k]]
            total = follow.sum(1, keepdims=True)
            share = np.divide(follow, total, out=np.zeros_like(follow), where=total > 0) + _REDRAW_SMOOTHING * share
        u = rng.random((len(need), E), dtype=np.float32)
        key = np.log(share.astype(np.float32) + 1e-12) - np.log(-np.log(np.maximum(u, 1e-30)))  # Gumbel race
        key[~allowed] = -np.inf
        top = np.argpartition(-key, K - 1, axis=1)[:, :K]  # K best keys, unordered
        pick = np.take_along_axis(top, np.argsort(-np.take_along_axis(key, top, 1), axis=1, kind="stable"), 1)
        nth = np.cumsum(sub_drop, axis=1) - 1
        sub_ids[sub_drop] = pick[sub_rows[sub_drop], nth[sub_drop]]
        idl[need] = sub_ids
        changed += int(drop.sum())
    meta = dict(trace.meta)
    meta["group_limited"] = {"n_group": n_group, "topk_group": topk_group, "redrawn_choices": changed, "seed": seed}
    return Trace(expert_ids=ids.astype(trace.expert_ids.dtype), seq_lens=trace.seq_lens, phase=trace.phase,
                 num_experts=trace.num_experts, layer_map=trace.layer_map, gate_weights=trace.gate_weights,
                 model=trace.model, source=f"{trace.source} (group-limited: {topk_group} of {n_group} groups)",
                 meta=meta)


def workload_arrays(trace: Trace, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """``(load [L, E], transitions [L-1, E, E])`` as float token counts, routed experts only."""
    E_all = trace.num_experts
    load = expert_frequency(trace.expert_ids, E_all)[:, :num_experts].astype(float)
    trans = transition_counts(trace.expert_ids, E_all)[:, :num_experts, :num_experts].astype(float)
    return load, trans


def sequence_loads(trace: Trace, num_experts: int) -> np.ndarray:
    """``[S, L, E]`` tokens per expert of every sequence (routed experts only): the unit a
    bootstrap resamples, since one sequence's tokens pick the same experts again and again."""
    ids = np.asarray(trace.expert_ids, np.int64)  # [T, L, K]
    T, L, K = ids.shape
    S = len(trace.seq_lens)
    seq = np.repeat(np.arange(S), trace.seq_lens)  # [T]
    flat = (seq[:, None, None] * L + np.arange(L)[None, :, None]) * (num_experts + 1) + np.minimum(ids, num_experts)
    counts = np.bincount(flat.ravel(), minlength=S * L * (num_experts + 1)).reshape(S, L, num_experts + 1)
    return counts[..., :num_experts].astype(float)


def expected_load(seq_load: np.ndarray, *, resamples: int = LOAD_RESAMPLES, prior_tokens: float = PRIOR_TOKENS,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The load to plan for, not the sample's: ``(expected [L, E], samples [B, L, E])``.

    ``expected`` is the posterior mean of a symmetric Dirichlet over each layer's expert shares
    (``prior_tokens`` pseudo-tokens spread evenly over the E experts), in the sample's token
    count; ``samples`` are ``resamples`` bootstrap draws of the sequences (with replacement,
    seeded), each smoothed the same way: the spread of the load a new workload of this size
    could bring. Both sum per layer to the sample's tokens.

    Args:
        seq_load: ``[S, L, E]`` from :func:`sequence_loads`.
        resamples: B, bootstrap draws.
        prior_tokens: Dirichlet pseudo-tokens per layer (0: the raw counts).
        seed: seed of the draws.
    """
    S, L, E = seq_load.shape
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(S, np.full(S, 1.0 / S), size=resamples).astype(float)  # [B, S]
    total = seq_load.sum(0)  # [L, E]
    samples = (weights @ seq_load.reshape(S, -1)).reshape(resamples, L, E)

    def smooth(x: np.ndarray) -> np.ndarray:
        n = x.sum(-1, keepdims=True)
        return (x + prior_tokens / E) * (n / np.maximum(n + prior_tokens, 1e-12))

    return smooth(total), smooth(samples)


# --------------------------------------------------------------------------- metrics


def _distribution(phy2log: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    """``[L, E, G]`` share of each expert's tokens processed on each GPU (even split over copies)."""
    L, R = phy2log.shape
    S = R // num_gpus
    gpu_of_slot = np.arange(R) // S
    counts = np.zeros((L, num_experts, num_gpus))
    np.add.at(counts, (np.arange(L)[:, None], phy2log, gpu_of_slot[None, :]), 1.0)
    return counts / counts.sum(-1, keepdims=True)


def _node_share(P: np.ndarray, topo: Topology) -> np.ndarray:
    """``[..., E, N]`` from ``[..., E, G]``."""
    return P.reshape(*P.shape[:-1], topo.num_nodes, topo.gpus_per_node).sum(-1)


def placement_metrics(phy2log: np.ndarray, load: np.ndarray, trans: np.ndarray, topo: Topology,
                      hidden_size: int, num_tokens: int, expert_ids: np.ndarray | None = None) -> dict[str, Any]:
    """Straggler load and traffic of a placement.

    Args:
        phy2log: ``[L, R]`` logical expert of every physical slot (slot s on GPU s // S).
        load: ``[L, E]`` tokens per expert.
        trans: ``[L-1, E, E]`` consecutive-layer token pairs.
        topo: the cluster's ranks and link costs.
        hidden_size: H (one token's hidden state is H x 2 bytes on the wire).
        num_tokens: T, tokens of the workload (for the traffic per token).
        expert_ids: ``[T, L, K]`` the trace's routing, for ``nodes_per_token`` (optional).

    Returns:
        ``max_mean`` ``[L]`` (max / mean per-GPU load), ``max_mean_avg``, ``max_mean_worst``,
        ``cross_gpu_fraction``, ``cross_node_fraction`` (of all consecutive-layer token
        pairs), ``traffic_s_per_token`` (link seconds per token over all layer pairs), and
        with ``expert_ids`` ``nodes_per_token``: the expected number of nodes one token's
        experts of one layer sit on (its dispatch fan-out, what group-limited routing bounds).
    """
    L, E = load.shape
    P = _distribution(phy2log, E, topo.num_gpus)  # [L, E, G]
    gpu_load = np.einsum("le,leg->lg", load, P)  # [L, G]
    mean = gpu_load.mean(axis=1)
    max_mean = np.divide(gpu_load.max(axis=1), mean, out=np.ones(L), where=mean > 0)
    PN = _node_share(P, topo)  # [L, E, N]
    D = topo.cost_s_per_byte * hidden_size * ACTIVATION_BYTES  # [G, G] seconds per token
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


# --------------------------------------------------------------------------- our placement


def _by_bands(cost: np.ndarray, weight: np.ndarray, bins: int) -> np.ndarray:
    """Items to ``bins`` bins, ``M / bins`` each: the items, heaviest first, are cut into
    bands of ``bins``; every bin takes one item of every band (so bin loads differ by at most
    the sum of the bands' spreads), the cheapest item-to-bin match first within a band.

    Args:
        cost: ``[M, B]`` cost of item m in bin b.
        weight: ``[M]`` item loads.

    Returns:
        ``[M]`` bin of every item.
    """
    M = len(weight)
    where = np.full(M, -1)
    order = np.argsort(-weight, kind="stable")
    load = np.zeros(bins)
    for b0 in range(0, M, bins):
        band = order[b0:b0 + bins]
        sub = cost[band].copy()  # [bins, B]
        # the band's heaviest items go to the lightest bins when costs tie: a small load term
        sub += 1e-9 * load[None, :] * weight[band, None]
        free_rows = np.ones(len(band), bool)
        free_cols = np.ones(bins, bool)
        for _ in range(len(band)):
            masked = np.where(free_rows[:, None] & free_cols[None, :], sub, np.inf)
            r, c = divmod(int(np.argmin(masked)), bins)
            where[band[r]] = c
            load[c] += weight[band[r]]
            free_rows[r] = False
            free_cols[c] = False
    return where


def _swaps(cost: np.ndarray, weight: np.ndarray, expert: np.ndarray, where: np.ndarray, bins: int, cap: float,
           distinct: bool, max_swaps: int, dev: np.ndarray | None = None, z: float = 0.0) -> np.ndarray:
    """Pairwise swaps between bins (counts stay): first to bring every bin under ``cap``
    (the swap that lowers the two bins' larger load the most, cheapest on ties), then the
    swap that lowers the total cost the most while both bins stay under ``cap``.

    ``distinct``: a bin never holds two copies of one expert. ``dev``: ``[M, B]`` the items'
    load in B draws minus its mean; a bin's load is then its mean plus ``z`` standard
    deviations over the draws (items that rise together count more than their means).
    """
    M = len(weight)
    where = where.copy()
    load = np.bincount(where, weights=weight, minlength=bins)
    idx = np.arange(M)
    if dev is not None:
        B = dev.shape[1]
        gram = dev @ dev.T  # [M, M]
        sq_step = np.diag(gram)[:, None] + np.diag(gram)[None, :] - 2 * gram  # [i, j] |d_j - d_i|^2
        dsum = np.zeros((bins, B))  # [bins, B] a bin's summed deviation
        np.add.at(dsum, where, dev)
    for _ in range(max_swaps):
        own = cost[idx, where]  # [M]
        cross = cost[:, where]  # [i, j]: cost of item i in j's bin
        gain = own[:, None] + own[None, :] - cross - cross.T  # [M, M] cost saved by swapping i and j
        li = load[where]
        new_i = li[:, None] - weight[:, None] + weight[None, :]  # i's bin after the swap
        if dev is not None:
            sq = (dsum * dsum).sum(1)  # [bins]
            X = dev @ dsum.T  # [M, bins]
            toward = X[:, where].T - X[idx, where][:, None]  # [i, j] D_a . (d_j - d_i), a = i's bin
            sq_i = np.maximum(sq[where][:, None] + sq_step + 2 * toward, 0.0)  # i's bin after the swap
            new_i = new_i + z * np.sqrt(sq_i / B)
            li = li + z * np.sqrt(sq[where] / B)
        worst_before = np.maximum(li[:, None], li[None, :])
        worst_after = np.maximum(new_i, new_i.T)
        ok = where[:, None] != where[None, :]
        if distinct:
            held = np.zeros((bins, int(expert.max()) + 1), bool)
            held[where, expert] = True
            same = expert[:, None] == expert[None, :]
            ok &= (~held[where[:, None], expert[None, :]] & ~held[where[None, :], expert[:, None]]) | same
        bin_load = load if dev is None else load + z * np.sqrt(sq / B)
        if bin_load.max() > cap + 1e-12:
            # repair: only swaps touching the most loaded bin, that lower its load
            top = int(np.argmax(bin_load))
            score = np.where(ok & (where[:, None] == top) & (worst_after < worst_before - 1e-12),
                             (worst_before - worst_after) + 1e-9 * gain, -np.inf)
        else:
            score = np.where(ok & (worst_after <= cap + 1e-12), gain, -np.inf)
        if bin_load.max() > cap + 1e-12:
            picks = [divmod(int(np.argmax(score)), M)]
        else:
            # several swaps per round, between disjoint pairs of bins (their loads stay exact)
            k = min(4 * bins * bins, score.size - 1)
            flat = np.argpartition(-score, k, axis=None)[:k]
            flat = flat[np.argsort(-score.ravel()[flat], kind="stable")]
            picks, used = [], set()
            for f in flat:
                i, j = divmod(int(f), M)
                if not score[i, j] > 1e-15 or len(picks) >= bins // 2:
                    break
                if where[i] in used or where[j] in used:
                    continue
                used.update((where[i], where[j]))
                picks.append((i, j))
        if not picks or not score[picks[0]] > 1e-15:
            break
        for i, j in picks:
            bi, bj = where[i], where[j]
            load[bi] += weight[j] - weight[i]
            load[bj] += weight[i] - weight[j]
            if dev is not None:
                dsum[bi] += dev[j] - dev[i]
                dsum[bj] += dev[i] - dev[j]
            where[i], where[j] = bj, bi
    return where


def _pack(weight: np.ndarray, expert: np.ndarray, bins: int, per_bin: int) -> np.ndarray:
    """Balanced packing (heaviest first into the lightest bin with room), one copy of an expert per bin."""
    where = np.full(len(weight), -1)
    load = np.zeros(bins)
    count = np.zeros(bins, np.int64)
    held = np.zeros((bins, int(expert.max()) + 1), bool)
    for m in np.argsort(-weight, kind="stable"):
        bad = (count >= per_bin) | held[:, expert[m]]
        if bad.all():
            bad = count >= per_bin
        b = int(np.argmin(np.where(bad, np.inf, load)))
        where[m] = b
        load[b] += weight[m]
        count[b] += 1
        held[b, expert[m]] = True
    return where


def _pack_drawn(draws: np.ndarray, expert: np.ndarray, bins: int, per_bin: int, max_swaps: int) -> np.ndarray:
    """Items to bins, ``per_bin`` each, one copy of an expert per bin, balanced over load draws:
    heaviest first into the bin that raises the draws' average largest bin load least, then
    the pairwise swaps that lower it most.

    Args:
        draws: ``[M, B]`` item loads in B draws.
        expert: ``[M]`` expert of every item.

    Returns:
        ``[M]`` bin of every item.
    """
    M, B = draws.shape
    where = np.full(M, -1)
    load = np.zeros((bins, B))
    count = np.zeros(bins, np.int64)
    held = np.zeros((bins, int(expert.max()) + 1), bool)
    eye = np.eye(bins, dtype=bool)
    for m in np.argsort(-draws.mean(1), kind="stable"):
        bad = (count >= per_bin) | held[:, expert[m]]
        if bad.all():
            bad = count >= per_bin
        after = load[None, :, :] + eye[:, :, None] * draws[m][None, None, :]  # [candidate, bin, B]
        score = after.max(1).mean(1) + 1e-9 * load.mean(1)  # [candidate]
        b = int(np.argmin(np.where(bad, np.inf, score)))
        where[m] = b
        load[b] += draws[m]
        count[b] += 1
        held[b, expert[m]] = True
    same = expert[:, None] == expert[None, :]
    for _ in range(max_swaps):
        padded = np.vstack([load, np.zeros((2, B))])  # two empty bins: "the rest" exists with 2 bins
        order = np.argsort(-padded, axis=0, kind="stable")[:3]  # [3, B] the three largest bins of every draw
        top = np.take_along_axis(padded, order, 0)  # [3, B]
        # an item out of the bin that is largest in the most draws (the swap that helps most
        # leaves it; M x M x B for every pair would cost bins times more)
        rows = np.flatnonzero(where == np.bincount(order[0], minlength=bins).argmax())  # [M']
        if not rows.size:  # every bin empty in every draw
            break
        a, b = where[rows, None, None], where[None, :, None]  # [M', 1, 1], [1, M, 1]
        rest = np.where((order[0] != a) & (order[0] != b), top[0],
                        np.where((order[1] != a) & (order[1] != b), top[1], top[2]))  # [M', M, B]
        delta = draws[None, :, :] - draws[rows, None, :]  # [i, j, B]: j in, i out of i's bin
        new_max = np.maximum(rest, np.maximum(load[where[rows]][:, None, :] + delta, load[where][None, :, :] - delta))
        gain = top[0].mean() - new_max.mean(-1)  # [M', M]
        held = np.zeros((bins, int(expert.max()) + 1), bool)
        held[where, expert] = True
        ok = (where[rows, None] != where[None, :]) & (
            (~held[where[rows, None], expert[None, :]] & ~held[where[None, :], expert[rows, None]]) | same[rows])
        gain = np.where(ok, gain, -np.inf)
        r, j = divmod(int(np.argmax(gain)), M)
        i = int(rows[r])
        if not gain[r, j] > 1e-9 * top[0].mean():
            break
        bi, bj = where[i], where[j]
        load[bi] += draws[j] - draws[i]
        load[bj] += draws[i] - draws[j]
        where[i], where[j] = bj, bi
    return where


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


def _drawn_max_mean(samples: np.ndarray, share: np.ndarray) -> float:
    """Max / mean GPU load averaged over load draws ``samples [B, E]`` under ``share [E, G]``."""
    gpu = np.einsum("be,eg->bg", samples, share)  # [B, G]
    return float((gpu.max(1) / np.maximum(gpu.mean(1), 1e-12)).mean())


def place_experts(load: np.ndarray, trans: np.ndarray, topo: Topology, num_physical: int, *,
                  balance_slack: float = 0.01, sweeps: int = 2, time_limit_s: float = 300.0,
                  hidden_size: int = 1, max_swaps: int = 64, load_samples: np.ndarray | None = None,
                  quantile: float = LOAD_QUANTILE) -> tuple[np.ndarray, dict[str, Any]]:
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
        max_swaps: improving swaps between nodes per layer solve.
        load_samples: ``[B, L, E]`` draws of the load a new workload could bring (see
            :func:`expected_load`; ``load`` is then their expectation). With them, copies go
            to the experts with the largest ``quantile`` of load per copy over the draws (an
            uncertain expert gets a replica, which splits its noise over two GPUs), and a layer
            keeps a new placement only if its max / mean load averaged over the draws stays
            within ``balance_slack`` of the warm start's: balance on unseen tokens, not on the
            sample (co-locating experts that the same sequences pick would fit the sample and
            break on the next one).
        quantile: the upper quantile of the draws that replicas are chosen against.
    """
    t0 = time.perf_counter()
    L, E = load.shape
    G, N, GN = topo.num_gpus, topo.num_nodes, topo.gpus_per_node
    S = num_physical // G
    D = topo.cost_s_per_byte * hidden_size * ACTIVATION_BYTES  # [G, G]
    warm = eplb_global(load, num_physical, 1, 1, G)  # [L, R]
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
            gpu = _pack(load[l, expert] / logcnt[l, expert], expert, G, S)
            warm[l] = np.concatenate([np.sort(expert[gpu == g]) for g in range(G)])
    P = _distribution(warm, E, G)  # [L, E, G]
    gpu_load = np.einsum("le,leg->lg", load, P)
    mean = gpu_load.mean(axis=1)
    cap = gpu_load.max(axis=1) + balance_slack * mean  # [L]
    if load_samples is not None:  # the same cap, on the draws' average max / mean
        robust_cap = np.array([_drawn_max_mean(load_samples[:, l], P[l]) for l in range(L)]) + balance_slack
    placement = warm.copy()
    improved = tried = 0
    stopped = False
    node_gpus = [np.arange(n * GN, (n + 1) * GN) for n in range(N)]
    node_swaps, gpu_swaps = max_swaps, max_swaps
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
                node = _by_bands(cost_n, weight, N)
                if load_samples is None:
                    node = _swaps(cost_n, weight, expert, node, N, cap_n, False, node_swaps)
                else:  # the cap on mean + z sd of a node's load over the draws, z sd as the warm start's worst node
                    dev = drawn - drawn.mean(1, keepdims=True)  # [R, B]
                    warm_node = topo.node_of[np.argsort(warm[l], kind="stable") // S]  # [R] items, by expert
                    warm_sd = np.sqrt([(dev[warm_node == n].sum(0) ** 2).mean() for n in range(N)])
                    node = _swaps(cost_n, weight, expert, node, N, cap_n + NODE_Z * warm_sd.max(), False, node_swaps,
                                  dev=dev, z=NODE_Z)
                gpu = np.empty(len(expert), np.int64)
                for n in range(N):
                    items = np.flatnonzero(node == n)
                    sub_cost = cost_g[np.ix_(items, node_gpus[n])]
                    if load_samples is None:
                        start = _pack(weight[items], expert[items], GN, S)
                        local = _swaps(sub_cost, weight[items], expert[items], start, GN, cap[l], True, gpu_swaps)
                    else:  # inside a node the link is fast: balance on the draws, not the sample
                        local = _pack_drawn(drawn[items], expert[items], GN, S, gpu_swaps)
                    gpu[items] = node_gpus[n][local]
                gl = np.bincount(gpu, weights=weight, minlength=G)
                dup = len(set(zip(gpu.tolist(), expert.tolist()))) < len(expert)
                if gl.max() <= cap[l] + 1e-9 and not dup:
                    best = gpu
                    break
            if best is None:
                continue
            row = np.concatenate([np.sort(expert[best == g]) for g in range(G)])
            new_share = _distribution(row[None, :], E, G)[0]  # [E, G]
            if load_samples is not None and _drawn_max_mean(load_samples[:, l], new_share) > robust_cap[l] + 1e-12:
                continue
            if (cost_e * new_share).sum() <= (cost_e * P[l]).sum() + 1e-15:
                placement[l] = row
                P[l] = new_share
                improved += 1
        if stopped:
            break
    info = {"warm_start": "eplb-global", "sweeps": sweeps, "layer_solves": tried, "layers_improved": improved,
            "stopped_by_time_limit": stopped, "balance_slack": balance_slack,
            "solve_s": time.perf_counter() - t0}
    return placement, info


def place_for(plan_for: str, trace: Trace, load: np.ndarray, trans: np.ndarray, topo: Topology, num_physical: int, *,
              balance_slack: float | None = None, seed: int = 0, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`place_experts` for the trace's expected load (``plan_for="expected"``) or its
    sample counts (``"sample"``); ``load``, ``trans``: :func:`workload_arrays` of ``trace``."""
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


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class ClusterRequest:
    """Everything an expert-parallel plan takes.

    Attributes:
        hardware: profile name or YAML path (two or more GPUs, equal per node).
        model: preset name or HF config path.
        trace: routing trace; ``None``: the model's default workload.
        redundant_experts: R - E; ``None``: :func:`default_redundant`.
        group_limited: impose the model's group-limited routing on the workload (``None``:
            when the model has ``n_group > 1``; a trace that obeys it is unchanged).
        formats: storage formats to try for experts and dense weights, first that fits wins.
        batch_size: sequences per GPU (data-parallel attention) the KV cache must hold.
        context_tokens: context per sequence.
        balance_slack: straggler load allowed above EPLB global's, in units of the mean load
            (``None``: 0.01 on the sample, :data:`EXPECTED_SLACK` on the draws).
        sweeps: passes over the layers.
        time_limit_s: wall-clock safety net of the placement (the work is bounded by ``sweeps``;
            reaching it is recorded in the plan as status "time limit").
        seed: seed of the group-limited redraws and the bootstrap draws.
        plan_for: ``"expected"``: balance the load unseen tokens are expected to bring
            (:func:`expected_load`: smoothed counts, bootstrap draws over sequences, replicas
            for uncertain experts); ``"sample"``: balance the trace's own counts (fits its noise).
    """

    hardware: str = "cluster-h100-2node"
    model: str = "deepseek-v3"
    trace: Trace | None = None
    redundant_experts: int | None = None
    group_limited: bool | None = None
    formats: tuple[str, ...] = ("bf16", "fp8", "int8", "int4")
    batch_size: int = 8
    context_tokens: int = 4096
    balance_slack: float | None = None
    sweeps: int = 2
    time_limit_s: float = 300.0
    seed: int = 0
    plan_for: str = "expected"


@dataclass(frozen=True, eq=False)
class ClusterResult:
    """A cluster plan, its placement and every method's metrics (ours and the baselines)."""

    plan: Plan
    placement: np.ndarray  # [L, R] phy2log of ours
    baselines: dict[str, Plan]
    metrics: dict[str, dict[str, Any]]  # method -> placement_metrics (+ solve_s)
    topology: Topology
    num_physical: int
    expert_format: str
    workload: str
    timings_s: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def _memory_need(model: ModelSpec, slots: int, fmt: str, batch_size: int, context_tokens: int) -> dict[str, float]:
    return {"expert_bytes": slots * model.num_moe_layers * model.expert_bytes(fmt),
            "dense_bytes": model.dense_bytes(fmt),  # replicated: data-parallel attention on every GPU
            "kv_bytes": model.kv_cache_bytes(context_tokens, batch_size=batch_size)}


def _pick_format(model: ModelSpec, hw: Hardware, topo: Topology, slots: int, formats: tuple[str, ...],
                 batch_size: int, context_tokens: int) -> tuple[str | None, dict[str, float], float]:
    capacity = min(hw.memories[g].capacity_bytes for g in topo.gpus)
    need: dict[str, float] = {}
    for fmt in formats:
        need = _memory_need(model, slots, fmt, batch_size, context_tokens)
        if sum(need.values()) <= capacity:
            return fmt, need, capacity
    return None, need, capacity


def cluster_applies(parallel: str, hardware: str, model: str, formats: tuple[str, ...] = ClusterRequest.formats,
                    batch_size: int = 8, context_tokens: int = 4096) -> bool:
    """Whether ``planner optimize`` makes an expert-parallel plan.

    ``ep``: always; ``offload``: never; ``auto``: when the profile has two or more GPUs, the
    same number on every node, and the model's experts (with the default redundancy) fit
    their memory in one of ``formats``.
    """
    if parallel == "ep":
        return True
    if parallel == "offload":
        return False
    _, hw = load_profile(hardware)
    if len(hw.devices_of_kind("gpu")) < 2:
        return False
    try:
        topo = topology(hw)
    except InputError:
        return False
    spec = load_model(model)
    slots = (spec.num_experts + default_redundant(spec.num_experts, topo.num_gpus)) // topo.num_gpus
    return _pick_format(spec, hw, topo, slots, formats, batch_size, context_tokens)[0] is not None


def plan_from_placement(phy2log: np.ndarray, *, hw: Hardware, topo: Topology, model: ModelSpec, inputs: Inputs,
                        expert_format: str, memory_need: dict[str, float], batch_size: int, context_tokens: int,
                        predicted: dict[str, float], solver: SolverInfo, notes: tuple[str, ...] = ()) -> Plan:
    """A :class:`Plan` from ``phy2log [L, R]``: every expert's ``home`` is the GPU of its
    lowest physical slot, ``replicas`` the GPUs of its other copies, site ``resident``."""
    L, R = phy2log.shape
    E = model.num_experts
    S = R // topo.num_gpus
    layers = []
    for l in range(L):
        gpus_of: list[list[str]] = [[] for _ in range(E)]
        for s, e in enumerate(phy2log[l].tolist()):
            gpus_of[e].append(topo.gpus[s // S])
        layers.append(LayerPlan(moe_layer=l, hidden_layer=model.moe_layer_indices[l],
                                home=tuple(g[0] for g in gpus_of), format=(expert_format,) * E,
                                site=("resident",) * E, replicas=tuple(tuple(g[1:]) for g in gpus_of)))
    memory = {g: MemoryUse(capacity_bytes=hw.memories[g].capacity_bytes, **memory_need) for g in topo.gpus}
    host = next(d for d in hw.devices_of_kind("cpu") if d.node == hw.devices[topo.gpus[0]].node)
    return Plan(inputs=inputs, objective="throughput", batch_size=batch_size, context_tokens=context_tokens,
                compute_device=topo.gpus[0], host_device=hw.memory_of(host.id).id, eviction="static",
                layers=tuple(layers), memory=memory, predicted=predicted, solver=solver, notes=notes)


def _predicted(m: dict[str, Any]) -> dict[str, float]:
    out = {"max_mean_load": m["max_mean_avg"], "max_mean_load_worst_layer": m["max_mean_worst"],
           "cross_gpu_fraction": m["cross_gpu_fraction"], "cross_node_fraction": m["cross_node_fraction"],
           "traffic_s_per_token": m["traffic_s_per_token"]}
    if m.get("nodes_per_token") is not None:
        out["nodes_per_token"] = m["nodes_per_token"]
    return {k: float(v) for k, v in out.items()}


def plan_cluster(req: ClusterRequest) -> ClusterResult:
    """Plan expert parallelism for ``req`` (see :class:`ClusterRequest`) and score the baselines.

    Raises:
        InputError: bad inputs (profile, model, trace, redundant count).
        InfeasibleError: the experts do not fit the GPUs' memory in any of ``req.formats``.
    """
    t0 = time.perf_counter()
    profile, hw = load_profile(req.hardware)
    model = load_model(req.model)
    topo = topology(hw)
    G, N = topo.num_gpus, topo.num_nodes
    E = model.num_experts
    redundant = default_redundant(E, G) if req.redundant_experts is None else req.redundant_experts
    _check_redundant(redundant, E, G)
    R = E + redundant
    fmt, need, capacity = _pick_format(model, hw, topo, R // G, req.formats, req.batch_size, req.context_tokens)
    if fmt is None:
        short = sum(need.values()) - capacity
        raise InfeasibleError(
            f"HBM of every GPU ({topo.gpus[0]} ...) is short by {short / 2**30:.1f} GiB: {R // G} expert slots x "
            f"{model.num_moe_layers} layers + dense weights + KV cache need {sum(need.values()) / 2**30:.1f} GiB in "
            f"{req.formats[-1]}, {capacity / 2**30:.1f} GiB available. Fix: a profile with more GPUs, fewer "
            f"--redundant-experts, a smaller --formats entry, or a shorter --context / --batch")
    if req.trace is not None:
        trace = req.trace
    else:
        from profiles.workload.defaults import default_workload

        trace = default_workload(model)
    zero = model.zero_experts.count
    if trace.num_experts not in (E, E + zero) or trace.num_layers != model.num_moe_layers:
        raise InputError("the workload does not match the model", key="--trace",
                         value=f"{trace.num_layers} layers x {trace.num_experts} experts",
                         expected=f"{model.num_moe_layers} MoE layers x {E} experts ({model.name})",
                         fix="record or synthesise a trace for this model (planner trace synth --model ...)")
    # the plan names the workload it was given (simulate and export replay that one), not the
    # group-limited copy the placer balances
    given_digest = workload_digest(trace)
    limited = req.group_limited if req.group_limited is not None else model.n_group > 1
    if limited and model.n_group > 1:
        trace = group_limited(trace, model.n_group, model.topk_group, num_experts=E, seed=req.seed)
    load, trans = workload_arrays(trace, E)
    t_stats = time.perf_counter()

    def score(p: np.ndarray) -> dict[str, Any]:
        return placement_metrics(p, load, trans, topo, model.hidden_size, trace.num_tokens, trace.expert_ids)

    placements: dict[str, np.ndarray] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for name, fn in PLACEMENTS.items():
        t = time.perf_counter()
        placements[name] = fn(load, R, model.n_group, N, G)
        metrics[name] = score(placements[name]) | {"solve_s": time.perf_counter() - t}
    t = time.perf_counter()
    ours, info = place_for(req.plan_for, trace, load, trans, topo, R, balance_slack=req.balance_slack,
                           sweeps=req.sweeps, time_limit_s=req.time_limit_s, hidden_size=model.hidden_size,
                           seed=req.seed)
    metrics["ours"] = score(ours) | {"solve_s": time.perf_counter() - t}
    t_solve = time.perf_counter()

    inputs = Inputs(hardware=hw.name, hardware_digest=digest(profile.model_dump(mode="json")), model=model.name,
                    model_digest=digest(dataclasses.asdict(model)), workload=trace.source or "trace",
                    workload_digest=given_digest)
    notes = ((f"expert parallelism: {G} GPUs ({N} nodes x {G // N}), {R // G} expert slots per GPU, "
             f"{E} experts + {redundant} redundant per MoE layer"),
             "EP rank r = the r-th GPU in natural order of its id; physical slot s lives on rank s // slots",
             "a replicated expert's tokens split evenly over its copies",
             ("dense weights replicated on every GPU (data-parallel attention); KV cache for batch_size "
             "sequences per GPU"))
    common = {"hw": hw, "topo": topo, "model": model, "inputs": inputs, "expert_format": fmt, "memory_need": need,
                  "batch_size": req.batch_size, "context_tokens": req.context_tokens}
    predicted = _predicted(metrics["ours"])
    for name in PLACEMENTS:
        for k, v in _predicted(metrics[name]).items():
            predicted[f"{name}.{k}"] = v
    stopped = ()  # the safety net's note: this plan depends on the machine's load
    if info["stopped_by_time_limit"]:
        stopped = (f"the wall-clock safety net (--time-limit {req.time_limit_s:g} s) stopped the placement after "
                  f"{info['layer_solves']} of {req.sweeps * model.num_moe_layers} layer solves: this plan may differ "
                  f"on a less busy machine; raise --time-limit",)
    plan = plan_from_placement(
        ours, predicted=predicted, notes=notes + stopped,
        solver=SolverInfo(method="ep-placement", solver="numpy decomposition (nodes, then GPUs; swaps)",
                          status="time limit" if info["stopped_by_time_limit"] else "feasible",
                          objective=metrics["ours"]["traffic_s_per_token"],
                          time_limit_s=req.time_limit_s, variables=int(model.num_moe_layers * R)),
        **common)
    baselines = {name: plan_from_placement(placements[name], predicted=_predicted(metrics[name]), notes=notes,
                                           solver=SolverInfo(method=name, status="heuristic"), **common)
                 for name in PLACEMENTS}
    t_end = time.perf_counter()
    return ClusterResult(plan=plan, placement=ours, baselines=baselines, metrics=metrics, topology=topo,
                         num_physical=R, expert_format=fmt, workload=trace.source, info=info,
                         timings_s={"stats_s": t_stats - t0, "solve_s": t_solve - t_stats, "total_s": t_end - t0})


# --------------------------------------------------------------------------- CLI output


def cluster_summary(result: ClusterResult, compare: bool = False) -> dict[str, Any]:
    """The JSON summary `planner optimize` prints for an expert-parallel plan."""
    plan, topo = result.plan, result.topology
    E = len(plan.layers[0].home)
    mem = next(iter(plan.memory.values()))

    def row(name: str) -> dict[str, Any]:
        m = result.metrics[name]
        return {"method": name, "max_mean_load": m["max_mean_avg"], "max_mean_load_worst_layer": m["max_mean_worst"],
                "cross_gpu_fraction": m["cross_gpu_fraction"], "cross_node_fraction": m["cross_node_fraction"],
                "nodes_per_token": m["nodes_per_token"], "traffic_s_per_token": m["traffic_s_per_token"],
                "solve_s": m["solve_s"]}

    data: dict[str, Any] = {
        "mode": "expert-parallel",
        "inputs": {"model": plan.inputs.model, "hardware": plan.inputs.hardware, "workload": result.workload},
        "layout": {"gpus": topo.num_gpus, "nodes": topo.num_nodes, "experts": E,
                   "redundant_experts": result.num_physical - E, "slots_per_gpu": result.num_physical // topo.num_gpus,
                   "moe_layers": len(plan.layers), "expert_format": result.expert_format},
        "memory_per_gpu": {"capacity_bytes": mem.capacity_bytes, "expert_bytes": mem.expert_bytes,
                           "dense_bytes": mem.dense_bytes, "kv_bytes": mem.kv_bytes, "used_bytes": mem.used_bytes},
        "plan": row("ours"),
        "solver": result.info,
    }
    if compare:
        ours = result.metrics["ours"]
        rows = []
        for name in PLACEMENTS:
            r = row(name)
            m = result.metrics[name]
            r["cross_node_reduction"] = (1 - ours["cross_node_fraction"] / m["cross_node_fraction"]
                                         if m["cross_node_fraction"] else 0.0)
            rows.append(r)
        data["baselines"] = rows
    return data


def render_cluster(result: ClusterResult, console: Any, compare: bool = False) -> None:
    """Rich tables for an expert-parallel plan (and, with ``compare``, the baselines)."""
    from rich.table import Table

    from profiles.units import format_size, format_time

    d = cluster_summary(result, compare)
    lay, inp, mem = d["layout"], d["inputs"], d["memory_per_gpu"]
    console.print(f"[bold]{inp['model']} on {inp['hardware']}[/bold]: expert parallelism over {lay['gpus']} GPUs "
                  f"({lay['nodes']} node{'s' if lay['nodes'] > 1 else ''}), {lay['moe_layers']} MoE layers x {lay['experts']} experts + "
                  f"{lay['redundant_experts']} redundant, {lay['slots_per_gpu']} slots per GPU, experts in "
                  f"{lay['expert_format']}", highlight=False)
    console.print(f"workload: {inp['workload']}", highlight=False)
    console.print(f"memory per GPU: experts {format_size(mem['expert_bytes'])}, dense {format_size(mem['dense_bytes'])}"
                  f", KV {format_size(mem['kv_bytes'])}; {format_size(mem['used_bytes'])} of "
                  f"{format_size(mem['capacity_bytes'])}", highlight=False)
    table = Table(title="Expert placement (per MoE layer, averaged)")
    for col in ("method", "max/mean load", "worst layer", "cross-GPU", "cross-node", "nodes/token", "solve"):
        table.add_column(col, justify="left" if col == "method" else "right")

    def add(r: dict[str, Any], style: str | None = None) -> None:
        npt = r["nodes_per_token"]
        table.add_row(r["method"], f"{r['max_mean_load']:.3f}", f"{r['max_mean_load_worst_layer']:.3f}",
                      f"{r['cross_gpu_fraction']:.1%}", f"{r['cross_node_fraction']:.1%}",
                      "-" if npt is None else f"{npt:.2f}", format_time(r["solve_s"]), style=style)

    add(d["plan"], "bold")
    for r in d.get("baselines", []):
        add(r)
    console.print(table)
    if compare:
        g = next(r for r in d["baselines"] if r["method"] == "eplb-global")
        level = "node" if lay["nodes"] > 1 else "GPU"
        ours_x, glob_x = d["plan"][f"cross_{level.lower()}_fraction"], g[f"cross_{level.lower()}_fraction"]
        cut = 1 - ours_x / glob_x if glob_x else 0.0
        console.print(f"cross-{level} tokens vs eplb-global: {cut:+.1%} fewer at max/mean "
                      f"{d['plan']['max_mean_load']:.3f} (eplb-global {g['max_mean_load']:.3f})", highlight=False)


def run_cluster_cli(*, hardware: str, model: str, trace: Trace | None, redundant_experts: int | None,
                    formats: tuple[str, ...], batch_size: int, context_tokens: int, time_limit_s: float,
                    compare: bool, out_path: Any, report: str | None) -> None:
    """`planner optimize` in expert-parallel mode: plan, print, write ``--out``."""
    import json

    from .output import get_output

    if report:
        raise InputError("--report renders offload plans; an expert-parallel plan prints its summary instead",
                         key="--report", value=report, fix="drop --report (use --json for the figures)")
    output = get_output()
    req = ClusterRequest(hardware=hardware, model=model, trace=trace, redundant_experts=redundant_experts,
                         formats=formats, batch_size=batch_size, context_tokens=context_tokens,
                         time_limit_s=time_limit_s)
    with output.log.status("planning expert placement..."):
        result = plan_cluster(req)
    written = []
    if out_path is not None:
        from .commands._common import writing

        with writing(out_path, "--out"):
            written.append(result.plan.save(out_path))
    data = {"summary": cluster_summary(result, compare), "files": [str(p) for p in written]}

    def render(console: Any) -> None:
        from profiles.units import format_time

        render_cluster(result, console, compare)
        if result.info["stopped_by_time_limit"]:
            console.print(f"[bold yellow]warning:[/] the wall-clock safety net (--time-limit {time_limit_s:g} s) "
                          f"stopped the placement early; this plan may differ on a less busy machine")
        t = result.timings_s
        console.print(f"planned in {format_time(t['total_s'])} (statistics {format_time(t['stats_s'])}, "
                      f"placement {format_time(t['solve_s'])})", highlight=False)
        for path in written:
            console.print(f"wrote {path}", highlight=False)

    if output.json_mode:
        data["plan"] = json.loads(result.plan.to_json())
    output.emit(data, render)
