"""A bundle's README.md: what the plan predicts, the exact commands, where each plan device
runs (``devices.json``) and how to change that, and the export's notes."""

from __future__ import annotations

import math

from planner.plan import Plan, layer_ranges
from profiles.errors import InputError
from profiles.hardware import Hardware
from profiles.models import ModelSpec

__all__ = ["predicted_text", "readme"]


def predicted_text(plan: Plan) -> str:
    """What the plan predicts, in words: decode tok/s, or for an expert-parallel plan (which
    predicts load balance and traffic, not throughput) the balance and cross-GPU share."""
    pred = plan.predicted
    tps = pred.get("tokens_per_s")
    if isinstance(tps, (int, float)) and math.isfinite(tps):
        return f"predicted {tps:.2f} tok/s"
    load = pred.get("max_mean_load")
    if isinstance(load, (int, float)) and math.isfinite(load):
        from .engines.sglang import ep_layout

        try:
            gpus = f" over {len(ep_layout(plan).ranks)} GPUs"
        except InputError:
            gpus = ""
        text = f"expert parallelism{gpus}, predicted max/mean expert load per GPU {load:.3f}"
        worst = pred.get("max_mean_load_worst_layer")
        if isinstance(worst, (int, float)) and math.isfinite(worst):
            text += f" ({worst:.3f} in the worst layer)"
        cross = pred.get("cross_gpu_fraction")
        if isinstance(cross, (int, float)) and math.isfinite(cross):
            text += f", {100 * cross:.1f}% of routed tokens cross GPUs"
        return text + " (no tok/s prediction for an expert-parallel plan)"
    return "the plan holds no throughput prediction"


def _devices_text(plan: Plan, devices: dict) -> list[str]:
    """The README's lines on where each plan device runs and how to change it."""
    mapped = devices["devices"]
    lines = ["## Devices", ""]
    if plan.layer_devices:
        lines += [f"Each MoE layer runs on its planned GPU ({layer_ranges(plan.layer_devices)}; the embedding and "
                  f"the head on {plan.compute_device}): its dense part, resident experts and cache live there, its "
                  "offloaded experts are copied over that GPU's own link, hidden states move between GPUs at layer "
                  "boundaries.", ""]
    lines += ["`devices.json` maps the plan's devices to torch devices: "
              + ", ".join(f"`{d}` -> `{v['torch']}`" for d, v in mapped.items()) + ". "
              "Override at run time with `--device-map "
              + ",".join(f"{d.rsplit('/', 1)[-1]}=cpu" for d in mapped) + "` (or `MOE_DEVICE_MAP`), "
              "or `--device cpu` for all; without CUDA every device falls back to the CPU. The metrics "
              "(`--metrics-out`) keep `devices`, `links`, `hops` and `placement` per plan device.", ""]
    return lines


def readme(plan: Plan, model: ModelSpec, hardware: Hardware, commands: dict[str, str], notes: list[str],
            devices: dict) -> str:
    """The bundle's README.md: the plan in words, the commands, its devices, the notes."""
    lines = [f"# {model.name} on {hardware.name}, as planned", "",
             (f"Plan: objective {plan.objective}, batch {plan.batch_size}, context {plan.context_tokens}; "
              f"{predicted_text(plan)}."), "",
             "## Run", "", "```bash", commands["run"], "```", "",
             "Metrics (tok/s, TTFT, TPOT, per-layer hit rates, bytes moved) go to `--metrics-out FILE`.", "",
             *_devices_text(plan, devices),
             "## Check prediction against measurement", "", "```bash", commands["verify"], "```", "",
             "## The same plan for other engines", ""]
    for name, command in commands.items():
        if name not in ("run", "verify"):
            lines += [f"{name}:", "", "```bash", command, "```", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += [("Every file is listed with its sha256 in `manifest.json`; `run.py` refuses a bundle whose "
              "files changed."), ""]
    return "\n".join(lines)
