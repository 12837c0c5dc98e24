"""The README's quick-start commands are what CI runs, and the main job works."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_two_quick_start_commands_and_ci_runs_the_test_one():
    install_and_run, install_and_test = quick_start_commands()
    assert "pip install" in install_and_run and "planner " in install_and_run
    assert "pytest" in install_and_test
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci, ".ci/run must run exactly the README's test command"


def test_main_job_of_the_quick_start_runs():
    install_and_run, _ = quick_start_commands()
    planner_args = install_and_run.split("&& planner ", 1)[1].split()
    result = subprocess.run([sys.executable, "-m", "planner.cli", *planner_args], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
