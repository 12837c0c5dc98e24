"""The GPUs of a cluster as expert-parallel ranks, and the link cost between every two.

Shape legend: G = GPUs (EP ranks), N = nodes, H = hidden size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from profiles.errors import InputError
from profiles.hardware import Hardware

__all__ = ["ACTIVATION_BYTES", "Topology", "topology"]

# Activations travel between GPUs in bf16: 2 bytes per hidden element.
ACTIVATION_BYTES = 2


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
    """

    gpus: tuple[str, ...]
    node_of: np.ndarray
    nodes: tuple[str, ...]
    cost_s_per_byte: np.ndarray

    @property
    def num_gpus(self) -> int:
        return len(self.gpus)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    def token_cost_s(self, hidden_size: int) -> np.ndarray:
        """``[G, G]`` seconds to move one token's hidden state (H x 2 bytes) between two GPUs."""
        return self.cost_s_per_byte * hidden_size * ACTIVATION_BYTES


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
    for a in range(G):
        for b in range(a + 1, G):
            cost[a, b] = cost[b, a] = 1.0 / hw.route(gpus[a], gpus[b]).bottleneck_bytes_per_s
    return Topology(gpus=tuple(gpus), node_of=node_of, nodes=tuple(node_names), cost_s_per_byte=cost)
