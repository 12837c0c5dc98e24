"""llama.cpp's op offload: a prompt runs in micro-batches, and in each one of at least the
engine's threshold the experts held in host DRAM are copied over PCIe and run on the GPU
(copy, then compute); planner and simulator price a --n-cpu-moe prefill alike."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from planner.costs import MODES, fixed_costs, option_costs, step_time
from planner.prefill_costs import prefill_s
from planner.given import GivenPolicy
from planner.optimize import OptimizeRequest, make_setup, optimize
from planner.workload_view import planning_stats
from profiles.engines import Engine, bundled_engines, load_engine
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.perf import micro_batches
from profiles.workload.defaults import default_workload
from profiles.workload.trace import DECODE, PREFILL
from simulator.engine import SimConfig, simulate

FMT, DENSE = "q4_k", "bf16"


def _with_op_offload(engine: Engine, **changes) -> Engine:
    """``engine`` with its op_offload block changed (``None``: removed), in memory."""
    p = engine.profile
    block = None if changes.get("off") else p.op_offload.model_copy(update=changes)
    return Engine(profile=p.model_copy(update={"op_offload": block, "name": f"{p.name}-test"}), path=engine.path)


@pytest.fixture(scope="module")
def mixtral_3090():
    """Mixtral-8x7B on the RTX 3090 workstation (PCIe 4.0 x16) through llama.cpp's profile."""
    model = load_model("mixtral-8x7b")
    stats = planning_stats(default_workload(model), real_experts=model.num_experts)
    _, hw = load_profile("workstation-3090")
    return model, stats, hw


def _ttft(mixtral_3090, engine: Engine, prompt: int, placement: str) -> float:
    model, stats, hw = mixtral_3090
    s = make_setup(hw, model, stats, batch_size=1, context_tokens=4096, formats=(FMT, DENSE), engine=engine)
    E, fi = stats.num_experts, s.formats.index(FMT)
    row = (0, 0, fi, 0, fi, 0, MODES.index("local")) if placement == "host" else (E, E, fi, 0, fi, 0, 0)
    return prefill_s(s, [np.array([row])] * stats.num_layers, DENSE, prompt, prefetch=False)


def _copy_s(mixtral_3090, engine: Engine) -> float:
    """One layer's copy by hand: all 8 experts (every one is used by hundreds of tokens) at
    Q4_K over PCIe 4.0 x16 (25 GB/s effective) plus the link's latency."""
    model, stats, hw = mixtral_3090
    s = make_setup(hw, model, stats, batch_size=1, context_tokens=4096, formats=(FMT, DENSE), engine=engine)
    route = s.hardware.route(s.homes[0], s.compute.id)
    assert route.bottleneck_bytes_per_s == pytest.approx(25e9)
    return 8 * model.expert_bytes(FMT) / route.bottleneck_bytes_per_s + route.latency_s


