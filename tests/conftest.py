"""Shared fixtures: the CLI runner and the path to ../shared/traces."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO.parent / "shared" / "traces"
ESFT = SHARED_TRACES / "esft-deepseek-v2-lite" / "routing_top6.npz"
needs_esft = pytest.mark.skipif(not ESFT.is_file(), reason=f"shared ESFT trace not found at {ESFT} (../shared absent)")


def small_cluster(path: Path, nodes: int = 2, gpus: int = 2) -> Path:
    """Write ``cluster-h100-2node`` cut to ``nodes`` nodes of ``gpus`` H100s (one NVMe each) to
    ``path``; return ``path``."""
    import yaml

    from profiles.hardware import BUNDLED_DIR

    data = yaml.safe_load((BUNDLED_DIR / "cluster-h100-2node.yaml").read_text())
    data["name"] = f"tiny-{nodes}x{gpus}"
    node = data["nodes"][0]
    node["count"] = nodes
    for dev in node["devices"]:
        if dev["name"] in ("gpu", "nvme"):
            dev["count"] = gpus if dev["name"] == "gpu" else 1
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def run_cli():
    """Invoke the `planner` CLI in-process: run_cli("profiles", "list", "--json") -> Result."""
    from planner.cli import cli

    def invoke(*args: str, input: str | None = None):
        return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=True)

    return invoke


@pytest.fixture(scope="session")
def ep_plan(tmp_path_factory) -> Path:
    """A planned EP case, solved once per run and saved as plan.json: OLMoE on two NVLinked
    3090s, with redundant experts (test_export, test_export_paths)."""
    from planner.cluster import ClusterRequest, plan_cluster

    plan = plan_cluster(ClusterRequest(hardware="workstation-2x3090-nvlink", model="olmoe-1b-7b",
                                       time_limit_s=30)).plan
    return plan.save(tmp_path_factory.mktemp("ep") / "ep-plan.json")


@pytest.fixture
def shared_traces() -> Path:
    """../shared/traces beside the repo; tests that need it skip when it is absent."""
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"real routing traces not found at {SHARED_TRACES} (../shared/traces beside the repo)")
    return SHARED_TRACES
