"""Expert parallelism: each MoE layer's all-to-all dispatch and combine over several GPUs.

With experts homed on several GPUs, tokens are spread over the GPUs for attention (data
parallel) and every layer dispatches each token to the GPUs that own its experts and
combines the results back (all-to-all on the topology).
"""

from __future__ import annotations

import numpy as np

from profiles.errors import InputError
from profiles.perf import activation_bytes

from .all_to_all import exchange_matrix
from .ep_offload import EPOffload
from .ep_runtime import eplb_copies, least_loaded, moved_copies

__all__ = ["ExpertParallel"]


class ExpertParallel(EPOffload):
    """The all-to-all of :class:`simulator.engine.Simulation` (a mixin: it reads ``gpus``,
    ``layers``, ``E``, ``cfg``, ``hw``, ``model``, ``net``, ``stream``, ``call_s`` and
    ``_dev_mem`` from the simulation and keeps the ``ep_*`` counters and ``_token_gpu``).

    Run-time options (:class:`simulator.engine.SimConfig`): ``ep_reroute`` sends each call
    to its expert's least-loaded copy; ``ep_rebalance_every`` re-places every layer's experts
    with EPLB from the routing counts seen since the last re-placement (see
    :mod:`simulator.ep_runtime`); the moved experts' bytes cross the network before the
    layer's dispatch. Both change only where the all-to-all sends tokens, not the plan."""

    def _all_to_all(self, l: int, ids: np.ndarray, router_at: float) -> float:
        """Expert parallelism at layer ``l``: when the layer's dispatch, expert work and combine end.

        Token i of a step starts on GPU ``i mod G`` (data-parallel attention). Each of its
        experts runs on a GPU holding a copy: its own GPU when it holds one, else copy
        ``source mod copies`` (a static per-source choice, as SGLang's static dispatch makes,
        which splits a replicated expert's tokens evenly over its copies), or with
        ``ep_reroute`` the copy on the least-loaded GPU so far. After the layer
        the token's combined output lives on its source GPU (``ep_token_home="attention"``,
        the usual dispatch/combine) or on the GPU of its first expert (``"expert"``: the
        ExFlow idea, where inter-layer affinity keeps the next dispatch local).
        Dispatch and combine are all-to-all exchanges of hidden states: every pair's bytes
        start together and share the links of their routes, so an exchange lasts as long as
        its most loaded link direction needs (a fluid model) plus the longest route latency.
        Each GPU runs its experts in order between the two; in a plan with offload each GPU
        serves its own experts as one node would (:mod:`simulator.ep_offload`).
        """
        rebalance = self.cfg.ep_rebalance_every is not None
        if rebalance or self.cfg.ep_reroute:
            st = self._ep_runtime()
            new_steps = self.steps[st["steps_read"]:]  # steps finished since the last look
            if new_steps:
                st["decode_steps"] += sum(1 for s in new_steps if s[0] == "decode")
                st["steps_read"] = len(self.steps)
        if rebalance:
            router_at = self._ep_rebalance(l, ids, router_at)
        plan = self._ep_plan(l)
        n = ids.shape[0]
        G = len(self.gpus)
        if self._token_gpu is None or len(self._token_gpu) != n:
            self._token_gpu = self._attention_gpus(n)
        src = self._token_gpu[:, None]  # [n, 1]
        real = ids < self.E
        e_ids = np.where(real, ids, self.E)  # zero experts: the sentinel row, no copies
        cand = plan["copies"][e_ids]  # [n, K, R] GPU indices holding a copy, -1 padded
        count = np.maximum((cand >= 0).sum(axis=2), 1)  # [n, K]
        if self.cfg.ep_reroute:
            dst = least_loaded(cand, count, src[:, 0], real, G)  # [n, K]
        else:
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
        ratio = float(load.max() / max(load.mean(), 1e-300))
        self.ep_load_ratio[l] += ratio
        if rebalance or self.cfg.ep_reroute:
            self._ep_runtime()["load_log"].append((self._ep_runtime()["decode_steps"], l, ratio))
        self.ep_layer_steps[l] += 1
        dispatch = self._exchange(dispatch_pairs, router_at, f"dispatch L{l}")
        end = dispatch
        if self._ep_offloads(l):  # every GPU: its streamed experts cross even when none of its experts is used
            for g in range(G):
                mine = np.nonzero(work[g])[0]
                end = max(end, self._ep_gpu_end(l, self.gpus[g], mine, work[g][mine], ids, router_at, dispatch))
            return self._exchange(combine_pairs, end, f"combine L{l}")
        secs = self._experts_s(l, work)
        for g in np.nonzero(load)[0].tolist():
            end = max(end, self.stream(self.gpus[g]).reserve(secs[g], f"experts L{l}", ready_s=dispatch))
        return self._exchange(combine_pairs, end, f"combine L{l}")

    def _attention_gpus(self, n: int) -> np.ndarray:
        """``[n]`` the GPU (index) each token of an ``n``-token step runs attention on: ``i mod G``
        (equal shares), or the plan's ``attention_shares`` (:meth:`planner.plan.Plan.attention_counts`,
        the counts the dense work is priced for), the GPUs interleaved in proportion."""
        G = len(self.gpus)
        if self.plan.attention_shares is None:
            return np.arange(n) % G
        counts = np.array(self.plan.attention_counts(n, self.gpus))
        gpu = np.repeat(np.arange(G), counts)  # [n]
        key = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])  # [n] smooth interleave
        return gpu[np.argsort(key, kind="stable")]

    def _ep_runtime(self) -> dict:
        """Run-time EP state, made on first use: routing counts per layer since its last
        re-placement, decode steps seen, re-placements and their bytes, and a log of
        ``(decode steps before the step, layer, max/mean GPU load)``."""
        state = self.__dict__.get("_ep_state")
        if state is None:
            every = self.cfg.ep_rebalance_every
            if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
                raise InputError("must be a positive number of decode steps", key="ep_rebalance_every", value=every,
                                 fix="pass 1 or more, or None for a fixed placement")
            state = self.__dict__["_ep_state"] = {
                "counts": np.zeros((len(self.layers), self.E)), "since": [0] * len(self.layers),
                "steps_read": 0, "decode_steps": 0, "replacements": 0, "bytes": 0.0, "load_log": []}
        return state

    def _ep_rebalance(self, l: int, ids: np.ndarray, router_at: float) -> float:
        """Count layer ``l``'s routing; every ``ep_rebalance_every`` decode steps re-place its
        experts with EPLB first. Returns when the layer's dispatch may start (after the moved
        experts' bytes have arrived)."""
        st = self._ep_runtime()
        every = self.cfg.ep_rebalance_every
        if st["decode_steps"] - st["since"][l] >= every and st["counts"][l].any():
            plan = self._ep_plan(l)
            new = eplb_copies(st["counts"][l], plan["copies"], len(self.gpus))
            moves: dict[tuple[str, str], float] = {}
            host = self._dev_mem(self.host_id)
            for e, a, b in moved_copies(plan["copies"], new, plan["node_of"]):
                key = (host if a < 0 else self._dev_mem(self.gpus[a]), self._dev_mem(self.gpus[b]))
                moves[key] = moves.get(key, 0.0) + self.expert_bytes(self.layers[l].fmt[e])
            plan["copies"] = new
            st["replacements"] += 1
            st["bytes"] += sum(moves.values())
            st["counts"][l] = 0.0
            st["since"][l] = st["decode_steps"]
            if moves:
                router_at = self.net.exchange(moves, router_at, f"rebalance L{l}")
        real = ids[ids < self.E]
        st["counts"][l] += np.bincount(real.ravel(), minlength=self.E)
        return router_at

    def _ep_plan(self, l: int) -> dict:
        """Per layer: ``copies[E, R]`` GPU indices holding each expert (-1 padded); ``node_of[G]``."""
        if l not in self._ep_cache:
            index = {g: i for i, g in enumerate(self.gpus)}
            owner = self.plan.layers[l].owner  # EP with offload: the GPU serving each expert
            owners = [[index[o]] for o in owner] if owner else \
                [[index[o] for o in own if o in index] for own in self.layers[l].owners]
            R = max(len(o) for o in owners)
            copies = np.full((self.E + 1, R), -1, np.int64)  # the last row: a never-used sentinel
            for e, own in enumerate(owners):
                copies[e, :len(own)] = own
            nodes = sorted({self.hw.devices[g].node for g in self.gpus})
            node_of = np.array([nodes.index(self.hw.devices[g].node) for g in self.gpus] + [-1])
            self._ep_cache[l] = {"copies": copies, "node_of": node_of}
        return self._ep_cache[l]

    def _experts_s(self, l: int, work: np.ndarray) -> list[float]:
        """Seconds each GPU runs its experts of layer ``l`` (``work[g, e]`` tokens each), in
        expert order: the left-to-right sum of their call prices (``cumsum`` along a row adds
        in that order, and an unused expert adds 0.0, which changes no sum)."""
        fmts = self.layers[l].fmt
        one = self.__dict__.setdefault("_ep_one_format", {})
        if l not in one:
            one[l] = fmts[0] if len(set(fmts)) == 1 else None
        if one[l] is None:  # mixed formats: call by call
            return [sum(self.call_s(dev, fmts[e], int(work[g, e])) for e in np.nonzero(work[g])[0].tolist())
                    for g, dev in enumerate(self.gpus)]
        tables = self.__dict__.setdefault("_ep_tables", {})
        table = tables.get(one[l])  # [G, tokens]: each GPU's price of a call by its token count
        top = int(work.max())
        if table is None or table.shape[1] <= top:
            size = max(top + 1, 0 if table is None else 2 * table.shape[1])
            table = tables[one[l]] = np.array([[c[t] for t in range(size)]
                                               for c in (self.costs(dev, one[l]) for dev in self.gpus)])
        prices = np.where(work > 0, np.take_along_axis(table, work, axis=1), 0.0)
        return np.cumsum(prices, axis=1)[:, -1].tolist()

    def _exchange(self, pairs: np.ndarray, start: float, what: str) -> float:
        """An all-to-all of ``pairs[src, dst]`` hidden states starting at ``start``; returns its end."""
        mems = self.__dict__.get("_ep_mems")
        if mems is None:
            mems = self._ep_mems = tuple(self._dev_mem(g) for g in self.gpus)
        return exchange_matrix(self.net, mems, activation_bytes(self.model, pairs), start, what)
