"""What `planner optimize` prints for an expert-parallel plan: the JSON summary and the rich
tables (the command itself is planner/commands/optimize.py)."""

from __future__ import annotations

from typing import Any

from .assemble import ClusterResult

__all__ = ["cluster_summary", "render_cluster"]


def cluster_summary(result: ClusterResult, compare: bool = False) -> dict[str, Any]:
    """The JSON summary `planner optimize` prints for an expert-parallel plan."""
    plan, topo = result.plan, result.topology
    E = len(plan.layers[0].home)
    # the fullest GPU (critical experts differ; with offload, host memory has its own entry)
    mem = max((plan.memory[g] for g in topo.gpus if g in plan.memory), key=lambda m: m.used_bytes)

    def row(name: str) -> dict[str, Any]:
        m = result.metrics[name]
        return {"method": name, "max_mean_load": m["max_mean_avg"], "max_mean_load_worst_layer": m["max_mean_worst"],
                "cross_gpu_fraction": m["cross_gpu_fraction"], "cross_node_fraction": m["cross_node_fraction"],
                "nodes_per_token": m["nodes_per_token"], "traffic_s_per_token": m["traffic_s_per_token"],
                "solve_s": m["solve_s"]}

    data: dict[str, Any] = {
        "mode": "expert-parallel",
        "inputs": {"model": plan.inputs.model, "hardware": plan.inputs.hardware, "workload": result.workload},
        "layout": {"gpus": topo.num_gpus, "nodes": topo.num_nodes, "experts": E,
                   "redundant_experts": result.num_physical - E, "slots_per_gpu": result.num_physical // topo.num_gpus,
                   "moe_layers": len(plan.layers), "expert_format": result.expert_format,
                   "dense_format": plan.dense_format},
        "quality": {"budget": plan.quality_budget, "error": plan.quality_error,
                    "formats": plan.counts()["format"]},
        "memory_per_gpu": {"capacity_bytes": mem.capacity_bytes, "expert_bytes": mem.expert_bytes,
                           "dense_bytes": mem.dense_bytes, "kv_bytes": mem.kv_bytes, "used_bytes": mem.used_bytes},
        "plan": row("ours"),
        "solver": result.info,
        "bound": {"objective": "traffic_s_per_token", "value": plan.solver.objective, "bound": plan.solver.bound,
                  "gap": plan.solver.gap, "status": plan.solver.status,
                  **{("bound_status" if k == "status" else k): v for k, v in result.info.get("bound", {}).items()}},
    }
    if plan.layers[0].owner:  # expert parallelism with offload: each GPU's experts as one node plans them
        data["offload"] = {"tpot_s": plan.predicted["tpot_s"], "tokens_per_s": plan.predicted["tokens_per_s"],
                           "all_to_all_s_per_step": plan.predicted["all_to_all_s_per_step"],
                           "sites": plan.counts()["site"], "bound_tpot_s": plan.solver.bound, "gap": plan.solver.gap}
        traffic = result.info.get("bound", {})  # the plan's solver is the offload's: the placement's traffic here
        data["bound"] |= {"value": result.metrics["ours"]["traffic_s_per_token"],
                          "bound": traffic.get("traffic_s_per_token"), "gap": traffic.get("traffic_gap"),
                          "status": traffic.get("status")}
    if compare:
        ours = result.metrics["ours"]
        rows = []
        for name in (n for n in result.metrics if n != "ours"):  # every placement's metrics, plans or not
            r = row(name)
            m = result.metrics[name]
            r["cross_node_reduction"] = (1 - ours["cross_node_fraction"] / m["cross_node_fraction"]
                                         if m["cross_node_fraction"] else 0.0)
            rows.append(r)
        data["baselines"] = rows
    return data


