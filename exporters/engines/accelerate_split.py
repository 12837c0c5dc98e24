"""HF accelerate / transformers 5 rendering of a multi-GPU pipeline Plan (``Plan.layer_devices``):
a ``device_map`` over several GPUs (CUDA indices), ``"cpu"`` and ``"disk"``, with what the
rounding costs.

Legend: L = MoE layers, G = the node's GPUs, share_g = one layer's share of the dense
weights and KV cache on GPU g ((dense + KV) / L, as :func:`planner.multi_gpu.feasible`
counts it).

Rounding (the single-GPU rule of :mod:`exporters.engines.accelerate`, per GPU): experts at
bf16; on each GPU g, the layers the plan runs there with some of their experts resident,
in the plan's order of preference, while they fit g's budget at (bf16 layer + share_g)
each; every other layer is offloaded (host memory, then disk) and, as accelerate runs an
offloaded module on its main device, executes on GPU 0, whose budget then also holds
those layers' shares and one layer of room for streaming (``infer_auto_device_map``
keeps it on the main device only). Repeated until the set of offloaded layers is stable.
Priced by :func:`planner.pipeline_costs.pipeline_step_s` through
:meth:`exporters.engines.rounding.Pricing.price_rounded`, the formula the planner's
pipeline plans and the ``accelerate-auto`` baseline are priced with.

A decoder layer without routed experts (DeepSeek's dense first layers) goes with the next
MoE layer's GPU. ``max_memory`` bounds weights only: each GPU's entry leaves out its KV
share and the workspace the plan reserves.
"""

from __future__ import annotations

import shlex
from typing import Any

from planner.costs import capacity, fixed_costs
from planner.pipeline_costs import node_gpus
from planner.plan import Plan
from profiles.errors import InfeasibleError
from profiles.hardware import Hardware
from profiles.models import ModelSpec

from .accelerate import MODULE_LAYOUTS, bf16_note, device_map_for
from .pricing import Pricing, rounding_report
from .rounding import RoundedLayer, check_plan, device_share, fill_layers, fill_order, memory_string

__all__ = ["render_accelerate_pipeline", "hidden_layer_devices"]


def hidden_layer_devices(model: ModelSpec, moe_devices: list[int]) -> dict[int, int]:
    """Decoder layer -> GPU index: MoE layers as given, a dense layer with the next MoE layer
    (the last MoE layer's GPU after it)."""
    moe = list(model.moe_layer_indices)
    out = {}
    for i in range(model.num_hidden_layers):
        nxt = next((k for k, h in enumerate(moe) if h >= i), len(moe) - 1)
        out[i] = moe_devices[nxt]
    return out


