"""Scheduler policies: which requests run in each forward step (a registry, as the other policies).

Each policy is one generator function ``(sim, requests, waiting)`` that runs until every
request is done, on the helpers of :class:`simulator.scheduler.RequestFlow` (admission
when the batch and the KV cache have room, block claims that preempt by the engine's rule,
swap-in, retirement). Every step is priced with its own token count.

- ``continuous``: each iteration admits what fits, prefills the new prompts (in the
  engine's micro-batches) and then decodes every running request: the simulator's rule
  before scheduler policies existed, and its default.
- ``static``: the same, but a batch is admitted only when the previous one has finished.
- ``vllm``: prefill first (vLLM's default scheduler without chunked prefill): a step either
  prefills newly admitted prompts, up to ``chunk_tokens`` prompt tokens when given, or,
  when none can be admitted, decodes every running request; swapped-out requests rejoin a
  decode step that preempted nobody, and while any are out no new request is admitted.
- ``sarathi``: chunked prefill with a token budget per step (Sarathi-Serve; vLLM's
  chunked prefill): each step decodes every running request, then fills the rest of the
  ``chunk_tokens`` budget with prompt chunks (a prompt in progress first, then new
  requests), all in one forward pass (phase ``mixed`` when it holds both).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from profiles.errors import InputError

from .policies import register

if TYPE_CHECKING:
    from .engine import Simulation
    from .scheduler import Request

__all__ = ["SCHEDULER", "DEFAULT_CHUNK_TOKENS", "scheduler_policy"]

SCHEDULER: dict[str, Callable] = {}

# Sarathi's default token budget per step when the run gives none: a small budget keeps
# decode steps short (the paper's tradeoff); vLLM's --max-num-batched-tokens plays this role
DEFAULT_CHUNK_TOKENS = 512


def scheduler_policy(name: str) -> Callable:
    if name not in SCHEDULER:
        raise InputError("unknown scheduler", key="--scheduler", value=name, expected=", ".join(sorted(SCHEDULER)),
                         fix=f"pick one of {', '.join(sorted(SCHEDULER))}")
    return SCHEDULER[name]


def _batching(sim: Simulation, requests: list[Request], waiting: list[Request], static: bool):
    running: list[Request] = []
    finished = 0
    while finished < len(requests):
        if sim.idle(waiting, running):
            yield _next_arrival(sim)
            continue
        yield from sim.swap_in(running)
        room = sim.batch_size - len(running)
        if static and running:
            room = 0
        sim.admit(waiting, running, room)
        yield from _prefill(sim, [r for r in running if not r.prefilled])
        decoding = [r for r in running if r.next_decode < len(r.decode_rows)]
        if decoding:
            decoding = yield from sim.claim([(r, r.context + 1) for r in decoding], running, waiting)
            if decoding:
                yield from sim.decode(decoding)
        finished += sim.retire(running)


def _next_arrival(sim: Simulation):
    """The event of the next request's arrival (the request source triggers it)."""
    sim.arrival = sim.env.event()
    return sim.arrival


def _prefill(sim: Simulation, new: list[Request]):
    """Prefills the whole prompts of ``new`` in one step (in the engine's micro-batches,
    :mod:`simulator.op_offload`); a request without a prompt decodes from the next step."""
    if not new:
        return
    rows = np.concatenate([r.prefill_rows for r in new])
    if len(rows):
        yield from sim.prefill(new, rows)
    for r in new:
        sim.prefilled(r)


@register(SCHEDULER, "continuous")
def continuous(sim: Simulation, requests: list[Request], waiting: list[Request]):
    """Admit as batch slots and KV blocks free up; prefill the new, then decode all."""
    yield from _batching(sim, requests, waiting, static=False)


@register(SCHEDULER, "static")
def static(sim: Simulation, requests: list[Request], waiting: list[Request]):
    """Whole batches: the next is admitted when the last request of this one has finished."""
    yield from _batching(sim, requests, waiting, static=True)


