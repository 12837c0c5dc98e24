"""Benchmark: workload statistics for 10^6 (token, layer, rank) entries.

Target (issue 3): all statistics of a 10^6-entry trace in <= 5 s on the development
machine (2 cores). Uses the real ESFT DeepSeek-V2-Lite routing (the ``summary`` task, cut to
just over 10^6 entries) when ``../shared/traces`` is present, otherwise a synthetic trace of
the same shape. Writes ``benchmarks/results/trace_stats.json`` with the git SHA, machine,
versions and figures; ratios compare timings taken in the same run.

Run: ``python benchmarks/bench_trace_stats.py [--repeat 3] [--out PATH]``
"""

from __future__ import annotations

import argparse
import json
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from _provenance import provenance  # benchmarks/ is on sys.path when a script runs
from profiles.workload import hitrate, stats
from profiles.workload.importers import import_esft
from profiles.workload.trace import Trace

ROOT = Path(__file__).resolve().parents[1]
ESFT = ROOT / ".." / "shared" / "traces" / "esft-deepseek-v2-lite" / "routing_top6.npz"
ENTRIES = 1_000_000
BUDGET_S = 5.0  # issue 3: statistics of 10^6 entries in <= 5 s


def _trace() -> tuple[Trace, str]:
    """A trace of just over 10^6 entries: real ESFT routing, or synthetic of that shape."""
    L, K, E = 26, 6, 64
    T = -(-ENTRIES // (L * K))
    if ESFT.is_file():
        full = import_esft(ESFT, "summary")
        ids = full.expert_ids[:T]
        lens = np.cumsum(full.seq_lens)
        cut = int(np.searchsorted(lens, T))
        seq = np.concatenate([full.seq_lens[:cut], [T - (lens[cut - 1] if cut else 0)]]).astype(np.int64)
        seq = seq[seq > 0]
        return Trace(expert_ids=ids, seq_lens=seq, phase=full.phase[:T], num_experts=E,
                     layer_map=full.layer_map, gate_weights=full.gate_weights[:T], model=full.model,
                     source=full.source), "esft summary task, first %d tokens" % T
    rng = np.random.default_rng(0)
    pop = rng.dirichlet(np.full(E, 0.3), size=L)  # skewed per-layer popularity
    # K distinct experts per token, weighted by popularity: the Gumbel top-k trick
    ids = np.argsort(-(np.log(pop)[None] + rng.gumbel(size=(T, L, E))), axis=2)[:, :, :K]
    return Trace(expert_ids=ids.astype(np.uint8), seq_lens=np.array([T]), phase=np.zeros(T, np.uint8),
                 num_experts=E, layer_map=tuple(range(L)), model="synthetic"), "synthetic (Dirichlet popularity)"


def _timed(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _naive_lru_hits(seq: np.ndarray, slots: int) -> int:
    """One LRU simulation for one layer and one cache size (the per-size baseline)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for e in seq.ravel().tolist():
        if e in cache:
            hits += 1
            cache.move_to_end(e)
        else:
            cache[e] = None
            if len(cache) > slots:
                cache.popitem(last=False)
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is kept")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trace_stats.json")
    args = parser.parse_args()

    trace, origin = _trace()
    ids, E, seq_lens = trace.expert_ids, trace.num_experts, trace.seq_lens
    T, L, K = ids.shape
    parts = {
        "frequency_and_gate_mass": lambda: (stats.expert_frequency(ids, E), stats.gate_mass(ids, trace.gate_weights, E)
                                            if trace.gate_weights is not None else None),
        "coactivation": lambda: stats.coactivation_counts(ids, E),
        "transitions": lambda: stats.transition_counts(ids, E),
        "lru_curve": lambda: hitrate.lru_curve(ids, E),
        "lru_curve_token_as_set": lambda: hitrate.lru_curve(ids, E, token_as_set=True),
        "lfu_and_belady_curves": lambda: hitrate.priority_stack_distances(ids, E, ("lfu", "belady")),
        "segment_best_hit_rate": lambda: stats.segment_best_hit_rate(ids, E, 16, seq_lens),
        "next_layer_predictability": lambda: stats.next_layer_predictability(ids, E, seq_lens=seq_lens),
    }
    seconds = {name: round(_timed(fn, args.repeat)[0], 4) for name, fn in parts.items()}
    total_s, result = _timed(lambda: stats.compute_stats(trace), args.repeat)

    # same-run ratio: one exact pass for all sizes vs one LRU simulation per (layer, size)
    lru = hitrate.lru_curve(ids, E)
    naive_s, hits = _timed(lambda: _naive_lru_hits(ids[:, 0], 12), 1)
    assert hits == round(lru[0, 12] * T * K), "one-pass LRU disagrees with the simulation"
    per_size_all_s = naive_s * L * (E + 1)

    figures = {
        "entries": int(ids.size), "shape_T_L_K": [T, L, K], "experts": E, "source": origin,
        "compute_stats_total_s": round(total_s, 4), "budget_s": BUDGET_S,
        "within_budget": bool(total_s <= BUDGET_S), "entries_per_s": round(ids.size / total_s),
        "component_s": seconds,
        "naive_lru_one_layer_one_size_s": round(naive_s, 4),
        "naive_lru_all_layers_all_sizes_s_extrapolated": round(per_size_all_s, 2),
        "ratio_naive_all_sizes_to_one_pass_lru": round(per_size_all_s / seconds["lru_curve"], 1),
        "ratio_lfu_belady_to_lru": round(seconds["lfu_and_belady_curves"] / seconds["lru_curve"], 2),
        "mean_hit_rate_at_6_12_24_32": {p: [round(result.hit_rates.mean(p, c), 4) for c in (6, 12, 24, 32)]
                                        for p in result.hit_rates.curves},
    }
    record = {
        "benchmark": "trace_stats", **provenance(),
        "repeat": args.repeat, "figures": figures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
