"""The KV cache in host memory as a planner decision: a binary per plan, ``kv_cache`` =
``device`` or ``host``, where the engine can keep it there (its profile's ``kv_offload``:
llama.cpp's ``--no-kv-offload``; :class:`profiles.engines.KVOffload`).

Keeping the cache in host DRAM frees its bytes on the compute device for resident experts
and cache slots, and costs every step its attention where the cache lives
(:meth:`profiles.perf.KVHost.attention_s`: on the host CPU, the step's query, keys and values
crossing the link and the output coming back, for llama.cpp). In the ILP
(:mod:`planner.ilp`) the binary ``z`` changes only constants of the model:

    cap[device]:  ... + sum_d y_d (dense_d + (1 - z) KV + workspace_d) <= usable device bytes
    cap[DRAM]:    ... + z KV <= usable DRAM bytes
    objective:    ... + sum_d y_d dense_s(d, z)            (attention where the cache lives)
    TTFT:         ... <= SLO - sum_d y_d dense_prefill_s(d, z)

so the plans split by ``z`` into two problems of the same form, each solved to its gap
(:func:`planner.optimize._solve_ilp` branches on ``z`` at the root, as it does on prefetch):
the plan is the faster, the bound the lesser of the two bounds, the same certificate as one
MIP with ``z`` a variable. Per-layer shares are not offered: the engines that keep the cache
on the host keep all of it there (llama.cpp's flag is all or nothing).
"""

from __future__ import annotations

import dataclasses

from profiles.errors import InputError

from .costs import Setup, fixed_costs
from .prefill_costs import prefill_dense_s
from .ilp_model import Problem

__all__ = ["KV_CACHE_CHOICES", "kv_sites", "with_kv_on_host"]

KV_CACHE_CHOICES = ("auto", "device", "host")


def kv_sites(s: Setup, asked: str) -> tuple[bool, ...]:
    """The values of ``z`` (KV cache on the host) to solve for ``--kv-cache asked``: ``auto``
    both where the engine can keep the cache in host DRAM (else the device alone)."""
    if asked not in KV_CACHE_CHOICES:
        raise InputError("unknown KV cache site", key="--kv-cache", value=asked, expected=", ".join(KV_CACHE_CHOICES),
                         fix="pass auto (the planner decides), device or host")
    can = s.kv_host() is not None and _dram(s) is not None
    if asked == "host" and not can:
        name = s.engine.name if s.engine is not None else "bundle"
        raise InputError(f"engine {name} cannot keep the KV cache in host memory on {s.compute.id}", key="--kv-cache",
                         value="host", fix="use --engine llama.cpp (--no-kv-offload) or --kv-cache device"
                         if s.compute.kind != "cpu" else "the KV cache already is in host memory: --kv-cache device")
    return {"auto": (False, True) if can else (False,), "device": (False,), "host": (True,)}[asked]


def _dram(s: Setup) -> str | None:
    """The host DRAM pool the cache would take (a home of the problem), if any."""
    return next((h for i, h in enumerate(s.homes) if s.in_host_dram(i)), None)


def with_kv_on_host(problem: Problem, ttft: tuple[float, int] | None) -> Problem | None:
    """``problem`` with the KV cache in host DRAM (``z = 1`` in the module docstring): fixed
    costs priced so, the DRAM row less the cache's bytes and, with a TTFT SLO ``ttft`` =
    ``(slo_s, prompt_tokens)``, its room less the host-KV dense prefill. None: DRAM cannot
    hold the cache."""
    s = problem.setup
    dram = _dram(s)
    fixed = {fm: fixed_costs(s, fm, kv_on_host=True) for fm in problem.fixed}
    kv = next(iter(fixed.values())).kv_host_bytes
    if dram is None or kv > problem.caps[dram]:
        return None
    out = dataclasses.replace(problem, fixed=fixed, caps=problem.caps | {dram: problem.caps[dram] - kv})
    if ttft is not None and problem.ttft_room is not None:
        slo_s, prompt = ttft
        out = dataclasses.replace(out, ttft_room={fm: slo_s - prefill_dense_s(s, fm, prompt, kv_on_host=True)
                                                  for fm in fixed})
    return out
