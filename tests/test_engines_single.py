"""Engine configs of single-node plans: llama.cpp, HF accelerate and accelerator memory maps
(``exporters/engines/{single,llamacpp,accelerate,accelerator,rounding}.py``).

Golden files: ``tests/data/golden/engines/<hardware>--<model>/`` holds the input ``plan.json``
and every file ``render_engines`` writes for it (under ``engines/``). After an intended
change, regenerate them with

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_engines_single.py

which re-plans each case with ``planner optimize``, re-renders and overwrites the case
directory; review the diff before committing. The comparison leaves out the predicted
figures (``predicted`` blocks of the JSON files, the ``# predicted`` / ``# alternative``
comment lines of ``llamacpp.sh``): they move whenever the shared cost model or a default
workload does, and the tests below hold them to the planner's own prediction instead.
Everything else (rules, device maps, offsets, commands) must match byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from exporters.engines.accelerate import LOAD_SCRIPT, MODULE_LAYOUTS, device_map_for
from exporters.engines.accelerator import expert_layout, memory_map, verify_memory_map
from exporters.engines.llamacpp import GGUF_TYPES, gguf_type, render_llamacpp
from exporters.engines.rounding import (
    Pricing,
    check_plan,
    fill_layers,
    fill_order,
    layer_format,
    memory_string,
    to_json_text,
)
from exporters.engines.single import render_engines
from planner.plan import load_plan
from profiles.errors import InfeasibleError, InputError
from profiles.hardware import load_profile
from profiles.models import load_model

GOLDEN = Path(__file__).parent / "data" / "golden" / "engines"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
# (hardware, model, formats): a GPU plan with CPU layers; one with shared experts, a dense
# first layer and an expert width GGUF k-quants cannot block (I = 1408); an FPGA plan.
CASES = [
    ("desktop-4090", "mixtral-8x7b", ("bf16", "int8", "int4")),
    ("laptop-4060", "deepseek-v2-lite", ("bf16", "int8", "int4")),
    ("desktop-alveo-u280", "olmoe-1b-7b", ("int8", "int4")),
]


def _case_dir(hw: str, model: str) -> Path:
    return GOLDEN / f"{hw}--{model}"


def _stored_plan(hw: str, model: str, formats: tuple[str, ...]):
    path = _case_dir(hw, model) / "plan.json"
    if UPDATE:
        from planner.optimize import OptimizeRequest, optimize

        optimize(OptimizeRequest(hardware=hw, model=model, formats=formats)).plan.save(path)
    return load_plan(path)


_VOLATILE_LINE = re.compile(r"^# (predicted|alternative)")


def _stable(path: Path) -> str:
    """File text without the predicted figures (see the module docstring)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        data.pop("predicted", None)
        if isinstance(data.get("n_cpu_moe"), dict):
            data["n_cpu_moe"].pop("predicted", None)
        return to_json_text(data)
    return "\n".join(line for line in text.splitlines() if not _VOLATILE_LINE.match(line))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """case -> (plan, RenderedEngines, output dir), rendered once per module."""
    out = {}
    for hw, model, formats in CASES:
        plan = _stored_plan(hw, model, formats)
        root = tmp_path_factory.mktemp(f"{hw}--{model}")
        out[(hw, model)] = (plan, render_engines(plan, model, hw, root), root)
    return out


@pytest.mark.parametrize("hw,model", [(c[0], c[1]) for c in CASES])
def test_golden_files(rendered, hw, model):
    _plan, result, root = rendered[(hw, model)]
    golden = _case_dir(hw, model) / "engines"
    if UPDATE:
        golden.mkdir(parents=True, exist_ok=True)
        for old in golden.iterdir():
            old.unlink()
        for f in result.files:
            (golden / f.name).write_bytes(f.read_bytes())
    written = sorted(f.name for f in result.files)
    assert written == sorted(p.name for p in golden.iterdir()), "files differ from the golden set"
    for name in written:
        assert _stable(root / "engines" / name) == _stable(golden / name), f"{name} differs from its golden file"


