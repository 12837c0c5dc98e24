"""Every single-node engine config of a Plan, written into a bundle's ``engines/`` in one call.

    from exporters.engines.single import render_engines
    out = render_engines(plan, "mixtral-8x7b", "desktop-4090", "BUNDLE")
    out.files      # (Path("BUNDLE/engines/llamacpp.json"), Path("BUNDLE/engines/llamacpp.sh"), ...)
    out.commands   # {"llama.cpp": "llama-server -m MODEL.gguf -ngl 999 -ot ...", "accelerate": "python ..."}
    out.skipped    # {"accelerate": "why"}: engines that cannot express this plan

Files (all deterministic: sorted keys, floats to 12 significant digits):

=================================  ==================================================================
``engines/llamacpp.json``          rounded layers, ``-ot`` rules, ``--n-cpu-moe`` equivalent,
                                   ``llama-quantize`` rules, memory, predictions, commands
``engines/llamacpp.sh``            convert, quantise and serve, one command per step
``engines/accelerate.json``        ``device_map``, ``max_memory``, ``offload_folder``, predictions
``engines/accelerate_load.py``     loads the checkpoint with that map (``--prompt`` to generate)
``engines/accelerator-<mem>.json``  one memory map per accelerator memory the plan uses
=================================  ==================================================================

Both llama.cpp and accelerate place experts per (layer, projection) / per layer, coarser
than a plan: :mod:`exporters.engines.rounding` says how the plan is rounded, and each JSON's
``predicted`` block prices the rounded plan with the planner's cost model next to the plan's
own prediction. Cluster plans (several nodes, replicas) are skipped here: the SGLang and
vLLM renderers take them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from planner.plan import Plan
from profiles.errors import InfeasibleError
from profiles.hardware import Hardware
from profiles.models import ModelSpec
from profiles.workload.trace import Trace

from .accelerate import LOAD_SCRIPT, render_accelerate
from .accelerator import accelerator_memories, map_file_name, memory_map
from .accelerate_split import render_accelerate_pipeline
from .llamacpp import llamacpp_script, render_llamacpp
from .llamacpp_split import render_llamacpp_pipeline
from .pricing import Pricing
from .rounding import (
    NotApplicable,
    check_plan,
    resolve_inputs,
    to_json_text,
    write_text,
)

__all__ = ["ENGINES_DIR", "PIPELINE_NOT_SERVED", "RenderedEngines", "render_engines"]

ENGINES_DIR = "engines"
# SGLang and vLLM docs: pipeline parallelism (--pipeline-parallel-size / --pp-size) gives each
# GPU a consecutive range of layers with all of its weights in GPU memory, and --cpu-offload-gb
# streams a byte budget of weights to the GPU at every forward; neither computes experts on the CPU
PIPELINE_NOT_SERVED = ("SGLang and vLLM cannot run this plan: their pipeline parallelism keeps every weight of a "
                       "stage's layers on its GPU, and their CPU offload (--cpu-offload-gb) streams weights to the "
                       "GPU at every forward; neither computes a layer's offloaded experts on the CPU")


@dataclass(frozen=True)
class RenderedEngines:
    """What :func:`render_engines` wrote.

    Attributes:
        files: every file written, in writing order.
        commands: engine -> the command line that uses its config (``"llama.cpp"``: the
            ``llama-server`` line; ``"llama.cpp:quantize"``; ``"accelerate"``: the load script;
            ``"accelerator:<memory>"``: the map check).
        skipped: engine -> why it was not written (it cannot express this plan).
    """

    files: tuple[Path, ...]
    commands: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _cluster_reason(plan: Plan, hardware: Hardware) -> str:
    from .sglang import is_expert_parallel

    if is_expert_parallel(plan):
        return "the plan spreads experts over GPUs (expert parallelism): see the SGLang/vLLM configs"
    nodes = {hardware.devices[plan.compute_device].node}
    for layer in plan.layers:
        nodes |= {hardware.devices[m].node if m in hardware.devices else m.split("/")[0] for m in layer.home}
    return f"the plan spans {len(nodes)} nodes: see the SGLang/vLLM configs" if len(nodes) > 1 else ""


def render_engines(plan: Plan, model: ModelSpec | str, hardware: Hardware | str, out_dir: str | Path, *,
                   trace: Trace | None = None, model_file: str = "MODEL.gguf",
                   checkpoint: str = "CHECKPOINT_DIR", refer_dir: str | Path | None = None) -> RenderedEngines:
    """Write the single-node engine configs of ``plan`` under ``out_dir/engines/``.

    Args:
        plan: the plan (``planner optimize``'s output).
        model: its model: a ModelSpec, or a preset name / config.json path.
        hardware: its hardware: a resolved Hardware, or a profile name / YAML path.
        out_dir: the bundle directory (``engines/`` is created inside it).
        trace: the workload the plan was made with, to price the rounding; default ``None``:
            the model's default workload (what ``planner optimize`` uses without a trace).
            The JSON says whether it matches the plan's workload digest.
        model_file: the GGUF file name the llama.cpp commands produce and serve.
        checkpoint: the HF checkpoint directory the commands read (a placeholder by default).
        refer_dir: where ``out_dir`` will be when the commands run; default ``None``: the
            commands name files relative to it (``engines/accelerate_load.py``).

    Returns:
        :class:`RenderedEngines`: the files written, the command lines, the skipped engines.

    Raises:
        InputError: the plan does not match the model or hardware (one line).
    """
    model, hardware = resolve_inputs(model, hardware)
    check_plan(plan, model, hardware)
    engines = Path(out_dir) / ENGINES_DIR
    shown = ENGINES_DIR if refer_dir is None else str(Path(refer_dir) / ENGINES_DIR)
    files: list[Path] = []
    commands: dict[str, str] = {}
    skipped: dict[str, str] = {}
    cluster = _cluster_reason(plan, hardware)
    if cluster:
        return RenderedEngines(files=(), skipped={"llama.cpp": cluster, "accelerate": cluster})
    if plan.dropped_experts:  # planner.task: only the bundle runtime masks a router
        why = (f"the plan drops {sum(map(len, plan.dropped_experts))} experts (--drop-below), which this engine "
               "cannot (its router picks among every expert); run the bundle, or re-plan without --drop-below")
        return RenderedEngines(files=(), skipped={"llama.cpp": why, "accelerate": why})
    pipeline = plan.layer_devices is not None and len(set(plan.layer_devices)) > 1
    if pipeline:  # several GPUs, each layer whole on one: llama.cpp's layer split, accelerate's multi-GPU map
        skipped["sglang/vllm"] = PIPELINE_NOT_SERVED
    on_card = [d for d in dict.fromkeys(plan.layer_devices or ()) if hardware.devices[d].kind == "accelerator"]
    if on_card:  # planner.multi_gpu puts layers on an FPGA-class card; no engine here has a backend for one
        why = (f"the plan runs MoE layers on the accelerator {on_card[0]}, which this engine cannot (it has no "
               "backend for the card); re-plan with --parallel offload to render it")
        skipped |= {"llama.cpp": why, "accelerate": why}
        return RenderedEngines(files=(), skipped=skipped)
    # each engine's config priced on that engine's profile, as `planner optimize --compare` does
    try:
        pricing = Pricing(plan, model, hardware, trace, engine="llama.cpp")
        render = render_llamacpp_pipeline if pipeline else render_llamacpp
        cfg = render(plan, model, hardware, pricing, model_file=model_file, checkpoint=checkpoint)
    except (NotApplicable, InfeasibleError) as exc:
        skipped["llama.cpp"] = str(exc)
    else:
        files.append(write_text(engines / "llamacpp.json", to_json_text(cfg)))
        files.append(write_text(engines / "llamacpp.sh", llamacpp_script(cfg), executable=True))
        commands["llama.cpp"] = cfg["commands"]["serve"]
        if "quantize" in cfg["commands"]:
            commands["llama.cpp:quantize"] = cfg["commands"]["quantize"]

    try:
        pricing = Pricing(plan, model, hardware, trace, engine="accelerate")
        if plan.kv_cache == "host" and not pricing.kv_on_host:
            raise NotApplicable("the plan keeps the KV cache in host memory, which accelerate cannot (its engine "
                                "profile has no kv_offload); re-plan with --kv-cache device to render it")
        if plan.prefill_offload is not None and any(plan.prefill_offload):
            raise NotApplicable("the plan runs a prompt's CPU experts on the GPU after a copy (plan.json "
                                "prefill_offload, from --slo-ttft), which accelerate cannot (every pass runs at the "
                                "decode sites); run the bundle, or re-plan without --slo-ttft to render it")
        render = render_accelerate_pipeline if pipeline else render_accelerate
        cfg = render(plan, model, hardware, pricing, checkpoint=checkpoint, engines_dir=shown)
    except (NotApplicable, InfeasibleError) as exc:
        skipped["accelerate"] = str(exc)
    else:
        files.append(write_text(engines / "accelerate.json", to_json_text(cfg)))
        files.append(write_text(engines / "accelerate_load.py", LOAD_SCRIPT))
        commands["accelerate"] = cfg["commands"]["load"]

    for mem in accelerator_memories(plan, hardware):
        name = f"accelerator:{mem}"
        try:
            data = memory_map(plan, model, hardware, mem, engines_dir=shown)
        except InfeasibleError as exc:
            skipped[name] = str(exc)
            continue
        files.append(write_text(engines / map_file_name(mem), to_json_text(data)))
        commands[name] = data["commands"]["check"]
    return RenderedEngines(files=tuple(files), commands=commands, skipped=skipped)
