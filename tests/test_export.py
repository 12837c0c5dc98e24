"""`planner export` and `planner verify`: bundles that run as planned and refuse tampering."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from exporters.bundle import check_manifest
from exporters.checkpoints import make_random_checkpoint
from planner.optimize import OptimizeRequest, optimize
from profiles.errors import InputError

SITES = ["resident", "fetch", "fetch", "hybrid", "local", "fetch", "fetch", "fetch"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_random_checkpoint("mixtral", tmp_path_factory.mktemp("ckpt") / "tiny", hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2)


@pytest.fixture(scope="module")
def plan_path(ckpt, tmp_path_factory):
    """A plan for the tiny checkpoint with every execution site, a 2-slot cache per layer;
    experts and dense weights in fp32, the checkpoint's dtype (one GGUF outtype llama.cpp can write)."""
    plan = optimize(OptimizeRequest(hardware="desktop-4090", model=str(ckpt / "config.json"))).plan
    homes = tuple("node/gpu0" if s == "resident" else "node/cpu0" for s in SITES)
    layers = tuple(lp.model_copy(update={"site": tuple(SITES), "home": homes, "format": ("fp32",) * 8,
                                         "cache_slots": 2, "cache_device": "node/gpu0"}) for lp in plan.layers)
    notes = tuple(n for n in plan.notes if not n.startswith("dense weights:")) + ("dense weights: fp32",)
    return plan.model_copy(update={"layers": layers, "dense_format": "fp32", "notes": notes}).save(
        tmp_path_factory.mktemp("plan") / "plan.json")


def test_export_run_verify(ckpt, plan_path, tmp_path, run_cli):
    out = tmp_path / "bundle"
    r = run_cli("--json", "export", plan_path, "--checkpoint", ckpt, "--out", out)
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    manifest = check_manifest(out)
    for name in ("plan.json", "hardware.yaml", "model.json", "run.py", "README.md", "runtime/run.py",
                 "kernels/manifest.json", "engines/llamacpp.json", "engines/accelerate.json"):
        assert name in manifest["files"], name
    assert "verify" in data["commands"] and "llama.cpp" in data["commands"]
    # the bundle runs with its own copy of the runtime
    run = subprocess.run([sys.executable, str(out / "run.py"), "--checkpoint", str(ckpt), "--prompt", "the cat sat",
                          "--max-new-tokens", "3", "--ignore-eos", "--metrics-out", str(tmp_path / "m.json")],
                         check=False, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "m.json").read_text())["generated_tokens"] == 3
    # measured vs predicted: on the routing the runtime saw, the hit rates are the simulator's
    v = run_cli("--json", "verify", out, "--checkpoint", ckpt, "--max-new-tokens", "6")
    assert v.exit_code == 0, v.stderr
    result = json.loads(v.stdout)
    assert result["hit_rates_equal"] is True
    assert any(h is not None and 0 < h < 1 for h in result["hit_rate"]["measured"])
    rows = {row["metric"]: row for row in result["rows"]}
    assert rows["expert hit rate"]["relative_error"] == pytest.approx(0.0, abs=1e-12)
    # fp32 experts of an fp32 checkpoint: the runtime moves exactly the bytes the simulator
    # counts, one copy per expert and step however many of the step's tokens miss it
    assert rows["bytes moved"]["measured"] > 0
    assert rows["bytes moved"]["relative_error"] == pytest.approx(0.0, abs=1e-12)


def test_tampered_bundle_is_refused(ckpt, plan_path, tmp_path, run_cli):
    out = tmp_path / "bundle"
    # no checkpoint: kernels are built at start-up, and the model comes from --model
    assert run_cli("export", plan_path, "--out", out, "--model", ckpt / "config.json").exit_code == 0
    with (out / "plan.json").open("a") as fh:
        fh.write(" ")
    with pytest.raises(InputError, match="changed since export"):
        check_manifest(out)
    r = run_cli("verify", out, "--checkpoint", ckpt)
    assert r.exit_code == 1 and "sha256" in r.stderr and "Traceback" not in r.output
    run = subprocess.run([sys.executable, str(out / "run.py"), "--checkpoint", str(ckpt), "--prompt", "the cat"],
                         check=False, capture_output=True, text=True)
    assert run.returncode == 1 and "changed since export" in run.stderr


def test_export_never_overwrites_what_is_not_a_bundle(ckpt, plan_path, tmp_path, run_cli):
    model = ("--model", ckpt / "config.json")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = run_cli("export", plan_path, "--out", mine, "--force", *model)
    assert r.exit_code == 1 and "not a bundle" in r.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
    no_model = run_cli("export", plan_path, "--out", tmp_path / "x")
    assert no_model.exit_code == 1 and "--model" in no_model.stderr
    out = tmp_path / "bundle"
    assert run_cli("export", plan_path, "--out", out, *model).exit_code == 0
    again = run_cli("export", plan_path, "--out", out, *model)
    assert again.exit_code == 1 and "--force" in again.stderr
    assert run_cli("export", plan_path, "--out", out, "--force", *model).exit_code == 0
    check_manifest(out)


def test_export_refuses_a_checkpoint_of_another_model(plan_path, tmp_path, run_cli):
    other = make_random_checkpoint("olmoe", tmp_path / "olmoe", hidden_size=64, intermediate_size=64,
                                   num_hidden_layers=2)
    r = run_cli("export", plan_path, "--checkpoint", other, "--out", tmp_path / "b")
    assert r.exit_code == 1 and "does not match the model" in r.stderr
    assert not (tmp_path / "b").exists()


def test_expert_parallel_plan_exports_sglang_and_vllm(ep_plan, tmp_path, run_cli):
    r = run_cli("--json", "export", ep_plan, "--out", tmp_path / "bundle")
    assert r.exit_code == 0, r.stderr
    files = json.loads(r.stdout)["files"]
    assert any(f.startswith("engines/sglang") for f in files) and any(f.startswith("engines/vllm") for f in files)
    assert {"sglang", "vllm"} <= set(json.loads(r.stdout)["commands"])
