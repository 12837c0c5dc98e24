"""An energy plan on a profile without idle power says so.

--objective energy and --max-watts count idle power all along (planner.energy); a device whose
profile states no idle_power_w idles at 0 W there, so a plan that waits on its link looks as
frugal as its busy seconds: on desktop-4090 (no idle figures) `--max-watts 1` was met by a
22 s/token plan reported at 1 W, with nothing saying why. The plan's notes and the summary
now name the devices counted at 0 W idle, and only those."""

from __future__ import annotations

import json


def _plan(run_cli, tmp_path, hardware: str) -> tuple[str, dict]:
    out = tmp_path / f"{hardware}.json"
    res = run_cli("optimize", "-H", hardware, "--parallel", "offload", "--max-watts", "2000", "--out", out)
    assert res.exit_code == 0, res.output
    return res.output, json.loads(out.read_text())


def test_missing_idle_power_is_named(run_cli, tmp_path):
    output, plan = _plan(run_cli, tmp_path, "desktop-4090")
    notes = [n for n in plan["notes"] if n.startswith("idle power:")]
    assert len(notes) == 1 and "node/gpu0" in notes[0] and "0 W" in notes[0], plan["notes"]
    assert notes[0] in " ".join(output.split())  # the summary prints it (wrapped to the terminal)


def test_only_devices_without_idle_power_are_named(run_cli, tmp_path):
    output, plan = _plan(run_cli, tmp_path, "workstation-3090")  # the GPU states 20 W idle, the CPU none
    notes = [n for n in plan["notes"] if n.startswith("idle power:")]
    assert len(notes) == 1 and "node/cpu0" in notes[0] and "node/gpu0" not in notes[0], plan["notes"]
