"""Memory-bandwidth contention (--dram-contention): host DRAM as one port shared by the CPU's
expert reads and the copies to the device, in the planner's prices and in the simulator.

The hand-worked box: a CPU whose DRAM delivers 10 GB/s (all of it to an expert call), a GPU
at 1000 GB/s behind an 8 GB/s link, both computing far faster than they read (roofline
engine: no framework costs). One MoE layer of two bf16 experts of 3 x 1024 x 2048 weights
(eb = 12,582,912 bytes), and every token routes to both. The option: expert rank 0 is
fetched on every use (no cache slots), rank 1 runs on the CPU where it lives. Per token:

    link   x     = eb / 8 GB/s                   = 1.572864 ms   (then 12.58 us on the GPU)
    cpu    t_cpu = eb / 10 GB/s                  = 1.258291 ms   (+ 2 x 256 ns activations)
    DRAM         = (eb read + eb copied) / 10 GB/s = 2.516582 ms

so without contention the layer lasts x + t_gpu = 1.585447 ms, with it 2.516582 ms: 0.931135 ms
more, the copy's share of the port the CPU also needs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from planner.costs import MODES, fixed_costs, option_costs, step_time
from planner.optimize import make_setup
from planner.plan import Inputs, Plan, SolverInfo, load_plan
from planner.plan_layer import LayerPlan
from planner.workload_view import planning_stats
from profiles.dram import copy_factor
from profiles.engines import load_engine
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.trace import DECODE, Trace
from simulator.engine import SimConfig, simulate

BOX = """
name: dram-box
nodes:
  - name: n
    devices:
      - {name: cpu0, kind: cpu, cores: 8, memory_bytes: 8GB, memory_bytes_per_s: 10GB/s, launch_overhead_s: 0s,
         peak_ops_per_s: {bf16: 1000TFLOPS}, efficiency: {memory_fraction: 1.0, compute_max_fraction: 1.0, half_tokens: 0.001}}
      - name: gpu0
        kind: gpu
        memory_bytes: 8GB
        memory_bytes_per_s: 1000GB/s
        launch_overhead_s: 0s
        peak_ops_per_s: {bf16: 1000TFLOPS}
        efficiency: {memory_fraction: 1.0, compute_max_fraction: 1.0, half_tokens: 0.001}
        links: [{kind: pcie, to: cpu0, bytes_per_s: 8GB/s, latency_s: 0s}]
"""

CONFIG = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 1024,
          "intermediate_size": 2048, "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 8,
          "num_local_experts": 2, "num_experts_per_tok": 2, "vocab_size": 128, "tie_word_embeddings": False}

EB = 3 * 1024 * 2048 * 2  # bytes of one bf16 expert
SPLIT = np.array([[0, 1, 0, 0, 0, 0, MODES.index("fetch")]])  # rank 0 fetched (no slots), rank 1 on the CPU


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dram")
    (tmp / "hw.yaml").write_text(BOX)
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text(json.dumps(CONFIG))
    _, hw = load_profile(tmp / "hw.yaml")
    model = load_model(tmp / "model")
    T = 8
    trace = Trace(expert_ids=np.tile(np.array([0, 1]), (T, 1, 1)), seq_lens=np.array([T]),
                  phase=np.full(T, DECODE, np.uint8), num_experts=2, layer_map=tuple(model.moe_layer_indices))
    return hw, model, trace


def _setup(box, batch: int = 1, contention: bool = False):
    hw, model, trace = box
    return make_setup(hw, model, planning_stats(trace), batch_size=batch, context_tokens=64, formats=("bf16",),
                      engine=load_engine("roofline"), dram_contention=contention)


@pytest.mark.parametrize("batch", [1, 2])
def test_contention_lengthens_a_hybrid_layer_by_the_hand_worked_amount(box, batch):
    """Batch 1 (per-token outcomes) and batch 2 (expected busy times): the layer lasts the
    link and GPU time without contention, the DRAM port's with it (module docstring)."""
    assert _setup(box).expert_bytes("bf16") == EB == 12_582_912
    off = option_costs(_setup(box, batch), 0, SPLIT)
    on = option_costs(_setup(box, batch, contention=True), 0, SPLIT)
    gpu_s = EB / 1000e9  # memory-bound at either batch
    assert off.tau[0] == pytest.approx(EB / 8e9 + gpu_s, rel=1e-9)  # 1.585447 ms
    assert on.tau[0] == pytest.approx(2 * EB / 10e9, rel=1e-9)  # 2.516582 ms
    assert on.tau[0] - off.tau[0] == pytest.approx(0.931135e-3, abs=1e-9)
    # the busy times themselves are the same: only the layer's max() gains a term
    for a, b in ((on.G, off.G), (on.U, off.U), (on.F, off.F)):
        assert a[0] == b[0]


