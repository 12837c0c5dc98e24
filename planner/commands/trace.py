"""`planner trace`: routing traces and workload statistics.

Subcommands: ``stats`` (per-layer statistics, hit-rate curves, plots), ``import`` (turn
others' routing data into a trace or aggregate ``.npz``), ``synth`` (a synthetic trace:
calibrated to real data, a model's default, or from explicit knobs) and ``record`` (run an
HF model and record its routing; :mod:`.trace_record`). The library does the work
(:mod:`profiles.workload`); these commands parse options and print.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich import box
from rich.table import Table

from profiles.errors import InputError
from profiles.models import load_model
from profiles.workload.aggregate import AggregateWorkload, save_aggregate
from profiles.workload.calibrate import CalibrationReport, calibrate
from profiles.workload.defaults import DEFAULT_TOKENS, default_knobs, defaults_for
from profiles.workload.drift import drift as drift_trace
from profiles.workload.hitrate import POLICIES
from profiles.workload.importers import detect_format, load_workload
from profiles.workload.stats import WorkloadStats, compute_stats, default_cache_sizes
from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import Trace, save_trace

from ..output import get_output, to_jsonable
from ._common import common_options

__all__ = ["trace"]

def _parse_sizes(text: str | None, top_k: int | None, num_experts: int) -> list[int]:
    if not text:
        return default_cache_sizes(top_k or 1, num_experts)
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise InputError("cache sizes must be integers", key="--cache-sizes", value=text,
                         expected="a comma-separated list such as 6,12,24,32",
                         fix="pass e.g. --cache-sizes 6,12") from None
    bad = [c for c in sizes if c < 0 or c > num_experts]
    if bad or not sizes:
        raise InputError("cache size out of range", key="--cache-sizes", value=bad[0] if bad else text,
                         expected=f"slots in 0..{num_experts}", fix="pick sizes up to the number of experts")
    return sizes


def _parse_policies(text: str) -> list[str]:
    names = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise InputError("unknown cache policy", key="--policies", value=bad[0] if bad else text,
                         expected=", ".join(POLICIES), fix="pick from the listed policies")
    return [p for p in POLICIES if p in names]


@click.group()
def trace() -> None:
    """Routing traces: import others' data, compute statistics and hit-rate curves.

    \b
    Examples:
      planner trace stats ../shared/traces/esft-deepseek-v2-lite/routing_top6.npz --task summary
      planner trace stats my_trace.npz --cache-sizes 4,8,16 --report out/
      planner trace import dump.pt sglang_counts.npz
      planner trace synth --like ../shared/traces/esft-deepseek-v2-lite/routing_top6.npz --task law --out law.npz
      planner trace synth --model deepseek-v3 --out v3.npz
      planner trace record --model ./OLMoE-1B-7B --prompts prompts.txt --out olmoe.npz
    """


@trace.command("stats")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--task", help="Task of a multi-task file (ESFT task, OLMoE model/domain, subject), or 'all'.")
@click.option("--cache-sizes", help="Comma-separated slots per layer to tabulate [default: K,2K,4K,E/2].")
@click.option("--policies", default=",".join(POLICIES), show_default=True,
              help="Hit-rate curves to compute (lru, lfu, static, belady).")
@click.option("--token-as-set", is_flag=True,
              help="Judge a token's K experts against the cache as it was before the token "
                   "(default: one after another in rank order).")
@click.option("--reset-per-sequence", is_flag=True, help="Empty the caches at every sequence start.")
@click.option("--segment-len", default=16, show_default=True, type=click.IntRange(min=1),
              help="Tokens per segment for the segment best hit rate.")
@click.option("--top-k", type=click.IntRange(min=1), help="Experts per token, for aggregates that do not record it.")
@click.option("--report", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for stats.json, stats.npz and PNG plots (hit-rate curves, frequency heat map).")
@common_options
def stats_cmd(file: Path, task: str | None, cache_sizes: str | None, policies: str, token_as_set: bool,
              reset_per_sequence: bool, segment_len: int, top_k: int | None, report: Path | None) -> None:
    """Per-layer statistics of a trace (or of an aggregate-only workload).

    FILE is a trace .npz, an ESFT-style .npz (pick a task with --task) or any format that
    `planner trace import` understands. For traces: expert frequency, routing entropy,
    reuse from the previous token, next-layer predictability, and hit rates with the given
    cache sizes for LRU, LFU, a static most-frequent cache and the Belady optimum. An
    access is one (token, layer, expert) reference; each layer has its own cache.
    """
    out = get_output()
    workload = load_workload(file, task, top_k=top_k)
    if isinstance(workload, Trace):
        names = _parse_policies(policies)
        sizes = _parse_sizes(cache_sizes, workload.top_k, workload.num_experts)
        stats = compute_stats(workload, policies=names, token_as_set=token_as_set,
                              reset_per_sequence=reset_per_sequence, segment_len=segment_len)
        data = stats.summary(sizes)
        data["format"] = detect_format(file)
        data["curves"] = {p: stats.hit_rates.curve(p) for p in names}
        data["frequency"] = stats.frequency
        if report is not None:
            data["report"] = _write_trace_report(stats, data, report, sizes)
        out.emit(data, lambda console: _render_trace(console, data, sizes))
    else:
        sizes = _parse_sizes(cache_sizes, workload.top_k, workload.num_experts)
        data = workload.summary(sizes)
        data["format"] = detect_format(file)
        data["curves"] = {"static": workload.static_curve()}
        data["frequency"] = workload.expert_counts
        if report is not None:
            data["report"] = _write_aggregate_report(workload, data, report, sizes)
        out.emit(data, lambda console: _render_aggregate(console, data, sizes))


@trace.command("import")
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--task", help="Task of a multi-task file (ESFT task, OLMoE model/domain, subject), or 'all'.")
@click.option("--top-k", type=click.IntRange(min=1), help="Experts per token, for aggregates that do not record it.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@common_options
def import_cmd(source: Path, output: Path, task: str | None, top_k: int | None, force: bool) -> None:
    """Import routing data recorded elsewhere into a trace or aggregate .npz.

    Per-token sources (ESFT) become a trace; count-only sources (SGLang dumps, published
    counts) become an aggregate workload.

    \b
    Formats understood (detected from the suffix and the keys):
      trace         our trace .npz (expert_ids [T,L,K], seq_lens, phase, meta)
      esft          ESFT npz: {task}_ids [T,L,K], {task}_weights, {task}_seqlens
      sglang        SGLang expert-distribution dump: logical_count [steps,layers,E]
                    as .pt (read without torch, no code execution), .json or .npz
      olmoe-counts  {model}__expert_counts[_top1|_crosslayer[_top1]]__{domain}
      fiddler       {"expert_popularity": [L][E], "total_input_tokens": n} JSON
      fractions     {subject}: float [questions, L, E] routing shares
      aggregate     our aggregate .npz or JSON: expert_counts [L,E], transition_counts
    """
    if output.suffix.lower() != ".npz":
        raise InputError("the output must be a .npz file", key="OUTPUT", value=str(output),
                         expected="a name ending in .npz", fix=f"write to {output.with_suffix('.npz')}")
    if output.exists() and not force:
        raise InputError("output file exists", file=output, fix="pass --force to overwrite it, or pick another name")
    fmt = detect_format(source)
    workload = load_workload(source, task, top_k=top_k)
    if isinstance(workload, Trace):
        save_trace(workload, output)
        data: dict[str, Any] = {"written": str(output), "kind": "trace", "format": fmt, "model": workload.model,
                                "tokens": workload.num_tokens, "sequences": int(len(workload.seq_lens)),
                                "moe_layers": workload.num_layers, "top_k": workload.top_k,
                                "experts": workload.num_experts, "gate_weights": workload.gate_weights is not None}
    else:
        save_aggregate(workload, output)
        data = {"written": str(output), "kind": "aggregate", "format": fmt, "model": workload.model,
                "layers_with_counts": workload.num_layers, "experts": workload.num_experts, "top_k": workload.top_k,
                "tokens": workload.num_tokens, "layer_pairs": [list(p) for p in workload.transition_layers]}
    get_output().emit(data, lambda console: console.print(
        f"wrote {data['kind']} {output} from {fmt}: " + ", ".join(
            f"{k}={v}" for k, v in data.items() if k not in ("written", "kind", "format") and v not in (None, []))))


@trace.command("synth")
@click.option("--like", "like", type=click.Path(dir_okay=False, path_type=Path),
              help="Calibrate the knobs to this trace or aggregate (any format `trace import` reads).")
@click.option("--task", help="Task of a multi-task --like file (ESFT task, OLMoE model/domain, subject), or 'all'.")
@click.option("--model", "model_name",
              help="Model preset or config.json: the shape (layers, experts, top-k, shared/zero experts); "
                   "without --like, its default workload's knobs.")
@click.option("--layers", type=click.IntRange(min=1), help="MoE layers (without --model / --like).")
@click.option("--experts", type=click.IntRange(min=1), help="Routed experts per layer (without --model / --like).")
@click.option("--top-k", type=click.IntRange(min=1), help="Experts per token (or for an aggregate without it).")
@click.option("--skew", help="Log-normal σ of the per-layer selection shares: one value, or one per layer "
                             "(comma-separated); 0 = uniform.")
@click.option("--temporal", type=float, help="Chance in [0, 1] that each of the previous token's experts is reused.")
@click.option("--affinity", type=float, help="Weight in [0, 1] of the token's type at every layer (inter-layer "
                                             "affinity).")
@click.option("--popularity", type=click.Choice(["measured", "lognormal"]), default="measured", show_default=True,
              help="With --like: per-expert measured shares, or the fitted log-normal σ per layer.")
@click.option("--sequences", type=click.IntRange(min=1),
              help=f"Sequences [default: --like: the target's tokens (at most 32,768); else {DEFAULT_TOKENS} "
                   f"tokens].")
@click.option("--prompt-tokens", type=click.IntRange(min=0), help="Prefill tokens per sequence [default: 48].")
@click.option("--output-tokens", type=click.IntRange(min=0), help="Decode tokens per sequence [default: 16].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random draw.")
@click.option("--drift", is_flag=True, help="Routing drift: relabel the experts of the second half of the sequences "
              "(one random permutation per layer, from --seed), so the hot experts change halfway, as when "
              "the task shifts.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="Trace file to write (.npz).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@common_options
def synth_cmd(like: Path | None, task: str | None, model_name: str | None, layers: int | None, experts: int | None,
              top_k: int | None, skew: str | None, temporal: float | None, affinity: float | None, popularity: str,
              sequences: int | None, prompt_tokens: int | None, output_tokens: int | None, seed: int,
              drift: bool, out_path: Path, force: bool) -> None:
    """Write a synthetic routing trace: calibrated to real data, a model's default, or explicit knobs.

    \b
    --like FILE   fit the knobs to a trace (frequency per layer, LRU hit rate at 2K slots,
                  next-layer predictability) or to an aggregate (frequency; affinity from
                  cross-layer counts when present) and print target vs achieved
    --model NAME  the model's default workload (knobs calibrated on its family's public
                  routing data; `planner trace synth --model NAME --json` shows the provenance)
    otherwise     --layers, --experts and --top-k with any knobs

    Knob options override the calibrated or default values. The same options and seed
    always give the same file. --drift makes the hot experts change halfway (the second
    half of the sequences relabelled per layer): replay it with `planner sweep` knobs
    `rebalance_every` / `reroute` to see what run-time EP balancing buys.
    """
    out = get_output()
    for key, value in (("--temporal", temporal), ("--affinity", affinity)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise InputError("out of range", key=key, value=value, expected="a number in [0, 1]",
                             fix=f"pass e.g. {key} 0.2")
    if out_path.suffix.lower() != ".npz":
        raise InputError("the output must be a .npz file", key="--out", value=str(out_path),
                         expected="a name ending in .npz", fix=f"write to {out_path.with_suffix('.npz')}")
    if out_path.is_dir():
        raise InputError("output path is a directory", file=out_path, expected="a file name such as synth.npz",
                         fix="name a file inside it, e.g. --out DIR/synth.npz")
    if out_path.exists() and not force:
        raise InputError("output file exists", file=out_path, fix="pass --force to overwrite it, or choose another --out")
    spec = load_model(model_name) if model_name else None
    shape = {k: v for k, v in (("prompt_tokens", prompt_tokens), ("output_tokens", output_tokens)) if v is not None}
    data: dict[str, Any] = {}
    report: CalibrationReport | None = None
    if like is not None:
        for key, value in (("--layers", layers), ("--experts", experts)):
            if value is not None:
                raise InputError(f"{key} cannot be combined with --like", key=key, value=value,
                                 expected="the shape of the --like data", fix=f"drop {key} (or --like)")
        target = load_workload(like, task, top_k=top_k)
        w, report = calibrate(target, model=spec, prompt_tokens=shape.get("prompt_tokens", 48),
                              output_tokens=shape.get("output_tokens", 16), num_sequences=sequences, seed=seed,
                              popularity=popularity, top_k=top_k)
        data["calibration"] = report.to_dict()
    elif spec is not None:
        for key, value in (("--layers", layers), ("--experts", experts), ("--top-k", top_k)):
            if value is not None:
                raise InputError(f"{key} cannot be combined with --model", key=key, value=value,
                                 expected="the model's own shape", fix=f"drop {key} (or --model)")
        w = default_knobs(spec, seed=seed)
        P = shape.get("prompt_tokens", w.prompt_tokens) + shape.get("output_tokens", w.output_tokens)
        w = w.with_(**shape, num_sequences=sequences or max(1, -(-DEFAULT_TOKENS // max(1, P))))
        defaults = defaults_for(spec)
        data["defaults"] = {"file": defaults.path.name, "family": defaults.family, **defaults.provenance}
    else:
        missing = [k for k, v in (("--layers", layers), ("--experts", experts), ("--top-k", top_k)) if v is None]
        if missing:
            raise InputError("no shape for the synthetic trace", key=missing[0],
                             expected="--like FILE, --model PRESET, or all of --layers, --experts, --top-k",
                             fix="pass e.g. --model mixtral-8x7b, or --layers 32 --experts 8 --top-k 2")
        P = shape.get("prompt_tokens", 48) + shape.get("output_tokens", 16)
        w = SyntheticWorkload(num_layers=layers, num_experts=experts, top_k=top_k, seed=seed,
                              prompt_tokens=shape.get("prompt_tokens", 48), output_tokens=shape.get("output_tokens", 16),
                              num_sequences=sequences or max(1, -(-DEFAULT_TOKENS // max(1, P))))
    overrides: dict[str, Any] = {}
    if skew is not None:
        overrides["skew"] = _parse_skew(skew, w.num_layers)
        overrides["popularity"] = None
    if temporal is not None:
        overrides["temporal"] = temporal
    if affinity is not None:
        overrides["affinity"] = affinity
    if overrides:
        w = w.with_(**overrides)
    trace = generate(w)
    if drift:
        if len(trace.seq_lens) < 2:
            raise InputError("drift needs at least two sequences", key="--sequences", value=len(trace.seq_lens),
                             fix="pass --sequences 2 or more")
        trace = drift_trace(trace, seed=seed)
    save_trace(trace, out_path)
    data = {"written": str(out_path), "tokens": trace.num_tokens, "sequences": int(len(trace.seq_lens)),
            "prompt_tokens": w.prompt_tokens, "output_tokens": w.output_tokens, "moe_layers": trace.num_layers,
            "experts": trace.num_experts, "top_k": trace.top_k, "model": trace.model,
            "knobs": {"temporal": w.temporal, "affinity": w.affinity,
                      "skew": "measured per expert" if w.popularity is not None else w.skew, "seed": w.seed},
            "overridden": sorted(k for k in overrides if k != "popularity"),
            "drift": trace.meta.get("drift"), **data}
    out.emit(data, lambda console: _render_synth(console, data, report))


def _parse_skew(text: str, num_layers: int) -> float | tuple[float, ...]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError("skew must be numbers", key="--skew", value=text,
                         expected="one σ, or one per layer, comma-separated", fix="pass e.g. --skew 0.7") from None
    if len(values) not in (1, num_layers):
        raise InputError("wrong number of skew values", key="--skew", value=len(values),
                         expected=f"1 or {num_layers} (one per MoE layer)", fix="pass one σ for all layers")
    return values[0] if len(values) == 1 else tuple(values)


# ----------------------------------------------------------------------------- rendering


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


def _fmt2(x: Any) -> str:
    return "-" if x is None else f"{x:.2f}"


def _rates(values: dict[str, float], sizes: list[int]) -> str:
    """Hit rates at several sizes in one cell: '.21 .38 .60 .72'."""
    return " ".join(f"{values[str(c)]:.2f}".lstrip("0") if values[str(c)] < 1 else "1.0" for c in sizes)


def _render_trace(console: Console, data: dict[str, Any], sizes: list[int]) -> None:
    policies = [p for p in POLICIES if p in data["curves"]]
    conv = data["conventions"]
    table = Table(title=f"{data['model'] or 'trace'}: {data['tokens']} tokens, {data['moe_layers']} MoE layers, "
                        f"top-{data['top_k']} of {data['experts']} experts; hit rate with "
                        f"{' / '.join(map(str, sizes))} slots per layer", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer\n(hidden)", justify="right", no_wrap=True)
    table.add_column("entropy\nbits", justify="right", no_wrap=True)
    table.add_column("prev\nreuse", justify="right", no_wrap=True)
    table.add_column("next\nrecall", justify="right", no_wrap=True)
    for p in policies:
        table.add_column(p, justify="right", no_wrap=True)
    for row in data["layers"]:
        table.add_row(f"{row['moe_layer']} ({row['hidden_layer']})", f"{row['entropy_bits']:.2f}",
                      _fmt2(row["previous_token_overlap"]), _fmt2(row["next_layer_recall"]),
                      *[_rates(row[p], sizes) for p in policies])
    mean = data["mean_over_layers"]
    table.add_section()
    table.add_row("mean", f"{mean['entropy_bits']:.2f}", _fmt2(mean["previous_token_overlap"]),
                  _fmt2(mean["next_layer_recall"]), *[_rates(mean[p], sizes) for p in policies], style="bold")
    console.print(table)
    console.print(f"hit rate = hits / (token, layer, expert) accesses, one cache of c slots per layer; "
                  f"{'token as a set' if conv['token_as_set'] else 'rank order within a token'}; "
                  f"{'reset' if conv['reset_per_sequence'] else 'no reset'} between sequences. next recall: "
                  f"top-{conv['predictor_top_k']} from transition counts, {conv['predictor_test_tokens']} held-out "
                  f"tokens (popularity baseline {_fmt(mean['next_layer_baseline_recall'])}). segment best hit rate "
                  f"(s={conv['segment_len']}): {_rates(mean['segment_best'], sizes)}; per layer in --json / --report.")
    if "report" in data:
        console.print(f"report: {data['report']['dir']}")


def _render_aggregate(console: Console, data: dict[str, Any], sizes: list[int]) -> None:
    console.print(f"{data['model'] or 'aggregate'}: counts for {data['layers_with_counts']} layers, "
                  f"{data['experts']} experts (aggregate only: LRU/LFU/Belady need a per-token trace)")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("layer", justify="right")
    table.add_column("entropy\nbits", justify="right")
    table.add_column("top\nshare", justify="right")
    table.add_column(f"static\n{' / '.join(map(str, sizes))}", justify="right")
    for row in data["layers"]:
        table.add_row(str(row["moe_layer"]), f"{row['entropy_bits']:.2f}", _fmt(row["top_expert_share"]),
                      _rates(row["static"], sizes))
    console.print(table)
    for pair in data["layer_pairs"]:
        a, b = pair["layers"]
        console.print(f"layers {a} -> {b}: normalised mutual information {pair['normalised_mutual_information']:.3f}")
    if "report" in data:
        console.print(f"report: {data['report']['dir']}")


def _render_synth(console: Console, data: dict[str, Any], report: CalibrationReport | None) -> None:
    knobs = data["knobs"]
    skew = knobs["skew"]
    if isinstance(skew, (list, tuple)):
        skew = f"{min(skew):.2f}..{max(skew):.2f} per layer"
    console.print(f"wrote {data['written']}: {data['tokens']} tokens ({data['sequences']} sequences of "
                  f"{data['prompt_tokens']} + {data['output_tokens']}), {data['moe_layers']} MoE layers, "
                  f"top-{data['top_k']} of {data['experts']} experts")
    console.print(f"knobs: temporal {knobs['temporal']:.3f}, affinity {knobs['affinity']:.3f}, skew {skew}, "
                  f"seed {knobs['seed']}" + (f" (from the command line: {', '.join(data['overridden'])})"
                                             if data["overridden"] else ""))
    if "defaults" in data:
        d = data["defaults"]
        console.print(f"default workload {d['file']}: {d.get('calibrated_from', '')}")
        for note in d.get("notes", []):
            console.print(f"  note: {note}")
    if report is not None:
        source = report.source if len(report.source) <= 100 else report.source[:97] + "..."
        console.print(f"calibrated to {source} ({report.kind}, {report.search_steps} search steps, achieved "
                      f"figures from {report.achieved_tokens} tokens):")
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for name, justify in (("figure", "left"), ("target", "right"), ("achieved", "right"), ("", "left")):
            table.add_column(name, justify=justify, no_wrap=True)
        for f in report.figures:
            how = f"fitted ({f.knob})" if f.role == "fitted" else f.role
            table.add_row(f.name, _fmt(f.target), _fmt(f.achieved), how)
        console.print(table)
        for note in report.notes:
            console.print(f"note: {note}")
        if data["overridden"]:
            console.print("note: the figures are those of the calibrated knobs, before the command-line overrides")


# ----------------------------------------------------------------------------- reports


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(to_jsonable(data), indent=1) + "\n")


def _write_trace_report(stats: WorkloadStats, data: dict[str, Any], report: Path, sizes: list[int]) -> dict[str, Any]:
    from profiles.workload.plots import plot_frequency_heatmap, plot_hit_rate_curves

    report.mkdir(parents=True, exist_ok=True)
    files = {"json": report / "stats.json", "arrays": report / "stats.npz",
             "hit_rate_png": report / "hit_rate_curves.png", "frequency_png": report / "frequency_heatmap.png"}
    arrays = {"frequency": stats.frequency, "coactivation": stats.coactivation, "transitions": stats.transitions,
              "segment_hit_rate": stats.segment_hit_rate, "next_layer_recall": stats.predictability.recall,
              **{f"curve_{p}": c for p, c in stats.hit_rates.curves.items()}}
    if stats.gate_mass is not None:
        arrays["gate_mass"] = stats.gate_mass
    with open(files["arrays"], "wb") as fh:
        np.savez_compressed(fh, **arrays)
    title = f"{stats.model or 'trace'} ({stats.num_tokens} tokens)"
    plot_hit_rate_curves(dict(stats.hit_rates.curves), files["hit_rate_png"], title=title, cache_sizes=sizes)
    plot_frequency_heatmap(stats.frequency, files["frequency_png"], title=title, layer_labels=stats.layer_map)
    meta = {"dir": str(report), **{k: str(v) for k, v in files.items()}}
    _write_json(files["json"], {**data, "report": meta})
    return meta


def _write_aggregate_report(agg: AggregateWorkload, data: dict[str, Any], report: Path,
                            sizes: list[int]) -> dict[str, Any]:
    from profiles.workload.plots import plot_frequency_heatmap, plot_hit_rate_curves

    report.mkdir(parents=True, exist_ok=True)
    files = {"json": report / "stats.json", "hit_rate_png": report / "hit_rate_curves.png",
             "frequency_png": report / "frequency_heatmap.png"}
    title = f"{agg.model or 'aggregate'}"
    plot_hit_rate_curves({"static": agg.static_curve()}, files["hit_rate_png"], title=title, cache_sizes=sizes)
    plot_frequency_heatmap(agg.expert_counts, files["frequency_png"], title=title, layer_labels=agg.layer_ids)
    meta = {"dir": str(report), **{k: str(v) for k, v in files.items()}}
    _write_json(files["json"], {**data, "report": meta})
    return meta


from .trace_record import record  # noqa: E402  (a command of this group, in its own module)

trace.add_command(record)
