"""Routing drift: a workload whose hot experts change partway through (a task shift).

The simulator replays a trace's sequences as requests in order, so relabelling the experts
of the later sequences makes the routing shift mid-run: the same skew, temporal reuse and
inter-layer affinity, but other experts are hot. Each layer gets its own random permutation
of expert ids (seeded), applied to every token of the sequences from ``at`` on.

    drifted = drift(trace, seed=0)   # second half of the sequences relabelled
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import InputError
from .trace import Trace

__all__ = ["drift"]


def drift(trace: Trace, seed: int = 0, at: float = 0.5) -> Trace:
    """``trace`` with the experts of sequences ``ceil(at * S)`` onwards relabelled per layer.

    Args:
        trace: the routing trace (``expert_ids [T, L, K]``, ``seq_lens [S]``).
        seed: seed of the per-layer permutations ``perm [L, E]``.
        at: share of the sequences, in (0, 1), left as recorded.

    Returns:
        A new trace: token t of a drifted sequence routes to ``perm[l, expert_ids[t, l, k]]``;
        gate weights, phases and lengths unchanged; ``meta["drift"]`` records the shift.
    """
    if not 0.0 < at < 1.0:
        raise InputError("the drift point must be inside the trace", key="drift.at", value=at,
                         expected="a share of the sequences in (0, 1)", fix="pass e.g. 0.5 (halfway)")
    S, E, L = len(trace.seq_lens), trace.num_experts, trace.num_layers
    first = int(np.ceil(at * S))  # first drifted sequence
    start = int(np.sum(trace.seq_lens[:first]))  # its first token
    perm = np.stack([np.random.default_rng([seed, l]).permutation(E) for l in range(L)])  # [L, E]
    ids = np.array(trace.expert_ids, copy=True)
    late = ids[start:]  # [T', L, K]; ids >= E (zero experts) keep their id
    moved = np.where(late < E, perm[np.arange(L)[None, :, None], np.minimum(late, E - 1)], late)
    ids[start:] = moved.astype(ids.dtype)
    meta = {**trace.meta, "drift": {"from_sequence": first, "from_token": start, "seed": seed}}
    return replace(trace, expert_ids=ids, meta=meta, source=f"{trace.source} (drifted at sequence {first})")
