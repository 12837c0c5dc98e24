"""Writes the frozen-plan golden results of the simulator (tests/test_simulator_frozen.py).

The plans of ``benchmarks/bench_simulator.py``'s cases are made once and frozen here as
plan JSON, so the golden results test the simulator alone: a change of the planner's
plans does not touch them. For each plan the simulator replays the benchmark's two runs,
cut down (decode at batch 1 over the first ``BATCH1_TOKENS`` tokens; continuous batching
of 32 requests over the whole default workload, prefill and decode), and variants of the
plans with an expert cache (eviction and prefetch policies, miss policies, small
batches). Every metric is kept unrounded (``repr`` floats in JSON).

    python tests/make_simulator_frozen.py   # rewrites tests/data/golden/simulator_frozen/

Regenerate only for a deliberate change of results (the performance model, an engine
profile, a simulator rule), never for a speed-up, and say in the commit why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_simulator import CASES, first_tokens  # noqa: E402

from planner.optimize import OptimizeRequest, optimize  # noqa: E402
from planner.plan import load_plan  # noqa: E402
from profiles.hardware import load_profile  # noqa: E402
from profiles.models import load_model  # noqa: E402
from profiles.workload.defaults import default_workload  # noqa: E402
from simulator.engine import SimConfig, simulate  # noqa: E402

OUT = ROOT / "tests" / "data" / "golden" / "simulator_frozen"
BATCH1_TOKENS = 256  # the benchmark replays 1,000; these take the same paths in a quarter of the time
VARIANT_TOKENS = 96


def scenarios():
    """``(name, model, hardware, trace of the run, SimConfig)`` of every golden run."""
    for model_name, hw_name in CASES:
        model = load_model(model_name)
        trace = default_workload(model)
        tag = f"{model_name}--{hw_name}"
        yield f"{tag}--batch1", model_name, hw_name, first_tokens(trace, BATCH1_TOKENS), \
            SimConfig(batch_size=1, kv_context="plan")
        yield f"{tag}--batch32", model_name, hw_name, trace, SimConfig(batch_size=32, requests=32)
    # the plans with expert caches: fetched and hybrid experts, NVMe homes, local experts
    for model_name, hw_name in (("deepseek-v3", "desktop-4090"), ("mixtral-8x7b", "desktop-4090")):
        tag = f"{model_name}--{hw_name}"
        decode = first_tokens(default_workload(load_model(model_name)), VARIANT_TOKENS)
        for eviction in ("lfu", "score", "belady", "static"):
            yield f"{tag}--evict-{eviction}", model_name, hw_name, decode, SimConfig(batch_size=1, eviction=eviction)
        for prefetch in ("oracle", "next-layer", "transition"):
            yield f"{tag}--prefetch-{prefetch}", model_name, hw_name, decode, \
                SimConfig(batch_size=1, prefetch=prefetch, seed=5)
        for miss in ("fiddler", "hobbit"):
            yield f"{tag}--miss-{miss}", model_name, hw_name, decode, SimConfig(batch_size=1, miss=miss)
        yield f"{tag}--batch4", model_name, hw_name, decode, SimConfig(batch_size=4, requests=6)


def plan_path(model_name: str, hw_name: str) -> Path:
    return OUT / "plans" / f"{model_name}--{hw_name}.json"


def dump(report) -> str:
    return json.dumps({"metrics": report.metrics}, indent=1, sort_keys=True) + "\n"


def run(name: str, model_name: str, hw_name: str, trace, cfg: SimConfig) -> str:
    _, hw = load_profile(hw_name)
    return dump(simulate(load_plan(plan_path(model_name, hw_name)), hw, load_model(model_name), trace, cfg))


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    for model_name, hw_name in CASES:
        optimize(OptimizeRequest(hardware=hw_name, model=model_name)).plan.save(plan_path(model_name, hw_name))
    names = []
    for name, *args in scenarios():
        (OUT / f"{name}.json").write_text(run(name, *args))
        names.append(name)
        print(name, flush=True)
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "simulator", "profiles", "planner")
    (OUT / "PROVENANCE.json").write_text(json.dumps({
        "git_sha": _git("rev-parse", "HEAD"), "simulator_profiles_planner_dirty": bool(dirty),
        "runs": names}, indent=1) + "\n")


if __name__ == "__main__":
    main()
