"""What `planner export` prints and writes holds after it returns (issue 17 items 1, 5, 6, 7, 10).

Each engine file is read by a checker written from that engine's documented format
(REFERENCE.md, "Engine formats as their own code reads them"), not by the writer's own code:

* SGLang ``--init-expert-location``: one key, ``physical_to_logical_map`` ``[num_hidden_layers,
  num_physical_experts]``, physical = routed + ``--ep-num-redundant-experts``, divisible by
  ``--ep-size``; rank r owns slots ``[r*S, (r+1)*S)``; dense rows trivial (``s % E``).
* vLLM: ``--eplb-config`` keys; with EPLB on or redundant experts vLLM places linearly.
* vllm-ascend: ``--additional-config`` holds only ``eplb_config.expert_map_path``; the map
  indexes layers by MoE-layer counter.
* llama.cpp: ``-ot`` rules (``regex=buffer``, comma-separated, ``std::regex_search`` on the full
  name, first match wins) and ``llama-quantize --tensor-type`` rules, applied with Python's
  ``re.search`` to every GGUF tensor name of the model, generated here from the ``gguf``
  package's tables.

And ``run.py`` refuses a tampered bundle with one line and exit 1 before it imports anything
of the bundle's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType

from exporters.bundle import BUNDLE_FORMAT_VERSION, check_manifest
from exporters.engines.llamacpp import GGUF_TYPES
from planner.plan import Inputs, SolverInfo, load_plan
from profiles.errors import InputError
from profiles.hardware import load_profile
from profiles.models import load_model
from conftest import small_cluster  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "golden" / "engines"
# HF class -> GGUF architecture (convert_hf_to_gguf.py writes Mixtral as "llama")
ARCH = {"MixtralForCausalLM": MODEL_ARCH.LLAMA, "OlmoeForCausalLM": MODEL_ARCH.OLMOE,
        "DeepseekV2ForCausalLM": MODEL_ARCH.DEEPSEEK2}
EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps\.")


# --------------------------------------------------------------------------- exports


def _export(run_cli, plan_path: Path, out: str, *extra) -> dict:
    r = run_cli("--json", "export", plan_path, "--out", out, *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def two_node(tmp_path_factory) -> tuple[Path, Path]:
    """A hand-made EP plan on 2 nodes x 2 H100s, one copy per expert (ExFlow, vLLM without EPLB);
    (plan path, hardware path)."""
    from planner.cluster import plan_from_placement, topology

    d = tmp_path_factory.mktemp("two-node")
    hw_path = small_cluster(d / "tiny.yaml")
    _, hw = load_profile(hw_path)
    model = load_model("olmoe-1b-7b")
    phy2log = np.array([[(16 * g + i + 5 * layer) % 64 for g in range(4) for i in range(16)]
                        for layer in range(model.num_moe_layers)])
    phy2log = np.sort(phy2log.reshape(len(phy2log), 4, 16), axis=2).reshape(len(phy2log), 64)
    inputs = Inputs(hardware="tiny", hardware_digest="0", model=model.name, model_digest="0", workload="hand-made",
                    workload_digest="0")
    plan = plan_from_placement(phy2log, hw=hw, topo=topology(hw), model=model, inputs=inputs, expert_format="bf16",
                               memory_need={"expert_bytes": 1.0}, batch_size=1, context_tokens=16,
                               predicted={"linear.max_mean_load": 2.0, "round-robin.max_mean_load": 1.5},
                               solver=SolverInfo(method="hand"))
    return plan.save(d / "plan.json"), hw_path


def _paths_in(command: str) -> list[str]:
    """Every token of a command line that names a file or directory (holds a ``/``), JSON
    arguments opened up."""
    out = []

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and "/" in value:
            out.append(value)

    for token in shlex.split(command):
        if token.startswith("{"):
            walk(json.loads(token))
        elif "/" in token and not token.startswith("-"):
            out.append(token)
    return out


def _commands_of(bundle: Path, printed: dict[str, str]) -> list[str]:
    """Printed commands, the README's code blocks and every ``commands`` entry of the engine JSON files."""
    readme = (bundle / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    found = list(printed.values()) + blocks
    for f in (bundle / "engines").glob("*.json"):
        data = json.loads(f.read_text())
        if isinstance(data, dict) and isinstance(data.get("commands"), dict):
            found += list(data["commands"].values())
    return found


def _assert_paths_exist(bundle: Path, printed: dict[str, str], placeholders: set[str]) -> int:
    seen = 0
    for command in _commands_of(bundle, printed):
        for path in _paths_in(command):
            if path in placeholders:
                continue
            assert Path(path).exists(), f"{path!r} (in {command[:80]!r}...) does not exist"
            seen += 1
    # and no written file names the staging directory the bundle was built in
    for f in bundle.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".sh", ".py", ".yaml", ".csv"):
            assert f".{bundle.name}-" not in f.read_text(), f"{f} names the staging directory"
    assert not list(bundle.parent.glob(f".{bundle.name}-*")), "the staging directory is left behind"
    return seen