def test_contention_off_prices_exactly_as_before(box):
    """A resident-only option moves nothing through DRAM: the term never binds, bit for bit."""
    whole = np.array([[2, 2, 0, 0, 0, 0, MODES.index("fetch")]])
    assert option_costs(_setup(box, contention=True), 0, whole).tau[0] == option_costs(_setup(box), 0, whole).tau[0]


def _plan(box, contention: bool) -> Plan:
    hw, model, trace = box
    inputs = Inputs(hardware="dram-box", hardware_digest="-", model=model.name, model_digest="-", workload="-",
                    workload_digest="-", engine="roofline", dram_contention=contention)
    layer = LayerPlan(moe_layer=0, hidden_layer=model.moe_layer_indices[0], home=("n/cpu0",) * 2,
                      format=("bf16",) * 2, site=("fetch", "local"))
    return Plan(inputs=inputs, objective="latency", batch_size=1, context_tokens=64, compute_device="n/gpu0",
                host_device="n/cpu0", layers=(layer,), memory={}, predicted={}, solver=SolverInfo(method="hand"))


def test_simulator_agrees_with_the_planner_with_contention_on(box):
    """The hand-worked plan simulated (the plan's inputs turn contention on) takes the
    planner's step time within 0.1%, and the DRAM port is busy for the DRAM term."""
    hw, model, trace = box
    s = _setup(box, contention=True)
    predicted, _ = step_time(s, [option_costs(s, 0, SPLIT)], [0], fixed_costs(s, "bf16"), False)
    report = simulate(_plan(box, True), hw, model, trace, SimConfig(batch_size=1, kv_context="plan"))
    assert report.metrics["decode_step_s"]["mean"] == pytest.approx(predicted, rel=1e-3)
    off = simulate(_plan(box, False), hw, model, trace, SimConfig(batch_size=1, kv_context="plan"))
    assert report.metrics["decode_step_s"]["mean"] - off.metrics["decode_step_s"]["mean"] == \
        pytest.approx(0.931135e-3, rel=2e-3)
    # SimConfig overrides the plan's setting (a what-if), both ways
    what_if = simulate(_plan(box, False), hw, model, trace, SimConfig(batch_size=1, kv_context="plan",
                                                                      dram_contention=True))
    assert what_if.metrics["decode_step_s"]["mean"] == report.metrics["decode_step_s"]["mean"]


def test_the_setting_is_recorded_in_the_plan_and_absent_when_off(box, tmp_path):
    """plan.json records contention when on (simulate and export price the same thing), and
    a plan made without it writes the same bytes as before the setting existed."""
    assert "dram_contention" not in _plan(box, False).to_json()
    on = _plan(box, True)
    assert json.loads(on.to_json())["inputs"]["dram_contention"] is True
    assert load_plan(on.save(tmp_path / "plan.json")).inputs.dram_contention is True


def test_a_disk_read_for_the_gpu_crosses_host_dram_twice():
    """NVMe -> GPU goes through the host (DMA in, copy out); host DRAM -> GPU once; a GPU's
    own memory not at all."""
    _, hw = load_profile("desktop-4090")
    cpu = hw.devices["node/cpu0"]
    assert copy_factor(hw, cpu, "node/nvme0", "node/gpu0") == 2.0
    assert copy_factor(hw, cpu, "node/cpu0", "node/gpu0") == 1.0
    assert copy_factor(hw, cpu, "node/nvme0", "node/cpu0") == 1.0
    assert copy_factor(hw, cpu, "node/gpu0", "node/gpu0") == 0.0


def test_setup_default_is_off(box):
    assert dataclasses.replace(_setup(box)).dram_contention is False


