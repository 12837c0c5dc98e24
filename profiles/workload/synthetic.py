"""A seeded synthetic routing workload with named knobs.

Legend: S = sequences, P = positions per sequence (prompt + output), T = S·P tokens,
L = MoE layers, E = router choices per layer (routed experts, plus zero-computation experts
if any), K = top-k.

Each token picks K distinct experts per MoE layer. Three forces shape the choice:

* popularity (``skew`` or ``popularity``): the share ``q_l[e]`` of layer l's selections that
  go to expert e. ``skew`` = σ draws log-normal shares: the expert of popularity rank r gets
  a share ∝ ``exp(σ z_r)``, ``z_r`` the normal quantile of its rank, over a random expert
  order per layer (σ = 0: uniform; real layers: 0.1-0.35 Mixtral-8x7B, 0.3-1.2
  DeepSeek-V2-Lite). The law fits measured per-layer frequencies far better than Zipf
  (sorted-share total variation 0.03-0.07 against 0.07-0.13 on the ESFT trace), and as a
  law of *shares* its shape does not depend on E, so σ carries over between models.
  ``popularity`` gives the shares per expert instead (e.g. a real trace's frequency). The
  generator aims at the shares as selection frequencies: a token includes expert e with
  probability ``pi_l[e] = K q_l[e]`` (capped below 1, the excess spread over the others).
* inter-layer affinity (``affinity``, α): every token has a type ``u ~ U[0, 1)``, the same
  at all its layers. At layer l the type names K experts: lay the layer's experts out in a
  fixed random order as intervals of length ``pi_l[e]`` (total K) and take the experts
  under the points ``u, u + 1, ..., u + K - 1`` (systematic sampling, so over all types
  each expert is named with probability exactly ``pi_l[e]``). The token includes expert e
  with probability ``(1 - α) pi_l[e] + α [e named by u]``: α shifts choices towards the
  type's experts without changing any expert's frequency. Layers then depend on each
  other through the type, and the dependence does not fade with distance, as in real
  routers, which follow token identity (ESFT DeepSeek-V2-Lite: top-1 normalised mutual
  information 0.24 between adjacent layers, 0.19 fifteen layers apart). Among the
  chosen, the type's expert under ``u`` tends to rank first, the next one second, and so
  on (their gate scores carry weights halving per point), so top-1 experts line up across
  layers too.
* temporal locality (``temporal``, τ): each of the previous token's experts at the same
  layer (same sequence) is kept with probability τ; the rest are drawn as above.

The K experts are drawn without replacement as the K smallest of ``X_e / w_e`` with
``X_e ~ Exp(1)`` (Gumbel top-K on ``log w``), where ``w = -log(1 - pi)`` turns inclusion
probabilities into rates (exact if each expert's clock had to ring by time 1; within about
0.01 total variation of the target shares at real routing skews). The gate weights are the
softmax of perturbed scores ``log v_e - log X_e`` (``v`` = the inclusion probabilities with
the type's experts weighted by their point), raw, not renormalised over the top-K, as
routers report them; a token's K experts are stored in descending gate order (rank 0 =
top-1). Sequences have a prompt (prefill) and a generated (decode) part; routing does not
depend on the phase.

Shared experts run for every token, so they are metadata here, not trace entries.
Zero-computation experts (``num_zero_experts``) are router choices without weights: they
take the highest ids ``E - Z .. E - 1`` and the trace's meta names them.

Cost: position t of a sequence at layer l depends only on (t - 1, l), so the generator
walks the P + L - 1 anti-diagonals ``t + l = d``, each step vectorised over its cells and
the sequences; many short sequences are far faster than a few long ones (DeepSeek-V3, 58
layers x 256 experts: 3,072 tokens in about 1 s).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from statistics import NormalDist
from typing import Any

import numpy as np

from ..errors import InputError
from .trace import DECODE, PREFILL, Trace

__all__ = ["SyntheticWorkload", "generate", "lognormal_shares", "inclusion_probabilities", "type_layout",
           "MAX_INCLUSION", "DEFAULT_SKEW", "DEFAULT_TEMPORAL", "DEFAULT_AFFINITY"]

# Knob defaults: the ESFT DeepSeek-V2-Lite calibration, mean over its four tasks and layers
# (profiles/workload/defaults/deepseek-v2-lite.json records the run; a test keeps them equal).
DEFAULT_SKEW = 0.75
DEFAULT_TEMPORAL = 0.179
DEFAULT_AFFINITY = 0.824

# A token includes an expert with probability at most this: w = -log(1 - pi) stays finite,
# and a hot expert still leaves room for the rest of the top-K.
MAX_INCLUSION = 0.995
# Every expert keeps this share of its base rate at α = 1, so a token always has more than
# K experts with a positive rate.
_AFFINITY_FLOOR = 1e-3
# Gate-score weight of the type's m-th expert relative to its first (per point m).
_TYPE_RANK_DECAY = 0.5
# Float32 elements per [cells, sequences, E] working array; sequences are drawn in chunks
# of this size (a function of the knobs only, so the trace stays deterministic).
_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True)
class SyntheticWorkload:
    """The knobs of a synthetic workload.

    Attributes:
        num_layers: L, MoE layers.
        num_experts: E, router choices per layer (routed experts + zero experts).
        top_k: K, experts per token and layer.
        skew: σ of the log-normal selection shares per layer (0 = uniform); one value, or
            one per layer.
        popularity: explicit ``[L][E]`` selection shares or counts (rows are normalised;
            overrides ``skew``), e.g. a real trace's measured frequency.
        temporal: τ in [0, 1], chance that each of the previous token's experts is reused.
        affinity: α in [0, 1], weight of the token's type in its choice at every layer
            (0: layers independent; 1: the type alone decides, up to the race).
        num_shared_experts: always-on shared experts (metadata; not in the trace).
        num_zero_experts: Z, how many of the E choices (the highest ids) are
            zero-computation experts (metadata; they are drawn like any other).
        prompt_tokens: prefill tokens per sequence.
        output_tokens: decode tokens per sequence.
        num_sequences: S.
        seed: seed of every random draw.
        model: model name recorded in the trace.
        note: where the knob values came from (calibration source), recorded in the trace.
        layer_map: ``[L]`` hidden-layer index of each MoE layer (default ``0..L-1``).
    """

    num_layers: int
    num_experts: int
    top_k: int
    skew: float | tuple[float, ...] = DEFAULT_SKEW
    popularity: tuple[tuple[float, ...], ...] | None = None
    temporal: float = DEFAULT_TEMPORAL
    affinity: float = DEFAULT_AFFINITY
    num_shared_experts: int = 0
    num_zero_experts: int = 0
    prompt_tokens: int = 256
    output_tokens: int = 64
    num_sequences: int = 16
    seed: int = 0
    model: str = ""
    note: str = ""
    layer_map: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, expected: str) -> InputError:
            return InputError("invalid synthetic workload knob", key=key, value=value, expected=expected,
                              fix=f"set {key} to {expected}")

        def is_int(value: Any) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def is_real(value: Any) -> bool:
            return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
                and bool(np.isfinite(value))

        # JSON gives lists; the knobs are tuples so that a workload stays hashable
        if isinstance(self.skew, list):
            object.__setattr__(self, "skew", tuple(self.skew))
        if isinstance(self.popularity, list) or (isinstance(self.popularity, tuple) and self.popularity
                                                 and isinstance(self.popularity[0], list)):
            object.__setattr__(self, "popularity", tuple(tuple(row) for row in self.popularity))
        if isinstance(self.layer_map, list):
            object.__setattr__(self, "layer_map", tuple(self.layer_map))
        for key in ("num_layers", "num_experts", "top_k", "num_sequences"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise bad(key, getattr(self, key), "a positive integer")
        for key in ("num_shared_experts", "num_zero_experts", "prompt_tokens", "output_tokens", "seed"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 0:
                raise bad(key, getattr(self, key), "a non-negative integer")
        if self.top_k > self.num_experts:
            raise bad("top_k", self.top_k, f"at most num_experts ({self.num_experts})")
        if self.num_zero_experts >= self.num_experts:
            raise bad("num_zero_experts", self.num_zero_experts, f"fewer than num_experts ({self.num_experts})")
        for key in ("temporal", "affinity"):
            value = getattr(self, key)
            if not is_real(value) or not 0.0 <= float(value) <= 1.0:
                raise bad(key, value, "a number in [0, 1]")
        skews = self.skew if isinstance(self.skew, tuple) else (self.skew,)
        if not all(is_real(s) and s >= 0 for s in skews) or (
                isinstance(self.skew, tuple) and len(self.skew) != self.num_layers):
            raise bad("skew", self.skew, f"a non-negative number or {self.num_layers} of them")
        if self.prompt_tokens + self.output_tokens < 1:
            raise bad("prompt_tokens", (self.prompt_tokens, self.output_tokens),
                      "at least one token per sequence (prompt + output)")
        if self.popularity is not None:
            try:
                pop = np.asarray(self.popularity, dtype=float)
            except (TypeError, ValueError):
                raise bad("popularity", "ragged or non-numeric",
                          f"[{self.num_layers}][{self.num_experts}] numbers") from None
            if (pop.shape != (self.num_layers, self.num_experts) or not np.isfinite(pop).all() or (pop < 0).any()
                    or (pop.sum(axis=1) <= 0).any()):
                raise bad("popularity", pop.shape,
                          f"[{self.num_layers}][{self.num_experts}] non-negative weights, each layer > 0")
        if self.layer_map is not None and len(self.layer_map) != self.num_layers:
            raise bad("layer_map", self.layer_map, f"{self.num_layers} hidden-layer indices")

    @property
    def num_tokens(self) -> int:
        """T = S·P."""
        return self.num_sequences * (self.prompt_tokens + self.output_tokens)

    def with_(self, **changes: Any) -> "SyntheticWorkload":
        """A copy with some knobs changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready knobs (tuples become lists)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        return out


