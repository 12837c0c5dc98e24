"""What a plan says, for people: summary data and terminal tables.

Legend: L = MoE layers, E = routed experts per layer.

- :func:`summary_data`: the plan's figures as JSON-ready data (memory per pool by purpose,
  experts per home/tier/format/site, cache slots, predictions, solver; with ``compare`` every
  baseline's speed and the plan's speed-up over it);
- :func:`render_summary`: the same as rich tables.

With per-phase execution sites (``Plan.prefill_offload``, :mod:`planner.prefill_sites`) the
summary says which plan each phase runs: a prompt's pass (TTFT, against ``--slo-ttft``) and
the decode steps (TPOT, against ``--slo-tpot``) share the residency and differ in where the
CPU-held experts run.

:mod:`planner.report_files` writes them as a report directory (Markdown and plots);
:mod:`planner.layer_breakdown` rebuilds a plan's per-layer times under the shared cost model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from profiles.units import format_size, format_time

from .layer_breakdown import dense_format_of
from .plan import Plan

if TYPE_CHECKING:
    from rich.console import Console

    from .optimize import OptimizeResult
    from .setup import Setup

__all__ = ["summary_data", "render_summary"]

PURPOSES = ("expert_bytes", "cache_bytes", "dense_bytes", "kv_bytes", "workspace_bytes")
PURPOSE_LABELS = {"expert_bytes": "expert weights", "cache_bytes": "expert cache", "dense_bytes": "dense weights",
                  "kv_bytes": "KV cache", "workspace_bytes": "workspace", "free_bytes": "free"}
_SHORT_LABELS = {"expert_bytes": "experts", "cache_bytes": "cache", "dense_bytes": "dense", "kv_bytes": "KV",
                 "workspace_bytes": "workspace"}
SITE_ORDER = ("resident", "hybrid", "fetch", "local")


# ---------------------------------------------------------------------------------------------
# data



def summary_data(result: OptimizeResult, compare: bool = False) -> dict[str, Any]:
    """The plan's figures as plain JSON types.

    Args:
        result: from :func:`planner.optimize.optimize`.
        compare: add ``baselines`` (every baseline's tokens/s, TPOT and the plan's speed-up
            over it, fastest first) and ``best_baseline`` (name, tokens/s, ``speedup``, its
            engine, and a ``hint`` when it wins by running on another engine).

    Returns:
        ``{"inputs", "memory", "experts", "cache_slots", "predicted", "solver"}`` (and the two
        comparison keys). Memory values are bytes, times seconds, ratios plain floats.
    """
    plan, s = result.plan, result.setup
    L, E = len(plan.layers), len(plan.layers[0].home) if plan.layers else 0
    counts = plan.counts()
    tiers = {m: s.hardware.memories[m].tier for m in plan.memory}
    by_tier: dict[str, int] = {}
    by_home_format: dict[str, dict[str, int]] = {}
    for layer in plan.layers:
        for home, fm in zip(layer.home, layer.format):
            tier = tiers.get(home) or s.hardware.memories[home].tier
            by_tier[tier] = by_tier.get(tier, 0) + 1
            row = by_home_format.setdefault(home, {})
            row[fm] = row.get(fm, 0) + 1
    slots = [layer.cache_slots for layer in plan.layers]
    memory = {}
    for m, use in plan.memory.items():
        memory[m] = {"tier": tiers[m], "capacity_bytes": use.capacity_bytes, "used_bytes": use.used_bytes,
                     "free_bytes": use.capacity_bytes - use.used_bytes,
                     **{k: getattr(use, k) for k in PURPOSES}}
    solver = plan.solver
    data: dict[str, Any] = {
        "inputs": {"hardware": plan.inputs.hardware, "model": plan.inputs.model, "workload": plan.inputs.workload,
                   "objective": plan.objective, "batch_size": plan.batch_size, "context_tokens": plan.context_tokens,
                   "quality_budget": plan.quality_budget, "quality_error": plan.quality_error,
                   "formats": list(s.formats), "compute_device": plan.compute_device,
                   "host_device": plan.host_device, "prefetch": plan.prefetch, "eviction": plan.eviction,
                   "dense_format": dense_format_of(plan, s)},
        "memory": memory,
        "experts": {"total": L * E, "layers": L, "experts_per_layer": E, "by_home": _sorted(counts["home"]),
                    "by_tier": _sorted(by_tier), "by_format": _sorted(counts["format"]),
                    "by_site": _sorted(counts["site"]),
                    # layers whose offloaded experts run at two sites: the frequent ones through the
                    # cache (fetch/hybrid), the rare ones on the CPU where they live (local)
                    "split_layers": sum(1 for layer in plan.layers if "local" in layer.site
                                        and {"fetch", "hybrid", "stream"} & set(layer.site)),
                    "by_home_format": {h: _sorted(v) for h, v in sorted(by_home_format.items())}},
        "cache_slots": {"total": int(sum(slots)), "per_layer_min": int(min(slots, default=0)),
                        "per_layer_max": int(max(slots, default=0)),
                        "layers_with_cache": int(sum(1 for c in slots if c))},
        "predicted": dict(plan.predicted),
        "solver": {"method": solver.method, "solver": solver.solver, "status": solver.status,
                   "objective_s": solver.objective, "bound_s": solver.bound, "gap": solver.gap,
                   "time_limit_s": solver.time_limit_s, "variables": solver.variables,
                   "constraints": solver.constraints, **{k: float(v) for k, v in result.timings_s.items()},
                   "batch_search": solver.batch_search.model_dump() if solver.batch_search else None,
                   **({"objective_unit": "J"} if plan.objective == "energy" else {})},  # joules per step
    }
    phases = phases_data(plan, s)
    if phases is not None:
        data["phases"] = phases
    if compare:
        rows = _baseline_rows(result)
        data["baselines"] = rows
        data["best_baseline"] = ({"name": rows[0]["name"], "tokens_per_s": rows[0]["tokens_per_s"],
                                  "speedup": rows[0]["ratio"], "engine": rows[0]["engine"],
                                  "hint": _engine_hint(plan.inputs.engine, rows[0])} if rows else None)
    return data


def phases_data(plan: Plan, s: Setup | None = None) -> dict[str, Any] | None:
    """Which plan each phase runs, where a plan has per-phase sites or was made under an SLO
    (None otherwise). ``prefill``: ``by`` = ``plan`` (its ``prefill_offload`` layers run their
    CPU experts on the compute device after a copy: ``experts_copied`` of them, the host CPU the
    other ``experts_on_cpu`` meanwhile, ``Plan.prefill_copies``), ``engine`` (the engine's op offload does
    that by itself in passes of at least ``min_pass_tokens``, as llama.cpp; ``s``: the plan's
    setup) or ``decode`` (the decode sites), with the TTFT and its SLO; ``decode``: the TPOT
    and its SLO. An SLO is None where the plan records none (the batch search records both)."""
    bs = plan.solver.batch_search
    if plan.prefill_offload is None and bs is None:
        return None
    moved = int(sum(plan.prefill_offload or ()))
    copied = (int(sum(map(len, plan.prefill_copies))) if plan.prefill_copies is not None
              else sum(lp.site.count("local") for lp, on in zip(plan.layers, plan.prefill_offload or ()) if on))
    on_cpu = sum(lp.site.count("local") for lp, on in zip(plan.layers, plan.prefill_offload or ()) if on) - copied
    op = s.engine.op_offload if s is not None and s.engine is not None else None
    engine = (not moved and op is not None and s.compute.kind == "gpu" and not s.unified
              and any("local" in lp.site for lp in plan.layers))
    return {"prefill": {"by": "plan" if moved else "engine" if engine else "decode", "layers_on_device": moved,
                        "layers": len(plan.layers), "device": plan.compute_device, "experts_copied": copied,
                        "experts_on_cpu": on_cpu,
                        "min_pass_tokens": op.min_batch_tokens if engine else None,
                        "ttft_s": plan.predicted["ttft_s"], "slo_ttft_s": bs.slo_ttft_s if bs else None},
            "decode": {"tpot_s": plan.predicted["tpot_s"], "slo_tpot_s": bs.slo_tpot_s if bs else None}}


def _engine_hint(plan_engine: str, best: dict[str, Any]) -> str | None:
    """What to do when the fastest baseline wins by running on another engine's kernels: the
    plan is the best placement for its own engine, not for that one."""
    if best["ratio"] >= 1.0 or best["engine"] == plan_engine:
        return None
    return (f"the {best['name']} baseline is faster because it runs on {best['engine']}, not on this plan's engine "
            f"({plan_engine}); `planner optimize --engine {best['engine']}` plans for {best['engine']}")


def _sorted(d: dict[str, int]) -> dict[str, int]:
    return {k: int(d[k]) for k in sorted(d)}


def _baseline_rows(result: OptimizeResult) -> list[dict[str, Any]]:
    """Every baseline, fastest first: name, tokens/s, TPOT, ratio = plan tok/s / baseline tok/s."""
    plan_tps = result.plan.predicted["tokens_per_s"]
    rows = []
    for name, b in result.baselines.items():
        tps = b.predicted["tokens_per_s"]
        rows.append({"name": name, "tokens_per_s": tps, "tpot_s": b.predicted["tpot_s"],
                     "ttft_s": b.predicted.get("ttft_s"), "ratio": plan_tps / tps if tps > 0 else float("inf"),
                     "engine": b.inputs.engine, "setting": _baseline_setting(name, b)})
    rows.sort(key=lambda r: (-r["tokens_per_s"], r["name"]))
    return rows


def _baseline_setting(name: str, plan: Plan) -> str:
    prefix = f"baseline {name} on engine {plan.inputs.engine}: "
    return plan.inputs.engine + ", " + next((n[len(prefix):] for n in plan.notes if n.startswith(prefix)), "")


# ---------------------------------------------------------------------------------------------
# terminal


def render_summary(result: OptimizeResult, console: Console, compare: bool = False) -> None:
    """Print the plan as rich tables: memory per pool, experts by home x format, prediction,
    solver, and with ``compare`` the baselines, fastest first, with the plan's speed-up."""
    from rich.table import Table

    d = summary_data(result, compare)
    inp = d["inputs"]
    console.print(f"[bold]{inp['model']} on {inp['hardware']}[/bold]: {inp['objective']} objective, batch "
                  f"{inp['batch_size']}, context {inp['context_tokens']} tokens", highlight=False)
    console.print(f"quality budget {_num(inp['quality_budget'])} (plan {_num(inp['quality_error'])}), formats "
                  f"{', '.join(inp['formats'])}, dense weights {inp['dense_format']}, prefetch {inp['prefetch']}",
                  highlight=False)
    for note in result.plan.notes:  # planner.task's drops, planner.energy's idle power, left-out formats
        if note.startswith(("dropped ", "idle power: ", "formats not run ")):
            console.print(note, highlight=False)

    console.print("[bold]Memory per pool[/bold]")
    mem = Table()
    mem.add_column("pool")
    for k in ("tier", "capacity", *(_SHORT_LABELS[p] for p in PURPOSES), "free", "used"):
        mem.add_column(k, justify="right")
    for pool, m in d["memory"].items():
        mem.add_row(pool, m["tier"], format_size(m["capacity_bytes"]),
                    *(_size(m[p]) for p in PURPOSES), format_size(max(m["free_bytes"], 0.0)),
                    _pct(m["used_bytes"], m["capacity_bytes"]))
    console.print(mem)

    ex = d["experts"]
    fmts = [fm for fm in inp["formats"] if fm in ex["by_format"]]
    console.print(f"[bold]Experts by home and format[/bold] ({ex['layers']} MoE layers x "
                  f"{ex['experts_per_layer']} experts)", highlight=False)
    experts = Table()
    experts.add_column("home")
    for fm in fmts:
        experts.add_column(fm, justify="right")
    experts.add_column("total", justify="right")
    for home, row in ex["by_home_format"].items():
        experts.add_row(f"{home} ({d['memory'].get(home, {}).get('tier', '?')})",
                        *(str(row.get(fm, 0)) for fm in fmts), str(sum(row.values())))
    experts.add_row("total", *(str(ex["by_format"][fm]) for fm in fmts), str(ex["total"]), style="bold")
    console.print(experts)
    cs = d["cache_slots"]
    console.print(f"sites: {_sites(ex['by_site'], ex['split_layers'])}; cache slots: {cs['total']} in all, "
                  f"{cs['per_layer_min']}-{cs['per_layer_max']} per layer ({cs['layers_with_cache']}/{ex['layers']} layers cached)",
                  highlight=False)

    if "phases" in d:
        for line in _phase_lines(d["phases"]):
            console.print(line, highlight=False)

    console.print("[bold]Prediction[/bold]")
    pred = Table()
    pred.add_column("metric")
    pred.add_column("value", justify="right")
    for label, value in _prediction_rows(d["predicted"]):
        pred.add_row(label, value)
    console.print(pred)
    console.print(_solver_line(d["solver"], with_time=True), highlight=False)

    if compare:
        console.print("[bold]Baselines[/bold] (each on its own engine profile, same hardware, workload and quality "
                      "budget), fastest first")
        console.print(_baseline_table(d))
        best = d["best_baseline"]
        if best:
            console.print(f"speed-up over the best baseline ({best['name']}): {best['speedup']:.2f}x",
                          highlight=False)
            if best["hint"]:
                console.print(f"note: {best['hint']}", highlight=False)
        else:
            console.print("no baseline fits this hardware", highlight=False)


