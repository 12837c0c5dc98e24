"""Dropped experts (PreMoe-style task-specific plans): a trace as a plan that drops experts runs it.

A plan may drop experts a task rarely uses (planner.task). At run time the router takes its
top-k among the kept experts; a trace records only each token's top-k, so the planner and the
simulator read a dropped expert's slot as a zero-computation expert (an id >= E: nothing
runs, its gate weight is lost, the token runs its other experts). For the rare experts
a task-specific plan drops, the difference is the rare token's one expert call.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from .trace import Trace

__all__ = ["drop_experts"]


def drop_experts(trace: Trace, dropped: Sequence[Sequence[int]], num_experts: int) -> Trace:
    """``trace`` with every access of layer l to an expert in ``dropped[l]`` moved to a
    zero-computation id (free, in no cache): the access in top-k slot k goes to ``base + k``,
    ``base`` the first id past the trace's (so a token's ids stay distinct); ``trace`` itself
    when nothing is dropped. ``num_experts`` is the model's routed experts E."""
    if not any(len(d) for d in dropped):
        return trace
    base = max(trace.num_experts, num_experts)
    E_all = base + trace.top_k
    ids = trace.expert_ids.astype(np.int64)  # [T, L, K]
    mask = np.zeros((trace.num_layers, base), bool)  # [L, base] dropped
    for layer, experts in enumerate(dropped):
        mask[layer, list(experts)] = True
    gone = mask[np.arange(trace.num_layers)[None, :, None], ids]  # [T, L, K]
    out = np.where(gone, base + np.arange(trace.top_k)[None, None, :], ids)
    dtype = trace.expert_ids.dtype if E_all <= np.iinfo(trace.expert_ids.dtype).max else np.int32
    return dataclasses.replace(trace, expert_ids=out.astype(dtype), num_experts=E_all)
