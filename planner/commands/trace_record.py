"""`planner trace record`: run a local HF MoE checkpoint on prompts and save its routing trace.

Needs the ``[runtime]`` extra (torch, transformers); it is imported only when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from profiles.errors import InputError
from profiles.workload.recorder import DTYPES, check_generate_tokens, read_prompts, record_trace
from profiles.workload.trace import DECODE, PREFILL, save_trace

from ..output import get_output
from ._common import common_options

__all__ = ["record"]


@click.command("record")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Local Hugging Face checkpoint directory (config.json, safetensors, tokenizer).")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(path_type=Path),
              help="Text file, one prompt per line (blank lines skipped); each prompt is one sequence.")
@click.option("--generate", "generate_tokens", type=int, default=32, show_default=True,
              help="Greedy tokens to generate and record after each prompt (0: prompts only).")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="Trace file to write (.npz).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--device", default="cpu", show_default=True, help="Torch device for the model, e.g. cpu, cuda:0.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Weight dtype; auto keeps the checkpoint's.")
@click.option("--seed", type=int, default=0, show_default=True, help="Torch seed.")
@common_options
def record(model_dir: Path, prompts_file: Path, generate_tokens: int, out_path: Path, force: bool, device: str,
           dtype: str, seed: int) -> None:
    """Record every token's top-k experts and gate weights from an HF MoE model.

    Each prompt is prefilled in one forward (phase prefill), then --generate greedy tokens
    are decoded one at a time with the KV cache (phase decode). The recorded ids and
    weights are the ones the model's experts were called with. Works for Mixtral,
    Qwen3-MoE, OLMoE and DeepSeek-V3 checkpoints; needs the runtime extra.

    \b
    Example:
      planner trace record --model ./OLMoE-1B-7B --prompts prompts.txt --generate 64 --out olmoe.npz
    """
    out = get_output()
    check_generate_tokens(generate_tokens)
    if out_path.is_dir():
        raise InputError("output path is a directory", file=out_path, expected="a file name such as trace.npz",
                         fix="name a file inside it, e.g. --out DIR/trace.npz")
    if out_path.exists() and not force:
        raise InputError("output file exists", file=out_path,
                         fix="pass --force to overwrite it, or choose another --out")
    prompts = read_prompts(prompts_file)

    def progress(done: int, total: int) -> None:
        out.log.print(f"recorded sequence {done}/{total}")

    trace = record_trace(model_dir, prompts, generate_tokens=generate_tokens, device=device, dtype=dtype, seed=seed,
                         prompts_file=prompts_file, progress=progress)
    save_trace(trace, out_path)
    summary = {
        "out": str(out_path),
        "model": trace.model,
        "model_type": trace.meta.get("model_type"),
        "sequences": int(trace.seq_lens.size),
        "tokens": trace.num_tokens,
        "prefill_tokens": int((trace.phase == PREFILL).sum()),
        "decode_tokens": int((trace.phase == DECODE).sum()),
        "moe_layers": trace.num_layers,
        "layer_map": list(trace.layer_map),
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "gate_weights_normalised": trace.meta.get("gate_weights_normalised"),
    }

    def render(console) -> None:
        console.print(f"wrote {out_path}: {summary['sequences']} sequences, {summary['tokens']} tokens "
                      f"({summary['prefill_tokens']} prefill, {summary['decode_tokens']} decode), "
                      f"{summary['moe_layers']} MoE layers, top-{summary['top_k']} of {summary['num_experts']} experts")

    out.emit(summary, render)