def test_ep_bundle_paths_exist(ep_plan, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)  # as a user types it: a relative --out
    data = _export(run_cli, ep_plan, "ep-bundle/")
    bundle = tmp_path / "ep-bundle"
    assert {"sglang", "vllm", "vllm-ascend"} <= set(data["commands"])
    assert "engines/sglang_expert_location.json" in data["commands"]["sglang"]
    assert _assert_paths_exist(bundle, data["commands"], {"CHECKPOINT_DIR"}) >= 4
    readme = (bundle / "README.md").read_text()
    assert "nan" not in readme and "max/mean expert load" in readme


def test_two_node_bundle_paths_exist(two_node, tmp_path, run_cli):
    plan_path, hw_path = two_node
    out = tmp_path / "two-node"
    data = _export(run_cli, plan_path, out, "-H", hw_path)
    assert {"sglang", "vllm", "vllm-ascend", "exflow"} <= set(data["commands"])
    _assert_paths_exist(out, data["commands"], {"CHECKPOINT_DIR"})
    assert str(out / "engines" / "placement" / "exp64_gpu4.json") in data["commands"]["exflow"]


@pytest.mark.parametrize("case", ["desktop-4090--mixtral-8x7b", "desktop-alveo-u280--olmoe-1b-7b"])
def test_single_node_bundle_paths_exist(case, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    data = _export(run_cli, GOLDEN / case / "plan.json", "bundle")
    bundle = tmp_path / "bundle"
    # llama.cpp's model files are what its own steps produce; the checkpoint is the user's
    placeholders = {"CHECKPOINT_DIR"}
    seen = _assert_paths_exist(bundle, data["commands"], placeholders)
    assert seen >= 3  # run.py, the bundle for verify, accelerate_load.py (+ the accelerator map)
    assert "python bundle/engines/accelerate_load.py" in data["commands"]["accelerate"]


# --------------------------------------------------------------------------- SGLang / vLLM / vllm-ascend


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def _gpu_layout(plan) -> tuple[list[str], list[list[list[int]]]]:
    """EP ranks (the plan's GPUs in natural id order) and ``[moe layer][rank] -> sorted experts``."""
    def natural(text):
        return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))

    gpus = sorted({g for lp in plan.layers for e, h in enumerate(lp.home) for g in (h, *lp.replicas[e])},
                  key=natural)
    held = [[sorted(e for e, h in enumerate(lp.home) if g in (h, *lp.replicas[e])) for g in gpus]
            for lp in plan.layers]
    return gpus, held


