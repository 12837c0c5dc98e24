"""`planner quality measure`: each expert's output error at each format, from the checkpoint.

Needs the ``[runtime]`` extra (torch, transformers, onnxruntime); imported when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from profiles.errors import InputError

from ..output import get_output
from ._common import FiniteFloat, check_output_path, common_options, writing

__all__ = ["quality"]

_DEFAULT_FORMATS = "bf16,fp8,int8,int4"
_RUNTIME_FIX = "pip install torch==2.13.0 && pip install 'moe-planner[runtime]'"


@click.group("quality")
def quality() -> None:
    """Measured expert quality: what each format costs each expert, and super experts.

    `planner quality measure` writes quality.json; `planner optimize --quality quality.json`
    plans with it (and `--critical auto` keeps its super experts at full precision).
    """


@quality.command("measure")
@click.option("--checkpoint", "checkpoint_dir", required=True, type=click.Path(path_type=Path),
              help="Local Hugging Face MoE checkpoint directory (config.json, safetensors, tokenizer).")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(path_type=Path),
              help="Text file, one prompt per line: the activations the experts are measured on.")
@click.option("--generate", "generate_tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="Greedy tokens decoded after each prompt (their expert inputs are sampled too).")
@click.option("--formats", default=_DEFAULT_FORMATS, show_default=True,
              help="Formats to measure, comma-separated (those the bundle runtime runs).")
@click.option("--tokens-per-expert", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most routed tokens kept per expert (the first ones, in the order they ran).")
@click.option("--outlier-factor", type=FiniteFloat(min=0, min_open=True), default=10.0, show_default=True,
              help="Super-expert rule: down_proj output max-abs above this many times the layer's median.")
@click.option("--seed", type=int, default=0, show_default=True, help="Torch seed.")
@click.option("--out", "-o", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="quality.json to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@common_options
def measure(checkpoint_dir: Path, prompts_file: Path, generate_tokens: int, formats: str, tokens_per_expert: int,
            outlier_factor: float, seed: int, out_path: Path, force: bool) -> None:
    """Run the checkpoint's experts on the prompts' activations, in fp32 and at each format.

    Per (MoE layer, expert, format) it writes the relative output error
    sqrt(sum ||y_q - y||^2 / sum ||y||^2) over the expert's sampled tokens, with the weights
    quantised and unpacked by the bundle runtime's own code (onnxruntime's quantiser for
    int8/int4); per expert the down projection's input and output max-abs and whether it is
    a super-expert candidate (see --outlier-factor).

    \b
    Example:
      planner quality measure --checkpoint ./Mixtral-tiny --prompts prompts.txt --out quality.json
      planner optimize -m ./Mixtral-tiny --quality quality.json --critical auto
    """
    from profiles.models import load_model as load_spec
    from profiles.workload.recorder import read_prompts

    from ..plan_digest import model_digest

    check_output_path(out_path, "--out", force=force)
    wanted = tuple(f.strip() for f in formats.split(",") if f.strip())
    if not wanted:
        raise InputError("no formats given", key="--formats", value=formats, expected="e.g. bf16,int8,int4",
                         fix="list one or more formats")
    from exporters.quality import MEASURABLE

    bad = [fm for fm in wanted if fm not in MEASURABLE]
    if bad:
        raise InputError("the runtime has no quantiser for this format", key="--formats", value=bad[0],
                         expected=", ".join(MEASURABLE), fix="measure formats the bundle runtime runs")
    spec = load_spec(checkpoint_dir)
    prompts = read_prompts(prompts_file)
    import importlib.util

    for name in ("torch", "transformers", "onnxruntime"):  # onnxruntime: the int8/int4 quantiser
        if importlib.util.find_spec(name) is None:
            raise InputError(f"measuring needs the runtime extra ({name} is not installed)", fix=_RUNTIME_FIX)
    from exporters.quality import measure_quality

    out = get_output()
    doc = measure_quality(checkpoint_dir, prompts, wanted, model_name=spec.name, model_digest=model_digest(spec),
                          generate_tokens=generate_tokens, tokens_per_expert=tokens_per_expert,
                          outlier_factor=outlier_factor, seed=seed,
                          progress=lambda done, total: out.log.print(f"measured MoE layer {done}/{total}"))
    with writing(out_path, "--out"):
        out_path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    flagged = [f"{l['moe_layer']}:{e['expert']}" for l in doc["layers"] for e in l["experts"] if e["super_expert"]]
    summary = {"out": str(out_path), "model": doc["model"], "moe_layers": len(doc["layers"]),
               "experts": len(doc["layers"][0]["experts"]) if doc["layers"] else 0, "formats": list(wanted),
               "super_experts": flagged}

    def render(console) -> None:
        console.print(f"wrote {out_path}: {summary['moe_layers']} MoE layers x {summary['experts']} experts at "
                      f"{', '.join(wanted)}; super-expert candidates: {', '.join(flagged) or 'none'}", highlight=False)

    out.emit(summary, render)
