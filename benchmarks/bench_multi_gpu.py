"""Issue 19 item 1's target: offload over every GPU of a node (planner.multi_gpu) against the
one-GPU plan of the same box, predicted tokens/s at batch 1, with the solve's CPU seconds
and certified gap. Not a test: run it, read benchmarks/results/multi_gpu.json.

    python benchmarks/bench_multi_gpu.py [--cases mixtral-8x7b:0.006,qwen3-30b-a3b:0]

Target: >= 1.6x where offloading binds (2x RTX 3090, Mixtral-8x7B at the int8 budget,
Qwen3-30B-A3B / DeepSeek-V2-Lite at bf16, i.e. budget 0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import ROOT, provenance  # noqa: E402

from planner.optimize import OptimizeRequest, optimize  # noqa: E402

HARDWARE = "workstation-2x3090-pcie"
CASES = "mixtral-8x7b:0.006,qwen3-30b-a3b:0,deepseek-v2-lite:0"


def run_case(model: str, budget: float) -> dict:
    out = {}
    for multi in (False, True):
        t = time.process_time()
        r = optimize(OptimizeRequest(hardware=HARDWARE, model=model, quality_budget=budget, multi_gpu=multi))
        p = r.plan
        out["multi_gpu" if multi else "one_gpu"] = {
            "tokens_per_s": p.predicted["tokens_per_s"], "gap": p.solver.gap, "status": p.solver.status,
            "solve_cpu_s": r.timings_s["solve_cpu_s"], "total_cpu_s": time.process_time() - t,
            "quality_error": p.quality_error, "layer_devices": list(p.layer_devices or ()),
            "sites": p.counts()["site"], "formats": p.counts()["format"]}
    out["speedup"] = out["multi_gpu"]["tokens_per_s"] / out["one_gpu"]["tokens_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=CASES, help="model:budget,... (default: %(default)s)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "multi_gpu.json"))
    args = ap.parse_args()
    results = {}
    for case in args.cases.split(","):
        model, budget = case.split(":")
        results[case] = run_case(model, float(budget))
        print(f"{case}: {results[case]['one_gpu']['tokens_per_s']:.2f} -> "
              f"{results[case]['multi_gpu']['tokens_per_s']:.2f} tok/s ({results[case]['speedup']:.2f}x), "
              f"gap {results[case]['multi_gpu']['gap']:.2%}, solve {results[case]['multi_gpu']['solve_cpu_s']:.1f} "
              "CPU-s", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "multi_gpu", "hardware": HARDWARE,
                                         **provenance(("numpy", "pulp", "highspy")), "cases": results},
                                        indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
