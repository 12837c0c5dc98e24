"""An engine's per-token layer cost (``token_overhead_s``, issue 14) has one price: the
planner's TTFT and the simulator's both grow by it, by the same seconds, through the one
helper both call (profiles.perf.dense_step_s / token_layer_s)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from planner.given import GivenPolicy
from planner.optimize import OptimizeRequest, optimize
from profiles.engines import bundled_engines
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.perf import micro_batches
from profiles.workload.defaults import default_workload
from profiles.workload.trace import DECODE, PREFILL
from simulator.engine import SimConfig, simulate

PROMPT, TOKEN_S = 1100, 40e-6


def _one_prompt(trace, prompt: int, decode: int):
    T = prompt + decode
    return trace.__class__(expert_ids=trace.expert_ids[:T], seq_lens=np.array([T]),
                           phase=np.r_[np.full(prompt, PREFILL), np.full(decode, DECODE)].astype(np.uint8),
                           num_experts=trace.num_experts, layer_map=trace.layer_map,
                           gate_weights=None if trace.gate_weights is None else trace.gate_weights[:T],
                           model=trace.model, source=trace.source)


def test_planner_and_simulator_price_the_per_token_layer_cost_alike(tmp_path):
    """llama.cpp --n-cpu-moe 20 on the 4090 desktop, an 1100-token prompt (passes of 512,
    512 and 76 tokens), with and without a 40 us per-token layer cost on the GPU: both TTFTs
    grow by L x (511 + 511 + 75) x 40 us, and planner and simulator agree on each."""
    model = load_model("mixtral-8x7b")
    trace = _one_prompt(default_workload(model), PROMPT, 2)
    _, hw = load_profile("desktop-4090")
    doc = yaml.safe_load(bundled_engines()["llama.cpp"].read_text())
    assert "token_overhead_s" not in doc["gpu"]
    doc["gpu"]["token_overhead_s"] = {"value": f"{TOKEN_S * 1e6:g}us", "source": "test"}
    doc["name"] = "llama.cpp-token-cost"
    path = tmp_path / "token.yaml"
    path.write_text(yaml.safe_dump(doc))
    planned, simulated = {}, {}
    for engine in ("llama.cpp", str(path)):
        plan = optimize(OptimizeRequest(hardware="desktop-4090", model="mixtral-8x7b", engine=engine,
                                        prompt_tokens=PROMPT, policy=GivenPolicy("llama.cpp", n_cpu_moe=20))).plan
        plan = plan.model_copy(update={"inputs": plan.inputs.model_copy(update={"engine": engine})})
        planned[engine] = plan.predicted["ttft_s"]
        simulated[engine] = simulate(plan, hw, model, trace, SimConfig(batch_size=1)).metrics["ttft_s"]["mean"]
        assert simulated[engine] == pytest.approx(planned[engine], rel=1e-3)
    passes = micro_batches(PROMPT, doc["op_offload"]["micro_batch_tokens"] if "op_offload" in doc else None)
    extra = model.num_hidden_layers * sum(count * (n - 1) for n, count in passes) * TOKEN_S
    assert extra > 0.01  # a price the comparison below can see
    assert planned[str(path)] - planned["llama.cpp"] == pytest.approx(extra, rel=1e-6)
    assert simulated[str(path)] - simulated["llama.cpp"] == pytest.approx(extra, rel=1e-2)
