"""`planner optimize`: the main job."""

from __future__ import annotations

import json
from pathlib import Path

import click

from profiles.errors import InputError
from profiles.units import format_time

from ..costs import DEFAULT_FORMATS, QUANT_ERROR
from ..optimize import DEFAULT_HARDWARE, DEFAULT_MODEL, OptimizeRequest, optimize
from ..output import get_output
from ._common import common_options

__all__ = ["optimize_cmd"]


def _parse_formats(value: str) -> tuple[str, ...]:
    from profiles.formats import get_format

    formats = tuple(f.strip() for f in value.split(",") if f.strip())
    if not formats:
        raise InputError("no formats given", key="--formats", value=value, expected="e.g. bf16,int8,int4",
                         fix="list one or more number formats")
    for fm in formats:
        try:
            get_format(fm)
        except InputError as exc:
            raise InputError(exc.message, key="--formats", value=fm, expected=exc.expected,
                             fix="use known formats, comma-separated") from None
    return formats


def _parse_critical(value: str | None, num_layers: int) -> tuple[tuple[int, ...], ...]:
    if not value:
        return ()
    per_layer: list[set[int]] = [set() for _ in range(num_layers)]
    for item in value.split(","):
        try:
            layer, expert = (int(x) for x in item.strip().split(":"))
            per_layer[layer].add(expert)
        except (ValueError, IndexError):
            raise InputError("invalid critical expert", key="--critical", value=item.strip(),
                             expected=f"MOE_LAYER:EXPERT pairs with MOE_LAYER < {num_layers}",
                             fix="write e.g. --critical 0:3,1:17") from None
    return tuple(tuple(sorted(s)) for s in per_layer)


def _load_trace(path: str, task: str | None):
    from profiles.workload.importers import load_workload
    from profiles.workload.trace import Trace

    workload = load_workload(path, task)
    if not isinstance(workload, Trace):
        raise InputError("an aggregate workload has no per-token routing to measure cache hit rates on", file=path,
                         fix=f"synthesise a calibrated trace first: planner trace synth --like {path} --out trace.npz")
    return workload


@click.command("optimize")
@click.option("--hardware", "-H", default=DEFAULT_HARDWARE, show_default=True,
              help="Hardware profile: a bundled name (planner profiles list) or a YAML file.")
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
              help="Model: a bundled preset (planner models list), an HF config.json or its directory.")
@click.option("--trace", "-t", "trace_path", type=click.Path(dir_okay=False),
              help="Routing trace (.npz; planner trace record/synth/import). Default: the model's default workload.")
@click.option("--task", help="Task inside a multi-task trace file (e.g. ESFT's summary).")
@click.option("--engine", "-e", default=None,
              help="Engine profile that runs the plan: a bundled name (planner engines list) or a YAML file. "
              "Plans only what it can run, priced as it runs it. Default: bundle (this project's runtime).")
@click.option("--objective", type=click.Choice(["latency", "throughput", "cost"]), default="latency",
              show_default=True, help="latency: batch-1 decode time per token; throughput: tok/s at --batch; "
              "cost: $ per million tokens under --slo-tpot (needs prices in the profile).")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Decode batch size for --objective throughput.")
