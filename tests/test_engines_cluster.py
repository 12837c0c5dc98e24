"""Engine exports of expert-parallel plans: SGLang, vLLM, vLLM-Ascend, ExFlow.

Golden files: ``tests/data/golden/cluster/`` holds what the writers produce for a fixed
hand-made placement (2 MoE layers of OLMoE's 64 experts on 2 nodes x 2 GPUs, 8 redundant),
and the commands they print. Regenerate with ``UPDATE_GOLDEN=1 pytest tests/test_engines_cluster.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporters.engines.exflow import write_exflow
from exporters.engines.sglang import ep_layout, write_sglang
from exporters.engines.vllm import (
    expert_map,
    validate_expert_map,
    write_vllm,
    write_vllm_ascend,
)
from planner.cluster import plan_from_placement, topology
from planner.plan import Inputs, SolverInfo
from profiles.errors import InputError
from profiles.hardware import load_profile
from profiles.models import load_model
from conftest import small_cluster  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "golden" / "cluster"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
REPO = Path(__file__).resolve().parents[1]


def _phy2log(redundant: bool) -> np.ndarray:
    """GPU g owns experts 16g..16g+15; with ``redundant`` it also copies the next GPU's first two."""
    rows = []
    for layer in range(2):
        row = []
        for g in range(4):
            own = [(16 * g + i + 5 * layer) % 64 for i in range(16)]
            extra = [(16 * ((g + 1) % 4) + i + 5 * layer) % 64 for i in range(2)] if redundant else []
            row += sorted(own + extra)
        rows.append(row)
    return np.array(rows)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _, hw = load_profile(small_cluster(tmp_path_factory.mktemp("hw") / "tiny.yaml"))
    return hw, topology(hw), load_model("olmoe-1b-7b")


def _plan(setup, redundant: bool = True, predicted: dict | None = None):
    hw, topo, model = setup
    inputs = Inputs(hardware="tiny", hardware_digest="0", model=model.name, model_digest="0", workload="hand-made",
                    workload_digest="0")
    return plan_from_placement(_phy2log(redundant), hw=hw, topo=topo, model=model, inputs=inputs,
                               expert_format="bf16", memory_need={"expert_bytes": 1.0}, batch_size=1,
                               context_tokens=16, predicted=predicted or {}, solver=SolverInfo(method="hand"))


@pytest.fixture
def exports(setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the printed commands
    plan = _plan(setup, predicted={"linear.max_mean_load": 2.0, "round-robin.max_mean_load": 1.5})
    results = [write_sglang(plan, "engines", num_hidden_layers=3), write_vllm(plan, "engines"),
               write_vllm_ascend(plan, "engines"), write_exflow(_plan(setup, redundant=False), "engines")]
    return tmp_path / "engines", results


def test_golden_files(exports):
    out, results = exports
    files = {f.relative_to("engines").as_posix(): out / f.relative_to("engines") for r in results for f in r.files}
    commands = "".join(f"{r.engine}: {r.command}\n" for r in results)
    (out / "commands.txt").write_text(commands)
    files["commands.txt"] = out / "commands.txt"
    if UPDATE:
        for name, f in files.items():
            (GOLDEN / name).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / name).write_bytes(f.read_bytes())
    golden = sorted(p.relative_to(GOLDEN).as_posix() for p in GOLDEN.rglob("*") if p.is_file())
    assert sorted(files) == golden
    for name, f in files.items():
        assert f.read_text() == (GOLDEN / name).read_text(), f"{name} differs from its golden file"


def test_sglang_map_rows_and_flags(exports):
    import json

    out, (sglang, *_rest) = exports
    p2l = np.array(json.loads((out / "sglang_expert_location.json").read_text())["physical_to_logical_map"])
    assert p2l.shape == (3, 72)  # every hidden layer a row: MoE layers 0, 1 and an unplanned row 2
    assert p2l[0].tolist() == _phy2log(True)[0].tolist()
    assert p2l[2].tolist() == (np.arange(72) % 64).tolist()
    assert "--ep-num-redundant-experts 8" in sglang.command and "--tp 4" in sglang.command
    assert "--init-expert-location engines/sglang_expert_location.json" in sglang.command
    assert "--nnodes 2" in sglang.command and "--model-path allenai/OLMoE-1B-7B-0924" in sglang.command


def test_vllm_picks_the_better_strategy_and_states_redundancy(exports):
    _out, (_s, vllm, ascend, exflow) = exports
    # redundant experts need vLLM's EPLB, and with it vLLM starts from linear whatever the flag says
    assert "--expert-placement-strategy linear" in vllm.command and "--enable-eplb" in vllm.command
    assert '"num_redundant_experts": 8' in vllm.command
    assert '{"eplb_config": {"expert_map_path": ' in ascend.command
    assert exflow.files[1].name == "exp64_gpu4.json"


def test_layout_roundtrip(setup):
    layout = ep_layout(_plan(setup))
    assert layout.ranks == ("node0/gpu0", "node0/gpu1", "node1/gpu0", "node1/gpu1")
    assert layout.slots_per_rank == 18 and layout.num_redundant == 8
    assert (layout.phy2log == _phy2log(True)).all()


def test_offload_plans_are_refused(setup):
    plan = _plan(setup)
    layer = plan.layers[0].model_copy(update={"site": ("fetch",) + plan.layers[0].site[1:]})
    bad = plan.model_copy(update={"layers": (layer,) + plan.layers[1:]})
    with pytest.raises(InputError, match="resident"):
        ep_layout(bad)


def test_unequal_slots_are_refused(setup):
    plan = _plan(setup)
    layer = plan.layers[0]
    reps = list(layer.replicas)
    reps[0] = ()  # expert 0 loses its copy: one GPU now holds 17 experts
    bad = plan.model_copy(update={"layers": (layer.model_copy(update={"replicas": tuple(reps)}),) + plan.layers[1:]})
    with pytest.raises(InputError, match="same number of physical experts"):
        write_sglang(bad, "unused", num_hidden_layers=3)


def test_exflow_needs_one_copy_per_expert(setup, tmp_path):
    with pytest.raises(InputError, match="--redundant-experts 0"):
        write_exflow(_plan(setup), tmp_path)


def test_sglang_rows_must_cover_the_moe_layers(setup, tmp_path):
    with pytest.raises(InputError, match="num_hidden_layers"):
        write_sglang(_plan(setup), tmp_path, num_hidden_layers=1)


def test_expert_map_rules(setup):
    doc = expert_map(_plan(setup))
    validate_expert_map(doc, 64)
    doc["layer_list"][1]["device_list"][2]["device_expert"][0] = doc["layer_list"][1]["device_list"][2]["device_expert"][1]
    with pytest.raises(InputError, match="twice"):
        validate_expert_map(doc, 64)
    with pytest.raises(InputError, match="moe_layer_count"):
        validate_expert_map({"moe_layer_count": 3, "layer_list": []}, 64)


def test_exporters_import_no_planner_internals():
    code = ("import sys, exporters.engines.sglang, exporters.engines.vllm, exporters.engines.exflow; "
            "print(sorted(m for m in sys.modules if m.startswith('planner.') or m == 'pulp'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['planner.plan', 'planner.plan_layer']"  # the Plan contract only


def test_module_cli_bad_plan_is_one_line(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{}")
    r = subprocess.run([sys.executable, "-m", "exporters.engines.sglang", str(bad), str(tmp_path)], cwd=REPO, check=False,
                       capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
