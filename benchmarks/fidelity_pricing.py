"""Pricing one fidelity case through the planner's own path: the machine and the engine as
the case ran them (multi-GPU merged, CPU-only runs without their GPUs, harness kernels, the
fit's scales applied in memory), the case's placement as one option per MoE layer, and the
planner's memory check (see ``bench_fidelity``'s docstring for the conventions)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))
import dataclasses  # noqa: E402
import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402

from fidelity_cases import DEFAULT_DENSE, _engine, _stats, dense_format, hardware_of, profile_name  # noqa: E402
from planner.costs import MODES, fixed_costs, step_time  # noqa: E402
from planner.ilp import _feasible, build_problem  # noqa: E402
from planner.optimize import make_setup  # noqa: E402
from planner.plan_assembly import _predict  # noqa: E402
from profiles.engines import Engine, EngineEfficiency  # noqa: E402
from profiles.hardware import DEFAULT_EFFICIENCY, Hardware  # noqa: E402
from profiles.units import format_size  # noqa: E402

FETCH, LOCAL = MODES.index("fetch"), MODES.index("local")

# fitted parameters, per engine, all as log-scales of the profile's value: the overheads per
# hidden layer and per expert call on each device kind, the per-step overhead, and the share
# of a device's memory bandwidth ("memory") and compute peak ("compute") its kernels reach
# (profiles/engines.py ``efficiency``; a device kind's default where the profile states none),
# and the share of peak its attention kernels reach ("attention": ``attention_fraction``, fitted
# only where the profile states one: fidelity_fit.fitted_keys)
KINDS = ("gpu", "cpu")
PER_ENGINE = tuple(f"{k}.{w}" for k in KINDS for w in ("layer", "expert_call", "memory", "compute", "attention")) \
    + ("step",)
# no kernel streams weights faster than 0.95 of the memory's peak, or computes past its peak
# (a scale past these compensates for something else)
MAX_FRACTION = {"memory_fraction": 0.95, "compute_max_fraction": 1.0}


def _drop(hw: Hardware, keep) -> Hardware:
    devices = {k: d for k, d in hw.devices.items() if keep(d)}
    links = tuple(link for link in hw.links if link.a in devices and link.b in devices)
    return dataclasses.replace(hw, devices=devices, links=links)


def case_hardware(case: dict) -> tuple[Hardware, list[str]]:
    """The case's machine as the planner should see it (see the module docstring)."""
    hw, notes = hardware_of(case), []
    policy, gpus = case["config"]["policy"], int(case["config"].get("gpus") or 0)
    if policy == "cpu-only":
        if any(d.kind in ("gpu", "accelerator") for d in hw.devices.values()):
            notes.append("GPUs of the profile dropped (CPU-only run)")
        hw = _drop(hw, lambda d: d.kind not in ("gpu", "accelerator"))
    elif gpus > 1:
        gs = [d for d in hw.devices.values() if d.kind == "gpu"][:gpus]
        n = len(gs)
        first = gs[0]
        # tensor parallel: every GPU reads its share of every layer at once (summed bandwidth
        # and peaks); a layer split runs each layer on one GPU after the other, so a token
        # sees one GPU's bandwidth and peak while the layers' memory adds up
        tp = "tensor parallel" in (case["config"].get("notes") or "").lower()
        speed = n if tp else 1
        merged = dataclasses.replace(first, memory_bytes=first.memory_bytes * n,
                                     memory_bytes_per_s=first.memory_bytes_per_s * speed,
                                     peak_ops_per_s={k: v * speed for k, v in first.peak_ops_per_s.items()})
        hw = _drop(hw, lambda d: d.kind != "gpu" or d.id == first.id)
        hw = dataclasses.replace(hw, devices={k: (merged if k == first.id else d) for k, d in hw.devices.items()})
        what = "summed memory, bandwidth and peaks" if tp else "summed memory, one GPU's bandwidth and peaks"
        notes.append(f"{n} GPUs priced as one device with {what} "
                     f"({case['config'].get('notes') or 'multi-GPU'}; no inter-GPU communication priced)")
    return hw, notes


def _efficiency(spec, kind: str, scales: dict[str, float]) -> dict | None:
    """The engine's ``efficiency`` block on ``kind`` with the memory/compute scales applied."""
    base = spec.efficiency.model_dump() if spec.efficiency is not None else {"source": "device defaults"}
    out = dict(base)
    for key, what in (("memory", "memory_fraction"), ("compute", "compute_max_fraction")):
        sc = scales.get(f"{kind}.{key}")
        if sc is None:
            continue
        value = base.get(what) or DEFAULT_EFFICIENCY[kind][what]
        out[what] = min(value * sc, MAX_FRACTION[what])
    return out if out != base else None