def test_render_engines_files_and_commands(rendered):
    plan, result, root = rendered[("desktop-4090", "mixtral-8x7b")]
    names = [f.name for f in result.files]
    assert names == ["llamacpp.json", "llamacpp.sh", "accelerate.json", "accelerate_load.py"]
    assert result.skipped == {}
    assert result.commands["llama.cpp"].startswith("llama-server -m MODEL.gguf -ngl 999 -ot ")
    assert shlex.split(result.commands["llama.cpp:quantize"])[0] == "llama-quantize"
    assert os.access(root / "engines" / "llamacpp.sh", os.X_OK)
    compile(LOAD_SCRIPT, "accelerate_load.py", "exec")
    # the same inputs give the same bytes
    again = render_engines(plan, "mixtral-8x7b", "desktop-4090", root / "again")
    for a, b in zip(result.files, again.files):
        assert a.read_bytes() == b.read_bytes()
    _, fpga, _ = rendered[("desktop-alveo-u280", "olmoe-1b-7b")]
    assert [f.name for f in fpga.files][-1] == "accelerator-node-fpga0.json"
    assert fpga.commands["llama.cpp"].startswith("llama-server -m MODEL.gguf -ngl 0 ")  # no FPGA backend


# --------------------------------------------------------------------------- pricing


@pytest.fixture(scope="module")
def mixtral_fresh(default_optimize):
    """A plan made now (Mixtral-8x7B on desktop-4090, the default request), so its predicted
    figures come from today's cost model."""
    res = default_optimize
    assert (res.plan.inputs.hardware, res.plan.inputs.model) == ("desktop-4090", "mixtral-8x7b")
    return res.plan, res.setup.model, res.setup.hardware


def test_repricing_reproduces_the_planners_prediction(mixtral_fresh):
    plan, model, hw = mixtral_fresh
    pricing = Pricing(plan, model, hw)
    assert pricing.matches_plan
    repriced, why = pricing.price_plan()
    assert why == ""
    assert repriced.tokens_per_s == pytest.approx(plan.predicted["tokens_per_s"], rel=1e-9)
    assert repriced.tpot_s == pytest.approx(plan.predicted["tpot_s"], rel=1e-9)
    assert repriced.quality_error == pytest.approx(plan.quality_error, rel=1e-9)


def test_llamacpp_rounding_cost_is_reported(mixtral_fresh):
    plan, model, hw = mixtral_fresh
    cfg = render_llamacpp(plan, model, hw, Pricing(plan, model, hw))
    pred = cfg["predicted"]
    plan_tps = plan.predicted["tokens_per_s"]
    assert pred["plan_repriced"]["tokens_per_s"] == pytest.approx(plan_tps, rel=1e-9)
    # whole layers fit no better than the plan's per-expert split, and fewer of them at GGUF's
    # 4.5 bits/weight than at the planner's 4.16 (today: 246 of 256 int4 experts planned on the
    # 4090; 28 of 32 layers after rounding, 29.1 tok/s against the plan's 61.1)
    assert pred["rounded"]["tokens_per_s"] <= pred["rounded_at_plan_sizes"]["tokens_per_s"] <= plan_tps * (1 + 1e-9)
    assert pred["relative_change"] == pytest.approx(pred["rounded"]["tokens_per_s"] / plan_tps - 1)
    assert cfg["memory"]["device_expert_bytes"] <= cfg["memory"]["device_budget_bytes"]
    # --n-cpu-moe: the fewest first layers on the CPU that fit
    ncm = cfg["n_cpu_moe"]
    gpu_bytes = [r["bytes"] for r in cfg["rounding"]["layers"]]
    k = ncm["moe_layers_on_cpu"]
    assert sum(gpu_bytes[k:]) <= cfg["memory"]["device_budget_bytes"] < sum(gpu_bytes[k - 1:])


