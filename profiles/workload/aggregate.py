"""Aggregate-only workloads: per-layer expert counts, and optionally counts of expert pairs
across two layers, without the per-token order a trace keeps.

Legend: L = layers with counts, E = routed experts per layer, P = layer pairs with
cross-layer counts, S = recorded steps (SGLang forward passes).

Such data comes from engines' expert-distribution recorders (SGLang ``logical_count``),
papers' published counts (OLMoE, Fiddler) and anywhere a full trace was too big to keep.
It supports what needs no order: frequency, entropy, static-cache hit rates, and cross-layer
dependence for the layer pairs given. LRU/LFU/Belady curves need a trace.

File format (``.npz``, loaded with ``allow_pickle=False``), written by :func:`save_aggregate`:

=======================  ===============  =================================================
key                      dtype, shape     meaning
=======================  ===============  =================================================
``expert_counts``        number [L, E]    selections of expert e at layer ``layer_ids[l]``
``layer_ids``            int [L]          MoE-layer index of each row (default 0..L-1)
``transition_counts``    number [P, E, E] optional: tokens with expert i at layer a, j at b
``transition_layers``    int [P, 2]       the MoE layers (a, b) of each pair
``step_counts``          number [S, L, E] optional: the counts per recorded step
``meta``                 str (0-d)        JSON: ``kind`` = "aggregate", ``model``, ``source``,
                                          ``top_k``, ``num_tokens``, notes
=======================  ===============  =================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .hitrate import static_curve
from .stats import routing_entropy_bits

__all__ = ["AggregateWorkload", "save_aggregate", "load_aggregate", "AGGREGATE_KIND"]

AGGREGATE_KIND = "aggregate"


@dataclass(frozen=True, eq=False)
class AggregateWorkload:
    """Expert counts without token order.

    Attributes:
        expert_counts: ``[L, E]`` selections per expert (counts, or shares for sources that
            publish fractions), rows in ``layer_ids`` order.
        layer_ids: ``[L]`` MoE-layer index of each row.
        transition_counts: ``[P, E, E]`` tokens that chose ``i`` at layer ``a`` and ``j`` at
            layer ``b``, or ``None``.
        transition_layers: ``[P]`` pairs ``(a, b)`` of MoE-layer indices.
        step_counts: ``[S, L, E]`` counts per recorded step, or ``None``.
        top_k: experts per token when known.
        num_tokens: tokens behind the counts when known.
        model, source: provenance.
        meta: further JSON-serialisable notes.
    """

    expert_counts: np.ndarray
    layer_ids: tuple[int, ...]
    transition_counts: np.ndarray | None = None
    transition_layers: tuple[tuple[int, int], ...] = ()
    step_counts: np.ndarray | None = None
    top_k: int | None = None
    num_tokens: int | None = None
    model: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self, file=None)
        for arr in (self.expert_counts, self.transition_counts, self.step_counts):
            if arr is not None:
                arr.setflags(write=False)

    @property
    def num_layers(self) -> int:
        return int(self.expert_counts.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.expert_counts.shape[1])

    def entropy_bits(self) -> np.ndarray:
        """``[L]`` entropy of each layer's load distribution (bits)."""
        return routing_entropy_bits(self.expert_counts)

    def static_curve(self) -> np.ndarray:
        """``[L, E + 1]`` hit rate of a fixed cache of the ``c`` most selected experts."""
        return static_curve(self.expert_counts)

    def summary(self, cache_sizes: list[int]) -> dict[str, Any]:
        """A JSON-ready digest with the figures an aggregate supports."""
        curve = self.static_curve()
        E = self.num_experts
        sizes = [int(c) for c in cache_sizes]
        ent = self.entropy_bits()
        layers = []
        for row, layer in enumerate(self.layer_ids):
            total = float(self.expert_counts[row].sum())
            layers.append({
                "moe_layer": int(layer), "entropy_bits": float(ent[row]),
                "top_expert_share": float(self.expert_counts[row].max() / total) if total else 0.0,
                "static": {str(c): float(curve[row, min(c, E)]) for c in sizes},
            })
        pairs = []
        if self.transition_counts is not None:
            for (a, b), m in zip(self.transition_layers, self.transition_counts):
                pairs.append({"layers": [int(a), int(b)], "normalised_mutual_information": _nmi(m),
                              "top1_agreement": float(np.trace(m) / m.sum()) if m.sum() else 0.0})
        return {
            "kind": AGGREGATE_KIND, "model": self.model, "source": self.source, "layers_with_counts": self.num_layers,
            "experts": E, "top_k": self.top_k, "tokens": self.num_tokens, "cache_sizes": sizes,
            "steps": None if self.step_counts is None else int(self.step_counts.shape[0]),
            "mean_over_layers": {"static": {str(c): float(curve[:, min(c, E)].mean()) for c in sizes},
                                 "entropy_bits": float(ent.mean())},
            "layers": layers, "layer_pairs": pairs,
        }