@pytest.mark.parametrize("prompt, passes", [(512, 1), (1024, 2), (1400, 3)])
def test_prefill_of_host_experts_pays_one_pcie_copy_per_micro_batch(mixtral_3090, prompt, passes):
    """An all-CPU-experts (--cpu-moe) prefill costs what the same prompt costs with every
    expert resident on the GPU plus, per 512-token micro-batch, each layer's copy of its
    experts over PCIe: the GPU runs them once they are there, the CPU runs none."""
    engine = load_engine("llama.cpp")
    assert micro_batches(prompt, 512) == [(512, prompt // 512)] + ([(prompt % 512, 1)] if prompt % 512 else [])
    L = mixtral_3090[1].num_layers
    host, resident = _ttft(mixtral_3090, engine, prompt, "host"), _ttft(mixtral_3090, engine, prompt, "resident")
    assert host - resident == pytest.approx(passes * L * _copy_s(mixtral_3090, engine), rel=1e-9)


def test_a_micro_batch_below_the_threshold_runs_on_the_cpu(mixtral_3090):
    """528 tokens are a pass of 512 and one of 16. With a threshold of 16 both are offloaded:
    two copies of all 8 experts per layer (whole-tensor), or for the second one only the
    experts 16 tokens are expected to use (used-experts, fewer than 8). With llama.cpp's
    threshold (32 tokens) the CPU runs the 16: one copy, plus a CPU pass slower than the GPU's."""
    llama = load_engine("llama.cpp")
    copy_s, L = _copy_s(mixtral_3090, llama), mixtral_3090[1].num_layers

    def extra(engine: Engine) -> float:  # in copies of one layer's experts, over all layers
        return (_ttft(mixtral_3090, engine, 528, "host") - _ttft(mixtral_3090, engine, 528, "resident")) / (L * copy_s)

    assert extra(_with_op_offload(llama, min_batch_tokens=16, copies="whole-tensor")) == pytest.approx(2.0, rel=1e-9)
    assert 1.5 < extra(_with_op_offload(llama, min_batch_tokens=16)) < 2.0 - 1e-3
    assert extra(llama) > 1.1


def test_without_op_offload_the_cpu_runs_the_prompt_and_decode_is_unchanged(mixtral_3090):
    """--no-op-offload: the host's CPU runs the host-held experts for the whole prompt (far
    slower than PCIe copies here); a one-token decode step is the same either way."""
    llama = load_engine("llama.cpp")
    off = _with_op_offload(llama, off=True)
    assert _ttft(mixtral_3090, off, 1400, "host") > 3 * _ttft(mixtral_3090, llama, 1400, "host")
    model, stats, hw = mixtral_3090
    tpot = []
    for engine in (llama, off):
        s = make_setup(hw, model, stats, batch_size=1, context_tokens=4096, formats=(FMT, DENSE), engine=engine)
        fi = s.formats.index(FMT)
        tables = [option_costs(s, l, np.array([(0, 0, fi, 0, fi, 0, MODES.index("local"))]))
                  for l in range(stats.num_layers)]
        tpot.append(step_time(s, tables, [0] * len(tables), fixed_costs(s, DENSE), False)[0])
    assert tpot[0] == tpot[1]


def _one_prompt(trace, prompt: int, decode: int):
    """The trace's first tokens as one request: ``prompt`` prefill tokens, then ``decode``."""
    T = prompt + decode
    return trace.__class__(expert_ids=trace.expert_ids[:T], seq_lens=np.array([T]),
                           phase=np.r_[np.full(prompt, PREFILL), np.full(decode, DECODE)].astype(np.uint8),
                           num_experts=trace.num_experts, layer_map=trace.layer_map,
                           gate_weights=None if trace.gate_weights is None else trace.gate_weights[:T],
                           model=trace.model, source=trace.source)


def test_planner_and_simulator_agree_on_an_n_cpu_moe_prefill(tmp_path):
    """llama.cpp --n-cpu-moe 20 on the 4090 desktop, a 1100-token prompt (passes of 512, 512
    and 76 tokens): the simulated TTFT is the planner's, with op offload and without it (the
    profile less its op_offload block), and the two differ several-fold."""
    model = load_model("mixtral-8x7b")
    trace = _one_prompt(default_workload(model), 1100, 2)
    _, hw = load_profile("desktop-4090")
    no_offload = yaml.safe_load(bundled_engines()["llama.cpp"].read_text())
    no_offload.pop("op_offload")
    no_offload["name"] = "llama.cpp-no-op-offload"
    path = tmp_path / "no-op-offload.yaml"
    path.write_text(yaml.safe_dump(no_offload))
    ttft = {}
    for engine in ("llama.cpp", str(path)):
        plan = optimize(OptimizeRequest(hardware="desktop-4090", model="mixtral-8x7b", engine=engine,
                                        prompt_tokens=1100, policy=GivenPolicy("llama.cpp", n_cpu_moe=20))).plan
        assert sum(site == "local" for lp in plan.layers for site in lp.site) == 20 * model.num_experts
        plan = plan.model_copy(update={"inputs": plan.inputs.model_copy(update={"engine": engine})})
        simulated = simulate(plan, hw, model, trace, SimConfig(batch_size=1)).metrics["ttft_s"]["mean"]
        assert simulated == pytest.approx(plan.predicted["ttft_s"], rel=1e-3)
        ttft[engine] = simulated
    assert ttft[str(path)] > 3 * ttft["llama.cpp"]
