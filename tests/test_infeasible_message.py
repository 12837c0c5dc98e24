"""An infeasible device names what it needs, what is usable after the runtime reserve, and a
size that would fit: the figure changes with the device (issue 17 item 8)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from planner.cli import cli
from profiles.hardware import load_profile
from profiles.units import parse_size


@pytest.mark.parametrize("gpu", ["30MiB", "300MiB", "600MiB"])
def test_a_too_small_gpu_gets_the_size_that_fits(tmp_path, gpu):
    text = load_profile("laptop-4060")[0].model_dump_json()
    path = tmp_path / "tiny.json.yaml"
    path.write_text(text.replace('"memory_bytes":8589934592.0', f'"memory_bytes":"{gpu}"', 1))
    res = CliRunner().invoke(cli, ["optimize", "-H", str(path), "-m", "olmoe-1b-7b"])
    assert res.exit_code == 3, res.output
    line = res.output.strip()
    assert "\n" not in line and f"of {gpu.replace('MiB', ' MiB')}" in line, line
    need = re.search(r"needs ([\d.]+ \w+)", line).group(1)
    at_least = re.search(r"at least ([\d.]+ \w+) \(([\d.]+ \w+) more\)", line)
    total = parse_size(at_least.group(1).replace(" ", ""))
    # the reserve (5% + 512 MiB) is counted: the fitting size leaves `need` usable
    assert total * 0.95 - 512 * 2**20 == pytest.approx(parse_size(need.replace(" ", "")), rel=0.05)
    assert parse_size(at_least.group(2).replace(" ", "")) == pytest.approx(total - parse_size(gpu), rel=0.05)
