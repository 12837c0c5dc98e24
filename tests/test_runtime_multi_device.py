"""The bundle runtime runs a multi-GPU pipeline plan (issue 19 item 6), here on the CPU with
both of the plan's GPUs mapped to it (``--device-map gpu0=cpu,gpu1=cpu``).

A tiny random Mixtral (4 MoE layers of 8 fp32 experts) is planned by ``planner.optimize`` for
a made-up box whose two GPUs each hold the dense part and a few experts: layers 0-1 on
``n/gpu0``, 2-3 on ``n/gpu1``, the other experts in host DRAM and fetched through per-layer
caches over each GPU's own link. The bundle's runtime must

- name the right plan device for every layer and expert (``placement``), keep its accounting
  per plan device (hits and misses of that device's layers, copies over that device's link,
  hidden-state hops 0 -> 1 and back to the head at every forward);
- generate the same tokens as a one-device run of the same plan bytes (the same formats and
  sites, every layer on ``n/gpu0``);
- hold on each plan device the resident experts the plan puts there (exactly), at most the
  cache it plans, at most the dense bytes it plans (gpu0 holds the embedding and the head),
  and no more in all than the plan counts on that device.

The CUDA path (each layer's torch device, copies on each device's own stream from pinned host
memory) is not exercised here: this machine has no GPU.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch", reason="needs the [runtime] extra")
pytest.importorskip("transformers", reason="needs the [runtime] extra")
pytest.importorskip("onnxruntime", reason="needs the [runtime] extra")
pytest.importorskip("tokenizers", reason="needs the [runtime] extra")

from exporters.bundle import write_bundle  # noqa: E402
from exporters.checkpoints import make_random_checkpoint  # noqa: E402
from exporters.runtime import load_planned_model, read_device_map  # noqa: E402
from planner.optimize import OptimizeRequest, optimize  # noqa: E402
from planner.setup import Setup  # noqa: E402
from profiles.errors import InputError  # noqa: E402
from profiles.hardware import BUNDLED_DIR, load_profile  # noqa: E402
from profiles.models import load_model  # noqa: E402

GPU = """
      - name: {name}
        kind: gpu
        memory_bytes: {hbm}B
        memory_bytes_per_s: 300GB/s
        peak_ops_per_s: {{fp32: 30TFLOPS, bf16: 30TFLOPS, int8: 60TOPS}}
        links: [{{kind: pcie, to: cpu0, bytes_per_s: 20GB/s, latency_s: 1us}}]
"""
HW = """
name: tiny-2gpu
nodes:
  - name: n
    devices:
      - {name: cpu0, kind: cpu, cores: 4, memory_bytes: 64GB, memory_bytes_per_s: 0.2GB/s,
         peak_ops_per_s: {fp32: 0.2TFLOPS, bf16: 0.4TFLOPS, int8: 0.4TOPS}}
