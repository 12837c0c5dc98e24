"""The request flow: requests released by the workload, admitted, stepped until done.

``request_source`` releases the trace's sequences as requests (all at t = 0, or Poisson
arrivals); ``scheduler`` runs the scheduler policy the run names (:mod:`simulator.schedulers`:
continuous, static, vllm, sarathi), which admits them into the running batch when the batch
and the KV cache (:mod:`simulator.kv_cache`) have room, runs forward steps
(:meth:`simulator.forward.ForwardStep.forward_step`) and, when a running request needs a KV
block and none is free, preempts one by the engine's rule: recompute (back to the head of
the queue, its prompt and outputs prefilled again) or swap (its blocks copied to host
memory and back). The helpers here are what every policy shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import simpy

from profiles.errors import InputError
from profiles.workload.trace import DECODE, Trace

from .kv_cache import KVPool, kv_budget_bytes

if TYPE_CHECKING:
    from .engine import SimConfig

__all__ = ["Request", "RequestFlow", "requests_of"]


@dataclass(eq=False)
class Request:
    """One request: the trace rows it replays, and when each of its output tokens was ready."""

    rid: int
    arrival_s: float
    prompt_rows: np.ndarray  # trace rows of the prompt (prefill), may be empty
    decode_rows: np.ndarray  # trace rows fed back one per decode step
    next_decode: int = 0
    prefilled: bool = False
    admitted_s: float | None = None  # when the scheduler first let it in (TTFT counts from arrival)
    token_s: list[float] = field(default_factory=list)  # when each output token was ready
    prefill_rows: np.ndarray = None  # what its next prefill runs: the prompt, or after a recompute
    #                                  preemption the prompt and the outputs so far
    refold: int = 0  # decode rows its pending prefill recomputes (0: none)
    prefill_done: int = 0  # rows of prefill_rows already run (chunked prefill)
    kv_blocks: int = 0  # KV blocks held on the compute device
    swapped_blocks: int = 0  # KV blocks held in host memory (swap preemption)
    preemptions: int = 0

    def __post_init__(self) -> None:
        if self.prefill_rows is None:
            self.prefill_rows = self.prompt_rows

    @property
    def done(self) -> bool:
        return self.prefilled and self.next_decode >= len(self.decode_rows)

    @property
    def context(self) -> int:
        return len(self.prompt_rows) + self.next_decode


def requests_of(trace: Trace, cfg: SimConfig, rng: np.random.Generator) -> list[Request]:
    """The requests to replay: the trace's sequences (wrapping around), with arrival times."""
    starts = np.concatenate([[0], np.cumsum(trace.seq_lens)[:-1]]).astype(np.int64)
    S = len(trace.seq_lens)
    n = cfg.requests or S
    if n < 1:
        raise InputError("at least one request is needed", key="--requests", value=n, expected=">= 1",
                         fix="pass --requests 1 or more")
    if cfg.arrival_rate_per_s is not None and cfg.arrival_rate_per_s <= 0:
        raise InputError("the arrival rate must be positive", key="--arrival-rate", value=cfg.arrival_rate_per_s,
                         expected="> 0 requests/s", fix="omit it for all requests at t = 0")
    if cfg.arrivals_s is not None:
        if len(cfg.arrivals_s) != n:
            raise InputError("one arrival time per request is needed", key="arrivals_s", value=len(cfg.arrivals_s),
                             expected=str(n), fix="give as many arrival times as requests")
        arrivals = np.asarray(cfg.arrivals_s, float)
    elif cfg.arrival_rate_per_s:
        arrivals = np.cumsum(rng.exponential(1.0 / cfg.arrival_rate_per_s, size=n))
    else:
        arrivals = np.zeros(n)
    if cfg.pd_role not in (None, "prefill", "decode"):
        raise InputError("unknown prefill/decode role", key="pd_role", value=cfg.pd_role,
                         expected="prefill, decode (or none: colocated)", fix="omit it for a colocated run")
    out = []
    for i in range(n):
        s = i % S
        rows = np.arange(starts[s], starts[s] + trace.seq_lens[s])
        decode = trace.phase[rows] == DECODE
        r = Request(i, float(arrivals[i]), rows[~decode], rows[decode][:0] if cfg.pd_role == "prefill" else rows[decode])
        r.prefilled = cfg.pd_role == "decode"  # its prompt's KV arrived from the prefill pool
        out.append(r)
    if cfg.arrivals_s is not None:  # the source releases them in time order
        out.sort(key=lambda r: (r.arrival_s, r.rid))
    return out


