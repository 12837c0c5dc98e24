"""`planner export` and `planner verify`: deployment bundles, and holding them to their plan."""

from __future__ import annotations

import json
from pathlib import Path

import click

from profiles.errors import InputError

from ..output import get_output
from ._common import check_output_path, common_options, writing
from .simulate import plan_hardware

__all__ = ["export_cmd", "verify_cmd"]


@click.command("export")
@click.argument("plan_path", metavar="PLAN.json", type=click.Path(dir_okay=False))
@click.option("--checkpoint", "-c", type=click.Path(file_okay=False),
              help="HF safetensors checkpoint: builds the ONNX kernels and quantised experts now.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Bundle directory.")
@click.option("--hardware", "-H", help="Hardware profile (default: the plan's).")
@click.option("--model", "-m", help="Model (default: the plan's, or the checkpoint's config.json).")
@click.option("--force", is_flag=True, help="Replace an earlier bundle at --out.")
@click.option("--engines-only", is_flag=True,
              help="Write only OUT/engines/ (llama.cpp and accelerate configs, no runtime): for a plan in formats "
                   "the bundle runtime does not run (GGUF types).")
@common_options
def export_cmd(plan_path, checkpoint, out_dir, hardware, model, force, engines_only) -> None:
    """Write a deployment bundle: runtime, kernels, engine configs, run.py, checksummed.

    \b
    Examples:
      planner optimize -m ckpt/config.json -H my-box.yaml --out plan.json
      planner export plan.json --checkpoint ckpt/ --out bundle/
      python bundle/run.py --checkpoint ckpt/ --prompt "the cat sat"
      planner verify bundle/ --checkpoint ckpt/
      planner export multi_gpu_plan.json --out bundle/   # each layer on its GPU (run.py --device-map to remap)
      planner export llamacpp_plan.json --engines-only --out deploy/   # llama.cpp / accelerate configs only
    """
    from exporters.bundle import write_bundle
    from profiles.models import load_model

    from ..plan import load_plan
    from ..plan_check import check_plan

    check_output_path(out_dir, "--out", directory=True)
    plan = load_plan(plan_path)
    if model is None and not _bundled_model(plan.inputs.model):
        if not checkpoint:
            raise InputError("the plan's model is not a bundled preset", key="inputs.model", value=plan.inputs.model,
                             fix="pass --model CONFIG.json (or --checkpoint DIR)")
        model = str(Path(checkpoint) / "config.json")
    spec = load_model(model or plan.inputs.model)
    profile, hw = plan_hardware(plan, hardware)
    warnings = check_plan(plan, hw, spec, file=plan_path, profile=profile)
    output = get_output()
    for w in warnings:
        output.log.print(f"warning: {w}", highlight=False)
    if engines_only:
        _export_engines(plan, spec, hw, out_dir, checkpoint, warnings)
        return
    with output.log.status("writing the bundle..."), writing(out_dir, "--out"):
        bundle = write_bundle(plan, model=spec, hardware=hw, profile=profile, out_dir=out_dir,
                              checkpoint=checkpoint, force=force)

    def render(console):
        console.print(f"wrote {bundle.path}/ ({len(bundle.files)} files, manifest.json with their sha256)",
                      highlight=False)
        for name, command in bundle.commands.items():
            console.print(f"  {name}: {command}", highlight=False, soft_wrap=True)
        for note in bundle.notes:
            console.print(f"  note: {note}", highlight=False)

    output.emit({"bundle": str(bundle.path), "files": list(bundle.files), "commands": bundle.commands,
                 "notes": list(bundle.notes), "warnings": warnings}, render)


def _export_engines(plan, spec, hw, out_dir, checkpoint, warnings) -> None:
    """``--engines-only``: the engine configs of ``plan`` under ``out_dir/engines/``."""
    from exporters.engines.single import render_engines

    with writing(out_dir, "--out"):
        out = render_engines(plan, spec, hw, out_dir, checkpoint=checkpoint or "CHECKPOINT_DIR")

    def render(console):
        console.print(f"wrote {len(out.files)} files under {Path(out_dir) / 'engines'}/", highlight=False)
        for name, command in out.commands.items():
            console.print(f"  {name}: {command}", highlight=False, soft_wrap=True)
        for name, why in out.skipped.items():
            console.print(f"  {name}: not written ({why})", highlight=False)

    get_output().emit({"files": [str(f) for f in out.files], "commands": out.commands, "skipped": out.skipped,
                       "warnings": warnings}, render)


def _bundled_model(name: str) -> bool:
    from profiles.models import bundled_models

    return name in bundled_models()


@click.command("verify")
@click.argument("bundle_dir", metavar="BUNDLE", type=click.Path(file_okay=False))
@click.option("--checkpoint", "-c", required=True, type=click.Path(file_okay=False), help="The HF checkpoint.")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable). Default: three built-in ones.")
@click.option("--prompts-file", type=click.Path(dir_okay=False), help="A text file, one prompt per line.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write measured, predicted and errors as JSON.")
@common_options
def verify_cmd(bundle_dir, checkpoint, prompts, prompts_file, max_new_tokens, out) -> None:
    """Run a bundle on prompts and hold the measurement against the simulator's prediction.

    The routing the runtime saw is replayed through the simulator with the same plan and
    policies, so per-layer hit rates must agree exactly; tok/s, TTFT and bytes moved are
    compared with their relative error.
    """
    from ..verify import verify_bundle_run

    check_output_path(out, "--out", force=True)
    texts = list(prompts)
    if prompts_file:
        try:
            texts += [ln for ln in Path(prompts_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read the prompts ({exc})", file=prompts_file, fix="pass a UTF-8 text file") from None
    output = get_output()
    with output.log.status("running the bundle and the simulator..."):
        result = verify_bundle_run(bundle_dir, checkpoint, texts or None, max_new_tokens)
    if out:
        with writing(out, "--out"):
            Path(out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    def render(console):
        from rich.table import Table

        table = Table(title=f"Bundle {bundle_dir}: measured vs predicted")
        for col in ("metric", "measured", "predicted", "error"):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for row in result["rows"]:
            err = row["relative_error"]
            table.add_row(row["metric"], _fmt(row["measured"]), _fmt(row["predicted"]),
                          "" if err is None else f"{100 * err:+.1f}%")
        console.print(table)
        console.print("per-layer hit rates equal: " + ("yes" if result["hit_rates_equal"] else "NO"), highlight=False)

    output.emit(result, render)


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4g}"
