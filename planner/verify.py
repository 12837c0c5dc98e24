"""`planner verify`: run a bundle, replay what it saw through the simulator, compare.

The runtime records the router's choices of every MoE layer while it generates; those
choices become a routing trace (prompt tokens as prefill, generated tokens fed back as
decode) that the simulator replays under the bundle's plan, hardware and policies, one
request at a time as the runtime ran them. With the same routing and policy the per-layer
hit rates must be equal; times and bytes come with their relative error (they depend on
how well the hardware profile describes the machine: `planner profile probe` measures it).
A multi-device bundle adds rows per plan device (:func:`device_rows`): its layers' hit rate
and the bytes the runtime held there against the plan's memory row for it.

This module wires the runtime (exporters), the simulator and the plan together, which is
the CLI's job; torch and transformers stay inside the runtime (``exporters.runtime.record``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from profiles.errors import InputError

__all__ = ["DEFAULT_PROMPTS", "device_rows", "verify_bundle_run"]

DEFAULT_PROMPTS = ("the cat sat on the mat", "experts route tokens through layers",
                   "the planner decides where every expert lives")
WARM_UP = "warm up the kernels"


def _rel(measured: float | None, predicted: float | None) -> float | None:
    if measured is None or predicted is None or measured == 0:
        return None
    return (predicted - measured) / measured


def device_rows(plan, measured: dict, sim: dict) -> list[dict]:
    """Rows per plan device of a multi-device plan (``layer_devices``; none for one device):
    its layers' cache hit rate (measured by the runtime; predicted: the simulator's rate of
    each of those layers over the same accesses, as the replay routes exactly what the run
    saw), and the bytes the runtime held there against the plan's memory row for it (dense
    weights: the device's decoder layers, and on ``compute_device`` the embedding and head;
    resident experts; the cache at its peak against the cache the plan sizes)."""
    if plan.layer_devices is None:
        return []
    rows = []
    for dev, held in sorted(measured.get("devices", {}).items()):
        mine = held["moe_layers"]
        accesses = [measured["hits"][i] + measured["misses"][i] for i in mine]
        total = sum(accesses)
        hits = sum(sim["hit_rate"][i] * a for i, a in zip(mine, accesses) if sim["hit_rate"][i] is not None)
        rows.append({"metric": f"{dev}: cache hit rate", "device": dev,
                     "measured": held["hits"] / total if total else None, "predicted": hits / total if total else None})
        planned = plan.memory.get(dev)
        for label, key, plan_key in (("dense bytes", "dense_bytes", "dense_bytes"),
                                     ("resident expert bytes", "resident_expert_bytes", "expert_bytes"),
                                     ("cache bytes (peak)", "cache_bytes_peak", "cache_bytes")):
            rows.append({"metric": f"{dev}: {label}", "device": dev, "measured": float(held[key]),
                         "predicted": None if planned is None else float(getattr(planned, plan_key))})
    return rows


def verify_bundle_run(bundle_dir: str | Path, checkpoint: str | Path, prompts: list[str] | None = None,
                      max_new_tokens: int = 16) -> dict:
    """Measured (runtime) vs predicted (simulator) for a bundle; see the module docstring."""
    from exporters.bundle import check_manifest
    from profiles.hardware import load_profile
    from profiles.models import load_model
    from profiles.workload.trace import DECODE, PREFILL, Trace
    from simulator.engine import SimConfig, simulate
    from simulator.metrics import served_one_by_one

    from .plan import load_plan
    from .plan_check import check_plan

    bundle = Path(bundle_dir)
    check_manifest(bundle)
    plan = load_plan(bundle / "plan.json")
    _, hw = load_profile(bundle / "hardware.yaml")
    config = Path(checkpoint) / "config.json"
    if not config.is_file():
        raise InputError("not an HF checkpoint (no config.json)", file=checkpoint, fix="pass the checkpoint directory")
    model = load_model(config)
    check_plan(plan, hw, model, file=bundle / "plan.json")  # what the bundle runs must fit its hardware
    try:
        from exporters.runtime import RuntimeInputError
        from exporters.runtime.record import run_and_record
    except ImportError as exc:
        raise InputError(f"running a bundle needs the runtime extra ({exc.name} is missing)",
                         fix="pip install torch==2.13.0 && pip install 'moe-planner[runtime]'") from None
    # the first generation pays one-off costs (kernel selection, thread pools, page faults):
    # a warm-up prompt runs first; its routing is replayed too (the caches carry over), but
    # its times are left out on both sides
    try:
        run = run_and_record(bundle, checkpoint, [WARM_UP, *(prompts or DEFAULT_PROMPTS)], max_new_tokens)
    except RuntimeInputError as exc:  # the runtime's own one-line errors (it cannot import profiles)
        raise InputError(str(exc)) from None
    measured, routing, seqs = run["measured"], run["routing"], run["sequences"]
    phase = np.concatenate([np.r_[np.full(p, PREFILL), np.full(d, DECODE)] for p, d in seqs]).astype(np.uint8)
    trace = Trace(expert_ids=routing, seq_lens=np.array([p + d for p, d in seqs]), phase=phase,
                  num_experts=model.num_experts, layer_map=tuple(lp.hidden_layer for lp in plan.layers),
                  model=model.name, source=f"recorded by planner verify from {bundle}")
    report = simulate(plan, hw, model, trace, SimConfig(batch_size=1))
    sim = report.metrics
    sim_tpot, sim_ttft = served_one_by_one(sim["per_request"], skip=1)  # without the warm-up
    sim_bytes = sum(sim["bytes_moved"].values())
    run_bytes = float(sum(measured["bytes_moved"].values()))
    rows = [
        {"metric": "decode tokens/s", "measured": measured["tokens_per_s"],
         "predicted": 1.0 / sim_tpot if sim_tpot else None},
        {"metric": "TTFT s (mean)", "measured": measured["ttft_s"], "predicted": sim_ttft},
        {"metric": "TPOT s (mean)", "measured": measured["tpot_s"], "predicted": sim_tpot},
        {"metric": "expert hit rate", "measured": measured["expert_hit_rate"], "predicted": sim["expert_hit_rate"]},
        {"metric": "bytes moved", "measured": run_bytes, "predicted": sim_bytes},
    ]
    rows += device_rows(plan, measured, sim)
    for row in rows:
        row["relative_error"] = _rel(row["measured"], row["predicted"])
    equal = [None if a is None else round(a, 12) for a in measured["hit_rate"]] == \
            [None if b is None else round(b, 12) for b in sim["hit_rate"]]
    return {"rows": rows, "hit_rates_equal": equal,
            "hit_rate": {"measured": measured["hit_rate"], "predicted": sim["hit_rate"]},
            "prompts": len(seqs) - 1, "tokens": int(routing.shape[0]), "measured": measured, "predicted": sim,
            # what `planner calibrate` needs to replay this run on another profile
            "plan": json.loads(plan.to_json()), "model_config": str(config.resolve()), "warm_up_requests": 1,
            "routing": {"expert_ids": routing.tolist(), "sequences": [list(s) for s in seqs]}}
