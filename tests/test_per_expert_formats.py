"""Per-expert formats in the ILP (issue 16 item 1, planner/format_tiers.py): within ONE layer a
cold expert ten times as sensitive as its neighbours is stored wider than a hotter,
insensitive expert of that layer; without the planted sensitivity it is not; the plan is
priced as the simulator runs it; equal statistics give the rank structure's plan.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from planner import format_tiers
from planner.costs import QUANT_ERROR
from planner.ilp import build_problem
from planner.optimize import OptimizeRequest, make_setup, optimize
from planner.plan_check import check_plan
from planner.layer_breakdown import layer_breakdown
from planner.workload_view import planning_stats
from profiles.formats import get_format
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import DECODE

L, E = 8, 8
FORMATS = ("bf16", "int8", "int4")
HARDWARE = "laptop-4060"  # 8 GB: two or three bf16 experts per layer fit, the rest run on the CPU
# a Mixtral-8x7B-sized layer (352 MB per bf16 expert), eight of them
CONFIG = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": L, "num_attention_heads": 32, "num_key_value_heads": 8,
          "num_local_experts": E, "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
          "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "hidden_act": "silu"}


def bits(fm: str) -> float:
    return get_format(fm).bits_per_weight


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The model, a skewed decode-only trace (every token a batch-1 step) and its statistics."""
    directory = tmp_path_factory.mktemp("model")
    (directory / "config.json").write_text(json.dumps(CONFIG))
    spec = load_model(directory)
    trace = generate(SyntheticWorkload(num_layers=L, num_experts=E, top_k=2, popularity=[[8, 4, 2, 1, 1, 1, 1, 1]] * L,
                                       num_sequences=4, prompt_tokens=40, output_tokens=32, seed=5, model=spec.name))
    trace = dataclasses.replace(trace, phase=np.full(trace.num_tokens, DECODE, np.uint8))
    return spec, directory, trace, planning_stats(trace, real_experts=E)


def flat_errors() -> dict[str, np.ndarray]:
    """Every expert at its format's constant error: measured, but equal statistics within a layer."""
    return {fm: np.full((L, E), QUANT_ERROR[fm]) for fm in FORMATS}


def plan_with(case, errors, budget):
    spec, directory, trace, _ = case
    return optimize(OptimizeRequest(hardware=HARDWARE, model=str(directory), trace=trace, formats=FORMATS,
                                    quality_budget=budget, expert_error=errors))


@pytest.fixture(scope="module")
def plans(case):
    """``(flat, planted, ranked, cold, hot)``: the plans without and with expert ``cold`` of layer
    0 (its least frequent) ten times as sensitive at int8 and int4, under the budget the flat
    plan meets exactly, and the planted case planned by the rank structure alone (no tiers);
    ``hot`` the most frequent expert of layer 0 that the flat plan keeps off the device."""
    stats = case[3]
    free = plan_with(case, flat_errors(), None)  # the budget: uniform int4
    flat = plan_with(case, flat_errors(), free.plan.quality_error * (1 + 1e-9))
    order = [int(e) for e in stats.order[0]]
    cold = order[-1]
    hot = next(e for e in order if flat.plan.layers[0].site[e] != "resident")
    planted = flat_errors()
    for fm in ("int8", "int4"):
        planted[fm][0, cold] *= 10
    budget = free.plan.quality_error * (1 + 1e-9)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(format_tiers, "offers_tiers", lambda s, layer: False)
        ranked = plan_with(case, planted, budget)
    return flat, plan_with(case, planted, budget), ranked, cold, hot