def test_rounding_rules():
    model = load_model("mixtral-8x7b")
    # bytes decide the format
    assert layer_format(["int4"] * 6 + ["bf16"] * 2, model) == "bf16"  # 2 x 16 bits > 6 x 4.16 bits
    assert layer_format(["int4"] * 7 + ["bf16"], model) == "int4"
    assert layer_format(["int8", "int4"], model) == "int8"
    assert layer_format(["int8", "int4", "int4"], model) == "int4"  # 2 x 4.16 bits > 8.13 bits
    assert fill_order([0.5, 1.0, 0.5, 0.0]) == [1, 2, 0, 3]  # ties: the later layer first
    assert fill_layers([0, 1, 2], [5.0, 9.0, 4.0], 10.0) == {0, 2}  # a layer that does not fit is skipped


def test_gguf_types_and_fallbacks():
    assert gguf_type("int4", 4096) == "Q4_K"
    assert gguf_type("int4", 1408) == "IQ4_NL"  # DeepSeek-V2-Lite's I: not a multiple of 256
    assert gguf_type("int4", 2880) == "IQ4_NL"  # gpt-oss's H
    assert gguf_type("fp6", 2880) == "Q8_0"
    assert gguf_type("ternary", 2880) == "Q4_0"
    assert gguf_type("int8", 2880) == "Q8_0"
    assert gguf_type("int8", 100) == "F16"
    assert gguf_type("mxfp4", 2880) == "MXFP4"
    assert GGUF_TYPES["Q4_K"].bits_per_weight == 144 * 8 / 256


# --------------------------------------------------------------------------- llama.cpp rules


def _tensor_names(model, blocks):
    """GGUF tensor names of ``blocks`` (fused and unfused experts, weights and biases)."""
    names = []
    for b in blocks:
        for t in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps"):
            names += [f"blk.{b}.{t}.weight", f"blk.{b}.{t}.bias"]
        names += [f"blk.{b}.ffn_gate_shexp.weight", f"blk.{b}.ffn_down_shexp.weight", f"blk.{b}.ffn_gate_inp.weight",
                  f"blk.{b}.attn_q.weight", f"blk.{b}.ffn_down.weight", f"blk.{b}.ffn_up.weight"]
    return names + ["token_embd.weight", "output.weight", "output_norm.weight"]


@pytest.mark.parametrize("hw,model", [("desktop-4090", "mixtral-8x7b"), ("laptop-4060", "deepseek-v2-lite")])
def test_override_rules_match_exactly_the_cpu_layers(rendered, hw, model):
    _, result, root = rendered[(hw, model)]
    cfg = json.loads((root / "engines" / "llamacpp.json").read_text())
    spec = load_model(model)
    cpu = {r["blk"] for r in cfg["rounding"]["layers"] if r["buffer"] == "CPU"}
    assert cpu, "this case should offload some layers"
    serve = shlex.split(result.commands["llama.cpp"])
    rules = [r.split("=") for r in serve[serve.index("-ot") + 1].split(",")]
    assert all(len(r) == 2 for r in rules)  # llama.cpp splits on "," and "="
    for name in _tensor_names(spec, range(spec.num_hidden_layers)):
        # C++ std::regex_search, first match wins (Python's re agrees on these patterns)
        buffer = next((buf for pat, buf in rules if re.search(pat, name)), "CUDA0")
        m = re.match(r"blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.", name)
        expected = "CPU" if m and int(m.group(1)) in cpu else "CUDA0"
        assert buffer == expected, name
    # shared experts are pinned to the GPU by the first rule
    assert (spec.num_shared_experts > 0) == rules[0][0].endswith("_shexp")


