"""`planner simulate`: replay a workload under a plan in the discrete-event simulator."""

from __future__ import annotations

import json
from pathlib import Path

import click

from profiles.errors import InputError
from profiles.limits import MAX_BATCH, MAX_SIM_REQUESTS
from profiles.units import format_time
from simulator.policies import EVICTION, MISS, PREFETCH
from simulator.schedulers import SCHEDULER

from ..output import get_output
from ._common import FiniteFloat, check_output_path, common_options, writing

__all__ = ["plan_hardware", "plan_inputs", "simulate_cmd"]


def plan_hardware(plan, hardware: str | None):
    """``(profile, hardware)``: the given profile, else the plan's own (a bundled name)."""
    from profiles.hardware import load_profile

    try:
        return load_profile(hardware or plan.inputs.hardware)
    except InputError:
        if hardware:
            raise
        raise InputError("the plan's hardware profile is not a bundled one", key="inputs.hardware",
                         value=plan.inputs.hardware, fix="pass --hardware with the profile's YAML file") from None


def plan_inputs(plan, hardware: str | None, model: str | None, trace_path: str | None, task: str | None,
                plan_path: str | None = None):
    """The hardware, model and workload to simulate ``plan`` on: the given ones, else the plan's own.

    The plan is checked against the hardware and model (:func:`planner.plan_check.check_plan`)
    before the workload is loaded. Returns ``(hardware, model, trace, warnings)``; a warning
    says when a given input is not the one the plan was made from (its digest differs).
    """
    from profiles.models import load_model

    from ..optimize import _default_trace
    from ..plan_digest import digest, workload_digest
    from ..plan_check import check_plan
    from .optimize_inputs import load_trace

    warnings = []
    profile, hw = plan_hardware(plan, hardware)
    if digest(profile.model_dump(mode="json")) != plan.inputs.hardware_digest:
        warnings.append(f"hardware {hw.name} differs from the profile the plan was made for")
    spec = load_model(model or plan.inputs.model)
    warnings += check_plan(plan, hw, spec, file=plan_path)
    trace = load_trace(trace_path, task)
    if trace is None:
        trace = _default_trace(spec)
    if (trace.num_layers, trace.num_experts) != (len(plan.layers), spec.num_experts):
        raise InputError("the trace does not fit the plan's model", file=trace_path, key="expert_ids",
                         value=f"{trace.num_layers} MoE layers x {trace.num_experts} experts",
                         expected=f"{len(plan.layers)} x {spec.num_experts} ({spec.name})",
                         fix="simulate with a trace of the plan's model")
    if workload_digest(trace) != plan.inputs.workload_digest:
        warnings.append(f"workload {trace.source or trace_path} is not the one the plan was made from")
    return hw, spec, trace, warnings


@click.command("simulate")
@click.option("--plan", "-p", "plan_path", required=True, type=click.Path(dir_okay=False),
              help="plan.json written by planner optimize.")
@click.option("--hardware", "-H", help="Hardware profile (default: the plan's).")
@click.option("--model", "-m", help="Model (default: the plan's).")
@click.option("--trace", "-t", "trace_path", type=click.Path(dir_okay=False),
              help="Routing trace to replay (default: the model's default workload).")
@click.option("--task", help="Task inside a multi-task trace file.")
@click.option("--requests", "-n", type=click.IntRange(min=1, max=MAX_SIM_REQUESTS), help="Requests to replay (default: every "
              "sequence of the trace; more wrap around).")
@click.option("--arrival-rate", type=FiniteFloat(min=0, min_open=True),
              help="Poisson arrivals, requests per second (default: all at t = 0).")
@click.option("--batch", type=click.IntRange(min=1, max=MAX_BATCH), help="Most requests running at once (default: the plan's).")
@click.option("--scheduler", type=click.Choice(sorted(SCHEDULER)),
              help="Scheduler: continuous (default: admit as room frees, prefill then decode), static (whole "
              "batches), vllm (prefill first), sarathi (chunked prefill, --chunk-tokens per step).")
@click.option("--batching", type=click.Choice(["continuous", "static"]), hidden=True, help="Old name of --scheduler.")
@click.option("--chunk-tokens", type=click.IntRange(min=1),
              help="sarathi: tokens per step (default 512); vllm: most prompt tokens a prefill step admits.")
@click.option("--kv-blocks", type=click.IntRange(min=1), help="KV cache size in the engine's blocks (default: the "
              "memory the plan leaves on the compute device); small values force preemption.")
@click.option("--kv-memory", help="KV cache size in bytes, e.g. 2GiB (instead of --kv-blocks).")
@click.option("--preemption", type=click.Choice(["recompute", "swap"]),
              help="When KV blocks run out: recompute or swap to host (default: the engine's).")
