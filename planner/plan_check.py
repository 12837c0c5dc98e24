"""Hold a plan to the hardware and model it is used with, before anything reads it further.

A ``plan.json`` is a user file: it may be hand-edited, stale, or made for other hardware.
Every consumer (``simulate``, ``export``, ``verify``) calls :func:`check_plan` first, so a
plan that cannot run on the hardware is refused in one line naming the layer, the expert and
the figure, the same way everywhere.

Checked: the plan's layers match the model's MoE layers one to one; every expert is listed
once per layer; every device and memory the plan names exists; every format is known;
an expert runs where it lives (nothing resident or computed on NVMe); replicas sit on
other memories than their expert's home; cache slots do not exceed the experts (an EP plan
with offload: each expert's owner is a GPU, its resident experts live there, each GPU's
cache holds at most the experts it owns); and the
bytes planned in each memory (experts and their replicas at their formats, cache slots,
and the plan's dense weights, KV cache and workspace) fit its capacity. A plan made from
another model or hardware profile (its digest differs) gets a warning, as ``simulate``
has always given.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from profiles.errors import InputError
from profiles.formats import get_format
from profiles.hardware import Hardware
from profiles.models import ModelSpec
from profiles.nested import nested_use
from profiles.units import format_size

from .plan import Plan
from .plan_digest import digest, model_digest

__all__ = ["check_plan"]

# Capacities are compared with a little slack for float rounding in plan.json (12 digits).
_SLACK = 1e-9


def check_plan(plan: Plan, hardware: Hardware, model: ModelSpec, *, file: str | Path | None = None,
               profile: object | None = None) -> list[str]:
    """Refuse a plan that cannot run on ``hardware`` for ``model``; return warnings.

    Args:
        plan: the loaded plan.
        hardware: the resolved hardware profile it is used with.
        model: the model it is used with.
        file: the plan's path, for error messages.
        profile: the hardware profile document (``HardwareProfile``); when given, a plan
            made for another profile gets a warning.

    Returns:
        Warnings (the plan was made from another model or profile).

    Raises:
        InputError: one line naming the plan's key, the value and what was expected.
    """
    def bad(message: str, key: str, value: object = InputError._UNSET, expected: str | None = None,
            fix: str = "regenerate the plan with planner optimize for this hardware and model") -> InputError:
        return InputError(message, file=file, key=key, value=value, expected=expected, fix=fix)

    # 1. layers: one per MoE layer of the model, numbered 0..L-1, at the model's hidden layers
    L, E = model.num_moe_layers, model.num_experts
    if len(plan.layers) != L or any(len(lp.home) != E for lp in plan.layers):
        experts = sorted({len(lp.home) for lp in plan.layers}) or [0]
        raise bad("the plan does not match the model", "layers",
                  f"{len(plan.layers)} MoE layers x {'/'.join(map(str, experts))} experts", f"{L} x {E} ({model.name})",
                  fix="use the model (or checkpoint) the plan was made for, or re-plan for this one")
    for i, (lp, hidden) in enumerate(zip(plan.layers, model.moe_layer_indices)):
        if lp.moe_layer != i:
            what = "duplicate" if sum(x.moe_layer == lp.moe_layer for x in plan.layers) > 1 else "out-of-order"
            raise bad(f"{what} MoE layer number", f"layers[{i}].moe_layer", lp.moe_layer,
                      f"{i} (layers numbered 0..{L - 1} in order)")
        if lp.hidden_layer != hidden:
            raise bad("the layer is not one of the model's MoE layers", f"layers[{i}].hidden_layer", lp.hidden_layer,
                      f"hidden layer {hidden} ({model.name})")

    # 2. devices and memories exist, and are of the right kind
    devices = hardware.devices
    for key, dev, kinds in (("compute_device", plan.compute_device, ("gpu", "cpu", "accelerator")),
                            ("host_device", plan.host_device, ("cpu",))):
        if dev not in devices:
            raise bad("the plan names a device the hardware profile lacks", key, dev,
                      "one of " + ", ".join(d for d, x in devices.items() if x.kind in kinds),
                      fix="use the plan with the hardware profile it was made for (--hardware)")
        if devices[dev].kind not in kinds:
            raise bad(f"the {key.replace('_', ' ')} must be a {' or '.join(kinds)}", key, dev,
                      f"a {' or '.join(kinds)}, not a {devices[dev].kind}")
    memories = hardware.memories
    for mem in plan.memory:
        if mem not in memories:
            raise bad("the plan budgets a memory the hardware profile lacks", f"memory.{mem}", mem,
                      "one of " + ", ".join(memories), fix="use the plan with the hardware profile it was made for")

    # 2b. multi-GPU pipeline plans: each layer runs on a GPU or accelerator of the host's node,
    #     and its resident experts and cache live on that device
    if plan.layer_devices is not None:
        if len(plan.layer_devices) != len(plan.layers):
            raise bad("layer_devices must name one compute device per MoE layer", "layer_devices",
                      len(plan.layer_devices), f"{len(plan.layers)} entries")
        node = devices[plan.host_device].node
        for i, dev in enumerate(plan.layer_devices):
            if dev not in devices or devices[dev].kind not in ("gpu", "accelerator") or devices[dev].node != node:
                raise bad("a layer's compute device must be a GPU or accelerator of the host's node",
                          f"layer_devices[{i}]", dev, "one of " + ", ".join(
                              d for d, x in devices.items() if x.kind in ("gpu", "accelerator") and x.node == node),
                          fix="use the plan with the hardware profile it was made for (--hardware)")
            lp = plan.layers[i]
            own = hardware.memory_of(dev).id
            for e, (home, site) in enumerate(zip(lp.home, lp.site)):
                if site == "resident" and home != own:
                    raise bad("a resident expert must live on its layer's device", f"layers[{i}].home[{e}]", home,
                              f"{own} (layer_devices[{i}] = {dev})")
            if lp.cache_slots and lp.cache_device != dev:
                raise bad("a layer's cache must be on its layer's device", f"layers[{i}].cache_device",
                          lp.cache_device, dev)

    # 2c. expert-parallel plans with offload: every expert's owner is a GPU of the profile, a
    #     resident expert lives on its owner, each GPU cache belongs to a GPU owning experts there
    for i, lp in enumerate(plan.layers):
        for e, (gpu, home, site) in enumerate(zip(lp.owner, lp.home, lp.site)):
            if gpu not in devices or devices[gpu].kind != "gpu":
                raise bad("an expert's owner must be a GPU of the profile", f"layers[{i}].owner[{e}]", gpu,
                          "one of " + ", ".join(d for d, x in devices.items() if x.kind == "gpu"),
                          fix="use the plan with the hardware profile it was made for (--hardware)")
            if site == "resident" and home != hardware.memory_of(gpu).id:
                raise bad("a resident expert must live on its owner GPU", f"layers[{i}].home[{e}]", home,
                          f"{hardware.memory_of(gpu).id} (owner {gpu})")
        for c in lp.gpu_caches:
            owned = sum(o == c.device for o in lp.owner)
            if not owned or c.slots > owned:
                raise bad("a GPU's cache holds more slots than the experts it owns in the layer",
                          f"layers[{i}].gpu_caches", f"{c.device}: {c.slots} slots",
                          f"at most {owned} (the experts owner names it for)")

    # 3. formats are known
    formats = {plan.dense_format} | {f for lp in plan.layers for f in lp.format}
    formats |= {lp.cache_format for lp in plan.layers if lp.cache_format}
    formats |= {c.format for lp in plan.layers for c in lp.gpu_caches}
    for fmt in sorted(formats):
        try:
            get_format(fmt)
        except InputError as exc:
            where = "dense_format" if fmt == plan.dense_format else "layers[].format"
            raise bad("unknown number format", where, fmt, exc.expected, fix="use a format of `planner formats list`") from None

    # 4. per layer: homes, sites, replicas and caches
    used: dict[str, float] = defaultdict(float)  # memory id -> bytes of experts and cache slots
    for i, lp in enumerate(plan.layers):
        for e, (home, fmt, site) in enumerate(zip(lp.home, lp.format, lp.site)):
            if home not in memories:
                raise bad("the plan homes an expert on a memory the hardware profile lacks", f"layers[{i}].home[{e}]",
                          home, "one of " + ", ".join(memories),
                          fix="use the plan with the hardware profile it was made for (--hardware)")
            tier = memories[home].tier
            if site in ("resident", "local") and tier == "nvme":
                raise bad(f"a {site} expert must live where it is computed, not on NVMe", f"layers[{i}].site[{e}]",
                          site, "fetch or stream for an expert homed on NVMe")
            nbytes = model.expert_bytes(fmt)
            if lp.planes and lp.planes[e]:  # nested: the planes the device holds, a low plane in host DRAM
                use = nested_use(model, fmt, lp.planes[e])
                nbytes = use.device_bytes
                used[hardware.memory_of(plan.host_device).id] += use.host_bytes
            used[home] += nbytes
            if lp.miss_copy is not None and site == "fetch":  # its low-bit copy in host DRAM (profiles.miss_copy)
                used[hardware.memory_of(plan.host_device).id] += model.expert_bytes(lp.miss_copy.format)
            reps = lp.replicas[e] if lp.replicas else ()
            if len(set(reps)) != len(reps) or home in reps:
                raise bad("an expert and its replica on one memory", f"layers[{i}].replicas[{e}]", list(reps),
                          f"replicas on memories other than its home {home} and each other")
            for rep in reps:
                if rep not in memories:
                    raise bad("the plan places a replica on a memory the hardware profile lacks",
                              f"layers[{i}].replicas[{e}]", rep, "one of " + ", ".join(memories),
                              fix="use the plan with the hardware profile it was made for (--hardware)")
                used[rep] += nbytes
        if lp.cache_slots > model.num_experts:
            raise bad("more cache slots than experts", f"layers[{i}].cache_slots", lp.cache_slots,
                      f"at most {model.num_experts} (the layer's experts)")
        if lp.cache_slots:
            if lp.cache_device not in devices:
                raise bad("the cache is on a device the hardware profile lacks", f"layers[{i}].cache_device",
                          lp.cache_device, "one of " + ", ".join(devices),
                          fix="use the plan with the hardware profile it was made for (--hardware)")
            widest = lp.cache_format or max(set(lp.format), key=lambda f: get_format(f).bits_per_weight)
            used[hardware.memory_of(lp.cache_device).id] += lp.cache_slots * model.expert_bytes(widest)
        for c in lp.gpu_caches:
            used[hardware.memory_of(c.device).id] += c.slots * model.expert_bytes(c.format)

    # 5. every memory holds what the plan puts there
    for mem_id, mem in memories.items():
        budget = plan.memory.get(mem_id)
        other = (budget.dense_bytes + budget.kv_bytes + budget.workspace_bytes) if budget else 0.0
        need = used.get(mem_id, 0.0) + other
        if need > mem.capacity_bytes * (1 + _SLACK):
            raise bad(f"the plan puts {format_size(need)} in {mem_id}, which holds {format_size(mem.capacity_bytes)}",
                      f"memory.{mem_id}", f"{format_size(used.get(mem_id, 0.0))} of experts and cache + "
                      f"{format_size(other)} dense, KV and workspace", f"at most {format_size(mem.capacity_bytes)}",
                      fix="re-plan for this hardware (planner optimize -H ...), or use the hardware the plan was "
                          "made for")

    # 6. the inputs the plan was made from
    warnings = []
    # older plans digested the model file's path too
    if plan.inputs.model_digest not in (model_digest(model), digest(dataclasses.asdict(model))):
        warnings.append(f"model {model.name} differs from the model the plan was made for ({plan.inputs.model})")
    if profile is not None and digest(profile.model_dump(mode="json")) != plan.inputs.hardware_digest:
        warnings.append(f"hardware {hardware.name} differs from the profile the plan was made for")
    return warnings
