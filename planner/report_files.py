"""A plan's report directory: ``report.md`` with three PNG plots (memory per pool, time per
layer, experts and cache per layer) and ``plan.json``.

Reports are deterministic: no timestamps or wall-clock times in ``report.md`` or the PNGs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from profiles.errors import InputError
from profiles.units import format_size, format_time

from .layer_breakdown import LayerBreakdown, layer_breakdown
from .report import (PURPOSE_LABELS, PURPOSES, SITE_ORDER, _num, _pct, _prediction_rows, _sites, _size,
                     _solver_line, summary_data)

if TYPE_CHECKING:
    from .optimize import OptimizeResult

__all__ = ["write_report", "REPORT_FILES"]

# Every file write_report owns in its directory; nothing else there is touched.
REPORT_FILES = ("report.md", "plan.json", "memory.png", "layer_time.png", "layer_experts.png")

_COLORS = {"expert_bytes": "#4c72b0", "cache_bytes": "#55a868", "dense_bytes": "#c44e52", "kv_bytes": "#8172b2",
           "workspace_bytes": "#ccb974", "free_bytes": "#e5e5e5"}


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
        for site in SITE_ORDER:
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