def _baseline_table(d: dict[str, Any]):
    from rich.table import Table

    plan_tps = d["predicted"]["tokens_per_s"]
    table = Table()
    for col, just in (("plan", "left"), ("tok/s", "right"), ("TPOT", "right"), ("plan speed-up", "right"),
                      ("setting", "left")):
        table.add_column(col, justify=just)
    table.add_row("this plan (ilp)", f"{plan_tps:.3g}", format_time(d["predicted"]["tpot_s"]), "1.00x", "",
                  style="bold")
    for row in d["baselines"]:
        table.add_row(row["name"], f"{row['tokens_per_s']:.3g}", format_time(row["tpot_s"]), f"{row['ratio']:.2f}x",
                      row["setting"])
    return table


def _prediction_rows(p: dict[str, float]) -> list[tuple[str, str]]:
    rows = [("tokens/s", f"{p['tokens_per_s']:.3g}"), ("TPOT", format_time(p["tpot_s"])),
            ("TTFT", format_time(p["ttft_s"])), ("expert hit rate", f"{100 * p['expert_hit_rate']:.1f}%"),
            ("expert fetches per step", f"{p['expert_fetches_per_step']:.3g}"),
            ("link time per step", format_time(p["link_s_per_step"]))]
    if "cost_per_million_tokens_usd" in p:
        rows.append(("cost per million tokens", f"${p['cost_per_million_tokens_usd']:.3g}"))
    if "energy_j_per_token" in p:  # planner.energy
        rows += [("energy per token", f"{p['energy_j_per_token']:.3g} J"), ("average power", f"{p['power_w']:.3g} W")]
    return rows


