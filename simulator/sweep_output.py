"""What a sweep writes: the results table, its Pareto front and plot, and the goodput files.

See :mod:`simulator.sweep` for the grid; :mod:`simulator.goodput` for the rate ladder.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .goodput import slo_text, write_goodput

if TYPE_CHECKING:
    from .sweep import Grid

__all__ = ["COLUMNS", "goodput_cell", "pareto_front", "point_label", "write_outputs"]


def pareto_front(rows: list[dict]) -> list[int]:
    """Indices of the rows no other row beats on both cost per hour (lower) and tok/s (higher)."""
    ok = [(i, r["cost_per_hour_usd"], r["tokens_per_s"]) for i, r in enumerate(rows)
          if r.get("status") == "ok" and r.get("cost_per_hour_usd") is not None]
    def beats(c2: float, t2: float, c: float, t: float) -> bool:  # tok/s within 1e-6 count as equal
        same_t = abs(t2 - t) <= 1e-6 * max(abs(t), 1e-12)
        return c2 <= c and (t2 >= t or same_t) and (c2 < c or (t2 > t and not same_t))

    front = [i for i, c, t in ok if not any(beats(c2, t2, c, t) for _, c2, t2 in ok)]
    return sorted(front, key=lambda i: rows[i]["cost_per_hour_usd"])


COLUMNS = ("id", "status", "tokens_per_s", "tpot_p50_s", "ttft_p50_s", "expert_hit_rate", "predicted_tokens_per_s",
           "cost_per_hour_usd", "usd_per_million_tokens", "plan_s", "simulate_s")


def write_outputs(grid: Grid, rows: list[dict], out_dir: Path) -> list[Path]:
    """``results.csv``, ``results.json``, ``results.md`` and ``pareto.png`` (cost per hour vs tok/s);
    with a ``goodput:`` block, a goodput column and ``goodput.csv/.json/.png`` too."""
    knobs = list(grid.vary)
    front = set(pareto_front(rows))
    columns = COLUMNS + (("goodput_rps",) if grid.goodput is not None else ())
    files = []
    csv_path = out_dir / "results.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(knobs + list(columns) + ["pareto"])
        for i, r in enumerate(rows):
            w.writerow([r["point"].get(k) for k in knobs] + [_cell(r.get(c)) for c in columns] + [i in front])
    files.append(csv_path)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps({"grid": grid.model_dump(mode="json"), "rows": rows,
                                     "pareto": sorted(front)}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    files.append(json_path)
    md = [f"# Sweep: {grid.name}", "", grid.description, "",
          "| " + " | ".join(knobs + ["tok/s", "TPOT p50", "TTFT p50", "hit rate", "$/h", "$/M tok", "Pareto"]) + " |",
          "|" + "---|" * (len(knobs) + 7)]
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            md.append("| " + " | ".join([str(r["point"].get(k)) for k in knobs] + [r["status"]] + [""] * 6) + " |")
            continue
        md.append("| " + " | ".join([str(r["point"].get(k)) for k in knobs] + [
            f"{r['tokens_per_s']:.2f}", f"{1e3 * r['tpot_p50_s']:.1f} ms" if r["tpot_p50_s"] else "",
            f"{r['ttft_p50_s']:.2f} s" if r["ttft_p50_s"] else "", f"{r['expert_hit_rate']:.3f}",
            _cell(r["cost_per_hour_usd"]), _cell(r["usd_per_million_tokens"]), "yes" if i in front else ""]) + " |")
    md_path = out_dir / "results.md"
    if grid.goodput is not None:
        md += ["", f"Goodput ({slo_text(grid.goodput)}): "
               + "; ".join(f"{point_label(r['point'])} {goodput_cell(r)}" for r in rows)]
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    files.append(md_path)
    files.append(_pareto_plot(grid, rows, front, out_dir / "pareto.png"))
    if grid.goodput is not None:
        curves = [(point_label(r["point"]) or r["id"], r["goodput"]) for r in rows if r.get("goodput")]
        files += write_goodput(curves, grid.goodput, out_dir, grid.name)
    return files


def point_label(point: dict[str, Any]) -> str:
    """``desktop-4090, batch 8``: a point's varied values, as a plot legend reads them."""
    return ", ".join(str(v) if k in ("hardware", "gpu", "model", "scheduler") else f"{k} {v}"
                     for k, v in point.items())


def goodput_cell(row: dict) -> str:
    """``1.5 req/s`` (``>= 4 req/s`` when no rate of the ladder missed; ``< 0.25`` when the lowest did)."""
    if row.get("status") != "ok" or not row.get("goodput"):
        return row.get("status", "")[:40]
    g = row["goodput"]
    if g["goodput_rps"] == 0:
        return f"< {g['rates'][0]['rate_rps']:.3g} req/s"
    return f"{'' if g['bounded'] else '>= '}{g['goodput_rps']:.3g} req/s"


def _cell(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else v)


def _pareto_plot(grid: Grid, rows: list[dict], front: set[int], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [(i, r) for i, r in enumerate(rows) if r["status"] == "ok" and r.get("cost_per_hour_usd") is not None]
    ax.scatter([r["cost_per_hour_usd"] for _, r in pts], [r["tokens_per_s"] for _, r in pts], color="0.6",
               label="points")
    fr = [rows[i] for i in sorted(front, key=lambda i: rows[i]["cost_per_hour_usd"])]
    ax.plot([r["cost_per_hour_usd"] for r in fr], [r["tokens_per_s"] for r in fr], "o-", color="C3",
            label="Pareto front")
    for i, r in pts:
        if i in front:
            ax.annotate(", ".join(f"{v}" for v in r["point"].values()), (r["cost_per_hour_usd"], r["tokens_per_s"]),
                        fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("cost, $ per hour")
    ax.set_ylabel("simulated tokens/s")
    ax.set_title(f"{grid.name}: cost vs throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