@register(SCHEDULER, "vllm")
def vllm(sim: Simulation, requests: list[Request], waiting: list[Request]):
    """Prefill first: a step prefills what can be admitted, else decodes every running request."""
    budget = sim.cfg.chunk_tokens
    running: list[Request] = []
    finished = 0
    while finished < len(requests):
        if sim.idle(waiting, running):
            yield _next_arrival(sim)
            continue
        new = []
        if not sim.swapped:
            room = sim.batch_size - len(running)
            if budget is not None:  # prompt tokens of the step, the first prompt whatever its length
                room = min(room, _within(waiting, budget))
            # a request that arrived prefilled (a decode pool, simulator.pd) joins the decode steps
            new = [r for r in sim.admit(waiting, running, room) if not r.prefilled]
        if new:
            yield from _prefill(sim, new)
        else:
            decoding = [r for r in running if r.next_decode < len(r.decode_rows)]
            preempted = sim.kv.preemptions
            if decoding:
                decoding = yield from sim.claim([(r, r.context + 1) for r in decoding], running, waiting)
            if sim.kv.preemptions == preempted:  # swapped-out requests rejoin this step
                back = yield from sim.swap_in(running)
                if back:
                    decoding += (yield from sim.claim([(r, r.context + 1) for r in back], running, waiting))
            if decoding:
                yield from sim.decode(decoding)
        finished += sim.retire(running)


def _within(waiting: list[Request], budget: int) -> int:
    """How many requests from the head of ``waiting`` fit ``budget`` prompt tokens (at least one)."""
    total, n = 0, 0
    for r in waiting:
        total += len(r.prefill_rows)
        if n and total > budget:
            break
        n += 1
    return n


@register(SCHEDULER, "sarathi")
def sarathi(sim: Simulation, requests: list[Request], waiting: list[Request]):
    """Chunked prefill: decodes first, then prompt chunks up to the step's token budget."""
    budget = sim.cfg.chunk_tokens or DEFAULT_CHUNK_TOKENS
    running: list[Request] = []
    finished = 0
    while finished < len(requests):
        if sim.idle(waiting, running):
            yield _next_arrival(sim)
            continue
        yield from sim.swap_in(running)
        # 1. the running requests, in admission order: one token each to decode, or the next
        # chunk of a prompt in progress while the budget lasts
        wants, left = [], budget
        for r in running:
            if r.prefilled:
                if r.next_decode < len(r.decode_rows) and left > 0:
                    wants.append((r, r.context + 1))
                    left -= 1
            elif left > 0:
                take = min(left, len(r.prefill_rows) - r.prefill_done)
                wants.append((r, r.prefill_done + take))
                left -= take
        stop_of = {r: tokens for r, tokens in wants if not r.prefilled}  # where each chunk ends
        granted = yield from sim.claim(wants, running, waiting)
        # 2. new requests with the rest of the budget (their first chunk must fit the KV cache)
        if left > 0 and not sim.swapped:
            for r, take in _admit_chunked(sim, waiting, running, left):
                granted.append(r)
                stop_of[r] = take
        decodes = [r for r in granted if r.prefilled]
        chunks = [(r, stop_of[r]) for r in granted if not r.prefilled]
        if decodes or chunks:
            rows = [np.array([r.decode_rows[r.next_decode] for r in decodes], dtype=np.int64)]
            rows += [r.prefill_rows[r.prefill_done:stop] for r, stop in chunks]
            contexts = [(r, r.context + 1) for r in decodes] + [(r, stop) for r, stop in chunks]
            phase = "decode" if not chunks else "prefill" if not decodes else "mixed"
            yield from sim.forward(phase, np.concatenate(rows), contexts)
            for r in decodes:
                r.next_decode += 1
                r.token_s.append(sim.env.now)
            for r, stop in chunks:
                r.prefill_done = stop
                if stop == len(r.prefill_rows):
                    sim.prefilled(r)
        finished += sim.retire(running)


def _admit_chunked(sim: Simulation, waiting: list[Request], running: list[Request], left: int):
    """Admits requests from the head of the queue while the budget, the batch and the KV cache
    allow, each with the first chunk of its prompt: ``[(request, chunk end)]``."""
    out = []
    while left > 0 and waiting and len(running) < sim.batch_size:
        r = waiting[0]
        if r.prefilled:  # its prompt's KV arrived from a prefill pool (simulator.pd): decodes from the next step
            if not sim.admit(waiting, running, 1):
                break
            continue
        take = min(left, len(r.prefill_rows))
        if not sim.admit(waiting, running, 1, tokens=lambda _, take=take: take):
            break
        if take == 0:  # nothing to prefill: it decodes from the next step on
            sim.prefilled(r)
            continue
        out.append((r, take))
        left -= take
    return out
