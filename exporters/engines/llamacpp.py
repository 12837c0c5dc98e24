"""llama.cpp rendering of a single-node Plan: ``-ot`` buffer rules, the ``--n-cpu-moe``
equivalent and ``llama-quantize --tensor-type`` rules, with what the rounding costs.

Legend: L = MoE layers, E = routed experts per layer, H = hidden size, I = expert
intermediate size.

GGUF stores the experts of one (layer, projection) as one 3-D tensor,
``blk.N.ffn_{gate,up,down}_exps.weight`` ``[E, I, H]`` / ``[E, H, I]`` (some conversions fuse
gate and up into ``ffn_gate_up_exps``; shared experts are ``ffn_{gate,up,down}_shexp``), so
both the buffer a tensor lives in and its quantisation type are per (layer, projection).
The plan is rounded to that grid as :mod:`exporters.engines.rounding` describes: one format
per layer (gate, up and down share it; a projection whose row length the GGUF type cannot
block takes llama-quantize's own fallback), whole layers on the GPU in the plan's order of
preference while they fit at GGUF byte sizes, the rest in a ``CPU`` buffer where llama.cpp
computes them (decode) from host memory. Projections of one layer are not split between
buffers: an expert split across devices would cross PCIe twice per call, and the cost model
prices experts, not projections.

llama.cpp rules the renderer relies on (``common/arg.cpp``, ``src/llama-model-loader.cpp``,
``src/llama-quant.cpp``): ``-ot`` takes ``regex=buffer`` pairs separated by commas (so a
rule holds neither ``,`` nor ``=``), tried in order with ``std::regex_search`` on the full
tensor name, the first match wins; ``-ngl 999`` puts every layer on the GPU first.
``--n-cpu-moe N`` adds one rule ``blk\\.i\\.ffn_(up|down|gate|gate_up)_(ch|)exps`` = CPU
per decoder layer ``i < N`` (dense layers have no such tensors). llama-quantize lowercases a
``--tensor-type`` pattern, applies it only when the target type is a quantised one, and
versions differ on first or last match: the rules written here never overlap, so order
does not matter.

Plan format -> GGUF type (bits per weight in GGUF, ours in :mod:`profiles.formats`):

=========  =======  ===================================================================
format     GGUF     why
=========  =======  ===================================================================
fp32       F32      exact
bf16       BF16     exact (``--outtype f16`` / F16 where a backend lacks BF16)
fp16       F16      exact
fp8        Q8_0     GGUF has no fp8 type; Q8_0 (8.5 b/w) is the nearest 8-bit one
int8       Q8_0     symmetric int8, one fp16 scale per 32 weights (ours: per 128)
fp6        Q6_K     no 6-bit float in GGUF; 6-bit k-quant, 6.56 b/w
int4       Q4_K     4-bit with 6-bit scales and mins in 256-weight super-blocks, 4.5 b/w
                    (ours: 4.16 b/w, so a GGUF int4 layer takes 8% more bytes)
mxfp4      MXFP4    OCP MXFP4, as the gpt-oss GGUFs ship
fp4        MXFP4    the only 4-bit float type in GGUF
int3       Q3_K     3.44 b/w
int2       Q2_K     2.63 b/w
ternary    TQ1_0    1.69 b/w ternary
=========  =======  ===================================================================

Row length not divisible by the type's block (256 for k-quants and TQ1_0, 32 for Q8_0,
Q4_0, IQ4_NL, MXFP4): a fallback type, written out so the rules and sizes are what runs.
llama-quantize's own: Q6_K -> Q8_0, Q2_K/Q3_K -> IQ4_NL, TQ1_0 -> Q4_0, then F16; for
Q4_K it picks Q5_0 (5.5 b/w), where this renderer writes IQ4_NL (4.5 b/w, blocks of 32) to
keep the plan's 4 bits (gpt-oss's H = 2880 and DeepSeek-V2-Lite's I = 1408 need it).

The cost model prices the rounded plan in the planner's formats (int4 at 4.16 b/w), while
the GPU fit uses GGUF sizes: the fit is what llama.cpp will allocate, the price is what the
planner would predict for that placement.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType

from planner.costs import fixed_costs
from planner.plan import Plan
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
    layer_format,
)

__all__ = [
    "EXPS_REGEX",
    "FORMAT_TO_GGUF",
    "GGUF_ARCH",
    "GGUF_TYPES",
    "GgufType",
    "gguf_tensor_names",
    "gguf_type",
    "llamacpp_script",
    "render_llamacpp",
]


@dataclass(frozen=True)
class GgufType:
    """A ggml tensor type.

    Attributes:
        name: ggml type name as llama.cpp prints it (``"Q4_K"``).
        bits_per_weight: stored bits per weight, block scales included.
        block: weights per block along a row (the row length must divide by it).
        ftype: llama-quantize's positional type that makes it the default (``None``: not one).
        fallback: the type llama-quantize falls back to when the row does not divide.
    """

    name: str
    bits_per_weight: float
    block: int
    ftype: str | None
    fallback: str | None = None

    @property
    def quantised(self) -> bool:
        return self.block > 1


# weights per block and bytes per block from the gguf package (GGML_QUANT_SIZES); llama-quantize's
# positional type and its fallback for a row the block does not divide are llama.cpp facts
# (src/llama-quant.cpp), not in the package
_LLAMA_QUANTIZE = {  # GGUF type: (ftype, fallback)
    "F32": ("F32", None), "BF16": ("BF16", None), "F16": ("F16", None),
    "Q8_0": ("Q8_0", "F16"), "Q6_K": ("Q6_K", "Q8_0"),
    "Q4_K": ("Q4_K_S", "IQ4_NL"),  # Q4_K_S: "mostly Q4_K"
    "Q4_0": ("Q4_0", "F16"), "IQ4_NL": ("IQ4_NL", "F16"), "MXFP4": ("MXFP4_MOE", "F16"),
    "Q3_K": ("Q3_K_S", "IQ4_NL"), "Q2_K": ("Q2_K", "IQ4_NL"), "TQ1_0": ("TQ1_0", "Q4_0"),
}


def _gguf_type(name: str) -> GgufType:
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    ftype, fallback = _LLAMA_QUANTIZE[name]
    return GgufType(name, 8 * block_bytes / block, block, ftype, fallback)


GGUF_TYPES: dict[str, GgufType] = {name: _gguf_type(name) for name in _LLAMA_QUANTIZE}

# HF architecture class -> the GGUF architecture convert_hf_to_gguf.py writes (Mixtral is "llama")
GGUF_ARCH: dict[str, MODEL_ARCH] = {
    "MixtralForCausalLM": MODEL_ARCH.LLAMA,
    "Qwen3MoeForCausalLM": MODEL_ARCH.QWEN3MOE,
    "Qwen2MoeForCausalLM": MODEL_ARCH.QWEN2MOE,
    "OlmoeForCausalLM": MODEL_ARCH.OLMOE,
    "DeepseekV2ForCausalLM": MODEL_ARCH.DEEPSEEK2,
    "DeepseekV3ForCausalLM": MODEL_ARCH.DEEPSEEK2,
    "GptOssForCausalLM": MODEL_ARCH.GPT_OSS,
    "PhimoeForCausalLM": MODEL_ARCH.PHIMOE,
    "DbrxForCausalLM": MODEL_ARCH.DBRX,
    "GraniteMoeForCausalLM": MODEL_ARCH.GRANITE_MOE,
    "JambaForCausalLM": MODEL_ARCH.JAMBA,
}


def gguf_tensor_names(model: ModelSpec) -> list[str] | None:
    """Every tensor name a GGUF of ``model`` can hold, from the gguf package's tables (the
    architecture's ``MODEL_TENSORS``, ``.weight`` and ``.bias`` of each, every block; routed
    experts in MoE blocks only): a superset of the file's names. ``None``: an architecture
    :data:`GGUF_ARCH` does not map."""
    arch = GGUF_ARCH.get(model.architecture)
    if arch is None:
        return None
    moe = set(model.moe_layer_indices)
    names = []
    for tensor in MODEL_TENSORS[arch]:
        template = TENSOR_NAMES[tensor]
        if "{bid}" not in template:
            blocks = [template]
        else:
            blocks = [template.format(bid=b) for b in range(model.num_hidden_layers)
                      if b in moe or not template.endswith("_exps")]
        names += [f"{n}.{suffix}" for n in blocks for suffix in ("weight", "bias")]
    return names


FORMAT_TO_GGUF = {"fp32": "F32", "bf16": "BF16", "fp16": "F16", "fp8": "Q8_0", "int8": "Q8_0", "fp6": "Q6_K",
                  "int4": "Q4_K", "mxfp4": "MXFP4", "fp4": "MXFP4", "int3": "Q3_K", "int2": "Q2_K",
                  "ternary": "TQ1_0"}

# the expert tensors of one decoder layer, as llama.cpp's own --n-cpu-moe matches them
EXPS_REGEX = r"\.ffn_(?:up|down|gate|gate_up)_(?:ch|)exps"
_GATE_UP = r"\.ffn_(?:up|gate|gate_up)_(?:ch|)exps"
_DOWN = r"\.ffn_down_(?:ch|)exps"
SHEXP_REGEX = r"blk\.[0-9]+\.ffn_(?:up|down|gate)_shexp"
# every tensor but the routed experts: attention, norms, router, shared experts, dense FFN, embeddings
DENSE_REGEX = rf"^(?!blk\.[0-9]+{EXPS_REGEX})"


def gguf_name(fmt: str) -> str:
    """The GGUF type that stores a plan format (a GGUF type name stands for itself)."""
    return fmt.upper() if fmt.upper() in GGUF_TYPES else FORMAT_TO_GGUF[fmt]


def gguf_type(fmt: str, row_length: int) -> str:
    """GGUF type for a plan format and a tensor row length (``ne[0]``), fallbacks applied."""
    name = gguf_name(fmt)
    while row_length % GGUF_TYPES[name].block:
        name = GGUF_TYPES[name].fallback or "F16"
    return name


def _blk_regex(blocks: list[int], tail: str, every: tuple[int, ...] = ()) -> str:
    """``blk\\.(?:3|6|8)`` + ``tail``; ``blk\\.[0-9]+`` + ``tail`` when ``blocks`` are all of ``every``."""
    if every and sorted(blocks) == sorted(every):
        return rf"blk\.[0-9]+{tail}"
    alt = "|".join(str(b) for b in blocks)
    return rf"blk\.(?:{alt}){tail}" if len(blocks) > 1 else rf"blk\.{alt}{tail}"


def _layer_bytes(model: ModelSpec, gate_up: str, down: str) -> float:
    """GGUF bytes of one layer's routed experts: E x (2 H I at gate/up type + H I at down type)."""
    H, I, E = model.hidden_size, model.expert_intermediate_size, model.num_experts
    return E * H * I * (2 * GGUF_TYPES[gate_up].bits_per_weight + GGUF_TYPES[down].bits_per_weight) / 8