@click.option("--eviction", type=click.Choice(sorted(EVICTION)),
              help="Cache eviction: lru, lfu, score, static, belady (default: the plan's).")
@click.option("--prefetch", type=click.Choice(sorted(PREFETCH)),
              help="Prefetch: none, next-layer, transition, oracle (default: the plan's).")
@click.option("--prefetch-accuracy", type=FiniteFloat(0, 1),
              help="next-layer predictor accuracy (default: the workload's next-layer predictability).")
@click.option("--miss", type=click.Choice(sorted(MISS)), default="plan", show_default=True,
              help="Miss handling: plan, fiddler (CPU when faster), hobbit (low-bit copy for low-gate experts).")
@click.option("--kv-context", type=click.Choice(["actual", "plan"]), default="actual", show_default=True,
              help="KV cache read per step: each request's real context, or the plan's context length.")
@click.option("--reroute", is_flag=True, help="Expert-parallel plans: send each expert call to its expert's copy on "
              "the GPU with the least work so far in the layer (as LLEP does) instead of the engine's static copy.")
@click.option("--rebalance-every", type=click.IntRange(min=1), help="Expert-parallel plans: re-place every layer's "
              "experts every N decode steps with EPLB from the routing seen since (the moved bytes cross the network).")
@click.option("--dram-contention/--no-dram-contention", default=None,
              help="Host DRAM as one port shared by the CPU's expert reads and the copies to the GPU (each layer "
              "lasts at least their bytes / DRAM bandwidth; every layer is played out with events, slower). "
              "Default: as the plan was priced (planner optimize --dram-contention records it).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write the metrics JSON here.")
@click.option("--trace-out", type=click.Path(dir_okay=False),
              help="Write a Chrome/Perfetto trace of every kernel and transfer here.")
