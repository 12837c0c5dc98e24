"""`planner optimize`: the main job."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import click

from profiles.errors import InputError
from profiles.limits import MAX_BATCH, MAX_CONTEXT_TOKENS, MAX_EXPERTS
from profiles.units import format_time

from ..cluster.request import RANKS
from ..costs import DEFAULT_FORMATS, QUANT_ERROR
from ..optimize import DEFAULT_HARDWARE, DEFAULT_MODEL, OptimizeRequest, optimize
from ..plan import Plan
from ..task import DEFAULT_DROP_BELOW
from ..output import get_output
from ._common import FiniteFloat, Seconds, check_output_path, common_options, writing
from .optimize_inputs import (
    check_requested_planes,
    given_configuration,
    given_options,
    load_quality,
    load_trace,
    parse_critical,
    parse_formats,
    parse_miss_copy,
)

__all__ = ["optimize_cmd"]


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
              "Plans only what it can run, priced as it runs it. Default: bundle (this project's runtime); "
              "sglang for an expert-parallel plan.")
@click.option("--objective", type=click.Choice(["latency", "throughput", "cost", "energy"]), default="latency",
              show_default=True, help="latency: batch-1 decode time per token; throughput: tok/s at --batch (or, "
              "with --slo-tpot/--slo-ttft, at the best batch meeting them); cost: $ per million tokens under "
              "--slo-tpot (needs prices in the profile); energy: joules per token at --batch (the profile's "
              "power_w and idle_power_w: busy seconds at active power, idle power all along, as the simulator "
              "counts it).")
@click.option("--max-watts", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Largest average power of the plan, watts (needs power_w in the profile): planned as energy "
              "per step <= W x step time, which is linear where energy / time is not; any --objective.")
@click.option("--drop-below", type=FiniteFloat(min=0, max=1), is_flag=False, flag_value=DEFAULT_DROP_BELOW,
              default=None, help="Task-specific plan (PreMoe): experts whose frequency on the trace (--trace, --task; "
              "activations per token) is below this may be dropped, the cheapest first, as far as the quality "
              "budget allows (a dropped expert costs its whole importance, frequency x gate); the ILP plans a few "
              f"drop counts and keeps the best. The router picks its top-k among the kept experts. Bare flag: "
              f"{DEFAULT_DROP_BELOW}.")
@click.option("--batch", type=click.IntRange(min=1, max=MAX_BATCH), default=8, show_default=True,
              help="Decode batch size for --objective throughput and energy.")
@click.option("--context", type=click.IntRange(min=1, max=MAX_CONTEXT_TOKENS), default=4096, show_default=True,
              help="Context tokens per sequence the KV cache must hold.")
@click.option("--prompt-tokens", type=click.IntRange(min=1, max=MAX_CONTEXT_TOKENS), default=512, show_default=True,
              help="Prompt length used to predict TTFT.")
@click.option("--kv-cache", type=click.Choice(["auto", "device", "host"]), default="auto", show_default=True,
              help="Where the KV cache lives. auto: a decision of the ILP where the engine can keep it in host "
              "memory (llama.cpp --no-kv-offload: attention on the CPU): host frees its bytes on the GPU for "
              "resident experts and pays the CPU's attention every step, so it wins at long contexts and large "
              "batches; the plan records kv_cache and the llama.cpp export adds the flag. device, host: forced.")
@click.option("--dram-contention", is_flag=True,
              help="Price host DRAM as one port that the CPU's expert reads and the copies to the GPU share (a "
              "layer lasts at least their bytes / DRAM bandwidth), as desktop DRAM limits hybrid plans; recorded "
              "in plan.json, so simulate and export price the same. Default off: the CPU and the link price apart.")
@click.option("--nested", is_flag=True,
              help="Offer nested experts: int8 stored as two int4 planes, int4 as two 2-bit planes (where --formats "
              "lists the format and its half: int8 with int4, int4 with int2): per layer the hot experts hold both planes on the GPU, the next fetch their low plane from "
              "host memory at each use, the cold ones run on their high plane alone at int4 (int2) quality (plan.json "
              "planes); engines whose profile says nested.")
@click.option("--miss-copy", "miss_copy", default=None, metavar="FORMAT:GATE",
              help="Offer low-bit copies (e.g. int4:0.3): per layer the ILP may keep an int4 (or int2) copy of its "
              "fetch experts in host memory, and a miss whose gate weight is below GATE loads the copy, which later "
              "hits run (plan.json miss_copy; priced in memory, link time and quality on the trace's gate weights).")
@click.option("--quality-budget", type=FiniteFloat(min=0), default=None,
              help="Largest importance-weighted quantisation error allowed. Default: that of uniform int4 "
              f"({QUANT_ERROR['int4']}); uniform int8 is {QUANT_ERROR['int8']}.")
@click.option("--formats", default=",".join(DEFAULT_FORMATS), show_default=True,
              help="Number formats experts and dense weights may use.")
@click.option("--critical", help="Experts kept at full precision, as MOE_LAYER:EXPERT pairs (e.g. 0:3,5:17), or "
              "'auto': the super-expert candidates of the --quality file.")
@click.option("--quality", "quality_path", type=click.Path(dir_okay=False),
              help="Measured expert errors (planner quality measure): the quality cost of each expert at each "
              "format is its importance x its measured error instead of one constant per format, and an "
              "expert more sensitive than its frequency rank says may be stored wider than hotter ones.")
@click.option("--slo-tpot", type=Seconds(), default=None,
              help="Slowest acceptable time per output token: seconds, or a time such as 100ms. With --objective throughput (or cost, "
              "default 0.2) the batch size becomes a decision: the batch with the most tok/s that meets the SLOs, "
              "found by an outer search over 1..--max-batch whose every point is an ILP solve, with a certified "
              "bound on any other batch (the plan's solver.batch_search); --batch is then not used.")
@click.option("--slo-ttft", type=Seconds(), default=None,
              help="Slowest acceptable time to first token (--prompt-tokens): seconds, or a time such as 2s; as --slo-tpot, and a "
              "constraint of every solve (the plan's prefill stays within it, at some cost in decode speed); on "
              "the bundle runtime each layer's prompt pass may also copy the most used of the experts decode runs on "
              "the CPU to the GPU and run them there while the CPU runs the rest (plan.json prefill_offload, "
              "prefill_copies), the decode placement unchanged. With --slo-tpot too, the "
              "plan meets TTFT with its prefill sites and TPOT with its decode sites (one residency: a prompt's pass "
              "calls every expert), and the summary prints which each phase runs; llama.cpp's export keeps its op "
              "offload for it, accelerate's is refused.")
@click.option("--max-batch", type=click.IntRange(min=1, max=MAX_BATCH), default=1024, show_default=True,
              help="Largest batch the SLO search considers.")
@click.option("--solver", type=click.Choice(["highs", "cbc"]), default="highs", show_default=True,
              help="MILP solver (through PuLP).")
@click.option("--time-limit", type=FiniteFloat(min=0, min_open=True, max=86400), default=300.0, show_default=True,
              help="Wall-clock safety net per solve, seconds (work limits decide the plan; reaching this is "
              "reported as status 'time limit').")
@click.option("--gap", type=FiniteFloat(min=0, max=1), default=0.001, show_default=True,
              help="Relative optimality gap at which the solver may stop.")
@click.option("--compare", is_flag=True, help="Also show every baseline's prediction and the speed-up over it "
              "(several GPUs: also llama.cpp's layer split with --n-cpu-moe and accelerate's device_map=auto over "
              "them; --parallel ep: EPLB global/hierarchical, linear and round-robin placements).")
@click.option("--parallel", type=click.Choice(["auto", "ep", "pipeline", "offload"]), default="auto", show_default=True,
              help="ep: expert parallelism over every GPU of the profile (which GPU owns which expert, which "
              "experts get replicas, straggler load and all-to-all traffic; --objective does not apply): the experts "
              "take the first --formats entry that meets --quality-budget (the importance-weighted error offload "
              "plans count) and fits the GPUs, --critical experts stay at full precision; when none fits, each GPU's "
              "own experts are offloaded as one node plans them (resident, cached, CPU-run or streamed, per format, "
              "in its memory, its share of host memory and over its own link; --objective throughput at --batch, "
              "a gap for that placement). On GPUs of different speeds (an H100 + A100 cluster) the load "
              "is balanced in time, load / each GPU's expert speed at --batch (--compare adds the speed-aware "
              "EPLB, eplb-speed); the plan reports a lower bound on its traffic and the gap to it (a relaxation "
              "on large clusters, an exact MILP on small ones). pipeline: offloading over every GPU of the node (and its "
              "FPGA-class accelerators, at the formats they state peaks for): each MoE "
              "layer (dense part, resident experts, cache) on one GPU, its offloaded experts fetched over that GPU's "
              "link, activation hops between GPUs priced on the topology; one MIP with a certified gap (formats, "
              "--quality-budget and --critical hold). offload: one GPU plus host memory and disks. auto: ep when the "
              "profile has two or more GPUs (equal per node) whose memory holds the experts within the budget, "
              "else pipeline on a node with two or more GPUs (or a GPU and an accelerator), else offload (the "
              "plan's notes say why).")
@click.option("--redundant-experts", type=click.IntRange(min=0, max=MAX_EXPERTS), default=None,
              help="ep: redundant physical experts per MoE layer; experts + redundant must divide by the GPU "
              "count. Default: the smallest count >= experts/8 that does.")
@click.option("--ranks", type=click.Choice(RANKS), default="engine", show_default=True,
              help="ep: how unequal the GPUs' work may be. even: every GPU the same share of the sequences "
              "(data-parallel attention) and the same expert slots, what SGLang and vLLM run; shares: on GPUs of "
              "different speeds, attention shares by speed (a router in front of the DP ranks must send them); "
              "uneven: also fewer expert slots on slow GPUs; engine: what the plan's engine runs (uneven where its "
              "profile states uneven_ranks, else even).")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write plan.json here.")
@click.option("--report", type=click.Path(file_okay=False), help="Write a Markdown report with PNG plots here.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@given_options
@common_options
def optimize_cmd(hardware, model, trace_path, task, engine, objective, batch, context, prompt_tokens, kv_cache,
                 quality_budget,
                 formats, critical, quality_path, slo_tpot, slo_ttft, max_batch, solver, time_limit, gap, compare,
                 parallel, redundant_experts, ranks, out,
                 report, force, max_watts, drop_below, **given) -> None:
    """Plan where every expert lives, at which bitwidth, how it runs, and each layer's cache.

    With no options it plans Mixtral-8x7B on the RTX 4090 desktop with its default workload.
    --policy prices a given configuration instead (no ILP); --fix-* fix parts of the ILP's plan.

    \b
    Examples:
      planner optimize
      planner optimize -H cpu-server-4090 -m deepseek-v3 --compare --out plan.json
      planner optimize --engine llama.cpp --formats bf16,q8_0,q4_k
      planner optimize -m qwen3-30b-a3b --objective throughput --batch 32 --report report/
      planner optimize -t trace.npz --quality-budget 0.006 --formats bf16,int8,int4
      planner optimize --objective energy --batch 4 --max-watts 300
      planner optimize -t traces.npz --task summary --drop-below 0.005 --out plan.json
      planner optimize -H cluster-h100-2node -m deepseek-v3 --compare --out ep-plan.json
      planner optimize --policy llama.cpp --n-cpu-moe 20 --compare   # price your llama.cpp setup
      planner optimize --policy accelerate --gpu-memory 10GiB --out plan.json
      planner optimize --policy lru-offload --cache-slots 2 --prefetch none --fix-format int4
      planner optimize --fix-cache-slots 0:2,5:4 --fix-resident 2 --fix-home dram --fix-dense-format bf16
    """
    from profiles.models import load_model

    out_path = Path(out) if out else None
    check_output_path(out_path, "--out", force=force)
    check_output_path(report, "--report", directory=True)
    if prompt_tokens > context:
        raise click.BadParameter(f"the prompt ({prompt_tokens} tokens) is longer than the context ({context})",
                                 param_hint="'--prompt-tokens'")
    slo = next((f for f, v in (("--slo-tpot", slo_tpot), ("--slo-ttft", slo_ttft)) if v is not None), None)
    if slo and objective == "latency":
        raise InputError(f"{slo} decides the batch size, and --objective latency plans batch 1", key=slo,
                         value=slo_tpot if slo == "--slo-tpot" else slo_ttft,
                         fix="add --objective throughput (or cost), or drop the SLO")
    from ..cluster import ClusterRequest, parallel_mode

    spec = load_model(model)
    policy, fixes, fixed_formats = given_configuration(given, spec.num_moe_layers)
    candidates = parse_formats(formats)
    candidates += tuple(fm for fm in fixed_formats if fm not in candidates)  # a fixed format is a candidate
    quality = load_quality(quality_path, spec, critical, candidates)
    critical_sets = quality["critical"] if critical == "auto" else parse_critical(critical, spec.num_moe_layers)
    if critical == "auto":  # what the file's super experts pin (none: the plan pins nothing)
        pinned = ", ".join(f"{l}:{e}" for l, experts in enumerate(critical_sets) for e in sorted(experts))
        get_output().log.print(f"critical auto: pinned {pinned} at full precision" if pinned else
                               f"critical auto: {quality_path} flags no super experts; nothing pinned", highlight=False)
    one_gpu = policy is not None or fixes is not None or given["prefetch"] or given["eviction"]
    if one_gpu and parallel in ("ep", "pipeline"):
        raise InputError("--policy, --fix-*, --prefetch and --eviction plan one GPU with offloading", key="--parallel",
                         value=parallel, fix="use --parallel offload (or auto)")
    trace = load_trace(trace_path, task)
    if trace is None and any(critical_sets) and not one_gpu and parallel != "offload":
        from profiles.workload.defaults import default_workload

        trace = default_workload(spec)  # both modes weigh the critical experts on it: load it once
    fallback = ""  # why auto did not choose expert parallelism on a profile it could use
    if not one_gpu:
        ep = ClusterRequest(hardware=hardware, model=model, trace=trace, redundant_experts=redundant_experts,
                            formats=parse_formats(formats), batch_size=batch, context_tokens=context,
                            time_limit_s=time_limit, quality_budget=quality_budget, critical=critical_sets,
                            offload=parallel == "ep", ranks=ranks, **({"engine": engine} if engine else {}))
        use_ep, fallback = parallel_mode("auto" if parallel == "pipeline" else parallel, ep)
        use_ep &= parallel != "pipeline"
        if use_ep and quality_path:
            raise InputError("--quality prices offload plans; expert-parallel plans keep one error per format",
                             key="--quality", value=quality_path, fix="add --parallel offload, or drop --quality")
        if use_ep and slo:
            raise InputError(f"{slo} decides the batch size of offload plans; an expert-parallel plan takes --batch",
                             key=slo, value=slo_tpot if slo == "--slo-tpot" else slo_ttft,
                             fix="add --parallel offload (or pipeline), or drop the SLO and give --batch")
        if use_ep and (objective == "energy" or max_watts is not None or drop_below is not None):
            raise InputError("--objective energy, --max-watts and --drop-below plan one GPU with offloading",
                             key="--parallel",
                             value=parallel, fix="add --parallel offload")
        if use_ep and kv_cache == "host":
            raise InputError("an expert-parallel plan keeps the KV cache on its GPUs", key="--kv-cache", value="host",
                             fix="add --parallel offload, or use --kv-cache auto")
        if use_ep and given["miss_copy"]:
            raise InputError("--miss-copy plans one GPU with offloading; expert-parallel plans hold no copies",
                             key="--miss-copy", value=given["miss_copy"], fix="add --parallel offload, or drop --miss-copy")
        if use_ep and given["nested"]:
            raise InputError("--nested plans one GPU with offloading; expert-parallel plans do not hold planes",
                             key="--nested", fix="add --parallel offload, or drop --nested")
        if use_ep and given["dram_contention"]:
            raise InputError("--dram-contention prices offload plans (one node's host DRAM shared by its CPU and "
                             "copies); expert-parallel plans do not model it", key="--dram-contention",
                             fix="add --parallel offload, or drop --dram-contention")
        if use_ep:
            return _run_cluster(ep, compare=compare, out_path=out_path, report=report)
    if policy is None:  # a given policy plans its own engine's configuration
        check_requested_planes(engine, given["nested"], given["miss_copy"], candidates)
    request = OptimizeRequest(
        hardware=hardware, model=model, trace=trace, objective=objective, batch_size=batch, context_tokens=context,
        prompt_tokens=prompt_tokens, kv_cache=kv_cache, quality_budget=quality_budget, formats=candidates,
        solver=solver,
        time_limit_s=time_limit, gap=gap, tpot_slo_s=slo_tpot, ttft_slo_s=slo_ttft, max_batch=max_batch,
        critical=critical_sets, engine=engine, policy=policy,
        fixes=fixes, prefetch=given["prefetch"], eviction=given["eviction"],
        expert_error=quality["errors"], quality_digest=quality["digest"],
        multi_gpu=not one_gpu and parallel in ("auto", "pipeline"), compare=compare or report is not None,
        max_watts=max_watts, drop_below=drop_below)
    request = dataclasses.replace(request, dram_contention=given["dram_contention"],  # planner.dram
                                  nested=given["nested"],  # planner.nested_options
                                  miss_copy=parse_miss_copy(given["miss_copy"]))  # planner.miss_copy_options
    output = get_output()
    with output.log.status("planning..."):
        result = optimize(request)
    if fallback:
        fallback += ("; planned offloading over the node's GPUs instead (--parallel auto)" if result.plan.layer_devices
                     else "; planned offloading instead (--parallel auto)")
        result = dataclasses.replace(result, plan=result.plan.model_copy(
            update={"notes": (*result.plan.notes, fallback)}))
    from ..report import render_summary, summary_data
    from ..report_files import write_report

    written = []
    if out_path is not None:
        with writing(out_path, "--out"):
            written.append(result.plan.save(out_path))
    if report:
        with writing(report, "--report"):
            written += [p for p in write_report(result, Path(report))
                        if p.resolve() not in {w.resolve() for w in written}]
    data = {"summary": summary_data(result, compare), "files": [str(p) for p in written]}
    if fallback:
        data["parallel"] = {"mode": "pipeline" if result.plan.layer_devices else "offload", "why": fallback}
    if result.plan.layer_devices:
        data["layer_devices"] = list(result.plan.layer_devices)

    def body(console):
        if fallback:
            console.print(f"[bold yellow]note:[/] {fallback}", highlight=False)
        if result.plan.layer_devices:
            from ..plan import layer_ranges

            console.print(f"[bold]layers by GPU:[/] {layer_ranges(result.plan.layer_devices)}", highlight=False)
        render_summary(result, console, compare=compare)

    t = result.timings_s
    _emit(output, data, result.plan, written, body,
          stopped=f"(--time-limit {time_limit:g} s) stopped the solver" if result.plan.solver.status == "time limit"
          else None,
          timing=f"model {format_time(t['build_s'])}, solve {format_time(t['solve_s'])}", timings=t)


def _run_cluster(req, *, compare: bool, out_path: Path | None, report: str | None) -> None:
    """`planner optimize` in expert-parallel mode: plan ``req``, print, write ``--out``."""
    from ..cluster import cluster_summary, plan_cluster, render_cluster

    if report:
        raise InputError("--report renders offload plans; an expert-parallel plan prints its summary instead",
                         key="--report", value=report, fix="drop --report (use --json for the figures)")
    output = get_output()
    with output.log.status("planning expert placement..."):
        result = plan_cluster(req)
    written = []
    if out_path is not None:
        with writing(out_path, "--out"):
            written.append(result.plan.save(out_path))
    data = {"summary": cluster_summary(result, compare), "files": [str(p) for p in written]}
    _emit(output, data, result.plan, written, lambda console: render_cluster(result, console, compare),
          stopped=(f"(--time-limit {req.time_limit_s:g} s) stopped the placement early"
                   if result.info["stopped_by_time_limit"] else None),
          timing=f"placement {format_time(result.timings_s['solve_s'])}", timings=result.timings_s)


def _emit(output, data: dict, plan: Plan, written: list, body: Callable, *, stopped: str | None, timing: str,
          timings: dict) -> None:
    """Print a planned result (its body, what the safety net stopped if it did, the timings,
    the files written), or its JSON with the plan in it."""

    def render(console):
        body(console)
        if stopped:
            console.print(f"[bold yellow]warning:[/] the wall-clock safety net {stopped}; this plan may differ on a "
                          "less busy machine")
        console.print(f"planned in {format_time(timings['total_s'])} (statistics {format_time(timings['stats_s'])}, "
                      f"{timing})", highlight=False)
        for path in written:
            console.print(f"wrote {path}", highlight=False)

    if output.json_mode:
        data["plan"] = json.loads(plan.to_json())
    output.emit(data, render)
