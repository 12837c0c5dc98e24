"""Fit the synthetic generator's knobs to a real workload, and say how close it came.

Legend: T = tokens, L = MoE layers, E = experts per layer, K = top-k, P = layer pairs.

:func:`calibrate` takes a per-token :class:`Trace` or an :class:`AggregateWorkload` and
returns a :class:`SyntheticWorkload` plus a :class:`CalibrationReport` (target vs achieved
for every statistic). The three statistics that drive expert placement and caching are
matched one knob each:

1. **frequency**: each layer's popularity is the target's measured selection shares, per
   expert (``popularity``), or, with ``popularity="lognormal"``, the log-normal law with
   the σ fitted to each layer's sorted shares (``skew``; it carries over to models with
   another E). Aggregates with counts for some layers only: those layers keep their
   measured shares, the others get σ interpolated over depth (the nearest measured layer's
   beyond the ends).
2. **LRU hit rate** at c = 2K slots, mean over layers: ``temporal`` (τ).
3. **next-layer predictability** (recall of a top-K predictor built from transition
   counts, :func:`profiles.workload.stats.next_layer_predictability`): ``affinity`` (α).
   An aggregate with cross-layer tables (OLMoE's top-1 expert at layer a vs layer b)
   gives instead their normalised mutual information, matched on the same layer pairs.

Search: every step generates a trace from the same seed, with sequences of the length
asked for and about :data:`SEARCH_TOKENS` tokens, so steps differ only by the knobs. For a
trace, (τ, α) are found together by Newton steps on a Broyden-updated Jacobian (each knob
moves its own statistic most: τ the hit rate, α the recall), usually in 2-4 steps; the
knobs stay in [0, 1] and a goal out of reach ends at the bound. For an aggregate's single
knob (α on the pair NMI) a bracketed secant search (regula falsi, Illinois variant) does
the same. Then the calibrated workload is generated at the shape asked for and measured;
if its frequencies miss the target by more than twice what sampling explains (strong
temporal reuse with strong affinity keeps the hottest experts a little low), each
expert's share is scaled once by target / achieved and the search resumes from there.

Aggregates have no token order, so no LRU curve and no temporal information: ``temporal``
stays at :data:`DEFAULT_TEMPORAL` (calibrated on the ESFT DeepSeek-V2-Lite trace) and the
report says so; without cross-layer tables ``affinity`` stays at :data:`DEFAULT_AFFINITY`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import InputError
from ..models import ModelSpec
from .aggregate import AggregateWorkload
from .hitrate import lru_curve, static_curve
from .stats import expert_frequency, next_layer_predictability, previous_token_overlap, routing_entropy_bits
from .synthetic import DEFAULT_AFFINITY, DEFAULT_TEMPORAL, SyntheticWorkload, generate, lognormal_shares
from .trace import Trace

__all__ = [
    "Figure", "CalibrationReport", "calibrate", "fit_lognormal_skew", "normalised_mutual_information",
    "DEFAULT_TEMPORAL", "DEFAULT_AFFINITY", "SEARCH_TOKENS",
]

# DEFAULT_TEMPORAL and DEFAULT_AFFINITY (re-exported from synthetic.py): the ESFT
# DeepSeek-V2-Lite calibration, kept where a source has no token order (temporal) or no
# cross-layer counts (affinity).
# Where a trace's search starts: fixed, so that the defaults do not feed back into the
# calibration that produces them.
_SEARCH_START = (0.15, 0.8)
# Tokens per search step: enough that the statistics move by less than their tolerance
# between seeds, few enough for a step (trace and statistics) to take about 0.4 s at
# DeepSeek-V2-Lite's shape.
SEARCH_TOKENS = 4096
# Aggregate cross-layer tables: tokens per search step (an E x E table needs more).
_NMI_TOKENS = 16384
# Stop a search when the statistic is this close to its target (a fraction of the
# acceptance tolerances: LRU ±0.03, recall ±0.05).
_TOL = {"lru": 0.004, "recall": 0.008, "nmi": 0.004}
_MAX_STEPS = 6


@dataclass(frozen=True)
class Figure:
    """One statistic, target against achieved.

    Attributes:
        name: e.g. ``lru_hit_rate@12``.
        target: the real workload's value, or ``None`` when it has none.
        achieved: the calibrated synthetic trace's value.
        role: ``fitted`` (a knob was searched for it), ``given`` (set from the target
            directly, e.g. frequency), or ``reported`` (a consequence, shown for reference).
        knob: the knob fitted to it, for ``fitted`` figures.
    """

    name: str
    target: float | None
    achieved: float
    role: str
    knob: str = ""

    @property
    def error(self) -> float | None:
        """``achieved - target``; ``None`` without a target."""
        return None if self.target is None else self.achieved - self.target


@dataclass(frozen=True)
class CalibrationReport:
    """What a calibration matched, how closely, and what it could not.

    Attributes:
        source: the target's source (path, task).
        kind: ``trace`` or ``aggregate``.
        figures: target vs achieved, fitted figures first.
        knobs: the fitted knob values (``temporal``, ``affinity``, per-layer
            log-normal σ as ``skew``).
        notes: what could not be matched or was assumed, one sentence each.
        search_steps: traces generated by the search.
        achieved_tokens: tokens of the trace the achieved figures come from.
    """

    source: str
    kind: str
    figures: tuple[Figure, ...]
    knobs: dict[str, Any]
    notes: tuple[str, ...] = field(default_factory=tuple)
    search_steps: int = 0
    achieved_tokens: int = 0

    def figure(self, name: str) -> Figure:
        """The figure called ``name``."""
        for f in self.figures:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "source": self.source, "kind": self.kind,
            "figures": [{"name": f.name, "target": f.target, "achieved": f.achieved, "error": f.error,
                         "role": f.role, "knob": f.knob} for f in self.figures],
            "knobs": self.knobs, "notes": list(self.notes), "search_steps": self.search_steps,
            "achieved_tokens": self.achieved_tokens,
        }


# ----------------------------------------------------------------------------- statistics


def fit_lognormal_skew(shares: np.ndarray) -> float:
    """σ of the log-normal law (:func:`lognormal_shares`) closest to ``shares`` ``[E]``.

    Closest in total variation between the sorted shares; a grid of step 0.005 on [0, 4].
    """
    s = np.sort(np.asarray(shares, np.float64))[::-1]
    s = s / s.sum()
    grid = np.round(np.arange(0.0, 4.0 + 1e-9, 0.005), 3)
    z = np.log(lognormal_shares(len(s), 1.0) * len(s))  # σ = 1 log-shares up to a constant
    laws = np.exp(grid[:, None] * z[None, :])
    laws /= laws.sum(axis=1, keepdims=True)
    return float(grid[np.argmin(np.abs(laws - s[None, :]).sum(axis=1))])


def normalised_mutual_information(joint: np.ndarray) -> float:
    """Normalised mutual information of a count table, Miller-Madow bias corrected.

    ``I / mean(H_a, H_b)`` with each entropy raised by (non-empty cells - 1) / 2N, so that
    tables of very different token counts compare fairly (a plain estimate of an E x E
    table from a few thousand tokens reads far more dependence than there is).
    """
    p = np.asarray(joint, np.float64)
    n = p.sum()
    if n <= 0:
        return 0.0

    def entropy(counts: np.ndarray) -> float:
        c = counts[counts > 0] / n
        return float(-(c * np.log(c)).sum() + (np.count_nonzero(counts) - 1) / (2 * n))

    ha, hb, hab = entropy(p.sum(axis=1)), entropy(p.sum(axis=0)), entropy(p.ravel())
    denom = (ha + hb) / 2
    return float(max(0.0, ha + hb - hab) / denom) if denom > 0 else 0.0


def _shares(counts: np.ndarray) -> np.ndarray:
    c = np.asarray(counts, np.float64)
    total = c.sum(axis=1, keepdims=True)
    return np.divide(c, total, out=np.full_like(c, 1.0 / c.shape[1]), where=total > 0)


def _tv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[L]`` total-variation distance between the rows of two share tables."""
    return 0.5 * np.abs(_shares(a) - _shares(b)).sum(axis=1)


