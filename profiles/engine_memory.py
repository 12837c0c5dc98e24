"""What an engine's runtime holds besides the weights, KV cache and activations a plan places.

An engine profile's ``runtime_memory`` block (:class:`RuntimeMemory`) states, each with its
source:

- ``staging_experts``: buffers that hold an expert in flight on the compute device: fetched
  (or read from a drive) for one step and kept by no cache slot, while another computes. The
  bundle runtime starts a step's next copy while the current expert computes, so two are
  staged at a time (exporters/runtime/store.py);
- ``workspace_experts``: scratch its kernels keep, in experts' bytes (a CPU GEMM's packing
  buffers grow with the largest matrix it multiplies);
- ``fixed_bytes``: the rest, independent of the model (the loader's leftovers, Python
  objects, library pools, thread stacks), above a process that imported the engine;
- ``session_build_experts``: at load, a CPU that runs int8/int4 experts in one ONNX Runtime
  session per layer holds, besides what is loaded, a layer's read buffers and the session's
  copies while it is built: this many times the stored bytes of a layer's experts (at the
  widest such format). Nothing is staged yet at load, so the plan keeps the larger of the
  two free, not both.

The planner counts them on the compute device (planner.costs.runtime_memory), at the widest
expert the plan may hold there, so a plan's memory is what its runtime needs. An engine
without the block counts nothing of them (the device reserve covers it).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from .units import parse_size

__all__ = ["RuntimeMemory", "SourcedBytes", "SourcedCount"]

_STRICT = ConfigDict(extra="forbid", frozen=True)
Bytes = Annotated[float, BeforeValidator(parse_size)]
Source = Annotated[str, Field(min_length=3)]


class SourcedBytes(BaseModel):
    model_config = _STRICT
    value: Bytes = Field(ge=0)
    source: Source


class SourcedCount(BaseModel):
    """A number of things (experts' worth of bytes: need not be whole) with its source."""

    model_config = _STRICT
    value: float = Field(ge=0)
    source: Source


class RuntimeMemory(BaseModel):
    """The engine's own memory on the compute device (see the module docstring)."""

    model_config = _STRICT
    staging_experts: SourcedCount
    workspace_experts: SourcedCount | None = None
    fixed_bytes: SourcedBytes
    session_build_experts: SourcedCount | None = None  # in layers' worth of experts (see above)
