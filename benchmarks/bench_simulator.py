"""Simulator speed: expert calls simulated per second (target >= 500,000 on the dev machine).

For each case: plan with the ILP, then replay 1,000 decode tokens (batch 1, every token its
own step, as the issue states: Mixtral-8x7B in <= 1 s, DeepSeek-V3 in <= 5 s) and a batched
run (continuous batching of 32 requests). An expert call is one expert run for one step
(at batch 1: one token-expert pair); at batch 32 one call serves several tokens, and the
token-expert accesses per second are reported too. Times cover the whole `simulate` call, in
CPU seconds of this process (``time.process_time``: fair on a busy machine, which is what the
target is judged on) and in wall seconds, of the fastest of three identical runs (a single
run moved by 30-40% on the quiet 2-core dev machine). ``setup_cpu_s`` says how much of a run is per-plan
setup (the engine profile applied, the plan resolved against the hardware: ``Simulation``
built, nothing replayed), timed apart and still inside the run's figures.

    python benchmarks/bench_simulator.py [--out benchmarks/results/simulator.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from _provenance import ROOT, provenance

from planner.optimize import OptimizeRequest, optimize
from profiles.engines import load_engine
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.defaults import default_workload
from profiles.workload.trace import DECODE
from simulator.engine import SimConfig, Simulation, simulate

CASES = [("mixtral-8x7b", "desktop-4090"), ("mixtral-8x7b", "desktop-3060"), ("qwen3-30b-a3b", "desktop-4090"),
         ("deepseek-v3", "cpu-server-4090"), ("deepseek-v3", "desktop-4090")]


def first_tokens(trace, n: int):
    """The first whole sequences holding at least ``n`` tokens, every token a decode step."""
    ends = np.cumsum(trace.seq_lens)
    k = int(np.searchsorted(ends, n)) + 1
    sub = trace.subset_sequences(list(range(min(k, len(trace.seq_lens)))))
    return dataclasses.replace(sub, phase=np.full(sub.num_tokens, DECODE, np.uint8))


def setup_cpu_s(plan, hw, model, trace, cfg: SimConfig) -> float:
    """CPU seconds of a run's per-plan setup: what ``simulate`` does before replaying (best of 3)."""
    best = float("inf")
    for _ in range(3):
        c = time.process_time()
        Simulation(plan, load_engine(plan.inputs.engine).apply(hw), model, trace, cfg)
        best = min(best, time.process_time() - c)
    return best


def timed(plan, hw, model, trace, cfg: SimConfig, repeats: int = 3):
    """``(report, wall_s, cpu_s)`` of the fastest of ``repeats`` identical runs (the replay is
    deterministic; other processes and the allocator only slow a run down, so the least CPU
    time is the simulator's own)."""
    best = None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        rep = simulate(plan, hw, model, trace, cfg)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if best is None or cpu < best[2]:
            best = (rep, wall, cpu)
    return best


def run_case(model_name: str, hw_name: str, tokens: int) -> dict:
    model = load_model(model_name)
    _, hw = load_profile(hw_name)
    trace = default_workload(model)
    plan = optimize(OptimizeRequest(hardware=hw_name, model=model_name)).plan
    out = {"model": model_name, "hardware": hw_name, "sites": plan.counts()["site"]}
    decode = first_tokens(trace, tokens)
    rep, wall, cpu = timed(plan, hw, model, decode, SimConfig(batch_size=1, kv_context="plan"))
    m = rep.metrics
    out["batch1"] = {"tokens": m["output_tokens"], "expert_calls": m["expert_calls"], "wall_s": wall, "cpu_s": cpu,
                     "expert_calls_per_cpu_s": m["expert_calls"] / cpu,
                     "token_expert_accesses_per_s": m["expert_accesses"] / wall,
                     "expert_calls_per_s": m["expert_calls"] / wall, "wall_s_per_1000_tokens": wall / m["output_tokens"] * 1e3,
                     "simulated_tpot_s": m["decode_step_s"]["mean"], "planner_tpot_s": plan.predicted["tpot_s"]}
    rep, wall, cpu = timed(plan, hw, model, trace, SimConfig(batch_size=32, requests=32))
    m = rep.metrics
    out["batch32"] = {"output_tokens": m["output_tokens"], "expert_calls": m["expert_calls"], "wall_s": wall,
                      "cpu_s": cpu, "expert_calls_per_cpu_s": m["expert_calls"] / cpu,
                      "token_expert_accesses_per_s": m["expert_accesses"] / wall,
                      "expert_calls_per_s": m["expert_calls"] / wall, "tokens_per_s_simulated": m["tokens_per_s"]}
    # after both timed runs, so that they start as cold as before
    out["batch1"]["setup_cpu_s"] = setup_cpu_s(plan, hw, model, decode, SimConfig(batch_size=1, kv_context="plan"))
    out["batch32"]["setup_cpu_s"] = setup_cpu_s(plan, hw, model, trace, SimConfig(batch_size=32, requests=32))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "simulator.json")
    args = ap.parse_args()
    rows = []
    for model_name, hw_name in CASES:
        row = run_case(model_name, hw_name, args.tokens)
        b1 = row["batch1"]
        print(f"{model_name:14s} {hw_name:16s} batch 1: {b1['tokens']} tokens in {b1['cpu_s']:.2f} CPU-s, "
              f"{b1['expert_calls_per_cpu_s']:,.0f} calls/CPU-s; "
              f"batch 32: {row['batch32']['expert_calls_per_cpu_s']:,.0f} calls/CPU-s, "
              f"{row['batch32']['token_expert_accesses_per_s']:,.0f} token-expert accesses/s (wall)",
              flush=True)
        rows.append(row)
    calls = sum(r["batch1"]["expert_calls"] for r in rows)
    wall = sum(r["batch1"]["wall_s"] for r in rows)
    cpu = sum(r["batch1"]["cpu_s"] for r in rows)
    result = {"provenance": provenance(("numpy", "simpy")), "target_expert_calls_per_s": 500_000, "cases": rows,
              "batch1_expert_calls_per_s_overall": calls / wall, "batch1_expert_calls_per_cpu_s_overall": calls / cpu}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"overall batch 1: {calls / cpu:,.0f} expert calls/CPU-s ({calls / wall:,.0f}/s wall) -> {args.out}")


if __name__ == "__main__":
    main()
