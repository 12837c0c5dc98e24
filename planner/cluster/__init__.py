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
* load: ``load[l, g] = sum_e w[l, e] P[l, e, g]``; straggler ``max_g load[l, g] / speed[g]``
  (``speed``: each GPU's relative expert speed at the decode batch, all 1 on one GPU type);
* traffic: ``sum_l sum_ij C[l, i, j] P[l, i]^T D P[l + 1, j]`` (link seconds), and the
  fractions of token pairs whose consecutive experts sit on another GPU / another node;
* memory: S x L experts + dense weights + KV cache per GPU within its HBM;
* formats: the experts' (critical ones at full precision) and the dense weights' within the
  quality budget, importance-weighted as the offload planner counts it (:mod:`.quality`).

Objective: minimise traffic subject to ``max load / speed <= cap[l]`` (the straggler time of
EPLB global, speed-aware on mixed GPUs, plus a slack); the plan reports a lower bound and the
gap. The modules, in the order a plan is made:

* :mod:`.topology`: the GPUs as EP ranks and the link cost ``D`` between them;
* :mod:`.workload`: load and transitions from a trace, the load unseen tokens are expected
  to bring, DeepSeek's group-limited routing imposed on a trace that lacks it;
* :mod:`.quality`: the number formats under the quality budget and ``--critical``;
* :mod:`.speed`: each GPU's expert speed at the decode batch (the shared perf model);
* :mod:`.metrics`: straggler load and traffic of a placement;
* :mod:`.packing`: bin packing and swaps under load caps, the placer's building blocks;
* :mod:`.placement`: our placement (a decomposition warm-started from EPLB global);
* :mod:`.exact`: the layer chain's optimum where every layer's layouts can be listed;
* :mod:`.bound`: a lower bound on the traffic at the load cap (relaxation, MILP or exact);
* :mod:`.offload`: when the experts do not fit, each GPU's own experts planned as one node
  plans them (resident, cached, CPU-run, streamed, per format), priced per layer by its slowest GPU;
* :mod:`.attention`: each GPU's share of the sequences for data-parallel attention (fewer, or
  none, on slow GPUs), and :mod:`.slots`: fewer expert slots on slow GPUs, chosen with it;
* :mod:`.layout_plan`: a placement to a :class:`~planner.plan.Plan`;
* :mod:`.request`: what a cluster plan is asked for, checked, and whether EP applies;
* :mod:`.assemble`: a request to a :class:`~planner.plan.Plan` and the baselines' plans;
* :mod:`.render`: what `planner optimize` prints for it.
"""

from .assemble import METHODS, ClusterResult, plan_cluster, plan_from_placement
from .metrics import placement_metrics
from .placement import place_experts, place_for
from .render import cluster_summary, render_cluster
from .request import ClusterRequest, cluster_applies, default_redundant, parallel_mode
from .topology import Topology, topology
from .workload import expected_load, group_limited, sequence_loads, workload_arrays

__all__ = [
    "METHODS",
    "ClusterRequest",
    "ClusterResult",
    "Topology",
    "cluster_applies",
    "cluster_summary",
    "default_redundant",
    "expected_load",
    "group_limited",
    "parallel_mode",
    "place_experts",
    "place_for",
    "placement_metrics",
    "plan_cluster",
    "plan_from_placement",
    "render_cluster",
    "sequence_loads",
    "topology",
    "workload_arrays",
]