def _check_sglang(command: str, plan, model) -> None:
    args = shlex.split(command)
    assert "--enable-ep-moe" not in args  # deprecated: --ep-size
    ep = int(_flag(args, "--ep-size"))
    redundant = int(_flag(args, "--ep-num-redundant-experts"))
    doc = json.loads(Path(_flag(args, "--init-expert-location")).read_text())
    assert set(doc) == {"physical_to_logical_map"}  # the keys go to init_by_mapping(): nothing else
    p2l = doc["physical_to_logical_map"]
    E = model.num_experts
    R = E + redundant
    assert len(p2l) == model.num_hidden_layers and all(len(row) == R for row in p2l)
    assert R % ep == 0
    S = R // ep
    gpus, held = _gpu_layout(plan)
    assert len(gpus) == ep
    moe = dict(zip(model.moe_layer_indices, range(model.num_moe_layers)))
    for layer, row in enumerate(p2l):
        assert all(isinstance(x, int) and 0 <= x < E for x in row)
        if layer not in moe:
            assert row == [s % E for s in range(R)]
            continue
        assert set(row) == set(range(E))
        for r in range(ep):
            assert sorted(row[r * S:(r + 1) * S]) == held[moe[layer]][r]


def _check_vllm(command: str) -> None:
    args = shlex.split(command)
    assert "--enable-expert-parallel" in args
    strategy = _flag(args, "--expert-placement-strategy")
    assert strategy in (None, "linear", "round_robin")
    config = json.loads(_flag(args, "--eplb-config") or "{}")
    assert set(config) <= {"window_size", "step_interval", "num_redundant_experts", "log_balancedness"}
    assert all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in config.values())
    eplb = "--enable-eplb" in args
    if config.get("num_redundant_experts", 0) > 0:
        assert eplb  # vLLM refuses redundant experts without EPLB
    if eplb:  # vLLM falls back to linear: promising round_robin would be false
        assert strategy in (None, "linear")


def _check_vllm_ascend(command: str, plan, model) -> None:
    args = shlex.split(command)
    extra = json.loads(_flag(args, "--additional-config"))
    assert set(extra) == {"eplb_config"}  # recent versions reject unknown top-level keys
    assert set(extra["eplb_config"]) == {"expert_map_path"}
    doc = json.loads(Path(extra["eplb_config"]["expert_map_path"]).read_text())
    assert set(doc) == {"moe_layer_count", "layer_list"}
    assert doc["moe_layer_count"] == model.num_moe_layers == len(doc["layer_list"])
    gpus, held = _gpu_layout(plan)
    G = int(_flag(args, "--data-parallel-size"))
    assert G == len(gpus)
    for l, layer in enumerate(doc["layer_list"]):
        assert set(layer) == {"layer_id", "device_count", "device_list"}
        assert layer["layer_id"] == l and layer["device_count"] == G  # MoE-layer counter, not decoder id
        assert [d["device_id"] for d in layer["device_list"]] == list(range(G))
        assert [sorted(d["device_expert"]) for d in layer["device_list"]] == held[l]


def test_ep_engine_files_parse_as_documented(ep_plan, two_node, tmp_path, run_cli):
    model = load_model("olmoe-1b-7b")
    for name, (plan_path, extra) in {"one-node": (ep_plan, ()),
                                     "two-node": (two_node[0], ("-H", two_node[1]))}.items():
        data = _export(run_cli, plan_path, tmp_path / name, *extra)
        plan = load_plan(plan_path)
        _check_sglang(data["commands"]["sglang"], plan, model)
        _check_vllm(data["commands"]["vllm"])
        _check_vllm_ascend(data["commands"]["vllm-ascend"], plan, model)
    # no redundant experts: no EPLB, and the static strategy the planner scored better is kept
    args = shlex.split(data["commands"]["vllm"])
    assert "--enable-eplb" not in args and _flag(args, "--expert-placement-strategy") == "round_robin"
    assert "--ep-size 4" in data["commands"]["sglang"] and "--nnodes 2" in data["commands"]["sglang"]


# --------------------------------------------------------------------------- llama.cpp


def gguf_names(model) -> list[str]:
    """Every tensor name of the model's GGUF, from gguf's MODEL_TENSORS / TENSOR_NAMES: top-level
    tensors once, block tensors per decoder layer (routed experts only in MoE layers; dense
    FFN tensors in every layer, a superset), ``.weight`` and ``.bias``."""
    moe = set(model.moe_layer_indices)
    names = []
    for tensor in MODEL_TENSORS[ARCH[model.architecture]]:
        template = TENSOR_NAMES[tensor]
        if "{bid}" not in template:
            names += [template]
            continue
        for b in range(model.num_hidden_layers):
            name = template.format(bid=b)
            if b in moe or not EXPERT.match(name + "."):
                names.append(name)
    return [f"{n}.{suffix}" for n in names for suffix in ("weight", "bias")]


