"""Regenerate profiles/workload/defaults/*.json from the real routing data in ../shared/traces.

Run by hand (not by tests): python benchmarks/calibrate_defaults.py
The files hold knob values derived from the data, never the data; each keeps the source's
attribution and licence.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from profiles.workload.calibrate import calibrate, zipf_skew
from profiles.workload.importers import import_esft, import_fiddler_popularity, import_olmoe_counts

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO.parent / "shared" / "traces"
OUT = REPO / "profiles" / "workload" / "defaults"
DEPTHS = 8  # skew stored at 8 evenly spaced relative depths


def by_depth(skews: list[float]) -> list[float]:
    x = np.linspace(0, 1, len(skews)) if len(skews) > 1 else np.array([0.0])
    return [round(float(v), 4) for v in np.interp(np.linspace(0, 1, DEPTHS), x, skews)]


def main() -> int:
    if not TRACES.is_dir():
        print(f"needs the real traces at {TRACES}", file=sys.stderr)
        return 1
    OUT.mkdir(parents=True, exist_ok=True)
    esft = TRACES / "esft-deepseek-v2-lite" / "routing_top6.npz"
    trace = import_esft(esft, "all")  # all four tasks, back to back
    w, report = calibrate(trace, model="deepseek-v2-lite")
    deepseek = {
        "family": "deepseek", "temporal": w.temporal, "affinity": w.affinity, "fanout": w.fanout,
        "skew_by_depth": by_depth(report.knobs["skew"]),
        "calibrated_from": "ESFT DeepSeek-V2-Lite routing, 4 tasks, 33,279 tokens (per-token trace)",
        "provenance": "github.com/deepseek-ai/ESFT results/expert_scores (commit 18d23501), MIT licence",
        "calibration": report.to_dict(),
    }
    olmoe_agg = import_olmoe_counts(TRACES / "olmoe-mixtral-counts" / "routing_counts.npz", "olmoe/arxiv")
    olmoe = {
        "family": "olmoe", "temporal": w.temporal, "affinity": w.affinity, "fanout": w.fanout,
        "skew_by_depth": by_depth([zipf_skew(r) for r in olmoe_agg.expert_counts]),
        "calibrated_from": "OLMoE-1B-7B expert counts at layers 0/7/15 (arxiv domain) for skew; temporal and "
                           "affinity from the DeepSeek-V2-Lite trace (no token-level OLMoE data here)",
        "provenance": "github.com/allenai/OLMoE scripts/routing_output (commit 357454f4), Apache-2.0; "
                      "ESFT (MIT) for temporal/affinity",
    }
    fiddler = sorted((TRACES / "fiddler-mixtral-popularity" / "mixtral_8x7b_original").glob("*.json"))[0]
    mix_agg = import_fiddler_popularity(fiddler)
    mixtral = {
        "family": "mixtral", "temporal": w.temporal, "affinity": w.affinity, "fanout": w.fanout,
        "skew_by_depth": by_depth([zipf_skew(r) for r in mix_agg.expert_counts]),
        "calibrated_from": f"Mixtral-8x7B expert popularity on MMLU ({fiddler.name}) for skew; temporal and affinity "
                           f"from the DeepSeek-V2-Lite trace (no token-level Mixtral data here)",
        "provenance": "github.com/efeslab/fiddler benchmarks/results/popularity (commit 5e5ed673), Apache-2.0; "
                      "ESFT (MIT) for temporal/affinity",
    }
    generic = dict(deepseek, family="generic",
                   calibrated_from="no public routing data for this family here: the DeepSeek-V2-Lite calibration")
    generic.pop("calibration")
    for name, data in (("deepseek", deepseek), ("olmoe", olmoe), ("mixtral", mixtral), ("generic", generic)):
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}: temporal {data['temporal']}, affinity {data['affinity']}, skew {data['skew_by_depth']}")
    print("ESFT calibration:", json.dumps(report.to_dict()["target"]), "->", json.dumps(report.to_dict()["achieved"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
