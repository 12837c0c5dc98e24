"""The bundle runs planned low-bit copies (issue 16 item 4; exporters/runtime/miss_copy.py).

A tiny Mixtral built from a config, every expert fetched at int8 from host memory through a
two-slot cache per layer:

- the kernels file stores each fetch expert's int4 copy beside its int8 weights, and kernels
  built for the plan without copies do not serve the plan with them;
- a threshold no gate is below loads no copy (logits and bytes as without copies); one every
  gate is below loads the copy on every miss and runs it on later hits, which computes what
  a plan fetching int4 experts computes, bit for bit, moving its bytes;
- in between: the copies loaded are the low-gate misses', the bytes fall between.
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
    """Every expert fetched at int8 from host memory through two cache slots per layer, as JSON."""
    from planner.optimize import OptimizeRequest, optimize

    plan = optimize(OptimizeRequest(hardware="desktop-4090", model=str(ckpt / "config.json"))).plan
    E = len(plan.layers[0].home)
    layers = tuple(lp.model_copy(update={"site": ("fetch",) * E, "home": (plan.host_device,) * E,
                                         "format": ("int8",) * E, "cache_slots": 2,
                                         "cache_device": plan.compute_device, "cache_format": "int8"})
                   for lp in plan.layers)
    return json.loads(plan.model_copy(update={"layers": layers, "dense_format": "fp32", "prefetch": "none"}).to_json())


def with_copies(base: dict, gate_below: float, fmt: str = "int4") -> dict:
    from planner.plan import Plan

    data = json.loads(json.dumps(base))
    for layer in data["layers"]:
        layer["miss_copy"] = {"format": fmt, "gate_below": gate_below}
    Plan.model_validate(data)  # the planner's contract holds it too
    return data


def at_format(base: dict, fmt: str) -> dict:
    data = json.loads(json.dumps(base))
    for layer in data["layers"]:
        layer["format"] = [fmt] * len(layer["format"])
        layer["cache_format"] = fmt
    return data


def logits(plan: dict, ckpt, kernels_dir=None):
    from exporters.runtime import load_planned_model

    with load_planned_model(plan, ckpt, kernels_dir=kernels_dir, device="cpu", background=False) as rt:
        rt.metrics.reset()
        with torch.no_grad():
            out = rt.model(torch.tensor([PROMPT])).logits[0]
        return out, rt.metrics.summary()


def moved(m: dict, base: dict) -> float:
    return m["bytes_moved"].get(base["host_device"], 0)


def test_kernels_store_the_copies_and_must_match_the_plan(base, ckpt, tmp_path):
    from safetensors import safe_open

    from exporters.runtime.errors import RuntimeInputError
    from exporters.runtime.kernels import build_kernels

    plan = with_copies(base, 0.3)
    build_kernels(plan, ckpt, tmp_path / "k")
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    E = len(base["layers"][0]["home"])
    assert manifest["layers"]["0"]["copies"] == {"format": "int4", "experts": [str(e) for e in range(E)]}
    with safe_open(str(tmp_path / "k" / manifest["layers"]["0"]["file"]), "np") as f:
        names = set(f.keys())
    assert {"0.gate_up.q", "0.copy.gate_up.q", "0.copy.down.scales"} <= names
    build_kernels(base, ckpt, tmp_path / "plain")
    with pytest.raises(RuntimeInputError, match="another plan"):
        logits(plan, ckpt, kernels_dir=tmp_path / "plain")
    bad = json.loads(json.dumps(plan))
    bad["layers"][0]["miss_copy"] = {"format": "int8", "gate_below": 0.3}
    with pytest.raises(RuntimeInputError, match="miss_copy"):
        logits(bad, ckpt)


def test_copies_load_on_low_gate_misses_and_serve_later_hits(base, ckpt):
    ref, ref_m = logits(base, ckpt)
    # no gate below the threshold: the plain plan, bit for bit
    none, none_m = logits(with_copies(base, 1e-9), ckpt)
    assert torch.equal(none, ref) and moved(none_m, base) == moved(ref_m, base) and "miss_copies" not in none_m
    # every gate below it: every miss loads the copy, every hit runs it: the int4 plan's result
    int4, int4_m = logits(at_format(base, "int4"), ckpt)
    every, every_m = logits(with_copies(base, 1.0), ckpt)
    assert torch.equal(every, int4)
    assert moved(every_m, base) == moved(int4_m, base) < moved(ref_m, base)
    assert every_m["miss_copies"] == every_m["expert_fetches"] == ref_m["expert_fetches"]
    assert every_m["hits"] == ref_m["hits"]  # the cache sees the same accesses
    # in between: some misses load copies, the bytes fall between, the output stays near int8's
    mid, mid_m = logits(with_copies(base, 0.4), ckpt)
    assert 0 < mid_m["miss_copies"] < mid_m["expert_fetches"]
    assert moved(every_m, base) < moved(mid_m, base) < moved(ref_m, base)
    cos = torch.nn.functional.cosine_similarity(ref, mid, dim=-1)
    print(f"gate < 0.4: {mid_m['miss_copies']} of {mid_m['expert_fetches']} misses loaded copies; host bytes "
          f"{moved(mid_m, base):.0f} (int8 {moved(ref_m, base):.0f}, int4 {moved(every_m, base):.0f}); "
          f"min cosine to int8 {float(cos.min()):.5f}")
    assert float(cos.min()) >= 0.99, cos


def test_an_exported_bundle_runs_its_copies(base, ckpt, tmp_path, run_cli, run_bundle, monkeypatch):
    """``planner export`` of a plan with copies writes a bundle whose own run.py decodes, loading
    copies on its low-gate misses."""
    plan = with_copies(base, 0.4)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "bundle"
    r = run_cli("export", tmp_path / "plan.json", "--checkpoint", ckpt, "--out", out)
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "kernels" / "manifest.json").read_text())["layers"]["0"]["copies"]["format"] == "int4"
    monkeypatch.chdir(tmp_path)
    assert run_bundle(out, "--checkpoint", ckpt, "--prompt", "the cat sat", "--max-new-tokens", 3, "--ignore-eos",
                      "--device", "cpu", "--metrics-out", tmp_path / "m.json") == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["generated_tokens"] == 3
    assert 0 < metrics["miss_copies"] <= metrics["expert_fetches"]


def test_int2_copies_compute_what_int2_experts_compute(base, ckpt):
    """An int2 copy (packed, unpacked by torch) on every miss: the int2 plan's result, bit for bit."""
    int2, int2_m = logits(at_format(base, "int2"), ckpt)
    every, every_m = logits(with_copies(base, 1.0, "int2"), ckpt)
    assert torch.equal(every, int2)
    assert moved(every_m, base) == moved(int2_m, base)