def render_llamacpp(plan: Plan, model: ModelSpec, hardware: Hardware, pricing: Pricing, *,
                    model_file: str = "MODEL.gguf", checkpoint: str = "CHECKPOINT_DIR",
                    gpu_backend: str = "CUDA") -> dict[str, Any]:
    """llama.cpp configuration for ``plan`` (the content of ``engines/llamacpp.json``).

    Args:
        plan: a single-node plan for ``model`` on ``hardware``.
        model: the model spec.
        hardware: the resolved hardware.
        pricing: the cost model for this plan (:class:`exporters.engines.rounding.Pricing`).
        model_file: the quantised GGUF the commands serve.
        checkpoint: the HF checkpoint directory the conversion command reads.
        gpu_backend: llama.cpp's name of the GPU buffers, without the index (``CUDA``,
            ``ROCm``, ``Vulkan``; default ``CUDA``).

    Returns:
        A JSON-ready dict: rounded layers, ``-ot`` rules, ``--n-cpu-moe`` equivalent,
        quantisation rules, memory, predicted metrics and the command lines.

    Raises:
        InputError: the plan does not match the model or hardware.
    """
    check_plan(plan, model, hardware)
    H, I = model.hidden_size, model.expert_intermediate_size
    dev = engine_device(plan, hardware)
    on_gpu = dev.kind == "gpu"
    host = hardware.devices[plan.host_device]
    gpus = [d.id for d in hardware.devices.values() if d.kind == "gpu" and d.node == dev.node]
    buffer = f"{gpu_backend}{gpus.index(dev.id)}" if on_gpu else "CPU"

    # 1. one format per layer; GGUF types per projection (gate/up rows are H long, down rows I)
    fmts = [layer_format(layer.format, model) for layer in plan.layers]
    types = [(gguf_type(f, H), gguf_type(f, I)) for f in fmts]
    lbytes = [_layer_bytes(model, gu, dn) for gu, dn in types]
    dense_fmt = pricing.dense_format
    dense_type = gguf_type(dense_fmt, H)
    # the dense bytes the planner charges the device at this format (one size for one placement)
    dense_bytes = fixed_costs(pricing.setup(engine_device(plan, pricing.hardware).id), dense_fmt).dense_bytes

    # 2. whole layers on the GPU in the plan's order of preference while they fit
    shares = device_share(plan, model, hardware)
    budget = pricing.device_budget(dev.id, dense_bytes)
    L = len(plan.layers)
    order = fill_order(shares)

    def placed(on: set[int]) -> list[RoundedLayer]:
        return [RoundedLayer(l, plan.layers[l].hidden_layer, "device" if l in on else "host", fmts[l],
                             "resident" if l in on else "local", shares[l]) for l in range(L)]

    on_dev = fill_layers(order, lbytes, budget) if on_gpu else set(range(L))
    rounded = placed(on_dev)
    predicted = pricing.price_rounded(dev.id, rounded, dense_fmt)
    report = rounding_report(plan, pricing, predicted)
    if on_gpu:  # the same rounding at the planner's byte sizes: the grid's cost without GGUF's
        plan_bytes = [model.num_experts * model.expert_bytes(f) for f in fmts]
        at_plan = fill_layers(order, plan_bytes, pricing.device_budget(dev.id, model.dense_bytes(dense_fmt)))
        report["rounded_at_plan_sizes"] = pricing.price_rounded(dev.id, placed(at_plan), dense_fmt).as_dict()

    host_mem = hardware.memory_of(host.id).id
    # host memory holds the CPU layers (and, CPU-only, the dense weights and KV cache too)
    cpu_bytes = sum(lbytes[l] for l in range(L) if l not in on_dev)
    host_free = pricing.usable_bytes(host_mem) if on_gpu else budget
    if on_gpu and pricing.kv_on_host:  # the KV cache shares host memory with the CPU layers
        host_free -= pricing.fixed(pricing.setup(dev.id), dense_fmt).kv_host_bytes
    fits_ram = cpu_bytes <= host_free
    notes = []
    if not on_gpu:
        kind = hardware.devices[plan.compute_device].kind
        notes.append(f"llama.cpp has no backend for the plan's {kind} {plan.compute_device}: everything runs on "
                     f"the host CPU ({host.id}); the rounding cost includes that" if kind != "cpu"
                     else "CPU-only plan: llama.cpp runs everything on the host CPU")
    if on_gpu and budget < 0:
        notes.append(f"the dense weights, KV cache and workspace alone exceed {dev.id}'s usable memory by "
                     f"{-budget / 2**30:.2f} GiB at GGUF sizes: reduce the context or use a smaller dense type")
    if plan.prefill_offload is not None and any(plan.prefill_offload) and on_gpu:
        # the plan's prefill sites (planner.prefill_sites) are llama.cpp's op offload: a pass of
        # enough tokens copies the CPU experts it uses to the GPU and runs them there
        op = pricing.engine.op_offload
        if op is None:
            raise NotApplicable(f"the plan runs a prompt's CPU experts on {dev.id} after a copy (plan.json "
                                "prefill_offload, from --slo-ttft), which this llama.cpp profile cannot (no "
                                "op_offload); re-plan without --slo-ttft to render it")
        notes.append(f"prefill: the plan runs a prompt's CPU experts on {dev.id} after a copy (prefill_offload, "
                     f"--slo-ttft); llama.cpp's op offload does so for every pass of >= {op.min_batch_tokens} tokens "
                     "(on by default: do not pass --no-op-offload); decode runs them on the CPU"
                     + ("; it copies every CPU expert a pass uses, not only the plan's prefill_copies"
                        if plan.prefill_copies is not None else ""))
    if not fits_ram:
        notes.append(f"CPU-side weights ({cpu_bytes / 2**30:.1f} GiB) exceed usable host memory "
                     f"({host_free / 2**30:.1f} GiB): llama.cpp pages them from the memory-mapped GGUF (slow)")

    # 3. -ot rules: shared experts pinned to the GPU (they run for every token), CPU layers
    cpu_blocks = [r.hidden_layer for r in rounded if r.place != "device"]
    rules = []
    if on_gpu and cpu_blocks:
        if model.num_shared_experts:
            rules.append(f"{SHEXP_REGEX}={buffer}")
        rules.append(f"{_blk_regex(cpu_blocks, EXPS_REGEX, tuple(model.moe_layer_indices))}=CPU")

    # 4. the best --n-cpu-moe N: the first MoE layers on the CPU, the fewest that fit
    n_cpu = None
    if on_gpu:
        for k in range(L + 1):
            if sum(lbytes[k:]) <= budget:
                n_cpu = k
                break
    ncm: dict[str, Any] = {"fits": n_cpu is not None}
    if n_cpu is not None:
        flag = 0 if n_cpu == 0 else plan.layers[n_cpu - 1].hidden_layer + 1
        ncm_layers = placed(set(range(n_cpu, L)))
        ncm.update(n_cpu_moe=flag, moe_layers_on_cpu=n_cpu,
                   same_as_rules=set(range(n_cpu)) == {r.moe_layer for r in rounded if r.place != "device"},
                   predicted=pricing.price_rounded(dev.id, ncm_layers, dense_fmt).as_dict())

    # 5. llama-quantize rules; both rule sets checked against every tensor name of the model
    quant = _quantize_rules(model, rounded, types, dense_type)
    _check_rules(model, rounded, types, dense_type, rules, quant["tensor_type"])

    threads = host.cores or 1
    ctx = plan.context_tokens * plan.batch_size
    serve = ["llama-server", "-m", model_file, "-ngl", "999" if on_gpu else "0"]
    if rules:
        serve += ["-ot", ",".join(rules)]
    if on_gpu and len(gpus) > 1:
        serve += ["--split-mode", "none", "--main-gpu", str(gpus.index(dev.id))]
    serve += ["-c", str(ctx)] + (["-np", str(plan.batch_size)] if plan.batch_size > 1 else [])
    serve += ["-t", str(threads)] + (["--no-mmap"] if cpu_blocks and fits_ram else [])
    if on_gpu and pricing.kv_on_host:  # the plan's KV cache in host memory, attention on the CPU
        serve += [pricing.engine.kv_offload.flag]
        notes.append(f"KV cache in host memory ({pricing.engine.kv_offload.flag}): attention runs on the CPU")
    commands = {"serve": shlex.join(serve)}
    if n_cpu is not None and on_gpu and cpu_blocks:
        alt = serve[:serve.index("-ngl") + 2]
        if n_cpu:
            alt += ["--cpu-moe"] if n_cpu == L else ["--n-cpu-moe", str(ncm["n_cpu_moe"])]
        if len(gpus) > 1:
            alt += ["--split-mode", "none", "--main-gpu", str(gpus.index(dev.id))]
        alt += serve[serve.index("-c"):]
        commands["serve_n_cpu_moe"] = shlex.join(alt)
    commands |= gguf_commands(quant, model_file, checkpoint, dense_type)

    return {
        "engine": "llama.cpp",
        "model": model.name,
        "plan": {"hardware": plan.inputs.hardware, "compute_device": plan.compute_device,
                 "batch_size": plan.batch_size, "context_tokens": plan.context_tokens,
                 "workload_digest": plan.inputs.workload_digest},
        "device": dev.id,
        "buffer": buffer,
        "rounding": {
            "rule": "one format per layer (most expert bytes, ties to the wider); whole layers on the GPU "
                    "ranked by the plan's GPU share of their expert bytes (ties: later layer first) while "
                    "they fit at GGUF sizes; the rest computed by the CPU from host memory",
            "layers": [{"moe_layer": r.moe_layer, "blk": r.hidden_layer, "buffer": buffer if r.place == "device"
                        else "CPU", "format": r.format, "gguf_gate_up": types[r.moe_layer][0],
                        "gguf_down": types[r.moe_layer][1], "bytes": lbytes[r.moe_layer],
                        "plan_device_share": r.device_share} for r in rounded],
        },
        "override_tensor": rules,
        "n_cpu_moe": ncm,
        "quantize": quant,
        "gguf_types": {f: gguf_name(f) for f in sorted(set(fmts) | {dense_fmt})},
        "memory": {"device_budget_bytes": budget if on_gpu else None,
                   "device_expert_bytes": sum(lbytes[l] for l in on_dev) if on_gpu else 0.0,
                   "dense_bytes": dense_bytes, "cpu_bytes": cpu_bytes, "host_usable_bytes": host_free,
                   "fits_host_memory": fits_ram},
        "predicted": report,
        "commands": commands,
        "notes": notes,
    }


