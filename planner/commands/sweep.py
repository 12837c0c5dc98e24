"""`planner sweep`: plan and simulate every point of a what-if grid."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from profiles.errors import InputError, UserError

from ..output import get_output
from ._common import FiniteFloat, check_output_path, common_options, writing

__all__ = ["evaluate_point", "sweep_cmd"]


def evaluate_point(spec: dict) -> dict:
    """Plan one sweep point with the ILP and simulate the plan; a row of results.

    Profiles with several GPUs get an expert-parallel plan when it fits (``parallel``:
    auto, ep or offload, as ``planner optimize --parallel``); the rest the offload ILP.
    Top-level and self-contained, so local worker processes and Ray workers can run it.
    Infeasible points (the model does not fit) come back with their reason as the status.
    With ``spec["goodput"]`` the plan is also simulated at a ladder of arrival rates
    (:func:`simulator.goodput.goodput_ladder`) and the row gets ``goodput_rps`` and the ladder.
    """
    from profiles.hardware import load_profile
    from profiles.models import load_model
    from profiles.workload.defaults import default_workload
    from simulator.engine import SimConfig, simulate
    from simulator.goodput import GoodputSettings, goodput_ladder, rate_row
    from simulator.pd import kv_route_s, simulate_disaggregated

    from ..cluster import ClusterRequest, cluster_applies, plan_cluster
    from ..optimize import OptimizeRequest, optimize
    from .optimize_inputs import load_trace

    row = {"id": spec["id"], "point": spec["point"], "status": "ok"}

    formats = {"formats": tuple(spec["formats"])} if spec.get("formats") else {}

    def plan_on(hardware: str):
        _, hw = load_profile(hardware)
        gpus = max(len(hw.devices_of_kind("gpu")), 1)
        per_gpu = -(-spec["batch"] // gpus)  # expert parallelism: attention is data parallel
        if cluster_applies(spec["parallel"], hardware, spec["model"], batch_size=per_gpu,
                           context_tokens=spec["context"]):
            return hw, plan_cluster(ClusterRequest(hardware=hardware, model=spec["model"], trace=trace,
                                                   batch_size=per_gpu, context_tokens=spec["context"],
                                                   time_limit_s=spec["time_limit_s"], **formats)).plan
        return hw, optimize(OptimizeRequest(hardware=hardware, model=spec["model"], trace=trace,
                                            objective=spec["objective"], batch_size=spec["batch"],
                                            context_tokens=spec["context"], time_limit_s=spec["time_limit_s"],
                                            dram_contention=spec.get("dram_contention", False), **formats)).plan

    t0 = time.perf_counter()
    pd = spec.get("pd_split") is not None
    try:
        trace = load_trace(spec["trace"], None) if spec["trace"] else None
        model = load_model(spec["model"])
        if pd:  # prefill/decode disaggregation: each pool planned on its own nodes
            pools = [plan_on(spec[f"{role}_hardware"]) for role in ("prefill", "decode")]
            hw, plan = pools[1]
            kv_route = kv_route_s(load_profile(spec["hardware"])[1], int(spec["pd_split"]))
        else:
            hw, plan = plan_on(spec["hardware"])
    except UserError as exc:
        return {**row, "status": f"infeasible: {exc}" if exc.exit_code == 3 else f"error: {exc}"}
    t1 = time.perf_counter()
    knob = "reroute" if spec.get("reroute") else "rebalance_every" if spec.get("rebalance_every") is not None else None
    if knob is not None:  # as `planner simulate --reroute` refuses: the knob would change nothing here
        from exporters.engines.sglang import is_expert_parallel

        if not all(is_expert_parallel(p) for _, p in (pools if pd else [(hw, plan)])):
            return {**row, "status": f"error: {knob} changes where an expert-parallel plan sends tokens; this "
                                      "point's plan is not expert-parallel (vary it on a multi-GPU cluster point)"}
    if trace is None:  # the model's default workload, which the plan was made from
        trace = default_workload(model)
    try:
        def run(rate_rps):
            cfg = SimConfig(
                batch_size=spec["batch"], requests=spec["requests"], arrival_rate_per_s=rate_rps,
                batching=spec.get("scheduler", "continuous"), chunk_tokens=spec.get("chunk_tokens"),
                kv_bytes=spec.get("kv_bytes"), eviction=spec["eviction"], prefetch=spec["prefetch"],
                miss=spec["miss"], seed=spec["seed"], ep_reroute=spec.get("reroute", False),
                ep_rebalance_every=spec.get("rebalance_every"))
            if pd:
                return simulate_disaggregated(pools[0][::-1], pools[1][::-1], model, trace, cfg, kv_route)
            return simulate(plan, hw, model, trace, cfg)

        def rung(rate_rps):  # one rate of the goodput ladder
            rep = run(rate_rps)
            return rate_row(rate_rps, rep.metrics, rep.serving, slo)

        report = run(spec["arrival_rate_per_s"])
        goodput = None
        if spec.get("goodput"):
            slo = GoodputSettings.model_validate(spec["goodput"])
            goodput = goodput_ladder(rung, slo)
    except UserError as exc:  # e.g. a KV cache too small for one request
        return {**row, "status": f"error: {exc}"}
    m = report.metrics
    price = load_profile(spec["hardware"])[1].price_per_hour_usd if pd else hw.price_per_hour_usd
    cost = price if price is not None else spec["grid_cost_per_hour_usd"]
    tps = m["tokens_per_s"]
    return {**row, "tokens_per_s": tps, "tpot_p50_s": (m["tpot_s"] or {}).get("p50"),
            "ttft_p50_s": (m["ttft_s"] or {}).get("p50"), "expert_hit_rate": m["expert_hit_rate"],
            "predicted_tokens_per_s": plan.predicted.get("tokens_per_s"), "cost_per_hour_usd": cost,
            "usd_per_million_tokens": cost / (tps * 3600) * 1e6 if cost is not None and tps > 0 else None,
            "plan_s": t1 - t0, "bytes_moved": m["bytes_moved"],
            "simulate_s": report.prefill.wall_s + report.decode.wall_s if pd else report.wall_s,
            **({"kv_transfer_bytes": m["kv_transfer"]["bytes"],
                "kv_transfer_p90_s": m["kv_transfer"]["seconds"]["p90"]} if pd else {}),
            "preemptions": report.serving["kv_cache"]["preemptions"],
            "kv_peak_utilisation": report.serving["kv_cache"]["peak_utilisation"],
            **({"goodput_rps": goodput["goodput_rps"], "goodput": goodput} if goodput is not None else {})}


@click.command("sweep")
@click.argument("grid_path", metavar="GRID.yaml", type=click.Path(dir_okay=False))
@click.option("--out", "-o", "out_dir", type=click.Path(file_okay=False), default="sweep-out", show_default=True,
              help="Directory for results.csv/.md/.json, pareto.png and each point's hardware profile.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Points run at once on local processes (or Ray CPUs with --ray local).")
@click.option("--ray", "ray_address", help="Run the points on a Ray cluster: its address, or `local` to start one.")
@click.option("--force", is_flag=True, help="Write into an existing --out directory.")
@click.option("--slo-ttft", help="Goodput: largest acceptable TTFT, e.g. 2s (sets the grid's goodput.slo_ttft).")
@click.option("--slo-tpot", help="Goodput: largest acceptable mean time per output token, e.g. 100ms.")
@click.option("--slo-share", type=FiniteFloat(min=0, min_open=True, max=1),
              help="Goodput: share of requests that must meet the SLOs (default 0.9).")
@click.option("--rates", help="Goodput: arrival rates to simulate, requests/s, e.g. 0.5,1,2,4 (default: bracket "
              "from 1 req/s, doubling or halving, then bisect).")
@common_options
def sweep_cmd(grid_path, out_dir, jobs, ray_address, force, slo_ttft, slo_tpot, slo_share, rates) -> None:
    """Plan and simulate every point of a what-if grid; write a table and a cost/tok-s Pareto plot.

    With SLOs (a `goodput:` block in the grid, or --slo-ttft / --slo-tpot) every point's plan
    is also simulated under Poisson arrivals at a ladder of rates, and the point's goodput is
    the highest rate at which 90% (--slo-share) of requests meet both SLOs: goodput.csv,
    goodput.json and goodput.png (SLO attainment vs offered load) go beside the results.
    Grids may vary the serving knobs scheduler, chunk_tokens, kv_memory and arrival_rate,
    and for expert-parallel plans reroute (true/false: least-loaded copies, as LLEP) and
    rebalance_every (EPLB re-placement every N decode steps, null for never), and for offload
    plans dram_contention (true: host DRAM shared by the CPU's expert reads and the copies).
    On a multi-node cluster pd_split P disaggregates prefill and decode (P nodes prefill, the
    rest decode, each pool planned on its own nodes, the KV sent between them; null:
    colocated).

    \b
    Examples:
      planner sweep examples/whatif_sweep/desktop-4090-upgrade.yaml --out upgrade/ --jobs 2
      planner sweep examples/whatif_sweep/h100-cluster-sizing.yaml --ray local
      planner sweep examples/serving_capacity/qwen3-30b-a3b.yaml --slo-tpot 100ms --rates 0.1,0.2,0.4,0.8
    """
    from simulator.goodput import slo_text
    from simulator.sweep import (
        goodput_cell,
        grid_points,
        load_grid,
        pareto_front,
        point_label,
        point_specs,
        run_sweep,
        with_goodput,
        write_outputs,
    )

    grid = load_grid(grid_path)
    if any(v is not None for v in (slo_ttft, slo_tpot, slo_share, rates)):
        grid = with_goodput(grid, grid_path, slo_ttft=slo_ttft, slo_tpot=slo_tpot, share=slo_share, rates=rates)
    out = Path(out_dir)
    if (out / "results.csv").exists() and not force:
        raise InputError("the output directory holds results already", file=out,
                         fix="pass --force to overwrite them, or choose another --out")
    check_output_path(out, "--out", directory=True)
    output = get_output()
    n = len(grid_points(grid))
    created = [p for p in (out, out / "hardware") if not p.exists()]
    try:
        with writing(out / "hardware", "--out"):
            specs = point_specs(grid, out)
        from rich.progress import Progress

        with Progress(console=output.log, transient=True) as bar:
            where = f"Ray {ray_address}" if ray_address else f"{jobs} process(es)"
            task = bar.add_task(f"planning and simulating {n} points on {where}", total=n)
            rows = run_sweep(specs, evaluate_point, jobs=jobs, ray_address=ray_address,
                             progress=lambda done, total: bar.update(task, completed=done))
        if not any(r["status"] == "ok" for r in rows):
            first = rows[0]["status"] if rows else "no points"
            raise InputError(f"every point of the sweep failed (first: {first})", file=grid_path,
                             fix="fix the grid's base case; `planner optimize` with one point's values shows why")
    except BaseException:
        for path in reversed(created):  # a failed sweep leaves nothing behind
            shutil.rmtree(path, ignore_errors=True)
        raise
    with writing(out, "--out"):
        files = write_outputs(grid, rows, out)
    front = pareto_front(rows)

    def render(console):
        from rich.table import Table

        table = Table(title=f"Sweep {grid.name}")
        for k in grid.vary:
            table.add_column(k)
        for col in ("tok/s", "TPOT p50", "$/h", "$/M tok", "Pareto") + (("goodput",) if grid.goodput else ()):
            table.add_column(col, justify="right")
        for i, r in enumerate(rows):
            cells = [str(r["point"][k]) for k in grid.vary]
            if r["status"] != "ok":
                table.add_row(*cells, r["status"][:60], "", "", "", "", *([""] if grid.goodput else []))
                continue
            table.add_row(*cells, f"{r['tokens_per_s']:.2f}",
                          f"{1e3 * r['tpot_p50_s']:.1f} ms" if r["tpot_p50_s"] else "",
                          "" if r["cost_per_hour_usd"] is None else f"{r['cost_per_hour_usd']:.3g}",
                          "" if r["usd_per_million_tokens"] is None else f"{r['usd_per_million_tokens']:.3g}",
                          "*" if i in front else "", *([goodput_cell(r)] if grid.goodput else []))
        console.print(table)
        if grid.goodput:
            console.print(f"goodput: the highest Poisson arrival rate at which {slo_text(grid.goodput)} hold "
                          "(>=: no simulated rate missed, extend --rates; <: the lowest rate missed)", highlight=False)
            ladders = [(point_label(r["point"]) or r["id"], r["goodput"]) for r in rows if r.get("goodput")]
            shares = Table(title="Share of requests meeting the SLOs, by arrival rate (req/s)")
            shares.add_column("req/s", justify="right")
            for label, _ in ladders:
                shares.add_column(label, justify="right")
            by_rate = [{g["rate_rps"]: g["slo_share"] for g in ladder["rates"]} for _, ladder in ladders]
            for rate in sorted({rate for seen in by_rate for rate in seen}):
                shares.add_row(f"{rate:.4g}", *(f"{seen[rate]:.0%}" if rate in seen else "" for seen in by_rate))
            console.print(shares)
        for f in files:
            console.print(f"wrote {f}", highlight=False)

    output.emit({"rows": rows, "pareto": front, "files": [str(f) for f in files]}, render)
