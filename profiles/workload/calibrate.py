"""Fit the synthetic generator's knobs to a real workload.

Legend: T = tokens, L = MoE layers, E = experts, K = top-k.

The three statistics that drive expert placement and caching are matched one knob each:

- frequency skew: per-layer popularity is the target's measured frequency (``popularity``),
  and its Zipf exponent per layer (``skew``) is fitted too, so the shape transfers to models
  with another E;
- LRU hit rate at c = 2K (mean over layers): ``temporal`` (reuse of the previous token's experts);
- next-layer predictability (recall of top-K prediction from transition counts): ``affinity``.

Each statistic rises monotonically with its knob, so two rounds of bisection (one knob at a
time, the other held) settle both; every step generates a fresh trace with the same seed.
Aggregate-only sources (counts without token order) fix the popularity only; the report says
which figures could not be matched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .aggregate import AggregateWorkload
from .hitrate import lru_curve
from .stats import expert_frequency, next_layer_predictability, previous_token_overlap
from .synthetic import SyntheticWorkload, generate
from .trace import Trace

__all__ = ["CalibrationReport", "calibrate", "measure", "zipf_skew", "DEFAULT_TEMPORAL", "DEFAULT_AFFINITY"]

# Used where a source has no token order (documented in the report): the values calibrated
# on the ESFT DeepSeek-V2-Lite trace (profiles/workload/defaults/deepseek.json).
DEFAULT_TEMPORAL = 0.1
DEFAULT_AFFINITY = 0.45
_SEARCH_TOKENS = 2400


@dataclass(frozen=True)
class CalibrationReport:
    """Target vs achieved statistics of a calibration.

    Attributes:
        target: the real workload's figures (``lru_2k``, ``predictability``, ``overlap``,
            ``frequency_tv``: 0 by definition for the target).
        achieved: the same figures for the calibrated synthetic trace.
        knobs: the fitted knob values.
        notes: what could not be matched and why.
    """

    target: dict[str, float]
    achieved: dict[str, float]
    knobs: dict[str, Any]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "achieved": self.achieved, "knobs": self.knobs, "notes": list(self.notes)}


def zipf_skew(counts: np.ndarray) -> float:
    """Zipf exponent s whose ``1/rank^s`` shape is closest (L1 on shares) to ``counts`` ``[E]``."""
    share = np.sort(np.asarray(counts, float))[::-1]
    share = share / share.sum()
    ranks = np.arange(1, len(share) + 1, dtype=float)
    grid = np.linspace(0.0, 4.0, 401)
    shapes = ranks[None, :] ** -grid[:, None]
    shapes /= shapes.sum(axis=1, keepdims=True)
    return float(grid[np.argmin(np.abs(shapes - share[None, :]).sum(axis=1))])


def measure(trace: Trace) -> dict[str, float]:
    """The calibrated statistics of a per-token trace, means over layers."""
    ids, E, K = trace.expert_ids, trace.num_experts, trace.top_k
    c = min(2 * K, E)
    out = {"lru_2k": float(lru_curve(ids, E)[:, c].mean()),
           "overlap": float(previous_token_overlap(ids, trace.seq_lens).mean())}
    if trace.num_layers > 1:
        out["predictability"] = float(next_layer_predictability(ids, E, seq_lens=trace.seq_lens).recall.mean())
    return out


def _frequency_tv(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over layers of the total-variation distance between two ``[L, E]`` frequency tables."""
    pa = a / a.sum(axis=1, keepdims=True)
    pb = b / b.sum(axis=1, keepdims=True)
    return float(0.5 * np.abs(pa - pb).sum(axis=1).mean())


def calibrate(target: Trace | AggregateWorkload, *, seed: int = 0, rounds: int = 2, steps: int = 6,
              model: str = "") -> tuple[SyntheticWorkload, CalibrationReport]:
    """Knobs that make the synthetic generator look like ``target`` (see the module docstring).

    Returns:
        ``(workload, report)``: ``generate(workload)`` gives a trace of the target's shape.
    """
    notes: list[str] = []
    if isinstance(target, Trace):
        L, E, K = target.num_layers, target.num_experts, target.top_k
        freq = expert_frequency(target.expert_ids, E).astype(float)  # [L, E]
        goal = measure(target)
        mean_len = float(target.seq_lens.mean())
        layer_map = target.layer_map
    else:
        E, K = target.num_experts, int(target.top_k or 1)
        L = max(target.layer_ids) + 1
        rows = np.asarray(target.expert_counts, float)
        # layers without counts take their nearest measured layer's popularity
        nearest = [int(np.argmin([abs(l - m) for m in target.layer_ids])) for l in range(L)]
        freq = rows[nearest]
        goal = {}
        mean_len = 64.0
        layer_map = tuple(range(L))
        notes.append(f"{target.source or 'the source'} has counts only (no token order): temporal locality "
                     f"({DEFAULT_TEMPORAL}) and affinity ({DEFAULT_AFFINITY}) keep the ESFT-calibrated defaults")
        if len(target.layer_ids) < L:
            notes.append(f"counts for MoE layers {list(target.layer_ids)} only; other layers copy the nearest")
    freq = np.maximum(freq, 0.0)
    skew = tuple(zipf_skew(row) for row in freq)
    n_pos = int(np.clip(round(mean_len), 8, 48))  # short sequences in parallel: a fast search
    base = SyntheticWorkload(num_layers=L, num_experts=E, top_k=K, skew=skew,
                             popularity=tuple(tuple(float(x) for x in row / row.sum()) for row in freq),
                             temporal=DEFAULT_TEMPORAL, affinity=DEFAULT_AFFINITY,
                             prompt_tokens=n_pos, output_tokens=0, num_sequences=max(1, _SEARCH_TOKENS // n_pos),
                             seed=seed, model=model or getattr(target, "model", ""), layer_map=tuple(layer_map))

    def fit(w: SyntheticWorkload, knob: str, stat: str) -> SyntheticWorkload:
        lo, hi = 0.0, 1.0
        for _ in range(steps):
            mid = (lo + hi) / 2
            got = measure(generate(w.with_(**{knob: mid})))[stat]
            lo, hi = (mid, hi) if got < goal[stat] else (lo, mid)
        return w.with_(**{knob: round((lo + hi) / 2, 4)})

    w = base
    if goal:
        for _ in range(rounds):
            if L > 1:
                w = fit(w, "affinity", "predictability")
            w = fit(w, "temporal", "lru_2k")
    synth = generate(w)
    achieved = measure(synth)
    achieved["frequency_tv"] = _frequency_tv(expert_frequency(synth.expert_ids, E).astype(float) + 1e-12, freq + 1e-12)
    goal = dict(goal, frequency_tv=0.0)
    knobs = {"temporal": w.temporal, "affinity": w.affinity, "skew": list(skew)}
    return w, CalibrationReport(target=goal, achieved=achieved, knobs=knobs, notes=tuple(notes))