def test_a_cold_sensitive_expert_ends_wider_than_a_hotter_insensitive_one(case, plans):
    flat, planted, ranked, cold, hot = plans
    stats = case[3]
    assert stats.frequency[0, hot] > stats.frequency[0, cold]  # hot is hotter (by rank and by frequency)
    assert flat.plan.layers[0].site[cold] == flat.plan.layers[0].site[hot] == "local"  # both off the device
    # without the planted sensitivity the rank structure holds: the cold expert is no wider
    assert bits(flat.plan.layers[0].format[cold]) <= bits(flat.plan.layers[0].format[hot])
    # with it, the cold expert alone is kept wider, in place (its site does not change) ...
    layer = planted.plan.layers[0]
    assert bits(layer.format[cold]) > bits(layer.format[hot])
    assert layer.site[cold] == "local"
    wider = [e for e in range(E) if layer.site[e] == "local" and bits(layer.format[e]) > bits(layer.format[hot])]
    assert wider == [cold]
    # ... so the layer holds three formats (resident, offloaded, the tier), which one format
    # per site could not express
    assert len(set(layer.format)) == 3
    # the certificate: within the budget, the gap closed
    assert planted.plan.quality_error <= planted.plan.quality_budget * (1 + 1e-9)
    assert planted.plan.solver.status == "optimal" and planted.plan.solver.gap <= 1e-3
    # the rank structure alone cannot keep it wider than a hotter offloaded expert, and buys the
    # same budget more dearly (wider formats for whole layers' offloaded experts or more on the GPU)
    layer = ranked.plan.layers[0]
    assert layer.site[hot] != "local" or bits(layer.format[cold]) <= bits(layer.format[hot])
    assert planted.plan.predicted["tpot_s"] < ranked.plan.predicted["tpot_s"] * (1 - 0.01)


def test_the_tier_is_priced_as_the_simulator_runs_it(case, plans):
    """The plan records each expert's format; report, plan validation and the simulator read
    it back, and the simulated batch-1 step matches the planner's price (0.5%)."""
    from simulator.engine import SimConfig, simulate

    spec, _, trace, _ = case
    planted = plans[1]
    plan = planted.plan
    assert layer_breakdown(plan, planted.setup).step_s == pytest.approx(plan.predicted["tpot_s"], rel=1e-9)
    _, hw = load_profile(HARDWARE)
    check_plan(plan, hw, spec)  # raises on a plan the hardware cannot hold
    report = simulate(plan, hw, spec, trace, SimConfig(batch_size=1, kv_context="plan"))
    assert report.metrics["decode_step_s"]["mean"] == pytest.approx(plan.predicted["tpot_s"], rel=0.005)
    # the tier's CPU seconds count: priced without it (the cold expert at int4) the plan is faster
    flat_layer = plan.layers[0].model_copy(update={"format": tuple(
        "int4" if site == "local" else fm for fm, site in zip(plan.layers[0].format, plan.layers[0].site))})
    int4 = plan.model_copy(update={"layers": (flat_layer,) + plan.layers[1:]})
    faster = simulate(int4, hw, spec, trace, SimConfig(batch_size=1, kv_context="plan"))
    assert faster.metrics["decode_step_s"]["mean"] < report.metrics["decode_step_s"]["mean"]


def test_equal_statistics_give_the_rank_structure_plan(case):
    """Errors measured equal for every expert of a layer: no tier is offered (the rank
    structure is exact there), and the plan is the one the format constants give, byte for byte."""
    spec, directory, trace, stats = case
    _, hw = load_profile(HARDWARE)
    for errors in (None, flat_errors()):
        s = make_setup(hw, spec, stats, batch_size=1, context_tokens=4096, formats=FORMATS, expert_error=errors)
        assert all((t.k == 0).all() for t in build_problem(s, QUANT_ERROR["int4"]).tables)
    budget = QUANT_ERROR["int8"] * 2
    const = plan_with(case, None, budget).plan
    measured = plan_with(case, flat_errors(), budget).plan
    assert measured.to_json() == const.to_json()
    # and a planted sensitivity does offer tiers, only in its layer
    planted = flat_errors()
    planted["int4"][3, 5] *= 10
    s = make_setup(hw, spec, stats, batch_size=1, context_tokens=4096, formats=FORMATS, expert_error=planted)
    tiered = [bool((t.k > 0).any()) for t in build_problem(s, QUANT_ERROR["int4"]).tables]
    assert tiered == [l == 3 for l in range(L)]