def render_cluster(result: ClusterResult, console: Any, compare: bool = False) -> None:
    """Rich tables for an expert-parallel plan (and, with ``compare``, the baselines)."""
    from rich.table import Table

    from profiles.units import format_size, format_time

    d = cluster_summary(result, compare)
    lay, inp, mem = d["layout"], d["inputs"], d["memory_per_gpu"]
    console.print(f"[bold]{inp['model']} on {inp['hardware']}[/bold]: expert parallelism over {lay['gpus']} GPUs "
                  f"({lay['nodes']} node{'s' if lay['nodes'] > 1 else ''}), {lay['moe_layers']} MoE layers x "
                  f"{lay['experts']} experts + "
                  f"{lay['redundant_experts']} redundant, {lay['slots_per_gpu']} slots per GPU, experts in "
                  f"{lay['expert_format']}", highlight=False)
    q = d["quality"]
    if q["budget"] is not None:
        kept = {f: n for f, n in q["formats"].items() if f != lay["expert_format"]}
        console.print(f"quality error {q['error']:.4g} of budget {q['budget']:.4g}; dense weights in "
                      f"{lay['dense_format']}" + "".join(f"; {n} critical experts in {f}" for f, n in kept.items()),
                      highlight=False)
    console.print(f"workload: {inp['workload']}", highlight=False)
    if off := d.get("offload"):
        sites = ", ".join(f"{n} {s}" for s, n in sorted(off["sites"].items()))
        gap = "n/a" if off["gap"] is None else f"{off['gap']:.1%}"
        console.print(f"offload per GPU: {sites}; {off['tokens_per_s']:.4g} tok/s ({format_time(off['tpot_s'])} per "
                      f"step, all-to-all {format_time(off['all_to_all_s_per_step'])}); bound "
                      f"{format_time(off['bound_tpot_s'])}, gap {gap} for this placement", highlight=False)
    console.print(f"memory per GPU: experts {format_size(mem['expert_bytes'])}, dense {format_size(mem['dense_bytes'])}"
                  f", KV {format_size(mem['kv_bytes'])}; {format_size(mem['used_bytes'])} of "
                  f"{format_size(mem['capacity_bytes'])}", highlight=False)
    table = Table(title="Expert placement (per MoE layer, averaged)")
    for col in ("method", "max/mean load", "worst layer", "cross-GPU", "cross-node", "nodes/token", "solve"):
        table.add_column(col, justify="left" if col == "method" else "right")

    def add(r: dict[str, Any], style: str | None = None) -> None:
        npt = r["nodes_per_token"]
        table.add_row(r["method"], f"{r['max_mean_load']:.3f}", f"{r['max_mean_load_worst_layer']:.3f}",
                      f"{r['cross_gpu_fraction']:.1%}", f"{r['cross_node_fraction']:.1%}",
                      "-" if npt is None else f"{npt:.2f}", format_time(r["solve_s"]), style=style)

    b = d["bound"]
    if b.get("method"):
        part = "node" if lay["nodes"] > 1 else "GPU"
        console.print(f"traffic {b['value']:.4g} s/token, lower bound {b['bound']:.4g} ({b['method']}): gap "
                      f"{b['gap']:.1%}; cross-{part} pairs >= {b[f'cross_{part.lower()}_fraction']:.1%} (gap "
                      f"{b[f'cross_{part.lower()}_gap']:.1%})", highlight=False)
    speeds = d["solver"].get("speed")
    if speeds:
        console.print(f"load balanced by time: relative expert speeds {min(speeds):.3f}-{max(speeds):.3f} at "
                      f"{d['solver']['speed_tokens_per_call']:.1f} tokens per call", highlight=False)
    attention, slots = d["solver"].get("attention"), d["solver"].get("slots")
    if attention:
        console.print(f"attention: sequences per GPU {attention['sequences']} (equal shares: "
                      f"{attention['equal_s'] * 1e3:.1f} ms per step, these: {attention['stage_s'] * 1e3:.1f} ms)",
                      highlight=False)
    if slots:
        console.print(f"expert slots per GPU {slots} (SGLang/vLLM need equal slots: --ranks even)", highlight=False)
    add(d["plan"], "bold")
    for r in d.get("baselines", []):
        add(r)
    console.print(table)
    if compare:
        g = next(r for r in d["baselines"] if r["method"] == "eplb-global")
        level = "node" if lay["nodes"] > 1 else "GPU"
        ours_x, glob_x = d["plan"][f"cross_{level.lower()}_fraction"], g[f"cross_{level.lower()}_fraction"]
        cut = 1 - ours_x / glob_x if glob_x else 0.0
        console.print(f"cross-{level} tokens vs eplb-global: {cut:+.1%} fewer at max/mean "
                      f"{d['plan']['max_mean_load']:.3f} (eplb-global {g['max_mean_load']:.3f})", highlight=False)
