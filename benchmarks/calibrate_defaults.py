"""Regenerate the default workloads' knob files from the public routing data.

Reads ``../shared/traces`` (see its README for the data and licences), calibrates the
synthetic generator per model family and writes ``profiles/workload/defaults/<preset>.json``
for every bundled preset plus ``generic.json`` (derived numbers only: knobs, provenance and
how close the calibration came), and ``benchmarks/results/calibrate_defaults.json`` with the
git SHA, machine, versions, timings and every calibration report. Run by hand, not by the
tests; the JSON files it writes are committed.

Families:
  DeepSeek (deepseek-v2-lite, deepseek-v3): the ESFT DeepSeek-V2-Lite trace, each of its
    four tasks calibrated in full (σ per layer, τ on the LRU hit rate at 2K, α on next-layer
    recall), knobs averaged over the tasks.
  OLMoE (olmoe-1b-7b): OLMoE-1B-7B counts of five pretraining domains: σ at layers 0/7/15,
    α on the normalised mutual information of the top-1 experts of layers 0->7 and 7->15
    (non-adjacent pairs); τ from ESFT (no token order in counts).
  Mixtral (mixtral-8x7b, mixtral-8x22b): σ per layer from Mixtral-8x7B's MMLU popularity
    (Fiddler, seven subjects) and per-question shares (57 subjects), averaged; α on
    Mixtral-8x7B's top-1 cross-layer tables (OLMoE repository, five domains); τ from ESFT.
  Qwen3, gpt-oss, Phi-3.5-MoE and the generic file: no public routing data here, the
  DeepSeek (ESFT) knobs.

Run: ``python benchmarks/calibrate_defaults.py [--traces ../shared/traces] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _provenance import provenance  # benchmarks/ is on sys.path when a script runs
from profiles.models import bundled_models, load_model
from profiles.workload.aggregate import AggregateWorkload
from profiles.workload.calibrate import CalibrationReport, calibrate, fit_lognormal_skew
from profiles.workload.defaults import DEFAULTS_DIR
from profiles.workload.hitrate import lru_curve
from profiles.workload.importers import import_esft, import_fiddler_popularity, import_fractions, import_olmoe_counts
from profiles.workload.stats import expert_frequency, next_layer_predictability
from profiles.workload.synthetic import SyntheticWorkload, generate

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS, OUTPUT_TOKENS = 48, 16  # sequences of 64: the default workloads' shape
SEED = 0

SOURCES = {
    "esft": {"data": "esft-deepseek-v2-lite/routing_top6.npz", "repository": "github.com/deepseek-ai/ESFT",
             "path": "results/expert_scores/{task}/expert_weights_{1..26}.txt", "commit": "18d23501",
             "licence": "MIT", "model": "ESFT-vanilla-lite (DeepSeek-V2-Lite layout: 26 MoE layers, 64 experts, "
                                        "top-6, 2 shared)"},
    "olmoe": {"data": "olmoe-mixtral-counts/routing_counts.npz", "repository": "github.com/allenai/OLMoE",
              "path": "scripts/routing_output/*", "commit": "357454f4", "licence": "Apache-2.0",
              "model": "OLMoE-1B-7B (16 layers, 64 experts, top-8); Mixtral-8x7B-v0.1 (32 layers, 8 experts, top-2)"},
    "fiddler": {"data": "fiddler-mixtral-popularity/mixtral_8x7b_original/*.json",
                "repository": "github.com/efeslab/fiddler", "path": "benchmarks/results/popularity",
                "commit": "5e5ed673", "licence": "Apache-2.0", "model": "Mixtral-8x7B (32 layers, 8 experts, top-2)"},
    "fractions": {"data": "mixtral-mmlu-fractions/mmlu_fractions.npz",
                  "repository": "github.com/ajtejankar/mixtral-vis-moe", "commit": "5c2f185d",
                  "licence": "Apache-2.0", "model": "Mixtral-8x7B (32 layers, 8 experts, top-2)"},
}
ESFT_TASKS = ("intent", "law", "summary", "translation")
OLMOE_DOMAINS = ("arxiv", "book", "c4", "github", "wikipedia")


def _source(key: str, used_for: str) -> dict[str, Any]:
    return {**SOURCES[key], "used_for": used_for}


def _figures(report: CalibrationReport, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {}
    for f in report.figures:
        if f.role in ("fitted", "given") or f.name in keep:
            out[f.name] = {"target": None if f.target is None else round(f.target, 4), "achieved": round(f.achieved, 4)}
    return out


def _r(x: float) -> float:
    return round(float(x), 3)


def _by_depth(sigma: list[float] | np.ndarray, layers: list[int] | None = None, num_layers: int | None = None) -> list:
    """``[[depth, σ], ...]`` from σ per layer (all layers, or the given layer indices of ``num_layers``)."""
    sigma = list(sigma)
    n = num_layers or len(sigma)
    idx = layers if layers is not None else list(range(len(sigma)))
    return [[_r(i / max(1, n - 1)), _r(s)] for i, s in zip(idx, sigma)]


# ----------------------------------------------------------------------------- families


def deepseek(traces: Path, log: dict[str, Any]) -> dict[str, Any]:
    """Per-task calibration of the ESFT trace (log-normal popularity), knobs averaged."""
    path = traces / SOURCES["esft"]["data"]
    runs = []
    for task in ESFT_TASKS:
        trace = import_esft(path, task)
        t0 = time.perf_counter()
        w, report = calibrate(trace, popularity="lognormal", prompt_tokens=PROMPT_TOKENS, output_tokens=OUTPUT_TOKENS,
                              seed=SEED)
        log[f"esft/{task}"] = {"seconds": round(time.perf_counter() - t0, 2), "report": report.to_dict()}
        runs.append((task, trace, w, report))
        print(f"  esft/{task}: temporal {w.temporal:.3f} affinity {w.affinity:.3f} "
              f"({report.search_steps} steps, {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    tau = float(np.mean([w.temporal for _, _, w, _ in runs]))
    alpha = float(np.mean([w.affinity for _, _, w, _ in runs]))
    sigma = np.mean([r.knobs["skew"] for *_, r in runs], axis=0)
    # the averaged knobs, generated at DeepSeek-V2-Lite's shape, against each task
    check = SyntheticWorkload(num_layers=26, num_experts=64, top_k=6, skew=tuple(round(float(s), 4) for s in sigma),
                              temporal=round(tau, 3), affinity=round(alpha, 3), prompt_tokens=PROMPT_TOKENS,
                              output_tokens=OUTPUT_TOKENS, num_sequences=128, seed=SEED)
    synth = generate(check)
    s_lru = float(lru_curve(synth.expert_ids, 64)[:, 12].mean())
    s_rec = float(next_layer_predictability(synth.expert_ids, 64, seq_lens=synth.seq_lens).recall.mean())
    s_freq = expert_frequency(synth.expert_ids, 64)
    tasks = {}
    for task, trace, w, report in runs:
        tasks[task] = {"knobs": {"temporal": _r(w.temporal), "affinity": _r(w.affinity)},
                       "figures": _figures(report, keep=("previous_token_overlap",))}
    t_lru = float(np.mean([r.figure("lru_hit_rate@12").target for *_, r in runs]))
    t_rec = float(np.mean([r.figure("next_layer_recall").target for *_, r in runs]))
    t_static = float(np.mean([r.figure("static_hit_rate@12").target for *_, r in runs]))
    from profiles.workload.hitrate import static_curve
    averaged = {"lru_hit_rate@12": {"target": _r(t_lru), "achieved": _r(s_lru)},
                "next_layer_recall": {"target": _r(t_rec), "achieved": _r(s_rec)},
                "static_hit_rate@12": {"target": _r(t_static), "achieved": _r(static_curve(s_freq)[:, 12].mean())}}
    return {
        "skew_by_depth": _by_depth(sigma), "temporal": _r(tau), "affinity": _r(alpha),
        "calibration": {"per_task": tasks, "averaged_knobs_vs_mean_of_tasks": averaged},
        "sources": [_source("esft", "per-layer selection shares (σ), LRU hit rate at 12 slots (τ), "
                                    "next-layer recall (α); all four tasks")],
    }


def olmoe(traces: Path, tau: float, alpha: float, log: dict[str, Any]) -> dict[str, Any]:
    """OLMoE-1B-7B counts per domain: σ at layers 0/7/15, α on the top-1 cross-layer NMI."""
    path = traces / SOURCES["olmoe"]["data"]
    spec = load_model("olmoe-1b-7b")
    runs = []
    for domain in OLMOE_DOMAINS:
        agg = import_olmoe_counts(path, f"olmoe/{domain}")
        t0 = time.perf_counter()
        w, report = calibrate(agg, model=spec, popularity="lognormal", prompt_tokens=PROMPT_TOKENS,
                              output_tokens=OUTPUT_TOKENS, seed=SEED, temporal_default=tau, affinity_default=alpha)
        log[f"olmoe/{domain}"] = {"seconds": round(time.perf_counter() - t0, 2), "report": report.to_dict()}
        runs.append((domain, agg, w, report))
        print(f"  olmoe/{domain}: affinity {w.affinity:.3f} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    layers = list(runs[0][1].layer_ids)
    sigma = np.mean([[fit_lognormal_skew(row) for row in agg.expert_counts] for _, agg, _, _ in runs], axis=0)
    return {
        "skew_by_depth": _by_depth(sigma, layers, spec.num_moe_layers), "temporal": _r(tau),
        "affinity": _r(np.mean([w.affinity for *_, w, _ in runs])),
        "calibration": {"per_domain": {d: {"knobs": {"affinity": _r(w.affinity)}, "figures": _figures(r)}
                                       for d, _, w, r in runs}},
        "sources": [_source("olmoe", "selection shares at layers 0, 7, 15 (σ) and top-1 cross-layer tables of "
                                     "layers 0->7 and 7->15 (α), OLMoE-1B-7B, five pretraining domains"),
                    _source("esft", "temporal locality τ (counts have no token order)")],
    }


def mixtral(traces: Path, tau: float, alpha: float, log: dict[str, Any]) -> dict[str, Any]:
    """Mixtral-8x7B: σ per layer from Fiddler and MMLU fractions, α on its cross-layer tables."""
    spec = load_model("mixtral-8x7b")
    fiddler_files = sorted((traces / "fiddler-mixtral-popularity" / "mixtral_8x7b_original").glob("*.json"))
    fiddler_counts = sum(import_fiddler_popularity(p).expert_counts for p in fiddler_files)
    fiddler = AggregateWorkload(expert_counts=np.asarray(fiddler_counts, np.float64), layer_ids=tuple(range(32)),
                                top_k=2, model="mistralai/Mixtral-8x7B", source="fiddler mixtral_8x7b_original")
    fractions = import_fractions(traces / SOURCES["fractions"]["data"], "all", top_k=2)
    per_source = {}
    for name, agg in (("fiddler", fiddler), ("fractions", fractions)):
        t0 = time.perf_counter()
        w, report = calibrate(agg, model=spec, popularity="lognormal", seed=SEED, temporal_default=tau,
                              affinity_default=alpha)
        log[f"mixtral/{name}"] = {"seconds": round(time.perf_counter() - t0, 2), "report": report.to_dict()}
        per_source[name] = (agg, report)
    sigma = np.mean([[fit_lognormal_skew(row) for row in agg.expert_counts] for agg, _ in per_source.values()],
                    axis=0)
    runs = []
    path = traces / SOURCES["olmoe"]["data"]
    for domain in OLMOE_DOMAINS:
        agg = import_olmoe_counts(path, f"mixtral/{domain}")
        t0 = time.perf_counter()
        w, report = calibrate(agg, model=spec, popularity="lognormal", prompt_tokens=PROMPT_TOKENS,
                              output_tokens=OUTPUT_TOKENS, seed=SEED, temporal_default=tau, affinity_default=alpha)
        log[f"mixtral/{domain}"] = {"seconds": round(time.perf_counter() - t0, 2), "report": report.to_dict()}
        runs.append((domain, w, report))
        print(f"  mixtral/{domain}: affinity {w.affinity:.3f} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return {
        "skew_by_depth": _by_depth(sigma), "temporal": _r(tau), "affinity": _r(np.mean([w.affinity for _, w, _ in runs])),
        "calibration": {"popularity": {n: {"figures": _figures(r)} for n, (_, r) in per_source.items()},
                        "per_domain": {d: {"knobs": {"affinity": _r(w.affinity)}, "figures": _figures(r)}
                                       for d, w, r in runs}},
        "sources": [_source("fiddler", "selection shares per layer (σ), seven MMLU subjects summed"),
                    _source("fractions", "selection shares per layer (σ), 57 MMLU subjects"),
                    _source("olmoe", "Mixtral-8x7B top-1 cross-layer tables of layers 0->7 and 7->15 (α), "
                                     "five pretraining domains"),
                    _source("esft", "temporal locality τ (no per-token Mixtral data)")],
    }


# ----------------------------------------------------------------------------- files

FAMILY_OF = {
    "deepseek-v2-lite": "DeepSeek", "deepseek-v3": "DeepSeek", "olmoe-1b-7b": "OLMoE", "mixtral-8x7b": "Mixtral",
    "mixtral-8x22b": "Mixtral", "qwen3-30b-a3b": "Qwen3", "qwen3-235b-a22b": "Qwen3", "gpt-oss-20b": "gpt-oss",
    "gpt-oss-120b": "gpt-oss", "phi-3.5-moe": "Phi-3.5-MoE", "generic": "generic",
}
METHOD = ("log-normal selection shares per layer (σ, fitted to the sorted measured shares, interpolated over "
          "relative depth onto the model's layers); temporal reuse τ and type affinity α searched so that the "
          "generated trace matches the source's statistics (profiles/workload/calibrate.py); sequences of "
          f"{PROMPT_TOKENS} prompt + {OUTPUT_TOKENS} output tokens")


def _file(preset: str, fam: dict[str, Any], calibrated_from: str, notes: list[str]) -> dict[str, Any]:
    return {
        "preset": preset, "family": FAMILY_OF[preset],
        "knobs": {"skew_by_depth": fam["skew_by_depth"], "temporal": fam["temporal"], "affinity": fam["affinity"],
                  "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS},
        "provenance": {"calibrated_from": calibrated_from, "sources": fam["sources"], "method": METHOD,
                       "notes": notes, "calibration": fam["calibration"],
                       "generated_by": "benchmarks/calibrate_defaults.py"},
    }


def build(traces: Path, log: dict[str, Any]) -> dict[str, dict[str, Any]]:
    print("DeepSeek (ESFT):", file=sys.stderr)
    ds = deepseek(traces, log)
    print("OLMoE:", file=sys.stderr)
    ol = olmoe(traces, ds["temporal"], ds["affinity"], log)
    print("Mixtral:", file=sys.stderr)
    mx = mixtral(traces, ds["temporal"], ds["affinity"], log)
    esft_from = "ESFT DeepSeek-V2-Lite routing trace (github.com/deepseek-ai/ESFT, MIT), four tasks"
    files = {
        "deepseek-v2-lite": _file("deepseek-v2-lite", ds, esft_from, [
            "same layout as the source model (26 MoE layers, 64 experts, top-6, 2 shared experts)",
            "ESFT sequences are teacher-forced prompts (prefill order), not generated tokens"]),
        "deepseek-v3": _file("deepseek-v3", ds, esft_from + ", scaled to 58 layers x 256 experts, top-8", [
            "DeepSeek-V2-Lite data: σ carried over by relative depth, τ and α as they are; DeepSeek-V3's group-"
            "limited routing (8 groups, 4 per token) and its bias-balanced router are not modelled"]),
        "olmoe-1b-7b": _file("olmoe-1b-7b", ol, "OLMoE-1B-7B routing counts (github.com/allenai/OLMoE, Apache-2.0), "
                                                "five domains; τ from ESFT", [
            "counts exist for layers 0, 7 and 15 only: σ is interpolated over depth between them",
            "the cross-layer tables pair non-adjacent layers (0->7, 7->15): α is the type affinity that reproduces "
            "their top-1 dependence; the generator's dependence does not fade with layer distance, so it applies "
            "to adjacent layers as well",
            "no token order in counts: τ is the ESFT DeepSeek-V2-Lite value"]),
        "mixtral-8x7b": _file("mixtral-8x7b", mx, "Mixtral-8x7B MMLU popularity (github.com/efeslab/fiddler, "
                                                  "Apache-2.0; github.com/ajtejankar/mixtral-vis-moe, Apache-2.0) "
                                                  "and cross-layer tables (github.com/allenai/OLMoE, Apache-2.0); "
                                                  "τ from ESFT", [
            "no per-token Mixtral data: τ is the ESFT DeepSeek-V2-Lite value",
            "α from Mixtral-8x7B's own top-1 cross-layer tables (layers 0->7, 7->15) rather than from ESFT"]),
        "mixtral-8x22b": _file("mixtral-8x22b", mx, "Mixtral-8x7B data (as mixtral-8x7b), scaled to 56 layers", [
            "no public Mixtral-8x22B routing data: the Mixtral-8x7B knobs, σ carried over by relative depth",
            "no per-token Mixtral data: τ is the ESFT DeepSeek-V2-Lite value"]),
    }
    no_data = "no public routing data for this family in ../shared/traces: the DeepSeek (ESFT) knobs"
    for preset in ("qwen3-30b-a3b", "qwen3-235b-a22b", "gpt-oss-20b", "gpt-oss-120b", "phi-3.5-moe", "generic"):
        files[preset] = _file(preset, ds, esft_from + " (no data for this family)", [
            no_data + ", σ carried over by relative depth (σ is a law of shares, independent of E)",
            "replace with a recorded trace (`planner trace record`) or `planner trace synth --like` when one exists"])
    missing = set(bundled_models()) - set(files)
    if missing:
        raise SystemExit(f"no family for presets {sorted(missing)}: add them to build()")
    return files


def _dumps(data: Any) -> str:
    """JSON with one key per line, but [depth, σ] pairs on one line each."""
    text = json.dumps(data, indent=1, ensure_ascii=False)
    return re.sub(r"\[\s*(-?[\d.eE+-]+),\s*(-?[\d.eE+-]+)\s*\]", r"[\1, \2]", text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=Path, default=ROOT / ".." / "shared" / "traces")
    parser.add_argument("--out", type=Path, default=DEFAULTS_DIR, help="directory for the <preset>.json files")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "calibrate_defaults.json")
    args = parser.parse_args()
    if not (args.traces / SOURCES["esft"]["data"]).is_file():
        raise SystemExit(f"real routing data not found under {args.traces} (../shared/traces beside the repo)")
    log: dict[str, Any] = {}
    t0 = time.perf_counter()
    files = build(args.traces, log)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out / f"{name}.json").write_text(_dumps(data))
    results = {**provenance(), "seconds": round(time.perf_counter() - t0, 1), "calibrations": log,
               "defaults": {n: {"temporal": d["knobs"]["temporal"], "affinity": d["knobs"]["affinity"],
                                "calibrated_from": d["provenance"]["calibrated_from"]} for n, d in files.items()}}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'preset':18} {'temporal':>8} {'affinity':>8}  calibrated from")
    for name, data in files.items():
        k = data["knobs"]
        print(f"{name:18} {k['temporal']:8.3f} {k['affinity']:8.3f}  {data['provenance']['calibrated_from']}")
    print(f"wrote {len(files)} files to {args.out} and {args.results} ({results['seconds']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