@lru_cache(maxsize=64)
def _normal_quantiles(num_experts: int) -> tuple[float, ...]:
    """Standard normal quantiles at ``(E - r + 0.5) / E`` for ranks r = 1..E (descending)."""
    return tuple(NormalDist().inv_cdf((num_experts - r + 0.5) / num_experts) for r in range(1, num_experts + 1))


def lognormal_shares(num_experts: int, sigma: float) -> np.ndarray:
    """``[E]`` log-normal selection shares in descending order, summing to 1.

    The expert of rank r (1 = most popular) gets ``exp(σ z_r)`` with ``z_r`` the standard
    normal quantile at ``(E - r + 0.5) / E``, normalised.

    >>> [round(x, 3) for x in lognormal_shares(4, 0.0)]
    [0.25, 0.25, 0.25, 0.25]
    """
    weights = np.exp(sigma * np.array(_normal_quantiles(num_experts)))
    return weights / weights.sum()


def inclusion_probabilities(shares: np.ndarray, top_k: int) -> np.ndarray:
    """``[L, E]`` chance that a token includes each expert: ``K · shares``, capped.

    A top-K router can give an expert at most every token, so ``K q_e`` above
    :data:`MAX_INCLUSION` is cut there and the excess spread over the other experts in
    proportion to their share (water filling); each row sums to K.

    Args:
        shares: ``[L, E]`` non-negative selection shares (rows are normalised here).
        top_k: K.
    """
    q = np.asarray(shares, np.float64)
    q = q / q.sum(axis=1, keepdims=True)
    pi = top_k * q
    cap = MAX_INCLUSION if top_k < q.shape[1] else 1.0  # K = E: every expert, every token
    for _ in range(q.shape[1]):  # each pass fixes at least one more expert at the cap
        over = pi > cap
        if not over.any():
            break
        free = ~over & (pi < cap)
        excess = np.where(over, pi - cap, 0.0).sum(axis=1, keepdims=True)
        room = np.where(free, pi, 0.0).sum(axis=1, keepdims=True)
        pi = np.where(over, cap, np.where(free, pi * (1 + excess / np.where(room > 0, room, 1.0)), pi))
    return pi


