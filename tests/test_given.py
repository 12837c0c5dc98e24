"""Given configurations (`optimize --policy`), fixed parts of ILP plans (`--fix-*`), and the
plan's recorded eviction/prefetch policies: each binds on the plan written, one price per placement."""

import dataclasses
import json

import numpy as np
import pytest

from planner.baselines import BASELINES
from planner.costs import layer_options, option_specs
from planner.given import Fixes, GivenPolicy
from planner.optimize import OptimizeRequest, make_setup, optimize
from planner.plan import load_plan
from planner.workload_view import planning_stats
from profiles.engines import load_engine
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import load_trace, save_trace

L, E = 16, 64  # OLMoE-1B-7B: MoE layers, experts per layer
BASE = ("-H", "laptop-4060", "-m", "olmoe-1b-7b")


@pytest.fixture(scope="module")
def olmoe_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "olmoe.npz"
    save_trace(generate(SyntheticWorkload(num_layers=L, num_experts=E, top_k=8, num_sequences=8, prompt_tokens=40,
                                          output_tokens=10, seed=1)), path)
    return path


def _plan(run_cli, trace, tmp_path, *args):
    out = tmp_path / "plan.json"
    result = run_cli("optimize", *BASE, "-t", trace, *args, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    return load_plan(out)


def _sites(plan) -> list[set[str]]:
    return [set(layer.site) for layer in plan.layers]


def _resident(plan) -> list[int]:
    return [layer.site.count("resident") for layer in plan.layers]


# --- given configurations: what was asked is what the plan holds ---------------------------

def test_llama_cpp_n_cpu_moe_puts_exactly_the_first_n_layers_on_the_cpu(run_cli, olmoe_trace, tmp_path):
    plan = _plan(run_cli, olmoe_trace, tmp_path, "--policy", "llama.cpp", "--n-cpu-moe", "3")
    assert _sites(plan) == [{"local"}] * 3 + [{"resident"}] * (L - 3)
    assert (plan.solver.method, plan.solver.status, plan.inputs.engine) == ("llama.cpp", "given", "llama.cpp")
    assert all(layer.cache_slots == 0 for layer in plan.layers) and len({f for x in plan.layers for f in x.format}) == 1


@pytest.mark.parametrize("prefetch", [None, "none"])
def test_lru_offload_has_the_slots_asked_and_every_expert_offloaded(run_cli, olmoe_trace, tmp_path, prefetch):
    args = ("--prefetch", prefetch) if prefetch else ()
    plan = _plan(run_cli, olmoe_trace, tmp_path, "--policy", "lru-offload", "--cache-slots", "4", *args)
    assert [layer.cache_slots for layer in plan.layers] == [4] * L
    assert _sites(plan) == [{"fetch"}] * L and plan.inputs.engine == "hqq-offload"
    assert all(h == "node/cpu0" for layer in plan.layers for h in layer.home)
    assert plan.prefetch == (prefetch or "next-layer")  # hqq-offload prefetches the next layer by default


def test_accelerate_gpu_memory_caps_the_weights_on_the_gpu(run_cli, olmoe_trace, tmp_path):
    cap = 4 * 2**30
    plan = _plan(run_cli, olmoe_trace, tmp_path, "--policy", "accelerate", "--gpu-memory", "4GiB")
    on_gpu = sum(1 for sites in _sites(plan) if sites == {"resident"})
    assert 0 < on_gpu < L and _sites(plan) == [{"resident"}] * on_gpu + [{"stream"}] * (L - on_gpu)
    gpu = plan.memory[plan.compute_device]
    layer_bytes = gpu.expert_bytes / on_gpu
    # whole layers while they fit under the cap, one layer of room kept (infer_auto_device_map)
    weights = gpu.dense_bytes + gpu.expert_bytes
    assert weights + layer_bytes <= cap < weights + 2 * layer_bytes
    bigger = _plan(run_cli, olmoe_trace, tmp_path, "--policy", "accelerate", "--gpu-memory", "6GiB")
    assert sum(1 for sites in _sites(bigger) if sites == {"resident"}) > on_gpu


@pytest.mark.parametrize("policy, sites", [
    ("all-gpu", {"resident"}),
    ("cpu-experts", {"local"}),
    ("popularity", {"resident", "local"}),
])
def test_policies_without_parameters(run_cli, olmoe_trace, tmp_path, policy, sites):
    plan = _plan(run_cli, olmoe_trace, tmp_path, "--policy", policy)
    assert set().union(*_sites(plan)) <= sites and plan.solver.method == policy
    assert all(layer.cache_slots == 0 for layer in plan.layers)


def test_fix_format_and_dense_format_choose_a_given_configurations_formats(run_cli, olmoe_trace, tmp_path):
    plan = _plan(run_cli, olmoe_trace, tmp_path, "--policy", "cpu-experts", "--engine", "bundle",
                 "--fix-format", "int8", "--fix-dense-format", "bf16")
    assert {f for layer in plan.layers for f in layer.format} == {"int8"} and plan.dense_format == "bf16"


def test_one_price_per_placement(olmoe_trace):
    """A given configuration with the parameters a baseline picked is priced as `--compare` prices it."""
    trace = load_trace(olmoe_trace)
    req = dict(hardware="laptop-4060", model="olmoe-1b-7b", trace=trace)
    first = optimize(OptimizeRequest(**req, policy=GivenPolicy("llama.cpp")))
    baselines = first.baselines
    assert first.plan.predicted["tpot_s"] == pytest.approx(baselines["llama.cpp"].predicted["tpot_s"], rel=1e-9)
    n_cpu = sum(1 for layer in baselines["llama.cpp"].layers if set(layer.site) == {"local"})
    slots = baselines["lru-offload"].layers[0].cache_slots
    for policy in (GivenPolicy("llama.cpp", n_cpu_moe=n_cpu), GivenPolicy("lru-offload", cache_slots=slots),
                   *(GivenPolicy(name) for name in BASELINES if name in baselines and name != "llama.cpp")):
        plan = optimize(OptimizeRequest(**req, policy=policy)).plan
        assert plan.predicted["tpot_s"] == pytest.approx(baselines[policy.name].predicted["tpot_s"], rel=1e-9), policy
        assert [x.site for x in plan.layers] == [x.site for x in baselines[policy.name].layers]


def test_a_given_configuration_that_does_not_fit_exits_3_naming_the_shortfall(run_cli, olmoe_trace):
    result = run_cli("optimize", *BASE, "-t", olmoe_trace, "--policy", "all-gpu", "--fix-format", "bf16")
    assert result.exit_code == 3, result.output
    line = result.stderr.strip()
    assert line.count("\n") == 0 and "node/gpu0" in line and "short" in line and "Traceback" not in result.output


@pytest.mark.parametrize("args, code, needle", [
    (("--policy", "llama.cpp", "--n-cpu-moe", "-1"), 1, "--n-cpu-moe"),
    (("--policy", "llama.cpp", "--n-cpu-moe", "17"), 1, "more CPU layers than the model has"),
    (("--policy", "no-such-tool"), 1, "--policy"),
    (("--policy", "lru-offload", "--cache-slots", "65"), 1, "more cache slots than experts"),
    (("--policy", "lru-offload", "--eviction", "lfu"), 1, "engine hqq-offload has no eviction policy lfu"),
    (("--policy", "llama.cpp", "--prefetch", "next-layer"), 1, "engine llama.cpp has no prefetch policy next-layer"),
    (("--policy", "llama.cpp", "--cache-slots", "2"), 1, "parameter of --policy lru-offload"),
    (("--n-cpu-moe", "3"), 1, "add --policy"),
    (("--policy", "llama.cpp", "--fix-resident", "3"), 1, "places every expert itself"),
    (("--fix-cache-slots", "99"), 1, "--fix-cache-slots: out of range"),
    (("--fix-resident", "0:x"), 1, "MOE_LAYER:N"),
    (("--fix-resident", "16:2"), 1, "MOE_LAYER < 16"),
    (("--fix-format", "int5"), 1, "unknown number format"),
    (("--eviction", "belady"), 1, "engine bundle has no eviction policy belady"),
])
def test_bad_values_are_one_line(run_cli, olmoe_trace, args, code, needle):
    result = run_cli("optimize", *BASE, "-t", olmoe_trace, *args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and needle in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, result.stderr


# --- fixes: parts of the ILP's plan --------------------------------------------------------

def test_fixed_cache_slots_resident_counts_and_formats_bind(run_cli, olmoe_trace, tmp_path):
    plan = _plan(run_cli, olmoe_trace, tmp_path, "--fix-cache-slots", "0:2,5:4", "--fix-resident", "1:3,2:64",
                 "--fix-format", "int4", "--fix-dense-format", "int8", "--time-limit", "10")
    slots = [layer.cache_slots for layer in plan.layers]
    assert slots[0] == 2 and slots[5] == 4
    assert _resident(plan)[1:3] == [3, 64]
    assert {f for layer in plan.layers for f in layer.format} == {"int4"} and plan.dense_format == "int8"
    assert plan.solver.method == "ilp"


def test_fixed_home_and_policies_bind(run_cli, olmoe_trace, tmp_path):
    plan = _plan(run_cli, olmoe_trace, tmp_path, "--fix-home", "nvme", "--fix-resident", "8", "--fix-cache-slots", "8",
                 "--eviction", "lfu", "--prefetch", "next-layer", "--time-limit", "10")
    assert _resident(plan) == [8] * L and [layer.cache_slots for layer in plan.layers] == [8] * L
    assert {h for layer in plan.layers for h, s in zip(layer.home, layer.site) if s != "resident"} == {"node/nvme0"}
    assert (plan.eviction, plan.prefetch) == ("lfu", "next-layer")


def test_no_option_row_breaks_a_fix(olmoe_trace):
    """The filter itself, on every row option_specs builds and every baseline row merged in."""
    _, hw = load_profile("laptop-4060")
    model = load_model("olmoe-1b-7b")
    stats = planning_stats(load_trace(olmoe_trace), real_experts=E)
    fixes = Fixes(cache_slots=(2,) + (None,) * (L - 1), resident=(None, 5) + (None,) * (L - 2), expert_format="int8",
                  home="dram")
    s = make_setup(hw, model, stats, batch_size=1, context_tokens=4096, formats=("bf16", "int8", "int4"),
                   engine=load_engine("bundle"), fixes=fixes)
    fi, dram = s.formats.index("int8"), s.homes.index("node/cpu0")
    free = dataclasses.replace(s, fixes=None)  # the baselines' rows as they are, most breaking a fix
    extra = [b.specs for fn in BASELINES.values() for b in (fn(free, None) or [])]
    for layer in range(3):
        rows = option_specs(s, layer)
        merged = layer_options(s, layer, np.array([spec[layer] for spec in extra]))
        for p, q, b_res, c, b_off, home, _ in (*rows, *merged.specs(np.arange(len(merged)))):
            assert (b_res == fi or p == 0) and (b_off == fi or p == E) and (home == dram or p == E)
            assert c == (2 if layer == 0 else c) and p == (5 if layer == 1 else p)
    assert set(option_specs(s, 0)[:, 3]) == {2} and set(option_specs(s, 1)[:, 0]) == {5}


def test_given_plan_json_round_trips(run_cli, olmoe_trace, tmp_path):
    result = run_cli("--json", "optimize", *BASE, "-t", olmoe_trace, "--policy", "popularity", "--compare")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["plan"]["solver"] == {**data["plan"]["solver"], "method": "popularity", "status": "given"}
    popularity = next(row for row in data["summary"]["baselines"] if row["name"] == "popularity")
    assert data["plan"]["predicted"]["tpot_s"] == pytest.approx(popularity["tpot_s"], rel=1e-9)