def _sampling_tv(counts: np.ndarray, top_k: int, num_tokens: int) -> float:
    """Mean total variation that sampling ``num_tokens`` top-K tokens from the shares of
    ``counts [L, E]`` leaves on average (each expert's count is binomial, its mean absolute
    deviation about sqrt(2 / pi) standard deviations)."""
    K = top_k
    incl = np.minimum(_shares(counts) * K, 1.0)  # chance a token picks the expert
    mad = np.sqrt(2 / np.pi * incl * (1 - incl) / max(1, num_tokens))
    return float(0.5 * (mad / K).sum(axis=1).mean())


def _sorted_tv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[L]`` total variation between the rows' shares sorted in descending order."""
    return 0.5 * np.abs(-np.sort(-_shares(a), axis=1) + np.sort(-_shares(b), axis=1)).sum(axis=1)


def _lru_2k(trace: Trace) -> float:
    c = min(2 * trace.top_k, trace.num_experts)
    return float(lru_curve(trace.expert_ids, trace.num_experts)[:, c].mean())


def _recall(trace: Trace) -> float:
    return float(next_layer_predictability(trace.expert_ids, trace.num_experts,
                                           seq_lens=trace.seq_lens).recall.mean())


def _pair_table(trace: Trace, a: int, b: int, top1: bool) -> np.ndarray:
    """``[E, E]`` counts of (expert at layer a, expert at layer b): rank 0 only, or all rank pairs."""
    E = trace.num_experts
    x = trace.expert_ids[:, a, :1 if top1 else None].astype(np.int64)
    y = trace.expert_ids[:, b, :1 if top1 else None].astype(np.int64)
    flat = (x[:, :, None] * E + y[:, None, :]).ravel()
    return np.bincount(flat, minlength=E * E).reshape(E, E)


