"""llama.cpp rendering of a multi-GPU pipeline Plan (``Plan.layer_devices``): each decoder
layer on its GPU (``CUDA0``, ``CUDA1``, ...), the experts of the plan's CPU layers in a
``CPU`` buffer, with what the rounding costs.

Legend: L = MoE layers, n = decoder layers, G = the node's GPUs, share_g = one layer's
share of the dense weights and KV cache on GPU g ((dense + KV) / L, as
:func:`planner.multi_gpu.feasible` counts it).

llama.cpp places decoder layers with ``--split-mode layer`` (the default) and
``--tensor-split w0,w1,...`` (``src/llama-model.cpp``): the n layers and the output layer are
n + 1 slots, and slot il goes to the first device whose cumulative share of the weights
exceeds il / (n + 1), so each device takes one contiguous range, in the order
``--device CUDAa,CUDAb,...`` lists them. Writing each GPU's count of slots as its weight
reproduces a plan whose GPUs each hold one contiguous range of layers exactly (the KV
cache of a layer is allocated on that layer's device too). A plan whose GPUs alternate is
written with one ``-ot`` rule per GPU moving its blocks (``blk\\.(?:3|4)\\.=CUDA1``) on top of
a split with the same counts per GPU: the weights and their compute are where the plan
puts them, but llama.cpp still allocates each layer's KV cache by the split, so some
attention reads cross devices; the notes say so.

Experts (one format per layer, GGUF sizes, :mod:`exporters.engines.llamacpp`): on each GPU,
the layers the plan runs there with some of their experts resident, in the plan's order of
preference, while they fit its budget (usable bytes less the workspace and share_g per
layer it runs); the rest in the ``CPU`` buffer, computed by the CPU from host memory.
A layer the plan keeps entirely off its GPU stays there (the plan chose the CPU for it).
When the CPU layers are exactly the first ones, ``--n-cpu-moe N`` says the same as the
``CPU`` rule and is written instead. Priced by :func:`planner.pipeline_costs.pipeline_step_s`
(through :meth:`exporters.engines.rounding.Pricing.price_rounded`), the formula the
planner's pipeline plans and the ``llama.cpp-split`` baseline are priced with.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from planner.costs import capacity, fixed_costs
from planner.pipeline_costs import node_gpus
from planner.plan import Plan
from profiles.hardware import Hardware
from profiles.models import ModelSpec

from .accelerate_split import hidden_layer_devices
from .llamacpp import (EXPS_REGEX, _blk_regex, _check_rules, _layer_bytes, _quantize_rules, gguf_commands,
                       gguf_name, gguf_tensor_names, gguf_type)
from .pricing import Pricing, rounding_report
from .rounding import RoundedLayer, check_plan, device_share, fill_layers, fill_order, layer_format

__all__ = ["render_llamacpp_pipeline", "tensor_split"]


def tensor_split(slots: list[int]) -> tuple[list[int], bool]:
    """The device order and whether ``slots`` (``[n + 1]`` device of each slot, output last)
    is one contiguous range per device, the only layouts ``--tensor-split`` makes."""
    order: list[int] = []
    for d in slots:
        if not order or order[-1] != d:
            order.append(d)
    return order, len(order) == len(set(order))


def split_devices(weights: list[int], n: int) -> list[int]:
    """``[n + 1]`` llama.cpp's device (position in the ``--device`` order) of each slot for
    ``--tensor-split weights`` (``src/llama-model.cpp``, float32 arithmetic as there)."""
    import numpy as np

    cum = np.cumsum(np.asarray(weights, dtype=np.float32))
    cum = cum / cum[-1]
    return [min(int(np.searchsorted(cum, np.float32(il) / np.float32(n + 1), side="right")), len(weights) - 1)
            for il in range(n + 1)]


def render_llamacpp_pipeline(plan: Plan, model: ModelSpec, hardware: Hardware, pricing: Pricing, *,
                             model_file: str = "MODEL.gguf", checkpoint: str = "CHECKPOINT_DIR",
                             gpu_backend: str = "CUDA") -> dict[str, Any]:
    """llama.cpp configuration for a pipeline ``plan`` (``engines/llamacpp.json``).

    Args and Raises: as :func:`exporters.engines.llamacpp.render_llamacpp`.
    """
    check_plan(plan, model, hardware)
    H, I = model.hidden_size, model.expert_intermediate_size
    L, n = len(plan.layers), model.num_hidden_layers
    s0 = pricing.setup(plan.compute_device)
    gpus = node_gpus(s0, accelerators=False)
    cuda = [d.id for d in hardware.devices.values() if d.kind == "gpu" and d.node == s0.compute.node]
    buffer = [f"{gpu_backend}{cuda.index(g)}" for g in gpus]  # [G]

    # 1. one format per layer, GGUF types per projection, GGUF bytes
    fmts = [layer_format(layer.format, model) for layer in plan.layers]
    types = [(gguf_type(f, H), gguf_type(f, I)) for f in fmts]
    lbytes = [_layer_bytes(model, gu, dn) for gu, dn in types]
    dense_fmt = pricing.dense_format
    dense_type = gguf_type(dense_fmt, H)

    # 2. per GPU, its layers with resident experts while they fit; the rest on the CPU
    planned = [gpus.index(plan.device_of(l)) for l in range(L)]
    shares = device_share(plan, model, hardware)
    order = fill_order(shares)
    on_gpu: set[int] = set()
    budgets = []
    for g, gid in enumerate(gpus):
        sg = pricing.setup(gid)
        fc = fixed_costs(sg, dense_fmt)
        mine = [l for l in order if planned[l] == g and shares[l] > 0.0]
        budget = capacity(sg, hardware.memory_of(gid).id) - fc.workspace_bytes \
            - planned.count(g) * (fc.dense_bytes + fc.kv_bytes) / L
        budgets.append(budget)
        on_gpu |= fill_layers(mine, lbytes, budget)
    rounded = [RoundedLayer(l, plan.layers[l].hidden_layer, "device" if l in on_gpu else "host", fmts[l],
                            "resident" if l in on_gpu else "local", shares[l]) for l in range(L)]
    layer_devices = [gpus[g] for g in planned]
    predicted = pricing.price_rounded(plan.compute_device, rounded, dense_fmt, layer_devices=layer_devices)
    report = rounding_report(plan, pricing, predicted)

    # 3. decoder layers on their GPUs: --device order and --tensor-split counts, -ot where they alternate
    by_hidden = hidden_layer_devices(model, planned)  # decoder layer -> GPU index
    slots = [by_hidden[i] for i in range(n)] + [by_hidden[n - 1]]  # the output layer with the last layer
    run_order, contiguous = tensor_split(slots)
    used = run_order if contiguous else sorted(set(slots), key=slots.index)
    weights = [slots.count(g) for g in used]
    rules = []
    cpu_blocks = [r.hidden_layer for r in rounded if r.place != "device"]
    moe = tuple(model.moe_layer_indices)
    # --n-cpu-moe's rules follow the -ot ones (llama.cpp keeps command-line order), so only without block rules
    first = cpu_blocks == list(moe[:len(cpu_blocks)])
    n_cpu_moe = (cpu_blocks[-1] + 1) if cpu_blocks and first and contiguous else None
    if cpu_blocks and n_cpu_moe is None:
        rules.append(f"{_blk_regex(cpu_blocks, EXPS_REGEX, moe)}=CPU")
    if not contiguous:  # whole blocks to their GPU (after the CPU rule: the first match wins)
        for g in used:
            blocks = [i for i in range(n) if by_hidden[i] == g]
            alt = "|".join(map(str, blocks))
            rules.append(rf"blk\.(?:{alt})\.={buffer[g]}")
    notes = []
    if not contiguous:
        notes.append("the plan's GPUs alternate between layers, which --tensor-split cannot express: -ot rules move "
                     "each block's weights (and so its compute) to the plan's GPU, but llama.cpp allocates each "
                     "layer's KV cache by the split, so some attention reads cross devices (not priced)")

    # 4. llama-quantize rules; -ot rules checked against every tensor name with llama.cpp's reading
    quant = _quantize_rules(model, rounded, types, dense_type)
    cpu_rules = rules + ([f"{_blk_regex(cpu_blocks, EXPS_REGEX, moe)}=CPU"] if n_cpu_moe is not None else [])
    _check_rules(model, rounded, types, dense_type, cpu_rules, quant["tensor_type"])
    _check_devices(model, rounded, cpu_rules, split_devices(weights, n), used, by_hidden, buffer)

    host = hardware.devices[plan.host_device]
    serve = ["llama-server", "-m", model_file, "-ngl", "999", "--split-mode", "layer",
             "--device", ",".join(buffer[g] for g in used), "--tensor-split", ",".join(map(str, weights)),
             ]
    if rules:
        serve += ["-ot", ",".join(rules)]
    if n_cpu_moe is not None:
        serve += ["--n-cpu-moe", str(n_cpu_moe)]
    serve += ["-c", str(plan.context_tokens * plan.batch_size)]
    serve += (["-np", str(plan.batch_size)] if plan.batch_size > 1 else []) + ["-t", str(host.cores or 1)]
    cpu_bytes = sum(lbytes[l] for l in range(L) if l not in on_gpu)
    host_free = pricing.usable_bytes(hardware.memory_of(host.id).id)
    if cpu_blocks and cpu_bytes <= host_free:
        serve += ["--no-mmap"]
    elif cpu_blocks:
        notes.append(f"CPU-side weights ({cpu_bytes / 2**30:.1f} GiB) exceed usable host memory "
                     f"({host_free / 2**30:.1f} GiB): llama.cpp pages them from the memory-mapped GGUF (slow)")
    commands = {"serve": shlex.join(serve)} | gguf_commands(quant, model_file, checkpoint, dense_type)
    return {
        "engine": "llama.cpp",
        "model": model.name,
        "plan": {"hardware": plan.inputs.hardware, "compute_device": plan.compute_device,
                 "layer_devices": list(plan.layer_devices or ()), "batch_size": plan.batch_size,
                 "context_tokens": plan.context_tokens, "workload_digest": plan.inputs.workload_digest},
        "device": plan.compute_device,
        "buffers": {buffer[g]: gpus[g] for g in range(len(gpus))},
        "split": {"device": [buffer[g] for g in used], "tensor_split": weights, "contiguous": contiguous},
        "rounding": {
            "rule": "one format per layer (most expert bytes, ties to the wider); each layer on the plan's GPU; "
                    "per GPU, whole layers with resident experts ranked by the plan's share of their expert bytes "
                    "(ties: later layer first) while they fit at GGUF sizes next to their share of dense weights "
                    "and KV cache; the rest computed by the CPU from host memory",
            "layers": [{"moe_layer": r.moe_layer, "blk": r.hidden_layer, "gpu": buffer[planned[r.moe_layer]],
                        "buffer": buffer[planned[r.moe_layer]] if r.place == "device" else "CPU", "format": r.format,
                        "gguf_gate_up": types[r.moe_layer][0], "gguf_down": types[r.moe_layer][1],
                        "bytes": lbytes[r.moe_layer], "plan_device_share": r.device_share} for r in rounded],
        },
        "override_tensor": rules,
        "n_cpu_moe": {"n_cpu_moe": n_cpu_moe} if n_cpu_moe is not None else None,
        "quantize": quant,
        "gguf_types": {f: gguf_name(f) for f in sorted(set(fmts) | {dense_fmt})},
        "memory": {"gpu_expert_budget_bytes": {buffer[g]: budgets[g] for g in range(len(gpus))},
                   "gpu_expert_bytes": {buffer[g]: sum(lbytes[l] for l in on_gpu if planned[l] == g)
                                        for g in range(len(gpus))},
                   "cpu_bytes": cpu_bytes, "host_usable_bytes": host_free, "fits_host_memory": cpu_bytes <= host_free},
        "predicted": report,
        "commands": commands,
        "notes": notes,
    }


def _check_devices(model: ModelSpec, rounded: list[RoundedLayer], override: list[str], split: list[int],
                   used: list[int], by_hidden: dict[int, int], buffer: list[str]) -> None:
    """Every block tensor lands on the plan's buffer under llama.cpp's reading (first ``-ot``
    match, else the layer's split device): a CPU layer's experts on ``CPU``, everything else
    of block N on its GPU.

    Raises:
        RuntimeError: a tensor would land elsewhere (a bug here, not bad input).
    """
    names = gguf_tensor_names(model)
    if names is None:
        return
    cpu = {r.hidden_layer for r in rounded if r.place != "device"}
    ot = [rule.rsplit("=", 1) for rule in override]
    for name in names:
        m = re.match(r"blk\.(\d+)\.", name)
        if not m:
            continue
        i = int(m.group(1))
        got = next((buf for pat, buf in ot if re.search(pat, name)), buffer[used[split[i]]])
        want = "CPU" if i in cpu and re.search(rf"blk\.\d+{EXPS_REGEX}", name) else buffer[by_hidden[i]]
        if got != want:
            raise RuntimeError(f"llama.cpp would put {name} in {got}; the plan puts it in {want}")