@pytest.mark.parametrize("hw,model", [(c[0], c[1]) for c in CASES])
def test_quantize_rules_do_not_overlap(rendered, hw, model):
    _, _result, root = rendered[(hw, model)]
    cfg = json.loads((root / "engines" / "llamacpp.json").read_text())
    spec = load_model(model)
    rules = [r.rsplit("=", 1) for r in cfg["quantize"]["tensor_type"]]
    by_blk = {r["blk"]: r for r in cfg["rounding"]["layers"]}
    for name in _tensor_names(spec, range(spec.num_hidden_layers)):
        if name.endswith(".bias") or "norm" in name:
            continue  # llama-quantize never quantises 1-D tensors
        hits = [t for pat, t in rules if re.search(pat.lower(), name)]  # llama-quantize lowercases patterns
        m = re.match(r"blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.", name)
        if m and int(m.group(1)) in by_blk:
            layer = by_blk[int(m.group(1))]
            want = layer["gguf_down"] if m.group(2) == "down" else layer["gguf_gate_up"]
            assert hits == [want.lower()], name
        else:
            assert len(hits) <= 1, name  # dense tensors: at most the dense rule


def test_quantize_variants(mixtral_plan, tmp_path):
    """A bf16 dense part under quantised experts needs a rule of its own; all-bf16 needs no quantize step."""
    spec = load_model("mixtral-8x7b")
    _, hw = load_profile("desktop-4090")
    int4 = tuple(layer.model_copy(update={"format": ("int4",) * 8}) for layer in mixtral_plan.layers)
    dense16 = mixtral_plan.model_copy(update={"notes": ("dense weights: bf16",), "layers": int4})
    cfg = render_llamacpp(dense16, spec, hw, Pricing(dense16, spec, hw))
    dense_rule, expert_rule = (r.rsplit("=", 1) for r in cfg["quantize"]["tensor_type"])
    assert cfg["quantize"]["base_ftype"] == "Q4_K_S" and dense_rule[1] == "bf16"
    for name in ("blk.3.attn_q.weight", "blk.3.ffn_gate_inp.weight", "output.weight"):
        assert re.search(dense_rule[0], name) and not re.search(expert_rule[0], name)
    for name in ("blk.3.ffn_up_exps.weight", "blk.30.ffn_gate_up_exps.weight"):
        assert re.search(expert_rule[0], name) and not re.search(dense_rule[0], name)
    layers = tuple(layer.model_copy(update={"format": ("bf16",) * 8}) for layer in mixtral_plan.layers)
    bf16 = dense16.model_copy(update={"layers": layers})
    cfg = render_llamacpp(bf16, spec, hw, Pricing(bf16, spec, hw))
    assert "quantize" not in cfg["commands"] and cfg["quantize"]["base_ftype"] is None
    assert cfg["commands"]["convert"].endswith("--outtype bf16 --outfile MODEL.gguf")
    # bf16 Mixtral (87 GiB of experts) leaves most layers to the CPU of a 24 GiB card
    assert sum(r["buffer"] == "CPU" for r in cfg["rounding"]["layers"]) > 24


# --------------------------------------------------------------------------- accelerate


# tiny configs with the hub's field names: a few layers (some dense), four experts
_SMALL = {"hidden_size": 16, "num_attention_heads": 2, "num_experts_per_tok": 2, "vocab_size": 32,
          "num_hidden_layers": 3}
_MLA = {"num_key_value_heads": 2, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 4,
        "intermediate_size": 24, "moe_intermediate_size": 8, "n_routed_experts": 4, "first_k_dense_replace": 1}
