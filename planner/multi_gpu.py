"""One offload plan over every GPU of a node: pipeline-style layer assignment (issue 19, item 1).

Each MoE layer (its dense share, resident experts and cache slots) runs on one GPU g of the
node; its offloaded experts are fetched over *g's* link, its CPU-local experts run on the host
CPU. The node's accelerators (FPGA-class cards) are devices g too, after the GPUs
(:func:`planner.pipeline_costs.node_gpus`): a card holds and computes only the formats it
states peaks for (``Setup.runs``), so a dense format d it cannot run leaves it without layers
in d's part. A plan's layout, its feasibility and seconds: :mod:`planner.multi_gpu_layout`. For every GPU the single-device problem (:func:`planner.ilp_model.build_problem` over a
Setup whose compute device is g) gives each layer's option table priced on g; one MIP then
picks an option and a GPU per layer.

Sets
    l in 0..L-1, g in G (the node's GPUs, G[0] = the plan's compute_device: embedding and head)
    w in Omega_lg      options of layer l on GPU g (pareto front of its option table)
    h in H             homes of offloaded experts (host DRAM, NVMe: shared by every GPU)
Parameters
    tau_lgw, dev_lgw, home_lgw, err_lw   as in planner.ilp, priced on g
    D_g, M_g, W_g      dense seconds, dense + KV bytes, workspace bytes on g at the dense format d
                       (the whole model's: a layer on g takes D_g / L and (M_g - K) / L)
    K                  bytes of the embedding, final norm and head, held on G[0] (as the bundle
                       runtime places them: planner.pipeline_costs.head_bytes)
    hop(a, b)          seconds to move one step's hidden states (hidden x tokens x 2 bytes) over
                       the topology's route from a to b, latency included; hop(a, a) = 0
Variables
    x_lgw in {0,1}     layer l runs option w on GPU g;   z_lg = sum_w x_lgw
    u_lab >= 0         layers l and l+1 run on a and b (a != b):  u_lab >= z_la + z_l+1,b - 1
Objective (seconds per decode step; at batch 1 the layers run one after another)
    min sum x_lgw tau_lgw + sum_lg z_lg D_g / L + sum u_lab hop(a, b)
        + sum_g z_0g hop(G0, g) + sum_g z_L-1,g hop(g, G0)
Constraints
    one[l]:    sum_gw x_lgw = 1
    cap[g]:    sum_lw x_lgw dev_lgw + sum_l z_lg (M_g - K) / L + [g = G0] K + W_g <= usable bytes of g
    cap[h]:    sum_{lgw: home = h} x_lgw home_lgw <= usable bytes of h
    quality:   sum x_lgw err_lw <= Q sum w_le  (and the dense format's error <= Q)

The dense format d and next-layer prefetch (on/off) are fixed per MIP and enumerated (a few
parts); the plan is the best part's, the bound the least of the parts' bounds, so the gap
is certified as in planner.ilp. The search stops on node limits (the same plan on any
machine); the wall clock is only a safety net. Every one-GPU plan is a plan here (all z on
G[0]), so the result is never slower than the single-GPU plan by more than the gap.

Equal GPUs (every GPU of the node the same make, memory and links; 8 x RTX 4090): one option
table serves them all, and from three such GPUs each part solves instead the pooled relaxation and one small MIP
per GPU (:mod:`planner.multi_gpu_equal`): one GPU's variables and none of the G! symmetric
copies of a plan, the bound still certified.

Not modelled: micro-batch pipelining at batch > 1 (the objective still sums the layers),
the head's seconds on G[0] (its bytes are counted there; its time is spread as D_g / L), and link
contention between a hop and prefetches (the simulator plays both out).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pulp

from profiles.errors import InfeasibleError

from .costs import Setup
from .ilp_mip import _HIGHS_OPTIONS, _HiGHS
from .ilp_model import Problem, build_problem, pareto_front
from .multi_gpu_equal import identical, per_gpu, pooled_problem, shared_problems, split
from .multi_gpu_layout import contiguous, feasible, objective_s, polish
from .pipeline_costs import dense_on, head_bytes, hop_matrix, hop_s, hops_s, node_gpus
from .plan import MemoryUse, Plan, SolverInfo, layer_ranges
from .plan_assembly import assemble_plan, option_rows

# feasible, objective_s, polish and contiguous (planner.multi_gpu_layout) stay importable from here
__all__ = ["node_gpus", "hop_s", "plan_multi_gpu", "pipeline_baseline_plan", "MULTI_NODE_LIMIT",
           "feasible", "objective_s", "polish", "contiguous"]

MULTI_NODE_LIMIT = 1024  # HiGHS nodes per part (work limit: plans do not depend on the load)
# order[l,g] rows (each GPU one contiguous range of layers): off, the hops price fragmentation
# instead; on Mixtral-8x7B / 2x RTX 3090 at the int8 budget they made the nodes slower and the
# plan worse at the same node limit (gap 1.1% at 512 nodes vs 0.5% at 1024 without)
CONTIGUOUS = False


def plan_multi_gpu(s0: Setup, req, inputs, budget: float) -> Plan | None:
    """The pipeline plan over the node's GPUs for ``s0`` (from planner.optimize.make_setup), or
    None when the node has one GPU. ``req`` is the OptimizeRequest (gap, time limit, prefetch)."""

    gpus = node_gpus(s0)
    if len(gpus) < 2:
        return None
    hw = s0.hardware
    setups = [dataclasses.replace(s0, compute=hw.devices[g]) for g in gpus]
    problems = shared_problems(setups, budget)
    L = s0.stats.num_layers
    B = s0.batch_size
    hop = hop_matrix(s0, gpus, B)  # [G, G]
    pf_settings = (False, True) if s0.engine_can("next-layer") else (False,)
    if req.prefetch is not None:
        pf_settings = (req.prefetch != "none",)
    # dense formats that meet the budget, least error first (usually the best part, whose plan
    # then cuts the others' search short)
    dense = sorted((fm for fm in problems[0].fixed
                    if fm in problems[0].fixed and problems[0].fixed[fm].error <= budget + 1e-12),
                   key=lambda fm: (problems[0].fixed[fm].error, fm))
    if not dense:
        raise InfeasibleError(f"no dense format meets --quality-budget {budget:g} on {gpus[0]}")
    best, bounds, sizes, timed_out = None, [], (0, 0), False
    for prefetch in pf_settings:
        times, fronts = [], []  # [G][L][N], [G][L]: one list per distinct table (shared by equal GPUs)
        for g, p in enumerate(problems):
            twin = next((k for k in range(g) if problems[k].tables is p.tables), None)
            if twin is None:
                times.append(p.times(prefetch))
                fronts.append([pareto_front(times[g][l], p.tables[l]) for l in range(L)])
            else:
                times.append(times[twin])
                fronts.append(fronts[twin])
        for fm in dense:
            cutoff = None if best is None else best["objective"]
            # two GPUs: the MIP over both is small enough, and exact where the pooled plan's equal
            # split is not (OLMoE on 2x 3090 PCIe at budget 0: all on one GPU, 38.16 tok/s, optimal;
            # pooled 38.10, gap 0.15%); from three, its G! symmetric copies are what the pool removes
            if identical(problems) and len(problems) > 2:
                r = _pooled(problems, times, fronts, hop, fm, budget, req, cutoff)
            else:
                r = _mip(problems, times, fronts, hop, fm, budget, req, seed=0, cutoff_s=cutoff)
            sizes = (max(sizes[0], r["variables"]), max(sizes[1], r["constraints"]))
            timed_out |= r["timed_out"]
            if r["bound"] is not None:
                bounds.append(r["bound"])
            if r["choice"] is not None and (best is None or r["objective"] < best["objective"]):
                best = r | {"prefetch": prefetch, "dense": fm, "times": times}
    if best is None:
        raise InfeasibleError("no multi-GPU plan fits: run with --parallel offload to see which resource binds")
    best |= polish(problems, best["times"], best["choice"], best["devices"], hop, best["dense"], budget)
    best |= contiguous(problems, best["times"], best["choice"], best["devices"], hop, best["dense"], budget)
    bound = min(bounds + [best["objective"]])
    gap = max(0.0, (best["objective"] - bound) / best["objective"]) if best["objective"] > 0 else 0.0
    info = SolverInfo(method="ilp-multi-gpu", solver=req.solver if req.solver == "highs" else "highs",
                      status="optimal" if gap <= req.gap + 1e-9 else "time limit" if timed_out else "node limit",
                      objective=best["objective"], bound=bound, gap=gap, time_limit_s=req.time_limit_s,
                      variables=sizes[0], constraints=sizes[1])
    return _assemble(problems, gpus, best, hop, info, req, inputs, budget, assemble_plan)


def _mip(problems: list[Problem], times, fronts, hop: np.ndarray, fm: str, budget: float, req, seed: int,
         cutoff_s: float | None = None) -> dict:
    """One part of the module docstring's MIP: dense format ``fm``, ``times`` of one prefetch
    setting; ``cutoff_s``: the best plan's seconds so far (the part only searches below it)."""
    G, L = len(problems), len(problems[0].tables)
    p0 = problems[0]
    # a device that cannot run the dense format fm (an accelerator without its peak) holds no layer in this part
    fixed = [p.fixed.get(fm) for p in problems]
    use = [g for g in range(G) if fixed[g] is not None]
    # times enter in units of the fastest conceivable step (the solver's tolerances are absolute)
    unit = max(sum(min(float(times[g][l][fronts[g][l]].min()) for g in use if len(fronts[g][l]))
                   for l in range(L))
               + min(fixed[g].dense_s for g in use), 1e-12)
    prob = pulp.LpProblem("moe_multi_gpu", pulp.LpMinimize)
    x = [[{int(w): prob.add_variable(f"x_{l}_{g}_{w}", cat="Binary") for w in fronts[g][l]} if g in use else {}
          for g in range(G)] for l in range(L)]
    z = [[pulp.lpSum(x[l][g].values()) for g in range(G)] for l in range(L)]
    u = {(l, a, b): prob.add_variable(f"u_{l}_{a}_{b}", lowBound=0)
         for l in range(L - 1) for a in use for b in use if a != b}
    # min sum x tau + sum z D_g / L + sum u hop + entry and exit hops (from/to G[0])
    prob += (pulp.lpSum(v * float(times[g][l][w] / unit) for l in range(L) for g in range(G)
                        for w, v in x[l][g].items())
             + pulp.lpSum(z[l][g] * (fixed[g].dense_s / L / unit) for l in range(L) for g in use)
             + pulp.lpSum(v * float(hop[a, b] / unit) for (l, a, b), v in u.items())
             + pulp.lpSum(z[0][g] * float(hop[0, g] / unit) + z[L - 1][g] * float(hop[g, 0] / unit)
                          for g in range(1, G)))
    for l in range(L):
        # one[l]: sum_gw x_lgw = 1
        prob += pulp.lpSum(z[l]) == 1, f"one[{l}]"
    for l in range(L - 1 if CONTIGUOUS else 0):
        for g in range(G - 1):
            # order[l,g] (only with CONTIGUOUS): the layers pass the GPUs in the order G lists them once:
            # sum_{g' <= g} z_l+1,g' <= sum_{g' <= g} z_lg'   (also breaks the symmetry of equal GPUs)
            prob += pulp.lpSum(z[l + 1][: g + 1]) <= pulp.lpSum(z[l][: g + 1]), f"order[{l},{g}]"
    for (l, a, b), v in u.items():
        # hop[l,a,b]: u_lab >= z_la + z_l+1,b - 1
        prob += v >= z[l][a] + z[l + 1][b] - 1, f"hop[{l},{a},{b}]"
    head = head_bytes(p0.setup, fm)
    for g in use:
        p = problems[g]
        # cap[g]: sum x dev + sum_l z_lg (dense + KV - K) / L + [g = G0] K + workspace <= usable bytes of g
        share = dense_on(fixed[g], head, 1, L, first=False)
        prob += (pulp.lpSum(v * float(p.tables[l].dev_bytes[w]) for l in range(L) for w, v in x[l][g].items())
                 + pulp.lpSum(z[l][g] * share for l in range(L))
                 <= p.caps[p.device_mem] - fixed[g].workspace_bytes - (head if g == 0 else 0.0)), f"cap[{p.device_mem}]"
    for hi, home in enumerate(p0.setup.homes):
        # cap[h]: homes are the node's, shared by every GPU's layers
        terms = [v * float(problems[g].tables[l].home_bytes[w]) for l in range(L) for g in range(G)
                 for w, v in x[l][g].items()
                 if problems[g].tables[l].home[w] == hi and problems[g].tables[l].home_bytes[w]]
        if terms:
            prob += pulp.lpSum(terms) <= p0.caps[home], f"cap[{home}]"
    if budget is not None:
        # quality: sum x err <= Q sum w   (the dense format's error is within Q: the caller's filter)
        prob += (pulp.lpSum(v * float(problems[g].tables[l].error[w]) for l in range(L) for g in range(G)
                            for w, v in x[l][g].items()) <= budget * p0.importance_total), "quality"
    cut = {} if cutoff_s is None else {"objective_bound": cutoff_s * (1 - req.gap) / unit}
    engine = _HiGHS(msg=False, timeLimit=req.time_limit_s, gapRel=req.gap, gapAbs=1e-15, threads=1,
                    random_seed=seed, mip_max_nodes=MULTI_NODE_LIMIT, **_HIGHS_OPTIONS, **cut)
    prob.solve(engine)
    import highspy

    status = prob.solverModel.getModelStatus()
    info = prob.solverModel.getInfo()
    out = {"variables": len(prob.variables()), "constraints": prob.numConstraints(),
           "timed_out": status == highspy.HighsModelStatus.kTimeLimit, "choice": None, "bound": None}
    if status == highspy.HighsModelStatus.kInfeasible:
        if cutoff_s is not None:  # nothing here beats the cutoff by more than the gap
            out["bound"] = cutoff_s * (1 - req.gap)
        return out
    out["bound"] = float(info.mip_dual_bound) * unit
    if info.primal_solution_status != 2:
        return out
    choice, devices = [], []
    for l in range(L):
        g, w = max(((g, w) for g in range(G) for w in x[l][g]), key=lambda gw: x[l][gw[0]][gw[1]].varValue or 0.0)
        devices.append(g)
        choice.append(w)
    if not feasible(problems, choice, devices, fm, budget):
        return out  # a cut-off search may leave values that are no plan (HiGHS's objective_bound)
    out |= {"choice": tuple(choice), "devices": tuple(devices),
            "objective": objective_s(problems, times, choice, devices, hop, fm)}
    return out


