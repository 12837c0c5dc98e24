"""Expert parallelism: each MoE layer's all-to-all dispatch and combine over several GPUs.

With experts homed on several GPUs, tokens are spread over the GPUs for attention (data
parallel) and every layer dispatches each token to the GPUs that own its experts and
combines the results back (all-to-all on the topology).
"""

from __future__ import annotations

import numpy as np

from profiles.perf import activation_bytes

__all__ = ["ExpertParallel"]


class ExpertParallel:
    """The all-to-all of :class:`simulator.engine.Simulation` (a mixin: it reads ``gpus``,
    ``layers``, ``E``, ``cfg``, ``hw``, ``model``, ``net``, ``stream``, ``call_s`` and
    ``_dev_mem`` from the simulation and keeps the ``ep_*`` counters and ``_token_gpu``)."""

    def _all_to_all(self, l: int, ids: np.ndarray, router_at: float) -> float:
        """Expert parallelism at layer ``l``: when the layer's dispatch, expert work and combine end.

        Token i of a step starts on GPU ``i mod G`` (data-parallel attention). Each of its
        experts runs on a GPU holding a copy: its own GPU when it holds one, else copy
        ``source mod copies`` (a static per-source choice, as SGLang's static dispatch makes,
        which splits a replicated expert's tokens evenly over its copies). After the layer
        the token's combined output lives on its source GPU (``ep_token_home="attention"``,
        the usual dispatch/combine) or on the GPU of its first expert (``"expert"``: the
        ExFlow idea, where inter-layer affinity keeps the next dispatch local).
        Dispatch and combine are all-to-all exchanges of hidden states: every pair's bytes
        start together and share the links of their routes, so an exchange lasts as long as
        its most loaded link direction needs (a fluid model) plus the longest route latency.
        Each GPU runs its experts in order between the two.
        """
        plan = self._ep_plan(l)
        n = ids.shape[0]
        G = len(self.gpus)
        if self._token_gpu is None or len(self._token_gpu) != n:
            self._token_gpu = np.arange(n) % G
        src = self._token_gpu[:, None]  # [n, 1]
        real = ids < self.E
        e_ids = np.where(real, ids, self.E)  # zero experts: the sentinel row, no copies
        cand = plan["copies"][e_ids]  # [n, K, R] GPU indices holding a copy, -1 padded
        count = np.maximum((cand >= 0).sum(axis=2), 1)  # [n, K]
        static = np.take_along_axis(cand, (src % count)[:, :, None], axis=2)[:, :, 0]
        dst = np.where((cand == src[:, :, None]).any(axis=2), src, static)  # [n, K]
        srcs = np.broadcast_to(src, dst.shape)[real]
        dsts = dst[real]
        node = plan["node_of"]
        # tokens per (GPU, expert) and the hidden states each GPU pair exchanges
        work = np.bincount(dsts * self.E + e_ids[real], minlength=G * self.E).reshape(G, self.E)
        dispatch_pairs = np.bincount(srcs * G + dsts, minlength=G * G).reshape(G, G)
        home = np.where(real[:, 0], dst[:, 0], src[:, 0]) if self.cfg.ep_token_home == "expert" else src[:, 0]
        homes = np.broadcast_to(home[:, None], dst.shape)[real]
        combine_pairs = np.bincount(dsts * G + homes, minlength=G * G).reshape(G, G)
        self._token_gpu = home
        self.ep_tokens += int(real.sum())
        self.ep_cross_gpu += int((srcs != dsts).sum())
        self.ep_cross_node += int((node[srcs] != node[dsts]).sum())
        load = work.sum(axis=1)
        self.ep_load_ratio[l] += float(load.max() / max(load.mean(), 1e-300))
        self.ep_layer_steps[l] += 1
        dispatch = self._exchange(dispatch_pairs, router_at, f"dispatch L{l}")
        end = dispatch
        lay = self.layers[l]
        for g in np.nonzero(load)[0]:
            dev = self.gpus[g]
            sec = sum(self.call_s(dev, lay.fmt[e], int(c)) for e, c in zip(np.nonzero(work[g])[0],
                                                                          work[g][work[g] > 0]))
            end = max(end, self.stream(dev).reserve(sec, f"experts L{l}", ready_s=dispatch))
        return self._exchange(combine_pairs, end, f"combine L{l}")

    def _ep_plan(self, l: int) -> dict:
        """Per layer: ``copies[E, R]`` GPU indices holding each expert (-1 padded); ``node_of[G]``."""
        if l not in self._ep_cache:
            index = {g: i for i, g in enumerate(self.gpus)}
            owners = [[index[o] for o in own if o in index] for own in self.layers[l].owners]
            R = max(len(o) for o in owners)
            copies = np.full((self.E + 1, R), -1, np.int64)  # the last row: a never-used sentinel
            for e, own in enumerate(owners):
                copies[e, :len(own)] = own
            nodes = sorted({self.hw.devices[g].node for g in self.gpus})
            node_of = np.array([nodes.index(self.hw.devices[g].node) for g in self.gpus] + [-1])
            self._ep_cache[l] = {"copies": copies, "node_of": node_of}
        return self._ep_cache[l]

    def _exchange(self, pairs: np.ndarray, start: float, what: str) -> float:
        """An all-to-all of ``pairs[src, dst]`` hidden states starting at ``start``; returns its end."""
        moves = {}
        for s_i, d_i in zip(*np.nonzero(pairs)):
            if s_i != d_i:
                moves[(self._dev_mem(self.gpus[s_i]), self._dev_mem(self.gpus[d_i]))] = \
                    activation_bytes(self.model, int(pairs[s_i, d_i]))
        return self.net.exchange(moves, start, what)