def _check_llamacpp(cfg: dict, model) -> None:
    names = gguf_names(model)
    assert any(EXPERT.match(n) for n in names) and "blk.0.attn_v.weight" in names
    layers = {r["blk"]: r for r in cfg["rounding"]["layers"]}
    serve = shlex.split(cfg["commands"]["serve"])
    on_gpu = _flag(serve, "-ngl") != "0"
    rules = [r.rsplit("=", 1) for r in _flag(serve, "-ot").split(",")] if "-ot" in serve else []
    assert all(len(r) == 2 and "," not in r[0] for r in rules)
    default = cfg["buffer"] if on_gpu else "CPU"
    for name in names:
        buffer = next((buf for pat, buf in rules if re.search(pat, name)), default)  # first match wins
        m = EXPERT.match(name)
        if m:
            assert buffer == layers[int(m.group(1))]["buffer"], name
        else:
            assert buffer == default or (buffer != "CPU" and "_shexp" in name), name
    # llama-quantize: every tensor the plan sizes gets exactly one rule, with the planned type
    if "quantize" not in cfg["commands"]:
        return
    quant = shlex.split(cfg["commands"]["quantize"])
    dense = _flag(quant, "--token-embedding-type")
    assert _flag(quant, "--output-tensor-type") == dense
    qrules = [quant[i + 1].rsplit("=", 1) for i, a in enumerate(quant) if a == "--tensor-type"]
    for name in names:
        hits = [t for pat, t in qrules if re.search(pat.lower(), name)]  # llama-quantize lowercases
        m = EXPERT.match(name)
        if m:
            layer = layers[int(m.group(1))]
            want = layer["gguf_down"] if m.group(2) == "down" else layer["gguf_gate_up"]
        else:
            want = dense
        assert hits == [want.lower()], (name, hits)


@pytest.mark.parametrize("case", ["desktop-4090--mixtral-8x7b", "laptop-4060--deepseek-v2-lite",
                                  "desktop-alveo-u280--olmoe-1b-7b"])
def test_llamacpp_rules_over_every_gguf_tensor(case, tmp_path):
    from exporters.engines.single import render_engines

    hw, model_name = case.split("--")
    render_engines(load_plan(GOLDEN / case / "plan.json"), model_name, hw, tmp_path)
    cfg = json.loads((tmp_path / "engines" / "llamacpp.json").read_text())
    _check_llamacpp(cfg, load_model(model_name))
    # dense tensors are named, so llama-quantize's mixture cannot raise attn_v / attn_output
    assert any(r.startswith("^(?!") for r in cfg["quantize"]["tensor_type"])


def test_gguf_type_sizes_come_from_the_gguf_package():
    for name, t in GGUF_TYPES.items():
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        assert (t.block, t.bits_per_weight) == (block, 8 * block_bytes / block)


