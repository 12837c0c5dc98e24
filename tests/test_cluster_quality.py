"""The quality budget and ``--critical`` bind in expert-parallel mode (issue 19): the experts'
format is chosen under the budget with the offload planner's importance-weighted accounting,
the plan records the budget and its real error, critical experts stay at full precision,
and ``--parallel auto`` offloads (saying why) when no EP layout meets the budget.

Small instances: Mixtral-8x7B (32 layers x 8 experts) and OLMoE-1B-7B (16 x 64) on the
2x RTX 3090 workstations, with a few hundred synthetic tokens.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner.cluster import ClusterRequest, parallel_mode, plan_cluster
from planner.costs import QUANT_ERROR
from planner.workload_view import planning_stats
from profiles.errors import InputError
from profiles.models import load_model
from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import save_trace

PCIE, NVLINK = "workstation-2x3090-pcie", "workstation-2x3090-nvlink"
FULL = {"bf16", "fp16", "fp32"}
# OLMoE with 4 sequences of 36,864 tokens per GPU: 18 GiB of KV cache leaves room for its
# experts in int8 but not in bf16, so the budget decides between them
OLMOE_TIGHT = {"batch_size": 4, "context_tokens": 36864}
CLI_FORMATS = {"formats": ("bf16", "int8", "int4")}  # planner optimize's default --formats


def _trace(model: str, seed: int = 3):
    spec = load_model(model)
    return generate(SyntheticWorkload(num_layers=spec.num_moe_layers, num_experts=spec.num_experts, top_k=spec.top_k,
                                      skew=0.8, affinity=0.9, prompt_tokens=24, output_tokens=8, num_sequences=12,
                                      seed=seed, model=model))


TRACES = {m: _trace(m) for m in ("mixtral-8x7b", "olmoe-1b-7b")}


def _importance_weighted_error(plan, trace) -> float:
    """The offload planner's accounting: sum of importance x error of each expert's format,
    over the total importance (planner.plan_assembly.assemble_plan)."""
    w = planning_stats(trace, real_experts=len(plan.layers[0].format)).importance  # [L, E]
    err = np.array([[QUANT_ERROR[f] for f in layer.format] for layer in plan.layers])  # [L, E]
    return float((w * err).sum() / w.sum())


def _check(plan, trace, budget: float) -> None:
    assert plan.quality_budget == pytest.approx(budget)
    assert plan.quality_error <= budget * (1 + 1e-9)
    assert plan.quality_error == pytest.approx(_importance_weighted_error(plan, trace), rel=1e-9, abs=1e-12)
    assert QUANT_ERROR[plan.dense_format] <= budget * (1 + 1e-9)
    for gpu, use in plan.memory.items():
        assert use.used_bytes <= use.capacity_bytes, gpu


CASES = [  # (hardware, model, request options, the least budget EP meets in the GPUs' memory)
    (PCIE, "mixtral-8x7b", {}, QUANT_ERROR["int4"]),  # only int4 fits 2 x 24 GiB
    (NVLINK, "mixtral-8x7b", {}, QUANT_ERROR["int4"]),
    (NVLINK, "olmoe-1b-7b", {}, 0.0),  # bf16 fits
    (PCIE, "olmoe-1b-7b", OLMOE_TIGHT | CLI_FORMATS, QUANT_ERROR["int8"]),
    (PCIE, "olmoe-1b-7b", OLMOE_TIGHT, QUANT_ERROR["fp8"]),  # ClusterRequest's formats hold fp8
]


BUDGETS = (0.0, 0.004, 0.006, 0.02, 0.04, 0.1)


def _budgets(least: float) -> list[float]:
    """The budgets of BUDGETS worth a solve for a case: the least and the most below its
    least (refused), its least (the boundary) and the loosest (allows every coarser format:
    the plan must still take the most accurate that fits). A budget between the least and
    the loosest runs the same format choice to the same asserted error, one EP solve each."""
    below = [b for b in BUDGETS if b < least]
    return sorted({*below[:1], *below[-1:], least, BUDGETS[-1]})


@pytest.mark.parametrize(("hardware", "model", "options", "least", "budget"),
                         [(*case, b) for case in CASES for b in _budgets(case[3])],
                         ids=[f"{h[12:]}-{m}-{'+'.join(o) or 'default'}-{b}" for h, m, o, least in CASES
                              for b in _budgets(least)])
def test_every_ep_plan_meets_and_records_its_budget(hardware, model, options, least, budget):
    req = ClusterRequest(hardware=hardware, model=model, trace=TRACES[model], quality_budget=budget, **options)
    if budget < least:
        with pytest.raises(InputError, match="quality budget") as err:
            plan_cluster(req)
        assert err.value.key == "--quality-budget" and err.value.fix
        assert f"expected >= {least:.4g}" in str(err.value) and "\n" not in str(err.value)
        assert parallel_mode("auto", req)[0] is False
        return
    assert parallel_mode("auto", req) == (True, "")
    result = plan_cluster(req)
    for plan in (result.plan, *result.baselines.values()):
        _check(plan, TRACES[model], budget)
    # the most accurate format that fits: the error is the least one, not lower quality than needed
    assert result.plan.quality_error == pytest.approx(least)


def test_default_budget_is_int4s_and_is_recorded():
    """The issue's second case: Mixtral on 4x RTX 4090 fits int8; the plan records the default budget."""
    result = plan_cluster(ClusterRequest(hardware="workstation-4x4090", model="mixtral-8x7b",
                                         trace=TRACES["mixtral-8x7b"], **CLI_FORMATS))
    assert result.expert_format == "int8"
    _check(result.plan, TRACES["mixtral-8x7b"], QUANT_ERROR["int4"])
    assert result.plan.quality_error == pytest.approx(QUANT_ERROR["int8"])


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 31), st.integers(0, 7)), min_size=1, max_size=8),
       st.sampled_from([PCIE, NVLINK]))