def _pairs_nmi(trace: Trace, pairs: tuple[tuple[int, int], ...], top1: bool) -> float:
    return float(np.mean([normalised_mutual_information(_pair_table(trace, a, b, top1)) for a, b in pairs]))


def _frequency_figures(target: np.ndarray, got: np.ndarray, cache_slots: int, per_expert: bool) -> list[Figure]:
    """Frequency figures of ``got [L, E]`` against ``target [L, E]``: total variation per
    expert (when expert identities carry over) and of the sorted shares, entropy, and the
    static-cache hit rate with ``cache_slots`` slots (layer means)."""
    out = []
    if per_expert:
        tv = _tv(got, target)
        out += [Figure("frequency_tv_mean", 0.0, float(tv.mean()), "given", "popularity"),
                Figure("frequency_tv_max", 0.0, float(tv.max()), "given", "popularity")]
    out += [
        Figure("sorted_frequency_tv_mean", 0.0, float(_sorted_tv(got, target).mean()), "given", "popularity"),
        Figure("entropy_bits", float(routing_entropy_bits(target).mean()), float(routing_entropy_bits(got).mean()),
               "given", "popularity"),
        Figure(f"static_hit_rate@{cache_slots}", float(static_curve(target)[:, cache_slots].mean()),
               float(static_curve(got)[:, cache_slots].mean()), "given", "popularity"),
    ]
    return out


# ----------------------------------------------------------------------------- search