def gguf_commands(quant: dict[str, Any], model_file: str, checkpoint: str, dense_type: str) -> dict[str, str]:
    """``convert`` (HF checkpoint -> GGUF) and, for a quantised plan, ``quantize`` command lines."""
    source = f"{model_file.removesuffix('.gguf')}-{quant['source_type'].lower()}.gguf"
    out = {"convert": shlex.join(["python", "convert_hf_to_gguf.py", checkpoint, "--outtype",
                                  quant["source_type"].lower(), "--outfile",
                                  source if quant["base_ftype"] else model_file])}
    if quant["base_ftype"]:
        q = ["llama-quantize", "--token-embedding-type", dense_type.lower(), "--output-tensor-type",
             dense_type.lower()]
        for rule in quant["tensor_type"]:
            q += ["--tensor-type", rule]
        out["quantize"] = shlex.join(q + [source, model_file, quant["base_ftype"]])
    return out


def _quantize_rules(model: ModelSpec, rounded: list[RoundedLayer], types: list[tuple[str, str]],
                    dense_type: str) -> dict[str, Any]:
    """``llama-quantize`` base type and non-overlapping ``--tensor-type`` rules.

    The base type is the dense weights' type when that is quantised (llama-quantize applies
    ``--tensor-type`` only when the base type is a quantised one); otherwise the expert type
    holding the most bytes. Every tensor the plan sizes gets a rule: one per group of expert
    tensors, and one returning every non-expert tensor to the dense type, since the base
    type's own mixture would otherwise raise some of them (Q4_K_S: ``attn_v``, ``attn_k`` to
    Q8_0/Q6_K, ``attn_output`` to Q5_K) over the plan's dense bytes. A tensor whose row the
    type cannot block still takes llama-quantize's fallback. All-unquantised plans need no
    quantize step (``convert_hf_to_gguf.py --outtype`` writes the file directly).
    """
    expert = [t for pair in types for t in pair]
    quantised = [t for t in expert if GGUF_TYPES[t].quantised]
    source = "F32" if dense_type == "F32" or "F32" in expert else "BF16"
    if not GGUF_TYPES[dense_type].quantised and not quantised:
        if set(expert) != {dense_type}:
            # llama-quantize applies --tensor-type rules only under a quantised base type
            raise NotApplicable("llama.cpp cannot mix unquantised expert types with another unquantised dense type "
                                f"({', '.join(sorted(set(expert) | {dense_type}))}): plan with one 16-bit format, "
                                "or quantise the experts")
        return {"base_ftype": None, "source_type": dense_type, "tensor_type": []}
    if GGUF_TYPES[dense_type].quantised:
        base = dense_type
    else:
        by_bytes: dict[str, float] = {}
        for gu, dn in types:
            by_bytes[gu] = by_bytes.get(gu, 0.0) + 2 * GGUF_TYPES[gu].bits_per_weight
            by_bytes[dn] = by_bytes.get(dn, 0.0) + GGUF_TYPES[dn].bits_per_weight
        base = max((t for t in by_bytes if GGUF_TYPES[t].quantised), key=lambda t: (by_bytes[t], t))
    rules = [rf"{DENSE_REGEX}={dense_type.lower()}"]
    groups: dict[tuple[str, str], list[int]] = {}
    for r, pair in zip(rounded, types):
        groups.setdefault(pair, []).append(r.hidden_layer)
    every = tuple(model.moe_layer_indices)
    for (gu, dn), blocks in sorted(groups.items(), key=lambda kv: kv[1][0]):
        if gu == dn:
            rules.append(f"{_blk_regex(blocks, EXPS_REGEX, every)}={gu.lower()}")
        else:
            rules.append(f"{_blk_regex(blocks, _GATE_UP, every)}={gu.lower()}")
            rules.append(f"{_blk_regex(blocks, _DOWN, every)}={dn.lower()}")
    return {"base_ftype": GGUF_TYPES[base].ftype, "source_type": source, "tensor_type": rules}


