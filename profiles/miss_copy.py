"""Planned low-bit copies: what a layer whose low-gate misses load a narrower copy costs, priced once.

HOBBIT's observation: an expert the router weights lightly contributes little to the token's
output, so on a cache miss it may be served by a low-bit copy (int4, int2) that moves a
fraction of the bytes. A plan says per layer (``LayerPlan.miss_copy``) the copy's format and
the gate weight below which a miss loads it.

- **Which experts**: the layer's ``fetch`` experts (those the cache serves and a miss copies
  to the compute device). Each keeps its full copy at home (host DRAM or NVMe) and gains a
  copy at ``format`` in host DRAM (``host_bytes`` per expert, budgeted in the host pool).
- **Which misses** (the rule of simulator, runtime and planner: :func:`loads_copy` of
  :func:`call_gates`): an expert runs once per step for every token of the step that chose it
  (one *call*); the call's miss moves the copy when **every** one of those tokens weights the
  expert below ``gate_below``, i.e. when the call's largest gate weight is below it. Why the
  maximum: the copy's output error reaches every token the call serves, scaled by that
  token's gate, so a call is as sensitive as its most dependent token; a token that leans on
  the expert never gets the copy because a lighter token of the same step missed first. The
  rule depends on the set of the step's tokens alone (not on their order, as "the first
  access decides" would, nor on how many light tokens dilute a heavy one, as the mean would),
  and at batch 1 it is the token's own gate.
- **Later accesses** that hit a slot holding a copy run the copy (its kernel, its error) until
  it is evicted; a miss never upgrades it, and a prefetch fills a slot with the full weights.
  A cache slot is sized for the full format either way (a copy fills a slot), so the cache's
  memory is the plain plan's.
- **Price of one expert** with ``s`` = the share of its calls that load the copy (count),
  ``g`` = the share of its gate mass (importance) they carry, ``m`` = its miss rate:

  fetch bytes per miss      ``s copy + (1 - s) full``      (a miss loads the copy with the call's odds)
  call seconds              ``s t(copy) + (1 - s) t(full)`` (misses and hits on copy slots alike)
  importance served by copy ``m g + (1 - m) s``            (low-gate misses; hits on a slot a
                                                            low-gate miss filled, a share ``s`` of slots)
  quality cost              ``w (m g + (1 - m) s) (err(copy) - err(full))`` over the plain plan's

  The slot share is the fills' share: hits land on copies as often as misses made them
  (exact when a call's gates are independent of the slot's age), so a share ``s`` of all the
  expert's calls, hits and misses, run the copy's kernel (:func:`with_copies`): its own kernel
  path, ``t(copy)`` = the engine's cached-expert call at the copy's format, the price the
  simulator charges each copy call.

Gate weights come from the workload (recorded traces and the synthetic generator carry
them, ``Trace.gate_weights``); :func:`low_gate_shares` turns them into ``s`` and ``g`` per
(layer, expert), grouping the tokens into the steps they run in (``step``; at batch 1 each
token is a step). A workload without gate weights has no low-gate calls: no copy pays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import get_format
from .models import ModelSpec

__all__ = ["COPY_FORMATS", "MissCopyPrice", "call_gates", "copy_served_share", "loads_copy", "low_gate_shares",
           "miss_copy_price", "with_copies"]

# formats a copy may take (narrower than the expert's own; the runtime quantises them)
COPY_FORMATS = ("int4", "int2")


def loads_copy(gate: float, gate_below: float) -> bool:
    """Whether a call's miss loads the low-bit copy, ``gate`` the call's largest router weight
    (:func:`call_gates`; the module docstring's rule, the same in simulator and runtime)."""
    return gate < gate_below


def call_gates(ids, gates, num_experts: int) -> dict[int, float]:
    """Per expert called in one step at one layer, its call's largest gate weight: what
    :func:`loads_copy` decides by. ``ids``/``gates``: ``[n][K]`` (lists or arrays) the step's
    tokens' expert ids and router weights; ids outside ``[0, num_experts)`` are skipped."""
    top: dict[int, float] = {}
    for row, row_gates in zip(ids, gates):
        for e, g in zip(row, row_gates):
            e, g = int(e), float(g)
            if 0 <= e < num_experts and g > top.get(e, -1.0):
                top[e] = g
    return top


def with_copies(full, copy, share):
    """Expected seconds (or bytes) of a fetch expert's call (or miss) when a ``share`` of them
    runs (moves) the copy: ``share copy + (1 - share) full`` (elementwise)."""
    share = np.asarray(share, np.float64)
    return share * np.asarray(copy, np.float64) + (1.0 - share) * np.asarray(full, np.float64)


def low_gate_shares(expert_ids: np.ndarray, gate_weights: np.ndarray | None, num_experts: int,
                    gate_below: float, step: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(s, g)``, two ``[L, E]`` arrays: per (layer, expert) the share of its calls that load the
    copy (:func:`loads_copy` of the call's largest gate) and the share of its gate mass they
    carry (0 for an expert never called, and everywhere without gate weights).

    Args:
        expert_ids, gate_weights: ``[T, L, K]`` the workload's routing.
        num_experts: E; ids at or above it (zero-computation experts) are skipped.
        gate_below: the copy's threshold.
        step: ``[T]`` the step each token runs in (tokens of one step call an expert once);
            ``-1``: a token left out (a prompt token, when decode steps are priced). None:
            every token its own step (batch 1).
    """
    ids = np.asarray(expert_ids, np.int64)
    T, L, K = ids.shape
    s, g = np.zeros((L, num_experts)), np.zeros((L, num_experts))
    if gate_weights is None:
        return s, g
    gates = np.asarray(gate_weights, np.float64)
    step = np.arange(T) if step is None else np.asarray(step, np.int64)
    real = (ids >= 0) & (ids < num_experts) & (step >= 0)[:, None, None]
    n = L * num_experts
    cell = (np.arange(L)[None, :, None] * num_experts + np.where(real, ids, 0))[real]  # [A] (layer, expert)
    gw = gates[real]
    # one call per (step, layer, expert): its gate mass and largest gate
    call_key = np.broadcast_to(step[:, None, None], ids.shape)[real] * n + cell
    keys, call_of = np.unique(call_key, return_inverse=True)
    call_max = np.full(len(keys), -np.inf)
    np.maximum.at(call_max, call_of, gw)
    call_cell = keys % n
    call_mass = np.bincount(call_of, weights=gw, minlength=len(keys))
    low = call_max < gate_below  # loads_copy, vectorised
    count = np.bincount(call_cell, minlength=n)
    mass = np.bincount(call_cell, weights=call_mass, minlength=n)
    low_count = np.bincount(call_cell, weights=low.astype(np.float64), minlength=n)
    low_mass = np.bincount(call_cell, weights=np.where(low, call_mass, 0.0), minlength=n)
    s = np.divide(low_count, count, out=np.zeros(n), where=count > 0).reshape(L, num_experts)
    g = np.divide(low_mass, mass, out=np.zeros(n), where=mass > 0).reshape(L, num_experts)
    return s, g


def copy_served_share(miss_rate, low_count, low_gate):
    """Share of an expert's importance served by its copy: ``m g + (1 - m) s`` (module docstring)."""
    m = np.clip(np.asarray(miss_rate, np.float64), 0.0, 1.0)
    return m * np.asarray(low_gate, np.float64) + (1.0 - m) * np.asarray(low_count, np.float64)


@dataclass(frozen=True)
class MissCopyPrice:
    """What one fetch expert with a low-bit copy costs.

    Attributes:
        fetch_bytes: expected bytes one miss moves (``s copy + (1 - s) full``).
        full_bytes: bytes of a full fetch (the expert at its own format).
        copy_bytes: bytes of the copy (one fetch of a low-gate miss).
        host_bytes: bytes the copy holds in host DRAM.
    """

    fetch_bytes: float
    full_bytes: float
    copy_bytes: float
    host_bytes: float


def miss_copy_price(model: ModelSpec, fmt: str, copy_format: str, low_count: float) -> MissCopyPrice:
    """The price of a ``fetch`` expert of ``model`` at ``fmt`` with a copy at ``copy_format``,
    ``low_count`` of its calls loading the copy (:func:`low_gate_shares`)."""
    if get_format(copy_format).bits_per_weight >= get_format(fmt).bits_per_weight:
        raise ValueError(f"a {copy_format} copy is no narrower than its expert's {fmt}")
    full, copy = float(model.expert_bytes(fmt)), float(model.expert_bytes(copy_format))
    return MissCopyPrice(fetch_bytes=float(with_copies(full, copy, low_count)), full_bytes=full, copy_bytes=copy, host_bytes=copy)
