"""planner.report: summary data consistent with the plan, tables, and the report directory."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from planner.optimize import OptimizeRequest, optimize
from planner.plan import load_plan
from planner.layer_breakdown import layer_breakdown
from planner.report import render_summary, summary_data
from planner.report_files import REPORT_FILES, write_report
from profiles.errors import InputError
from profiles.models import load_model
from profiles.units import format_time
from profiles.workload.synthetic import SyntheticWorkload, generate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():
    """Mixtral-8x7B on the 4090 desktop (it must offload) with a small synthetic trace."""
    model = load_model("mixtral-8x7b")
    trace = generate(SyntheticWorkload(num_layers=model.num_moe_layers, num_experts=model.num_experts,
                                       top_k=model.top_k, num_sequences=6, prompt_tokens=32, output_tokens=16, seed=1))
    return optimize(OptimizeRequest(hardware="desktop-4090", model="mixtral-8x7b", trace=trace, time_limit_s=20))


def test_summary_counts_match_the_plan(result):
    plan = result.plan
    d = summary_data(result, compare=False)
    L, E = len(plan.layers), len(plan.layers[0].home)
    ex = d["experts"]
    assert ex["total"] == L * E
    for key in ("by_home", "by_tier", "by_format", "by_site"):
        assert sum(ex[key].values()) == L * E, key
    assert sum(sum(row.values()) for row in ex["by_home_format"].values()) == L * E
    assert ex["by_home"] == {h: n for h, n in sorted(plan.counts()["home"].items())}
    resident = sum(layer.site.count("resident") for layer in plan.layers)
    assert ex["by_site"].get("resident", 0) == resident
    slots = [layer.cache_slots for layer in plan.layers]
    assert d["cache_slots"] == {"total": sum(slots), "per_layer_min": min(slots), "per_layer_max": max(slots),
                                "layers_with_cache": sum(1 for c in slots if c)}
    for pool, use in plan.memory.items():
        m = d["memory"][pool]
        assert m["used_bytes"] == pytest.approx(use.used_bytes)
        assert m["free_bytes"] == pytest.approx(use.capacity_bytes - use.used_bytes)
        assert m["used_bytes"] <= m["capacity_bytes"]
    assert d["predicted"] == plan.predicted
    assert d["solver"]["status"] == plan.solver.status and d["solver"]["objective_s"] == plan.solver.objective
    assert d["predicted"]["tokens_per_s"] == pytest.approx(1.0 / d["predicted"]["tpot_s"])  # batch 1
    assert "baselines" not in d and "best_baseline" not in d
    json.dumps(d)  # JSON-ready


def test_summary_compare_ratios(result):
    d = summary_data(result, compare=True)
    plan_tps = result.plan.predicted["tokens_per_s"]
    assert {r["name"] for r in d["baselines"]} == set(result.baselines)
    speeds = [r["tokens_per_s"] for r in d["baselines"]]
    assert speeds == sorted(speeds, reverse=True)
    for row in d["baselines"]:
        b = result.baselines[row["name"]]
        assert row["tokens_per_s"] == b.predicted["tokens_per_s"]
        assert row["ratio"] == pytest.approx(plan_tps / b.predicted["tokens_per_s"])
        if b.inputs.engine == result.plan.inputs.engine:  # on the same software the ILP never loses
            assert row["ratio"] >= 1 - 1e-9, f"baseline {row['name']} beats the ILP"
    best = max(result.baselines.values(), key=lambda b: b.predicted["tokens_per_s"])
    assert d["best_baseline"]["tokens_per_s"] == best.predicted["tokens_per_s"]
    assert d["best_baseline"]["speedup"] == pytest.approx(plan_tps / best.predicted["tokens_per_s"])


def test_layer_breakdown_adds_up(result):
    """The per-layer times rebuilt from the Plan give its predicted TPOT, for the ILP's plan and
    for every baseline's (accelerate streams: the Plan records that as fetch)."""
    for plan in (result.plan, *result.baselines.values()):
        bd = layer_breakdown(plan, result.setup)
        assert bd.tau_s.shape == (len(plan.layers),)
        assert bd.step_s == pytest.approx(plan.predicted["tpot_s"], rel=1e-9)
        assert (bd.tau_s >= bd.compute_s + bd.stall_s - 1e-15).all() and (bd.tau_s >= bd.cpu_s - 1e-15).all()
        assert len(bd.bound_by) == len(plan.layers)


def test_render_summary_lists_every_baseline(result):
    buf = io.StringIO()
    render_summary(result, Console(file=buf, width=160), compare=True)
    text = buf.getvalue()
    for word in ("Memory per pool", "Experts by home and format", "tokens/s", "solver: highs", "speed-up"):
        assert word in text
    for name in result.baselines:
        assert name in text
    buf = io.StringIO()
    render_summary(result, Console(file=buf, width=160))
    assert "Baselines" not in buf.getvalue()


def test_write_report(result, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    mine = out / "notes.txt"
    mine.write_text("user's file")
    paths = write_report(result, out)
    assert sorted(p.name for p in paths) == sorted(REPORT_FILES)
    assert mine.read_text() == "user's file"
    pngs = [p for p in paths if p.suffix == ".png"]
    assert len(pngs) == 3
    for p in pngs:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, p
        assert data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    md = (out / "report.md").read_text()
    assert f"| objective | {result.plan.objective} |" in md  # the objective asked for
    assert f"objective {format_time(result.plan.solver.objective)}/step" in md  # and the value reached
    for name in result.baselines:
        assert f"| {name} |" in md
    for p in pngs:
        assert f"]({p.name})" in md
    assert (out / "plan.json").read_text() == result.plan.to_json()
    assert load_plan(out / "plan.json").layers == result.plan.layers

    again = write_report(result, tmp_path / "new" / "dir")  # created, parents too
    for a, b in zip(paths, again):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two writes"


def test_write_report_refuses_a_file(result, tmp_path):
    target = tmp_path / "report"
    target.write_text("not a directory")
    with pytest.raises(InputError, match="report directory is a file"):
        write_report(result, target)
    assert target.read_text() == "not a directory"