def _check_rules(model: ModelSpec, rounded: list[RoundedLayer], types: list[tuple[str, str]], dense_type: str,
                 override: list[str], tensor_type: list[str]) -> None:
    """Hold the rules to what they are for, over every GGUF tensor name of the model (gguf's
    tables; skipped for an architecture they are not mapped for), with llama.cpp's reading
    (``re.search`` on the full name; ``-ot``: first match wins): a CPU layer's expert tensors
    go to ``CPU`` and no other tensor does; every tensor matches exactly one quantize rule,
    the one with its planned type.

    Raises:
        RuntimeError: a rule misses or catches a tensor (a bug here, not bad input).
    """
    names = gguf_tensor_names(model)
    if names is None:
        return
    by_blk = {r.hidden_layer: (r, types[r.moe_layer]) for r in rounded}
    ot = [rule.rsplit("=", 1) for rule in override]
    qt = [rule.rsplit("=", 1) for rule in tensor_type]
    for name in names:
        m = re.match(rf"blk\.(\d+){EXPS_REGEX}", name)
        layer = by_blk.get(int(m.group(1))) if m else None
        buffer = next((buf for pat, buf in ot if re.search(pat, name)), None)
        if (buffer == "CPU") != (layer is not None and layer[0].place != "device"):
            raise RuntimeError(f"llama.cpp -ot rules put {name} in {buffer or 'the default buffer'}")
        if not tensor_type:
            continue
        want = dense_type if layer is None else layer[1][1] if ".ffn_down_" in name else layer[1][0]
        hits = [t for pat, t in qt if re.search(pat.lower(), name)]
        if hits != [want.lower()]:
            raise RuntimeError(f"llama-quantize rules give {name} {hits}, the plan sizes it as {want}")


