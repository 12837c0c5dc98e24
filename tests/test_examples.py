"""Every examples/*/run.sh runs to completion and prints what its expect.txt lists.

MOE_PLANNER_EXAMPLE_SMALL=1 asks a script for its reduced inputs (the what-if sweep runs
fewer grid points); there is no timeout: a busy machine is slow, not broken."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", sorted(EXAMPLES.glob("*/run.sh")), ids=lambda p: p.parent.name)
def test_example_runs(script):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               COLUMNS="160", MOE_PLANNER_EXAMPLE_SMALL="1")
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    expect = (script.parent / "expect.txt").read_text().splitlines()
    output = result.stdout + result.stderr
    for line in filter(None, expect):
        assert line in output, f"{line!r} missing from the output of {script}"