def test_critical_experts_stay_full_precision_in_ep(pairs, hardware):
    critical = [set() for _ in range(32)]
    for l, e in pairs:
        critical[l].add(e)
    critical = tuple(tuple(sorted(c)) for c in critical)
    trace = TRACES["mixtral-8x7b"]
    result = plan_cluster(ClusterRequest(hardware=hardware, model="mixtral-8x7b", trace=trace, critical=critical))
    for plan in (result.plan, *result.baselines.values()):
        _check(plan, trace, QUANT_ERROR["int4"])
        for l, layer in enumerate(plan.layers):
            for e, fmt in enumerate(layer.format):
                assert (fmt in FULL) == (e in critical[l]), (plan.solver.method, l, e, fmt)
    # a GPU pays for the full-precision copies it holds
    expert_bytes = sorted(use.expert_bytes for use in result.plan.memory.values())
    spec = load_model("mixtral-8x7b")
    assert expert_bytes[-1] > 5 * 32 * spec.expert_bytes("int4")


def test_critical_experts_lower_the_error_ep_must_meet():
    """Critical experts carry part of the importance at full precision: int4 for the rest can
    then meet a budget below int4's own error, exactly as the offload planner counts it."""
    trace = TRACES["mixtral-8x7b"]
    w = planning_stats(trace, real_experts=8).importance  # [L, E]
    top = np.dstack(np.unravel_index(np.argsort(-w, axis=None)[:8], w.shape))[0]  # [8, 2] (layer, expert)
    critical = [set() for _ in range(32)]
    for l, e in top.tolist():
        critical[l].add(e)
    critical = tuple(tuple(sorted(c)) for c in critical)
    share = sum(w[l, list(c)].sum() for l, c in enumerate(critical) if c) / w.sum()
    budget = QUANT_ERROR["int4"] * (1 - share / 2)  # below int4, above int4 with the critical ones in bf16
    req = ClusterRequest(hardware=PCIE, model="mixtral-8x7b", trace=trace, quality_budget=budget)
    with pytest.raises(InputError, match="quality budget"):
        plan_cluster(req)
    plan = plan_cluster(ClusterRequest(hardware=PCIE, model="mixtral-8x7b", trace=trace, quality_budget=budget,
                                       critical=critical)).plan
    _check(plan, trace, budget)
    assert plan.quality_error == pytest.approx(QUANT_ERROR["int4"] * (1 - share))