def test_an_export_reprices_a_contended_plan_as_optimize_priced_it(box, tmp_path):
    """The exporters' re-pricing reads the plan's recorded setting: the planner's TPOT back,
    and the contention-off price of the same placement is lower."""
    from exporters.engines.pricing import Pricing
    from planner.optimize import OptimizeRequest, optimize

    hw, model, trace = box
    (tmp_path / "hw.yaml").write_text(BOX.replace("memory_bytes: 8GB\n        memory_bytes_per_s: 1000GB/s",
                                                  "memory_bytes: 600MB\n        memory_bytes_per_s: 1000GB/s"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(CONFIG))
    plan = optimize(OptimizeRequest(hardware=str(tmp_path / "hw.yaml"), model=str(tmp_path / "model"), trace=trace,
                                    engine="roofline", formats=("bf16",), dram_contention=True, compare=False)).plan
    assert plan.layers[0].site == ("fetch", "local")  # the GPU holds neither expert: the hand-worked split
    repriced, _ = Pricing(plan, model, hw, trace).price_plan()
    assert repriced.tpot_s == pytest.approx(plan.predicted["tpot_s"], rel=1e-12)
    uncontended = plan.model_copy(update={"inputs": plan.inputs.model_copy(update={"dram_contention": False})})
    assert Pricing(uncontended, model, hw, trace).price_plan()[0].tpot_s == \
        pytest.approx(plan.predicted["tpot_s"] - 0.931135e-3, rel=1e-4)


def test_contention_changes_a_desktop_hybrid_plans_split(tmp_path):
    """Mixtral-8x7B at batch 8 on the RTX 4090 desktop whose CPU reads experts at 85% of its
    DRAM bandwidth (as a probe would state it; the bundled profile's 35% is the next test's),
    roofline engine: with contention on the ILP moves experts between the
    GPU, the cache and the CPU, and its plan beats the contention-blind plan priced the same
    way (an export re-prices it with contention)."""
    from exporters.engines.pricing import Pricing
    from planner.optimize import OptimizeRequest, optimize
    from profiles.workload.defaults import default_workload

    text = (Path(__file__).resolve().parents[1] / "profiles" / "hardware" / "desktop-4090.yaml").read_text()
    eff = "        efficiency: {memory_fraction: 0.85, compute_max_fraction: 0.5, half_tokens: 1.0, source: assumed}\n"
    (tmp_path / "hw.yaml").write_text(text.replace("        kind: cpu\n", "        kind: cpu\n" + eff, 1))
    plans = {on: optimize(OptimizeRequest(hardware=str(tmp_path / "hw.yaml"), model="mixtral-8x7b", engine="roofline",
                                          objective="throughput", batch_size=8, dram_contention=on,
                                          compare=False)).plan for on in (False, True)}
    blind, aware = plans[False], plans[True]
    assert blind.counts()["site"] != aware.counts()["site"]  # another CPU/GPU split
    assert aware.predicted["tokens_per_s"] < blind.predicted["tokens_per_s"]  # contention costs time
    _, hw = load_profile(tmp_path / "hw.yaml")
    model = load_model("mixtral-8x7b")
    flipped = blind.model_copy(update={"inputs": blind.inputs.model_copy(update={"dram_contention": True})})
    blind_contended, _ = Pricing(flipped, model, hw, default_workload(model)).price_plan()
    assert blind_contended.tokens_per_s < aware.predicted["tokens_per_s"]  # the aware plan is the better one


def test_a_cpu_call_holds_the_port_for_its_memory_time(box, tmp_path):
    """The box with a CPU that reaches half its DRAM bandwidth on expert weights: its call
    reads eb in eb / 5 GB/s = 2.516582 ms (memory-bound), and holds the port for that time, so
    the copy's eb / 10 GB/s = 1.258291 ms comes on top: 3.774874 ms. Priced at the port's peak
    (the read bytes over 10 GB/s) the port would be busy 2.516582 ms, under the CPU's own time:
    the term that never bound on a desktop (profiles.dram)."""
    hw_path = tmp_path / "hw.yaml"
    hw_path.write_text(BOX.replace("memory_fraction: 1.0", "memory_fraction: 0.5", 1))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(CONFIG))
    _, hw = load_profile(hw_path)
    assert hw.devices["n/cpu0"].efficiency.memory_fraction == 0.5
    assert hw.devices["n/gpu0"].efficiency.memory_fraction == 1.0
    _, _, trace = box
    model = load_model(tmp_path / "model")

    def setup(on: bool):
        return make_setup(hw, model, planning_stats(trace), batch_size=1, context_tokens=64, formats=("bf16",),
                          engine=load_engine("roofline"), dram_contention=on)

    off, on = (option_costs(setup(c), 0, SPLIT) for c in (False, True))
    cpu_s = EB / 5e9
    assert off.U[0] == pytest.approx(cpu_s + 2 * setup(False).activation_s(1.0), rel=1e-9)
    assert off.tau[0] == pytest.approx(off.U[0], rel=1e-12)  # the CPU binds without contention
    assert on.tau[0] == pytest.approx(cpu_s + EB / 10e9, rel=1e-9)  # 3.774874 ms
    report = simulate(_plan(box, True), hw, model, trace, SimConfig(batch_size=1, kv_context="plan"))
    s = setup(True)
    predicted, _ = step_time(s, [on], [0], fixed_costs(s, "bf16"), False)
    assert report.metrics["decode_step_s"]["mean"] == pytest.approx(predicted, rel=1e-3)


