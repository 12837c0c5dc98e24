"""A plan's per-MoE-layer record (:class:`LayerPlan`) and its parts: the frozen sub-models of
the Plan contract (:mod:`planner.plan`) that describe one layer's experts.

Per MoE layer a plan stores columnar per-expert arrays (index = expert id):

- ``home``: memory pool id holding the expert's weights (``node/gpu0``, ``node/cpu0``, ...);
- ``format``: storage number format (``bf16``, ``int8``, ``int4``, ...);
- ``site``: where the expert runs: ``resident`` (on the compute device that holds it),
  ``fetch`` (copied into the layer's GPU cache on a miss), ``local`` (computed by the device
  whose memory holds it: CPU or accelerator), ``hybrid`` (GPU on a cache hit, ``local`` on
  a miss while the weights are fetched for next time), ``stream`` (copied to the compute
  device at every step whether used or not, as HF accelerate's offload does);
- ``replicas``: extra devices holding a copy (cluster plans; empty on one node);

and per layer the cache: ``cache_slots`` on ``cache_device`` with ``eviction`` policy.

Expert-parallel plans with offload (planner.cluster.offload): per expert ``owner`` names the
GPU that serves it (the all-to-all sends its tokens there; that GPU's link fetches it from
its ``home`` in host memory, that node's CPU runs it when ``local``), and ``gpu_caches``
lists each GPU's cache of the layer (``device``, ``slots``, ``format``). Both are absent
(empty) on other plans, so plans made before them load, and write, the same bytes.

``planes`` (nested formats, :mod:`profiles.nested`): per expert which bit-planes of a resident
expert stored nested the compute device holds: ``both``, ``fetch-low`` (the high plane; the low
plane is in host DRAM and crosses the link at every use) or ``high`` (runs on the high plane
alone, at the half format's quality); ``""`` for an expert that is not nested. The expert's
``format`` names the nested format (``int8``: two int4 planes; ``int4``: two 2-bit planes,
the high one run at int2's price); a layer's nested experts share one. Absent (empty) on plans
without nested experts.

``miss_copy`` (planned low-bit copies, :mod:`profiles.miss_copy`): per layer ``{format,
gate_below}``: each ``fetch`` expert also has a copy at ``format`` in host DRAM, and a miss
whose gate weight is below ``gate_below`` loads the copy, which later hits then run until it
is evicted. Absent (None) on layers without copies.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from profiles.errors import InputError
from profiles.formats import get_format
from profiles.miss_copy import COPY_FORMATS
from profiles.nested import NESTED, PLANES

__all__ = ["LayerPlan", "GpuCache", "MissCopy", "SITES", "FROZEN"]

SITES = ("resident", "fetch", "local", "hybrid", "stream")
Site = Literal["resident", "fetch", "local", "hybrid", "stream"]

FROZEN = ConfigDict(extra="forbid", frozen=True)  # every model of the Plan contract


class GpuCache(BaseModel):
    """One GPU's expert cache of a layer in an expert-parallel plan with offload."""

    model_config = FROZEN

    device: str
    slots: int = Field(ge=1)
    format: str


class MissCopy(BaseModel):
    """A layer's planned low-bit copies (profiles.miss_copy): a miss of a ``fetch`` expert whose
    gate weight is below ``gate_below`` loads the expert's copy at ``format``."""

    model_config = FROZEN

    format: Literal[COPY_FORMATS]
    gate_below: float = Field(gt=0.0, le=1.0)


