"""What a plan says, for people: summary data, terminal tables, and a report directory.

Legend: L = MoE layers, E = routed experts per layer.

- :func:`summary_data`: the plan's figures as JSON-ready data (memory per pool by purpose,
  experts per home/tier/format/site, cache slots, predictions, solver; with ``compare`` every
  baseline's speed and the plan's speed-up over it);
- :func:`render_summary`: the same as rich tables;
- :func:`write_report`: ``report.md`` with three PNG plots (memory per pool, time per layer,
  experts and cache per layer) and ``plan.json``;
- :func:`layer_breakdown`: the plan's per-layer times under the shared cost model, rebuilt
  from the Plan's per-expert decisions (the plot's source, and a check that the Plan and the
  cost model agree).

Reports are deterministic: no timestamps or wall-clock times in ``report.md`` or the PNGs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from profiles.engines import load_engine
from profiles.errors import InputError
from profiles.units import format_size, format_time

from .costs import MODES, SPEC_COLUMNS, Setup, fixed_costs, option_costs, option_time
from .plan import Plan

if TYPE_CHECKING:
    from rich.console import Console

    from .optimize import OptimizeResult

__all__ = ["summary_data", "render_summary", "write_report", "layer_breakdown", "LayerBreakdown", "REPORT_FILES"]

# Every file write_report owns in its directory; nothing else there is touched.
REPORT_FILES = ("report.md", "plan.json", "memory.png", "layer_time.png", "layer_experts.png")

PURPOSES = ("expert_bytes", "cache_bytes", "dense_bytes", "kv_bytes", "workspace_bytes")
PURPOSE_LABELS = {"expert_bytes": "expert weights", "cache_bytes": "expert cache", "dense_bytes": "dense weights",
                  "kv_bytes": "KV cache", "workspace_bytes": "workspace", "free_bytes": "free"}
_COLORS = {"expert_bytes": "#4c72b0", "cache_bytes": "#55a868", "dense_bytes": "#c44e52", "kv_bytes": "#8172b2",
           "workspace_bytes": "#ccb974", "free_bytes": "#e5e5e5"}
_SHORT_LABELS = {"expert_bytes": "experts", "cache_bytes": "cache", "dense_bytes": "dense", "kv_bytes": "KV",
                 "workspace_bytes": "workspace"}
_SITE_ORDER = ("resident", "hybrid", "fetch", "local")


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
                   "dense_format": _dense_format(plan, s)},
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
                   "batch_search": solver.batch_search.model_dump() if solver.batch_search else None},
    }
    if compare:
        rows = _baseline_rows(result)
        data["baselines"] = rows
        data["best_baseline"] = ({"name": rows[0]["name"], "tokens_per_s": rows[0]["tokens_per_s"],
                                  "speedup": rows[0]["ratio"], "engine": rows[0]["engine"],
                                  "hint": _engine_hint(plan.inputs.engine, rows[0])} if rows else None)
    return data


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


def _dense_format(plan: Plan, s: Setup) -> str | None:
    """The dense weights' format: the one whose bytes the plan charges to the compute device."""
    for note in plan.notes:
        if note.startswith("dense weights: "):
            return note.split(": ", 1)[1]
    dev = plan.memory.get(s.hardware.memory_of(s.compute.id).id)
    if dev is None:
        return None
    return min(s.formats, key=lambda fm: abs(float(s.model.dense_bytes(fm)) - dev.dense_bytes))


# ---------------------------------------------------------------------------------------------
# per-layer times


