"""Simulator policies: HybriMoE's score-aware cache (MRS) by hand and on real routing, the
link-capped transition prefetcher, and the Plan naming every policy the simulator has."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from conftest import ESFT, needs_esft
from planner.plan import Inputs, Plan, SolverInfo
from planner.plan_layer import LayerPlan
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.perf import expert_call_s
from profiles.workload.trace import DECODE, Trace
from simulator import policies
from simulator.engine import SimConfig, simulate

CPU, GPU = "node/cpu0", "node/gpu0"


def _tiny_model(tmp_path: Path, experts: int, top_k: int):
    """Two MoE layers of Mixtral's layout, small enough to reason about by hand."""
    config = json.loads((Path(__file__).parent / "data/configs/mixtral/config.json").read_text())
    config.update(num_hidden_layers=2, hidden_size=1024, intermediate_size=4096, num_local_experts=experts,
                  num_experts_per_tok=top_k, num_attention_heads=8, num_key_value_heads=2, vocab_size=128)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return load_model(tmp_path / "config.json")


def _plan(model, layers: list[dict]) -> Plan:
    inputs = Inputs(hardware="desktop-4090", hardware_digest="-", model=model.name, model_digest="-", workload="-",
                    workload_digest="-")
    lps = tuple(LayerPlan(moe_layer=i, hidden_layer=model.moe_layer_indices[i], **spec) for i, spec in enumerate(layers))
    return Plan(inputs=inputs, objective="latency", batch_size=1, context_tokens=64, compute_device=GPU,
                host_device=CPU, layers=lps, memory={}, predicted={}, solver=SolverInfo(method="hand"))


def _serve(cache, tokens: list[list[tuple[int, float]]]) -> list[bool]:
    """Serve tokens as the engine does: the router's scores, then the accesses in rank order."""
    hits = []
    for token in tokens:
        cache.route([e for e, _ in token], [s for _, s in token])
        hits += [cache.access(e, 0, s) for e, s in token]
    return hits


# ----------------------------------------------------------------------------- score (MRS)


def test_score_cache_keeps_the_firmly_routed_expert():
    """Two slots, one expert per token: A firmly routed (0.9), then B and C barely (0.1).

    MRS, S <- 0.5 s + 0.5 S for the routed expert and S <- 0.5 S for the rest: when C
    misses, S_A = 0.1125, S_B = 0.025, so B goes and A's return hits. LRU drops A.
    """
    A, B, C = 0, 1, 2
    tokens = [[(A, 0.9)], [(B, 0.1)], [(C, 0.1)], [(A, 0.9)], [(B, 0.1)]]
    score, lru = policies.make_cache("score", 2), policies.make_cache("lru", 2)
    assert _serve(score, tokens) == [False, False, False, True, False]
    assert _serve(lru, tokens) == [False] * 5
    assert list(score.items) == [A, B] and list(lru.items) == [A, B]
    # S_A: 0.45 (token 1), 0.1125 (token 3), 0.45 + 0.05625 (token 4), halved at token 5
    assert score._now(A) == pytest.approx(0.253125)
    assert score._now(B) == pytest.approx(0.05 + 0.05 / 8)  # 0.05 at token 2, three halvings, + 0.05


def test_score_cache_keeps_a_tokens_own_experts():
    """A token's experts are not evicted for one another, even when an older expert scores
    higher: C and D (0.05) both miss; C's miss evicts B, D's evicts A, not C (S_C = 0.025)."""
    A, B, C, D = 0, 1, 2, 3
    cache = policies.make_cache("score", 2)
    assert _serve(cache, [[(A, 0.6), (B, 0.3)], [(C, 0.05), (D, 0.05)]]) == [False] * 4
    assert list(cache.items) == [C, D]


def test_score_cache_prefetches_do_not_evict_each_other():
    cache = policies.make_cache("score", 3)
    _serve(cache, [[(0, 0.5), (1, 0.4), (2, 0.3)]])
    assert [cache.insert(e) for e in (5, 6, 5)] == [True, True, False]
    assert sorted(cache.items) == [0, 5, 6]  # 2 and 1 (the lowest scores) made room, not 5
    assert _serve(cache, [[(5, 0.5), (6, 0.2)]]) == [True, True]


def test_simulated_score_eviction_reads_the_router(tmp_path):
    """Through the engine: the hand sequence of the first test at layer 0 (top-1, two slots)."""
    model = _tiny_model(tmp_path, experts=4, top_k=1)
    _, hw = load_profile("desktop-4090")
    ids = np.array([[[0], [3]], [[1], [3]], [[2], [3]], [[0], [3]], [[1], [3]]])  # [T=5, L=2, K=1]
    gates = np.array([[[0.9], [1.0]], [[0.1], [1.0]], [[0.1], [1.0]], [[0.9], [1.0]], [[0.1], [1.0]]], np.float32)
    trace = Trace(expert_ids=ids, seq_lens=np.array([5]), phase=np.full(5, DECODE, np.uint8), num_experts=4,
                  layer_map=(0, 1), gate_weights=gates)
    plan = _plan(model, [
        {"home": (CPU,) * 4, "format": ("int4",) * 4, "site": ("fetch",) * 4, "cache_slots": 2, "cache_device": GPU},
        {"home": (GPU,) * 4, "format": ("int4",) * 4, "site": ("resident",) * 4},
    ])
    hit_rate = {ev: simulate(plan, hw, model, trace, SimConfig(eviction=ev)).metrics["hit_rate"]
                for ev in ("score", "lru")}
    assert hit_rate == {"score": [0.2, None], "lru": [0.0, None]}


