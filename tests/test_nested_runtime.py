"""The bundle runs nested int8 experts (issue 16 item 3): planes stored, int8 assembled on use.

A tiny Mixtral built from a config, every expert resident at int8:

- the kernels file stores a nested expert as its two int4 planes (no int8 codes), and the
  runtime refuses kernels built without them;
- experts holding both planes, or the high plane with the low plane fetched at every use,
  compute exactly what the plain int8 experts compute (the same codes), and each use of a
  fetch-low expert moves its low plane from host memory, half its int8 bytes;
- experts on their high plane alone run at int4 quality: close to int8, not equal.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch", reason="needs the [runtime] extra")
pytest.importorskip("onnxruntime", reason="needs the [runtime] extra")
pytest.importorskip("safetensors", reason="needs the [runtime] extra")

PROMPT = [1, 17, 5, 99, 42, 7, 64, 3, 11, 23]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from exporters.checkpoints import make_random_checkpoint

    return make_random_checkpoint("mixtral", tmp_path_factory.mktemp("ckpt") / "tiny", hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2)


@pytest.fixture(scope="module")
def base(ckpt):
    """A plan for the tiny model with every expert resident at int8, as JSON."""
    from planner.optimize import OptimizeRequest, optimize

    plan = optimize(OptimizeRequest(hardware="desktop-4090", model=str(ckpt / "config.json"))).plan
    E = len(plan.layers[0].home)
    layers = tuple(lp.model_copy(update={"site": ("resident",) * E, "home": (plan.compute_device,) * E,
                                         "format": ("int8",) * E, "cache_slots": 0, "cache_device": None,
                                         "cache_format": None}) for lp in plan.layers)
    return json.loads(plan.model_copy(update={"layers": layers, "dense_format": "fp32"}).to_json())


def with_planes(base: dict, planes: list[str]) -> dict:
    from planner.plan import Plan

    data = json.loads(json.dumps(base))
    for layer in data["layers"]:
        layer["planes"] = planes
    Plan.model_validate(data)  # the planner's contract holds it too
    return data


def logits(plan: dict, ckpt, kernels_dir=None):
    from exporters.runtime import load_planned_model

    with load_planned_model(plan, ckpt, kernels_dir=kernels_dir, device="cpu", background=False) as rt:
        rt.metrics.reset()
        with torch.no_grad():
            out = rt.model(torch.tensor([PROMPT])).logits[0]
        return out, rt.metrics.summary()


def test_kernels_store_the_planes_and_must_match_the_plan(base, ckpt, tmp_path):
    from exporters.runtime.errors import RuntimeInputError
    from exporters.runtime.kernels import build_kernels

    plan = with_planes(base, ["both", "fetch-low", "high", ""] * 2)
    build_kernels(plan, ckpt, tmp_path / "k")
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert manifest["layers"]["0"]["nested"] == ["0", "1", "2", "4", "5", "6"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "k" / manifest["layers"]["0"]["file"]), "np") as f:
        names = set(f.keys())
    assert {"0.gate_up.qh", "0.gate_up.ql", "0.down.scales"} <= names and "0.gate_up.q" not in names
    assert "3.gate_up.q" in names and "3.gate_up.qh" not in names
    # kernels built for the plain int8 plan do not serve the nested one
    build_kernels(base, ckpt, tmp_path / "plain")
    with pytest.raises(RuntimeInputError, match="another plan"):
        logits(plan, ckpt, kernels_dir=tmp_path / "plain")


def test_both_and_fetch_low_compute_what_int8_computes(base, ckpt):
    ref, ref_m = logits(base, ckpt)
    got, m = logits(with_planes(base, ["both", "fetch-low"] * 4), ckpt)
    assert torch.equal(got, ref)
    # the fetch-low experts' low planes crossed from host memory, once per use in the step
    host = base["host_device"]
    moved = m["bytes_moved"].get(host, 0)
    assert moved > 0 and not ref_m["bytes_moved"].get(host)
    H, I = 64, 128
    low_plane = 3 * H * I / 2  # gate_up [2I, H] and down [H, I] at 4 bits
    assert moved % low_plane == 0, (moved, low_plane)
    uses = moved // low_plane
    assert uses == m["expert_fetches"]  # one low plane per fetch-low expert and step
    # every access of a fetch-low expert counts as a miss (as the simulator counts it), the others resident
    assert sum(m["misses"]) >= uses and not any(m["hits"]) and not any(ref_m["misses"])
    assert sum(m["misses"]) + m["expert_hit_rate"] * m["expert_accesses"] == pytest.approx(m["expert_accesses"])


def test_high_plane_alone_runs_at_int4_quality(base, ckpt):
    ref, _ = logits(base, ckpt)
    got, m = logits(with_planes(base, ["high"] * 8), ckpt)
    assert not torch.equal(got, ref)
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
    assert float(cos.min()) >= 0.99, cos
    assert not m["bytes_moved"].get(base["host_device"])  # nothing fetched


def test_an_exported_bundle_runs_its_nested_experts(base, ckpt, tmp_path, run_cli, run_bundle, monkeypatch):
    """``planner export`` of a plan with planes writes a bundle whose own run.py decodes, moving
    the fetch-low experts' low planes from host memory."""
    plan = with_planes(base, ["both", "fetch-low", "high", ""] * 2)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "bundle"
    r = run_cli("export", tmp_path / "plan.json", "--checkpoint", ckpt, "--out", out)
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "kernels" / "manifest.json").read_text())["layers"]["0"]["nested"] == \
        ["0", "1", "2", "4", "5", "6"]
    monkeypatch.chdir(tmp_path)
    assert run_bundle(out, "--checkpoint", ckpt, "--prompt", "the cat sat", "--max-new-tokens", 3, "--ignore-eos",
                      "--device", "cpu", "--metrics-out", tmp_path / "m.json") == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["generated_tokens"] == 3
    assert metrics["bytes_moved"].get(base["host_device"], 0) > 0