@dataclass(frozen=True)
class LayerBreakdown:
    """Per-layer seconds of one decode step (all arrays ``[L]``), under :mod:`planner.costs`.

    ``tau`` is the layer's time (costs.option_time: at batch 1 the expected per-token max of
    device, CPU and link, so it can exceed the max of the averages below); ``compute`` =
    expected device time ``G``, ``stall`` = fetches the device waits for, ``cpu`` = host busy
    time ``U``, ``link`` = the bytes the layer moves (demand misses, plus the prefetched set
    with prefetch).
    """

    compute_s: np.ndarray  # [L] G
    stall_s: np.ndarray  # [L]
    cpu_s: np.ndarray  # [L] U
    link_s: np.ndarray  # [L]
    tau_s: np.ndarray  # [L]
    dense_s: float  # attention, dense weights, KV reads, launches: once per step
    dense_format: str
    specs: np.ndarray  # [L, 7] the option row of each layer (costs.SPEC_COLUMNS)

    @property
    def step_s(self) -> float:
        return float(self.tau_s.sum() + self.dense_s)

    @property
    def bound_by(self) -> list[str]:
        """``[L]`` which resource sets each layer's time: ``device`` (computing), ``cpu``, or
        ``link`` (busy, or the device mostly waiting for its fetches)."""
        stack = np.stack([self.compute_s + self.stall_s, self.cpu_s, self.link_s])
        which = np.argmax(stack, axis=0)
        which = np.where((which == 0) & (self.stall_s > self.compute_s), 2, which)
        return [("device", "cpu", "link")[i] for i in which]


def plan_specs(plan: Plan, s: Setup) -> np.ndarray:
    """``[L, 7]`` the option row (costs.SPEC_COLUMNS) each layer of ``plan`` takes.

    A layer's resident experts are its top-p by frequency, the next q - p go through the
    cache and the rest run locally (that is how plans are built), so counts give p and q.
    """
    rows = []
    E = s.stats.num_experts
    for layer in plan.layers:
        resident = [e for e, site in enumerate(layer.site) if site == "resident"]
        off = [e for e, site in enumerate(layer.site) if site != "resident"]
        band = [e for e in off if layer.site[e] != "local"]
        p = len(resident)
        # b_off: the band's format, else the tail's narrowest (its tier, if any, is wider)
        bo = layer.format[band[0]] if band else min((layer.format[e] for e in off), key=s.expert_bytes, default=None)
        br = layer.format[resident[0]] if resident else bo
        if not off:
            rows.append((p, E, s.formats.index(br), 0, s.formats.index(br), 0, MODES.index("fetch")))
            continue
        home = s.homes.index(layer.home[off[0]]) if s.homes else 0
        mode = MODES.index(layer.site[band[0]] if band else "local")
        rows.append((p, p + len(band), s.formats.index(br), layer.cache_slots, s.formats.index(bo), home, mode))
    return np.array(rows, dtype=np.int64).reshape(-1, len(SPEC_COLUMNS))


def plan_tiers(plan: Plan, s: Setup, specs: np.ndarray) -> np.ndarray:
    """``[L, 2]`` each layer's tier ``(k, b_up)`` (planner.format_tiers): its offloaded experts
    stored at another format than the option's ``b_off`` (``specs``, from :func:`plan_specs`)."""
    rows = []
    for layer, spec in zip(plan.layers, specs):
        b_off = s.formats[spec[SPEC_COLUMNS.index("b_off")]]
        up = [f for f, site in zip(layer.format, layer.site) if site != "resident" and f != b_off]
        rows.append((len(up), s.formats.index(up[0]) if up else spec[SPEC_COLUMNS.index("b_off")]))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def layer_breakdown(plan: Plan, s: Setup) -> LayerBreakdown:
    """Per-layer times of ``plan`` (see :class:`LayerBreakdown`); ``s`` is ``result.setup``.

    Raises:
        ValueError: the rebuilt times do not add up to the plan's predicted TPOT (the plan was
            edited, or was made for another setup).
    """
    if s.engine is not None and plan.inputs.engine != s.engine.name:  # a baseline on its own engine
        s = s.with_engine(load_engine(plan.inputs.engine), [f for layer in plan.layers for f in layer.format])
    dense_fm = _dense_format(plan, s)
    fc = fixed_costs(s, dense_fm)
    prefetch = plan.prefetch == "next-layer"
    r = s.stats.predictability  # [L]
    specs = plan_specs(plan, s)
    tiers = plan_tiers(plan, s, specs)
    tables = [option_costs(s, l, specs[l:l + 1], tiers[l:l + 1]) for l in range(len(specs))]
    G = np.array([t.G[0] for t in tables])
    U = np.array([t.U[0] for t in tables])
    F = np.array([t.F[0] for t in tables])
    pi_r = r if prefetch else np.zeros_like(r)
    mode = specs[:, SPEC_COLUMNS.index("mode")]
    stall = np.where(np.isin(mode, [MODES.index("fetch"), MODES.index("stream")]), (1 - pi_r) * F, 0.0)
    link = (1 - pi_r) * F + (F if prefetch else 0.0)
    tau = np.array([option_time(t, prefetch)[0] for t in tables])
    out = LayerBreakdown(compute_s=G, stall_s=stall, cpu_s=U, link_s=link, tau_s=tau, dense_s=fc.dense_s,
                         dense_format=dense_fm, specs=specs)
    target = plan.predicted.get("tpot_s")
    if target is not None and abs(out.step_s - target) > 1e-9 * max(target, 1e-12):
        raise ValueError(f"the plan's layers add up to {out.step_s:.6g} s per step, not the predicted {target:.6g} s; "
                         "was it made for another setup?")
    return out


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
    return rows


