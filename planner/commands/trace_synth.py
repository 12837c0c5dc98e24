"""`planner trace synth`: a synthetic workload, from knobs or calibrated to a real one."""

from __future__ import annotations

from pathlib import Path

import click

from profiles.errors import InputError
from profiles.workload.calibrate import calibrate, measure
from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import save_trace

from ..output import get_output
from ._common import common_options

__all__ = ["synth"]


@click.command("synth")
@click.option("--like", "like", type=click.Path(dir_okay=False), help="Calibrate to this trace or aggregate file.")
@click.option("--task", help="Task inside a multi-task --like file (or 'all').")
@click.option("--model", "model_name", help="Take layers/experts/top-k (and the default knobs) from this model.")
@click.option("--layers", type=click.IntRange(min=1), help="MoE layers (L).")
@click.option("--experts", type=click.IntRange(min=1), help="Routed experts per layer (E).")
@click.option("--top-k", type=click.IntRange(min=1), help="Experts per token (K).")
@click.option("--skew", type=click.FloatRange(min=0), help="Zipf exponent of per-layer popularity (0 = uniform).")
@click.option("--temporal", type=click.FloatRange(0, 1), help="Chance a previous-token expert is reused.")
@click.option("--affinity", type=click.FloatRange(0, 1), help="Weight of the previous layer's preferred successors.")
@click.option("--sequences", type=click.IntRange(min=1), default=48, show_default=True, help="Sequences.")
@click.option("--prompt-tokens", type=click.IntRange(min=0), default=32, show_default=True,
              help="Prefill tokens per sequence.")
@click.option("--output-tokens", type=click.IntRange(min=0), default=16, show_default=True,
              help="Decode tokens per sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random draw.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Trace file to write (.npz).")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@common_options
def synth(like, task, model_name, layers, experts, top_k, skew, temporal, affinity, sequences, prompt_tokens,
          output_tokens, seed, out, force) -> None:
    """Write a seeded synthetic routing trace.

    Knobs: per-layer popularity skew, temporal locality (reuse of the previous token's
    experts), inter-layer affinity, top-k, sequence lengths and the prefill/decode mix. With
    --like the knobs are fitted to a real workload so that its frequency skew, LRU hit rate
    at 2K slots and next-layer predictability match; with --model they start from the
    model's default workload.

    \b
    Examples:
      planner trace synth --model deepseek-v3 --out ds3.npz
      planner trace synth --like routing_top6.npz --task summary --out like-esft.npz
      planner trace synth --layers 32 --experts 8 --top-k 2 --skew 0.3 --temporal 0.2 --out t.npz
    """
    out_path = Path(out)
    if out_path.exists() and not force:
        raise InputError("output file exists", file=out_path, fix="pass --force to overwrite it, or choose another path")
    report = None
    if like:
        from profiles.workload.importers import load_workload

        with get_output().log.status("calibrating..."):
            w, report = calibrate(load_workload(like, task), seed=seed)
        w = w.with_(num_sequences=sequences, prompt_tokens=prompt_tokens, output_tokens=output_tokens)
    elif model_name:
        from profiles.workload.defaults import default_spec

        w = default_spec(model_name, num_sequences=sequences, prompt_tokens=prompt_tokens,
                         output_tokens=output_tokens, seed=seed)
    else:
        missing = [n for n, v in (("--layers", layers), ("--experts", experts), ("--top-k", top_k)) if v is None]
        if missing:
            raise InputError("the trace's shape is not given", key=missing[0],
                             fix="pass --layers, --experts and --top-k, or --model PRESET, or --like FILE")
        w = SyntheticWorkload(num_layers=layers, num_experts=experts, top_k=top_k, num_sequences=sequences,
                              prompt_tokens=prompt_tokens, output_tokens=output_tokens, seed=seed)
    overrides = {k: v for k, v in (("skew", skew), ("temporal", temporal), ("affinity", affinity)) if v is not None}
    if overrides:
        w = w.with_(**overrides, popularity=None if "skew" in overrides else w.popularity)
    trace = generate(w)
    save_trace(trace, out_path)
    stats = measure(trace)
    data = {"file": str(out_path), "tokens": trace.num_tokens, "layers": trace.num_layers,
            "experts": trace.num_experts, "top_k": trace.top_k, "knobs": {k: v for k, v in w.to_dict().items()
                                                                           if k != "popularity"},
            "statistics": stats, "calibration": report.to_dict() if report else None}

    def render(console):
        console.print(f"wrote {out_path}: {trace.num_tokens} tokens x {trace.num_layers} MoE layers x top-"
                      f"{trace.top_k} of {trace.num_experts} experts", highlight=False)
        if report:
            for key in report.target:
                console.print(f"  {key:15s} target {report.target[key]:.3f}  synthetic {report.achieved[key]:.3f}",
                              highlight=False)
            for note in report.notes:
                console.print(f"  note: {note}", highlight=False)
        console.print(f"  knobs: temporal {w.temporal}, affinity {w.affinity}, fanout {w.fanout}", highlight=False)

    get_output().emit(data, render)
