"""The KV cache in host memory as a planner decision (planner.kv_offload): priced where the
engine reads it (llama.cpp --no-kv-offload: attention on the CPU), chosen by the ILP when the
expert bytes it frees on the GPU buy more than its reads cost, recorded in plan.json, priced
the same by the simulator and rendered by the llama.cpp exporter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporters.engines.single import render_engines
from planner.kv_offload import kv_sites
from planner.optimize import OptimizeRequest, make_setup, optimize
from planner.plan import load_plan
from planner.step_costs import fixed_costs
from planner.workload_view import planning_stats
from profiles.engines import load_engine
from profiles.errors import InfeasibleError, InputError
from profiles.hardware import load_profile
from profiles.perf import attention_compute_s
from profiles.models import load_model
from profiles.workload.defaults import default_workload
from profiles.workload.trace import DECODE, PREFILL
from simulator.engine import SimConfig, simulate

MIXTRAL = dict(hardware="desktop-4090", model="mixtral-8x7b", engine="llama.cpp", compare=False, objective="throughput")


@pytest.fixture(scope="module")
def mixtral():
    model = load_model("mixtral-8x7b")
    return model, planning_stats(default_workload(model), real_experts=model.num_experts)


def _setup(mixtral, engine: str, batch: int, context: int):
    model, stats = mixtral
    _, hw = load_profile("desktop-4090")
    return make_setup(hw, model, stats, batch_size=batch, context_tokens=context, formats=("bf16", "int8", "int4"),
                      engine=load_engine(engine))


def test_host_kv_frees_its_bytes_and_pays_attention_on_the_cpu(mixtral):
    """By hand: the cache leaves the GPU row for the DRAM row, the GPU's attention over it leaves
    the step, the CPU's joins it (its read of the cache or its q.k / p.v FLOPs, the longer, and
    two link crossings per attention layer); a prompt's tokens all read one sequence's cache."""
    s = _setup(mixtral, "llama.cpp", 8, 8192)
    model, fm = s.model, s.formats[-1]
    on_gpu, on_host = fixed_costs(s, fm), fixed_costs(s, fm, kv_on_host=True)
    kv = model.kv_cache_bytes(8192, batch_size=8)
    assert (on_gpu.kv_bytes, on_gpu.kv_host_bytes, on_host.kv_bytes, on_host.kv_host_bytes) == (kv, 0.0, 0.0, kv)
    assert on_host.dense_bytes == on_gpu.dense_bytes and on_host.workspace_bytes == on_gpu.workspace_bytes
    site = s.kv_host()
    gpu = max(kv / (s.compute.memory_bytes_per_s * s.compute.efficiency.memory_fraction),
              attention_compute_s(s.compute, model, 8, kv))
    cpu_read = kv / (s.host.memory_bytes_per_s * s.host.efficiency.memory_fraction)
    crossings = len(model.attention_layer_indices) * (site.transfer_s(8 * (model.hidden_size + 2 * model.num_key_value_heads
                                                                            * model.head_dim) * 2.0)
                                                      + site.transfer_s(8 * model.hidden_size * 2.0))
    attention = site.attention_s(s.compute, model, 8, kv)
    assert attention == pytest.approx(max(cpu_read, attention_compute_s(s.host, model, 8, kv)) + crossings, rel=1e-12)
    assert on_host.dense_s - on_gpu.dense_s == pytest.approx(attention - gpu, rel=1e-9)
    prompt = site.attention_s(s.compute, model, 8, kv, prefill=True)
    assert prompt == pytest.approx(max(cpu_read, attention_compute_s(s.host, model, 8, kv, prefill=True)) + crossings,
                                   rel=1e-12)
    # the bundle runtime cannot keep it there: no host option, and forcing it is refused in one line
    bundle = _setup(mixtral, "bundle", 8, 8192)
    assert bundle.kv_host() is None and kv_sites(bundle, "auto") == (False,)
    with pytest.raises(InputError, match="engine bundle cannot keep the KV cache in host memory"):
        kv_sites(bundle, "host")


@pytest.fixture(scope="module")
def long_plans():
    """Mixtral at batch 16 x 2048 tokens with the cache's site decided, on the GPU, on the host."""
    return {kv: optimize(OptimizeRequest(**MIXTRAL, batch_size=16, context_tokens=2048, kv_cache=kv)).plan
            for kv in ("auto", "device", "host")}


