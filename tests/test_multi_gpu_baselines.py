"""Multi-GPU baselines and exporters (issue 19 items 6, 7): llama.cpp's layer split with
--n-cpu-moe and accelerate's device_map="auto" over several GPUs (planner.baselines_multi),
the llama.cpp and accelerate renderings of pipeline plans (exporters.engines.*_split), and
one price per placement between them."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex

import pytest

from exporters.engines.accelerate import device_map_for
from exporters.engines.accelerate_split import render_accelerate_pipeline
from exporters.engines.llamacpp import gguf_tensor_names
from exporters.engines.llamacpp_split import render_llamacpp_pipeline, split_devices
from exporters.engines.pricing import Pricing
from exporters.engines.single import PIPELINE_NOT_SERVED, render_engines
from planner.baselines_multi import compare_pipeline, llamacpp_layer_split, llamacpp_split
from planner.multi_gpu import pipeline_baseline_plan
from planner.optimize import OptimizeRequest, make_setup
from planner.plan import Inputs
from planner.workload_view import planning_stats
from profiles.engines import load_engine
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.defaults import default_workload
from test_multi_gpu import INPUTS, REQ, TINY_CONFIG, _box

BOX = "workstation-2x3090-pcie"


# --------------------------------------------------------------------------- llama.cpp's split


def test_llamacpp_split_is_llama_cpps_layer_assignment():
    # src/llama-model.cpp: n layers + the output layer = n + 1 slots; layer il to the first GPU
    # whose cumulative share exceeds il / (n + 1). Two equal GPUs, 32 layers: 17 on the first
    assert llamacpp_split([1.0, 1.0], 32) == [0] * 17 + [1] * 15
    # shares 1:2, 5 layers: il / 6 < 1/3 for il = 0, 1
    assert llamacpp_split([1.0, 2.0], 5) == [0, 0, 1, 1, 1]
    assert llamacpp_split([0.0, 0.0], 3) == [0, 0, 1]  # no free memory: equal shares


@pytest.mark.parametrize("n", [5, 32, 61])
def test_tensor_split_counts_reproduce_contiguous_ranges(n):
    """Writing each GPU's slot count as its --tensor-split weight puts exactly those slots on it
    (llama.cpp's float32 arithmetic), for every split of n + 1 slots over 2 and 3 GPUs."""
    for a in range(1, n + 1):
        want = [0] * a + [1] * (n + 1 - a)
        assert split_devices([a, n + 1 - a], n) == want, a
        for b in range(1, n + 1 - a):
            c = n + 1 - a - b
            assert split_devices([a, b, c], n) == [0] * a + [1] * b + [2] * c, (a, b)


# --------------------------------------------------------------------------- the baselines on a tiny box


def _tiny_setups(tmp_path, formats=("bf16",)):
    hw, model, trace = _box(tmp_path, 2)
    st = planning_stats(trace)

    def setup_for(engine: str):
        s = make_setup(hw, model, st, batch_size=1, context_tokens=64, formats=formats, engine=load_engine(engine))
        return dataclasses.replace(s, device_reserve=(0.0, 0.0), host_reserve=(0.0, 0.0))
    return setup_for


def test_llamacpp_split_takes_the_smallest_n_cpu_moe_that_fits(tmp_path):
    setup_for = _tiny_setups(tmp_path)
    plans = compare_pipeline(setup_for, None, REQ, INPUTS)
    plan = plans["llama.cpp-split"]
    assert plan.inputs.engine == "llama.cpp"
    # 4 layers + output over two equal GPUs: layers 0-2 on gpu0, 3 on gpu1
    assert plan.layer_devices == ("n/gpu0", "n/gpu0", "n/gpu0", "n/gpu1")
    n = int(re.search(r"--n-cpu-moe (\d+)", plan.notes[-1]).group(1))
    assert n > 0  # bf16 experts do not all fit: the first n layers' experts on the CPU
    sites = [set(layer.site) for layer in plan.layers]
    assert sites == [{"local"}] * n + [{"resident"}] * (4 - n)
    # one fewer layer on the CPU does not fit a GPU
    s = setup_for("llama.cpp")
    fewer = llamacpp_layer_split(s, None, n_cpu_moe=n - 1)
    assert pipeline_baseline_plan(s, fewer, REQ, INPUTS, None, "llama.cpp-split") is None


def test_accelerate_auto_fills_the_gpus_in_order_then_streams_on_the_first(tmp_path):
    plan = compare_pipeline(_tiny_setups(tmp_path), None, REQ, INPUTS)["accelerate-auto"]
    assert plan.inputs.engine == "accelerate"
    resident = [l for l, layer in enumerate(plan.layers) if set(layer.site) == {"resident"}]
    streamed = [l for l, layer in enumerate(plan.layers) if set(layer.site) == {"stream"}]
    assert resident + streamed == list(range(4))  # module order: a prefix on the GPUs
    devices = plan.layer_devices or ("n/gpu0",) * 4
    assert [devices[l] for l in resident] == sorted(devices[l] for l in resident)  # gpu0, then gpu1
    assert all(devices[l] == "n/gpu0" for l in streamed)  # accelerate runs offloaded modules on its main device


def test_accelerate_auto_balances_a_model_that_fits_the_gpus(tmp_path):
    """transformers' get_balanced_memory: when the model fits the GPUs, every GPU but the last
    holds at most model / G + 1.25 layers, even if the first could hold it all: 4 equal layers
    over 2 GPUs, the first takes floor(2 + 1.25) = 3."""
    from test_multi_gpu import GPU, HW

    text = HW + "".join(GPU.replace("{name}", f"gpu{g}").replace("{hbm}", "8MB") for g in range(2))
    (tmp_path / "big.yaml").write_text(text)
    hw = load_profile(tmp_path / "big.yaml")[1]
    _, model, trace = _box(tmp_path, 2)
    st = planning_stats(trace)

    def setup_for(engine: str):
        s = make_setup(hw, model, st, batch_size=1, context_tokens=64, formats=("bf16",), engine=load_engine(engine))
        return dataclasses.replace(s, device_reserve=(0.0, 0.0), host_reserve=(0.0, 0.0))
    plan = compare_pipeline(setup_for, None, REQ, INPUTS)["accelerate-auto"]
    assert all(set(layer.site) == {"resident"} for layer in plan.layers)  # the first GPU alone could hold them
    assert plan.layer_devices == ("n/gpu0", "n/gpu0", "n/gpu0", "n/gpu1")


# --------------------------------------------------------------------------- the 2x RTX 3090 box


@pytest.fixture(scope="module")
def box():
    profile, hw = load_profile(BOX)
    model = load_model("mixtral-8x7b")
    trace = default_workload(model)
    st = planning_stats(trace)
    req = OptimizeRequest(hardware=BOX, quality_budget=0.006)
    inputs = Inputs(hardware=hw.name, hardware_digest="-", model=model.name, model_digest="-",
                    workload=trace.source or "trace", workload_digest="-", engine="bundle")

    def setup_for(engine: str):
        return make_setup(hw, model, st, batch_size=1, context_tokens=req.context_tokens, formats=req.formats,
                          engine=load_engine(engine))
    return hw, model, compare_pipeline(setup_for, 0.006, req, inputs)


@pytest.mark.parametrize("name, engine, render", [("llama.cpp-split", "llama.cpp", render_llamacpp_pipeline),
                                                  ("accelerate-auto", "accelerate", render_accelerate_pipeline)])
def test_exporter_and_pipeline_baseline_give_one_price(box, name, engine, render):
    """The baseline's placement exported for its engine is priced exactly as --compare prices it."""
    hw, model, plans = box
    base = plans[name]
    assert base.inputs.engine == engine and len(set(base.layer_devices)) == 2
    cfg = render(base, model, hw, Pricing(base, model, hw, engine=engine))
    assert cfg["predicted"]["rounded"]["tokens_per_s"] == pytest.approx(base.predicted["tokens_per_s"], rel=1e-12)
    # and the plan itself re-priced through the exporters' path: the same number
    assert cfg["predicted"]["plan_repriced"]["tokens_per_s"] == pytest.approx(base.predicted["tokens_per_s"],
                                                                              rel=1e-12)


def test_llamacpp_baseline_exports_as_the_command_users_type(box):
    hw, model, plans = box
    base = plans["llama.cpp-split"]
    cfg = render_llamacpp_pipeline(base, model, hw, Pricing(base, model, hw, engine="llama.cpp"))
    serve = shlex.split(cfg["commands"]["serve"])
    n = re.search(r"--n-cpu-moe (\d+)", base.notes[-1]).group(1)
    assert serve[serve.index("--n-cpu-moe") + 1] == n
    assert serve[serve.index("--device") + 1] == "CUDA0,CUDA1" and serve[serve.index("--tensor-split") + 1] == "17,16"
    assert "-ot" not in serve  # the default split with --n-cpu-moe: no override rules


def _placement(serve: list[str], names: list[str]) -> dict[str, str]:
    """llama.cpp's buffer of every block tensor for a llama-server command: first -ot match, else
    --n-cpu-moe, else the --tensor-split device of its layer (src/llama-model.cpp, common/arg.cpp)."""
    devices = serve[serve.index("--device") + 1].split(",")
    weights = [float(w) for w in serve[serve.index("--tensor-split") + 1].split(",")]
    rules = [r.rsplit("=", 1) for r in serve[serve.index("-ot") + 1].split(",")] if "-ot" in serve else []
    n_cpu = int(serve[serve.index("--n-cpu-moe") + 1]) if "--n-cpu-moe" in serve else 0
    blocks = {int(re.match(r"blk\.(\d+)\.", x).group(1)) for x in names if x.startswith("blk.")}
    split = llamacpp_split(weights, max(blocks) + 1)
    out = {}
    for name in names:
        m = re.match(r"blk\.(\d+)\.", name)
        if not m:
            continue
        i = int(m.group(1))
        hit = next((buf for pat, buf in rules if re.search(pat, name)), None)
        if hit is None and i < n_cpu and re.search(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps", name):
            hit = "CPU"
        out[name] = hit or devices[split[i]]
    return out


@pytest.mark.parametrize("pattern", ["alternate", "reversed"])
def test_llamacpp_pipeline_command_puts_every_tensor_where_the_rounding_says(box, pattern):
    """A plan whose GPUs alternate (-ot block rules) or run in reverse order (--device order):
    llama.cpp's reading of the command puts each block's tensors on the rounded layer's buffer."""
    hw, model, plans = box
    base = plans["llama.cpp-split"]
    L = len(base.layers)
    gpus = ("node/gpu0", "node/gpu1")
    devs = tuple(gpus[l % 2] for l in range(L)) if pattern == "alternate" else \
        tuple(gpus[1 - gpus.index(d)] for d in base.layer_devices)
    layers = []
    for layer, d in zip(base.layers, devs):
        mem = hw.memory_of(d).id
        layers.append(layer.model_copy(update={"home": tuple(mem if s == "resident" else h
                                                             for h, s in zip(layer.home, layer.site))}))
    plan = base.model_copy(update={"layers": tuple(layers), "layer_devices": devs})
    cfg = render_llamacpp_pipeline(plan, model, hw, Pricing(plan, model, hw, engine="llama.cpp"))
    assert cfg["split"]["contiguous"] == (pattern == "reversed")
    serve = shlex.split(cfg["commands"]["serve"])
    if pattern == "reversed":
        assert serve[serve.index("--device") + 1] == "CUDA1,CUDA0"
    placed = _placement(serve, gguf_tensor_names(model))
    by_blk = {r["blk"]: r for r in cfg["rounding"]["layers"]}
    for name, buf in placed.items():
        r = by_blk[int(name.split(".")[1])]
        expert = re.search(r"_exps\.", name) is not None
        assert buf == (r["buffer"] if expert else r["gpu"]), name
    assert {r["gpu"] for r in by_blk.values()} == {"CUDA0", "CUDA1"}


def test_render_engines_writes_pipeline_configs_and_says_what_sglang_vllm_cannot(box, tmp_path):
    hw, model, plans = box
    out = render_engines(plans["llama.cpp-split"], model, hw, tmp_path)
    assert {p.name for p in out.files} >= {"llamacpp.json", "llamacpp.sh", "accelerate.json", "accelerate_load.py"}
    assert out.skipped == {"sglang/vllm": PIPELINE_NOT_SERVED} and "\n" not in PIPELINE_NOT_SERVED
    acc = json.loads((tmp_path / "engines" / "accelerate.json").read_text())
    assert set(acc["max_memory"]) >= {"0", "1", "cpu"}


# --------------------------------------------------------------------------- accelerate's map


def _tiny_transformers(tmp_path, layers: int):
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "tiny"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(TINY_CONFIG | {"num_hidden_layers": layers}))
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(d)), load_model(d)


