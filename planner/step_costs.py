"""Costs of a whole decode step: what no expert decision changes (dense work, KV cache,
workspace, the runtime's own memory), the usable capacity of each memory, and a step's time
from one option per layer (:mod:`planner.costs` prices the options).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from profiles.formats import get_format
from profiles.perf import dense_step_s

from .setup import OptionTable, Setup

__all__ = ["FixedCosts", "capacity", "fixed_costs", "option_time", "runtime_memory", "step_time"]


@dataclass(frozen=True)
class FixedCosts:
    """Costs that no expert decision changes, for one dense-weight format."""

    dense_format: str
    dense_s: float  # compute-device seconds per step: attention/dense weights, shared experts, KV reads
    dense_bytes: float  # dense weights (shared experts included) on the compute device
    kv_bytes: float  # KV cache for context x batch, on the compute device
    workspace_bytes: float  # activations + staging_bytes + runtime_bytes
    error: float  # quality error charged to the dense weights
    staging_bytes: float = 0.0  # of the workspace: experts the runtime holds in flight (runtime_memory)
    runtime_bytes: float = 0.0  # of the workspace: the runtime's scratch and own memory (runtime_memory)
    kv_on_host: bool = False  # the KV cache is kept in host DRAM (planner.kv_offload) ...
    kv_host_bytes: float = 0.0  # ... and takes these bytes there (kv_bytes is 0 then)


def fixed_costs(s: Setup, dense_format: str, kv_on_host: bool = False) -> FixedCosts:
    """Dense (non-expert) work of one decode step at ``dense_format``; ``kv_on_host``: with the
    KV cache in host DRAM, read where the engine reads it there (:meth:`Setup.kv_host`)."""
    m, B = s.model, s.batch_size
    kv_bytes = float(m.kv_cache_bytes(s.context_tokens, batch_size=B))
    site = s.kv_host() if kv_on_host else None
    activations = B * (m.hidden_size * 4 + m.expert_intermediate_size * 2) * 2 * 8.0  # bf16 activations, margin 8x
    staging, runtime = runtime_memory(s)
    # a CPU runs int8/int4 dense matrices in ONNX Runtime sessions too (kernel_factor); an
    # untied embedding table is only looked up
    looked_up = 0.0 if m.tie_word_embeddings else float(m.embedding_params) * get_format(dense_format).bits_per_weight / 8
    dense_bytes = looked_up + s.kernel_factor(s.compute, dense_format) * (float(m.dense_bytes(dense_format)) - looked_up)
    return FixedCosts(dense_format=dense_format,
                      dense_s=dense_step_s(s.compute, m, dense_format, B, kv_bytes, prefill=s.phase == "prefill",
                                           kv_on_host=site),
                      dense_bytes=dense_bytes, kv_bytes=0.0 if kv_on_host else kv_bytes,
                      workspace_bytes=activations + staging + runtime, error=s.quant_error[dense_format],
                      staging_bytes=staging, runtime_bytes=runtime, kv_on_host=kv_on_host,
                      kv_host_bytes=kv_bytes if kv_on_host else 0.0)


def runtime_memory(s: Setup) -> tuple[float, float]:
    """``(staging, runtime)`` bytes the engine's runtime holds on the compute device besides
    what a plan places (its profile's ``runtime_memory``; ``(0, 0)`` without one).

    ``staging = staging_experts x the widest expert the device may hold`` (every format the
    engine runs there, whether or not the plan fetches: no expert decision changes it, and
    at most ``staging_experts`` experts' bytes are counted for a plan that fetches none), an
    expert a CPU builds into an ONNX Runtime session held twice over while it is built (its
    read buffer and the session's copy), or, on a CPU, ``session_build_experts x E x`` the widest
    expert it runs in ONNX Runtime sessions, if that is more (a layer's session built at load,
    when nothing is staged); ``runtime = fixed_bytes + workspace_experts x the
    widest expert's stored bytes``, counted where the compute device's memory is the host's
    (a CPU, or a GPU sharing it): the process's own memory is host memory, which a GPU's
    plan leaves to the host reserve.
    """
    spec = s.engine.profile.runtime_memory if s.engine is not None else None
    if spec is None:
        return 0.0, 0.0
    stored = held = in_session = 0.0
    for fm in s.formats:
        if not s.runs(s.compute, fm):
            continue
        f = s.kernel_factor(s.compute, fm)
        stored = max(stored, s.expert_bytes(fm))
        held = max(held, s.expert_bytes(fm) * (1.0 if f == 1.0 else 1.0 + f))
        if f != 1.0:
            in_session = max(in_session, s.expert_bytes(fm))
    staging = spec.staging_experts.value * held
    if spec.session_build_experts is not None and s.compute.kind == "cpu":
        # at load nothing is staged yet: the larger of the two
        staging = max(staging, spec.session_build_experts.value * s.model.num_experts * in_session)
    scratch = spec.workspace_experts.value * stored if spec.workspace_experts is not None else 0.0
    own = spec.fixed_bytes.value + scratch if s.compute.kind == "cpu" or s.unified else 0.0
    return staging, own


def capacity(s: Setup, memory_id: str) -> float:
    """Usable bytes of a memory pool after the runtime reserve."""
    mem = s.hardware.memories[memory_id]
    if memory_id == s.hardware.memory_of(s.compute.id).id:
        frac, fixed = s.device_reserve  # CUDA context, cuBLAS workspace, allocator slack
    elif mem.tier == "dram":
        frac, fixed = s.host_reserve  # the OS and the serving process
    else:
        frac, fixed = 0.0, 0.0
    return max(mem.capacity_bytes * (1 - frac) - fixed, 0.0)


def option_time(t: OptionTable, prefetch: bool) -> np.ndarray:
    """``[N]`` seconds each option of a layer lasts per decode step (FlexGen's max() over the
    device, the host CPU and the link; see :func:`planner.layer_schedule.expected_max` and :func:`planner.layer_schedule.averaged_max`).

    With prefetch, the predicted share r of the misses is fetched while the previous layer
    computes, so the device no longer waits for it, but the link carries the whole predicted
    set (right and wrong guesses) on top of the remaining demand misses; that traffic is
    charged to the layer it serves.
    """
    return t.tau_prefetch if prefetch else t.tau


def step_time(s: Setup, tables: Sequence[OptionTable], choice: Sequence[int], fixed: FixedCosts,
              prefetch: bool) -> tuple[float, np.ndarray]:
    """Seconds of one decode step for one option per layer, and ``[L]`` per-layer times."""
    tau = np.array([option_time(t, prefetch)[w] for t, w in zip(tables, choice)])
    return float(tau.sum() + fixed.dense_s), tau
