"""`planner trace stats` and `planner trace import` through click's CliRunner."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from planner.cli import cli
from profiles.workload.trace import Trace, save_trace

SHARED = Path(__file__).parents[1] / ".." / "shared" / "traces"
ESFT = SHARED / "esft-deepseek-v2-lite" / "routing_top6.npz"
needs_esft = pytest.mark.skipif(not ESFT.is_file(), reason=f"shared ESFT trace not found at {ESFT} (../shared absent)")


@pytest.fixture()
def small_trace(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    T, L, K, E = 40, 3, 2, 8
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])
    trace = Trace(expert_ids=ids, seq_lens=np.array([10, 10, 20]), phase=np.zeros(T, np.uint8), num_experts=E,
                  layer_map=(1, 2, 3), gate_weights=rng.random((T, L, K)).astype(np.float32), model="toy")
    return save_trace(trace, tmp_path / "toy.npz")


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_group_is_importable():
    from planner.commands import COMMANDS
    from planner.commands.trace import trace

    assert trace in COMMANDS and {"stats", "import"} <= set(trace.commands)


def test_stats_table(small_trace):
    result = run("trace", "stats", str(small_trace))
    assert result.exit_code == 0, result.output
    assert "toy: 40 tokens, 3 MoE layers, top-2 of 8 experts" in result.stdout
    assert "lru" in result.stdout and "belady" in result.stdout and "mean" in result.stdout
    assert "2 / 4 / 8 slots" in result.stdout  # default sizes K, 2K, 4K (E/2 = 4)


def test_stats_json(small_trace):
    result = run("trace", "stats", str(small_trace), "--cache-sizes", "2,5", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # nothing but JSON on stdout
    assert data["format"] == "trace" and data["cache_sizes"] == [2, 5]
    assert set(data["curves"]) == {"lru", "lfu", "static", "belady"}
    assert np.asarray(data["curves"]["lru"]).shape == (3, 9)
    assert np.asarray(data["frequency"]).sum() == 40 * 3 * 2
    assert [row["hidden_layer"] for row in data["layers"]] == [1, 2, 3]
    assert data["conventions"]["token_as_set"] is False
    assert data["mean_over_layers"]["lru"]["2"] == pytest.approx(np.mean(np.asarray(data["curves"]["lru"])[:, 2]))


def test_stats_options_after_group(small_trace):
    result = run("--json", "trace", "stats", str(small_trace), "--policies", "lru,static", "--token-as-set",
                 "--reset-per-sequence")
    data = json.loads(result.stdout)
    assert set(data["curves"]) == {"lru", "static"}
    assert data["conventions"]["token_as_set"] and data["conventions"]["reset_per_sequence"]


def test_stats_report(small_trace, tmp_path):
    report = tmp_path / "report"
    result = run("trace", "stats", str(small_trace), "--report", str(report))
    assert result.exit_code == 0, result.output
    for name in ("stats.json", "stats.npz", "hit_rate_curves.png", "frequency_heatmap.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    assert (report / "hit_rate_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((report / "stats.json").read_text())
    assert saved["report"]["dir"] == str(report)
    with np.load(report / "stats.npz") as arrays:
        assert arrays["transitions"].shape == (2, 8, 8) and arrays["curve_lru"].shape == (3, 9)


@pytest.mark.parametrize("args, message", [
    (["--cache-sizes", "2,x"], "--cache-sizes: cache sizes must be integers"),
    (["--cache-sizes", "99"], "cache size out of range"),
    (["--policies", "fifo"], "unknown cache policy"),
])
def test_stats_bad_options(small_trace, args, message):
    result = run("trace", "stats", str(small_trace), *args)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_stats_missing_file_and_bad_files(tmp_path):
    result = run("trace", "stats", str(tmp_path / "nope.npz"))
    assert result.exit_code == 1 and "file not found" in result.stderr
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_Evil(tmp_path / "pwned"), protocol=2))
    result = run("trace", "stats", str(evil))
    assert result.exit_code == 1 and "refusing to load" in result.stderr and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1 and not (tmp_path / "pwned").exists()


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.target}",)


def test_import_aggregate_and_stats(tmp_path):
    dump = tmp_path / "dump.json"
    counts = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    dump.write_text(json.dumps({"rank": 0, "logical_count": counts.tolist()}))
    out = tmp_path / "agg.npz"
    result = run("--json", "trace", "import", str(dump), str(out), "--top-k", "2")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["kind"] == "aggregate" and info["format"] == "sglang" and out.is_file()
    result = run("trace", "import", str(dump), str(out))
    assert result.exit_code == 1 and "output file exists" in result.stderr
    assert run("trace", "import", str(dump), str(out), "--force", "--top-k", "2").exit_code == 0
    result = run("trace", "import", str(dump), str(tmp_path / "agg.bin"))
    assert result.exit_code == 1 and "must be a .npz" in result.stderr
    result = run("trace", "stats", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "aggregate" and data["cache_sizes"] == [2, 4]
    assert set(data["curves"]) == {"static"}
    table = run("trace", "stats", str(out))
    assert "aggregate only" in table.stdout


@needs_esft
def test_esft_needs_a_task_and_imports(tmp_path):
    result = run("trace", "stats", str(ESFT))
    assert result.exit_code == 1
    assert "intent, law, summary, translation, or all" in result.stderr
    out = tmp_path / "summary.npz"
    result = run("trace", "import", str(ESFT), str(out), "--task", "summary")
    assert result.exit_code == 0 and "wrote trace" in result.stdout
    result = run("--json", "trace", "stats", str(out), "--policies", "lru,static")
    data = json.loads(result.stdout)
    assert data["tokens"] == 8479 and data["cache_sizes"] == [6, 12, 24, 32]
    lru = data["mean_over_layers"]["lru"]
    assert [round(lru[c], 2) for c in ("6", "12", "24", "32")] == [0.22, 0.39, 0.61, 0.73]
