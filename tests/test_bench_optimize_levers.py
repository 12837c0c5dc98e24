"""The optimize benchmark's lever classification (benchmarks/_levers.py) on small plans:
Mixtral-8x7B on desktop-4090, the given configurations of popularity and LRU offloading
(no wall-clock assertions)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _levers as lv  # noqa: E402

from planner.given import GivenPolicy  # noqa: E402
from planner.optimize import OptimizeRequest, optimize  # noqa: E402

CASE = dict(hardware="desktop-4090", model="mixtral-8x7b")


@pytest.fixture(scope="module")
def popularity():
    req = OptimizeRequest(**CASE, policy=GivenPolicy("popularity"))
    return req, optimize(req)


@pytest.fixture(scope="module")
def tiers(popularity):
    return {m: mem.tier for m, mem in popularity[1].setup.hardware.memories.items()}


@pytest.fixture(scope="module")
def pop_shape(popularity, tiers):
    return lv.plan_shape(popularity[1].plan, tiers)


def _ref(shape, pop_shape, res):
    return lv.reference(shape, pop_shape, res.setup.stats.frequency)


def test_popularity_against_itself_pulls_no_lever(popularity, pop_shape):
    shape = pop_shape
    assert shape["num_formats"] == 1 and shape["resident_formats"] == shape["offloaded_formats"]
    assert set(k for k, v in shape["split"].items() if v) <= {"resident", "cpu_local"}
    assert shape["cache"] == {"total_slots": 0, "layers_with_slots": 0, "min": 0, "max": 0, "uniform": True,
                              "per_layer": [0] * 32}
    assert "nvme" not in shape["homes"] and shape["prefetch"] == "none"
    assert sum(shape["split"].values()) == 32 * 8 == sum(shape["homes"].values())
    assert lv.levers_used(shape, _ref(shape, pop_shape, popularity[1])) == []


def test_lru_offload_pulls_cache_sites_and_residency(popularity, pop_shape, tiers):
    plan = optimize(OptimizeRequest(**CASE, policy=GivenPolicy("lru-offload", cache_slots=2),
                                    engine="bundle", prefetch="none")).plan
    shape = lv.plan_shape(plan, tiers)
    assert shape["cache"]["uniform"] and shape["cache"]["total_slots"] == 2 * 32
    assert shape["split"]["cache"] == 32 * 8 and shape["resident_per_layer"] == [0] * 32
    used = lv.levers_used(shape, _ref(shape, pop_shape, popularity[1]))
    assert used == ["resident", "site_split", "cache"]


def test_hand_made_changes_name_their_lever(popularity, pop_shape, tiers):
    plan = popularity[1].plan
    ref = _ref(pop_shape, pop_shape, popularity[1])
    prefetching = plan.model_copy(update={"prefetch": "next-layer"})
    assert lv.levers_used(lv.plan_shape(prefetching, tiers), ref) == ["prefetch"]
    first = plan.layers[0]
    other = "int8" if first.format[0] != "int8" else "bf16"
    mixed_layer = first.model_copy(update={"format": (other,) + first.format[1:]})
    mixed = plan.model_copy(update={"layers": (mixed_layer,) + plan.layers[1:]})
    shape = lv.plan_shape(mixed, tiers)
    assert shape["num_formats"] == 2 and shape["formats"][other] == 1
    assert lv.levers_used(shape, ref) == ["format_mix", "expert_format"]


def test_global_top_counts_the_models_most_frequent_experts_per_layer():
    frequency = np.array([[0.5, 0.1, 0.3],
                          [0.2, 0.6, 0.05]])  # [L=2, E=3]
    assert lv.global_top(frequency, 0) == [0, 0]
    assert lv.global_top(frequency, 2) == [1, 1]  # 0.6, 0.5
    assert lv.global_top(frequency, 4) == [2, 2]  # then 0.3, 0.2
    assert lv.global_top(frequency, 6) == [3, 3]


def test_reference_without_popularity_uses_its_rules(popularity, pop_shape):
    ilp = dict(pop_shape, formats={"int4": 200, "bf16": 56})
    ref = lv.reference(ilp, None, popularity[1].setup.stats.frequency)
    assert ref["expert_format"] == ref["dense_format"] == "int4"
    assert sum(ref["resident_per_layer"]) == sum(pop_shape["resident_per_layer"])


def test_lp_min_bytes_hand_worked():
    eb, er = np.array([2.0, 1.0, 0.5]), np.array([0.0, 0.006, 0.04])  # bf16, int8, int4 per unit weight
    # equal weights at the int8 budget: every expert at int8, no mix pays
    assert lv.lp_min_bytes(np.tile(eb, (2, 1)), np.outer([1.0, 1.0], er), 0.006 * 2) == pytest.approx(2.0)
    # skewed weights (10, 0.1): the cold expert to int4 (0.0006 + 0.0034), the hot one 0.0566/0.06 of the
    # way to int8: 4 - 1 - 0.5 - 0.9433 bytes, less than uniform int8's 2
    got = lv.lp_min_bytes(np.tile(eb, (2, 1)), np.outer([10.0, 0.1], er), 0.006 * 10.1)
    assert got == pytest.approx(4 - 1 - 0.5 - 0.0566 / 0.06)
    # a dominated option (more bytes and more error) is never taken
    assert lv.lp_min_bytes(np.array([[2.0, 3.0, 1.0]]), np.array([[0.0, 0.01, 0.006]]), 0.006) == pytest.approx(1.0)


def test_format_headroom_is_nil_at_the_int4_budget(popularity):
    s = popularity[1].setup
    h = lv.format_headroom(s, s.quant_error["int4"], [0] * 32)
    assert h["per_expert"] == pytest.approx(0.0, abs=1e-9) and h["rank_split"] == pytest.approx(0.0, abs=1e-9)
    assert h["per_expert"] >= h["rank_split"] - 1e-9 and h["rank_split"] >= h["at_plan_residency"] - 1e-9


def test_cpu_sites_keep_only_options_without_a_gpu_band(popularity):
    s = popularity[1].setup
    specs = np.array([[2, 2, 0, 0, 0, 0, 1],  # local: the band is empty
                      [2, 8, 0, 2, 0, 0, 0],  # fetch through 2 slots
                      [8, 8, 0, 0, 0, 0, 0]])  # all resident
    assert lv.CpuSites().allows(s, 0, specs).tolist() == [True, False, True]


@pytest.mark.parametrize("lever", ["site_split", "cache", "prefetch"])
def test_a_pinned_lever_keeps_popularitys_choice_and_beats_it(popularity, pop_shape, tiers, lever):
    req, res = popularity
    req = OptimizeRequest(**CASE)
    ref = _ref(pop_shape, pop_shape, res)
    plan = lv.pinned_plan(res, req, lever, ref)
    shape = lv.plan_shape(plan, tiers)
    assert lever not in lv.levers_used(shape, ref)
    # popularity's placement is among the pinned ILP's options
    assert plan.predicted["tokens_per_s"] >= res.plan.predicted["tokens_per_s"] * (1 - 2 * req.gap)