def _solver_line(sv: dict[str, Any], with_time: bool) -> str:
    parts = [f"solver: {sv['solver'] or sv['method']} {sv['status']}"]
    if sv["objective_s"] is not None:
        parts.append(f"objective {format_time(sv['objective_s'])}/step")
    if sv["bound_s"] is not None:
        parts.append(f"bound {format_time(sv['bound_s'])}")
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


def _sites(by_site: dict[str, int], split_layers: int = 0) -> str:
    keys = [k for k in _SITE_ORDER if k in by_site] + [k for k in by_site if k not in _SITE_ORDER]
    split = (f" ({split_layers} layers split: frequent offloaded experts through the cache, rare ones on the CPU)"
             if split_layers else "")
    return ", ".join(f"{k} {by_site[k]}" for k in keys) + split


def _size(n: float) -> str:
    return format_size(n) if n else "-"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _num(x: float | None) -> str:
    return "none" if x is None else f"{x:.4g}"


# ---------------------------------------------------------------------------------------------
# report directory


def write_report(result: OptimizeResult, out_dir: str | Path) -> list[Path]:
    """Write ``report.md``, ``plan.json`` and three PNGs into ``out_dir`` (created if missing).

    Only the files in :data:`REPORT_FILES` are written; anything else in ``out_dir`` is left
    alone. The same result gives the same bytes.

    Returns:
        The paths written, ``report.md`` first.

    Raises:
        InputError: ``out_dir`` exists and is not a directory.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError("the report directory is a file", file=out, key="--report",
                         fix="pass a directory (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    data = summary_data(result, compare=True)
    breakdown = layer_breakdown(result.plan, result.setup)
    pngs = _plots(result, data, breakdown, out)
    plan_path = out / "plan.json"
    plan_path.write_text(result.plan.to_json(), encoding="utf-8")
    md = out / "report.md"
    md.write_text(_markdown(result, data, breakdown), encoding="utf-8")
    return [md, plan_path, *pngs]


def _plots(result: OptimizeResult, data: dict[str, Any], bd: LayerBreakdown, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = {"Software": None}  # no version string: the same plan gives the same bytes
    paths = []
    with plt.rc_context({"font.size": 9, "svg.hashsalt": "moe-planner"}):
        # (a) memory per pool: stacked shares of capacity by purpose
        mem = data["memory"]
        pools = list(mem)
        fig, ax = plt.subplots(figsize=(8, 0.8 + 0.7 * len(pools)))
        left = np.zeros(len(pools))
        for key in (*PURPOSES, "free_bytes"):
            share = np.array([max(mem[p][key], 0.0) / mem[p]["capacity_bytes"] if mem[p]["capacity_bytes"] else 0.0
                              for p in pools]) * 100
            ax.barh(range(len(pools)), share, left=left, color=_COLORS[key], label=PURPOSE_LABELS[key],
                    edgecolor="white", linewidth=0.5)
            left += share
        ax.set_yticks(range(len(pools)))
        ax.set_yticklabels([f"{p} ({mem[p]['tier']})\n{format_size(mem[p]['used_bytes'])} of "
                            f"{format_size(mem[p]['capacity_bytes'])}" for p in pools])
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of capacity")
        ax.set_title(f"Memory per pool: {data['inputs']['model']} on {data['inputs']['hardware']}")
        ax.legend(ncol=6, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(pools) < 3 else -0.2),
                  frameon=False)
        paths.append(_save(fig, out / "memory.png", meta))

        # (b) time per layer: device compute + fetch stalls stacked; CPU and link as lines; tau marked
        L = len(bd.tau_s)
        x = np.arange(L)
        fig, ax = plt.subplots(figsize=(max(6, min(16, 0.18 * L + 3)), 3.6))
        ms = 1e3
        ax.bar(x, bd.compute_s * ms, color="#4c72b0", label="device compute")
        ax.bar(x, bd.stall_s * ms, bottom=bd.compute_s * ms, color="#dd8452", label="fetch stall")
        ax.plot(x, bd.cpu_s * ms, color="#c44e52", marker=".", lw=1, label="host CPU busy")
        ax.plot(x, bd.link_s * ms, color="#55a868", marker=".", lw=1, label="link busy")
        ax.scatter(x, bd.tau_s * ms, color="black", marker="_", s=80, zorder=3, label="layer time (max)")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"Time per layer: {format_time(bd.tau_s.sum())} in MoE layers + {format_time(bd.dense_s)} "
                     f"dense = {format_time(bd.step_s)} per step")
        ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.17), frameon=False)
        ax.set_xlim(-0.6, L - 0.4)
        paths.append(_save(fig, out / "layer_time.png", meta))

        # (c) experts per layer: resident vs offloaded (by site), cache slots
        plan = result.plan
        fig, ax = plt.subplots(figsize=(max(6, min(16, 0.18 * L + 3)), 3.6))
        bottom = np.zeros(L)
        site_colors = {"resident": "#4c72b0", "hybrid": "#8172b2", "fetch": "#dd8452", "local": "#c44e52"}
        site_labels = {"resident": "resident on the GPU", "hybrid": "offloaded, hybrid", "fetch": "offloaded, fetched",
                       "local": "offloaded, run on the CPU"}
        for site in _SITE_ORDER:
            n = np.array([sum(1 for s_ in layer.site if s_ == site) for layer in plan.layers])
            if n.any():
                ax.bar(x, n, bottom=bottom, color=site_colors[site], label=site_labels[site])
                bottom += n
        slots = np.array([layer.cache_slots for layer in plan.layers])
        ax.step(x, slots, where="mid", color="black", lw=1.2, label="cache slots")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("experts")
        ax.set_xlim(-0.6, L - 0.4)
        ax.set_title("Experts per layer by where they run, and cache slots")
        ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.17), frameon=False)
        paths.append(_save(fig, out / "layer_experts.png", meta))
    return paths


def _save(fig, path: Path, meta: dict) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=meta)
    plt.close(fig)
    return path


def _markdown(result: OptimizeResult, d: dict[str, Any], bd: LayerBreakdown) -> str:
    plan = result.plan
    inp, ex, cs, p = d["inputs"], d["experts"], d["cache_slots"], d["predicted"]
    lines = [f"# Deployment plan: {inp['model']} on {inp['hardware']}", ""]

    lines += ["## Inputs", "", "| input | value |", "|---|---|",
              f"| hardware | {inp['hardware']} (digest `{plan.inputs.hardware_digest}`) |",
              f"| model | {inp['model']} (digest `{plan.inputs.model_digest}`) |",
              f"| workload | {inp['workload']} (digest `{plan.inputs.workload_digest}`) |",
              f"| objective | {inp['objective']} |",
              f"| batch size | {inp['batch_size']} |",
              f"| context | {inp['context_tokens']} tokens |",
              f"| quality budget | {_num(inp['quality_budget'])} (this plan: {_num(inp['quality_error'])}) |",
              f"| formats allowed | {', '.join(inp['formats'])} |",
              f"| compute device / host | {inp['compute_device']} / {inp['host_device']} |",
              f"| dense weights | {inp['dense_format']} |",
              f"| prefetch / eviction | {inp['prefetch']} / {inp['eviction']} |", ""]

    lines += ["## Prediction", "", "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in _prediction_rows(p)]
    lines += [""]

    lines += ["## Memory", "", "| pool | capacity | " + " | ".join(PURPOSE_LABELS[k] for k in PURPOSES)
              + " | free | used |", "|---" * (len(PURPOSES) + 4) + "|"]
    for pool, m in d["memory"].items():
        lines.append(f"| {pool} ({m['tier']}) | {format_size(m['capacity_bytes'])} | "
                     + " | ".join(_size(m[k]) for k in PURPOSES)
                     + f" | {format_size(max(m['free_bytes'], 0.0))} | {_pct(m['used_bytes'], m['capacity_bytes'])} |")
    lines += ["", "![memory per pool](memory.png)", ""]

    fmts = [fm for fm in inp["formats"] if fm in ex["by_format"]]
    lines += ["## Experts", "", f"{ex['layers']} MoE layers x {ex['experts_per_layer']} experts = {ex['total']}.", "",
              "| home | " + " | ".join(fmts) + " | total |", "|---" * (len(fmts) + 2) + "|"]
    for home, row in ex["by_home_format"].items():
        lines.append(f"| {home} ({d['memory'].get(home, {}).get('tier', '?')}) | "
                     + " | ".join(str(row.get(fm, 0)) for fm in fmts) + f" | {sum(row.values())} |")
    lines.append("| **total** | " + " | ".join(str(ex["by_format"][fm]) for fm in fmts) + f" | {ex['total']} |")
    lines += ["", f"Where they run: {_sites(ex['by_site'], ex['split_layers'])}. Cache slots: {cs['total']} in all, "
              f"{cs['per_layer_min']}-{cs['per_layer_max']} per layer ({cs['layers_with_cache']} of {ex['layers']} "
              "layers cached).", "", "![experts per layer](layer_experts.png)", ""]

    bound = bd.bound_by
    lines += ["## Time per layer", "",
              f"MoE layers take {format_time(float(bd.tau_s.sum()))} and the dense part (attention, dense weights, "
              f"KV reads) {format_time(bd.dense_s)} per decode step. A layer lasts as long as its busiest resource: "
              f"{bound.count('device')} layers are bound by the compute device, {bound.count('cpu')} by the host "
              f"CPU, {bound.count('link')} by the link (busy, or the device waiting for expert fetches).", "", "![time per layer](layer_time.png)", ""]

    lines += ["## Baselines", "",
              "Each priced on its own engine profile (the software that runs it) by the same cost model, under the same quality budget; each uses one format for the whole "
              "model.", "", "| plan | tok/s | TPOT | plan speed-up | setting |", "|---|---|---|---|---|",
              f"| **this plan (ilp)** | {p['tokens_per_s']:.3g} | {format_time(p['tpot_s'])} | 1.00x | |"]
    for row in d["baselines"]:
        lines.append(f"| {row['name']} | {row['tokens_per_s']:.3g} | {format_time(row['tpot_s'])} | "
                     f"{row['ratio']:.2f}x | {row['setting']} |")
    best = d["best_baseline"]
    lines += ["", (f"Speed-up over the best baseline ({best['name']}): **{best['speedup']:.2f}x**." if best
                   else "No baseline fits this hardware."), ""]
    if best and best["hint"]:
        lines += [f"Note: {best['hint']}.", ""]

    lines += ["## Solver", "", _solver_line(d["solver"], with_time=False) + ".", ""]
    lines += ["## Notes", ""] + [f"- {n}" for n in plan.notes] + [""]
    return "\n".join(lines)