"""
FREE_BYTES = 966_000  # per GPU past the planner's reserve: its dense share (gpu0: and the embedding and head) and a few fp32 experts, a cache
PROMPT = [1, 17, 5, 99, 42, 7, 64, 3]
CPU_MAP = "gpu0=cpu,gpu1=cpu"


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """(checkpoint, bundle, plan JSON) for the two-GPU plan."""
    tmp = tmp_path_factory.mktemp("multi-device")
    ckpt = make_random_checkpoint("mixtral", tmp / "ckpt", hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=4, num_local_experts=8)
    frac, fixed = Setup.__dataclass_fields__["device_reserve"].default
    hbm = round((fixed + FREE_BYTES) / (1 - frac))
    hw_path = tmp / "tiny-2gpu.yaml"
    hw_path.write_text(HW + "".join(GPU.format(name=f"gpu{g}", hbm=hbm) for g in range(2)))
    plan = optimize(OptimizeRequest(hardware=str(hw_path), model=str(ckpt / "config.json"), formats=("fp32",),
                                    multi_gpu=True, context_tokens=64)).plan
    profile, hw = load_profile(hw_path)
    write_bundle(plan, model=load_model(ckpt / "config.json"), hardware=hw, profile=profile, out_dir=tmp / "bundle",
                 checkpoint=ckpt)
    return ckpt, tmp / "bundle", json.loads((tmp / "bundle" / "plan.json").read_text())


def one_device(plan: dict) -> dict:
    """The same plan with every layer on ``compute_device``: resident experts homed there."""
    out = json.loads(json.dumps(plan))
    devices = set(out.pop("layer_devices"))
    for layer in out["layers"]:
        layer["home"] = [out["compute_device"] if h in devices else h for h in layer["home"]]
        layer["cache_device"] = out["compute_device"] if layer["cache_slots"] else None
    return out


def test_the_plan_uses_both_gpus_with_fetches_on_each(box):
    _, bundle, plan = box
    devices = plan["layer_devices"]
    assert devices == ["n/gpu0", "n/gpu0", "n/gpu1", "n/gpu1"]
    for layer, dev in zip(plan["layers"], devices):
        assert {h for h, s in zip(layer["home"], layer["site"]) if s == "resident"} <= {dev}
    assert {d for layer, d in zip(plan["layers"], devices) if "fetch" in layer["site"]} == {"n/gpu0", "n/gpu1"}
    assert read_device_map(bundle)["devices"] == {"n/gpu0": {"torch": "cuda:0", "kind": "gpu"},
                                                  "n/gpu1": {"torch": "cuda:1", "kind": "gpu"}}


def test_a_two_gpu_plan_runs_on_two_logical_devices(box, tmp_path, run_bundle, capsys):
    ckpt, bundle, plan = box
    new_tokens = 5
    with load_planned_model(bundle / "plan.json", ckpt, kernels_dir=bundle / "kernels", device_map=CPU_MAP,
                            bundle_devices=read_device_map(bundle)) as rt:
        tokens = rt.generate(PROMPT, new_tokens)
        m = rt.metrics.summary()
        buffers = sum(b.numel() * b.element_size() for b in rt.model.buffers())  # rotary tables: not weights
    with load_planned_model(one_device(plan), ckpt, kernels_dir=bundle / "kernels", device="cpu") as single:
        assert single.generate(PROMPT, new_tokens) == tokens  # (b) the same model and bytes on one device

    # (a) every layer and expert where the plan puts it, accounting per plan device
    devices = plan["layer_devices"]
    for i, (record, layer) in enumerate(zip(m["placement"], plan["layers"])):
        assert record["device"] == devices[i] and record["torch_device"] == "cpu"
        assert record["experts"] == [devices[i] if s == "resident" else h for s, h in zip(layer["site"], layer["home"])]
        assert record["compute"] == [devices[i] if s in ("resident", "fetch", "stream") else plan["host_device"]
                                     if s == "local" else f"{devices[i]}|{plan['host_device']}" for s in layer["site"]]
    per = m["devices"]
    assert set(per) == {"n/gpu0", "n/gpu1"}
    for dev in per:
        mine = [i for i, d in enumerate(devices) if d == dev]
        assert per[dev]["moe_layers"] == mine
        assert per[dev]["hits"] == sum(m["hits"][i] for i in mine)
        assert per[dev]["misses"] == sum(m["misses"][i] for i in mine)
        assert per[dev]["misses"] > 0 and per[dev]["copies_in"] > 0  # each GPU fetched over its own link
        assert m["links"][f"{plan['host_device']}->{dev}"] == {"copies": per[dev]["copies_in"],
                                                                "bytes": per[dev]["bytes_in"]}
    assert sum(v["bytes"] for v in m["links"].values()) == sum(m["bytes_moved"].values())
    forwards = new_tokens  # the prefill and every decode step but the last token's
    hidden_bytes = 4 * 64 * (len(PROMPT) + new_tokens - 1)  # fp32 hidden states of every token, once
    assert m["hops"] == {"n/gpu0->n/gpu1": {"count": forwards, "bytes": hidden_bytes},
                         "n/gpu1->n/gpu0": {"count": forwards, "bytes": hidden_bytes}}

    # (c) memory per plan device within the plan; the dense weights the runtime placed there
    # (gpu0: its decoder layers, the embedding and the head) within the plan's dense bytes for it,
    # but for the model's buffers (the rotary tables, on gpu0: not weights, no plan counts them)
    for dev in per:
        planned = plan["memory"][dev]
        assert per[dev]["resident_expert_bytes"] == planned["expert_bytes"]
        assert per[dev]["dense_bytes"] <= planned["dense_bytes"] + buffers, (dev, per[dev], planned)
        assert per[dev]["cache_bytes_peak"] <= planned["cache_bytes"]
        held = per[dev]["resident_expert_bytes"] + per[dev]["cache_bytes_peak"] + per[dev]["dense_bytes"]
        assert held <= sum(v for k, v in planned.items() if k != "capacity_bytes"), dev

    # the bundle's run.py: the same tokens with the plan devices mapped by --device-map
    code = run_bundle(bundle, "--checkpoint", ckpt, "--prompt", "the cat sat", "--max-new-tokens", "3",
                      "--ignore-eos", "--device-map", CPU_MAP, "--metrics-out", tmp_path / "m.json", "--json")
    assert code == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "m.json").read_text())
    assert run["device_map"] == {"n/gpu0": "cpu", "n/gpu1": "cpu"}
    assert [p["device"] for p in run["placement"]] == devices


@pytest.mark.parametrize("args, words", [
    (["--device-map", "gpu7=cpu"], "--device-map"),
    (["--device-map", "gpu0=tpu"], "torch device"),
    (["--device-map", "gpu1=cuda:5"], "does not have"),
])
def test_a_bad_device_map_is_one_line_exit_1(box, run_bundle, capsys, args, words):
    ckpt, bundle, _ = box
    code = run_bundle(bundle, "--checkpoint", ckpt, "--prompt", "the cat", "--max-new-tokens", "1", *args)
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error:") and "\n" not in err and words in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_without_cuda_the_bundles_map_falls_back_to_the_cpu(box):
    ckpt, bundle, _ = box
    with load_planned_model(bundle / "plan.json", ckpt, kernels_dir=bundle / "kernels",
                            bundle_devices=read_device_map(bundle)) as rt:
        assert {str(d) for d in rt.devices.values()} == {"cpu"}
        assert any("no CUDA" in n for n in rt.metrics.notes)


def test_a_plan_with_layers_on_an_accelerator_is_refused_in_one_line(box, tmp_path):
    from planner.plan import Plan

    ckpt, _, plan = box
    on_fpga = Plan.model_validate(plan | {"layer_devices": ["n/gpu0", "n/gpu0", "node/fpga0", "node/fpga0"]})
    profile, hw = load_profile(BUNDLED_DIR / "workstation-4090-alveo-u280.yaml")
    with pytest.raises(InputError) as err:
        write_bundle(on_fpga, model=load_model(ckpt / "config.json"), hardware=hw, profile=profile,
                     out_dir=tmp_path / "b")
    assert err.value.key == "layer_devices" and "accelerator" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "b").exists()


def test_the_runtime_refuses_an_expert_homed_on_another_gpu(box):
    from exporters.runtime import RuntimeInputError, parse_plan

    _, _, plan = box
    bad = json.loads(json.dumps(plan))
    bad["layers"][2]["home"][0], bad["layers"][2]["site"][0] = "n/gpu0", "fetch"
    with pytest.raises(RuntimeInputError, match="another compute device"):
        parse_plan(bad)


def test_verify_reports_each_plan_device(box):
    """`planner verify` on the two-GPU bundle (both GPUs on the CPU here): per plan device its
    layers' hit rate, equal on both sides (the replay routes what the run saw), and what the
    runtime held there within the plan's memory row (dense: but for the 64 B of rotary
    buffers; resident experts: exactly)."""
    from planner.verify import verify_bundle_run

    ckpt, bundle, plan = box
    result = verify_bundle_run(bundle, ckpt, ["the cat sat"], max_new_tokens=3)
    rows = {row["metric"]: row for row in result["rows"] if "device" in row}
    for dev in ("n/gpu0", "n/gpu1"):
        assert rows[f"{dev}: cache hit rate"]["measured"] == pytest.approx(rows[f"{dev}: cache hit rate"]["predicted"])
        assert rows[f"{dev}: resident expert bytes"]["measured"] == plan["memory"][dev]["expert_bytes"] \
            == rows[f"{dev}: resident expert bytes"]["predicted"]
        dense = rows[f"{dev}: dense bytes"]
        assert dense["predicted"] == plan["memory"][dev]["dense_bytes"] and dense["measured"] <= dense["predicted"] + 64
        cache = rows[f"{dev}: cache bytes (peak)"]
        assert 0 < cache["measured"] <= cache["predicted"]