@click.option("--plots", type=click.Path(file_okay=False), help="Write utilisation and per-layer PNGs here.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@common_options
def simulate_cmd(plan_path, hardware, model, trace_path, task, requests, arrival_rate, batch, scheduler, batching,
                 chunk_tokens, kv_blocks, kv_memory, preemption, eviction, prefetch, prefetch_accuracy, miss,
                 kv_context, reroute, rebalance_every, dram_contention, seed, out, trace_out, plots, force) -> None:
    """Replay a workload on the hardware under a plan: tok/s, TTFT/TPOT, hit rates, link bytes.

    \b
    Examples:
      planner optimize --out plan.json && planner simulate --plan plan.json
      planner simulate -p plan.json --requests 64 --arrival-rate 2 --batch 8
      planner simulate -p plan.json --eviction belady --prefetch oracle --trace-out trace.json
      planner simulate -p plan.json --requests 64 --scheduler sarathi --chunk-tokens 256 --kv-blocks 400
      planner simulate -p ep-plan.json --batch 32 --reroute --rebalance-every 32
      planner simulate -p plan.json --dram-contention   # what host DRAM contention costs this plan
    """
    from simulator.engine import SimConfig, simulate

    from ..plan import load_plan

    for path, flag in ((out, "--out"), (trace_out, "--trace-out")):
        check_output_path(path, flag, force=force)
    check_output_path(plots, "--plots", directory=True)
    kv_bytes = None
    if kv_memory is not None:
        from profiles.units import parse_size

        if kv_blocks is not None:
            raise InputError("give the KV cache's size once", key="--kv-memory", value=kv_memory,
                             fix="pass --kv-blocks or --kv-memory, not both")
        try:
            kv_bytes = parse_size(kv_memory)
        except InputError as exc:
            raise InputError(exc.message, key="--kv-memory", value=kv_memory, expected="a size such as 2GiB",
                             fix="pass e.g. --kv-memory 2GiB") from None
    plan = load_plan(plan_path)
    if reroute or rebalance_every is not None:
        from exporters.engines.sglang import is_expert_parallel

        if not is_expert_parallel(plan):
            flag = "--reroute" if reroute else "--rebalance-every"
            raise InputError(f"{flag} changes where an expert-parallel plan sends tokens; this plan is not one",
                             file=plan_path, key=flag, fix="drop it, or plan with --parallel ep")
    hw, spec, trace, warnings = plan_inputs(plan, hardware, model, trace_path, task, plan_path)
    config = SimConfig(batch_size=batch, requests=requests, arrival_rate_per_s=arrival_rate,
                       batching=scheduler or batching or "continuous", chunk_tokens=chunk_tokens, kv_blocks=kv_blocks,
                       kv_bytes=kv_bytes, preemption=preemption, eviction=eviction, prefetch=prefetch, miss=miss,
                       prefetch_accuracy=prefetch_accuracy,
                       kv_context=kv_context, seed=seed, record=bool(trace_out), ep_reroute=reroute,
                       ep_rebalance_every=rebalance_every, dram_contention=dram_contention)
    if eviction is not None and not any(layer.cache_slots for layer in plan.layers):
        warnings.append(f"--eviction {eviction} changes nothing: the plan has no expert-cache slots")
    output = get_output()
    for w in warnings:
        output.log.print(f"warning: {w}", highlight=False)
    with output.log.status("simulating..."):
        report = simulate(plan, hw, spec, trace, config)
    written = []
    if out:
        with writing(out, "--out"):
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(report.to_json(), encoding="utf-8")
        written.append(out)
    if trace_out:
        with writing(trace_out, "--trace-out"):
            Path(trace_out).parent.mkdir(parents=True, exist_ok=True)
            written.append(str(report.write_chrome_trace(trace_out)))
    if plots:
        with writing(plots, "--plots"):
            written += [str(p) for p in report.write_plots(plots)]
    m, serve = report.metrics, report.serving

    def render(console):
        from rich.table import Table

        table = Table(title=f"Simulated {plan.inputs.model} on {hw.name}", show_header=True)
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("planner predicted", justify="right")
        pred = plan.predicted
        table.add_row("tokens/s", f"{m['tokens_per_s']:.2f}", "")
        for key, label, p in (("ttft_s", "TTFT", pred.get("ttft_s")), ("tpot_s", "TPOT", pred.get("tpot_s")),
                              ("latency_s", "request latency", None)):
            if m[key]:
                table.add_row(f"{label} p50 / p90 / p99",
                              " / ".join(format_time(m[key][q]) for q in ("p50", "p90", "p99")),
                              format_time(p) if p else "")
        predicted_hits = pred.get("expert_hit_rate")  # expert-parallel plans predict no cache
        table.add_row("expert hit rate", f"{m['expert_hit_rate']:.3f}",
                      f"{predicted_hits:.3f}" if predicted_hits is not None else "")
        for tier, b in m["bytes_moved"].items():
            table.add_row(f"bytes from {tier}", f"{b / 2**30:.2f} GiB", "")
        table.add_row("requests / output tokens", f"{m['requests']} / {m['output_tokens']}", "")
        table.add_row("simulated time", format_time(m["makespan_s"]), "")
        port = next((v for k, v in m["utilisation"].items() if k.endswith(" dram port")), None)
        if port is not None:  # --dram-contention (simulator.dram)
            table.add_row("host DRAM port busy (contention on)", f"{port:.1%}", "")
        if ep := m.get("expert_parallel"):
            loads = ep["max_over_mean_gpu_load"]
            table.add_row("max/mean GPU load (mean over layers)", f"{sum(loads) / max(len(loads), 1):.3f}", "")
            table.add_row("tokens crossing GPUs / nodes",
                          f"{ep['cross_gpu_token_fraction']:.1%} / {ep['cross_node_token_fraction']:.1%}", "")
            if "layer_replacements" in ep:
                table.add_row("EPLB re-placements (moved)",
                              f"{ep['layer_replacements']} ({ep['replacement_bytes'] / 2**30:.3g} GiB)", "")
        kv = serve["kv_cache"]
        if kv["blocks"]:
            table.add_row("KV cache peak / mean use", f"{kv['peak_utilisation']:.0%} / {kv['mean_utilisation']:.0%}"
                          f" of {kv['blocks']:,} x {kv['block_tokens']} tokens", "")
        if kv["preemptions"]:
            how = [f"{kv['recomputed_tokens']:,} tokens recomputed"] if kv["recomputed_tokens"] else []
            if kv["swapped_out_bytes"]:
                how.append(f"{kv['swapped_out_bytes'] / 2**30:.3g} GiB swapped out")
            table.add_row("preemptions", f"{kv['preemptions']} ({', '.join(how)})", "")
        console.print(table)
        ttft = serve["ttft"]
        if ttft["queueing"] and (m["requests"] > (batch or plan.batch_size) or kv["admission_waits"]):
            why = f"at most {batch or plan.batch_size} run at once" if not kv["admission_waits"] else \
                "the KV cache admits fewer at once"
            console.print(f"TTFT includes queueing: all {m['requests']} requests arrive at t = 0 and {why}; "
                          f"waiting is {ttft['queue_share']:.0%} of the mean TTFT, the rest is compute; the planner "
                          "predicts one prompt's prefill (--arrival-rate R replays an open loop)", highlight=False)
        busiest = sorted(m["utilisation"].items(), key=lambda kv: -kv[1])[:4]
        console.print("busiest: " + ", ".join(f"{k} {v:.0%}" for k, v in busiest), highlight=False)
        console.print(f"{m['expert_calls']:,} expert calls simulated in {format_time(report.wall_s)}", highlight=False)
        for path in written:
            console.print(f"wrote {path}", highlight=False)

    output.emit({"metrics": json.loads(report.to_json()), "warnings": warnings, "files": written}, render)