def _nmi(joint: np.ndarray) -> float:
    """Normalised mutual information (by the mean of the two entropies) of a count table."""
    p = np.asarray(joint, np.float64)
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    pa, pb = p.sum(axis=1), p.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mi = np.nansum(np.where(p > 0, p * np.log(p / np.outer(pa, pb)), 0.0))
        ha = -np.nansum(np.where(pa > 0, pa * np.log(pa), 0.0))
        hb = -np.nansum(np.where(pb > 0, pb * np.log(pb), 0.0))
    denom = (ha + hb) / 2
    return float(mi / denom) if denom > 0 else 0.0


def _validate(agg: AggregateWorkload, file: str | Path | None) -> None:
    def bad(key: str, message: str, value: Any, expected: str, fix: str) -> InputError:
        return InputError(message, file=file, key=key, value=value, expected=expected, fix=fix)

    counts = agg.expert_counts
    if not isinstance(counts, np.ndarray) or counts.ndim != 2 or counts.shape[1] < 1:
        raise bad("expert_counts", "wrong shape", getattr(counts, "shape", type(counts).__name__),
                  "a 2-D array [layers, experts]", "store one row of counts per layer")
    if not np.issubdtype(counts.dtype, np.number) or not np.isfinite(counts).all() or (counts < 0).any():
        raise bad("expert_counts", "counts must be finite and non-negative", str(counts.dtype),
                  "non-negative numbers", "store selection counts (or shares)")
    if len(agg.layer_ids) != counts.shape[0]:
        raise bad("layer_ids", "wrong length", len(agg.layer_ids), f"{counts.shape[0]} (one per row)",
                  "give the MoE-layer index of every row")
    tc = agg.transition_counts
    if tc is not None:
        E = counts.shape[1]
        if tc.ndim != 3 or tc.shape[1:] != (E, E):
            raise bad("transition_counts", "wrong shape", tc.shape, f"[pairs, {E}, {E}]",
                      "store one E x E table per layer pair")
        if len(agg.transition_layers) != tc.shape[0]:
            raise bad("transition_layers", "wrong length", len(agg.transition_layers),
                      f"{tc.shape[0]} pairs (a, b)", "name the two layers of every table")
        if not np.isfinite(tc).all() or (tc < 0).any():
            raise bad("transition_counts", "counts must be finite and non-negative", float(np.nanmin(tc)),
                      "non-negative numbers", "store pair counts")
    sc = agg.step_counts
    if sc is not None and (sc.ndim != 3 or sc.shape[1:] != counts.shape):
        raise bad("step_counts", "wrong shape", sc.shape, f"[steps, {counts.shape[0]}, {counts.shape[1]}]",
                  "store the per-step counts behind expert_counts")


def save_aggregate(agg: AggregateWorkload, path: str | Path) -> Path:
    """Write ``agg`` to ``path`` (``.npz``, no pickle)."""
    path = Path(path)
    meta = dict(agg.meta)
    meta.update(kind=AGGREGATE_KIND, model=agg.model, source=agg.source, top_k=agg.top_k, num_tokens=agg.num_tokens)
    arrays: dict[str, np.ndarray] = dict(expert_counts=agg.expert_counts,
                                         layer_ids=np.asarray(agg.layer_ids, np.int64),
                                         meta=np.array(json.dumps(meta, sort_keys=True)))
    if agg.transition_counts is not None:
        arrays["transition_counts"] = agg.transition_counts
        arrays["transition_layers"] = np.asarray(agg.transition_layers, np.int64).reshape(-1, 2)
    if agg.step_counts is not None:
        arrays["step_counts"] = agg.step_counts
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # savez would append .npz to a name without it
        np.savez_compressed(fh, **arrays)
    return path


def load_aggregate(path: str | Path) -> AggregateWorkload:
    """Load an aggregate written by :func:`save_aggregate`; problems are one InputError line."""
    path = Path(path)
    if not path.is_file():
        raise InputError("aggregate file not found", file=path, fix="check the path")
    from .trace import read_npz

    data = read_npz(path)  # sizes checked before anything is unpacked
    if "expert_counts" not in data:
        raise InputError("required array missing", file=path, key="expert_counts",
                         expected="expert_counts [layers, experts]", fix="store the per-layer counts")
    try:
        meta = json.loads(str(data["meta"])) if "meta" in data else {}
        if not isinstance(meta, dict):
            raise ValueError
    except ValueError:
        raise InputError("meta is not a JSON object", file=path, key="meta",
                         fix='store np.array(json.dumps({...}))') from None
    counts = data["expert_counts"]
    layers = data.get("layer_ids", np.arange(counts.shape[0] if counts.ndim else 0))
    pairs = data.get("transition_layers")
    meta.pop("kind", None)
    try:
        return AggregateWorkload(
            expert_counts=counts, layer_ids=tuple(int(x) for x in np.ravel(layers)),
            transition_counts=data.get("transition_counts"),
            transition_layers=() if pairs is None else tuple((int(a), int(b)) for a, b in np.reshape(pairs, (-1, 2))),
            step_counts=data.get("step_counts"),
            top_k=meta.pop("top_k", None), num_tokens=meta.pop("num_tokens", None),
            model=str(meta.pop("model", "")), source=str(meta.pop("source", path)), meta=meta,
        )
    except InputError as exc:
        raise exc.located(file=path) from None