class RequestFlow:
    """The request actors of :class:`simulator.engine.Simulation` (a mixin: it reads
    ``env``, ``cfg``, ``plan``, ``hw``, ``model``, ``engine``, ``batch_size``, ``net``, ``gpus``,
    ``compute_mem``, ``layer_mem``, ``host_id`` and ``log``, and runs steps by ``prefill`` and
    ``forward`` of :class:`simulator.op_offload.OpOffload`); ``_kv_pool`` sizes the run's KV
    cache."""

    kv: KVPool
    swapped: list[Request]  # preempted by swap, oldest first

    def _kv_pool(self) -> KVPool:
        """The KV cache of the run: the engine's blocks in the memory the plan leaves."""
        cfg, plan = self.cfg, self.plan
        for key, value in (("--kv-blocks", cfg.kv_blocks), ("--chunk-tokens", cfg.chunk_tokens)):
            if value is not None and value < 1:
                raise InputError("must be at least 1", key=key, value=value, fix=f"pass {key} 1 or more")
        if cfg.preemption not in (None, "recompute", "swap"):
            raise InputError("unknown preemption mode", key="--preemption", value=cfg.preemption,
                             expected="recompute, swap", fix="omit it for the engine's own")
        mems = [self._dev_mem(g) for g in self.gpus] if len(self.gpus) > 1 else \
            sorted(set(self.layer_mem)) if self.pipeline else [self.compute_mem]
        if plan.kv_cache == "host":  # the cache's blocks in what the plan leaves of host memory
            mems = [self.hw.memory_of(self.host_id).id]
        budget = cfg.kv_bytes if cfg.kv_bytes is not None else kv_budget_bytes(plan, mems)
        host = plan.memory.get(self.hw.memory_of(self.host_id).id)
        return KVPool(self.env, self.engine.profile.kv_cache, self.model.kv_bytes_per_token(),
                      plan.context_tokens, self.model.kv_cache_bytes(plan.context_tokens), budget, cfg.kv_blocks,
                      cfg.preemption, None if host is None else max(host.capacity_bytes - host.used_bytes, 0.0))

    def request_source(self, requests: list[Request], waiting: list[Request], arrived: simpy.Event):
        """Releases requests at their arrival times."""
        for r in requests:
            if r.arrival_s > self.env.now:
                yield self.env.timeout(max(r.arrival_s - self.env.now, 0.0))
            self.log("request_source", f"request {r.rid} arrives")
            waiting.append(r)
            if not self.arrival.triggered:
                self.arrival.succeed()

    def scheduler(self, requests: list[Request], waiting: list[Request]):
        """Runs the run's scheduler policy (:data:`simulator.schedulers.SCHEDULER`) until all are done."""
        from .schedulers import scheduler_policy

        yield from scheduler_policy(self.cfg.batching)(self, requests, waiting)

    # ------------------------------------------------------------------ shared by the policies

    def idle(self, waiting: list[Request], running: list[Request]) -> bool:
        """Whether nothing is queued, running or swapped out (then wait for an arrival)."""
        return not waiting and not running and not self.swapped

    def admit(self, waiting: list[Request], running: list[Request], room: int, tokens=None) -> list[Request]:
        """Admits up to ``room`` requests from the head of ``waiting`` (in order) while the KV
        cache holds ``tokens(r)`` tokens of each (default: its whole pending prefill); the
        first that does not fit waits, and so do the ones behind it."""
        kv, admitted = self.kv, []
        while waiting and len(admitted) < room:
            r = waiting[0]
            want = len(r.prefill_rows) if tokens is None else tokens(r)
            if not kv.grow(r, want):
                if not running and not admitted and not kv.fits_alone(want):
                    raise kv.too_small(r, want)
                kv.admission_waits += 1
                break
            del waiting[0]
            admitted.append(r)
            if r.admitted_s is None:
                r.admitted_s = self.env.now
        if admitted:
            running += admitted
            self.log("scheduler", "admit " + ",".join(str(r.rid) for r in admitted))
        return admitted

    def prefilled(self, r: Request) -> None:
        """``r``'s pending prefill has run: its KV is cached, its next token is out."""
        r.prefilled = True
        r.prefill_done = len(r.prefill_rows)
        if len(r.prefill_rows):
            r.token_s.append(self.env.now)
        if r.refold:
            r.next_decode, r.refold = r.refold, 0

    def claim(self, wants: list[tuple[Request, int]], running: list[Request], waiting: list[Request]):
        """Gives each ``(request, tokens)`` of ``wants`` (in order) the blocks for that many
        cached tokens, preempting running requests by the engine's rule while blocks run out
        (the victim may be the request itself, or one granted earlier in the step). Returns
        the requests that keep their place in the step."""
        kv, granted, victims = self.kv, [], None
        for r, tokens in wants:
            if victims and r in victims:
                continue
            while not kv.grow(r, tokens):
                if not kv.fits_alone(tokens):
                    raise kv.too_small(r, tokens)
                victim = self.victim(running)
                yield from self.preempt(victim, running, waiting)
                victims = victims or set()
                victims.add(victim)
                if victim is r:
                    break
            else:
                granted.append(r)
        return [r for r in granted if r not in victims] if victims else granted

    def victim(self, running: list[Request]) -> Request:
        """The running request the engine preempts: the most recently admitted (vLLM), or the
        one with the fewest outputs, then the longest prompt, then the newest (SGLang)."""
        if self.kv.victim == "newest":
            return running[-1]
        return min(reversed(running), key=lambda r: (r.next_decode, -len(r.prompt_rows)))

    def preempt(self, r: Request, running: list[Request], waiting: list[Request]):
        """Takes ``r`` out of the batch: its blocks to host memory (swap), or dropped, and
        ``r`` back at the head of the queue to prefill its prompt and outputs again (recompute)."""
        kv = self.kv
        running.remove(r)
        r.preemptions += 1
        kv.preemptions += 1
        host_mem = self.hw.memory_of(self.host_id).id
        if kv.preemption == "swap" and r.prefilled and host_mem != self.compute_mem and kv.can_swap(r):
            kv.preempted.append((self.env.now, r.rid, "swap"))
            self.log("scheduler", f"preempt {r.rid}: swap out {r.kv_blocks} blocks")
            start = self.env.now
            yield from self.net.transfer(self.compute_mem, host_mem, r.kv_blocks * kv.block_bytes,
                                         f"KV swap out {r.rid}")
            kv.swapped_out(r, self.env.now - start)
            self.swapped.append(r)
            return
        kv.preempted.append((self.env.now, r.rid, "recompute"))
        self.log("scheduler", f"preempt {r.rid}: recompute")
        kv.release(r)
        if r.prefilled:  # its prompt and outputs so far, and the output not yet fed back
            r.refold = r.next_decode + 1
            r.prefill_rows = np.concatenate([r.prompt_rows, r.decode_rows[:r.refold]])
            r.prefilled = False
        r.prefill_done = 0
        kv.recomputed_tokens += len(r.prefill_rows)
        waiting.insert(0, r)

    def swap_in(self, running: list[Request]):
        """Brings swapped-out requests back (oldest first) while the batch has room and the
        blocks hold each one's cache and its next token; returns them."""
        kv, back = self.kv, []
        host_mem = self.hw.memory_of(self.host_id).id
        while self.swapped and len(running) < self.batch_size:
            r = self.swapped[0]
            need = kv.need(r.context + 1)
            if kv.free is not None and need > kv.free:
                if not running and not kv.fits_alone(r.context + 1):
                    raise kv.too_small(r, r.context + 1)
                break
            del self.swapped[0]
            self.log("scheduler", f"swap in {r.rid}: {r.swapped_blocks} blocks")
            start = self.env.now
            yield from self.net.transfer(host_mem, self.compute_mem, r.swapped_blocks * kv.block_bytes,
                                         f"KV swap in {r.rid}")
            kv.swapped_in(r, self.env.now - start)
            running.append(r)
            back.append(r)
        return back

    def decode(self, decoding: list[Request]):
        """One decode step: the next token of every request of ``decoding``."""
        rows = np.array([r.decode_rows[r.next_decode] for r in decoding])
        yield from self.forward("decode", rows, [(r, r.context + 1) for r in decoding])
        for r in decoding:
            r.next_decode += 1
            r.token_s.append(self.env.now)

    def retire(self, running: list[Request]) -> int:
        """Removes the finished requests from the batch (their blocks freed); returns how many."""
        done = [r for r in running if r.done]
        for r in done:
            running.remove(r)
            self.kv.release(r)
            self.log("scheduler", f"request {r.rid} done")
        return len(done)
