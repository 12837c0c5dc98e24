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


@pytest.fixture
def run_bundle():
    """Run a bundle's own ``run.py`` in this process, as ``python BUNDLE/run.py ARGS`` would:
    run_bundle(bundle_dir, "--checkpoint", ckpt, ...) -> exit code (output: capsys). The
    manifest check, the bundle's copy of the runtime (imported as its top-level ``runtime``
    package) and the exit code are the script's; what it changes in ``sys`` (argv, path,
    bytecode settings and path hooks, the imported ``runtime`` package) is undone when it returns. Tests of
    what only a child process shows (bytecode left behind, the one-line error before any
    import) keep a real subprocess."""
    import runpy
    import sys

    def run(bundle: Path, *args) -> int:
        script = str(Path(bundle) / "run.py")
        saved = sys.argv, list(sys.path), sys.dont_write_bytecode, list(sys.path_hooks)
        sys.argv = [script, *map(str, args)]
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.argv, sys.path[:], sys.dont_write_bytecode, sys.path_hooks[:] = saved
            sys.path_importer_cache.clear()
            for name in [m for m in sys.modules if m == "runtime" or m.startswith("runtime.")]:
                del sys.modules[name]
        return code

    return run


@pytest.fixture(scope="session")
def default_optimize():
    """``optimize(OptimizeRequest())`` (Mixtral-8x7B on the RTX 4090 desktop, baselines
    priced), solved once per run: its plan and result are frozen."""
    from planner.optimize import OptimizeRequest, optimize

    return optimize(OptimizeRequest())


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