def _solver_line(sv: dict[str, Any], with_time: bool) -> str:
    parts = [f"solver: {sv['solver'] or sv['method']} {sv['status']}"]
    joules = sv.get("objective_unit") == "J"  # --objective energy: joules per step
    if sv["objective_s"] is not None:
        parts.append(f"objective {sv['objective_s']:.4g} J/step" if joules else
                     f"objective {format_time(sv['objective_s'])}/step")
    if sv["bound_s"] is not None:
        parts.append(f"bound {sv['bound_s']:.4g} J" if joules else f"bound {format_time(sv['bound_s'])}")
    if sv["gap"] is not None:
        parts.append(f"gap {100 * sv['gap']:.2f}%" if sv["gap"] >= 5e-5 else "gap 0%")
    if sv["variables"] is not None:
        parts.append(f"{sv['variables']} variables, {sv['constraints']} constraints")
    if with_time and "solve_s" in sv:
        parts.append(f"solved in {format_time(sv['solve_s'])}")
    line = ", ".join(parts)
    if bs := sv.get("batch_search"):
        slos = " and ".join(f"{n} <= {format_time(v)}" for n, v in (("TPOT", bs["slo_tpot_s"]),
                                                                   ("TTFT", bs["slo_ttft_s"])) if v is not None)
        line += (f"\nbatch search: batch {bs['batch']} of 1-{bs['max_batch']} under {slos}, {bs['solves']} solves; "
                 f"no batch exceeds {bs['tokens_per_s_bound']:.4g} tok/s (gap {100 * bs['gap']:.2f}%, {bs['status']})")
    return line