def type_layout(pi: np.ndarray, top_k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each layer's experts in a random order, as intervals of length ``pi`` on [0, K).

    Args:
        pi: ``[L, E]`` inclusion probabilities (rows sum to K).
        top_k: K.
        rng: the generator's random stream.

    Returns:
        ``(order [L, E], ends [L, E])``: the expert at position i of layer l's layout, and
        where its interval ends (``ends[l, -1] = K``). Type u names, at layer l, the
        experts whose intervals hold ``u + m`` for ``m = 0..K-1``
        (``order[l, searchsorted(ends[l], u + m, side="right")]``).
    """
    L, E = pi.shape
    order = np.argsort(rng.random((L, E)), axis=1)  # [L, E] a random permutation per layer
    ends = np.cumsum(np.take_along_axis(pi, order, axis=1), axis=1)
    ends *= top_k / ends[:, -1:]
    return order, ends


def _target_shares(w: SyntheticWorkload, rng: np.random.Generator) -> np.ndarray:
    """``[L, E]`` selection shares from ``popularity`` or ``skew``."""
    L, E = w.num_layers, w.num_experts
    if w.popularity is not None:
        q = np.asarray(w.popularity, dtype=float)
    else:
        skews = w.skew if isinstance(w.skew, tuple) else (w.skew,) * L
        q = np.stack([lognormal_shares(E, float(s))[rng.permutation(E)] for s in skews])
    q = q / q.sum(axis=1, keepdims=True)
    # a floor keeps log() finite and lets every expert appear occasionally
    q = np.maximum(q, 1e-6 / E)
    return q / q.sum(axis=1, keepdims=True)


def _weights(pi: np.ndarray) -> np.ndarray:
    """Exponential-clock rates whose K earliest clocks include expert e with about ``pi[e]``."""
    return -np.log1p(-np.minimum(pi, MAX_INCLUSION))


def generate(w: SyntheticWorkload) -> Trace:
    """Draw a trace from the knobs. Same knobs, same trace (byte for byte).

    Returns:
        A :class:`Trace` with ``expert_ids [T, L, K]`` (tokens sequence by sequence),
        ``gate_weights [T, L, K]`` and ``phase [T]`` (each sequence's prompt, then its output).
    """
    rng = np.random.default_rng(w.seed)
    L, E, K, S = w.num_layers, w.num_experts, w.top_k, w.num_sequences
    P = w.prompt_tokens + w.output_tokens

    # 1. per-layer selection shares -> inclusion probabilities pi [L, E] (rows sum to K)
    pi = inclusion_probabilities(_target_shares(w, rng), K)
    # 2. the type layouts, and each token's type u [S, P]
    order, ends = type_layout(pi, K, rng)
    types = rng.random((S, P))
    ids = np.zeros((S, P, L, K), np.int32)  # [S, P, L, K]
    gates = np.zeros((S, P, L, K), np.float32)
    chunk = max(1, _CHUNK_ELEMS // (min(L, P) * E))
    for s0 in range(0, S, chunk):
        _draw(ids[s0:s0 + chunk], gates[s0:s0 + chunk], pi, order, ends, types[s0:s0 + chunk], float(w.affinity),
              float(w.temporal), rng)

    T = S * P
    phase = np.tile(np.r_[np.full(w.prompt_tokens, PREFILL), np.full(w.output_tokens, DECODE)], S).astype(np.uint8)
    knobs = {k: v for k, v in w.to_dict().items() if k not in ("popularity", "note")}
    meta: dict[str, Any] = {"generator": "synthetic", "knobs": knobs,
                            "popularity": "given" if w.popularity is not None else "log-normal",
                            "num_shared_experts": w.num_shared_experts, "note": w.note}
    if w.num_zero_experts:
        meta["num_zero_experts"] = w.num_zero_experts
        meta["zero_expert_ids"] = [E - w.num_zero_experts, E - 1]
    return Trace(
        expert_ids=ids.reshape(T, L, K), seq_lens=np.full(S, P, dtype=np.int64), phase=phase,
        num_experts=E, layer_map=tuple(w.layer_map) if w.layer_map else tuple(range(L)),
        gate_weights=gates.reshape(T, L, K), model=w.model,
        source=f"synthetic(seed={w.seed}, skew={_skew_text(w)}, temporal={w.temporal}, affinity={w.affinity})",
        meta=meta,
    )


def _skew_text(w: SyntheticWorkload) -> str:
    """Short description of the popularity knob for a trace's source line (it lands in plan.json)."""
    if w.popularity is not None:
        return "given"
    if isinstance(w.skew, tuple):
        return f"{min(w.skew):.2f}..{max(w.skew):.2f} by layer"
    return f"{w.skew:g}"


def _draw(ids: np.ndarray, gates: np.ndarray, pi: np.ndarray, order: np.ndarray, ends: np.ndarray,
          types: np.ndarray, alpha: float, tau: float, rng: np.random.Generator) -> None:
    """Fill ``ids [S, P, L, K]`` and ``gates [S, P, L, K]`` for one chunk of sequences.

    Cell (t, l), position t of every sequence at layer l, depends on (t - 1, l) only
    (temporal reuse), so the cells of one anti-diagonal ``t + l = d`` are drawn together:
    P + L - 1 steps over ``[n, S, E]`` arrays (n cells).

    Args:
        pi: ``[L, E]`` inclusion probabilities.
        order, ends: :func:`type_layout`.
        types: ``[S, P]`` each token's type u.
        alpha, tau: α, τ.
    """
    S, P, L, K = ids.shape
    E = pi.shape[1]
    base = (pi * ((1 - alpha) + alpha * _AFFINITY_FLOOR)).astype(np.float32)  # [L, E]
    point_weight = (alpha * K * _TYPE_RANK_DECAY ** np.arange(K) / (_TYPE_RANK_DECAY ** np.arange(K)).sum())
    point_weight = point_weight.astype(np.float32)  # [K] gate-score weight of the type's m-th expert
    # one searchsorted for all layers: layer l's ends shifted by l * (K + 1)
    shift = np.arange(L)[:, None] * (K + 1)
    flat_ends = (ends + shift).ravel()
    points = np.arange(K, dtype=np.float64)
    for d in range(P + L - 1):
        layers = np.arange(max(0, d - P + 1), min(L - 1, d) + 1)  # [n] cells (d - l, l)
        pos = d - layers
        n = layers.size
        # 3. the experts the token's type names at this layer: [n, S, K]
        at = types[:, pos].T[:, :, None] + points + shift[layers][:, :, None]  # [n, S, K]
        slot = np.searchsorted(flat_ends, at, side="right") - layers[:, None, None] * E
        named = order[layers[:, None, None], np.minimum(slot, E - 1)]
        # 4. inclusion probabilities (1 - α) pi + α [named], as exponential-clock rates
        incl = np.broadcast_to(base[layers][:, None, :], (n, S, E)).copy()  # [n, S, E]
        np.put_along_axis(incl, named, np.take_along_axis(incl, named, axis=2) + np.float32(alpha), axis=2)
        rate = _weights(incl)
        # 5. exponential race: the K earliest clocks X / rate win (Gumbel top-K on log rate);
        #    a float32 draw can be exactly 0, the floor keeps 1 / X finite
        X = rng.standard_exponential((n, S, E), dtype=np.float32)
        np.maximum(X, 1e-30, out=X)
        race = X / rate
        # gate scores v / X: the type's experts weighted by their point, so its first leads
        np.put_along_axis(incl, named, np.take_along_axis(incl, named, axis=2) - np.float32(alpha) + point_weight,
                          axis=2)
        score = incl / X
        gate_norm = score.sum(axis=2, keepdims=True)  # [n, S, 1]
        # 6. each expert of the previous token (same sequence, same layer) is kept with
        #    chance τ: it wins the race outright (drawn at τ = 0 too, so that every τ
        #    consumes the same random stream and a calibration compares like with like)
        keep = rng.random((n, S, K)) < tau  # [n, S, K]
        keep[pos == 0] = False
        if keep.any():
            prev = ids[:, np.maximum(pos - 1, 0), layers].transpose(1, 0, 2)  # [n, S, K]
            c, r, _ = np.nonzero(keep)
            race[c, r, prev[keep]] = -1.0
        if K < E:
            top = np.argpartition(race, K - 1, axis=2)[:, :, :K]  # [n, S, K]
        else:
            top = np.broadcast_to(np.arange(E), (n, S, E)).copy()
        # 7. ranks in descending gate order, as a router reports them
        chosen = np.take_along_axis(score, top, axis=2)
        rank = np.argsort(-chosen, axis=2, kind="stable")
        ids[:, pos, layers] = np.take_along_axis(top, rank, axis=2).transpose(1, 0, 2)
        gates[:, pos, layers] = (np.take_along_axis(chosen, rank, axis=2) / gate_norm).transpose(1, 0, 2)