@click.option("--context", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Context tokens per sequence the KV cache must hold.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt length used to predict TTFT.")
@click.option("--quality-budget", type=click.FloatRange(min=0), default=None,
              help="Largest importance-weighted quantisation error allowed. Default: that of uniform int4 "
              f"({QUANT_ERROR['int4']}); uniform int8 is {QUANT_ERROR['int8']}.")
@click.option("--formats", default=",".join(DEFAULT_FORMATS), show_default=True,
              help="Number formats experts and dense weights may use.")
@click.option("--critical", help="Experts kept at full precision, as MOE_LAYER:EXPERT pairs (e.g. 0:3,5:17).")
@click.option("--slo-tpot", type=click.FloatRange(min=0, min_open=True), default=0.2, show_default=True,
              help="Cost objective: slowest acceptable time per output token, seconds.")
@click.option("--solver", type=click.Choice(["highs", "cbc"]), default="highs", show_default=True,
              help="MILP solver (through PuLP).")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Solver time limit per solve, seconds.")
@click.option("--gap", type=click.FloatRange(min=0, max=1), default=0.001, show_default=True,
              help="Relative optimality gap at which the solver may stop.")
@click.option("--compare", is_flag=True, help="Also show every baseline's prediction and the speed-up over it "
              "(--parallel ep: EPLB global/hierarchical, linear and round-robin placements).")
@click.option("--parallel", type=click.Choice(["auto", "ep", "offload"]), default="auto", show_default=True,
              help="ep: expert parallelism over every GPU of the profile (which GPU owns which expert, which "
              "experts get replicas, straggler load and all-to-all traffic; --objective, --quality-budget and "
              "--critical do not apply). offload: one GPU plus host memory and disks. auto: ep when the profile "
              "has two or more GPUs (equal per node) and the experts fit them, else offload.")
@click.option("--redundant-experts", type=click.IntRange(min=0), default=None,
              help="ep: redundant physical experts per MoE layer; experts + redundant must divide by the GPU "
              "count. Default: the smallest count >= experts/8 that does.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write plan.json here.")
@click.option("--report", type=click.Path(file_okay=False), help="Write a Markdown report with PNG plots here.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@common_options
def optimize_cmd(hardware, model, trace_path, task, engine, objective, batch, context, prompt_tokens, quality_budget,
                 formats, critical, slo_tpot, solver, time_limit, gap, compare, parallel, redundant_experts, out,
                 report, force) -> None:
    """Plan where every expert lives, at which bitwidth, how it runs, and each layer's cache.

    With no options it plans Mixtral-8x7B on the RTX 4090 desktop with its default workload.

    \b
    Examples:
      planner optimize
      planner optimize -H cpu-server-4090 -m deepseek-v3 --compare --out plan.json
      planner optimize --engine llama.cpp --formats bf16,q8_0,q4_k
      planner optimize -m qwen3-30b-a3b --objective throughput --batch 32 --report report/
      planner optimize -t trace.npz --quality-budget 0.006 --formats bf16,int8,int4
      planner optimize -H cluster-h100-2node -m deepseek-v3 --compare --out ep-plan.json
    """
    from profiles.models import load_model

    out_path = Path(out) if out else None
    if out_path is not None and out_path.exists() and not force:
        raise InputError("output file exists", file=out_path, fix="pass --force to overwrite it, or choose another path")
    from ..cluster import cluster_applies, run_cluster_cli

    if cluster_applies(parallel, hardware, model, _parse_formats(formats), batch, context):
        return run_cluster_cli(hardware=hardware, model=model, trace=_load_trace(trace_path, task) if trace_path else None,
                               redundant_experts=redundant_experts, formats=_parse_formats(formats), batch_size=batch,
                               context_tokens=context, time_limit_s=time_limit, compare=compare, out_path=out_path,
                               report=report)
    spec = load_model(model)
    request = OptimizeRequest(
        hardware=hardware, model=model, trace=_load_trace(trace_path, task) if trace_path else None,
        objective=objective, batch_size=batch, context_tokens=context, prompt_tokens=prompt_tokens,
        quality_budget=quality_budget, formats=_parse_formats(formats), solver=solver, time_limit_s=time_limit,
        gap=gap, tpot_slo_s=slo_tpot, critical=_parse_critical(critical, spec.num_moe_layers), engine=engine)
    output = get_output()
    with output.log.status("planning..."):
        result = optimize(request)
    from ..report import render_summary, summary_data, write_report

    written = []
    if out_path is not None:
        written.append(result.plan.save(out_path))
    if report:
        written += [p for p in write_report(result, Path(report)) if p.resolve() not in {w.resolve() for w in written}]
    data = {"summary": summary_data(result, compare), "files": [str(p) for p in written]}

    def render(console):
        render_summary(result, console, compare=compare)
        t = result.timings_s
        console.print(f"planned in {format_time(t['total_s'])} (statistics {format_time(t['stats_s'])}, "
                      f"model {format_time(t['build_s'])}, solve {format_time(t['solve_s'])})", highlight=False)
        for path in written:
            console.print(f"wrote {path}", highlight=False)

    if output.json_mode:
        data["plan"] = json.loads(result.plan.to_json())
    output.emit(data, render)