def llamacpp_script(config: dict[str, Any]) -> str:
    """``engines/llamacpp.sh``: convert, quantise and serve, one command per step."""
    cmds = config["commands"]
    pred = config["predicted"]
    lines = ["#!/usr/bin/env bash",
             f"# llama.cpp rendering of a moe-planner plan for {config['model']} on {config['plan']['hardware']}.",
             "# Run from a llama.cpp checkout/build; see llamacpp.json for the rounded layers and predictions.",
             f"# predicted decode: {pred['rounded']['tokens_per_s']:.2f} tok/s after rounding"
             + (f" (plan: {pred['plan_tokens_per_s']:.2f} tok/s)" if pred.get("plan_tokens_per_s") else ""),
             "set -euo pipefail", "", "# 1. HF checkpoint -> GGUF", cmds["convert"]]
    if "quantize" in cmds:
        lines += ["", "# 2. quantise with the plan's per-layer types", cmds["quantize"]]
    lines += ["", "# 3. serve with the plan's expert placement", cmds["serve"]]
    if "serve_n_cpu_moe" in cmds:
        ncm = config["n_cpu_moe"]
        lines += ["", f"# alternative, --n-cpu-moe only: {ncm['predicted']['tokens_per_s']:.2f} tok/s predicted",
                  "# " + cmds["serve_n_cpu_moe"]]
    return "\n".join(lines) + "\n"
