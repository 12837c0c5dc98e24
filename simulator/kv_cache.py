"""The KV cache as memory: a pool of blocks on the compute device, held by running requests.

A request holds ``ceil(tokens / block_tokens)`` blocks for the tokens whose keys and values
are cached (a ``slot`` engine: one slot of the plan's context, from admission on), takes
one more block when a decode step crosses a block boundary, and gives them all back when it
finishes or is preempted (:mod:`simulator.scheduler` decides when). The pool is the memory
the plan leaves on the compute device(s) after weights, cache slots and workspace: the
planner's KV reservation plus what it left free (``capacity - used + kv`` of
:class:`planner.plan.MemoryUse`), or what ``SimConfig.kv_blocks`` / ``kv_bytes`` force.

The engine's profile (:mod:`profiles.engine_kv`) gives the block size, the preemption mode
and the victim. Bookkeeping is per request per step (integers), never per expert call.
Bytes per token are the model's (:meth:`profiles.models.ModelSpec.kv_bytes_per_token`:
MLA's latent, GQA's keys and values, every attention layer); a windowed layer's cap and a
Mamba state are not counted per block (a slot holds :meth:`~profiles.models.ModelSpec.kv_cache_bytes`
of the plan's context, which counts both).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from profiles.engine_kv import DEFAULT_KV_CACHE, KVCacheSpec
from profiles.errors import InputError

if TYPE_CHECKING:
    from .scheduler import Request

__all__ = ["KVPool", "kv_budget_bytes"]


def kv_budget_bytes(plan, memories: list[str]) -> float | None:
    """Bytes the plan leaves for the KV cache in ``memories`` (None: the plan records none of them).

    With ``plan.attention_shares`` (expert parallelism, planner.cluster.attention) each GPU holds
    the cache of its share of the sequences, so the pool is as large as the tightest GPU allows:
    ``min_g free[g] / share[g]`` over the GPUs with a share."""
    total, seen = 0.0, False
    shares = getattr(plan, "attention_shares", None)
    tightest = None
    for m in dict.fromkeys(memories):
        use = plan.memory.get(m)
        if use is None:
            continue
        seen = True
        free = max(use.capacity_bytes - use.used_bytes + use.kv_bytes, 0.0)
        total += free
        if shares is not None and shares.get(m, 0.0) > 0:
            tightest = free / shares[m] if tightest is None else min(tightest, free / shares[m])
    if tightest is not None:
        return tightest
    return total if seen else None


class KVPool:
    """Blocks of the KV cache: who holds how many, and what preemption cost (see the module docstring).

    Attributes:
        blocks: blocks in the pool (None: unbounded, the plan records no memory for it).
        block_tokens: tokens per block (a slot engine: the plan's context).
        block_bytes: bytes of one block.
        preemption: ``recompute``, ``swap`` or ``none`` (the engine's, or the run's override).
        victim: ``newest`` or ``fewest-outputs``.
    """

    def __init__(self, env, spec: KVCacheSpec | None, bytes_per_token: float, context_tokens: int,
                 slot_bytes: float, budget_bytes: float | None, blocks: int | None = None,
                 preemption: str | None = None, host_bytes: float | None = None) -> None:
        spec = spec or DEFAULT_KV_CACHE
        self.env = env
        self.slot = spec.allocation.value == "slot"
        self.block_tokens = context_tokens if self.slot else spec.tokens_per_block
        self.block_bytes = slot_bytes if self.slot else self.block_tokens * bytes_per_token
        self.preemption = spec.preemption.value if preemption is None or self.slot else preemption
        self.victim = spec.victim.value if spec.victim is not None else "newest"
        if blocks is None and budget_bytes is not None and self.block_bytes > 0:
            blocks = int(budget_bytes // self.block_bytes)
        self.blocks = blocks
        self.free = blocks
        self.used = 0
        self.host_free = host_bytes  # swap space left in host memory (None: unbounded)
        # statistics
        self.peak = 0
        self._area, self._t = 0.0, 0.0  # block-seconds held, and when `used` last changed
        self.preemptions = 0
        self.recomputed_tokens = 0
        self.swapped_out_bytes = self.swapped_in_bytes = 0.0
        self.swap_s = 0.0
        self.admission_waits = 0  # times the head of the queue waited for blocks
        self.preempted: list[tuple[float, int, str]] = []  # (time, request, how)

    def need(self, tokens: int) -> int:
        """Blocks that ``tokens`` cached tokens take."""
        return 1 if self.slot else -(-tokens // self.block_tokens)

    def fits_alone(self, tokens: int) -> bool:
        """Whether ``tokens`` tokens fit in the empty pool."""
        return self.blocks is None or self.need(tokens) <= self.blocks

    def grow(self, r: Request, tokens: int) -> bool:
        """Give ``r`` the blocks for ``tokens`` cached tokens; False (nothing taken) when too few are free."""
        extra = self.need(tokens) - r.kv_blocks
        if extra <= 0:
            return True
        if self.free is not None:
            if extra > self.free:
                return False
            self.free -= extra
        self._use(extra)
        r.kv_blocks += extra
        return True

    def release(self, r: Request) -> None:
        """``r`` gives back every block it holds."""
        if r.kv_blocks:
            if self.free is not None:
                self.free += r.kv_blocks
            self._use(-r.kv_blocks)
            r.kv_blocks = 0

    def can_swap(self, r: Request) -> bool:
        return self.host_free is None or r.kv_blocks * self.block_bytes <= self.host_free

    def swapped_out(self, r: Request, seconds: float) -> None:
        """``r``'s blocks were copied to host memory: they are free here, held there."""
        n_bytes = r.kv_blocks * self.block_bytes
        r.swapped_blocks = r.kv_blocks
        self.release(r)
        if self.host_free is not None:
            self.host_free -= n_bytes
        self.swapped_out_bytes += n_bytes
        self.swap_s += seconds

    def swapped_in(self, r: Request, seconds: float) -> None:
        """``r``'s blocks came back from host memory."""
        n_bytes = r.swapped_blocks * self.block_bytes
        if self.free is not None:
            self.free -= r.swapped_blocks
        self._use(r.swapped_blocks)
        r.kv_blocks, r.swapped_blocks = r.swapped_blocks, 0
        if self.host_free is not None:
            self.host_free += n_bytes
        self.swapped_in_bytes += n_bytes
        self.swap_s += seconds

    def _use(self, delta: int) -> None:
        now = self.env.now
        self._area += self.used * (now - self._t)
        self._t = now
        self.used += delta
        if self.used > self.peak:
            self.peak = self.used

    def too_small(self, r: Request, tokens: int) -> InputError:
        """The error for a request that cannot fit even in the empty pool."""
        return InputError("the KV cache cannot hold one request", key="kv_blocks", value=self.blocks,
                          expected=f"at least {self.need(tokens)} blocks of {self.block_tokens} tokens "
                                   f"(request {r.rid}: {tokens} tokens)",
                          fix="pass more --kv-blocks (or --kv-memory), or a plan that leaves more memory free")

    def summary(self, makespan_s: float) -> dict:
        """The pool's figures for :class:`simulator.metrics.SimReport`'s ``serving``."""
        area = self._area + self.used * (makespan_s - self._t)
        bounded = self.blocks is not None and self.blocks > 0
        return {
            "allocation": "slot" if self.slot else "paged",
            "block_tokens": self.block_tokens,
            "block_bytes": self.block_bytes,
            "blocks": self.blocks,
            "preemption": self.preemption,
            "victim": self.victim,
            "peak_blocks": self.peak,
            "peak_utilisation": self.peak / self.blocks if bounded else None,
            "mean_utilisation": area / (self.blocks * makespan_s) if bounded and makespan_s > 0 else None,
            "preemptions": self.preemptions,
            "recomputed_tokens": self.recomputed_tokens,
            "swapped_out_bytes": self.swapped_out_bytes,
            "swapped_in_bytes": self.swapped_in_bytes,
            "swap_s": self.swap_s,
            "admission_waits": self.admission_waits,
            "preempted": [list(p) for p in self.preempted],
        }