def _pooled(problems: list[Problem], times, fronts, hop: np.ndarray, fm: str, budget: float, req,
            cutoff_s: float | None) -> dict:
    """One part on equal GPUs (:mod:`planner.multi_gpu_equal`): the pooled relaxation's bound;
    the plan: each GPU one contiguous range of layers (cut where the relaxation's bytes
    cross equal shares), every layer's option chosen again by the MIP with those GPUs fixed."""
    relaxed = _mip([pooled_problem(problems, fm)], times[:1], fronts[:1], np.zeros((1, 1)), fm, budget, req,
                   seed=0, cutoff_s=cutoff_s)
    out = relaxed | {"choice": None}
    if relaxed["choice"] is None or (cutoff_s is not None and relaxed["objective"] >= cutoff_s * (1 - req.gap)):
        return out  # nothing here beats the best plan so far
    devices = split(problems, relaxed["choice"], fm)
    choice = per_gpu(problems, times, fronts, fm, budget, req, relaxed["choice"], devices, MULTI_NODE_LIMIT)
    if choice is not None and feasible(problems, choice, devices, fm, budget):
        return out | {"choice": choice, "devices": devices,
                      "objective": objective_s(problems, times, choice, devices, hop, fm)}
    # the ranges leave a GPU without a plan: the per-GPU MIP (both bounds hold; the larger counts)
    r = _mip(problems, times, fronts, hop, fm, budget, req, seed=0, cutoff_s=cutoff_s)
    bound = max(b for b in (out["bound"], r["bound"]) if b is not None) if r["bound"] is not None else out["bound"]
    return r | {"bound": bound, "timed_out": r["timed_out"] or out["timed_out"]}


