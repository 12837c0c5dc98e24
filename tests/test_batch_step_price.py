"""At batch > 1 a layer lasts the per-step max of the compute device, the host CPU and the
link, averaged over the steps (planner.step_max), not the max of their averages: an expert the
CPU runs in one step of three stalls that step, whatever the device does in the others.

The case is tests/test_miss_copy.py's: eight Mixtral-sized layers on desktop-4090, the bundle
engine, bf16 experts under a tight quality budget, so a few experts run on the host CPU or
through a one-slot cache beside a mostly resident layer. Measured before planner.step_max (the
max of averages): the simulated step +19.0% over the price at batch 4 (0.0% at batch 1).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from planner.optimize import OptimizeRequest, optimize
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import DECODE

L, E = 8, 8
CONFIG = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": L, "num_attention_heads": 32, "num_key_value_heads": 8,
          "num_local_experts": E, "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
          "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "hidden_act": "silu"}
CASE = dict(hardware="desktop-4090", formats=("bf16",), quality_budget=0.001, engine="bundle", compare=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return load_model(directory), directory


def workload(spec, sequences: int):
    """tests/test_miss_copy.py's trace, of ``sequences`` sequences (every token a decode token)."""
    trace = generate(SyntheticWorkload(num_layers=L, num_experts=E, top_k=2, popularity=[[8, 4, 2, 1, 1, 1, 1, 1]] * L,
                                       num_sequences=sequences, prompt_tokens=40, output_tokens=32, seed=5,
                                       model=spec.name))
    return dataclasses.replace(trace, phase=np.full(trace.num_tokens, DECODE, np.uint8))


@pytest.mark.parametrize("batch", [1, 4, 32])
def test_price_equals_simulated_step_at_batch(model, batch):
    """The throughput plan at ``batch`` simulates within 3% of its price on a trace of
    ``max(4, batch)`` sequences (all at t = 0: every step holds ``batch`` of them until the
    last ones end); the plan keeps host-CPU or cached experts, so the per-step max is tested."""
    from simulator.engine import SimConfig, simulate

    spec, directory = model
    trace = workload(spec, max(4, batch))
    kw = CASE if batch == 1 else CASE | dict(objective="throughput", batch_size=batch)
    plan = optimize(OptimizeRequest(model=str(directory), trace=trace, **kw)).plan
    assert any(site != "resident" for lp in plan.layers for site in lp.site)
    _, hw = load_profile(CASE["hardware"])
    step = simulate(plan, hw, spec, trace, SimConfig(batch_size=batch, kv_context="plan")).metrics["decode_step_s"]
    gap = step["mean"] / plan.predicted["tpot_s"] - 1
    print(f"batch {batch}: simulated vs price {gap:+.2%}")
    assert abs(gap) < 0.03


def test_a_cpu_expert_in_one_step_of_three_stalls_that_step():
    """Hand-worked: rank 0 resident (1 s a call), rank 1 on the host CPU (6 s), used in one step
    of three: the layer lasts (1 + 1 + 6) / 3 s a step, not max(1, 6 / 3) = 2 s; a one-slot
    hybrid band that misses half the time (link 4 s a fetch): (1 + 1 + (max(1, 6, 4) + 1 + 1) / 2) / 3."""
    from planner.setup import MODES
    from planner.step_max import stepped_max

    active = np.array([[1, 0], [1, 0], [1, 1]], bool)
    one = np.ones(1, np.int64)
    t_dev, t_cpu = np.array([[1.0, 1.0]]), np.array([[5.0, 6.0]])
    local = stepped_max(active, one, one, one, 0 * one, 0 * one, one * MODES.index("local"), np.zeros(1), np.zeros(1),
                        np.zeros(1), 0.0, 0.0, t_dev, t_dev, t_cpu)
    assert local[0] == pytest.approx([8 / 3]) and local[1] == pytest.approx([8 / 3])
    hybrid = stepped_max(active, one, 2 * one, 2 * one, 0 * one, 0 * one, one * MODES.index("hybrid"), np.full(1, 0.5),
                         np.full(1, 4.0), np.zeros(1), 0.0, 0.0, t_dev, t_dev, t_cpu)
    assert hybrid[0] == pytest.approx([(1 + 1 + (6 + 2) / 2) / 3])
