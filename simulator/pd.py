"""Prefill/decode disaggregation: a prefill pool and a decode pool, the KV cache sent between them.

Splitwise and DistServe (and SGLang's / vLLM's PD modes) run a request's prompt on one set of
GPUs and its decode steps on another, so that long prefills never stall decode steps and each
pool can have its own parallel layout. The simulator answers "what does that buy on this
cluster" by replaying the same requests through two runs of :class:`simulator.engine.
Simulation`, each under its own pool's plan and hardware:

1. **Prefill pool**: each request arrives (all at t = 0, or Poisson) and runs its prompt only
   (``SimConfig.pd_role = "prefill"``); its first output token is ready when its prefill ends
   (``t_first``).
2. **KV transfer**: the request's KV cache (``prompt tokens x KV bytes per token``, MLA
   included, :meth:`profiles.models.ModelSpec.kv_bytes_per_token`) crosses from the prefill
   pool to the decode pool over the cluster's route between a GPU of each pool
   (:meth:`profiles.hardware.Hardware.route`: the NICs and the fabric switch), starting at
   ``t_first``. Each request is sent to decode GPU ``i mod G_decode`` (data-parallel
   attention takes requests round robin) and transfers to one GPU go one after the other
   (one NIC each; GPUDirect RDMA, so different GPUs' transfers do not share a link).
3. **Decode pool**: the request arrives when its KV has landed, already prefilled
   (``pd_role = "decode"``: its prompt's KV blocks are claimed on admission, no prefill
   runs) and decodes its remaining tokens under the decode pool's scheduler and KV cache.

A request's tokens are its first token from the prefill pool and the decode pool's tokens,
so TTFT is the prefill pool's (queue and prompt) and TPOT counts the KV transfer and the
decode pool's queue in its first gap, as a user sees it. The combined metrics keep the
names and the ``per_request`` shape of :func:`simulator.metrics.summarise`, so the goodput
ladder (:mod:`simulator.goodput`) reads them as it reads a colocated run.

:func:`pool_profiles` cuts a cluster profile with one node group of ``N`` identical nodes
into the two pools' profiles (``P`` and ``N - P`` nodes); the sweep's ``pd_split`` knob uses it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np

from planner.plan import Plan
from profiles.errors import InputError
from profiles.hardware import Hardware
from profiles.models import ModelSpec
from profiles.workload.trace import DECODE, Trace

from .engine import SimConfig, simulate
from .metrics import SimReport, percentiles

__all__ = ["PDReport", "kv_route_s", "pool_profiles", "simulate_disaggregated"]


@dataclass(frozen=True)
class PDReport:
    """A disaggregated run: the combined ``metrics`` (the names of a :class:`SimReport`'s) and
    each pool's own report."""

    metrics: dict
    prefill: SimReport
    decode: SimReport

    @property
    def serving(self) -> dict:
        """The decode pool's serving record (its KV cache is the one that fills up)."""
        return self.decode.serving or {}


def pool_profiles(doc: dict, prefill_nodes: int, key: str = "pd_split") -> tuple[dict, dict]:
    """The prefill and decode pools' profile documents of a cluster profile document ``doc``
    whose only node group holds ``N`` nodes: ``prefill_nodes`` and ``N - prefill_nodes`` of them."""
    groups = doc.get("nodes") or []
    if len(groups) != 1:
        raise InputError("prefill/decode pools are cut from a cluster of one node type", key=key,
                         value=f"{len(groups)} node groups in {doc.get('name')!r}",
                         expected="a profile with one entry under nodes (count N)",
                         fix="vary pd_split on a profile like cluster-h100-2node")
    total = int(groups[0].get("count", 1))
    if total < 2:
        raise InputError("prefill/decode pools need two nodes or more, one for each pool", key=key,
                         value=f"{total} node in {doc.get('name')!r}", expected="a profile whose node group counts 2+",
                         fix="vary nodes up (nodes: [2, 4]) or use a profile like cluster-h100-2node")
    if not 1 <= prefill_nodes < total:
        raise InputError("the prefill pool must leave the decode pool at least one node", key=key,
                         value=prefill_nodes, expected=f"an integer in [1, {total - 1}] ({total} nodes)",
                         fix="give fewer prefill nodes, or vary nodes up")
    pools = []
    for role, count in (("prefill", prefill_nodes), ("decode", total - prefill_nodes)):
        d = copy.deepcopy(doc)
        d["name"] = f"{doc['name']}-{role}{count}"
        d["description"] = f"{role} pool of {doc['name']}: {count} of its {total} nodes"
        d["nodes"][0]["count"] = count
        pools.append(d)
    return pools[0], pools[1]


def kv_route_s(cluster: Hardware, prefill_nodes: int) -> tuple[float, float]:
    """``(latency_s, bytes_per_s)`` of the route from a GPU of the first node to a GPU of node
    ``prefill_nodes`` (the decode pool's first) in the whole cluster ``cluster``."""
    gpus = cluster.devices_of_kind("gpu")
    nodes = sorted({g.node for g in gpus}, key=lambda n: [g.node for g in gpus].index(n))
    if len(nodes) <= prefill_nodes:
        raise InputError("the cluster has too few nodes for its prefill pool", key="pd_split", value=prefill_nodes,
                         expected=f"fewer than its {len(nodes)} nodes", fix="give fewer prefill nodes")
    src = next(g for g in gpus if g.node == nodes[0])
    dst = next(g for g in gpus if g.node == nodes[prefill_nodes])
    route = cluster.route(cluster.memory_of(src.id).id, cluster.memory_of(dst.id).id)
    return route.latency_s, route.bottleneck_bytes_per_s


def simulate_disaggregated(prefill: tuple[Plan, Hardware], decode: tuple[Plan, Hardware], model: ModelSpec,
                           trace: Trace, cfg: SimConfig, kv_route: tuple[float, float]) -> PDReport:
    """Replay ``trace`` through a prefill pool and a decode pool (see the module docstring).

    Args:
        prefill, decode: each pool's plan and hardware.
        cfg: the run (requests, arrivals, scheduler, seed ...); each pool runs it with its role.
        kv_route: ``(latency_s, bytes_per_s)`` between the pools (:func:`kv_route_s`).
    """
    if cfg.arrivals_s is not None or cfg.pd_role is not None:
        raise InputError("a disaggregated run sets each pool's arrivals and role itself", key="SimConfig",
                         value=(cfg.arrivals_s is not None, cfg.pd_role), fix="leave arrivals_s and pd_role unset")
    pre = simulate(*prefill, model, trace, dataclasses.replace(cfg, pd_role="prefill"))
    first = np.array([r["arrival_s"] + r["ttft_s"] for r in pre.metrics["per_request"]])
    prompt = _prompt_tokens(trace, len(first))
    latency_s, bw = kv_route
    kv_bytes = prompt * model.kv_bytes_per_token()
    gpus = max(len(decode[1].devices_of_kind("gpu")), 1)
    landed = np.zeros(len(first))
    free = np.zeros(gpus)  # when each decode GPU's NIC is next free
    for i in np.argsort(first, kind="stable"):
        g = i % gpus
        start = max(first[i], free[g])
        free[g] = landed[i] = start + latency_s + kv_bytes[i] / bw
    dec = simulate(*decode, model, trace, dataclasses.replace(cfg, pd_role="decode",
                                                              arrivals_s=tuple(float(t) for t in landed)))
    return PDReport(_combined(pre, dec, first, landed, kv_bytes), pre, dec)


def _prompt_tokens(trace: Trace, n: int) -> np.ndarray:
    """``[n]`` prompt tokens of the ``n`` requests (the trace's sequences, wrapping around)."""
    starts = trace.seq_starts()
    prompt = np.add.reduceat((trace.phase != DECODE).astype(np.int64), starts)
    return prompt[np.arange(n) % len(starts)].astype(float)


def _combined(pre: SimReport, dec: SimReport, first: np.ndarray, landed: np.ndarray, kv_bytes: np.ndarray) -> dict:
    """The run as a user sees it: first token from the prefill pool, the rest from the decode pool."""
    per_request = []
    ttft, tpot, latency, outputs = [], [], [], 0
    # the decode pool lists its requests in the order they arrived (landed, then request id)
    order = sorted(range(len(landed)), key=lambda i: (landed[i], i))
    dec_of = [None] * len(order)
    for j, i in enumerate(order):
        dec_of[i] = dec.metrics["per_request"][j]
    for p, d, t0 in zip(pre.metrics["per_request"], dec_of, first.tolist()):  # plain floats: JSON
        tokens = [t0] if p["ttft_s"] is not None else []
        if d["ttft_s"] is not None:
            t = d["arrival_s"] + d["ttft_s"]
            tokens.append(t)
            for gap in d["tpot_s"]:
                t += gap
                tokens.append(t)
        outputs += len(tokens)
        gaps = [b - a for a, b in zip(tokens, tokens[1:])]
        per_request.append({"arrival_s": p["arrival_s"], "queue_s": p["queue_s"],
                            "ttft_s": t0 - p["arrival_s"] if tokens else None, "tpot_s": gaps})
        if tokens:
            ttft.append(t0 - p["arrival_s"])
            latency.append(tokens[-1] - p["arrival_s"])
            if gaps:
                tpot.append(sum(gaps) / len(gaps))
    makespan = max(pre.metrics["makespan_s"], dec.metrics["makespan_s"], 1e-300)
    transfer = landed - first
    pm, dm = pre.metrics, dec.metrics
    return {
        "requests": len(per_request), "output_tokens": outputs, "makespan_s": makespan,
        "tokens_per_s": outputs / makespan, "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
        "latency_s": percentiles(latency), "expert_hit_rate": dm["expert_hit_rate"],
        "bytes_moved": {k: pm["bytes_moved"].get(k, 0.0) + dm["bytes_moved"].get(k, 0.0)
                        for k in sorted(set(pm["bytes_moved"]) | set(dm["bytes_moved"]))},
        "energy_j": pm["energy_j"] + dm["energy_j"],
        "kv_transfer": {"bytes": float(kv_bytes.sum()), "seconds": percentiles(transfer)},
        "pools": {"prefill": {"makespan_s": pm["makespan_s"], "ttft_s": pm["ttft_s"],
                              "prefill_steps": pm["prefill_steps"]},
                  "decode": {"makespan_s": dm["makespan_s"], "decode_step_s": dm["decode_step_s"],
                             "decode_steps": dm["decode_steps"]}},
        "per_request": per_request,
    }
