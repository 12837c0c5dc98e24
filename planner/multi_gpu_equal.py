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
bound bounds the multi-GPU optimum. Its plan is packed into contiguous layer ranges over
G[0], G[1], ... (:func:`pack`); when the ranges do not fit, the pool is shrunk by what the
packing lost and the relaxation solved again (a restriction: its plans are plans, its bound
is not used). The MIP has one GPU's variables instead of G times as many and none of the
G! symmetric copies of each plan.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .costs import Setup, capacity, fixed_costs
from .ilp_model import Problem, build_problem

__all__ = ["shared_problems", "identical", "split", "pooled_problem"]


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
    layer order) holds the middle of l's bytes."""
    p0, G, L = problems[0], len(problems), len(choice)
    fc = p0.fixed[fm]
    size = np.array([float(p0.tables[l].dev_bytes[w]) for l, w in enumerate(choice)]) \
        + (fc.dense_bytes + fc.kv_bytes) / L
    share = max(float(size.sum()) / G, 1e-300)
    middle = np.cumsum(size) - size / 2
    return tuple(int(min(G - 1, m // share)) for m in middle)
