"""Planned low-bit copies: what a layer whose low-gate misses load a narrower copy costs, priced once.

HOBBIT's observation: an expert the router weights lightly contributes little to the token's
output, so on a cache miss it may be served by a low-bit copy (int4, int2) that moves a
fraction of the bytes. A plan says per layer (``LayerPlan.miss_copy``) the copy's format and
the gate weight below which a miss loads it; the rule is :func:`loads_copy`, the same in the
simulator and the bundle runtime.

- **Which experts**: the layer's ``fetch`` experts (those the cache serves and a miss copies
  to the compute device). Each keeps its full copy at home (host DRAM or NVMe) and gains a
  copy at ``format`` in host DRAM (``host_bytes`` per expert, budgeted in the host pool).
- **Which misses**: one whose gate weight (the router's weight for that token's choice) is
  below ``gate_below`` moves the copy instead of the full weights. Later accesses that hit a
  slot holding a copy run the copy (its kernel, its error) until it is evicted; a miss never
  upgrades it. A cache slot is sized for the full format either way (a copy fills a slot), so
  the cache's memory is the plain plan's.
- **Price of one expert** with ``s`` = the share of its accesses that are low-gate (count),
  ``g`` = the share of its gate mass (importance) they carry, ``m`` = its miss rate:

  fetch bytes per miss      ``s copy + (1 - s) full``      (a miss is low-gate with the access's odds)
  importance served by copy ``m g + (1 - m) s``            (low-gate misses; hits on a slot a
                                                            low-gate miss filled, a share ``s`` of slots)
  quality cost              ``w (m g + (1 - m) s) (err(copy) - err(full))`` over the plain plan's

  The slot share is the fills' share: hits land on copies as often as misses made them
  (exact when an access's gate is independent of the slot's age). Calls are priced at the full
  format in the planner (a copy's call is no slower where the link binds, which is where copies
  pay); the simulator runs a copy at its own kernel.

Gate weights come from the workload (recorded traces and the synthetic generator carry
them, ``Trace.gate_weights``); :func:`low_gate_shares` turns them into ``s`` and ``g`` per
(layer, expert). A workload without gate weights has no low-gate accesses: no copy pays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import get_format
from .models import ModelSpec

__all__ = ["COPY_FORMATS", "MissCopyPrice", "copy_served_share", "loads_copy", "low_gate_shares", "miss_copy_price"]

# formats a copy may take (narrower than the expert's own; the runtime quantises them)
COPY_FORMATS = ("int4", "int2")


def loads_copy(gate: float, gate_below: float) -> bool:
    """Whether a miss with router weight ``gate`` loads the low-bit copy (simulator and runtime)."""
    return gate < gate_below


def low_gate_shares(expert_ids: np.ndarray, gate_weights: np.ndarray | None, num_experts: int,
                    gate_below: float) -> tuple[np.ndarray, np.ndarray]:
    """``(s, g)``, two ``[L, E]`` arrays: per (layer, expert) the share of its accesses whose gate
    weight is below ``gate_below`` and the share of its gate mass they carry (0 for an expert
    never used, and everywhere without gate weights). ``expert_ids``/``gate_weights``:
    ``[T, L, K]``; ids at or above ``num_experts`` (zero-computation experts) are skipped."""
    ids = np.asarray(expert_ids, np.int64)
    T, L, K = ids.shape
    s, g = np.zeros((L, num_experts)), np.zeros((L, num_experts))
    if gate_weights is None:
        return s, g
    gates = np.asarray(gate_weights, np.float64)
    real = (ids >= 0) & (ids < num_experts)
    cell = (np.arange(L)[None, :, None] * num_experts + np.where(real, ids, 0))[real]
    gw = gates[real]
    low = gw < gate_below  # loads_copy, vectorised
    n = L * num_experts
    count = np.bincount(cell, minlength=n)
    mass = np.bincount(cell, weights=gw, minlength=n)
    low_count = np.bincount(cell, weights=low.astype(np.float64), minlength=n)
    low_mass = np.bincount(cell, weights=np.where(low, gw, 0.0), minlength=n)
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
    ``low_count`` of its accesses low-gate (:func:`low_gate_shares`)."""
    if get_format(copy_format).bits_per_weight >= get_format(fmt).bits_per_weight:
        raise ValueError(f"a {copy_format} copy is no narrower than its expert's {fmt}")
    full, copy = float(model.expert_bytes(fmt)), float(model.expert_bytes(copy_format))
    s = float(low_count)
    return MissCopyPrice(fetch_bytes=s * copy + (1.0 - s) * full, full_bytes=full, copy_bytes=copy, host_bytes=copy)
