"""Fewer expert slots on slow GPUs: which replica slots a mixed cluster leaves empty.

Shape legend: L = MoE layers, E = routed experts, R = physical experts per layer, G = GPUs
(EP ranks), S = R / G slots per GPU.

At decode batches an expert call reads the expert's weights whatever its token count (tens of
tokens per call), so a GPU's expert stage is about its slots times its call time: a slow
GPU holding as many slots as a fast one sets every layer's expert stage, and balancing
*tokens* cannot help. Replicas are what a GPU may give up: dropping a redundant copy leaves its
expert on its other copies, which take its tokens. And a slot given up leaves its GPU memory
for the KV cache of more sequences, which moves attention off the slow GPUs
(:mod:`.attention`): the two are decided together (:func:`joint_slots`: slots per GPU type,
all combinations, each priced ``attention stage + layers x max_g slots[g] x call_s[g]``; or,
past :data:`MAX_COMBOS`, the greedy levelling of :func:`slot_counts`, where every GPU tied at
the largest ``k[g] x call_s[g]`` gives up a slot while the replicas allow and that lowers the
largest, the fastest type never). Then, per layer, each GPU's surplus slots are emptied (-1 in
``phy2log``): first copies of replicated experts already on it, else its hottest expert swaps
places with a replica on the fastest GPU holding one and that replica is emptied. Every
expert keeps a copy.

SGLang and vLLM need the same number of physical experts on every rank, so such a plan is
simulated, not exported to them (their exporters refuse it in one line);
``ClusterRequest.even_slots`` keeps S everywhere.
"""

from __future__ import annotations

import itertools

import numpy as np

from profiles.hardware import Hardware
from profiles.models import ModelSpec

from .attention import AttentionShares, attention_shares
from .speed import call_seconds, tokens_per_call
from .topology import Topology

__all__ = ["MAX_COMBOS", "attention_and_slots", "joint_slots", "slot_counts", "trim_slots"]

# slot counts per GPU type tried together (S ** types): two types of up to 44 slots
MAX_COMBOS = 2_000


def slot_counts(call_s: np.ndarray, slots: int, spare: int) -> np.ndarray:
    """``[G]`` slots per GPU: levelled ``k[g] x call_s[g]``, at most ``spare`` slots emptied in all.

    Args:
        call_s: ``[G]`` seconds of one expert call on each GPU (:func:`.speed.call_seconds`).
        slots: S, slots per GPU of the equal layout.
        spare: redundant copies per layer (R - E): the most slots that may be emptied.
    """
    k = np.full(len(call_s), slots, np.int64)
    fastest = np.isclose(call_s, call_s.min(), rtol=1e-9)  # these keep every slot
    while True:
        stage = k * call_s
        top = np.isclose(stage, stage.max(), rtol=1e-9)
        if (top & fastest).any() or top.sum() > spare - (slots * len(k) - k.sum()) or (k[top] <= 1).any():
            return k
        trial = k - top
        if (trial * call_s).max() >= stage.max() * (1 - 1e-9):
            return k
        k = trial


def attention_and_slots(seen: Hardware, hw: Hardware, topo: Topology, model: ModelSpec, choice, R: int,
                        info: dict, *, batch_size: int, context_tokens: int, engine: str | None,
                        uneven: bool) -> AttentionShares:
    """A plan's attention shares (:mod:`.attention`) and, where ``uneven`` (GPUs of different
    speeds, no ``even_slots``, no critical experts), slots per GPU chosen with them
    (:func:`joint_slots`; ``info["slots"]`` and ``info["_call_s"]`` set when some GPU keeps
    fewer than S). ``choice``: the plan's :class:`.quality.FormatChoice` (formats, bytes per GPU);
    ``seen``: ``hw`` as the engine sees it."""
    G = topo.num_gpus
    S = R // G
    fixed = sum(v for k, v in choice.memory_need.items() if k != "kv_bytes")
    slot_bytes = choice.memory_need["expert_bytes"] / S  # one slot, every layer
    memo: dict = {}

    def shares_for(counts: np.ndarray) -> AttentionShares:
        free = np.array([hw.memories[g].capacity_bytes - fixed + slot_bytes * (S - int(counts[r]))
                         for r, g in enumerate(topo.gpus)])
        return attention_shares(seen, topo, model, choice.dense_format, batch_size, context_tokens, free, memo)

    if not uneven:
        return shares_for(np.full(G, S))
    calls = call_seconds(hw, topo, model, choice.expert_format, tokens_per_call(batch_size, G, model.top_k, R), engine)
    counts, shares = joint_slots(calls, S, model.num_experts, model.num_moe_layers, shares_for)
    if (counts < S).any():
        info["slots"], info["_call_s"] = counts.tolist(), calls
    return shares


