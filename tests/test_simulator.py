"""The SimPy simulator: agreement with the planner and the hit-rate curves, a hand-worked
event log, shared links, policies, determinism and the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import simpy

from planner.optimize import OptimizeRequest, optimize
from planner.plan import Inputs, Plan, SolverInfo
from planner.plan_layer import LayerPlan
from profiles.errors import InputError
from profiles.engines import load_engine
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.perf import activation_bytes, dense_step_s, expert_call_s
from profiles.workload.defaults import default_workload
from profiles.workload.hitrate import hit_rate_curves
from profiles.workload.trace import DECODE, Trace
from simulator import policies
from simulator.engine import SimConfig, Simulation, simulate
from simulator.resources import Network


def _decode_only(trace: Trace) -> Trace:
    """Every token its own batch-1 step: the reference string of the hit-rate curves."""
    return dataclasses.replace(trace, phase=np.full(trace.num_tokens, DECODE, np.uint8))


def _hand_plan(model, hw_name: str, layers: list[dict], compute="node/gpu0", host="node/cpu0") -> Plan:
    inputs = Inputs(hardware=hw_name, hardware_digest="-", model=model.name, model_digest="-", workload="-",
                    workload_digest="-")
    lps = tuple(LayerPlan(moe_layer=i, hidden_layer=model.moe_layer_indices[i], **spec) for i, spec in enumerate(layers))
    return Plan(inputs=inputs, objective="latency", batch_size=1, context_tokens=64, compute_device=compute,
                host_device=host, layers=lps, memory={}, predicted={}, solver=SolverInfo(method="hand"))


@pytest.fixture(scope="module")
def mixtral_small():
    model = load_model("mixtral-8x7b")
    trace = default_workload(model)
    return model, trace.subset_sequences(list(range(3)))


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("model_name, hardware", [
    ("mixtral-8x7b", "desktop-4090"), ("mixtral-8x7b", "desktop-3060"), ("mixtral-8x7b", "laptop-4060"),
    ("qwen3-30b-a3b", "desktop-3060"), ("qwen3-30b-a3b", "desktop-4090"), ("deepseek-v3", "cpu-server-4090")])
def test_batch1_latency_agrees_with_planner(model_name, hardware):
    """Batch 1, no contention: simulated decode time per token = the plan's prediction (2%),
    whatever the sites the plan uses (resident, fetch, local, hybrid)."""
    model = load_model(model_name)
    trace = _decode_only(default_workload(model).subset_sequences([0, 1, 2]))
    plan = optimize(OptimizeRequest(hardware=hardware, model=model_name, trace=trace)).plan
    _, hw = load_profile(hardware)
    report = simulate(plan, hw, model, trace, SimConfig(batch_size=1, kv_context="plan"))
    simulated = report.metrics["decode_step_s"]["mean"]
    assert simulated == pytest.approx(plan.predicted["tpot_s"], rel=0.005)
    assert report.metrics["expert_hit_rate"] == pytest.approx(plan.predicted["expert_hit_rate"], abs=1e-9)


def test_hybrid_misses_run_on_the_cpu_that_holds_the_weights(mixtral_small):
    """A hybrid expert's miss runs where its weights live (the host CPU), as the planner prices
    it; only its hits run on the GPU, from the cache. (The simulator ran misses on the GPU.)"""
    model, trace = mixtral_small
    trace = _decode_only(trace)
    E = model.num_experts
    _, hw = load_profile("desktop-3060")

    def run(site):
        layer = {"home": ("node/cpu0",) * E, "format": ("int4",) * E, "site": (site,) * E, "cache_slots": 1,
                 "cache_device": "node/gpu0"}
        return simulate(_hand_plan(model, "desktop-3060", [layer] * trace.num_layers), hw, model, trace,
                        SimConfig()).metrics

    hybrid, fetch = run("hybrid"), run("fetch")
    assert hybrid["local_calls"] > 0 and hybrid["busy_s"]["node/cpu0"] > 0
    assert fetch["busy_s"].get("node/cpu0", 0.0) < 0.01 * hybrid["busy_s"]["node/cpu0"]
    # the GPU runs only the hits: less expert work than when every miss is fetched to it
    assert hybrid["busy_s"]["node/gpu0"] < fetch["busy_s"]["node/gpu0"]


@pytest.mark.parametrize("policy", ["lru", "belady"])
@pytest.mark.parametrize("slots", [1, 2, 5])
@pytest.mark.parametrize("prefill", [False, True], ids=["token-steps", "prompt-steps"])
def test_hit_rates_equal_exact_curves(mixtral_small, policy, slots, prefill):
    """Per-layer hit rates equal the workload module's exact curves; a prompt processed in
    one step still presents its accesses to the cache token by token, in rank order."""
    model, trace = mixtral_small
    if not prefill:
        trace = _decode_only(trace)
    E = model.num_experts
    layer = {"home": ("node/cpu0",) * E, "format": ("int4",) * E, "site": ("fetch",) * E, "cache_slots": slots,
                 "cache_device": "node/gpu0"}
    plan = _hand_plan(model, "desktop-3060", [layer] * trace.num_layers)
    _, hw = load_profile("desktop-3060")
    report = simulate(plan, hw, model, trace, SimConfig(eviction=policy))
    exact = hit_rate_curves(trace, (policy,)).curves[policy][:, slots]
    np.testing.assert_array_equal(np.array(report.metrics["hit_rate"]), exact)


def test_played_ahead_layers_equal_played_out_ones(mixtral_small):
    """The event-free shortcut gives the same times as playing every transfer out."""
    model, trace = mixtral_small
    plan = optimize(OptimizeRequest(hardware="desktop-3060", model="mixtral-8x7b", trace=trace)).plan
    _, hw = load_profile("desktop-3060")
    cfg = SimConfig(batch_size=2)
    fast = Simulation(plan, hw, model, trace, cfg).run()
    slow_sim = Simulation(plan, hw, model, trace, cfg)
    slow_sim.play_ahead = False
    slow = slow_sim.run()
    for key in ("makespan_s", "tokens_per_s", "bytes_moved", "link_bytes", "busy_s"):
        assert fast.metrics[key] == pytest.approx(slow.metrics[key], rel=1e-9), key
    # a layer without cache slots has no hit rate (None)
    nan = [float("nan") if x is None else x for x in slow.metrics["hit_rate"]]
    assert [float("nan") if x is None else x for x in fast.metrics["hit_rate"]] == pytest.approx(nan, rel=1e-9,
                                                                                                 nan_ok=True)


# ----------------------------------------------------------------------------- hand-worked


def _two_layer_case(tmp_path):
    """Two MoE layers, four experts, top-2, one request of two decode tokens: model, hardware,
    trace and plan (layer 0: expert 0 resident on the GPU, experts 1-3 fetched into a 1-slot
    cache; layer 1: expert 2 resident, experts 0, 1, 3 computed by the CPU where they live)."""
    config = json.loads((__import__("pathlib").Path(__file__).parent / "data/configs/mixtral/config.json").read_text())
    config.update(num_hidden_layers=2, hidden_size=1024, intermediate_size=4096, num_local_experts=4,
                  num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=128)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path / "config.json")
    _, hw = load_profile("desktop-4090")
    ids = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 1]]])  # [T=2, L=2, K=2]
    trace = Trace(expert_ids=ids, seq_lens=np.array([2]), phase=np.full(2, DECODE, np.uint8), num_experts=4,
                  layer_map=(0, 1))
    cpu, gpu = "node/cpu0", "node/gpu0"
    plan = _hand_plan(model, "desktop-4090", [
        {"home": (gpu, cpu, cpu, cpu), "format": ("bf16",) * 4, "site": ("resident", "fetch", "fetch", "fetch"),
             "cache_slots": 1, "cache_device": gpu},
        {"home": (cpu, cpu, gpu, cpu), "format": ("bf16",) * 4, "site": ("local", "local", "resident", "local")},
    ])
    return model, hw, trace, plan


def test_two_layer_event_log_by_hand(tmp_path):
    """The two-layer case (:func:`_two_layer_case`) asserted whole: every event at its time."""
    model, hw, trace, plan = _two_layer_case(tmp_path)
    cpu, gpu = "node/cpu0", "node/gpu0"
    hw = load_engine(plan.inputs.engine).apply(hw)  # the software the plan runs on (simulate applies it too)
    report = simulate(plan, hw, model, trace, SimConfig(record=True, kv_context="plan"))

    # the primitives, from the shared performance model
    g_dev, c_dev = hw.devices[gpu], hw.devices[cpu]
    wb, fl = model.expert_bytes("bf16"), model.expert_flops_per_token
    d = dense_step_s(g_dev, model, "bf16", 1, model.kv_cache_bytes(64)) / 2  # attention share per layer
    g = expert_call_s(g_dev, "bf16", wb, fl, 1)  # one expert, one token, on the GPU
    c = expert_call_s(c_dev, "bf16", wb, fl, 1)  # ... on the CPU
    x = hw.route(cpu, gpu).transfer_s(wb)  # one expert over PCIe
    a = hw.route(gpu, cpu).transfer_s(activation_bytes(model, 1))  # one hidden state
    assert x > g and 2 * a + c > g  # the fetch is the long pole of layer 0, the CPU of layer 1

    t = 0.0
    expected = [(0.0, "request_source", "request 0 arrives"), (0.0, "scheduler", "admit 0"),
                (0.0, "scheduler", "decode step of 1 tokens")]
    # token 0, layer 0: expert 0 resident; expert 1 misses (cold), fetched, then run
    expected += [(t + d, "expert_fetch", "L0E1 start"), (t + d + x, "expert_fetch", "L0E1 arrived")]
    t = t + d + x + g
    expected += [(t, "layer_step", "L0 done")]
    # layer 1: expert 2 resident (d + g), expert 3 on the CPU (a + c + a): the CPU path is longer
    t = t + d + max(g, 2 * a + c)
    expected += [(t, "layer_step", "L1 done"), (t, "scheduler", "decode step of 1 tokens")]
    # token 1, layer 0: expert 0 resident, expert 2 misses (the slot holds 1), evicting 1
    expected += [(t + d, "expert_fetch", "L0E2 start"), (t + d + x, "expert_fetch", "L0E2 arrived")]
    t = t + d + x + g
    expected += [(t, "layer_step", "L0 done")]
    # layer 1: expert 2 resident, expert 1 on the CPU
    t = t + d + max(g, 2 * a + c)
    expected += [(t, "layer_step", "L1 done"), (t, "scheduler", "request 0 done")]

    got = [(pytest.approx(time, rel=1e-12, abs=1e-15), actor, what) for time, actor, what in expected]
    assert list(report.events) == got
    assert report.metrics["hit_rate"] == [0.0, None]  # two misses in layer 0; layer 1 has no cache
    assert report.metrics["bytes_moved"] == {"dram": pytest.approx(2 * wb)}
    assert report.metrics["makespan_s"] == pytest.approx(t)


# ----------------------------------------------------------------------------- resources


def test_concurrent_transfers_share_a_link():
    _, hw = load_profile("desktop-4090")
    env = simpy.Environment()
    net = Network(env, hw)
    n = 1e9
    alone = net.transfer_s("node/cpu0", "node/gpu0", n)
    done = []

    def one(tag):
        yield from net.transfer("node/cpu0", "node/gpu0", n)
        done.append((tag, env.now))

    env.process(one("a"))
    env.process(one("b"))
    env.run()
    latency = hw.route("node/cpu0", "node/gpu0").latency_s
    # both share the bottleneck: each gets half, so both finish at twice the time alone
    assert done[0][1] == pytest.approx(latency + 2 * (alone - latency))
    assert done[1][1] == pytest.approx(done[0][1])


def test_policy_registries_refuse_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        policies.register(policies.EVICTION, "lru")(policies.LRUCache)
    with pytest.raises(InputError, match="unknown policy"):
        policies.make_cache("fifo-ish", 2)
    assert {"lru", "lfu", "static", "score", "belady"} <= set(policies.EVICTION)
    assert {"none", "next-layer", "transition", "oracle"} <= set(policies.PREFETCH)
    assert {"plan", "fiddler", "hobbit"} <= set(policies.MISS)


def test_static_cache_holds_the_most_frequent():
    cache = policies.make_cache("static", 2, frequency=np.array([1.0, 5.0, 3.0, 0.0]))
    assert [cache.access(e) for e in (0, 1, 2, 3, 1)] == [False, True, True, False, True]
    assert set(cache.items) == {1, 2}


# transition prefetch only fills the link's idle time, which this link-bound case has none
# of: tests/test_simulator_policies.py holds it
@pytest.mark.parametrize("prefetch", ["oracle", "next-layer"])
def test_prefetch_raises_hits_and_is_deterministic(mixtral_small, prefetch):
    model, trace = mixtral_small
    E = model.num_experts
    layer = {"home": ("node/cpu0",) * E, "format": ("int4",) * E, "site": ("fetch",) * E, "cache_slots": 2,
                 "cache_device": "node/gpu0"}
    plan = _hand_plan(model, "desktop-3060", [layer] * trace.num_layers)
    _, hw = load_profile("desktop-3060")
    base = simulate(plan, hw, model, trace, SimConfig(requests=2))
    runs = [simulate(plan, hw, model, trace, SimConfig(requests=2, prefetch=prefetch, prefetch_accuracy=0.7, seed=3))
            for _ in range(2)]
    assert runs[0].to_json() == runs[1].to_json()
    assert runs[0].metrics["expert_hit_rate"] > base.metrics["expert_hit_rate"]
    if prefetch == "oracle":
        assert runs[0].metrics["tokens_per_s"] > base.metrics["tokens_per_s"]


def test_continuous_batching_and_arrivals(mixtral_small):
    model, trace = mixtral_small
    plan = optimize(OptimizeRequest(hardware="desktop-4090", model="mixtral-8x7b", trace=trace)).plan
    _, hw = load_profile("desktop-4090")
    closed = simulate(plan, hw, model, trace, SimConfig(batch_size=3))
    serial = simulate(plan, hw, model, trace, SimConfig(batch_size=1))
    poisson = simulate(plan, hw, model, trace, SimConfig(batch_size=3, requests=6, arrival_rate_per_s=0.5, seed=1))
    assert closed.metrics["tokens_per_s"] > serial.metrics["tokens_per_s"]  # batching shares the weights
    assert closed.metrics["output_tokens"] == serial.metrics["output_tokens"]
    assert poisson.metrics["requests"] == 6 and poisson.metrics["ttft_s"]["p99"] >= poisson.metrics["ttft_s"]["p50"]
    for m in (closed.metrics, poisson.metrics):
        assert set(m["ttft_s"]) == {"mean", "p50", "p90", "p99"}
        assert m["energy_j"] > 0 and all(0 <= u <= 1 for u in m["utilisation"].values())


def test_mismatched_trace_is_one_line(mixtral_small):
    _model, trace = mixtral_small
    other = load_model("olmoe-1b-7b")
    plan = optimize(OptimizeRequest(hardware="desktop-4090", model="mixtral-8x7b", trace=trace)).plan
    _, hw = load_profile("desktop-4090")
    with pytest.raises(InputError, match="number of MoE layers"):
        simulate(plan, hw, other, default_workload(other), SimConfig())


# ----------------------------------------------------------------------------- CLI


def test_simulate_cli(tmp_path, run_cli):
    plan_path = tmp_path / "plan.json"
    assert run_cli("optimize", "--out", plan_path).exit_code == 0
    out, chrome = tmp_path / "sim.json", tmp_path / "chrome.json"
    r = run_cli("--json", "simulate", "--plan", plan_path, "--requests", "2", "--out", out,
                "--trace-out", chrome, "--plots", tmp_path / "plots")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["metrics"]["tokens_per_s"] > 0 and data["warnings"] == []
    assert json.loads(out.read_text()) == data["metrics"]
    events = json.loads(chrome.read_text())["traceEvents"]
    assert any(e.get("ph") == "X" for e in events)
    assert (tmp_path / "plots" / "utilisation.png").stat().st_size > 0
    again = run_cli("simulate", "--plan", plan_path, "--out", out)
    assert again.exit_code == 1 and "exists" in again.stderr and "Traceback" not in again.output


def test_simulate_cli_bad_plan(tmp_path, run_cli):
    bad = tmp_path / "plan.json"
    bad.write_text('{"format_version": 99}')
    r = run_cli("simulate", "--plan", bad)
    assert r.exit_code == 1 and "format_version" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- expert parallelism


def _ep_plan(model, hw, owner, replicas=()):
    gpus = [d.id for d in hw.devices_of_kind("gpu")]
    E = model.num_experts
    layer = {"home": tuple(gpus[o] for o in owner), "format": ("int4",) * E, "site": ("resident",) * E,
             "replicas": tuple(tuple(gpus[r] for r in reps) for reps in replicas) if replicas else ()}
    plan = _hand_plan(model, hw.name, [layer] * model.num_moe_layers, compute=gpus[0],
                      host=hw.devices_of_kind("cpu")[0].id)
    return plan


def test_expert_parallel_traffic_follows_ownership(mixtral_small):
    model, trace = mixtral_small
    _, hw = load_profile("workstation-2x3090-nvlink")
    E = model.num_experts
    cfg = SimConfig(batch_size=4, requests=3)
    one_gpu = simulate(_ep_plan(model, hw, [0] * E, replicas=[[1]] * E), hw, model, trace, cfg).metrics
    # every expert has a copy on both GPUs: no token leaves its GPU
    assert one_gpu["expert_parallel"]["cross_gpu_token_fraction"] == 0.0
    split = simulate(_ep_plan(model, hw, [e % 2 for e in range(E)]), hw, model, trace, cfg).metrics
    ep = split["expert_parallel"]
    assert 0.3 < ep["cross_gpu_token_fraction"] < 0.7  # about half the tokens meet their expert elsewhere
    assert ep["cross_node_token_fraction"] == 0.0 and ep["gpus"] == 2
    assert all(r >= 1.0 for r in ep["max_over_mean_gpu_load"])
    assert sum(split["link_bytes"].values()) > 0 and sum(one_gpu["link_bytes"].values()) == 0


def test_all_to_all_lasts_as_long_as_its_busiest_link():
    _, hw = load_profile("workstation-2x3090-nvlink")
    net = Network(simpy.Environment(), hw)
    a, b = "node/gpu0", "node/gpu1"
    end = net.exchange({(a, b): 2e9, (b, a): 1e9}, 1.0)
    path = net.path(a, b)
    assert end == pytest.approx(1.0 + path.latency_s + 2e9 / path.bottleneck_bytes_per_s)
