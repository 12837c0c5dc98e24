"""A candidate format the engine does not run is named, not dropped in silence.

planner.setup.runnable_formats keeps the --formats the engine runs on the plan's devices and
refuses only when none is left; `planner optimize --formats bf16,q4_k` (q4_k: a GGUF format
the bundle runtime has no kernel for) planned bf16 alone and its summary listed "formats bf16"
with no word on q4_k. The plan's notes and the summary now name the formats left out."""

from __future__ import annotations

import json


def test_a_format_the_engine_does_not_run_is_named(run_cli, tmp_path):
    out = tmp_path / "plan.json"
    res = run_cli("optimize", "--parallel", "offload", "--formats", "bf16,q4_k", "--quality-budget", "0.5",
                  "--out", out)
    assert res.exit_code == 0, res.output
    notes = [n for n in json.loads(out.read_text())["notes"] if n.startswith("formats not run")]
    assert len(notes) == 1 and "q4_k" in notes[0] and "bundle" in notes[0] and "bf16" not in notes[0], notes
    assert notes[0] in " ".join(res.output.split())


def test_formats_the_engine_runs_give_no_note(default_optimize):
    assert not [n for n in default_optimize.plan.notes if n.startswith("formats not run")]
