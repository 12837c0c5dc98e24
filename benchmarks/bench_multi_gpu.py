"""Issue 19 item 1's target: offload over every GPU of a node (planner.multi_gpu) against the
one-GPU plan of the same box, predicted tokens/s at batch 1, with the solve's CPU seconds
and certified gap. Not a test: run it, read benchmarks/results/multi_gpu.json.

    python benchmarks/bench_multi_gpu.py [--cases mixtral-8x7b:0.006,qwen3-30b-a3b:0]

Each speed-up is given on two engines: the bundle runtime's plans (``speedup``) and the
plans made for llama.cpp (``speedup_llamacpp``, one GPU against the node, GGUF formats): the
bundle's Python per-layer overhead sets a floor under its step that a second GPU cannot
lower, llama.cpp's does not hide what the second GPU's memory buys.

Target: >= 1.6x where offloading binds (2x RTX 3090, Mixtral-8x7B at the int8 budget,
Qwen3-30B-A3B / DeepSeek-V2-Lite at bf16, i.e. budget 0), and >= 1.3x llama.cpp's layer
split with --n-cpu-moe (the ``llama.cpp-split`` baseline of planner.baselines_multi, priced
on the llama.cpp engine). That second ratio is given twice: the bundle-runtime plan against
it (different engines, as ``--compare`` prints), and the pipeline plan made for llama.cpp
(``--engine llama.cpp``, GGUF formats) against it (one engine: what planning adds to a
llama.cpp user's box).
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


LLAMACPP_FORMATS = ("bf16", "q8_0", "q4_k")  # the GGUF types the llama.cpp engine profile stores


def run_case(model: str, budget: float) -> dict:
    out = {}
    for key, multi, engine in (("one_gpu", False, None), ("multi_gpu", True, None),
                               ("one_gpu_llamacpp", False, "llama.cpp"), ("multi_gpu_llamacpp", True, "llama.cpp")):
        t = time.process_time()
        formats = {"formats": LLAMACPP_FORMATS} if engine == "llama.cpp" else {}
        r = optimize(OptimizeRequest(hardware=HARDWARE, model=model, quality_budget=budget, multi_gpu=multi,
                                     engine=engine, **formats))
        p = r.plan
        split = r.baselines.get("llama.cpp-split")
        out[key] = {
            "engine": p.inputs.engine,
            "llamacpp_split": None if split is None else {"tokens_per_s": split.predicted["tokens_per_s"],
                                                          "note": split.notes[-1]},
            "tokens_per_s": p.predicted["tokens_per_s"], "gap": p.solver.gap, "status": p.solver.status,
            "solve_cpu_s": r.timings_s["solve_cpu_s"], "total_cpu_s": time.process_time() - t,
            "quality_error": p.quality_error, "layer_devices": list(p.layer_devices or ()),
            "sites": p.counts()["site"], "formats": p.counts()["format"]}
    out["speedup"] = out["multi_gpu"]["tokens_per_s"] / out["one_gpu"]["tokens_per_s"]
    out["speedup_llamacpp"] = out["multi_gpu_llamacpp"]["tokens_per_s"] / out["one_gpu_llamacpp"]["tokens_per_s"]
    for key in ("multi_gpu", "multi_gpu_llamacpp"):
        split = out[key]["llamacpp_split"]
        out[key]["vs_llamacpp_split"] = out[key]["tokens_per_s"] / split["tokens_per_s"] if split else None
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
        r = results[case]
        lc = r["multi_gpu_llamacpp"]
        ratio = lambda x: "n/a" if x is None else f"{x:.2f}x"  # noqa: E731
        print(f"{case}: {r['one_gpu']['tokens_per_s']:.2f} -> {r['multi_gpu']['tokens_per_s']:.2f} tok/s "
              f"({r['speedup']:.2f}x), gap {r['multi_gpu']['gap']:.2%}, solve {r['multi_gpu']['solve_cpu_s']:.1f} "
              f"CPU-s; vs llama.cpp-split: bundle plan {ratio(r['multi_gpu']['vs_llamacpp_split'])}, "
              f"llama.cpp plan {lc['tokens_per_s']:.2f} tok/s {ratio(lc['vs_llamacpp_split'])}; llama.cpp engine "
              f"{r['one_gpu_llamacpp']['tokens_per_s']:.2f} -> {lc['tokens_per_s']:.2f} tok/s "
              f"({r['speedup_llamacpp']:.2f}x)", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "multi_gpu", "hardware": HARDWARE,
                                         **provenance(("numpy", "pulp", "highspy")), "cases": results},
                                        indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