def _phase_lines(ph: dict[str, Any]) -> list[str]:
    """One line per phase: where it runs the CPU-held experts, its time and its SLO."""
    def against(t: float, slo: float | None) -> str:
        return format_time(t) + ("" if slo is None else f" {'<=' if t <= slo else '>'} SLO {format_time(slo)}")

    pre, dec = ph["prefill"], ph["decode"]
    n, on_cpu = pre["layers_on_device"], pre.get("experts_on_cpu", 0)
    moved = (f"{n} of {pre['layers']} MoE layers copy {pre['experts_copied']} of their "
             f"{pre['experts_copied'] + on_cpu} CPU experts to {pre['device']} and run them there, the CPU the other "
             f"{on_cpu} meanwhile (prefill_copies)" if on_cpu else
             f"{n} of {pre['layers']} MoE layers run their CPU experts on {pre['device']} after a copy "
             "(prefill_offload)")
    where = {"plan": moved + (", the others at the decode sites" if n < pre["layers"] else ""),
             "engine": f"the engine's op offload copies the CPU experts to {pre['device']} (passes >= "
                       f"{pre['min_pass_tokens']} tokens)",
             "decode": "the decode plan's sites"}[pre["by"]]
    return [f"prefill plan: {where}; TTFT {against(pre['ttft_s'], pre['slo_ttft_s'])}",
            f"decode plan: the sites above; TPOT {against(dec['tpot_s'], dec['slo_tpot_s'])}"]


def _sites(by_site: dict[str, int], split_layers: int = 0) -> str:
    keys = [k for k in SITE_ORDER if k in by_site] + [k for k in by_site if k not in SITE_ORDER]
    split = (f" ({split_layers} layers split: frequent offloaded experts through the cache, rare ones on the CPU)"
             if split_layers else "")
    return ", ".join(f"{k} {by_site[k]}" for k in keys) + split


def _size(n: float) -> str:
    return format_size(n) if n else "-"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _num(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"