def scaled_engine(engine: Engine, scales: dict[str, float] | None, add_kernels: dict[str, set[str]]) -> Engine:
    """``engine`` with the fit's scales (``PER_ENGINE`` keys) applied and the harness kernels
    added (in memory only)."""
    p = engine.profile
    scales = scales or {}
    upd = {}
    for kind in ("gpu", "cpu", "accelerator"):
        spec = getattr(p, kind)
        if spec is None:
            continue
        su = {}
        for what, key in (("layer_overhead_s", "layer"), ("expert_call_overhead_s", "expert_call")):
            v, sc = getattr(spec, what), scales.get(f"{kind}.{key}")
            if v is not None and sc is not None:
                su[what] = v.model_copy(update={"value": v.value * sc})
        eff = _efficiency(spec, kind, scales) if kind in KINDS else None
        if eff is not None:
            su["efficiency"] = EngineEfficiency(**eff)
        af, sc = spec.attention_fraction, scales.get(f"{kind}.attention")
        if af is not None and sc is not None:
            su["attention_fraction"] = af.model_copy(update={"value": min(af.value * sc, 1.0)})
        extra = add_kernels.get(kind, set()) - set(k for k, path in spec.kernels.items() if path != "unsupported")
        if extra:
            su["kernels"] = dict(spec.kernels) | {fm: "native" for fm in sorted(extra)}
        if su:
            upd[kind] = spec.model_copy(update=su)
    if "step" in scales:
        st = p.step_overhead_s
        upd["step_overhead_s"] = st.model_copy(update={
            ph: getattr(st, ph).model_copy(update={"value": getattr(st, ph).value * scales["step"]})
            for ph in ("decode", "prefill")})
    return Engine(profile=p.model_copy(update=upd), path=engine.path) if upd else engine


def without_flash_attention(engine: Engine) -> Engine:
    """``engine`` with no ``attention_fraction`` on any device kind (in memory): a run whose
    source states FlashAttention off, or that ran before its build had it on by default. The
    profile's share is FlashAttention's (llama.cpp's CPU kernel walks the cache row by row);
    without it llama.cpp computes KQ and KQV as ordinary mat-muls, priced as the KV read."""
    p = engine.profile
    upd = {kind: getattr(p, kind).model_copy(update={"attention_fraction": None})
           for kind in ("gpu", "cpu", "accelerator")
           if getattr(p, kind) is not None and getattr(p, kind).attention_fraction is not None}
    return Engine(profile=p.model_copy(update=upd), path=engine.path) if upd else engine


# --------------------------------------------------------------------------- pricing one case


def _specs(case: dict, s, E: int, L: int) -> np.ndarray:
    policy, fi = case["config"]["policy"], s.formats.index(s.engine.stored(case["format"]))
    resident = (E, E, fi, 0, fi, 0, FETCH)
    local = (0, 0, fi, 0, fi, 0, LOCAL)
    if policy in ("all-gpu", "cpu-only", "accelerate"):
        return np.array([resident] * L)
    if policy == "cpu-experts":
        return np.array([local] * L)
    if policy == "n-cpu-moe":
        n = min(int(case["config"]["n"]), L)
        return np.array([local] * n + [resident] * (L - n))
    if policy == "lru-offload":
        k = int(case["config"]["slots"])
        return np.array([(0, E, fi, k, fi, 0, FETCH)] * L)
    raise ValueError(f"policy {policy} has no placement")


def _does_not_fit(s, case: dict, E: int, L: int, stored_dense: str) -> str | None:
    """The planner's reason why ``case``'s placement does not fit with the usual reserves
    (``s`` as make_setup built it), or None when it fits."""
    specs = _specs(case, s, E, L)
    problem = build_problem(s, None, [specs[l:l + 1] for l in range(L)], grid=False)
    choice = tuple(0 for _ in range(L))
    if _feasible(problem, choice, stored_dense):
        return None
    t = problem.tables
    need = {problem.device_mem: sum(float(t[l].dev_bytes[w]) for l, w in enumerate(choice))
            + problem.dense_total_bytes(stored_dense)}
    for hi, home in enumerate(s.homes):
        need[home] = sum(float(t[l].home_bytes[w]) for l, w in enumerate(choice) if t[l].home[w] == hi)
    short = {m: n - problem.caps[m] for m, n in need.items() if n > problem.caps[m] * (1 + 1e-9)}
    parts = [f"{m} needs {format_size(need[m])} of {format_size(problem.caps[m])} usable "
             f"({format_size(v)} short)" for m, v in short.items()]
    return (f"{case['config']['policy']} placement does not fit with the planner's memory reserves "
            f"(device {s.device_reserve[0]:.0%} + {format_size(s.device_reserve[1])}, host "
            f"{s.host_reserve[0]:.0%} + {format_size(s.host_reserve[1])}): " + "; ".join(parts or ["quality budget"]))


