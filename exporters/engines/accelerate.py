"""HF accelerate / transformers 5 rendering of a single-node Plan: ``device_map``,
``max_memory`` and ``offload_folder``, with what the rounding costs.

Legend: L = MoE layers, E = routed experts per layer, H = hidden size, I = expert
intermediate size.

transformers 5 keeps a layer's routed experts as two 3-D parameters of one module,
``model.layers.N.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``.down_proj`` ``[E, H, I]``,
so a ``device_map`` places experts per layer: the plan is rounded as
:mod:`exporters.engines.rounding` describes. Formats round to bf16: a device_map holds no
quantisation, and transformers loads the checkpoint's bf16 weights. Placement: whole
layers on the GPU in the plan's order of preference while they fit at bf16, keeping room
for one offloaded layer (accelerate copies an offloaded module to the GPU for each forward);
then host memory (``"cpu"``), then disk (``"disk"``, with ``offload_folder``). Offloaded
layers run in the planner's ``stream`` mode: their experts cross PCIe at every forward, all
of them, used or not.

The map's keys are module prefixes that never overlap, and together cover every parameter
and buffer of the model class exactly once (a layer whose experts stay with the rest is one
key, ``model.layers.N``; an offloaded one lists its submodules). Module names per class were
read from tiny models built from configs with transformers 5.x; the tests rebuild them and
check the coverage. ``max_memory`` uses GiB = 2^30 bytes (whole GiB, else whole MiB, so every
accelerate version parses it); it bounds weights only, so the GPU entry leaves out the KV
cache and workspace the plan reserves.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from planner.costs import fixed_costs
from planner.plan import Plan
from profiles.errors import InfeasibleError
from profiles.hardware import Hardware
from profiles.models import ModelSpec

from .pricing import Pricing, rounding_report
from .rounding import (
    NotApplicable,
    RoundedLayer,
    check_plan,
    device_share,
    engine_device,
    fill_layers,
    fill_order,
    memory_string,
)

__all__ = ["LOAD_SCRIPT", "MODULE_LAYOUTS", "ModuleLayout", "device_map_for", "render_accelerate"]


@dataclass(frozen=True)
class ModuleLayout:
    """Where a transformers 5 MoE class keeps its modules.

    Attributes:
        router: the router submodule of a MoE block (``mlp.<router>``).
        shared: shared-expert submodules of a MoE block (``mlp.<name>``).
        layer_modules: a decoder layer's submodules besides ``mlp``.
        top_modules: modules outside the decoder layers (``model.rotary_emb`` holds buffers only).
    """

    router: str = "gate"
    shared: tuple[str, ...] = ()
    layer_modules: tuple[str, ...] = ("self_attn", "input_layernorm", "post_attention_layernorm")
    top_modules: tuple[str, ...] = ("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head")
    layers: str = "model.layers"
    experts: str = "mlp.experts"


MODULE_LAYOUTS: dict[str, ModuleLayout] = {
    "MixtralForCausalLM": ModuleLayout(),
    "Qwen3MoeForCausalLM": ModuleLayout(),
    "OlmoeForCausalLM": ModuleLayout(),
    "DeepseekV3ForCausalLM": ModuleLayout(shared=("shared_experts",)),
    "DeepseekV2ForCausalLM": ModuleLayout(shared=("shared_experts",)),
    "Qwen2MoeForCausalLM": ModuleLayout(shared=("shared_expert", "shared_expert_gate")),
    "GptOssForCausalLM": ModuleLayout(router="router"),
    "PhimoeForCausalLM": ModuleLayout(router="router"),
}


def bf16_note(plan: Plan) -> str:
    """What the config says of the plan's formats: a device_map holds none, all run at bf16."""
    return ("formats round to bf16: a device_map holds no quantisation (the plan's formats: "
            + ", ".join(sorted({f for layer in plan.layers for f in layer.format})) + ")")