def pipeline_baseline_plan(s0: Setup, candidates, req, inputs, budget: float | None, method: str) -> Plan | None:
    """The fastest feasible of ``candidates`` (:class:`planner.baselines.Baseline` with
    ``devices``, indices into :func:`node_gpus`) as a Plan, priced by :func:`objective_s`
    on GPU-by-GPU option tables of exactly their rows (no search); ``None``: none fits."""

    gpus = node_gpus(s0, accelerators=False)  # no baseline engine runs a layer on an accelerator card
    setups = [dataclasses.replace(s0, compute=s0.hardware.devices[g]) for g in gpus]
    L = s0.stats.num_layers
    hop = hop_matrix(s0, gpus, s0.batch_size)
    best = None
    for b in candidates:
        extra = [b.specs[l:l + 1] for l in range(L)]
        problems = [build_problem(s, budget, extra, grid=False) for s in setups]
        if b.dense_format not in problems[0].fixed or any(b.dense_format not in p.fixed for p in problems):
            continue
        rows = [option_rows(p, b.specs) for p in problems]  # [G][L]
        choice = tuple(rows[g][l] for l, g in enumerate(b.devices))
        if not feasible(problems, choice, b.devices, b.dense_format, budget):
            continue
        times = [p.times(b.prefetch) for p in problems]
        sec = objective_s(problems, times, choice, b.devices, hop, b.dense_format)
        if best is None or sec < best["objective"]:
            best = {"choice": choice, "devices": tuple(b.devices), "dense": b.dense_format, "prefetch": b.prefetch,
                    "objective": sec, "problems": problems, "note": b.note}
    if best is None:
        return None
    info = SolverInfo(method=method, status="heuristic", objective=best["objective"])
    return _assemble(best["problems"], gpus, best, hop, info, req, inputs, budget, assemble_plan,
                     notes=(f"baseline {method} on engine {inputs.engine}: {best['note']}",))


