"""How fast each EP rank serves expert tokens: the per-GPU speed that load balance divides by.

Shape legend: G = GPUs (EP ranks), E = routed experts, R = physical experts per layer,
K = top-k.

A GPU's speed is tokens per second of one expert call at the decode batch on it, from the
shared performance model (:func:`profiles.perf.expert_calls_s`, through the plan's engine
profile): with ``n = batch_size x G x K / R`` tokens per call (a physical expert's share of a
decode step), ``speed[g] = n / expert_call_s(g, format, n)``. Balancing *time* means
``load[g] / speed[g]``: a replica on a faster GPU may take more tokens. Speeds are
normalised to mean 1, so on a cluster of one GPU type they are all 1 and time balance is
token balance (the speed-blind planner, exactly).

The linear model (seconds proportional to tokens) is the planner's view; the simulator
prices every call on its own GPU with its own token count.
"""

from __future__ import annotations

import numpy as np

from profiles.engines import load_engine
from profiles.hardware import Hardware
from profiles.models import ModelSpec
from profiles.perf import expert_calls_s

from .topology import Topology

__all__ = ["call_seconds", "gpu_speeds", "tokens_per_call"]


def tokens_per_call(batch_size: int, num_gpus: int, top_k: int, num_physical: int) -> float:
    """Tokens one physical expert gets in a decode step: ``batch_size`` sequences per GPU
    (data-parallel attention), each routed to ``top_k`` of the ``num_physical`` slots."""
    return max(batch_size * num_gpus * top_k / num_physical, 1.0)


def gpu_speeds(hw: Hardware, topo: Topology, model: ModelSpec, expert_format: str, tokens: float,
               engine: str | None = None) -> np.ndarray:
    """``[G]`` relative expert speed of every rank (mean 1; all 1 on one GPU type).

    Args:
        hw: the hardware (bare; ``engine`` is applied here, as the simulator applies the plan's).
        topo: ranks in order.
        model: for an expert's bytes and FLOPs.
        expert_format: the experts' storage format.
        tokens: tokens per expert call (:func:`tokens_per_call`).
        engine: engine profile name (``None``: the bundle runtime; an EP plan records its own, SGLang by default).
    """
    speed = tokens / call_seconds(hw, topo, model, expert_format, tokens, engine)  # [G] tokens per second

    speed = speed / speed.mean()
    # one GPU type: exactly 1, so the speed-aware placer reproduces the speed-blind one bit for bit
    return np.ones_like(speed) if np.allclose(speed, speed[0], rtol=1e-9) else speed


def call_seconds(hw: Hardware, topo: Topology, model: ModelSpec, expert_format: str, tokens: float,
                 engine: str | None = None) -> np.ndarray:
    """``[G]`` seconds of one expert call of ``tokens`` tokens on every rank (arguments as
    :func:`gpu_speeds`): what a slot costs a GPU per layer when its expert gets that share."""
    seen = load_engine(engine).apply(hw)
    weight_bytes = model.expert_bytes(expert_format)
    n = np.array([float(tokens)])
    return np.array([float(expert_calls_s(seen.devices[_compute_of(seen, g)], expert_format, weight_bytes,
                                          model.expert_flops_per_token, n)[0]) for g in topo.gpus])


def _compute_of(hw: Hardware, memory_id: str) -> str:
    """The GPU device whose memory is ``memory_id`` (topology ranks are memory ids)."""
    for d in hw.devices_of_kind("gpu"):
        if hw.memory_of(d.id).id == memory_id:
            return d.id
    return memory_id