def _solve(f: Callable[[float], float], goal: float, lo: float, hi: float, f_lo: float, f_hi: float,
           tol: float) -> tuple[float, float]:
    """Knob x in [lo, hi] with f(x) closest to ``goal`` for an increasing, slightly noisy f.

    Regula falsi with the Illinois modification (the endpoint kept twice in a row has its
    residual halved, so the bracket shrinks from both sides); at most :data:`_MAX_STEPS`
    evaluations. A goal outside [f(lo), f(hi)] returns that end.
    """
    if goal <= f_lo:
        return lo, f_lo
    if goal >= f_hi:
        return hi, f_hi
    best = min(((lo, f_lo), (hi, f_hi)), key=lambda p: abs(p[1] - goal))
    kept = 0  # +1: lo was kept last step, -1: hi was
    for _ in range(_MAX_STEPS):
        x = lo + (goal - f_lo) * (hi - lo) / (f_hi - f_lo) if f_hi > f_lo else (lo + hi) / 2
        margin = 0.02 * (hi - lo)  # stay strictly inside, so the bracket always shrinks
        x = round(min(max(x, lo + margin), hi - margin), 4)
        fx = f(x)
        if abs(fx - goal) < abs(best[1] - goal):
            best = (x, fx)
        if abs(fx - goal) <= tol or hi - lo < 2e-3:
            break
        if fx < goal:
            lo, f_lo = x, fx
            if kept == 1:
                f_hi = goal + (f_hi - goal) / 2
            kept = 1
        else:
            hi, f_hi = x, fx
            if kept == -1:
                f_lo = goal + (f_lo - goal) / 2
            kept = -1
    return best


class _Search:
    """Evaluates a statistic at knob values; counts the traces it generated."""

    def __init__(self, base: SyntheticWorkload, stat: Callable[[Trace], float]) -> None:
        self.base, self.stat, self.steps = base, stat, 0

    def at(self, **knobs: float) -> float:
        self.steps += 1
        return self.stat(generate(self.base.with_(**knobs)))


def _fit(search: _Search, knob: str, goal: float, tol: float, w: SyntheticWorkload) -> float:
    """``knob`` in [0, 1] that brings ``search``'s statistic to ``goal``, the other knob held."""
    lo, hi = 0.0, 1.0
    other = {"temporal": w.temporal, "affinity": w.affinity}
    other.pop(knob)

    def f(x: float) -> float:
        return search.at(**{knob: x}, **other)

    x, _ = _solve(f, goal, lo, hi, f(lo), f(hi), tol)
    return x


# d(LRU hit rate at 2K, next-layer recall) / d(τ, α) near the ESFT calibration: the
# starting slopes of the joint search (it refines them from its own steps).
_PRIOR_JACOBIAN = np.array([[0.75, 0.02],
                            [-0.7, 0.8]])


def _broyden(evaluate: Callable[[np.ndarray], np.ndarray], goal: np.ndarray, x0: np.ndarray, J0: np.ndarray,
             tol: np.ndarray, max_steps: int = 10) -> tuple[np.ndarray, np.ndarray, int]:
    """Knobs x in [0, 1]^n with ``evaluate(x)`` within ``tol`` of ``goal``: Newton steps on
    a Broyden-updated Jacobian (each knob raises its own statistic: the diagonal stays
    positive). A knob stuck at a bound with its step pointing out is held there and the
    others solve alone; steps are at most 0.3 per knob. Returns the best x seen, the
    final Jacobian estimate and the number of evaluations.
    """
    x = np.clip(np.asarray(x0, float), 0.0, 1.0)
    f = evaluate(x)
    steps = 1
    J = np.array(J0, float)
    best_x, best_r = x.copy(), float(np.max(np.abs(f - goal) / tol))
    while best_r > 1.0 and steps < max_steps:
        r = f - goal
        free = np.ones(len(x), bool)
        for _ in range(len(x)):
            dx = np.zeros(len(x))
            if free.any():
                sub = np.ix_(free, free)
                rhs = -(r[free] - J[np.ix_(free, ~free)] @ dx[~free])
                try:
                    dx[free] = np.linalg.solve(J[sub], rhs)
                except np.linalg.LinAlgError:  # degenerate slopes: each knob on its own statistic
                    dx[free] = rhs / np.diag(J)[free]
            out = ((x <= 0.0) & (dx < 0)) | ((x >= 1.0) & (dx > 0))
            if not (out & free).any():
                break
            free &= ~out
        if not free.any():
            break  # every knob at the bound it would cross: the goal is out of reach
        dx = np.clip(dx, -0.3, 0.3)
        x_new = np.round(np.clip(x + dx, 0.0, 1.0), 4)
        s = x_new - x
        if not np.any(s):
            break
        f_new = evaluate(x_new)
        steps += 1
        J += np.outer((f_new - f) - J @ s, s) / float(s @ s)
        J[np.diag_indices(len(x))] = np.maximum(np.diag(J), 0.05)
        x, f = x_new, f_new
        score = float(np.max(np.abs(f - goal) / tol))
        if score < best_r:
            best_x, best_r = x.copy(), score
    return best_x, J, steps