def _hit_rate(policy: str, ids: np.ndarray, gates: np.ndarray, slots: int) -> float:
    """Mean over layers of one cache per layer serving one token per step."""
    rates = []
    for l in range(ids.shape[1]):
        cache = policies.make_cache(policy, slots)
        tokens = [list(zip(row.tolist(), g.tolist())) for row, g in zip(ids[:, l], gates[:, l])]
        rates.append(np.mean(_serve(cache, tokens)))
    return float(np.mean(rates))


@needs_esft
@pytest.mark.parametrize("slots", [6, 12])
def test_score_beats_lru_on_real_routing(slots):
    """DeepSeek-V2-Lite's real routing (ESFT ``summary``, first 2,000 tokens, 6 layers):
    the router's scores say which experts come back, as the paper found."""
    data = np.load(ESFT)
    ids = data["summary_ids"][:2000, 10:16].astype(np.int64)
    gates = data["summary_weights"][:2000, 10:16].astype(np.float64)
    assert _hit_rate("score", ids, gates, slots) > _hit_rate("lru", ids, gates, slots) + 0.01


# ----------------------------------------------------------------------------- transition prefetch


def test_transition_guesses_come_most_probable_first():
    counts = np.zeros((6, 6))
    counts[0] = [0, 0, 1, 5, 4, 0]  # from expert 0: 3, then 4, then 2
    counts[1] = [0, 0, 3, 0, 3, 4]  # from expert 1: 5, then 2 and 4
    ctx = {"transitions": counts, "top_p": 0.8, "current": [0, 1]}
    # covers: expert 0 -> {3, 4}, expert 1 -> {5, 2, 4}; P: 4 = 0.4 + 0.3, 3 = 0.5, 5 = 0.4, 2 = 0.1 + 0.3
    assert policies.prefetch_transition([], ctx, np.random.default_rng(0)) == [4, 3, 2, 5]


def test_transition_prefetch_fits_the_links_idle_time(tmp_path):
    """Layer 0 runs both of its experts on the CPU (2c seconds), during which the link is
    idle; the transition prefetcher names five experts of layer 1, more than 2c carries, so
    only the most probable that fit in 2c are fetched, whole int8 experts of x seconds each."""
    model = _tiny_model(tmp_path, experts=8, top_k=2)
    _, hw = load_profile("desktop-4090")
    follow = [[2, 3], [2, 4], [2, 5], [6, 7]]  # layer 1 after layer 0's [0, 1], one token per sequence
    ids = np.array([[[0, 1], f] for f in follow])  # [T=4, L=2, K=2]
    trace = Trace(expert_ids=ids, seq_lens=np.ones(4, np.int64), phase=np.full(4, DECODE, np.uint8), num_experts=8,
                  layer_map=(0, 1))
    plan = _plan(model, [
        {"home": (CPU,) * 8, "format": ("bf16",) * 8, "site": ("local",) * 8},
        {"home": (CPU,) * 8, "format": ("int8",) * 8, "site": ("fetch",) * 8, "cache_slots": 8, "cache_device": GPU},
    ])
    report = simulate(plan, hw, model, trace, SimConfig(requests=1, prefetch="transition", record=True))

    wb = model.expert_bytes("int8")
    c = expert_call_s(hw.devices[CPU], "bf16", model.expert_bytes("bf16"), model.expert_flops_per_token, 1)
    x = hw.route(CPU, GPU).transfer_s(wb)
    idle = 2 * c  # layer 0's compute; it fetches nothing itself
    # 2 follows 0 and 1 three times in eight, then 3, 4, 5 and 6 once each (top-p 0.8 of 2..7)
    uncapped = [2, 3, 4, 5, 6]
    fit = int(idle // x)
    assert 0 < fit < len(uncapped) and len(uncapped) * x > idle  # uncapped, the link could not carry them
    issued = [what for _, actor, what in report.events if actor == "prefetcher"]
    assert issued == [f"L1E{e}" for e in uncapped[:fit]]
    assert report.metrics["bytes_moved"] == {"dram": pytest.approx(fit * wb)}  # and nothing else moved
    assert fit * x <= idle
    assert report.metrics["hit_rate"] == [None, 1.0]  # the token's 2 and 3 were among them


# ----------------------------------------------------------------------------- the plan


def test_plan_records_every_simulator_policy():
    fields = Plan.model_fields
    assert sorted(get_args(fields["eviction"].annotation)) == sorted(policies.EVICTION)
    assert sorted(get_args(fields["prefetch"].annotation)) == sorted(policies.PREFETCH)