TINY = {
    "MixtralForCausalLM": {"model_type": "mixtral", "intermediate_size": 8, "num_key_value_heads": 1,
                           "num_local_experts": 4},
    "Qwen3MoeForCausalLM": {"model_type": "qwen3_moe", "intermediate_size": 24, "moe_intermediate_size": 8,
                            "num_key_value_heads": 1, "head_dim": 8, "num_experts": 4, "mlp_only_layers": [1],
                            "decoder_sparse_step": 1},
    "OlmoeForCausalLM": {"model_type": "olmoe", "intermediate_size": 8, "num_key_value_heads": 2, "num_experts": 4,
                         "eos_token_id": 1, "pad_token_id": 0},
    "DeepseekV3ForCausalLM": {**_MLA, "model_type": "deepseek_v3", "num_hidden_layers": 4, "n_shared_experts": 1,
                              "n_group": 2, "topk_group": 1, "q_lora_rank": 8},
    "DeepseekV2ForCausalLM": {**_MLA, "model_type": "deepseek_v2", "n_shared_experts": 2, "q_lora_rank": None},
    "Qwen2MoeForCausalLM": {"model_type": "qwen2_moe", "intermediate_size": 24, "moe_intermediate_size": 8,
                            "shared_expert_intermediate_size": 8, "num_key_value_heads": 1, "num_experts": 4},
    "GptOssForCausalLM": {"model_type": "gpt_oss", "intermediate_size": 8, "num_hidden_layers": 2,
                          "num_key_value_heads": 1, "head_dim": 8, "num_local_experts": 4,
                          "layer_types": ["sliding_attention", "full_attention"]},
    "PhimoeForCausalLM": {"model_type": "phimoe", "intermediate_size": 8, "num_key_value_heads": 1,
                          "num_local_experts": 4},
}


