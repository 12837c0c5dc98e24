"""The forward step: one pass of a step's tokens through every MoE layer (SimPy process).

``forward_step`` is the layer step of :mod:`simulator.engine`'s story (point 3): per MoE
layer, attention and the dense share of the step run on the compute stream, the router's
choices come from the trace (:mod:`simulator.routing`), and each distinct expert of the
step runs by its planned site (:mod:`simulator.experts` sorts the work; the layer ends
when all of its work and transfers have). A multi-GPU pipeline plan hops the hidden states
to each layer's device; expert parallelism adds the all-to-all
(:mod:`simulator.expert_parallel`); the prefetcher (:mod:`simulator.prefetcher`) is started
after the layer's own fetches.

Speed: a layer costs events only when it needs them. A one-token step with nothing in
flight runs its layers in one loop (:meth:`simulator.step_ahead.StepAhead._step_ahead`);
the commonest layers of other steps are done in one pass each (:mod:`simulator.one_pass`);
a layer whose transfers cannot meet is worked out ahead on a virtual clock
(:mod:`simulator.ahead`); one whose transfers meet is replayed by
:mod:`simulator.contention`; processes play out the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .policies import LONG_STEP, LRUCache
from .prefetcher import LINK_CAPPED
from .routing import distinct_rows, route_step

if TYPE_CHECKING:
    from .scheduler import Request

__all__ = ["ForwardStep"]


class ForwardStep:
    """The layer-step actor of :class:`simulator.engine.Simulation` (a mixin: it reads the
    simulation's state, streams, network, layers and trace, and calls the expert-work,
    all-to-all, prefetcher and pricing mixins beside it)."""

    def forward_step(self, phase: str, rows: np.ndarray, contexts: list[tuple[Request, int]]):
        """One forward pass of ``rows`` (trace rows) through every MoE layer.

        A layer whose work is all ready at its router (resident experts, cache hits, no
        prefetch) is played out by reserving its streams ahead at a virtual time ``t``; real
        simulated time catches up at the next layer that waits on a transfer, and at the end
        of the step. Nothing else touches those streams meanwhile, so the times are the same.
        """
        env = self.env
        start = t = env.now
        recording = self.events is not None
        if recording:
            self.log("scheduler", f"{phase} step of {len(rows)} tokens")
        kv_bytes = self._kv_bytes(contexts)
        dense_by_gpu = self._dense_split(len(rows), kv_bytes, prefill=phase != "decode")
        self._token_gpu = None
        ids = self.trace.expert_ids[rows]  # [n, L, K]
        gates = self.trace.gate_weights[rows] if self.trace.gate_weights is not None else None
        distinct = None
        if len(rows) == 1:
            if self._distinct is None:
                self._distinct = distinct_rows(self.trace.expert_ids, self.E)
            distinct = bool(self._distinct[rows[0]])
        calls = route_step(ids, None if not self.reads_gates else gates, self.E, distinct)  # per layer
        layers = self.layers
        L = len(layers)
        compute = self.stream(self.compute_id)
        single = len(dense_by_gpu) == 1 and self.compute_id in dense_by_gpu
        dense_s = dense_by_gpu.get(self.compute_id, 0.0)
        ep, prefetching, play_ahead = len(self.gpus) > 1, self.prefetch_name != "none", self.play_ahead
        layer_wall_s, classify, stream = self.layer_wall_s, self._classify, self.stream
        played_ahead = self._played_ahead
        # one-token steps: layers in one loop (_step_ahead) whenever nothing is in flight
        fast = distinct is not None and single and not ep and not prefetching and play_ahead and not recording \
            and not self.pipeline
        # other steps: the commonest layers in one pass each (simulator.one_pass)
        one_pass = single and not ep and not prefetching and play_ahead and not recording and not self.pipeline \
            and not self.reads_gates
        long_step = ids.shape[0] * ids.shape[2] >= LONG_STEP
        resume, pending = 0, None
        pipeline, here = self.pipeline, self.plan.compute_device  # the embedding runs on compute_device
        for l in range(L):
            if l < resume:  # done by _step_ahead
                continue
            if pipeline:  # the layer's device takes over; the hidden states hop to it first
                dev = self.layer_dev[l]
                t += self._hop_s(here, dev, len(rows))
                here = self.compute_id = dev
                self.compute_mem = self.layer_mem[l]
                compute = self.stream(dev)
                dense_s = self._dense_split(len(rows), kv_bytes, phase != "decode", (dev,))[dev]
            if fast and not self.net.busy and not (self.inflight and any(not ev.triggered
                                                                          for ev in self.inflight.values())):
                t, l, pending = self._step_ahead(rows, calls, ids, gates, t, dense_s, l)
                resume = l + 1  # layer l goes on below
                if l == L:
                    break
            lay = layers[l]
            if one_pass and pending is None and (lay.plain_local or lay.lru_fetch) and not self.net.busy:
                router_at = compute.reserve(dense_s, ready_s=t)  # the attention, then the experts in one pass
                experts, tokens_of, _ = calls[l]
                if lay.plain_local:
                    end = self._plain_layer(l, len(rows), experts, tokens_of, router_at)
                else:
                    end = self._fetch_layer(l, ids[:, l, :] if long_step else ids[:, l, :].tolist(), experts,
                                            tokens_of, router_at)
                layer_wall_s[l] += end - t
                t = end
                continue
            tried = pending is not None  # then _played_ahead said no (_step_ahead)
            if tried:  # classified, its attention booked
                (block, jobs, flags, router_at), pending = pending, None
            else:
                refs = None
                cache = layers[l].cache
                if type(cache) is LRUCache and ids.shape[0] * ids.shape[2] >= LONG_STEP:
                    refs = (ids[:, l, :], None)  # a long step: served in numpy; LRU reads no gates
                elif cache is not None:  # the cache sees every token's accesses
                    refs = (ids[:, l, :].tolist(), None if gates is None else gates[:, l, :].tolist())
                block, jobs, flags = classify(l, rows, *calls[l], refs) if not self.ep_offload else ({}, [], 0)
                if single:
                    router_at = compute.reserve(dense_s, recording and f"attention L{l}", ready_s=t)
                else:
                    router_at = max(self.stream(g).reserve(d, recording and f"attention L{l}", ready_s=t)
                                    for g, d in dense_by_gpu.items())
            ep_end = self._all_to_all(l, ids[:, l, :], router_at) if ep else router_at
            prefetch = prefetching and l + 1 < L
            if not jobs and not prefetch:
                end = ep_end
                for dev, sec in block.items():
                    done = stream(dev).reserve(sec, recording and f"experts L{l}", ready_s=router_at)
                    if done > end:
                        end = done
                layer_wall_s[l] += end - t
                t = end
                if recording:
                    self.log("layer_step", f"L{l} done", t)
                continue
            if not prefetch and play_ahead and not tried:
                end = played_ahead(l, router_at, block, jobs, flags)
                if end is not None:
                    if ep_end > end:
                        end = ep_end
                    layer_wall_s[l] += end - t
                    t = end
                    if recording:
                        self.log("layer_step", f"L{l} done", t)
                    continue
            yield env.timeout(max(router_at - env.now, 0.0))
            self.log("layer_step", f"L{l} routed")
            if not prefetch and play_ahead and not ep:
                end = self._worked_out(l, block, jobs, flags)
                if end is not None:
                    yield env.timeout(end - env.now)
                    layer_wall_s[l] += env.now - t
                    t = env.now
                    continue
            waits = self._start(l, block, jobs, ids)
            if ep_end > router_at:
                waits.append(env.timeout(max(ep_end - env.now, 0.0)))
            if prefetch:  # after the layer's own fetches, which the copy engine serves first
                idle_s = self.link_idle_s(l, block, jobs) if self.prefetch_name in LINK_CAPPED else None
                self.prefetcher(l + 1, rows, ids, calls[l][0], idle_s)
            yield env.all_of(waits)
            self.layer_wall_s[l] += env.now - t
            t = env.now
            self.log("layer_step", f"L{l} done")
        if pipeline:  # back to compute_device for the head
            t = max(t, env.now) + self._hop_s(here, self.plan.compute_device, len(rows))
            self.compute_id, self.compute_mem = self.plan.compute_device, self._dev_mem(self.plan.compute_device)
        if t > env.now:
            yield env.timeout(max(t - env.now, 0.0))
        self.steps.append((phase, len(rows), start, env.now))
