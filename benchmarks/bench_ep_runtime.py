"""Run-time expert parallelism: what least-loaded rerouting and periodic EPLB re-placement buy.

DeepSeek-V2-Lite (64 experts, top-6, 26 MoE layers) on one 8 x H100 node (node-h100-sxm),
expert parallel over the 8 GPUs with 72 physical experts (9 per GPU: 8 redundant copies).
The workload drifts halfway: the ESFT trace's ``intent`` sequences, then its ``law``
sequences (../shared/traces/esft-deepseek-v2-lite; a real task shift), each sequence
replayed as 16 prompt tokens and the rest decoded. Without the shared trace it falls back to
a synthetic DeepSeek-V2-Lite trace with ``drift`` (profiles/workload/drift.py).

The placement is EPLB's (``eplb-global``) from the first task's routing counts, so the
first half starts balanced and the drift unbalances the second. Four runs, same seed:
static dispatch, least-loaded rerouting, re-placement every N decode steps, both. Figures:
max/mean GPU load (token-expert calls per GPU per layer step) over the first and the second
half of the decode steps, tok/s, re-placements and the bytes they moved.

Run: ``python benchmarks/bench_ep_runtime.py [--every 32] [--out PATH]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _provenance import provenance  # noqa: E402  benchmarks/ is on sys.path when a script runs

from planner.plan import Inputs, Plan, SolverInfo  # noqa: E402
from planner.plan_layer import LayerPlan  # noqa: E402
from profiles.engines import load_engine  # noqa: E402
from profiles.hardware import load_profile  # noqa: E402
from profiles.models import load_model  # noqa: E402
from profiles.workload.drift import drift  # noqa: E402
from profiles.workload.importers import load_workload  # noqa: E402
from profiles.workload.synthetic import SyntheticWorkload, generate  # noqa: E402
from profiles.workload.trace import DECODE, PREFILL, Trace  # noqa: E402
from simulator.engine import SimConfig, Simulation  # noqa: E402
from simulator.ep_runtime import eplb_copies  # noqa: E402

ESFT = ROOT.parent / "shared" / "traces" / "esft-deepseek-v2-lite" / "routing_top6.npz"
HW, MODEL, PROMPT = "node-h100-sxm", "deepseek-v2-lite", 16


def _as_served(trace: Trace, sequences: int) -> Trace:
    """The first ``sequences`` sequences, each 16 prompt tokens then decoded tokens."""
    t = trace.subset_sequences(list(range(min(sequences, len(trace.seq_lens)))))
    phase = np.concatenate([np.where(np.arange(n) < PROMPT, PREFILL, DECODE) for n in t.seq_lens]).astype(np.uint8)
    return dataclasses.replace(t, phase=phase)


def _workload(model) -> tuple[Trace, int, str]:
    """(trace, first token of the second half, where it came from)."""
    if ESFT.exists():
        a, b = (_as_served(load_workload(ESFT, task), n) for task, n in (("intent", 40), ("law", 10)))
        trace = Trace(expert_ids=np.concatenate([a.expert_ids, b.expert_ids]),
                      seq_lens=np.concatenate([a.seq_lens, b.seq_lens]), phase=np.concatenate([a.phase, b.phase]),
                      num_experts=a.num_experts, layer_map=a.layer_map, model=a.model,
                      source="ESFT intent[:40] then law[:10]")
        return trace, a.num_tokens, "esft intent[:40] -> law[:10]"
    w = SyntheticWorkload(num_layers=model.num_moe_layers, num_experts=model.num_experts, top_k=6, skew=1.0,
                          num_sequences=48, prompt_tokens=PROMPT, output_tokens=96, seed=0)
    trace = drift(generate(w), seed=1)
    return trace, trace.meta["drift"]["from_token"], "synthetic deepseek-v2-lite, drift halfway"


def _plan(model, hw, trace: Trace, first: int) -> Plan:
    gpus = [d.id for d in hw.devices_of_kind("gpu")]
    G, E = len(gpus), model.num_experts
    start = np.vstack([np.full((E, 2), -1), [[-1, -1]]])
    start[:E, 0] = np.arange(E) % G
    start[:G, 1] = (np.arange(G) + 1) % G  # 8 redundant slots: EPLB keeps 72 physical experts
    layers = []
    for l in range(trace.num_layers):
        counts = np.bincount(trace.expert_ids[:first, l].ravel(), minlength=E)
        c = eplb_copies(counts, start, G)
        own = [[g for g in c[e] if g >= 0] for e in range(E)]
        layers.append(LayerPlan(moe_layer=l, hidden_layer=model.moe_layer_indices[l],
                                home=tuple(gpus[o[0]] for o in own), format=("bf16",) * E, site=("resident",) * E,
                                replicas=tuple(tuple(gpus[g] for g in o[1:]) for o in own)))
    inputs = Inputs(hardware=HW, hardware_digest="-", model=MODEL, model_digest="-", workload="-", workload_digest="-")
    return Plan(inputs=inputs, objective="throughput", batch_size=32, context_tokens=1024, compute_device=gpus[0],
                host_device=hw.devices_of_kind("cpu")[0].id, layers=tuple(layers), memory={}, predicted={},
                solver=SolverInfo(method="hand: eplb-global on the first task"))


def _halves(sim: Simulation) -> tuple[float, float]:
    log = sim._ep_runtime()["load_log"]
    half = max(d for d, _, _ in log) / 2
    return (round(float(np.mean([r for d, _, r in log if d < half])), 4),
            round(float(np.mean([r for d, _, r in log if d >= half])), 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=32, help="decode steps between re-placements")
    parser.add_argument("--batch", type=int, default=32, help="requests running at once")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ep_runtime.json")
    args = parser.parse_args()

    model = load_model(MODEL)
    _, hw = load_profile(HW)
    trace, first, origin = _workload(model)
    plan = _plan(model, hw, trace, first)
    hw = load_engine(plan.inputs.engine).apply(hw)  # as simulator.engine.simulate does
    runs = {}
    # ep_rebalance_every of 10**9 never fires but logs the load like the others
    for name, cfg in (("static", {"ep_rebalance_every": 10**9}), ("reroute", {"ep_reroute": True}),
                      ("rebalance", {"ep_rebalance_every": args.every}),
                      ("reroute+rebalance", {"ep_reroute": True, "ep_rebalance_every": args.every})):
        sim = Simulation(plan, hw, model, trace, SimConfig(batch_size=args.batch, **cfg))
        m = sim.run().metrics
        ep = m["expert_parallel"]
        h1, h2 = _halves(sim)
        runs[name] = {"config": cfg, "max_over_mean_first_half": h1, "max_over_mean_second_half": h2,
                      "tokens_per_s": round(m["tokens_per_s"], 1), "layer_replacements": ep.get("layer_replacements", 0),
                      "replacement_gb": round(ep.get("replacement_bytes", 0.0) / 1e9, 3),
                      "cross_gpu_token_fraction": round(ep["cross_gpu_token_fraction"], 4)}
        print(name, runs[name], flush=True)
    record = {"benchmark": "ep_runtime", **provenance(), "hardware": HW, "model": MODEL, "engine": plan.inputs.engine,
              "workload": origin, "tokens": trace.num_tokens, "drift_from_token": first, "batch": args.batch,
              "rebalance_every": args.every, "physical_experts": 72, "gpus": 8, "figures": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