def test_contention_changes_the_split_on_a_bundled_desktop():
    """The bundled RTX 4090 desktop, bundle runtime, Mixtral-8x7B at batch 8 (throughput): the
    contention-blind plan runs experts on the CPU while it fetches others to the GPU; with the
    port priced (profiles.dram) the ILP keeps more experts resident and on the CPU and fetches
    fewer (measured: 84 / 115 / 57 fetched -> 104 / 118 / 34), predicting a little less, and
    the blind plan re-priced with contention is slower than the aware one. (Under the max of
    averages at batch > 1 the blind plan fetched into hybrid cache slots and the aware one
    fewer; priced per step (planner.step_max) a hybrid miss stalls its step and neither plan
    takes hybrid experts.)"""
    from exporters.engines.pricing import Pricing
    from planner.optimize import OptimizeRequest, optimize
    from profiles.workload.defaults import default_workload

    plans = {on: optimize(OptimizeRequest(hardware="desktop-4090", model="mixtral-8x7b", objective="throughput",
                                          batch_size=8, dram_contention=on, compare=False)).plan
             for on in (False, True)}
    blind, aware = plans[False], plans[True]

    def sites(plan):
        return {site: sum(lp.site.count(site) for lp in plan.layers) for site in ("resident", "local", "fetch")}

    b, a = sites(blind), sites(aware)
    assert a["local"] > b["local"] and a["resident"] > b["resident"] and a["fetch"] < b["fetch"], (b, a)
    assert aware.predicted["tokens_per_s"] < blind.predicted["tokens_per_s"]
    model = load_model("mixtral-8x7b")
    _, hw = load_profile("desktop-4090")
    flipped = blind.model_copy(update={"inputs": blind.inputs.model_copy(update={"dram_contention": True})})
    blind_contended, _ = Pricing(flipped, model, hw, default_workload(model)).price_plan()
    assert blind_contended.tokens_per_s < aware.predicted["tokens_per_s"]


def test_a_sweep_varies_contention_and_refuses_a_non_boolean(tmp_path):
    """The sweep knob reaches each point's spec (planned and simulated with it); a value that
    is not true/false is refused before any point runs."""
    from profiles.errors import InputError
    from simulator.sweep import load_grid, point_specs

    path = tmp_path / "g.yaml"
    path.write_text("name: g\nbase: {hardware: desktop-4090, model: mixtral-8x7b}\n"
                    "vary: {dram_contention: [false, true]}\n")
    specs = point_specs(load_grid(path), tmp_path / "out")
    assert [s["dram_contention"] for s in specs] == [False, True]
    path.write_text("name: g\nbase: {hardware: desktop-4090, model: mixtral-8x7b}\nvary: {dram_contention: [yes2]}\n")
    with pytest.raises(InputError, match="true or false"):
        load_grid(path)


@pytest.mark.parametrize("prefetch", ["none", "oracle"])
def test_the_port_counts_every_copied_byte_once_prefetches_included(box, tmp_path, prefetch):
    """Two fetched layers with one cache slot each, contention on: the DRAM port's busy time
    times its bandwidth is every byte copied from host DRAM, demand fetches and prefetches
    alike (a prefetch is charged to the layer it serves when that layer next waits; what is
    still owed at the end is counted apart)."""
    from simulator.engine import Simulation

    hw, _, _ = box
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(CONFIG | {"num_hidden_layers": 2,
                                                                         "num_local_experts": 4,
                                                                         "num_experts_per_tok": 1}))
    model = load_model(tmp_path / "model")
    T = 24
    ids = np.array([[[(t * (l + 1)) % 4] for l in range(2)] for t in range(T)])  # [T, L, K]
    trace = Trace(expert_ids=ids, seq_lens=np.array([T]), phase=np.full(T, DECODE, np.uint8), num_experts=4,
                  layer_map=tuple(model.moe_layer_indices))
    inputs = Inputs(hardware="dram-box", hardware_digest="-", model=model.name, model_digest="-", workload="-",
                    workload_digest="-", engine="roofline", dram_contention=True)
    layers = tuple(LayerPlan(moe_layer=l, hidden_layer=model.moe_layer_indices[l], home=("n/cpu0",) * 4,
                             format=("bf16",) * 4, site=("fetch",) * 4, cache_slots=1, cache_device="n/gpu0")
                   for l in range(2))
    plan = Plan(inputs=inputs, objective="latency", batch_size=1, context_tokens=64, compute_device="n/gpu0",
                host_device="n/cpu0", layers=layers, memory={}, predicted={}, solver=SolverInfo(method="hand"))
    sim = Simulation(plan, load_engine("roofline").apply(hw), model, trace, SimConfig(batch_size=1, prefetch=prefetch))
    sim.run()
    port = sim.dram
    counted = sim.net.busy_s[port.key] * port.bytes_per_s + sum(port.prefetched.values())
    assert sim.bytes_moved["dram"] > 0
    assert counted == pytest.approx(sim.bytes_moved["dram"], rel=1e-9)