def _assemble(problems, gpus, best, hop, info, req, inputs, budget, assemble_plan, notes=()) -> Plan:
    """The Plan: each layer expanded from its GPU's option table, its resident experts and
    cache on that GPU; memory per GPU; tpot from :func:`objective_s` (hops included)."""
    p0, L = problems[0], len(best["choice"])
    choice, devices, fm, prefetch = best["choice"], best["devices"], best["dense"], best["prefetch"]
    # one problem whose layer l is layer l's table on its GPU: assemble_plan expands it
    merged = dataclasses.replace(p0, tables=tuple(problems[g].tables[l] for l, g in enumerate(devices)))
    plan = assemble_plan(merged, choice, fm, prefetch, info, req, inputs, budget,
                         notes=(f"multi-GPU pipeline: {layer_ranges(tuple(gpus[g] for g in devices))}",) + notes,
                         prefetch_policy=req.prefetch, eviction=req.eviction)
    layers = []
    for lp, g in zip(plan.layers, devices):
        mem = problems[g].device_mem
        home = tuple(mem if site == "resident" else h for h, site in zip(lp.home, lp.site))
        layers.append(lp.model_copy(update={"home": home, "cache_device": gpus[g] if lp.cache_slots else None}))
    memory = {m: u for m, u in plan.memory.items() if m != p0.device_mem}
    head = head_bytes(p0.setup, fm)  # on G[0] with its layers' share (pipeline_costs.dense_on)
    for g, p in enumerate(problems):
        mine = [l for l in range(L) if devices[l] == g]
        if not mine and g > 0:
            continue  # an unused GPU: nothing of the plan's on it
        s, fc = p.setup, p.fixed[fm]
        expert = sum(float(s.expert_bytes(f)) for l in mine for f, site in zip(layers[l].format, layers[l].site)
                     if site == "resident")
        cache = sum(layers[l].cache_slots * float(s.expert_bytes(layers[l].cache_format)) for l in mine
                    if layers[l].cache_slots)
        memory[p.device_mem] = MemoryUse(capacity_bytes=s.hardware.memories[p.device_mem].capacity_bytes,
                                         expert_bytes=expert, cache_bytes=cache,
                                         dense_bytes=(head if g == 0 else 0.0) + (fc.dense_bytes - head) * len(mine) / L,
                                         kv_bytes=fc.kv_bytes * len(mine) / L,
                                         workspace_bytes=fc.workspace_bytes)
    tpot = best["objective"]
    path = [0, *devices, 0]
    hops = hops_s(devices, hop)
    B = p0.setup.batch_size
    predicted = dict(plan.predicted) | {"tpot_s": tpot, "tokens_per_s": B / tpot, "hop_s_per_step": hops}
    # the prompt's hidden states cross at the same hops (bandwidth part scaled by its tokens)
    hop_prompt = sum(hop_s(p0.setup, gpus[a], gpus[b], req.prompt_tokens) for a, b in zip(path, path[1:]))
    predicted["ttft_s"] = plan.predicted["ttft_s"] + hop_prompt
    price = p0.setup.hardware.price_per_hour_usd
    if price is not None:
        predicted["cost_per_million_tokens_usd"] = price / (B / tpot * 3600.0) * 1e6
    # every layer on compute_device: a single-device plan (no layer_devices key)
    layer_devices = tuple(gpus[g] for g in devices) if any(devices) else None
    return plan.model_copy(update={"layers": tuple(layers), "memory": memory, "predicted": predicted,
                                   "layer_devices": layer_devices})