def price_case(case: dict, scales: dict[str, float] | None = None, check_fit: bool = False) -> dict:
    """Predicted value of ``case``'s metric, with the notes and the memory check (``check_fit``:
    also the planner's reason when the placement does not fit with the usual reserves)."""
    base = _engine(profile_name(case))
    model, stats = _stats(case["model"])
    hw, notes = case_hardware(case)
    fmt, dfm = case["format"], dense_format(case)
    if not case.get("dense_format"):
        notes.append(f"dense format not stated: {DEFAULT_DENSE} assumed")
    policy = case["config"]["policy"]
    gpu_present = any(d.kind == "gpu" for d in hw.devices.values())
    compute_kind = "gpu" if gpu_present and base.runs_on("gpu") else "cpu"
    # which device runs the experts' format, which runs the dense format
    expert_kind = "cpu" if policy in ("cpu-experts", "cpu-only") else compute_kind
    need = {compute_kind: {base.stored(dfm)}}
    need.setdefault(expert_kind, set()).add(base.stored(fmt))
    if policy == "n-cpu-moe":
        need.setdefault("cpu", set()).add(base.stored(fmt))
        need.setdefault("gpu", set()).add(base.stored(fmt))
    added = {k: {f for f in v if not base.supports(k, f)} for k, v in need.items()}
    added = {k: v for k, v in added.items() if v}
    for k, v in sorted(added.items()):
        notes.append(f"harness kernel: {', '.join(sorted(v))} native on {k} for {base.name}")
    engine = scaled_engine(base, scales, added)
    if case["config"].get("flash_attn") is False:
        engine = without_flash_attention(engine)
        notes.append("no FlashAttention (config flash_attn: false): attention priced as its KV read "
                     "(KQ and KQV as ordinary mat-muls), not at the engine's attention_fraction")
    formats = tuple(dict.fromkeys((fmt, dfm)))
    prompt = int(case.get("prompt_tokens") or 0)
    out_tokens = int(case.get("output_tokens") or 0)
    B = int(case["batch"])
    metric = case["metric"]
    prefill = metric in ("ttft_s", "prefill_tok_s")
    if prefill and prompt <= 0:
        raise ValueError(f"{case['id']}: a prefill metric needs prompt_tokens")
    context = max(prompt, 1) if prefill else max(prompt + out_tokens // 2, 1)
    s = make_setup(hw, model, stats, batch_size=B, context_tokens=context, formats=formats, engine=engine)
    L, E = stats.num_layers, stats.num_experts
    no_fit = _does_not_fit(s, case, E, L, s.engine.stored(dfm)) if check_fit else None
    s = dataclasses.replace(s, device_reserve=(0.0, 0.0), host_reserve=(0.0, 0.0))
    specs = _specs(case, s, E, L)
    problem = build_problem(s, None, [specs[l:l + 1] for l in range(L)], grid=False)
    choice = tuple(0 for _ in range(L))  # one option per layer: the case's
    stored_dense = s.engine.stored(dfm)
    fits = bool(_feasible(problem, choice, stored_dense))
    if prefill:
        pred = _predict(problem, choice, stored_dense, False, 0.0 + 1.0, SimpleNamespace(prompt_tokens=prompt))
        ttft = pred["ttft_s"]
        value = ttft if metric == "ttft_s" else prompt / ttft
    else:
        tpot = step_time(s, problem.tables, choice, fixed_costs(s, stored_dense), False)[0]
        value = {"tpot_s": tpot, "decode_tok_s": 1.0 / tpot, "throughput_tok_s": B / tpot}[metric]
    if not fits:
        notes.append("would not fit in memory as the planner counts it (priced anyway: the source ran it)")
    return {"predicted": float(value), "fits": fits, "does_not_fit": no_fit, "notes": notes, "compute": s.compute.id,
            "formats": list(s.formats), "context_tokens": context}


def log_err(pred: float, published: float) -> float:
    return math.log(pred / published)


def pct(x: float) -> float:
    return 100.0 * abs(x)