class LayerPlan(BaseModel):
    """Decisions for one MoE layer. Arrays are indexed by expert id."""

    model_config = FROZEN

    moe_layer: int = Field(ge=0)
    hidden_layer: int = Field(ge=0)
    home: tuple[str, ...]
    format: tuple[str, ...]
    site: tuple[Site, ...]
    replicas: tuple[tuple[str, ...], ...] = ()
    cache_slots: int = Field(default=0, ge=0)
    cache_device: str | None = None
    cache_format: str | None = None
    owner: tuple[str, ...] = ()  # EP with offload: the GPU serving each expert (empty: its home's)
    gpu_caches: tuple[GpuCache, ...] = ()  # EP with offload: each GPU's cache of the layer
    # nested formats (profiles.nested): per expert the bit-planes the compute device holds of a
    # resident expert stored nested ("both", "fetch-low", "high"; "" for one not nested); empty: none
    planes: tuple[str, ...] = ()
    # planned low-bit copies (profiles.miss_copy): low-gate misses of fetch experts load them; None: none
    miss_copy: MissCopy | None = None

    @model_validator(mode="after")
    def _same_lengths(self) -> "LayerPlan":
        n = len(self.home)
        if len(self.format) != n or len(self.site) != n or (self.replicas and len(self.replicas) != n) \
                or (self.owner and len(self.owner) != n):
            raise InputError("home, format, site (and replicas, owner) must list every expert once",
                             key=f"layers[{self.moe_layer}]", value=(n, len(self.format), len(self.site)),
                             fix="regenerate the plan with planner optimize")
        if self.cache_slots and self.cache_device is None:
            raise InputError("a layer with cache slots needs cache_device", key=f"layers[{self.moe_layer}]",
                             fix="name the device that holds the cache")
        if self.planes:
            self._check_planes()
        if self.miss_copy is not None:
            self._check_miss_copy()
        return self

    def _check_miss_copy(self) -> None:
        """Low-bit copies (``miss_copy``): a layer with fetch experts, each wider than its copy."""
        at, fetch = f"layers[{self.moe_layer}].miss_copy", self.experts_at("fetch")
        if not fetch:
            raise InputError("only a layer with fetch experts has low-bit copies (a miss loads them)", key=at,
                             value=self.miss_copy.format, expected="a layer whose site lists fetch",
                             fix="drop miss_copy, or regenerate the plan with planner optimize")
        bits = get_format(self.miss_copy.format).bits_per_weight
        wide = [e for e in fetch if get_format(self.format[e]).bits_per_weight <= bits]
        if wide:
            raise InputError("a low-bit copy must be narrower than its expert", key=f"{at}.format",
                             value=f"{self.miss_copy.format} (expert {wide[0]}: {self.format[wide[0]]})",
                             expected=f"a format narrower than {self.format[wide[0]]}",
                             fix="regenerate the plan with planner optimize")

    def _check_planes(self) -> None:
        """Nested experts (``planes``): one entry per expert, each a known choice, of a resident
        expert whose format nests (profiles.nested)."""
        at = f"layers[{self.moe_layer}].planes"
        if len(self.planes) != len(self.home):
            raise InputError("planes must list every expert once (\"\" for one not nested)", key=at,
                             value=len(self.planes), expected=str(len(self.home)),
                             fix="regenerate the plan with planner optimize")
        for e, pl in enumerate(self.planes):
            if pl and pl not in PLANES:
                raise InputError("unknown planes choice", key=f"{at}[{e}]", value=pl,
                                 expected=" | ".join(("",) + PLANES), fix="regenerate the plan with planner optimize")
            if pl and (self.format[e] not in NESTED or self.site[e] != "resident"):
                raise InputError("only a resident expert in a nested format holds planes", key=f"{at}[{e}]",
                                 value=f"{pl} ({self.format[e]}, {self.site[e]})",
                                 expected=f"a resident expert at {' or '.join(NESTED)}, or \"\"",
                                 fix="regenerate the plan with planner optimize")
        nested = sorted({self.format[e] for e, pl in enumerate(self.planes) if pl})
        if len(nested) > 1:  # one nested format per layer (the price reads a layer's options by format)
            raise InputError("a layer's nested experts share one format", key=at, value=", ".join(nested),
                             expected=f"one of {' or '.join(NESTED)}", fix="regenerate the plan with planner optimize")
        if "fetch-low" in self.planes and self.cache_slots:  # a low plane is fetched at every use, never cached
            raise InputError("a layer whose nested experts fetch their low plane has no expert cache",
                             key=f"layers[{self.moe_layer}].cache_slots", value=self.cache_slots, expected="0",
                             fix="regenerate the plan with planner optimize")

    def experts_at(self, site: str) -> list[int]:
        return [e for e, s in enumerate(self.site) if s == site]
