"""Every examples/*/run.sh runs to completion and prints what its expect.txt lists."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script", sorted(EXAMPLES.glob("*/run.sh")), ids=lambda p: p.parent.name)
def test_example_runs(script):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               COLUMNS="160")
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    expect = (script.parent / "expect.txt").read_text().splitlines()
    output = result.stdout + result.stderr
    for line in filter(None, expect):
        assert line in output, f"{line!r} missing from the output of {script}"