def device_map_for(model: ModelSpec, experts_on: dict[int, int | str], main: int | str,
                   layers_on: dict[int, int] | None = None) -> dict[str, int | str]:
    """A non-overlapping ``device_map`` for ``model``'s transformers 5 class.

    Args:
        model: the model spec (its ``architecture`` picks the module layout).
        experts_on: decoder layer index -> device of that layer's routed experts (``0``,
            ``"cpu"``, ``"disk"``); MoE layers left out stay with their layer.
        main: the device of everything else (a CUDA index, or ``"cpu"``).
        layers_on: decoder layer index -> the GPU of that layer (several GPUs, a pipeline
            plan); default ``None``: every layer on ``main``.

    Raises:
        NotApplicable: an architecture whose module names are not known here.
    """
    layout = MODULE_LAYOUTS.get(model.architecture)
    if layout is None:
        raise NotApplicable(f"no transformers 5 module layout known for {model.architecture} "
                            f"(known: {', '.join(MODULE_LAYOUTS)})")
    dmap: dict[str, int | str] = {name: main for name in layout.top_modules}
    for i in range(model.num_hidden_layers):
        prefix = f"{layout.layers}.{i}"
        home = (layers_on or {}).get(i, main)
        where = experts_on.get(i, home)
        if where == home:
            dmap[prefix] = home
            continue
        for name in layout.layer_modules + (f"mlp.{layout.router}",) + tuple(f"mlp.{s}" for s in layout.shared):
            dmap[f"{prefix}.{name}"] = home
        dmap[f"{prefix}.{layout.experts}"] = where
    return dmap


def render_accelerate(plan: Plan, model: ModelSpec, hardware: Hardware, pricing: Pricing, *,
                      checkpoint: str = "CHECKPOINT_DIR", offload_folder: str = "offload",
                      engines_dir: str = "engines") -> dict[str, Any]:
    """HF accelerate configuration for ``plan`` (the content of ``engines/accelerate.json``).

    Args:
        plan: a single-node plan for ``model`` on ``hardware``.
        model: the model spec.
        hardware: the resolved hardware.
        pricing: the cost model for this plan (:class:`exporters.engines.rounding.Pricing`).
        checkpoint: the HF checkpoint directory the load command reads.
        offload_folder: where accelerate writes disk-offloaded weights (used only when some
            layer goes to ``"disk"``).
        engines_dir: the directory the load command names for ``accelerate_load.py``
            (default ``engines``, relative to the bundle).

    Raises:
        InputError: the plan does not match the model or hardware.
        NotApplicable: the model class's module names are not known.
        InfeasibleError: the model does not fit the device, host memory and disk at bf16.
    """
    check_plan(plan, model, hardware)
    if model.architecture not in MODULE_LAYOUTS:
        device_map_for(model, {}, "cpu")  # raises NotApplicable with the known classes
    dev = engine_device(plan, hardware)
    on_gpu = dev.kind == "gpu"
    main: int | str = [d.id for d in hardware.devices.values()
                       if d.kind == "gpu" and d.node == dev.node].index(dev.id) if on_gpu else "cpu"
    host_mem = hardware.memory_of(plan.host_device).id
    L = len(plan.layers)
    layer_bytes = model.num_experts * model.expert_bytes("bf16")
    # the dense bytes the planner charges the device at bf16 (one size for one placement)
    dense_bytes = fixed_costs(pricing.setup(dev.id), "bf16").dense_bytes
    budget = pricing.device_budget(dev.id, dense_bytes)
    if budget < 0:
        raise InfeasibleError(f"accelerate: {dev.id} cannot hold the dense weights at bf16 with the planned KV cache "
                              f"({-budget / 2**30:.2f} GiB short); smallest change: a shorter context or a bigger GPU")
    has_disk = any(m.tier == "nvme" for m in hardware.memories.values())

    # 1. whole layers on the engine device in the plan's order, one layer of room kept for streaming
    order = fill_order(device_share(plan, model, hardware))
    if L * layer_bytes <= budget:
        on_dev = set(range(L))
    else:
        on_dev = fill_layers(order, [layer_bytes] * L, budget - layer_bytes)
    rest = [l for l in order if l not in on_dev]
    # 2. then host memory (a GPU plan only: CPU-only, the device is host memory), then disk
    on_host = fill_layers(rest, [layer_bytes] * L, pricing.usable_bytes(host_mem)) if on_gpu else set()
    on_disk = [l for l in rest if l not in on_host]
    if on_disk and not has_disk:
        short = len(on_disk) * layer_bytes
        raise InfeasibleError(f"accelerate: {len(on_disk)} MoE layers ({short / 2**30:.1f} GiB at bf16) fit neither "
                              f"{dev.id} nor host memory and {hardware.name} has no disk; smallest change: more "
                              "host memory or an NVMe drive")
    place = {l: "device" for l in on_dev} | {l: "host" for l in on_host} | {l: "disk" for l in on_disk}
    shares = device_share(plan, model, hardware)
    rounded = [RoundedLayer(l, plan.layers[l].hidden_layer, place[l], "bf16",
                            "resident" if place[l] == "device" else "stream", shares[l]) for l in range(L)]
    predicted = pricing.price_rounded(dev.id, rounded, "bf16")
    report = rounding_report(plan, pricing, predicted)

    target = {"device": main, "host": "cpu", "disk": "disk"}
    device_map = device_map_for(model, {r.hidden_layer: target[r.place] for r in rounded}, main)
    weight_bytes = budget + dense_bytes  # usable device bytes minus the KV cache and workspace
    max_memory: dict[str, str] = {str(main): memory_string(weight_bytes)}
    if on_gpu:
        max_memory["cpu"] = memory_string(pricing.usable_bytes(host_mem))
    notes = [bf16_note(plan)]
    if not on_gpu:
        kind = hardware.devices[plan.compute_device].kind
        if kind != "cpu":
            notes.append(f"transformers has no backend for the plan's {kind} {plan.compute_device}: the model runs "
                         f"on the host CPU ({plan.host_device}); the rounding cost includes that")
    load = ["python", f"{engines_dir}/accelerate_load.py", "--checkpoint", checkpoint]
    return {
        "engine": "accelerate",
        "model": model.name,
        "architecture": model.architecture,
        "plan": {"hardware": plan.inputs.hardware, "compute_device": plan.compute_device,
                 "batch_size": plan.batch_size, "context_tokens": plan.context_tokens,
                 "workload_digest": plan.inputs.workload_digest},
        "device": dev.id,
        "dtype": "bfloat16",
        "device_map": device_map,
        "max_memory": max_memory,
        "offload_folder": offload_folder if on_disk else None,
        "rounding": {
            "rule": "experts at bf16; whole layers on the device ranked by the plan's device share of their "
                    "expert bytes (ties: later layer first) while they fit with one layer of room for streaming; "
                    "then host memory, then disk; offloaded layers are streamed to the device at every forward",
            "layers": [{"moe_layer": r.moe_layer, "layer": r.hidden_layer, "device": target[r.place],
                        "plan_device_share": r.device_share} for r in rounded],
        },
        "memory": {"device_budget_bytes": budget, "layer_bytes": layer_bytes, "dense_bytes": dense_bytes,
                   "layers_on_device": len(on_dev), "layers_on_host": len(on_host), "layers_on_disk": len(on_disk)},
        "predicted": report,
        "commands": {"load": shlex.join(load + ["--prompt", "Hello"])},
        "notes": notes,
    }