# ----------------------------------------------------------------------------- calibrate


def calibrate(target: Trace | AggregateWorkload, *, model: ModelSpec | None = None, prompt_tokens: int = 48,
              output_tokens: int = 16, num_sequences: int | None = None, seed: int = 0,
              popularity: str = "measured", top_k: int | None = None, temporal_default: float = DEFAULT_TEMPORAL,
              affinity_default: float = DEFAULT_AFFINITY) -> tuple[SyntheticWorkload, CalibrationReport]:
    """Knobs that make :func:`generate` look like ``target`` (see the module docstring).

    Args:
        target: a per-token trace, or an aggregate (counts only).
        model: the model the synthetic trace is for; required for an aggregate that does
            not record top-k, and gives an aggregate its layer count and hidden-layer map
            (otherwise: its largest MoE-layer index + 1).
        prompt_tokens, output_tokens: each synthetic sequence's prefill and decode tokens;
            the search uses sequences of the same length, since sequence starts (no
            previous token) affect the hit rates.
        num_sequences: sequences of the returned workload; default: the target's token
            count (at most 32,768) for a trace, :data:`SEARCH_TOKENS` for an aggregate.
        seed: seed of the search and of the returned workload.
        popularity: ``measured`` (per-expert shares) or ``lognormal`` (fitted σ per layer,
            transferable to another E).
        top_k: K for an aggregate that does not record it (overrides the model's).
        temporal_default, affinity_default: the knobs a source without token order (or
            without cross-layer counts) keeps.

    Returns:
        ``(workload, report)``; ``generate(workload)`` is the calibrated trace the report
        measured.
    """
    if popularity not in ("measured", "lognormal"):
        raise InputError("unknown popularity mode", key="popularity", value=popularity,
                         expected="measured or lognormal", fix="pass popularity='measured'")
    P = prompt_tokens + output_tokens
    if prompt_tokens < 0 or output_tokens < 0 or P < 1:
        raise InputError("sequence length must be at least one token", key="prompt_tokens",
                         value=(prompt_tokens, output_tokens), expected="prompt + output >= 1",
                         fix="pass e.g. --prompt-tokens 48 --output-tokens 16")
    fallback = (float(temporal_default), float(affinity_default))
    if isinstance(target, Trace):
        return _calibrate_trace(target, P, prompt_tokens, output_tokens, num_sequences, seed, popularity, model,
                                fallback)
    return _calibrate_aggregate(target, P, prompt_tokens, output_tokens, num_sequences, seed, popularity, model,
                                top_k, fallback)