def joint_slots(call_s: np.ndarray, slots: int, num_experts: int, num_layers: int, attention,
                max_combos: int = MAX_COMBOS):
    """Slots per GPU and the attention shares that go with them: fewer slots leave a GPU more
    memory for the KV cache of more sequences, so the two are chosen together.

    Every GPU type (equal ``call_s``) keeps ``k`` of its ``slots`` (1..S, all combinations,
    at least ``num_experts`` slots in all); each combination's attention stage comes from
    ``attention(counts)`` (an :class:`.attention.AttentionShares` for the memory those slots
    leave) and the step is priced ``stage_s + num_layers x max_g k[g] call_s[g]``; the
    cheapest wins, ties to more slots. More combinations than ``max_combos``: the levelled
    :func:`slot_counts` with its attention shares.

    Returns:
        ``(counts [G], shares)``.
    """
    G = len(call_s)
    kinds, kind_of = np.unique(np.round(call_s, 15), return_inverse=True)
    n_kinds = len(kinds)
    if slots ** n_kinds > max_combos:
        counts = slot_counts(call_s, slots, slots * G - num_experts)
        return counts, attention(counts)
    best = None
    for combo in itertools.product(range(slots, 0, -1), repeat=n_kinds):  # more slots first
        counts = np.array(combo, np.int64)[kind_of]  # [G]
        if counts.sum() < num_experts:
            continue
        shares = attention(counts)
        step = shares.stage_s + num_layers * float((counts * call_s).max())
        if best is None or step < best[0] * (1 - 1e-9):
            best = (step, counts, shares)
    return best[1], best[2]


def trim_slots(phy2log: np.ndarray, counts: np.ndarray, load: np.ndarray,
               call_s: np.ndarray | None = None) -> np.ndarray:
    """``phy2log`` with ``S - counts[g]`` slots of every GPU g emptied (-1) in every layer
    (see the module docstring), the slowest GPUs (``call_s``) first; ``load [L, E]`` picks
    the copies: the coldest copy of a replicated expert is emptied, and where a GPU has none,
    its hottest expert swaps places with the coldest replica on the fastest GPU that holds one."""
    out = phy2log.copy()
    L, R = out.shape
    G = len(counts)
    S = R // G
    speed_order = np.argsort(np.zeros(G) if call_s is None else call_s, kind="stable")  # fastest first
    for l in range(L):
        row = out[l]
        copies = np.bincount(row[row >= 0], minlength=load.shape[1])
        for g in speed_order[::-1].tolist():
            mine = list(range(g * S, (g + 1) * S))
            for _ in range(S - int(counts[g])):
                spare = [s for s in mine if row[s] >= 0 and copies[row[s]] > 1]
                if not spare:
                    spare = [_swap_in(row, copies, load[l], g, S, speed_order.tolist())]
                s = min(spare, key=lambda s: (load[l, row[s]] / copies[row[s]], s))
                copies[row[s]] -= 1
                row[s] = -1
    return out


def _swap_in(row: np.ndarray, copies: np.ndarray, load: np.ndarray, g: int, S: int, order: list[int]) -> int:
    """Bring a replica onto GPU ``g`` (whose experts all have one copy): swap its hottest expert
    with the coldest copy of a replicated expert that ``g`` does not hold, on the first GPU of
    ``order`` (fastest first) that has one. Returns ``g``'s slot that now holds the replica."""
    mine = np.arange(g * S, (g + 1) * S)
    mine = mine[row[mine] >= 0]
    s = int(mine[np.argmax(load[row[mine]])])  # the hottest expert of g (the first of equals)
    held = set(row[mine].tolist())
    best = None
    for h in order:
        if h == g:
            continue
        for t in range(h * S, (h + 1) * S):
            y = int(row[t])
            if y >= 0 and copies[y] > 1 and y not in held and (best is None or load[y] / copies[y] < best[0]):
                best = (load[y] / copies[y], t)
        if best is not None:
            break
    if best is None:
        raise ValueError(f"no replica can be moved onto GPU {g}")
    t = best[1]
    row[s], row[t] = row[t], row[s]
    return s