def test_the_ilp_moves_the_cache_to_the_host_only_when_it_pays(long_plans):
    """Mixtral-8x7B on the 4090 desktop under llama.cpp (whole layers resident or on the CPU):
    at batch 16 x 2048 tokens the 4 GiB cache on the host makes room for more resident layers
    than its CPU attention costs (the CPU experts' work grows with the batch, the attention's
    with the cache); at batch 1 x 4096 it stays on the GPU. Either way the plan is
    the faster of the two forced ones and the bound covers both (a binary branched at the root)."""
    for batch, context, site in ((16, 2048, "host"), (1, 4096, "device")):
        plans = long_plans if batch == 16 else {
            kv: optimize(OptimizeRequest(**MIXTRAL, batch_size=batch, context_tokens=context, kv_cache=kv)).plan
            for kv in ("auto", "device", "host")}
        auto = plans["auto"]
        assert auto.kv_cache == site
        assert auto.predicted["tpot_s"] == min(plans["device"].predicted["tpot_s"], plans["host"].predicted["tpot_s"])
        assert auto.solver.bound <= min(p.solver.objective for p in plans.values()) * (1 + 1e-9)
        resident = {kv: sum(lp.site[0] == "resident" for lp in p.layers) for kv, p in plans.items()}
        assert resident["host"] > resident["device"]  # what the freed bytes buy
        host_mem = plans["host"].memory["node/cpu0"]
        assert plans["host"].memory["node/gpu0"].kv_bytes == 0.0
        assert host_mem.kv_bytes == load_model("mixtral-8x7b").kv_cache_bytes(context, batch_size=batch)
        assert host_mem.used_bytes <= host_mem.capacity_bytes


def test_a_cache_the_gpu_cannot_hold_goes_to_the_host():
    """Mixtral at batch 16 x 16384 tokens: 32 GiB of cache cannot sit on a 24 GB GPU (the
    device alone is refused, naming the cache); on the host it plans."""
    base = dict(MIXTRAL, batch_size=16, context_tokens=16384)
    with pytest.raises(InfeasibleError, match="KV cache alone takes 32 GiB"):
        optimize(OptimizeRequest(**base, kv_cache="device"))
    plan = optimize(OptimizeRequest(**base)).plan
    assert plan.kv_cache == "host" and plan.solver.status == "optimal"


def test_plan_json_records_the_site_and_the_simulator_prices_it_the_same(tmp_path):
    """plan.json carries kv_cache only when it is host (older plans read and write the same
    bytes); the simulator's one-prompt TTFT with the cache on the host is the planner's."""
    model = load_model("mixtral-8x7b")
    trace = default_workload(model)
    host = optimize(OptimizeRequest(**MIXTRAL, batch_size=1, context_tokens=4096, kv_cache="host",
                                    prompt_tokens=600)).plan
    device = host.model_copy(update={"kv_cache": "device"})
    assert "kv_cache" not in json.loads(device.to_json())
    assert json.loads(host.to_json())["kv_cache"] == "host"
    assert load_plan(host.save(tmp_path / "plan.json")).to_json() == host.to_json()
    bad = json.loads(host.to_json()) | {"layer_devices": ["node/gpu0"] * len(host.layers)}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="a pipeline plan keeps its KV cache on its GPUs"):
        load_plan(tmp_path / "bad.json")
    _, hw = load_profile("desktop-4090")
    one = trace.__class__(expert_ids=trace.expert_ids[:602], seq_lens=np.array([602]),
                          phase=np.r_[np.full(600, PREFILL), np.full(2, DECODE)].astype(np.uint8),
                          num_experts=trace.num_experts, layer_map=trace.layer_map,
                          gate_weights=None if trace.gate_weights is None else trace.gate_weights[:602],
                          model=trace.model, source=trace.source)
    ttft = {p.kv_cache: simulate(p, hw, model, one, SimConfig(batch_size=1)).metrics["ttft_s"]["mean"]
            for p in (host, device)}
    assert ttft["host"] == pytest.approx(host.predicted["ttft_s"], rel=1e-3)
    assert ttft["host"] > ttft["device"]  # the prompt's attention on the CPU
    other = host.model_copy(update={"inputs": host.inputs.model_copy(update={"engine": "bundle"})})
    with pytest.raises(InputError, match="engine bundle cannot keep the KV cache in host memory"):
        simulate(other, hw, model, one, SimConfig(batch_size=1))


def test_llamacpp_renders_no_kv_offload_and_accelerate_says_it_cannot(tmp_path, long_plans):
    plan = long_plans["auto"]
    assert plan.kv_cache == "host"
    out = render_engines(plan, "mixtral-8x7b", "desktop-4090", tmp_path)
    cfg = json.loads((tmp_path / "engines" / "llamacpp.json").read_text())
    assert cfg["commands"]["serve"].endswith("--no-kv-offload") and "-c 32768" in cfg["commands"]["serve"]
    assert "keeps the KV cache in host memory, which accelerate cannot" in out.skipped["accelerate"]
    assert any("--no-kv-offload" in n for n in cfg["notes"])


def test_cli_flag(run_cli):
    r = run_cli("optimize", "--kv-cache", "host")  # the bundle runtime cannot
    assert r.exit_code == 1 and "engine bundle cannot keep the KV cache in host memory" in r.output
    assert "Traceback" not in r.output