# --------------------------------------------------------------------------- run.py refusals


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from click.testing import CliRunner

    from planner.cli import cli

    out = tmp_path_factory.mktemp("b") / "bundle"
    r = CliRunner().invoke(cli, ["export", str(GOLDEN / "desktop-alveo-u280--olmoe-1b-7b" / "plan.json"),
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _marker(copy: Path) -> Path:
    return copy.parent / "imported.txt"


def _edit_init(b: Path) -> None:
    with (b / "runtime" / "__init__.py").open("a") as fh:
        fh.write(f"\nopen({str(_marker(b))!r}, 'w').write('ran')\n")


def _drop_entry(b: Path) -> None:
    manifest = json.loads((b / "manifest.json").read_text())
    del manifest["files"]["runtime/store.py"]
    (b / "manifest.json").write_text(json.dumps(manifest))


def _symlink_out(b: Path) -> None:
    outside = b.parent / "outside.txt"
    outside.write_text("not the bundle's")
    (b / "engines" / "notes.txt").symlink_to(outside)


def _listed_symlink(b: Path) -> None:
    target = b.parent / "plan-copy.json"
    shutil.copy(b / "plan.json", target)
    (b / "plan.json").unlink()
    (b / "plan.json").symlink_to(target)


TAMPER = {
    "edited runtime/__init__.py": (_edit_init, "runtime/__init__.py changed since export"),
    "manifest.json deleted": (lambda b: (b / "manifest.json").unlink(), "no manifest.json"),
    "manifest entry dropped": (_drop_entry, "runtime/store.py is not listed"),
    "unlisted extra file": (lambda b: (b / "runtime" / "evil.py").write_text("x = 1\n"), "runtime/evil.py is not listed"),
    "file in an unlisted directory": (lambda b: ((b / "extra").mkdir(), (b / "extra" / "x.py").write_text("")),
                                      "extra/x.py is not listed"),
    "non-bytecode in __pycache__": (lambda b: ((b / "runtime" / "__pycache__").mkdir(),
                                               (b / "runtime" / "__pycache__" / "x.py").write_text("")),
                                    "runtime/__pycache__/x.py is not listed"),
    "symlink out of the bundle": (_symlink_out, "engines/notes.txt is a symbolic link"),
    "listed file replaced by a symlink": (_listed_symlink, "plan.json is a symbolic link"),
    "runtime file deleted": (lambda b: (b / "runtime" / "store.py").unlink(), "runtime/store.py, listed in manifest"),
    "manifest not JSON": (lambda b: (b / "manifest.json").write_text("{"), "not valid JSON"),
    "manifest of another format": (lambda b: (b / "manifest.json").write_text('{"format_version": 99}'),
                                   "unsupported bundle format"),
}


@pytest.mark.parametrize("what", sorted(TAMPER))
def test_run_py_refuses_a_tampered_bundle(bundle, what, tmp_path):
    tamper, message = TAMPER[what]
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy, symlinks=True)
    tamper(copy)
    r = subprocess.run([sys.executable, str(copy / "run.py"), "--checkpoint", str(tmp_path / "none"), "--prompt", "x"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not _marker(copy).exists()  # nothing of the bundle's ran
    with pytest.raises(InputError, match=re.escape(message)):  # planner verify refuses it alike
        check_manifest(copy)


def test_run_py_passes_an_intact_bundle_and_leaves_no_bytecode(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy, symlinks=True)
    # a bytecode cache in the bundle is tolerated and never read, even one that is valid for
    # its source's size and time but holds other code (the manifest hashes sources only)
    source = copy / "runtime" / "planfile.py"
    planted = tmp_path / "planfile.py"
    code = 'print("PLANTED BYTECODE RAN")\n'
    planted.write_text(code + "#" * (source.stat().st_size - len(code) - 1) + "\n")
    assert planted.stat().st_size == source.stat().st_size
    os.utime(planted, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns))
    import importlib.util
    import py_compile

    py_compile.compile(str(planted), cfile=importlib.util.cache_from_source(str(source)), doraise=True)
    check_manifest(copy)
    plain = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(copy)!r}); import runtime.planfile"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert "PLANTED BYTECODE RAN" in plain.stdout  # a plain import would run it
    r = subprocess.run([sys.executable, str(copy / "run.py"), "--checkpoint", str(tmp_path / "none"), "--prompt", "x"],
                       capture_output=True, text=True, cwd=tmp_path)
    # past the manifest: the runtime itself refuses the missing checkpoint, in one line
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "manifest" not in r.stderr and "symbolic link" not in r.stderr
    assert "PLANTED" not in r.stdout + r.stderr
    assert sorted(p.name for p in copy.rglob("__pycache__")) == ["__pycache__"]  # only the one made above
    check_manifest(copy)


def test_run_py_carries_the_format_version():
    assert BUNDLE_FORMAT_VERSION == 1  # bundle_problem (copied into run.py) checks for 1 literally
    assert os.path.basename(__file__) == "test_export_paths.py"
