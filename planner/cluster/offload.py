"""Expert parallelism with offload: each GPU's experts get the single-node treatment (issue 19, item 2).

Shape legend: L = MoE layers, E = routed experts, G = GPUs (EP ranks), S = E / G experts each
GPU owns per layer, B = tokens of a decode step (the plan's batch, spread over the GPUs).

When the experts do not fit the GPUs' memory in a format that meets the quality budget (with
the critical experts at full precision), the EP placer still decides which GPU *owns* which
expert (``owner[l, e]``: the GPU of its lowest physical slot; one copy each, no replicas: a
replica would spend the memory the offload needs). Then every GPU g solves the single-node
problem (:func:`planner.ilp_model.build_problem` and :func:`planner.ilp.solve`, the offload
planner's cost path) over its own experts:

* its workload: the trace with every expert g does not own turned into a zero-computation
  expert (free, in no cache band), so frequencies are per token of the whole step and the
  LRU hit-rate curves are those of the accesses g serves;
* its compute device g, the host CPU, DRAM (its capacity split evenly over the node's GPUs)
  and NVMe of g's node, g's own link;
* the dense weights (replicated: data-parallel attention) and the KV cache of its B / G
  sequences at one dense format d shared by all GPUs (each d meeting the budget is tried);
* the quality budget Q on its own experts: ``sum_{e of g} w_e err_e <= Q sum_{e of g} w_e``
  for every g implies the global ``sum_e w_e err_e <= Q sum_e w_e``; its critical experts stay
  at full precision (the single-node rule).

The node's CPU is shared: each GPU's MIP is solved once seeing the whole CPU and once seeing
its share (every CPU call n times as long, :func:`cpu_share`, n GPUs on the node), and the
plan is whichever prices faster.

Price (seconds per decode step; every layer waits for its slowest GPU, then combines):

    step = max_g dense_g + sum_l [ dispatch_l + s_l max(max_g tau_lg, max_node sum_{g on node} U_lg) + combine_l ]

``tau_lg``: the chosen option's time on g with the whole CPU (:func:`planner.costs.option_time`),
``U_lg`` its CPU seconds (the node's CPU runs its GPUs' CPU work in turn); ``s_l >= 1`` the
layer's spread factor ``E[max X] / max E[X]`` over decode steps sampled from the trace, ``X``
each GPU's expert seconds, each node's CPU seconds and each GPU's link seconds in a step
(:func:`_straggler`: the layer lasts as long as the slowest of them in *each* step);
``dispatch_l`` and ``combine_l``: B / G tokens from each GPU times the activations of each
other GPU's experts, every pair at once over shared links (:func:`exchange_s`, the simulator's
fluid model).

Bound: given the ownership, the dense format and the per-GPU budget split, the step is at
least ``sum_l max_g tau_lg >= max_g sum_l tau_lg >= max_g (bound_g - dense_g)`` (bound_g of
the MIP seeing the whole CPU, a relaxation of sharing it) plus the dense work and the
all-to-all, so the gap is certified *for that restriction* (not over other ownerships or
budget splits; the notes say so). Not modelled: a CPU share left idle by a GPU that needs
less, prefetching (EP plans run without it), the layer's spread inside each GPU's MIP (it
sees its expected load; the spread enters the price only).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from profiles.engines import Engine
from profiles.errors import InfeasibleError
from profiles.hardware import Device, Hardware
from profiles.models import ModelSpec
from profiles.perf import activation_bytes
from profiles.workload.trace import Trace

from ..costs import MODES, Setup, fixed_costs, option_costs, option_time
from ..ilp import build_problem, solve
from ..plan import Inputs, MemoryUse, Plan, SolverInfo
from ..plan_layer import GpuCache, LayerPlan
from ..setup import runnable_formats
from ..workload_view import planning_stats
from .topology import Topology

__all__ = ["exchange_s", "owners_of", "gpu_trace", "plan_ep_offload"]

GAP = 0.001  # each GPU's MIP stops within this relative gap (as planner optimize's default)
STEPS = 256  # decode steps sampled from the trace for the straggler factor


def owners_of(phy2log: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """``[L, E]`` the GPU index owning each expert: the GPU of its lowest physical slot."""
    L, R = phy2log.shape
    S = R // num_gpus
    owner = np.full((L, num_experts), -1, np.int64)
    for l in range(L):
        for s in range(R - 1, -1, -1):  # the lowest slot written last
            owner[l, phy2log[l, s]] = s // S
    return owner


def gpu_trace(trace: Trace, owner: np.ndarray, g: int, num_experts: int) -> tuple[Trace, list[np.ndarray]]:
    """GPU ``g``'s view of ``trace``: its experts renumbered ``0..S-1`` per layer (in expert-id
    order), every other expert (and any zero-computation one) a zero expert ``S + k`` (``k``: its
    top-k position).
    Returns the trace and ``[L]`` arrays of the global ids of its local experts."""
    L = owner.shape[0]
    mine = [np.flatnonzero(owner[l] == g) for l in range(L)]
    S = len(mine[0])
    local = np.full((L, num_experts + trace.num_experts), -1, np.int64)  # [L, ids] -> local id
    for l in range(L):
        local[l, mine[l]] = np.arange(S)
    ids = trace.expert_ids.astype(np.int64)  # [T, L, K]
    K = ids.shape[2]
    new = local[np.arange(L)[None, :, None], ids]
    # others: zero expert S + k at top-k position k (a token's ids stay distinct)
    new = np.where(new >= 0, new, S + np.arange(K)[None, None, :])
    view = dataclasses.replace(trace, expert_ids=new.astype(np.int32), num_experts=S + K)
    return view, mine


def cpu_share(cpu: Device, n: int) -> Device:
    """``cpu`` as one of ``n`` GPUs sharing it sees it: every expert call ``n`` times as long
    (bandwidth and peaks over ``n``, per-call overheads times ``n``; the calls of the node's
    GPUs take turns on it)."""
    if n <= 1:
        return cpu
    return dataclasses.replace(
        cpu, memory_bytes_per_s=cpu.memory_bytes_per_s / n,
        peak_ops_per_s={k: v / n for k, v in cpu.peak_ops_per_s.items()},
        peak_ops_per_s_by_kernel={k: {f: v / n for f, v in d.items()} for k, d in cpu.peak_ops_per_s_by_kernel.items()},
        unpack_weights_per_s={k: v / n for k, v in cpu.unpack_weights_per_s.items()},
        launch_overhead_s=cpu.launch_overhead_s * n, expert_call_overhead_s=cpu.expert_call_overhead_s * n,
        linear_host_s={k: v * n for k, v in cpu.linear_host_s.items()})


def _setup(hw: Hardware, bare: Hardware, engine: Engine, model: ModelSpec, trace: Trace, gpu: str, S: int, *,
           batch_size: int, context_tokens: int, formats: tuple[str, ...], errors: dict[str, float],
           critical: tuple[tuple[int, ...], ...]) -> Setup:
    """The single-node Setup of one GPU: compute ``gpu``, the host CPU, DRAM and NVMe of its node."""
    dev = hw.devices[gpu]
    host = next(c for c in hw.devices_of_kind("cpu") if c.node == dev.node)
    homes = [hw.memory_of(host.id).id]
    homes += [m.id for m in hw.memories.values() if m.tier == "nvme" and m.devices[0].split("/")[0] == dev.node][:1]
    runnable = runnable_formats(engine, formats, dev, host)
    K = model.top_k
    grid = tuple(sorted(c for c in {0, K, 2 * K, 4 * K, S // 8, S // 4, S // 2} if 0 <= c <= S))
    # per expert call at the step's batch, as planner.optimize.make_setup prices a node's caches;
    # priced as the max of averages, not per step (planner.step_max): cpu_share models the node's
    # GPUs taking turns on the CPU as every call n times as long, true on average but not in a
    # step where only one GPU runs CPU experts (per step: +20% over the simulated TPOT on
    # tests/test_ep_offload.py's case, against +4% as the max of averages)
    stats = dataclasses.replace(planning_stats(trace, real_experts=S).at_batch(batch_size), step_active=None)
    return Setup(hardware=hw, model=model, stats=stats, batch_size=batch_size, context_tokens=context_tokens,
                 formats=runnable, compute=dev, host=host, homes=tuple(homes), quant_error=errors,
                 critical=critical, engine=engine, bare=bare, cache_grid=grid)


def exchange_s(hw: Hardware, moves: dict[tuple[str, str], float]) -> float:
    """Seconds of an all-to-all of ``moves[(src memory, dst memory)] = bytes`` that start together
    and share links: its most loaded link direction or memory port (bytes over bandwidth) plus
    the longest route latency (the simulator's fluid model, :meth:`simulator.resources.Network.exchange`)."""
    load: dict[tuple, float] = {}
    bandwidth: dict[tuple, float] = {}
    latency = 0.0
    for (src, dst), n_bytes in moves.items():
        route = hw.route(src, dst)
        if not route.links or n_bytes <= 0:
            continue
        latency = max(latency, route.latency_s)
        at = next(d for d in hw.memories[route.src].devices if d in (route.links[0].a, route.links[0].b))
        keys = []
        for link in route.links:
            nxt = link.b if link.a == at else link.a
            keys.append(((link.kind, at, nxt), link.bytes_per_s))
            at = nxt
        keys += [((route.src, "read"), hw.memories[route.src].bytes_per_s),
                 ((route.dst, "write"), hw.memories[route.dst].bytes_per_s)]
        for k, bw in keys:
            load[k] = load.get(k, 0.0) + n_bytes
            bandwidth[k] = bw
    if not load:
        return 0.0
    return latency + max(b / bandwidth[k] for k, b in load.items())


def _all_to_all_s(hw: Hardware, model: ModelSpec, topo: Topology, owner: np.ndarray, frequency: np.ndarray,
                  batch_size: int) -> np.ndarray:
    """``[L]`` seconds of one layer's dispatch plus combine (the module docstring's estimate)."""
    G = topo.num_gpus
    L = owner.shape[0]
    out = np.zeros(L)
    if G < 2:
        return out
    per_gpu = batch_size / G
    for l in range(L):
        calls = np.bincount(owner[l], weights=frequency[l], minlength=G) * per_gpu  # [G] calls from each GPU into b
        there = {(topo.gpus[a], topo.gpus[b]): activation_bytes(model, calls[b])
                 for a in range(G) for b in range(G) if a != b}
        back = {(b, a): n for (a, b), n in there.items()}
        out[l] = exchange_s(hw, there) + exchange_s(hw, back)
    return out


def _solve_gpus(setups: list[Setup], fm: str, budget: float, per_gpu_batch: int, sharing: dict[str, int],
                time_limit_s: float) -> list | None:
    """Each GPU's single-node MIP at dense format ``fm``: ``[(problem, SolveResult)]``, or None
    when some GPU has no plan."""
    parts = []
    for s in setups:
        problem = build_problem(s, budget)
        # dense weights and KV cache of this GPU's B / G sequences (data-parallel attention)
        fc = fixed_costs(dataclasses.replace(s, batch_size=per_gpu_batch), fm)
        caps = {m: c / sharing[m] if m in sharing else c for m, c in problem.caps.items()}
        problem = dataclasses.replace(problem, fixed={fm: fc}, caps=caps)
        try:
            parts.append((problem, solve(problem, prefetch=False, time_limit_s=time_limit_s, gap=GAP)))
        except InfeasibleError:
            return None
    return parts


def step_counts(trace: Trace, num_experts: int, batch_size: int, steps: int = STEPS, seed: int = 0) -> np.ndarray:
    """``[L, steps, E]`` tokens each expert serves in ``steps`` sampled decode steps of
    ``batch_size`` trace rows each (seeded; zero-computation experts dropped)."""
    rng = np.random.default_rng(seed)
    T, L, K = trace.expert_ids.shape
    rows = rng.integers(0, T, size=(steps, batch_size))  # [steps, B]
    ids = trace.expert_ids[rows].astype(np.int64)  # [steps, B, L, K]
    out = np.zeros((L, steps, num_experts))
    step = np.broadcast_to(np.arange(steps)[:, None, None], (steps, batch_size, K))
    for l in range(L):
        x = ids[:, :, l, :]
        real = x < num_experts
        out[l] = np.bincount(step[real] * num_experts + x[real], minlength=steps * num_experts).reshape(steps, -1)
    return out


def _straggler(parts: list, full: list[Setup], ids: list, counts: np.ndarray, node_of: list[str]) -> np.ndarray:
    """``[L]`` the spread factor ``E[max X] / max E[X]`` of each layer over the sampled steps
    ``counts`` (>= 1): ``X`` are the seconds of each GPU's experts on the GPU (resident, cached,
    streamed), of each node's CPU-run experts (all its GPUs' in turn), at their formats, and of
    each GPU's link (its option's expected copies, in proportion to the cached band's experts
    the step uses); the layer lasts as long as the slowest of them in *each* step."""
    L, steps, E = counts.shape
    B = int(counts.max()) if counts.size else 0
    n = np.arange(B + 1)
    nodes = sorted(set(node_of))
    out = np.ones(L)
    for l in range(L):
        X = np.zeros((steps, len(parts) + len(nodes) + len(parts)))  # [steps, GPUs, CPUs, links]
        for g, ((p, r), s) in enumerate(zip(parts, full)):
            t, w = p.tables[l], r.choice[l]
            p_, q_ = int(t.p[w]), int(t.q[w])
            band = np.zeros(steps)  # [steps] the band's experts a step uses (each a miss with the same odds)
            for rank, local in enumerate(s.stats.order[l].tolist()):
                if p_ <= rank < q_:
                    band += counts[l, :, ids[g][l][local]] > 0
                dev = s.compute if rank < q_ else s.host
                col = g if rank < q_ else len(parts) + nodes.index(node_of[g])
                fmt = s.formats[t.b_res[w] if rank < p_ else t.b_off[w]]
                cost = np.where(n > 0, s.call_s(dev, fmt, np.maximum(n, 1)), 0.0)  # [B + 1]
                X[:, col] += cost[counts[l, :, ids[g][l][local]].astype(np.int64)]
            # the link: the option's expected copies, scaled by the step's band use (fetch, hybrid;
            # a streamed band crosses whole every step)
            scale = band / band.mean() if MODES[t.mode[w]] in ("fetch", "hybrid") and band.mean() > 0 else 1.0
            X[:, len(parts) + len(nodes) + g] = t.F[w] * scale
        expected = X.mean(axis=0).max()
        if expected > 0:
            out[l] = max(1.0, float(X.max(axis=1).mean() / expected))
    return out


def _layer_s(full: list[Setup], parts: list, node_of: list[str], straggle: np.ndarray) -> np.ndarray:
    """``[L]`` seconds of each layer's expert work: the slowest GPU, each priced with the whole
    CPU, or the node's CPU running every GPU's CPU work in turn, whichever is longer, times the
    layer's spread factor ``straggle``."""
    L = len(parts[0][1].choice)
    tau, cpu = np.zeros((len(parts), L)), np.zeros((len(parts), L))
    for g, ((p, r), s) in enumerate(zip(parts, full)):
        for l, w in enumerate(r.choice):
            t = option_costs(s, l, p.tables[l].specs([w]), p.tables[l].tiers([w]))  # the whole CPU's price
            tau[g, l], cpu[g, l] = option_time(t, False)[0], t.U[0]
    per_node = [cpu[[g for g, n in enumerate(node_of) if n == node]].sum(axis=0) for node in sorted(set(node_of))]
    return straggle * np.maximum(tau.max(axis=0), np.max(per_node, axis=0))


def plan_ep_offload(*, hw: Hardware, bare: Hardware, engine: Engine, model: ModelSpec, topo: Topology,
                    trace: Trace, phy2log: np.ndarray, inputs: Inputs, formats: tuple[str, ...],
                    errors: dict[str, float], budget: float, critical: tuple[tuple[int, ...], ...],
                    batch_size: int, context_tokens: int, time_limit_s: float, predicted: dict[str, float],
                    notes: tuple[str, ...]) -> Plan:
    """The EP plan with per-GPU offload of the module docstring for the placement ``phy2log``.

    Raises:
        InfeasibleError: some GPU's experts fit nowhere (its DRAM share and NVMe included) at
            any dense format within the budget.
    """
    from ..optimize import OptimizeRequest  # optimize imports the cluster package
    from ..plan_assembly import assemble_plan

    G, E, L = topo.num_gpus, model.num_experts, model.num_moe_layers
    owner = owners_of(phy2log, G, E)  # [L, E]
    S = E // G
    full_stats = planning_stats(trace, real_experts=E)
    a2a = _all_to_all_s(hw, model, topo, owner, full_stats.frequency, batch_size)  # [L]
    per_gpu_batch = math.ceil(batch_size / G)
    counts = step_counts(trace, E, batch_size)  # [L, STEPS, E]
    shares = sorted({1, max(sum(1 for d in hw.devices_of_kind("gpu") if d.node == hw.devices[g].node)
                             for g in topo.gpus)})
    setups: dict[int, list[Setup]] = {n: [] for n in shares}  # CPU share -> one Setup per GPU
    ids = []
    for g, gpu in enumerate(topo.gpus):
        view, mine = gpu_trace(trace, owner, g, E)
        crit = tuple(tuple(int(np.flatnonzero(mine[l] == e)[0]) for e in experts if owner[l, e] == g)
                     for l, experts in enumerate(critical))
        full = _setup(hw, bare, engine, model, view, gpu, S, batch_size=batch_size, context_tokens=context_tokens,
                      formats=formats, errors=errors, critical=crit)
        for n in shares:
            setups[n].append(full if n == 1 else dataclasses.replace(full, host=cpu_share(full.host, n)))
        ids.append(mine)
    full_setups = setups[1]
    sharing = {}  # host memory -> GPUs whose problems share it
    for s in full_setups:
        for h in s.homes:
            sharing[h] = sharing.get(h, 0) + 1
    node_of = [hw.devices[g].node for g in topo.gpus]
    dense_formats = [fm for fm in full_setups[0].formats if errors[fm] <= budget * (1 + 1e-9)
                     and all(s.runs(s.compute, fm) for s in full_setups)]
    req = OptimizeRequest(objective="throughput", batch_size=batch_size, context_tokens=context_tokens,
                          quality_budget=budget, prefetch="none", eviction="lru", compare=False)
    best, bound = None, math.inf
    for fm in dense_formats:
        for n in shares:  # each GPU seeing the whole CPU (a relaxation: its bound), then its share
            parts = _solve_gpus(setups[n], fm, budget, per_gpu_batch, sharing, time_limit_s)
            if parts is None:
                break
            layer_s = _layer_s(full_setups, parts, node_of, _straggler(parts, full_setups, ids, counts, node_of))  # [L]
            dense = max(p.fixed[fm].dense_s for p, _ in parts)
            step = float(layer_s.sum() + dense + a2a.sum())
            if n == 1:  # sum_l max_g tau_lg >= max_g sum_l tau_lg >= max_g (bound_g - dense_g)
                bound = min(bound, max((r.bound_s if r.bound_s is not None else r.objective_s) - p.fixed[fm].dense_s
                                       for p, r in parts) + dense + float(a2a.sum()))
            if best is None or step < best["step"] * (1 - 1e-12):
                best = {"fm": fm, "parts": parts, "step": step, "share": n}
    if best is None:
        raise InfeasibleError(f"expert parallelism with offload over {G} GPUs: some GPU's experts fit neither its "
                              f"memory nor its share of host memory at any dense format within --quality-budget "
                              f"{budget:g}. Fix: a profile with more host memory or GPUs, a smaller --formats entry, "
                              f"or a shorter --context / --batch")
    step, fm = best["step"], best["fm"]
    bound = min(bound, step)
    gap = max(0.0, (step - bound) / step) if step > 0 else 0.0
    info = SolverInfo(method="ep-offload", solver="highs (one single-node MIP per GPU over its own experts)",
                      status="optimal" if gap <= GAP + 1e-9 else "feasible", objective=step, bound=bound, gap=gap,
                      time_limit_s=time_limit_s,
                      variables=sum(r.variables for _, r in best["parts"]),
                      constraints=sum(r.constraints for _, r in best["parts"]))
    subplans = [assemble_plan(p, r.choice, fm, False, info, req, inputs, budget, prefetch_policy="none",
                              eviction="lru") for p, r in best["parts"]]
    layers = []
    for l in range(L):
        home, fmt, site, own = [None] * E, [None] * E, [None] * E, [None] * E
        caches = []
        for g, (sub, mine) in enumerate(zip(subplans, ids)):
            lp = sub.layers[l]
            for i, e in enumerate(mine[l].tolist()):
                home[e], fmt[e], site[e], own[e] = lp.home[i], lp.format[i], lp.site[i], topo.gpus[g]
            if lp.cache_slots:
                caches.append(GpuCache(device=topo.gpus[g], slots=lp.cache_slots, format=lp.cache_format))
        layers.append(LayerPlan(moe_layer=l, hidden_layer=int(model.moe_layer_indices[l]), home=tuple(home),
                                format=tuple(fmt), site=tuple(site), owner=tuple(own), gpu_caches=tuple(caches)))
    memory: dict[str, MemoryUse] = {}
    for (p, _), sub in zip(best["parts"], subplans):
        for m, use in sub.memory.items():
            if m == p.device_mem:
                memory[m] = use
            else:  # host memory and disks: every GPU's offloaded experts together
                before = memory.get(m)
                memory[m] = use if before is None else before.model_copy(
                    update={"expert_bytes": before.expert_bytes + use.expert_bytes})
    total_w = sum(p.importance_total for p, _ in best["parts"])
    quality = sum(sub.quality_error * p.importance_total for (p, _), sub in zip(best["parts"], subplans))
    quality /= max(total_w, 1e-300)
    offloaded = sum(s != "resident" for lp in layers for s in lp.site)
    out = dict(predicted) | {"tpot_s": step, "tokens_per_s": batch_size / step, "all_to_all_s_per_step": float(a2a.sum()),
                             "ep_offload_bound_tpot_s": bound}
    price = hw.price_per_hour_usd
    if price is not None:
        out["cost_per_million_tokens_usd"] = price / (batch_size / step * 3600.0) * 1e6
    host = next(d for d in hw.devices_of_kind("cpu") if d.node == hw.devices[topo.gpus[0]].node)
    notes = notes + (
        f"expert parallelism with offload: each GPU owns {S} experts per layer (one copy each) and plans them as "
        f"one node does (resident, cached, CPU-run or streamed, per format) in its memory, its share of host "
        f"memory and over its own link; {offloaded} of {L * E} experts offloaded",
        f"step time {step * 1e3:.3g} ms = per layer the slowest GPU + dense + all-to-all; bound {bound * 1e3:.3g} ms "
        f"(gap {gap:.1%}) holds for this ownership, dense format {fm} and the budget split per GPU, not over "
        f"other placements",
        f"dense weights in {fm}; quality error {quality:.4g} within the budget {budget:.4g} (each GPU's experts "
        f"within it on their own)")
    return Plan(inputs=inputs, objective="throughput", batch_size=batch_size, context_tokens=context_tokens,
                compute_device=topo.gpus[0], host_device=hw.memory_of(host.id).id, dense_format=fm,
                prefetch="none", eviction="lru", quality_budget=budget, quality_error=quality, layers=tuple(layers),
                memory=memory, predicted=out, solver=info, notes=notes)
