"""One price for a pipeline placement over a node's GPUs (issue 19 items 1, 6, 7): the
formula :mod:`planner.multi_gpu` minimises, the multi-GPU baselines are scored by and the
engine exporters price their rounding with. No PuLP here (exporters import it).

Legend: L = MoE layers, G = the node's GPUs (G[0] = the plan's compute_device: embedding
and head), g_l = the GPU layer l runs on.

    step_s = sum_l tau_l(option of l priced on g_l)        layers, each on its GPU
           + sum_l dense_s(g_l) / L                         a layer's share of the dense work
           + sum hop(a, b) over the path G[0], g_0, ..., g_L-1, G[0]   activation hops

``tau_l`` is :func:`planner.costs.option_time` of the layer's option priced by
:func:`planner.costs.option_costs` on a Setup whose compute device is g_l (offloaded
experts cross *that* GPU's link), ``dense_s`` is :func:`planner.costs.fixed_costs` there.

Bytes per device (:func:`dense_on`): G[0] holds the embedding, the final norm and the output
head (:func:`head_bytes`: the bundle runtime keeps everything outside the decoder layers on
``compute_device``), every GPU a share of the rest of the dense weights and of the KV cache
per MoE layer it runs:

    dense_g = [g = G[0]] head + (dense + KV - head) x |{l : g_l = g}| / L
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from profiles.formats import get_format

from .setup import Setup
from .step_costs import FixedCosts

__all__ = ["node_gpus", "hop_s", "hop_matrix", "pipeline_step_s", "hops_s", "head_bytes", "dense_on"]


def node_gpus(s: Setup, accelerators: bool = True) -> list[str]:
    """The compute devices of the compute device's node the engine runs on that can hold
    layers: its GPUs, the compute device first, then (``accelerators``) its accelerators (an
    FPGA-class card holds layers in its own memory and computes the formats it states a peak
    for). The GPUs come first, so an index into the list without accelerators is one into
    the list with them."""
    c = s.compute
    if c.kind != "gpu":
        return [c.id]
    hw = s.hardware
    kinds = ("gpu", "accelerator") if accelerators else ("gpu",)
    out = [d.id for k in kinds for d in hw.devices_of_kind(k)
           if d.node == c.node and (s.engine is None or s.engine.runs_on(d.kind))]
    return [c.id] + [g for g in out if g != c.id]


def hop_s(s: Setup, src: str, dst: str, tokens: int) -> float:
    """Seconds to move ``tokens`` hidden states (bf16) from device ``src`` to ``dst``."""
    if src == dst:
        return 0.0
    hw = s.hardware
    return hw.route(hw.memory_of(src).id, hw.memory_of(dst).id).transfer_s(tokens * s.model.hidden_size * 2)


def hop_matrix(s: Setup, gpus: Sequence[str], tokens: int) -> np.ndarray:
    """``[G, G]`` :func:`hop_s` between every pair of ``gpus``."""
    return np.array([[hop_s(s, a, b, tokens) for b in gpus] for a in gpus])


def hops_s(devices: Sequence[int], hop: np.ndarray) -> float:
    """Hop seconds along G[0] (embedding), the layers' GPUs in order, G[0] (head)."""
    path = [0, *devices, 0]
    return sum(float(hop[a, b]) for a, b in zip(path, path[1:]))


def pipeline_step_s(layer_s: Sequence[float], dense_s: Sequence[float], devices: Sequence[int],
                    hop: np.ndarray) -> float:
    """Seconds per decode step of a pipeline placement (the module docstring's formula).

    Args:
        layer_s: ``[L]`` each layer's option seconds, priced on its GPU.
        dense_s: ``[G]`` the whole model's dense seconds per step on each GPU (at the plan's
            dense format).
        devices: ``[L]`` each layer's GPU, an index into G.
        hop: ``[G, G]`` :func:`hop_matrix`.
    """
    L = len(devices)
    layers = sum(float(t) for t in layer_s)
    dense = sum(float(dense_s[g]) / L for g in devices)
    return layers + dense + hops_s(devices, hop)


def head_bytes(s: Setup, fm: str) -> float:
    """Bytes of the weights outside the decoder layers at dense format ``fm``, as
    :func:`planner.step_costs.fixed_costs` counts them: the input embedding (looked up; a tied
    one counts once, as the head), the final norm and the output head."""
    m = s.model
    per_param = get_format(fm).bits_per_weight / 8
    looked_up = 0.0 if m.tie_word_embeddings else float(m.embedding_params) * per_param
    head = float(m.embedding_params if m.tie_word_embeddings else m.lm_head_params) + m.hidden_size  # + final norm
    return looked_up + s.kernel_factor(s.compute, fm) * head * per_param


def dense_on(fc: FixedCosts, head: float, layers: int, L: int, first: bool) -> float:
    """Dense + KV bytes on a device that runs ``layers`` of the ``L`` MoE layers (the module
    docstring's ``dense_g``); ``first``: it is G[0], which holds the ``head`` bytes."""
    return (head if first else 0.0) + (fc.dense_bytes + fc.kv_bytes - head) * layers / L
