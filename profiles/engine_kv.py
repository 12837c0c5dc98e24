"""How an engine holds the KV cache: its allocation unit and what it does when memory runs out.

An engine profile's ``kv_cache`` block (:class:`KVCacheSpec`) states, each with its source:

- ``allocation``: ``paged`` (the cache is a pool of blocks of ``block_tokens`` tokens; a
  request holds ``ceil(context / block_tokens)`` of them and takes one more as it crosses a
  block boundary: vLLM's PagedAttention, SGLang's token pool with ``page_size``) or ``slot``
  (each running request owns a fixed slot of the context length, reserved when it starts:
  llama.cpp's server splits ``--ctx-size`` into ``--parallel`` slots);
- ``block_tokens``: tokens per block (a ``slot`` engine's slot is the plan's context);
- ``preemption``: what the engine does when a running request needs a block and none is
  free: ``recompute`` (drop the victim's blocks, put it back at the head of the queue and
  prefill its prompt and outputs again), ``swap`` (copy its blocks to host memory and back
  when blocks free up) or ``none`` (a slot never grows, so it never runs out);
- ``victim``: which running request is preempted: ``newest`` (the most recently admitted:
  vLLM's FCFS policy pops the tail of its running queue) or ``fewest-outputs`` (SGLang's
  ``retract_decode`` retracts the request with the fewest output tokens, then the longest
  prompt).

The simulator (:mod:`simulator.kv_cache`) plays it out in the memory the plan leaves on the
compute device. An engine without the block is simulated with token-granular blocks
(``block_tokens`` 1), recompute and newest-first: exact accounting and vLLM's rule.
"""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import InputError

__all__ = ["KVCacheSpec", "DEFAULT_KV_CACHE"]

_STRICT = ConfigDict(extra="forbid", frozen=True)
Source = Annotated[str, Field(min_length=3)]
T = TypeVar("T")


class _Sourced(BaseModel, Generic[T]):
    """One stated value with where it comes from."""

    model_config = _STRICT
    value: T
    source: Source


class KVCacheSpec(BaseModel):
    """The engine's KV cache (see the module docstring)."""

    model_config = _STRICT
    allocation: _Sourced[Literal["paged", "slot"]]
    block_tokens: _Sourced[Annotated[int, Field(ge=1)]] | None = None  # paged only
    preemption: _Sourced[Literal["recompute", "swap", "none"]]
    victim: _Sourced[Literal["newest", "fewest-outputs"]] | None = None  # paged only

    @model_validator(mode="after")
    def _consistent(self) -> "KVCacheSpec":
        paged = self.allocation.value == "paged"
        if paged and (self.block_tokens is None or self.victim is None):
            raise InputError("a paged KV cache states its block size and its preemption victim",
                             key="kv_cache.block_tokens" if self.block_tokens is None else "kv_cache.victim",
                             fix="add e.g. `block_tokens: {value: 16, source: ...}` and "
                                 "`victim: {value: newest, source: ...}`")
        if paged and self.preemption.value == "none":
            raise InputError("a paged KV cache grows, so it must preempt when blocks run out",
                             key="kv_cache.preemption", value="none", expected="recompute or swap",
                             fix="state the engine's preemption mode")
        if not paged and self.preemption.value != "none":
            raise InputError("a slot never grows past its context, so nothing is preempted",
                             key="kv_cache.preemption", value=self.preemption.value, expected="none",
                             fix="use `preemption: {value: none, ...}` with `allocation: slot`")
        return self

    @property
    def tokens_per_block(self) -> int | None:
        """Tokens per block (None: a slot of the plan's context)."""
        return self.block_tokens.value if self.block_tokens is not None else None


DEFAULT_KV_CACHE = KVCacheSpec(
    allocation={"value": "paged", "source": "default: the engine states no kv_cache"},
    block_tokens={"value": 1, "source": "default: token-granular accounting"},
    preemption={"value": "recompute", "source": "default: vLLM V1's rule"},
    victim={"value": "newest", "source": "default: vLLM V1's FCFS rule"})