def _shape(P: int, prompt_tokens: int, output_tokens: int, num_sequences: int | None, tokens: int) -> dict[str, int]:
    if num_sequences is not None and num_sequences < 1:
        raise InputError("need at least one sequence", key="num_sequences", value=num_sequences,
                         expected="a positive integer", fix="pass e.g. --sequences 64")
    return {"prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "num_sequences": num_sequences or max(1, math.ceil(tokens / P))}


def _search_base(w: SyntheticWorkload, P: int, tokens: int = SEARCH_TOKENS) -> SyntheticWorkload:
    # whole sequences of the final length; at least two, so the predictor has a held-out one
    return w.with_(prompt_tokens=P, output_tokens=0, num_sequences=max(2, math.ceil(tokens / P)))


def _check_model(model: ModelSpec | None, L: int, E: int, K: int, what: str) -> None:
    if model is None:
        return
    want = (model.num_moe_layers, model.num_router_choices, model.top_k)
    if (L, E, K) != want:
        raise InputError(f"{what} does not match the model", key="--model", value=model.name,
                         expected=f"{want[0]} MoE layers, {want[1]} experts, top-{want[2]} (the {what} has "
                                  f"{L}, {E}, top-{K})", fix="drop --model or pick the model the data came from")


def _calibrate_trace(target: Trace, P: int, prompt_tokens: int, output_tokens: int, num_sequences: int | None,
                     seed: int, popularity: str, model: ModelSpec | None,
                     fallback: tuple[float, float]) -> tuple[SyntheticWorkload, CalibrationReport]:
    L, E, K = target.num_layers, target.num_experts, target.top_k
    _check_model(model, L, E, K, "trace")
    if target.num_tokens < 2:
        raise InputError("trace too short to calibrate against", key="expert_ids", value=target.num_tokens,
                         expected="at least 2 tokens", fix="record a longer trace")
    c2 = min(2 * K, E)
    freq = expert_frequency(target.expert_ids, E).astype(np.float64)  # [L, E]
    t_curve = lru_curve(target.expert_ids, E)  # [L, E + 1]
    goal = {"lru": float(t_curve[:, c2].mean())}
    if L > 1:
        goal["recall"] = _recall(target)
    skew = tuple(fit_lognormal_skew(row) for row in _shares(freq))
    knobs_pop: dict[str, Any] = (
        {"popularity": tuple(tuple(float(x) for x in row) for row in _shares(freq))} if popularity == "measured"
        else {"skew": skew})
    final_shape = _shape(P, prompt_tokens, output_tokens, num_sequences, min(target.num_tokens, 32_768))
    w = SyntheticWorkload(num_layers=L, num_experts=E, top_k=K, temporal=fallback[0],
                          affinity=fallback[1] if L > 1 else 0.0, seed=seed,
                          model=model.name if model else target.model, layer_map=tuple(target.layer_map),
                          num_shared_experts=_shared(model, target), **knobs_pop, **final_shape)

    # 1. search (τ, α) jointly: each step generates one trace and measures both statistics
    search = _search_base(w, P)
    names = ["temporal", "affinity"] if "recall" in goal else ["temporal"]
    stats: list[Callable[[Trace], float]] = [_lru_2k, _recall][:len(names)]
    want = np.array([goal["lru"], goal.get("recall", 0.0)][:len(names)])
    tol = np.array([_TOL["lru"], _TOL["recall"]][:len(names)])

    def evaluate(x: np.ndarray) -> np.ndarray:
        trace = generate(search.with_(**{n: float(v) for n, v in zip(names, x)}))
        return np.array([stat(trace) for stat in stats])

    x0 = np.array(_SEARCH_START[:len(names)])
    x, J, steps = _broyden(evaluate, want, x0, _PRIOR_JACOBIAN[:len(names), :len(names)], tol)
    w = w.with_(**{n: float(v) for n, v in zip(names, x)})
    notes: list[str] = []

    # 2. measure the calibrated workload at the shape asked for; if its frequencies miss the
    #    target by more than sampling explains (strong affinity with temporal reuse keeps
    #    the hottest experts under their share), scale each expert's share by target /
    #    achieved once, and search again from where the first search ended
    synth = generate(w)
    got = expert_frequency(synth.expert_ids, E).astype(np.float64)
    if popularity == "measured" and _tv(got, freq).mean() > 2 * _sampling_tv(freq, K, synth.num_tokens):
        ratio = np.clip(_shares(freq) / np.maximum(_shares(got), 1e-12), 0.5, 2.0)
        w = w.with_(popularity=tuple(tuple(float(v) for v in row) for row in _shares(_shares(freq) * ratio)))
        search = search.with_(popularity=w.popularity)
        x, _, more = _broyden(evaluate, want, x, J, tol, max_steps=3)
        steps += more
        w = w.with_(**{n: float(v) for n, v in zip(names, x)})
        synth = generate(w)
        got = expert_frequency(synth.expert_ids, E).astype(np.float64)
        notes.append("shares scaled once by target / achieved (the generator kept the hottest experts low)")
    s_curve = lru_curve(synth.expert_ids, E)
    figures = [Figure(f"lru_hit_rate@{c2}", goal["lru"], float(s_curve[:, c2].mean()), "fitted", "temporal")]
    if "recall" in goal:
        figures.append(Figure("next_layer_recall", goal["recall"], _recall(synth), "fitted", "affinity"))
    figures += _frequency_figures(freq, got, c2, per_expert=popularity == "measured")
    for c in sorted({min(K, E), min(4 * K, E)} - {c2}):
        figures.append(Figure(f"lru_hit_rate@{c}", float(t_curve[:, c].mean()), float(s_curve[:, c].mean()),
                              "reported"))
    figures.append(Figure("previous_token_overlap",
                          float(previous_token_overlap(target.expert_ids, target.seq_lens).mean()),
                          float(previous_token_overlap(synth.expert_ids, synth.seq_lens).mean()), "reported"))
    for f in figures[:len(names)]:
        if abs(f.error or 0.0) > 3 * _TOL["lru" if f.knob == "temporal" else "recall"]:
            notes.append(f"{f.name}: the search stopped {f.error:+.3f} from the target "
                         f"({f.knob} = {getattr(w, f.knob)} is as close as the generator gets)")
    if "recall" not in goal:
        notes.append("one MoE layer: no next-layer predictability to match; affinity is off")
    if popularity == "lognormal":
        notes.append("popularity: log-normal law with the σ fitted per layer (sorted shares), expert order random")
    knobs = {"temporal": w.temporal, "affinity": w.affinity, "skew": list(skew)}
    return w, CalibrationReport(source=target.source, kind="trace", figures=tuple(figures), knobs=knobs,
                                notes=tuple(notes), search_steps=steps, achieved_tokens=synth.num_tokens)


def _shared(model: ModelSpec | None, target: Trace | AggregateWorkload) -> int:
    if model is not None:
        return model.num_shared_experts
    value = target.meta.get("shared_experts", target.meta.get("num_shared_experts", 0))
    return int(value) if isinstance(value, (int, float)) else 0


def _calibrate_aggregate(target: AggregateWorkload, P: int, prompt_tokens: int, output_tokens: int,
                         num_sequences: int | None, seed: int, popularity: str, model: ModelSpec | None,
                         top_k: int | None, fallback: tuple[float, float]) -> tuple[SyntheticWorkload, CalibrationReport]:
    E = target.num_experts
    K = top_k or target.top_k or (model.top_k if model else None)
    if not K:
        raise InputError("the aggregate does not record top-k", key="top_k", value=None,
                         expected="experts per token", fix="pass --top-k K or --model PRESET")
    if K > E:
        raise InputError("top-k exceeds the experts", key="top_k", value=K, expected=f"at most {E}",
                         fix="check --top-k")
    notes: list[str] = []
    rows = list(target.layer_ids)
    layer_map: tuple[int, ...] | None = None
    if model is not None:
        L = model.num_moe_layers
        if E != model.num_router_choices:
            raise InputError("aggregate does not match the model", key="--model", value=model.name,
                             expected=f"{model.num_router_choices} experts (the aggregate has {E})",
                             fix="drop --model or pick the model the data came from")
        hidden = list(model.moe_layer_indices)
        if max(rows) >= L and all(r in hidden for r in rows):
            rows = [hidden.index(r) for r in rows]  # rows numbered by hidden layer (SGLang)
            notes.append("aggregate rows are hidden-layer indices; mapped to MoE layers of the model")
        layer_map = tuple(hidden)
    else:
        L = max(rows) + 1
    if max(rows) >= L:
        raise InputError("aggregate has counts for layers the model lacks", key="layer_ids", value=max(rows),
                         expected=f"MoE layers below {L}", fix="pick the model the data came from")
    counts = np.asarray(target.expert_counts, np.float64)
    measured = _shares(counts)  # [rows, E]
    sigma_rows = [fit_lognormal_skew(r) for r in measured]
    # σ for every layer: measured rows, linear in between, the nearest beyond the ends
    order = np.argsort(rows)
    sigma = np.interp(np.arange(L), np.asarray(rows, float)[order], np.asarray(sigma_rows)[order])
    rng = np.random.default_rng(seed)
    shares = np.stack([lognormal_shares(E, float(s))[rng.permutation(E)] for s in sigma])  # [L, E]
    if popularity == "measured":
        shares[rows] = measured
        if len(set(rows)) < L:
            notes.append(f"counts for MoE layers {sorted(set(rows))} of {L}: the others draw log-normal shares "
                         f"with σ interpolated over depth")
        knobs_pop: dict[str, Any] = {"popularity": tuple(tuple(float(x) for x in r) for r in shares)}
    else:
        knobs_pop = {"skew": tuple(float(s) for s in sigma)}
    notes.append(f"counts only (no token order): temporal locality stays at the default {fallback[0]} "
                 f"(calibrated on the ESFT DeepSeek-V2-Lite trace) and no LRU curve can be matched")
    final_shape = _shape(P, prompt_tokens, output_tokens, num_sequences, SEARCH_TOKENS)
    w = SyntheticWorkload(num_layers=L, num_experts=E, top_k=K, temporal=fallback[0],
                          affinity=fallback[1] if L > 1 else 0.0, seed=seed,
                          model=model.name if model else target.model, layer_map=layer_map,
                          num_shared_experts=_shared(model, target), **knobs_pop, **final_shape)
    figures: list[Figure] = []
    steps = 0
    renumber = dict(zip(target.layer_ids, rows))  # the aggregate's layer ids -> MoE layers
    pairs = tuple((renumber.get(a, a), renumber.get(b, b)) for a, b in target.transition_layers) \
        if target.transition_counts is not None else ()
    if pairs and max(max(p) for p in pairs) >= L:
        raise InputError("cross-layer counts name layers the model lacks", key="transition_layers",
                         value=target.transition_layers, expected=f"MoE layers below {L}",
                         fix="pick the model the data came from")
    top1 = False
    if pairs:
        # top-1 tables hold one entry per token: total = tokens = all-rank selections / K
        per_token = counts[0].sum() / K
        top1 = bool(abs(target.transition_counts[0].sum() - per_token) <= 0.05 * per_token)
        goal = float(np.mean([normalised_mutual_information(t) for t in target.transition_counts]))
        search = _Search(_search_base(w, P, _NMI_TOKENS), lambda tr: _pairs_nmi(tr, pairs, top1))
        w = w.with_(affinity=_fit(search, "affinity", goal, _TOL["nmi"], w))
        steps = search.steps
        gap = ", ".join(f"{a}->{b}" for a, b in pairs)
        notes.append(f"affinity fitted to the normalised mutual information of the "
                     f"{'top-1 ' if top1 else ''}experts of layer pairs {gap}"
                     + (" (not adjacent layers: the generator's type affinity acts alike at every layer "
                        "distance, as real routing nearly does)" if any(b - a > 1 for a, b in pairs) else ""))
    elif L > 1:
        notes.append(f"no cross-layer counts: affinity stays at the default {fallback[1]} "
                     f"(calibrated on the ESFT DeepSeek-V2-Lite trace)")
    synth = generate(w.with_(**_shape(P, prompt_tokens, output_tokens, None, _NMI_TOKENS)) if pairs else w)
    got = expert_frequency(synth.expert_ids, E).astype(np.float64)[rows]
    if pairs:
        figures.append(Figure("pair_nmi" + ("_top1" if top1 else ""), goal, _pairs_nmi(synth, pairs, top1),
                              "fitted", "affinity"))
    c2 = min(2 * K, E)
    figures += _frequency_figures(counts, got, c2, per_expert=popularity == "measured")
    figures.append(Figure(f"lru_hit_rate@{c2}", None, _lru_2k(synth), "reported"))
    knobs = {"temporal": w.temporal, "affinity": w.affinity,
             "skew": [float(s) for s in sigma], "measured_layers": sorted(set(rows))}
    return w, CalibrationReport(source=target.source, kind="aggregate", figures=tuple(figures), knobs=knobs,
                                notes=tuple(notes), search_steps=steps, achieved_tokens=synth.num_tokens)