def render_accelerate_pipeline(plan: Plan, model: ModelSpec, hardware: Hardware, pricing: Pricing, *,
                               checkpoint: str = "CHECKPOINT_DIR", offload_folder: str = "offload",
                               engines_dir: str = "engines") -> dict[str, Any]:
    """HF accelerate configuration for a pipeline ``plan`` (``engines/accelerate.json``).

    Args and Raises: as :func:`exporters.engines.accelerate.render_accelerate`.
    """
    check_plan(plan, model, hardware)
    if model.architecture not in MODULE_LAYOUTS:
        device_map_for(model, {}, "cpu")  # raises NotApplicable with the known classes
    s0 = pricing.setup(plan.compute_device)
    gpus = node_gpus(s0, accelerators=False)  # G[0] = compute_device: accelerate's main device
    cuda = [d.id for d in hardware.devices.values() if d.kind == "gpu" and d.node == s0.compute.node]
    L = len(plan.layers)
    layer_bytes = model.num_experts * model.expert_bytes("bf16")
    room, share, dense = [], [], []  # [G] usable bytes less the workspace; per layer: dense + KV, dense alone
    for g in gpus:
        sg = pricing.setup(g)
        fc = fixed_costs(sg, "bf16")
        room.append(capacity(sg, hardware.memory_of(g).id) - fc.workspace_bytes)
        share.append((fc.dense_bytes + fc.kv_bytes) / L)
        dense.append(fc.dense_bytes / L)
    shares = device_share(plan, model, hardware)
    planned = [gpus.index(plan.device_of(l)) for l in range(L)]
    order = fill_order(shares)

    # 1. per GPU, its layers with resident experts while they fit; the rest stream on GPU 0
    streamed = {l for l in range(L) if shares[l] <= 0.0}
    while True:
        on_gpu: dict[int, set[int]] = {}
        for g in range(len(gpus)):
            mine = [l for l in order if planned[l] == g and l not in streamed]
            fixed = (len(streamed) * share[0] + (layer_bytes if streamed else 0.0)) if g == 0 else 0.0
            on_gpu[g] = fill_layers(mine, [layer_bytes + share[g]] * L, room[g] - fixed)
        left = set(range(L)) - set().union(*on_gpu.values())
        if left == streamed:
            break
        streamed = left
    # 2. offloaded layers: host memory, then disk
    host_mem = hardware.memory_of(plan.host_device).id
    rest = [l for l in order if l in streamed]
    on_host = fill_layers(rest, [layer_bytes] * L, pricing.usable_bytes(host_mem))
    on_disk = [l for l in rest if l not in on_host]
    if on_disk and not any(m.tier == "nvme" for m in hardware.memories.values()):
        raise InfeasibleError(f"accelerate: {len(on_disk)} MoE layers ({len(on_disk) * layer_bytes / 2**30:.1f} GiB "
                              f"at bf16) fit neither the GPUs nor host memory and {hardware.name} has no disk; "
                              "smallest change: more host memory or an NVMe drive")
    devices = [next((g for g, ls in on_gpu.items() if l in ls), 0) for l in range(L)]
    place = {l: "device" for l in range(L) if l not in streamed} | {l: "host" for l in on_host} \
        | {l: "disk" for l in on_disk}
    rounded = [RoundedLayer(l, plan.layers[l].hidden_layer, place[l], "bf16",
                            "resident" if place[l] == "device" else "stream", shares[l]) for l in range(L)]
    layer_devices = [gpus[g] for g in devices]
    predicted = pricing.price_rounded(plan.compute_device, rounded, "bf16", layer_devices=layer_devices)
    report = rounding_report(plan, pricing, predicted)

    # 3. the map: CUDA indices are the node's GPUs in profile order
    index = [cuda.index(g) for g in gpus]  # [G] CUDA index of each GPU
    main = index[0]
    layers_on = {h: index[g] for h, g in hidden_layer_devices(model, devices).items()}
    experts_on = {r.hidden_layer: "cpu" if r.place == "host" else "disk" for r in rounded if r.place != "device"}
    device_map = device_map_for(model, experts_on, main, layers_on=layers_on)
    max_memory = {}  # weights only: resident experts, the dense share of the layers run there, the streaming room
    for g in range(len(gpus)):
        n = devices.count(g)
        if n or g == 0:
            weights = len(on_gpu[g]) * layer_bytes + n * dense[g] + (layer_bytes if g == 0 and streamed else 0.0)
            max_memory[str(index[g])] = memory_string(weights)
    max_memory["cpu"] = memory_string(pricing.usable_bytes(host_mem))
    notes = [bf16_note(plan),
             "offloaded layers run on GPU " + str(main) + " (accelerate's main device), streamed over its link"]
    load = ["python", f"{engines_dir}/accelerate_load.py", "--checkpoint", checkpoint]
    return {
        "engine": "accelerate",
        "model": model.name,
        "architecture": model.architecture,
        "plan": {"hardware": plan.inputs.hardware, "compute_device": plan.compute_device,
                 "layer_devices": list(plan.layer_devices or ()), "batch_size": plan.batch_size,
                 "context_tokens": plan.context_tokens, "workload_digest": plan.inputs.workload_digest},
        "device": plan.compute_device,
        "devices": {str(index[g]): gpus[g] for g in range(len(gpus))},
        "dtype": "bfloat16",
        "device_map": device_map,
        "max_memory": max_memory,
        "offload_folder": offload_folder if on_disk else None,
        "rounding": {
            "rule": "experts at bf16; per GPU, the layers the plan runs there with resident experts, ranked by the "
                    "plan's share of their expert bytes on it (ties: later layer first), while they fit with their "
                    "share of dense weights and KV cache; every other layer offloaded (host memory, then disk) and "
                    "run on the main GPU, streamed at every forward, one layer of room kept there",
            "layers": [{"moe_layer": r.moe_layer, "layer": r.hidden_layer,
                        "device": index[devices[r.moe_layer]] if r.place == "device" else
                        ("cpu" if r.place == "host" else "disk"), "runs_on": index[devices[r.moe_layer]],
                        "plan_device": plan.device_of(r.moe_layer), "plan_device_share": r.device_share}
                       for r in rounded],
        },
        "memory": {"layer_bytes": layer_bytes, "layers_on_gpus": {str(index[g]): len(on_gpu[g]) for g in on_gpu},
                   "layers_on_host": len(on_host), "layers_on_disk": len(on_disk)},
        "predicted": report,
        "commands": {"load": shlex.join(load + ["--prompt", "Hello"])},
        "notes": notes,
    }

