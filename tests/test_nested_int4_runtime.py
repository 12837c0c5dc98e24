"""The bundle runs nested int4 experts, 2 + 2 (issue 16 item 3): planes stored, int4 assembled on use.

A tiny Mixtral built from a config, every expert resident at int4 (exporters/runtime/nested.py):

- the kernels file stores a nested int4 expert as two 2-bit planes, the scales and zero points
  with the high plane (no int4 codes);
- experts holding both planes, or the high plane with the low plane fetched at every use,
  compute exactly what the plain int4 bundle computes (logits equal bit for bit), and each use
  of a fetch-low expert moves its low plane (2 bits a weight) from host memory;
- experts on their high plane alone run at 2-bit quality: stated threshold, cosine >= 0.99 to
  the fp32 bundle's logits at every position (measured on CPU, worst position: high plane
  0.9962, plain int4 0.9976, the runtime's plain int2 0.9966; relative logits error 0.070,
  0.028, 0.067), on CPU and, when present, CUDA alike;
- ``planner export`` of such a plan writes a bundle whose run.py decodes with them.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch", reason="needs the [runtime] extra")
pytest.importorskip("onnxruntime", reason="needs the [runtime] extra")
pytest.importorskip("safetensors", reason="needs the [runtime] extra")

PROMPT = [1, 17, 5, 99, 42, 7, 64, 3, 11, 23]
H, I = 64, 128
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from exporters.checkpoints import make_random_checkpoint

    return make_random_checkpoint("mixtral", tmp_path_factory.mktemp("ckpt") / "tiny", hidden_size=H,
                                  intermediate_size=I, num_hidden_layers=2)


@pytest.fixture(scope="module")
def plain(ckpt):
    """``fmt -> plan JSON`` for the tiny model with every expert resident at ``fmt``."""
    from planner.optimize import OptimizeRequest, optimize

    plan = optimize(OptimizeRequest(hardware="desktop-4090", model=str(ckpt / "config.json"))).plan
    E = len(plan.layers[0].home)

    def at(fmt: str) -> dict:
        layers = tuple(lp.model_copy(update={"site": ("resident",) * E, "home": (plan.compute_device,) * E,
                                             "format": (fmt,) * E, "cache_slots": 0, "cache_device": None,
                                             "cache_format": None}) for lp in plan.layers)
        return json.loads(plan.model_copy(update={"layers": layers, "dense_format": "fp32"}).to_json())

    return at


def with_planes(base: dict, planes: list[str]) -> dict:
    from planner.plan import Plan

    data = json.loads(json.dumps(base))
    for layer in data["layers"]:
        layer["planes"] = planes
    Plan.model_validate(data)  # the planner's contract holds it too
    return data


def logits(plan: dict, ckpt, device: str = "cpu", kernels_dir=None):
    from exporters.runtime import load_planned_model

    with load_planned_model(plan, ckpt, kernels_dir=kernels_dir, device=device, background=False) as rt:
        rt.metrics.reset()
        with torch.no_grad():
            out = rt.model(torch.tensor([PROMPT], device=device)).logits[0].float().cpu()
        return out, rt.metrics.summary()


def test_kernels_store_two_bit_planes(plain, ckpt, tmp_path):
    from safetensors import safe_open

    from exporters.runtime.kernels import build_kernels

    plan = with_planes(plain("int4"), ["both", "fetch-low", "high", ""] * 2)
    build_kernels(plan, ckpt, tmp_path / "k")
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert manifest["layers"]["0"]["nested"] == ["0", "1", "2", "4", "5", "6"]
    with safe_open(str(tmp_path / "k" / manifest["layers"]["0"]["file"]), "np") as f:
        names = set(f.keys())
        assert f.get_tensor("0.gate_up.qh").nbytes == f.get_tensor("0.gate_up.ql").nbytes == 2 * I * H * 2 // 8
    assert {"0.gate_up.qh", "0.gate_up.ql", "0.gate_up.zp", "0.down.scales"} <= names and "0.gate_up.q" not in names
    assert "3.gate_up.q" in names and "3.gate_up.qh" not in names


@pytest.mark.parametrize("device", DEVICES)
def test_both_and_fetch_low_compute_what_int4_computes(plain, ckpt, device):
    ref, ref_m = logits(plain("int4"), ckpt, device)
    got, m = logits(with_planes(plain("int4"), ["both", "fetch-low"] * 4), ckpt, device)
    assert torch.equal(got, ref)
    host = plain("int4")["host_device"]
    moved = m["bytes_moved"].get(host, 0)
    assert moved > 0 and not ref_m["bytes_moved"].get(host)
    low_plane = 3 * H * I * 2 // 8  # gate_up [2I, H] and down [H, I] at 2 bits
    assert moved % low_plane == 0, (moved, low_plane)
    assert moved // low_plane == m["expert_fetches"]  # one low plane per fetch-low expert and step


@pytest.mark.parametrize("device", DEVICES)
def test_high_plane_alone_runs_at_two_bit_quality(plain, ckpt, device):
    fp32, _ = logits(plain("fp32"), ckpt, device)
    int4, _ = logits(plain("int4"), ckpt, device)
    int2, _ = logits(plain("int2"), ckpt, device)
    high, m = logits(with_planes(plain("int4"), ["high"] * 8), ckpt, device)
    assert not m["bytes_moved"].get(plain("int4")["host_device"])  # nothing fetched

    def cos(x):
        return float(torch.nn.functional.cosine_similarity(x, fp32, dim=-1).min())  # the worst position

    def err(x):
        return float((x - fp32).norm() / fp32.norm())

    print(f"vs fp32 ({device}): cosine int4 {cos(int4):.4f}, int2 {cos(int2):.4f}, high plane {cos(high):.4f}; "
          f"relative error int4 {err(int4):.4f}, int2 {err(int2):.4f}, high plane {err(high):.4f}")
    assert cos(high) >= 0.99  # the stated threshold for the 2-bit high plane
    assert err(high) > 2 * err(int4)  # 2-bit quality, not int4's


def test_an_exported_bundle_runs_its_nested_int4_experts(plain, ckpt, tmp_path, run_cli, run_bundle, monkeypatch):
    """``planner export`` of an int4 plan with planes writes a bundle whose own run.py decodes,
    moving the fetch-low experts' 2-bit low planes from host memory."""
    plan = with_planes(plain("int4"), ["both", "fetch-low", "high", ""] * 2)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "bundle"
    r = run_cli("export", tmp_path / "plan.json", "--checkpoint", ckpt, "--out", out)
    assert r.exit_code == 0, r.stderr
    monkeypatch.chdir(tmp_path)
    assert run_bundle(out, "--checkpoint", ckpt, "--prompt", "the cat sat", "--max-new-tokens", 3, "--ignore-eos",
                      "--device", "cpu", "--metrics-out", tmp_path / "m.json") == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["generated_tokens"] == 3
    moved = metrics["bytes_moved"].get(plan["host_device"], 0)
    assert moved > 0 and moved % (3 * H * I * 2 // 8) == 0  # whole 2-bit low planes
