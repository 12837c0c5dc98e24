"""The request flow: requests released by the workload, batched, stepped until done.

``request_source`` releases the trace's sequences as requests (all at t = 0, or Poisson
arrivals); ``scheduler`` admits them into the running batch (continuous or static
batching) and runs one prefill step for new prompts, then decode steps with the next
token of every running request (:meth:`simulator.engine.Simulation.forward_step`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import simpy

from profiles.errors import InputError
from profiles.workload.trace import DECODE, Trace

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
    admitted_s: float | None = None  # when the scheduler let it in (TTFT counts from arrival)
    token_s: list[float] = field(default_factory=list)  # when each output token was ready

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
    if cfg.arrival_rate_per_s:
        arrivals = np.cumsum(rng.exponential(1.0 / cfg.arrival_rate_per_s, size=n))
    else:
        arrivals = np.zeros(n)
    out = []
    for i in range(n):
        s = i % S
        rows = np.arange(starts[s], starts[s] + trace.seq_lens[s])
        decode = trace.phase[rows] == DECODE
        out.append(Request(i, float(arrivals[i]), rows[~decode], rows[decode]))
    return out


class RequestFlow:
    """The request actors of :class:`simulator.engine.Simulation` (a mixin: it reads
    ``env``, ``cfg``, ``batch_size`` and ``log``, and runs steps by ``prefill`` and ``forward``
    of :class:`simulator.op_offload.OpOffload`)."""

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
        """Admits requests into the running batch and runs forward steps until all are done."""
        running: list[Request] = []
        finished = 0
        while finished < len(requests):
            if not waiting and not running:
                self.arrival = self.env.event()
                yield self.arrival
                continue
            room = self.batch_size - len(running)
            if self.cfg.batching == "static" and running:
                room = 0
            admitted = waiting[:room]
            del waiting[:room]
            running += admitted
            for r in admitted:
                r.admitted_s = self.env.now
            if admitted:
                self.log("scheduler", "admit " + ",".join(str(r.rid) for r in admitted))
            new = [r for r in running if not r.prefilled]
            if new:
                rows = np.concatenate([r.prompt_rows for r in new])
                if len(rows):  # in the engine's micro-batches (simulator.op_offload)
                    yield from self.prefill(new, rows)
                for r in new:
                    r.prefilled = True
                    if len(r.prompt_rows):
                        r.token_s.append(self.env.now)
            decoding = [r for r in running if r.next_decode < len(r.decode_rows)]
            if decoding:
                rows = np.array([r.decode_rows[r.next_decode] for r in decoding])
                yield from self.forward("decode", rows, [(r, r.context + 1) for r in decoding])
                for r in decoding:
                    r.next_decode += 1
                    r.token_s.append(self.env.now)
            for r in [r for r in running if r.done]:
                running.remove(r)
                finished += 1
                self.log("scheduler", f"request {r.rid} done")
