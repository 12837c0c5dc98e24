"""Fidelity of the planner's cost model against published MoE inference measurements.

For every case of ``benchmarks/fidelity/cases.yaml`` (see ``benchmarks/fidelity/SOURCES.md``):

1. build the placement the source ran (``config.policy``) as one option per MoE layer,
   ``(p, q, b_res, c, b_off, home, mode)`` (planner/costs.py), on the case's engine profile,
   hardware profile (bundled name or ``benchmarks/fidelity/hardware/<name>.yaml``), model
   preset and formats, and price it through the planner's own path: ``make_setup`` ->
   ``build_problem(grid=False)`` -> ``step_time`` (decode) and the prefill pricing of
   ``planner.plan_assembly._predict`` (TTFT = one prefill step of the prompt);
2. split the cases deterministically into a fit half and a held-out half (sorted by
   (engine, source, id), alternating), fit per-engine scale factors on the fit half only, by
   robust least squares (soft_l1) on log errors -- per device kind (gpu, cpu) the overheads
   per hidden layer and per expert call and the share of memory bandwidth and of compute
   peak the engine's kernels reach (the profile's ``efficiency``), and the per-step overhead
   (no per-call overhead on an engine with fused experts: it has no per-expert dispatch) --
   and apply them unchanged to the held-out half;
3. write per-case and per-half errors (100 * |ln(pred / published)|) before and after the
   fit, the fitted scales and the profile values they suggest to
   ``benchmarks/results/fidelity.json``, and a short table to stdout.

The benchmark does not edit the engine YAMLs; it prints the values the fit suggests
(``suggested_engine_profiles``). The bundled llama.cpp, ktransformers, vllm, sglang and
accelerate profiles carry the values of the 2026-12-07 fit (their ``source`` says so), so a
rerun prices "before" with them -- what the tool predicts as shipped -- and the refit's
scales stay near 1.

Harness conventions (each case's ``note`` says which ones applied):

- cpu-only: the profile's GPUs/accelerators are dropped, so the CPU is the compute device and
  every expert is resident in its DRAM;
- multi-GPU all-GPU cases: the planner is single-GPU, so the GPUs are priced as one device
  with their summed memory; with tensor parallelism (the case's notes say so) also their
  summed bandwidth and peaks, with a layer split (llama.cpp's default) one GPU's, since each
  layer runs on one GPU after the other;
- a format the engine profile has no kernel for on the device that runs it (GGUF mixes such
  as q4_k_m, iq1_s; SGLang's int8/fp8 CPU kernels) is added as ``native`` in memory (the
  source demonstrably ran it) -- the engine YAML is not touched;
- memory feasibility: a case whose placement the planner says does not fit the machine with
  its usual memory reserves (planner.optimize.make_setup's device and host reserves) is not
  scored: a model without paging cannot price a run that pages weights from disk; it is listed
  under ``does_not_fit`` with the planner's reason (every memory it overfills, what it needs
  and what is usable). The cases that fit are priced with reserves 0 and no quality budget;
- ``flash_attn: false`` in a case's config (the source says FlashAttention was off, or its build
  predates llama.cpp's auto default, ggml-org/llama.cpp PR #15434, 2025-08): the engine's
  ``attention_fraction`` (its FlashAttention kernel's share of peak) is dropped, attention is
  priced as its KV read;
- decode_tok_s = 1 / TPOT (per stream; all cases are batch 1 except one "per stream" case),
  throughput_tok_s = batch / TPOT, prefill_tok_s = prompt / TTFT;
- decode context = prompt + half the output tokens (at least 1); prefill context = prompt.

Reserved sources (never used, never tuned to): the Mixtral-offloading paper (Eliseev & Mazur
2023) Table 2, the kTransformers DeepseekR1_V3_tutorial figures, the MoE-Infinity README
latency table. Cases citing them are dropped.

The harness is split along its concepts: ``fidelity_cases`` (reading and resolving the cases),
``fidelity_pricing`` (pricing one case), ``fidelity_fit`` (the split and the fit); this module
runs them and writes the report.

    python benchmarks/bench_fidelity.py [--out benchmarks/results/fidelity.json] [--no-fit]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import ROOT, provenance  # noqa: E402

sys.path.insert(0, str(ROOT))
# the harness's parts, one concept each; their names are this module's API (tests use them)
from fidelity_cases import (CASES, CONFIG_KEYS, METRICS, POLICIES, REQUIRED, _engine, dense_format,  # noqa: E402
                            engine_name, hardware_of, load_cases, profile_name, skip_reason)
from fidelity_fit import _unpack, fit, fitted_keys, split, suggested_profile  # noqa: E402
from fidelity_pricing import PER_ENGINE, case_hardware, log_err, pct, price_case  # noqa: E402

__all__ = ["CASES", "CONFIG_KEYS", "METRICS", "POLICIES", "REQUIRED", "PER_ENGINE", "_engine", "_unpack",
           "case_hardware", "dense_format", "engine_name", "fit", "fitted_keys", "hardware_of", "load_cases", "profile_name",
           "log_err", "main", "pct", "price_case", "skip_reason", "split", "suggested_profile", "summary"]
OUT = ROOT / "benchmarks" / "results" / "fidelity.json"


def summary(rows: list[dict], key: str) -> dict:
    errs = [r[key] for r in rows if r.get(key) is not None]
    if not errs:
        return {"n": 0}
    worst = max(rows, key=lambda r: r.get(key) or -1)
    return {"n": len(errs), "median_pct": float(np.median(errs)), "mean_pct": float(np.mean(errs)),
            "worst_pct": float(max(errs)), "worst_id": worst["id"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-fit", action="store_true", help="price before the fit only")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cases, dropped = load_cases()
    skipped, priced, no_fit = [], [], []
    for c in cases:
        reason, nf = skip_reason(c), None
        if reason is None:
            try:
                nf = price_case(c, check_fit=True)["does_not_fit"]
            except Exception as exc:  # noqa: BLE001 -- reported as a skip with its reason
                reason = f"pricing failed: {type(exc).__name__}: {exc}"
        if reason:
            skipped.append({"id": c["id"], "source": c["source"], "engine": c["engine"], "reason": reason})
        elif nf:
            no_fit.append({"id": c["id"], "source": c["source"], "engine": c["engine"], "profile": c["profile"],
                           "model": c["model"], "policy": c["config"]["policy"], "reason": nf})
        else:
            priced.append(c)
    fit_half, held_half = split(priced)
    fitted = None if args.no_fit else fit(fit_half)
    rows = []
    for half, group in (("fit", fit_half), ("held_out", held_half)):
        for c in group:
            before = price_case(c)
            row = {"id": c["id"], "source": c["source"], "engine": c["engine"], "engine_profile": profile_name(c),
                   "profile": c["profile"], "model": c["model"], "format": c["format"],
                   "policy": c["config"]["policy"], "metric": c["metric"], "half": half,
                   "published": float(c["value"]), "predicted_before": before["predicted"],
                   "error_before_pct": pct(log_err(before["predicted"], float(c["value"]))),
                   "ratio_before": before["predicted"] / float(c["value"]),
                   "fits_in_memory": before["fits"], "context_tokens": before["context_tokens"],
                   "note": "; ".join(before["notes"])}
            if fitted is not None:
                sc = fitted["per_engine_scales"].get(engine_name(c))
                after = price_case(c, sc)
                row["predicted_after"] = after["predicted"]
                row["error_after_pct"] = pct(log_err(after["predicted"], float(c["value"])))
                row["ratio_after"] = after["predicted"] / float(c["value"])
                if sc is None:
                    row["note"] += ("; " if row["note"] else "") + "engine has no fit-half case: priced as the profile says"
            rows.append(row)
    halves = {}
    for half in ("fit", "held_out"):
        hr = [r for r in rows if r["half"] == half]
        halves[half] = {"before": summary(hr, "error_before_pct")}
        if fitted is not None:
            halves[half]["after"] = summary(hr, "error_after_pct")
    out = {"provenance": provenance(("numpy", "scipy", "pulp")),
           "what": "planner cost model vs published MoE inference measurements (benchmarks/fidelity/cases.yaml); "
                   "error = 100 * |ln(predicted / published)|",
           "split": "sorted by (engine profile, source, id), alternating fit / held out",
           "cases_total": len(cases) + len(dropped), "cases_priced": len(priced),
           "dropped_reserved": dropped, "skipped": skipped,
           "does_not_fit": no_fit,
           "does_not_fit_note": "not scored: the planner says the placement does not fit the machine with its usual "
                                "memory reserves; a cost model without paging cannot price it",
           "halves": halves,
           "fit": fitted,
           "suggested_engine_profiles": suggested_profile(fitted["per_engine_scales"]) if fitted else None,
           "suggested_profiles_applied": "by hand: profiles/engines/{llama.cpp,ktransformers,vllm,sglang,"
                                         "accelerate}.yaml carry the 2026-12-07 fit (see their sources), so "
                                         "'before' is what the tool predicts as shipped",
           "cases": rows, "seconds": time.perf_counter() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, sort_keys=False) + "\n")

    # stdout table
    print(f"{'id':58s} {'half':8s} {'metric':16s} {'published':>10s} {'before':>10s} {'err%':>6s}"
          + (f" {'after':>10s} {'err%':>6s}" if fitted else ""))
    for r in rows:
        line = (f"{r['id'][:58]:58s} {r['half']:8s} {r['metric']:16s} {r['published']:10.4g} "
                f"{r['predicted_before']:10.4g} {r['error_before_pct']:6.0f}")
        if fitted:
            line += f" {r['predicted_after']:10.4g} {r['error_after_pct']:6.0f}"
        print(line)
    for half, h in halves.items():
        for when, sm in h.items():
            if sm.get("n"):
                print(f"{half:8s} {when:6s} n={sm['n']:2d} median {sm['median_pct']:6.1f}%  "
                      f"worst {sm['worst_pct']:6.1f}% ({sm['worst_id']})")
    for sk in skipped:
        print(f"skipped {sk['id']}: {sk['reason']}")
    for nf in no_fit:
        print(f"does not fit, not scored {nf['id']}: {nf['reason']}")
    if fitted:
        print("fitted per-engine scales:", json.dumps(fitted["per_engine_scales"]))
        print("suggested engine profile values (the benchmark does not write profiles/engines/*.yaml):")
        for e, rows_ in out["suggested_engine_profiles"].items():
            for k, v in rows_.items():
                print(f"  {e:14s} {k:32s} {v}")
    print(f"wrote {args.out} in {out['seconds']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