def _covered_once(model, dmap) -> dict[str, object]:
    from transformers.integrations.accelerate import expand_device_map

    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for name in names:
        assert len([k for k in dmap if name == k or name.startswith(k + ".")]) == 1, name
    for key in dmap:
        model.get_submodule(key)
    return expand_device_map(dmap, names)


def test_device_map_over_several_gpus_covers_every_parameter(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model, spec = _tiny_transformers(tmp_path, 4)
    layers_on = {0: 0, 1: 1, 2: 1, 3: 0}
    experts_on = {2: "cpu", 3: "disk"}
    dmap = device_map_for(spec, experts_on, 0, layers_on=layers_on)
    accelerate.utils.check_device_map(model, dmap)  # accelerate's own check: every parameter mapped
    placed = _covered_once(model, dmap)
    for name, dev in placed.items():
        m = re.match(r"model\.layers\.(\d+)\.(mlp\.experts\.)?", name)
        want = 0 if not m else experts_on.get(int(m.group(1)), layers_on[int(m.group(1))]) if m.group(2) \
            else layers_on[int(m.group(1))]
        assert dev == want, name


def test_rendered_multi_gpu_map_resolves_on_the_model_class(box, tmp_path):
    """The 2x3090 rendering's keys all name modules of a Mixtral with 32 layers, cover it once,
    and put each layer on its rounded GPU (offloaded experts on cpu/disk)."""
    accelerate = pytest.importorskip("accelerate")
    hw, spec, plans = box
    base = plans["accelerate-auto"]
    cfg = render_accelerate_pipeline(base, spec, hw, Pricing(base, spec, hw, engine="accelerate"))
    model, _ = _tiny_transformers(tmp_path, spec.num_hidden_layers)
    accelerate.utils.check_device_map(model, cfg["device_map"])
    placed = _covered_once(model, cfg["device_map"])
    rows = {r["layer"]: r for r in cfg["rounding"]["layers"]}
    for name, dev in placed.items():
        m = re.match(r"model\.layers\.(\d+)\.(mlp\.experts\.)?", name)
        if m:
            r = rows[int(m.group(1))]
            assert dev == (r["device"] if m.group(2) else r["runs_on"]), name
    assert {r["device"] for r in rows.values()} >= {0, 1, "cpu"}


def test_export_engines_only_writes_a_pipeline_plans_configs(box, tmp_path):
    """`planner export --engines-only`: a pipeline plan's engine configs alone; a plan in the bundle
    runtime's formats is bundled whole, each GPU mapped to its CUDA device."""
    from click.testing import CliRunner

    from planner.cli import cli

    hw, model, plans = box
    path = tmp_path / "plan.json"
    plans["llama.cpp-split"].save(path)
    res = CliRunner().invoke(cli, ["--json", "export", str(path), "--engines-only", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert "--tensor-split 17,16" in out["commands"]["llama.cpp"]
    assert out["skipped"] == {"sglang/vllm": PIPELINE_NOT_SERVED}
    cfg = json.loads((tmp_path / "d" / "engines" / "llamacpp.json").read_text())
    assert cfg["predicted"]["rounded"]["tokens_per_s"] == pytest.approx(plans["llama.cpp-split"].predicted[
        "tokens_per_s"], rel=1e-9)
    plans["accelerate-auto"].save(path)  # bf16 over both GPUs: the bundle runtime runs it
    bundle = CliRunner().invoke(cli, ["export", str(path), "--out", str(tmp_path / "b")])
    assert bundle.exit_code == 0, bundle.output
    devices = json.loads((tmp_path / "b" / "devices.json").read_text())["devices"]
    assert {d["torch"] for d in devices.values()} == {"cuda:0", "cuda:1"}


def test_contiguous_puts_each_gpu_on_one_range_at_no_cost(tmp_path):
    """Layers on GPUs 0, 1, 1, 0; GPU 0 (it holds the embedding and head too) takes two at most,
    GPU 1 three: polish finds nothing strictly faster (two hops either way), contiguous moves to
    0, 1, 1, 1 (one --tensor-split range per GPU; the first cut tried, GPU 0 first) at the same
    seconds, feasible; a layout already contiguous is left as it is."""
    import numpy as np

    from planner.ilp import build_problem
    from planner.multi_gpu import contiguous, feasible, hop_s, node_gpus, objective_s, polish
    from test_multi_gpu import _setup

    s, *_ = _setup(tmp_path)
    gpus = node_gpus(s)
    problems = [build_problem(dataclasses.replace(s, compute=s.hardware.devices[g]), 0.05) for g in gpus]
    times = [p.times(False) for p in problems]
    hop = np.array([[hop_s(s, a, b, 1) for b in gpus] for a in gpus])
    fm = "int4"
    # each layer's option of one size: two fit GPU 0, three GPU 1
    size = 131040.0
    choice = tuple(int(np.flatnonzero(t.dev_bytes == size)[0]) for t in problems[0].tables)
    assert feasible(problems, choice, (0, 1, 1, 0), fm, None) and not feasible(problems, choice, (0, 0, 0, 1), fm, None)
    assert feasible(problems, choice, (0, 1, 1, 1), fm, None)
    before = objective_s(problems, times, choice, (0, 1, 1, 0), hop, fm)
    assert polish(problems, times, choice, (0, 1, 1, 0), hop, fm, None)["devices"] == (0, 1, 1, 0)
    out = contiguous(problems, times, choice, (0, 1, 1, 0), hop, fm, None)
    assert out["devices"] == (0, 1, 1, 1) and feasible(problems, choice, out["devices"], fm, None)
    assert out["objective"] == pytest.approx(before, rel=1e-12)
    assert contiguous(problems, times, choice, (1, 1, 0, 0), hop, fm, None)["devices"] == (1, 1, 0, 0)