# engines/accelerate_load.py: the same for every plan; it reads accelerate.json beside it.
LOAD_SCRIPT = '''\
"""Load the model with the device_map moe-planner rounded for HF accelerate, optionally generate.

    python engines/accelerate_load.py --checkpoint CHECKPOINT_DIR [--prompt "Hello"] [--max-new-tokens 32]

Needs torch, transformers>=5 and accelerate; reads accelerate.json next to this file.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(checkpoint, offload_folder=None):
    cfg = json.loads(Path(__file__).with_name("accelerate.json").read_text(encoding="utf-8"))
    # JSON keys are strings: GPU indices back to ints
    max_memory = {int(k) if k.isdigit() else k: v for k, v in cfg["max_memory"].items()}
    return AutoModelForCausalLM.from_pretrained(
        checkpoint, device_map=cfg["device_map"], max_memory=max_memory,
        offload_folder=offload_folder or cfg["offload_folder"], dtype=getattr(torch, cfg["dtype"]))


def main():
    ap = argparse.ArgumentParser(description="Load (and run) the model with the planned device_map.")
    ap.add_argument("--checkpoint", required=True, help="HF checkpoint directory")
    ap.add_argument("--prompt", default=None, help="generate from this prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--offload-folder", default=None, help="override accelerate.json's offload_folder")
    args = ap.parse_args()
    model = load(args.checkpoint, args.offload_folder)
    print(getattr(model, "hf_device_map", None))
    if args.prompt:
        tok = AutoTokenizer.from_pretrained(args.checkpoint)
        ids = tok(args.prompt, return_tensors="pt").to(model.device)
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        print(tok.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
'''