# A hand-built batch (the copy's rule at batch > 1, profiles/miss_copy.py): two sequences of a
# prompt token (gates 0.5 / 0.5: never below the 0.5 threshold) and three decode tokens each,
# served two at a time, so decode step t runs token t of each; per step, both MoE layers alike,
# ((expert, gate) of the first sequence's token), ((expert, gate) of the second's):
STEPS = [(((0, 0.9), (1, 0.1)), ((1, 0.6), (2, 0.4))),  # e1: max 0.6, full (first access 0.1, mean 0.35)
         (((3, 0.55), (4, 0.45)), ((4, 0.8), (5, 0.2))),  # e4: max 0.8, full (first access 0.45)
         (((6, 0.7), (7, 0.3)), ((7, 0.3), (0, 0.7)))]  # e7: every gate 0.3, the copy
COPIED = [0, 0, 1, 0, 0, 1, 0, 1]  # per expert: its decode calls that load the copy, as a share (one call each)


def hand_built_trace():
    import numpy as np

    from profiles.workload.trace import DECODE, PREFILL, Trace

    rows = []  # [T][K] (expert, gate), sequence after sequence
    for seq in range(2):
        rows.append(((seq, 0.5), (seq + 2, 0.5)))
        rows.extend(step[seq] for step in STEPS)
    pairs = np.array(rows, dtype=float)  # [T, K, 2]
    ids = np.repeat(pairs[:, None, :, 0].astype(np.int64), 2, axis=1)  # [T, L=2, K]
    gates = np.repeat(pairs[:, None, :, 1], 2, axis=1)
    phase = np.array(([PREFILL] + [DECODE] * 3) * 2, np.uint8)
    return Trace(expert_ids=ids, seq_lens=np.array([4, 4]), phase=phase, num_experts=8, layer_map=(0, 1),
                 gate_weights=gates, source="hand-built")


def test_planner_simulator_and_runtime_load_copies_by_one_rule(base, ckpt):
    """At batch 2 a call loads the copy only when every token of the step that chose the expert
    weights it below the threshold (its largest gate): the planner's share per expert, the
    simulator's copies and the runtime's are the same calls (the simulator decided by the
    call's mean gate and the runtime by its first access: 4 and 5 copies per layer here, not 3)."""
    import numpy as np

    from planner.miss_copy_options import copy_shares
    from planner.plan import Plan
    from profiles.hardware import load_profile
    from profiles.models import load_model
    from simulator.engine import SimConfig, simulate

    trace = hand_built_trace()
    s, g = copy_shares(trace, 8, 0.5, batch=2)
    assert s.tolist() == [COPIED, COPIED]
    assert g[0].tolist() == pytest.approx(COPIED)  # a copied call carries all of its expert's mass here
    # the simulator, every fetch expert missing (no slots): the copies are the bytes saved
    cacheless = json.loads(json.dumps(base))
    for layer in cacheless["layers"]:
        layer.update(cache_slots=0, cache_device=None, cache_format=None)
    spec, (_, hw) = load_model(ckpt / "config.json"), load_profile("desktop-4090")
    full, copy = spec.expert_bytes("int8"), spec.expert_bytes("int4")
    config = SimConfig(batch_size=2, kv_context="plan")
    plain = simulate(Plan.model_validate(cacheless), hw, spec, trace, config)
    copies = simulate(Plan.model_validate(with_copies(cacheless, 0.5)), hw, spec, trace, config)
    saved = (sum(plain.metrics["bytes_moved"].values()) - sum(copies.metrics["bytes_moved"].values())) / (full - copy)
    assert saved == pytest.approx(2 * sum(COPIED))  # both layers
    # the runtime, the same steps fed to each layer's expert store
    from exporters.runtime import load_planned_model

    with load_planned_model(with_copies(cacheless, 0.5), ckpt, device="cpu", background=False) as rt:
        rt.metrics.reset()
        hidden = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for step in STEPS:
                ids = torch.tensor([[e for e, _ in tok] for tok in step])
                gates = torch.tensor([[w for _, w in tok] for tok in step])
                for store in rt.stores:
                    store.forward(hidden, ids, gates)
        m = rt.metrics.summary()
    assert m["miss_copies"] == 2 * sum(COPIED) and m["expert_fetches"] == 2 * 9
    calls = np.array([2, 1, 1, 1, 1, 1, 1, 1])  # each expert's decode calls per layer (e0 in steps 0 and 2)
    assert float((s * calls).sum()) == m["miss_copies"]  # the planner's expected copies, the runtime's count