def test_critical_experts_that_do_not_fit_refuse_ep():
    every = tuple(tuple(range(8)) for _ in range(32))  # every expert in bf16: 2 x 24 GiB do not hold it
    req = ClusterRequest(hardware=PCIE, model="mixtral-8x7b", trace=TRACES["mixtral-8x7b"], critical=every)
    with pytest.raises(InputError, match="critical experts") as err:
        plan_cluster(req)
    assert err.value.key == "--critical" and "--parallel offload" in err.value.fix
    use_ep, why = parallel_mode("auto", req)
    assert not use_ep and "critical" in why


def test_unknown_critical_expert_is_an_input_error():
    req = ClusterRequest(hardware=PCIE, model="mixtral-8x7b", trace=TRACES["mixtral-8x7b"], critical=((9,),))
    with pytest.raises(InputError, match="no such expert"):
        plan_cluster(req)


def test_cli_explicit_ep_offload_refuses_replicas_in_one_line(run_cli, tmp_path):
    """The issue's case: Mixtral on 2x RTX 3090 (PCIe) at the int8 budget; EP holds only int4, so
    `--parallel ep` offloads per GPU (tests/test_ep_offload.py), one copy of each expert: asked
    for replicas as well, it says so in one line."""
    trace = save_trace(TRACES["mixtral-8x7b"], tmp_path / "trace.npz")
    out = tmp_path / "plan.json"
    r = run_cli("optimize", "-H", PCIE, "-m", "mixtral-8x7b", "-t", trace, "--parallel", "ep",
                "--quality-budget", "0.006", "--redundant-experts", "2", "--out", out)
    assert r.exit_code == 1, r.output
    line = r.stderr.strip()
    assert "\n" not in line and "--redundant-experts" in line and "one copy" in line
    assert "Fix:" in line and not out.exists()


def test_cli_auto_offloads_when_ep_cannot_meet_the_budget(run_cli, tmp_path):
    trace = save_trace(TRACES["olmoe-1b-7b"], tmp_path / "trace.npz")
    args = ["--json", "optimize", "-H", PCIE, "-m", "olmoe-1b-7b", "-t", trace, "--batch", "4", "--context", "36864"]
    r = run_cli(*args, "--quality-budget", "0", "--out", tmp_path / "offload.json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    why = data["parallel"]["why"]
    assert data["parallel"]["mode"] == "offload" and "over the budget 0" in why and "int8" in why
    plan = json.loads((tmp_path / "offload.json").read_text())
    # planned over both GPUs of the node (planner.multi_gpu), which put every layer on the first
    assert plan["solver"]["method"] == "ilp-multi-gpu" and why in plan["notes"] and "layer_devices" not in plan
    assert plan["quality_budget"] == 0 and plan["quality_error"] == 0
    assert {f for layer in plan["layers"] for f in layer["format"]} <= FULL
    # at the int8 budget the same box plans EP in int8, and says so
    r = run_cli(*args, "--quality-budget", "0.006", "--out", tmp_path / "ep.json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)["summary"]
    assert summary["mode"] == "expert-parallel" and summary["layout"]["expert_format"] == "int8"
    assert summary["quality"] == {"budget": 0.006, "error": 0.006, "formats": {"int8": 16 * 64}}
    assert "parallel" not in json.loads(r.stdout)
