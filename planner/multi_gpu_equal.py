"""Equal GPUs in a multi-GPU plan (issue 19, item 1): one option table for every GPU of the
same make and links, and the pooled relaxation that replaces the per-GPU MIP when all of a
node's GPUs are equal (:func:`planner.multi_gpu.plan_multi_gpu`).

Two GPUs are *equal* when every field of their devices but the name is the same, their
memories hold as many bytes, and the routes from the host and every expert home to them move
bytes at the same speed and latency: then :func:`planner.ilp_model.build_problem` prices every
option of every layer the same on both, so the table is built once (8 x RTX 4090: one build
instead of eight).

Pooled relaxation (all GPUs equal; G GPUs, C usable bytes and W workspace bytes each): the
per-GPU capacity rows cap[g] of :mod:`planner.multi_gpu` summed over g give one pool of
G (C - W) bytes for every layer's device bytes and dense share; the hops are >= 0. Any
multi-GPU plan is a plan of this one-device problem with no larger objective, so its MIP
bound bounds the multi-GPU optimum. Its plan is cut into contiguous layer ranges over G[0],
G[1], ... at equal shares of its bytes (:func:`split`), and each GPU's layers get their options
again from one small MIP per GPU (:func:`per_gpu`: its capacity, and the part of the quality
budget and of the homes' bytes the pooled plan spends on its layers plus an equal part of what
it leaves), so the sum of the GPUs' plans is a plan. The gap is the plan's distance from the
pooled bound (DeepSeek-V3 on 8 x RTX 4090: 0.6%). The MIPs have one GPU's variables (or
fewer) instead of G times as many, and none of the G! symmetric copies of each plan.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pulp

from .costs import Setup, capacity, fixed_costs
from .ilp_mip import _HIGHS_OPTIONS, _HiGHS
from .ilp_model import Problem, build_problem
from .pipeline_costs import dense_on, head_bytes

__all__ = ["shared_problems", "identical", "split", "pooled_problem", "per_gpu"]


def _signature(s: Setup) -> tuple:
    """What the option tables of ``s`` depend on through its compute device."""
    hw, d = s.hardware, s.compute
    fields = tuple((f.name, repr(getattr(d, f.name))) for f in dataclasses.fields(d) if f.name not in ("id", "name"))
    mem = hw.memory_of(d.id)
    routes = tuple((src, r.bottleneck_bytes_per_s, r.latency_s, len(r.links))
                   for src in (s.host.id, *s.homes) for r in (hw.route(src, d.id),))
    return fields, mem.capacity_bytes, routes


def shared_problems(setups: list[Setup], budget: float | None, build=build_problem) -> list[Problem]:
    """``build_problem`` of every setup, the option tables built once per group of equal GPUs
    (the other GPUs of a group share the first one's ``tables`` object; fixed costs and
    capacities are their own)."""
    out: list[Problem] = []
    first: dict[tuple, Problem] = {}
    for s in setups:
        key = _signature(s)
        if key not in first:
            first[key] = build(s, budget)
            out.append(first[key])
            continue
        p = first[key]
        mem = s.hardware.memory_of(s.compute.id).id
        caps = {mem: capacity(s, mem)} | {h: p.caps[h] for h in s.homes}
        fixed = {fm: fixed_costs(s, fm) for fm in s.formats if s.runs(s.compute, fm)}
        out.append(dataclasses.replace(p, setup=s, fixed=fixed, caps=caps, device_mem=mem))
    return out


def identical(problems: list[Problem]) -> bool:
    """Every GPU shares G[0]'s tables, fixed costs and capacity (the pooled relaxation applies)."""
    p0 = problems[0]
    return all(p.tables is p0.tables and p.fixed == p0.fixed and p.caps[p.device_mem] == p0.caps[p0.device_mem]
               for p in problems[1:])


def pooled_problem(problems: list[Problem], fm: str, shrink: float = 0.0) -> Problem:
    """G[0]'s problem with its device memory the pool of every GPU at dense format ``fm``
    (minus ``shrink`` bytes): ``cap - W = G (C - W) - shrink``."""
    p0, G = problems[0], len(problems)
    c, w = p0.caps[p0.device_mem], p0.fixed[fm].workspace_bytes
    return dataclasses.replace(p0, caps=p0.caps | {p0.device_mem: G * (c - w) - shrink + w})