def _tiny(arch: str, tmp_path: Path):
    """(transformers model, ModelSpec) built from the same tiny config.json."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path / arch
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**_SMALL, **TINY[arch], "architectures": [arch]}))
    config = transformers.AutoConfig.from_pretrained(d)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == arch
    return model, load_model(d), d


def test_tiny_configs_cover_every_known_layout():
    assert set(TINY) == set(MODULE_LAYOUTS)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_device_map_covers_every_parameter_once(arch, tmp_path):
    from transformers.integrations.accelerate import expand_device_map

    model, spec, _ = _tiny(arch, tmp_path)
    assert spec.architecture == arch
    devices = [0, "cpu", "disk"]
    experts_on = {h: devices[i % 3] for i, h in enumerate(spec.moe_layer_indices)}
    dmap = device_map_for(spec, experts_on, main=0)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for name in names:
        covering = [k for k in dmap if name == k or name.startswith(k + ".")]
        assert len(covering) == 1, (name, covering)
    for key in dmap:  # no key names a module the class does not have
        model.get_submodule(key)
    # transformers' own expansion (keys as regexes, deepest first) agrees
    placed = expand_device_map(dmap, names)
    for name in names:
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.", name)
        assert placed[name] == (experts_on[int(m.group(1))] if m else 0), name


def test_accelerate_loads_the_device_map(tmp_path):
    """With accelerate installed: load a tiny checkpoint with a cpu/disk map and match the reference."""
    pytest.importorskip("accelerate")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, spec, d = _tiny("MixtralForCausalLM", tmp_path)
    torch.manual_seed(0)
    model.save_pretrained(d)
    dmap = device_map_for(spec, {0: "cpu", 1: "disk", 2: "cpu"}, main="cpu")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        d, device_map=dmap, max_memory={"cpu": memory_string(2**30)}, offload_folder=str(tmp_path / "offload"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(d)(ids).logits
        assert torch.allclose(loaded(ids).logits, ref, atol=1e-5)


def test_accelerate_config(rendered):
    _, _, root = rendered[("desktop-4090", "mixtral-8x7b")]
    cfg = json.loads((root / "engines" / "accelerate.json").read_text())
    places = [r["device"] for r in cfg["rounding"]["layers"]]
    mem = cfg["memory"]
    assert places.count(0) == mem["layers_on_device"] and places.count("disk") == mem["layers_on_disk"] > 0
    assert cfg["offload_folder"] == "offload"
    # one layer of room for streaming stays free on the GPU
    assert (mem["layers_on_device"] + 1) * mem["layer_bytes"] <= mem["device_budget_bytes"]
    assert set(cfg["max_memory"]) == {"0", "cpu"}
    assert all(re.fullmatch(r"\d+(GiB|MiB)", v) for v in cfg["max_memory"].values())
    assert cfg["predicted"]["rounded"]["tokens_per_s"] < cfg["predicted"]["plan_tokens_per_s"]


def test_memory_string():
    assert memory_string(10 * 2**30) == "10GiB"
    assert memory_string(1.5 * 2**30) == "1536MiB"
    assert memory_string(2**30 - 1) == "1023MiB"
    assert memory_string(-5) == "0MiB"


# --------------------------------------------------------------------------- accelerator maps


def test_expert_layout_matches_the_format_sizes():
    model = load_model("mixtral-8x7b")
    for fmt in ("bf16", "int8", "int4", "fp8", "mxfp4", "ternary"):
        lay = expert_layout(model, fmt)
        assert lay["size_bytes"] == pytest.approx(model.expert_bytes(fmt), rel=1e-3), fmt
        assert [t["name"] for t in lay["tensors"]] == ["gate", "up", "down"]
    lay = expert_layout(model, "int4")
    gate = lay["tensors"][0]
    assert gate["shape"] == [14336, 4096]
    assert gate["payload"]["bytes"] == 14336 * 4096 // 2
    assert gate["scales"]["bytes"] == 14336 * 32 * 2 and gate["zeros"]["bytes"] == 14336 * 32 // 2
    assert all(a["offset"] % 64 == 0 for t in lay["tensors"] for a in (t["payload"], t.get("scales", t["payload"])))
    biased = expert_layout(load_model("gpt-oss-20b"), "mxfp4")
    assert [t["name"] for t in biased["tensors"]][3:] == ["gate_bias", "up_bias", "down_bias"]


def test_memory_map_places_every_fpga_expert(rendered):
    plan, _, root = rendered[("desktop-alveo-u280", "olmoe-1b-7b")]
    data = json.loads((root / "engines" / "accelerator-node-fpga0.json").read_text())
    verify_memory_map(data)
    homed = [(layer.moe_layer, e) for layer in plan.layers for e, h in enumerate(layer.home) if h == "node/fpga0"]
    assert [(x["moe_layer"], x["expert"]) for x in data["experts"]] == homed
    assert data["used_bytes"] <= data["capacity_bytes"] == 8 * 2**30
    runtime = data["regions"][0]
    assert runtime["kind"] == "runtime" and data["experts"][0]["offset"] >= runtime["size_bytes"]
    assert all(x["offset"] % data["alignment_bytes"] == 0 for x in data["experts"])


def test_memory_map_cache_slots_and_fit(rendered):
    plan, _, _ = rendered[("desktop-alveo-u280", "olmoe-1b-7b")]
    _, hw = load_profile("desktop-alveo-u280")
    model = load_model("olmoe-1b-7b")
    layer = plan.layers[3].model_copy(update={"cache_slots": 4, "cache_device": "node/fpga0", "cache_format": "int4"})
    cached = plan.model_copy(update={"layers": plan.layers[:3] + (layer,) + plan.layers[4:]})
    data = memory_map(cached, model, hw, "node/fpga0")
    (cache,) = [c for c in data["caches"] if c["moe_layer"] == 3]
    assert cache["slots"] == 4 and cache["offset"] >= data["experts"][-1]["offset"]
    assert data["used_bytes"] == max(c["offset"] + c["slots"] * c["stride_bytes"] for c in data["caches"])
    verify_memory_map(data)
    with pytest.raises(InfeasibleError, match="short"):  # 1 GiB alignment: hundreds of experts cannot fit 8 GiB
        memory_map(plan, model, hw, "node/fpga0", alignment_bytes=2**30)


def test_memory_map_check_command(rendered, tmp_path, capsys):
    from exporters.engines.accelerator import main

    _, result, root = rendered[("desktop-alveo-u280", "olmoe-1b-7b")]
    assert result.commands["accelerator:node/fpga0"].startswith("python -m exporters.engines.accelerator ")
    path = root / "engines" / "accelerator-node-fpga0.json"
    on_card = sum(h == "node/fpga0" for layer in rendered[("desktop-alveo-u280", "olmoe-1b-7b")][0].layers
                  for h in layer.home)
    assert main([str(path)]) == 0 and f"{on_card} experts" in capsys.readouterr().out
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": "something else"}))
    assert main([str(broken)]) == 1 and "not an accelerator memory map" in capsys.readouterr().err


def test_exporters_import_neither_pulp_nor_torch():
    import subprocess
    import sys

    code = ("import sys, exporters.engines.single; "
            "print(sorted(m for m in ('pulp', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"


def test_verify_memory_map_rejects_broken_maps(rendered):
    _, _, root = rendered[("desktop-alveo-u280", "olmoe-1b-7b")]
    data = json.loads((root / "engines" / "accelerator-node-fpga0.json").read_text())
    overlap = json.loads(json.dumps(data))
    overlap["experts"][1]["offset"] = overlap["experts"][0]["offset"]
    misaligned = json.loads(json.dumps(data))
    misaligned["experts"][0]["offset"] += 8
    missing = {k: v for k, v in data.items() if k != "layouts"}
    for broken, words in ((overlap, "overlaps"), (misaligned, "not aligned"), (missing, "malformed"),
                          ({"format": "x"}, "not an accelerator memory map")):
        with pytest.raises(InputError, match=words) as exc:
            verify_memory_map(broken, file="map.json")
        assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def mixtral_plan():
    return _stored_plan("desktop-4090", "mixtral-8x7b", CASES[0][2])


def _one_line_error(fn, *words):
    with pytest.raises(InputError) as exc:
        fn()
    text = str(exc.value)
    assert "\n" not in text and "Fix:" in text
    for w in words:
        assert w in text, text


def test_plan_for_another_model_is_refused(mixtral_plan, tmp_path):
    _one_line_error(lambda: render_engines(mixtral_plan, "olmoe-1b-7b", "desktop-4090", tmp_path),
                    "does not match the model", "olmoe-1b-7b")
    assert not (tmp_path / "engines").exists()
    _one_line_error(lambda: render_engines(mixtral_plan, "mixtral-8x22b", "desktop-4090", tmp_path), "MoE layers")


def test_plan_with_wrong_expert_count_is_refused(mixtral_plan):
    _, hw = load_profile("desktop-4090")
    model = load_model("mixtral-8x7b")
    short = mixtral_plan.layers[0].model_copy(update={k: getattr(mixtral_plan.layers[0], k)[:7]
                                                        for k in ("home", "format", "site")})
    bad = mixtral_plan.model_copy(update={"layers": (short,) + mixtral_plan.layers[1:]})
    _one_line_error(lambda: check_plan(bad, model, hw), "layers[0].home", "8 experts")


def test_plan_for_other_hardware_is_refused(mixtral_plan, tmp_path):
    _one_line_error(lambda: render_engines(mixtral_plan, "mixtral-8x7b", "desktop-alveo-u280", tmp_path),
                    "this hardware does not have")


def test_memory_map_of_a_non_accelerator_is_refused(mixtral_plan):
    _, hw = load_profile("desktop-4090")
    model = load_model("mixtral-8x7b")
    _one_line_error(lambda: memory_map(mixtral_plan, model, hw, "node/gpu0"), "not an accelerator memory")
    _, fpga_hw = load_profile("desktop-alveo-u280")
    fpga_plan = _stored_plan("desktop-alveo-u280", "olmoe-1b-7b", CASES[2][2])
    _one_line_error(lambda: memory_map(fpga_plan, load_model("olmoe-1b-7b"), fpga_hw, "node/fpga0",
                                       alignment_bytes=3000), "power of two")


def test_cluster_plans_are_left_to_the_cluster_renderers(mixtral_plan, tmp_path):
    replicated = mixtral_plan.layers[0].model_copy(update={"replicas": (("node/gpu0",),) + ((),) * 7})
    plan = mixtral_plan.model_copy(update={"layers": (replicated,) + mixtral_plan.layers[1:]})
    out = render_engines(plan, "mixtral-8x7b", "desktop-4090", tmp_path)
    assert out.files == () and set(out.skipped) == {"llama.cpp", "accelerate"}
