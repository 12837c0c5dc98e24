"""A seeded synthetic routing workload with named knobs.

Legend: S = sequences, T = tokens, L = MoE layers, E = routed experts, K = top-k.

Each token picks K distinct experts per MoE layer. Three forces shape the choice:

* popularity (``skew``): layer l has a popularity vector p_l over experts, Zipf-shaped with
  exponent ``skew`` (0 = uniform) over a random per-layer order, or given explicitly;
* inter-layer affinity (``affinity``, α): the expert of popularity rank r at layer l-1
  prefers the ``fanout`` experts ranked around r at layer l (weighted by p_l); a token's
  choice distribution at layer l is ``(1 - α) p_l + α mean_k A_l[e_{l-1,k}]``;
* temporal locality (``temporal``, τ): each of the previous token's experts at the same
  layer (same sequence) is kept with probability τ before the rest are drawn.

The K experts are drawn without replacement by Gumbel top-K on the log-probabilities; the
gate weights are the softmax of the same perturbed scores (raw, not renormalised over the
top-K, as routers report them). Sequences have a prompt (prefill) and generated (decode)
part. Shared experts run for every token, so they are metadata here, not trace entries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import InputError
from .trace import DECODE, PREFILL, Trace

__all__ = ["SyntheticWorkload", "generate", "zipf_popularity"]


@dataclass(frozen=True)
class SyntheticWorkload:
    """The knobs of a synthetic workload.

    Attributes:
        num_layers: L, MoE layers.
        num_experts: E, routed experts per layer.
        top_k: K, experts per token and layer.
        skew: Zipf exponent of per-layer popularity (0 = uniform); one value, or one per layer.
        popularity: explicit ``[L][E]`` popularity (overrides ``skew``), e.g. measured counts.
        temporal: τ in [0, 1], chance that each of the previous token's experts is reused.
        affinity: α in [0, 1], weight of the preferred successors of the previous layer's experts.
        fanout: preferred successors per expert (0 = K). Two reach the next-layer
            predictability of real DeepSeek routing (~0.48 recall) at full affinity; K cannot.
        num_shared_experts: always-on shared experts (metadata; not in the trace).
        prompt_tokens: prefill tokens per sequence.
        output_tokens: decode tokens per sequence.
        num_sequences: S.
        seed: seed of every random draw.
        model: model name recorded in the trace.
        note: where the knob values came from (calibration source), recorded in the trace.
    """

    num_layers: int
    num_experts: int
    top_k: int
    skew: float | tuple[float, ...] = 0.8
    popularity: tuple[tuple[float, ...], ...] | None = None
    temporal: float = 0.2
    affinity: float = 0.5
    fanout: int = 2
    num_shared_experts: int = 0
    prompt_tokens: int = 256
    output_tokens: int = 64
    num_sequences: int = 16
    seed: int = 0
    model: str = ""
    note: str = ""
    layer_map: tuple[int, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, expected: str) -> InputError:
            return InputError("invalid synthetic workload knob", key=key, value=value, expected=expected,
                              fix=f"set {key} to {expected}")

        for key in ("num_layers", "num_experts", "top_k", "num_sequences"):
            if int(getattr(self, key)) < 1:
                raise bad(key, getattr(self, key), "a positive integer")
        if self.top_k > self.num_experts:
            raise bad("top_k", self.top_k, f"at most num_experts ({self.num_experts})")
        for key in ("temporal", "affinity"):
            if not 0.0 <= float(getattr(self, key)) <= 1.0:
                raise bad(key, getattr(self, key), "a number in [0, 1]")
        skews = self.skew if isinstance(self.skew, tuple) else (self.skew,)
        if any(s < 0 for s in skews) or (isinstance(self.skew, tuple) and len(self.skew) != self.num_layers):
            raise bad("skew", self.skew, f"a non-negative number or {self.num_layers} of them")
        if self.prompt_tokens < 0 or self.output_tokens < 0 or self.prompt_tokens + self.output_tokens < 1:
            raise bad("prompt_tokens", (self.prompt_tokens, self.output_tokens), "non-negative, at least one token")
        if self.popularity is not None:
            pop = np.asarray(self.popularity, dtype=float)
            if pop.shape != (self.num_layers, self.num_experts) or (pop < 0).any() or (pop.sum(axis=1) <= 0).any():
                raise bad("popularity", getattr(pop, "shape", None),
                          f"[{self.num_layers}][{self.num_experts}] non-negative weights, each layer > 0")
        if self.layer_map is not None and len(self.layer_map) != self.num_layers:
            raise bad("layer_map", self.layer_map, f"{self.num_layers} hidden-layer indices")

    def with_(self, **changes: Any) -> "SyntheticWorkload":
        """A copy with some knobs changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready knobs (tuples become lists)."""
        return asdict(self)


def zipf_popularity(num_experts: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """``[E]`` Zipf popularity ``1 / rank^skew`` over a random expert order, summing to 1."""
    weights = 1.0 / np.arange(1, num_experts + 1, dtype=float) ** skew
    return (weights / weights.sum())[rng.permutation(num_experts)]


def generate(w: SyntheticWorkload) -> Trace:
    """Draw a trace from the knobs. Same knobs, same trace (byte for byte)."""
    rng = np.random.default_rng(w.seed)
    L, E, K, S = w.num_layers, w.num_experts, w.top_k, w.num_sequences
    n_pos = w.prompt_tokens + w.output_tokens

    # p: [L, E] per-layer popularity
    if w.popularity is not None:
        p = np.asarray(w.popularity, dtype=float)
        p = p / p.sum(axis=1, keepdims=True)
    else:
        skews = w.skew if isinstance(w.skew, tuple) else (w.skew,) * L
        p = np.stack([zipf_popularity(E, s, rng) for s in skews])
    # floor keeps log() finite and lets every expert appear occasionally
    p = np.maximum(p, 1e-6 / E)
    p = p / p.sum(axis=1, keepdims=True)

    # A: [L, E, E] affinity rows: the expert of popularity rank r at layer l-1 prefers the
    # `fanout` experts ranked around r at layer l (weighted by p_l), so popular experts lead to
    # popular ones and the marginals stay close to p_l while routing becomes predictable
    fanout = min(w.fanout or K, E)
    A = np.zeros((L, E, E))
    for l in range(1, L):
        prev_rank = np.argsort(np.argsort(-p[l - 1], kind="stable"), kind="stable")  # [E] rank of each expert
        by_rank = np.argsort(-p[l], kind="stable")  # [E] expert at each rank of layer l
        start = np.clip(prev_rank - fanout // 2, 0, E - fanout)  # [E]
        succ = by_rank[start[:, None] + np.arange(fanout)[None, :]]  # [E, fanout]
        weights = p[l][succ]
        A[l, np.arange(E)[:, None], succ] = weights / weights.sum(axis=1, keepdims=True)

    ids = np.zeros((S, n_pos, L, K), dtype=np.int64)  # [S, P, L, K]
    gates = np.zeros((S, n_pos, L, K), dtype=np.float32)
    rows = np.arange(S)[:, None]
    for t in range(n_pos):
        for l in range(L):
            mix = p[l][None, :].repeat(S, axis=0)  # [S, E]
            if l > 0 and w.affinity > 0:
                succ = A[l][ids[:, t, l - 1]].mean(axis=1)  # [S, K, E] -> [S, E]
                mix = (1 - w.affinity) * mix + w.affinity * succ
            scores = np.log(np.maximum(mix, 1e-12)) + rng.gumbel(size=(S, E))  # [S, E]
            gate = np.exp(scores - scores.max(axis=1, keepdims=True))
            gate /= gate.sum(axis=1, keepdims=True)
            if t > 0 and w.temporal > 0:
                keep = rng.random((S, K)) < w.temporal  # [S, K]
                prev = ids[:, t - 1, l]
                boost = np.zeros((S, E))
                boost[np.repeat(np.arange(S), K)[keep.ravel()], prev[keep]] = np.inf
                scores = scores + boost
            top = np.argsort(-scores, axis=1, kind="stable")[:, :K]  # [S, K]
            ids[:, t, l] = top
            gates[:, t, l] = gate[rows, top]

    T = S * n_pos
    phase = np.tile(np.r_[np.full(w.prompt_tokens, PREFILL), np.full(w.output_tokens, DECODE)], S).astype(np.uint8)
    meta = {"generator": "synthetic", "knobs": {k: v for k, v in w.to_dict().items() if k != "popularity"},
            "num_shared_experts": w.num_shared_experts, "note": w.note}
    return Trace(
        expert_ids=ids.reshape(T, L, K), seq_lens=np.full(S, n_pos, dtype=np.int64), phase=phase,
        num_experts=E, layer_map=tuple(w.layer_map) if w.layer_map else tuple(range(L)),
        gate_weights=gates.reshape(T, L, K), model=w.model,
        source=f"synthetic(seed={w.seed}, skew={_skew_text(w)}, temporal={w.temporal}, affinity={w.affinity})",
        meta=meta,
    )


def _skew_text(w: SyntheticWorkload) -> str:
    """Short description of the popularity knob for a trace's source line."""
    if w.popularity is not None:
        return "measured"
    if isinstance(w.skew, tuple):
        return f"{min(w.skew):.2f}..{max(w.skew):.2f} by layer"
    return f"{w.skew:g}"