def split(problems: list[Problem], choice, fm: str) -> tuple[int, ...]:
    """``[L]`` each layer's GPU: contiguous ranges over G[0], G[1], ..., layer l on the GPU
    whose equal share of the pooled plan's bytes (device bytes and dense share, counted in
    layer order after the head bytes G[0] holds) holds the middle of l's bytes."""
    p0, G, L = problems[0], len(problems), len(choice)
    fc, head = p0.fixed[fm], head_bytes(p0.setup, fm)
    size = np.array([float(p0.tables[l].dev_bytes[w]) for l, w in enumerate(choice)]) \
        + dense_on(fc, head, 1, L, first=False)
    share = max((float(size.sum()) + head) / G, 1e-300)
    middle = head + np.cumsum(size) - size / 2
    return tuple(int(min(G - 1, m // share)) for m in middle)


def per_gpu(problems: list[Problem], times, fronts, fm: str, budget: float | None, req, pooled, devices,
            node_limit: int):
    """Each GPU's layers' options chosen again by one small MIP per GPU (the plan of the pooled relaxation):
    its capacity, and the shares of the quality budget and of the homes' bytes that the pooled
    plan ``pooled`` spends on its layers plus an equal part of what it leaves. ``None``: a GPU
    has no plan."""
    G, L, p0 = len(problems), len(devices), problems[0]
    t = p0.tables
    err = [float(t[l].error[w]) for l, w in enumerate(pooled)]
    q_slack = 0.0 if budget is None else max(0.0, budget * p0.importance_total - sum(err)) / G
    homes = list(p0.setup.homes)
    home_use = np.zeros((L, len(homes)))
    for l, w in enumerate(pooled):
        home_use[l, int(t[l].home[w])] = float(t[l].home_bytes[w])
    h_slack = np.maximum(0.0, np.array([p0.caps[h] for h in homes]) - home_use.sum(axis=0)) / G
    choice = list(pooled)
    head = head_bytes(p0.setup, fm)
    for g, p in enumerate(problems):
        mine = [l for l in range(L) if devices[l] == g]
        if not mine:
            continue
        fc = p.fixed[fm]
        unit = max(sum(float(times[g][l][fronts[g][l]].min()) for l in mine), 1e-12)
        prob = pulp.LpProblem(f"moe_gpu_{g}", pulp.LpMinimize)
        x = {l: {int(w): prob.add_variable(f"x_{l}_{w}", cat="Binary") for w in fronts[g][l]} for l in mine}
        prob += pulp.lpSum(v * float(times[g][l][w] / unit) for l in mine for w, v in x[l].items())
        for l in mine:
            prob += pulp.lpSum(x[l].values()) == 1, f"one[{l}]"
        prob += (pulp.lpSum(v * float(t[l].dev_bytes[w]) for l in mine for w, v in x[l].items())
                 <= p.caps[p.device_mem] - fc.workspace_bytes - dense_on(fc, head, len(mine), L, first=g == 0)), "cap"
        for hi, home in enumerate(homes):
            prob += (pulp.lpSum(v * float(t[l].home_bytes[w]) for l in mine for w, v in x[l].items()
                                if t[l].home[w] == hi)
                     <= float(home_use[mine, hi].sum() + h_slack[hi])), f"cap[{home}]"
        if budget is not None:
            prob += (pulp.lpSum(v * float(t[l].error[w]) for l in mine for w, v in x[l].items())
                     <= sum(err[l] for l in mine) + q_slack), "quality"
        prob.solve(_HiGHS(msg=False, timeLimit=req.time_limit_s, gapRel=req.gap / 10, gapAbs=1e-15, threads=1,
                          random_seed=0, mip_max_nodes=node_limit, **_HIGHS_OPTIONS))
        if prob.solverModel.getInfo().primal_solution_status != 2:
            return None
        for l in mine:
            choice[l] = max(x[l], key=lambda w: x[l][w].varValue or 0.0)
    return tuple(choice)
