"""The synthetic generator: determinism, shapes, each knob moving its statistic, bad knobs,
and `planner trace synth` from explicit knobs.

Legend: T = tokens, L = MoE layers, E = experts, K = top-k.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from profiles.errors import InputError
from profiles.workload.hitrate import lru_curve
from profiles.workload.stats import (
    expert_frequency,
    next_layer_predictability,
    previous_token_overlap,
    routing_entropy_bits,
)
from profiles.workload.synthetic import (
    MAX_INCLUSION,
    SyntheticWorkload,
    generate,
    inclusion_probabilities,
    lognormal_shares,
    type_layout,
)
from profiles.workload.trace import DECODE, PREFILL, load_trace, save_trace

SMALL = SyntheticWorkload(num_layers=6, num_experts=16, top_k=2, num_sequences=24, prompt_tokens=30, output_tokens=10,
                          seed=5)
# knobs held apart so that one statistic moves at a time
QUIET = dict(num_layers=8, num_experts=32, top_k=4, skew=0.6, temporal=0.0, affinity=0.0, num_sequences=64,
             prompt_tokens=24, output_tokens=8, seed=1)


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over layers of the total variation between two [L, E] share tables."""
    a = a / a.sum(axis=1, keepdims=True)
    b = b / b.sum(axis=1, keepdims=True)
    return float(0.5 * np.abs(a - b).sum(axis=1).mean())


def test_same_knobs_same_file_byte_for_byte(tmp_path):
    a = save_trace(generate(SMALL), tmp_path / "a.npz")
    b = save_trace(generate(SMALL), tmp_path / "b.npz")
    c = save_trace(generate(SMALL.with_(seed=6)), tmp_path / "c.npz")
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_shapes_phases_and_gates():
    w = SMALL.with_(layer_map=(1, 2, 3, 4, 5, 6), num_shared_experts=2, model="toy")
    t = generate(w)
    T = 24 * 40
    assert t.expert_ids.shape == (T, 6, 2) and t.gate_weights.shape == (T, 6, 2)
    assert t.seq_lens.tolist() == [40] * 24 and t.num_experts == 16
    assert t.layer_map == (1, 2, 3, 4, 5, 6) and t.model == "toy"
    first = t.phase[:40]
    assert (first[:30] == PREFILL).all() and (first[30:] == DECODE).all()
    assert (t.phase == DECODE).sum() == 24 * 10
    # raw softmax weights: positive, at most 1 in total, rank 0 = the largest (top-1)
    g = t.gate_weights
    assert (g > 0).all() and (g.sum(axis=2) <= 1 + 1e-5).all()
    assert (np.diff(g, axis=2) <= 0).all()
    assert t.meta["num_shared_experts"] == 2 and t.meta["knobs"]["temporal"] == SMALL.temporal
    assert "popularity" not in t.meta["knobs"]  # a [L][E] table does not belong in the meta line


def test_round_trip_through_the_file(tmp_path):
    t = generate(SMALL)
    back = load_trace(save_trace(t, tmp_path / "t.npz"))
    assert np.array_equal(back.expert_ids, t.expert_ids) and np.array_equal(back.seq_lens, t.seq_lens)
    assert back.meta["knobs"]["seed"] == 5


@pytest.mark.parametrize("shape", [dict(num_layers=1, num_experts=4, top_k=4), dict(num_layers=3, num_experts=5, top_k=1),
                                   dict(num_layers=2, num_experts=8, top_k=2, prompt_tokens=0, output_tokens=1)])
def test_edge_shapes(shape):
    w = SyntheticWorkload(**{"num_sequences": 5, "prompt_tokens": 3, "output_tokens": 2, **shape})
    t = generate(w)  # the Trace validates K distinct ids in range per token and layer
    assert t.expert_ids.shape == (w.num_tokens, w.num_layers, w.top_k)


def test_zero_and_shared_experts_are_recorded():
    t = generate(SMALL.with_(num_zero_experts=3, num_shared_experts=1))
    assert t.meta["num_zero_experts"] == 3 and t.meta["zero_expert_ids"] == [13, 15]
    assert t.meta["num_shared_experts"] == 1


def test_skew_concentrates_frequency():
    entropy, top_share = [], []
    for sigma in (0.0, 0.4, 0.8, 1.2):
        t = generate(SyntheticWorkload(**{**QUIET, "skew": sigma}))
        f = expert_frequency(t.expert_ids, t.num_experts)
        entropy.append(routing_entropy_bits(f).mean())
        top_share.append((f.max(axis=1) / f.sum(axis=1)).mean())
    assert all(a > b for a, b in zip(entropy, entropy[1:])), entropy
    assert all(a < b for a, b in zip(top_share, top_share[1:])), top_share
    assert entropy[0] > np.log2(32) - 0.02  # σ = 0: uniform


def test_temporal_raises_reuse_and_lru_hit_rate():
    overlap, lru = [], []
    for tau in (0.0, 0.25, 0.5, 0.75):
        t = generate(SyntheticWorkload(**{**QUIET, "temporal": tau}))
        overlap.append(previous_token_overlap(t.expert_ids, t.seq_lens).mean())
        lru.append(lru_curve(t.expert_ids, t.num_experts)[:, 8].mean())
    assert all(a < b for a, b in zip(overlap, overlap[1:])), overlap
    assert all(a < b for a, b in zip(lru, lru[1:])), lru
    # each previous expert is kept with chance τ, and may be drawn again besides
    assert overlap[2] >= 0.5


def test_affinity_raises_next_layer_predictability():
    recall = []
    for alpha in (0.0, 0.4, 0.8, 1.0):
        t = generate(SyntheticWorkload(**{**QUIET, "affinity": alpha}))
        recall.append(next_layer_predictability(t.expert_ids, t.num_experts, seq_lens=t.seq_lens).recall.mean())
    assert all(a < b for a, b in zip(recall, recall[1:])), recall
    assert recall[-1] > 0.7


def test_frequencies_follow_the_given_shares_whatever_the_other_knobs():
    rng = np.random.default_rng(0)
    shares = rng.dirichlet(np.full(32, 0.7), size=8)  # a skewed layer each
    base = SyntheticWorkload(**{**QUIET, "popularity": tuple(map(tuple, shares)), "num_sequences": 256})
    for knobs in (dict(), dict(temporal=0.3), dict(affinity=0.9), dict(temporal=0.2, affinity=0.8)):
        t = generate(base.with_(**knobs))
        # sampling alone leaves about 0.02 at 8,192 tokens
        assert _tv(expert_frequency(t.expert_ids, 32).astype(float), shares) < 0.035, knobs


def test_affinity_dependence_does_not_fade_with_layer_distance():
    t = generate(SyntheticWorkload(**{**QUIET, "affinity": 1.0, "num_layers": 12, "num_sequences": 128}))
    ids = t.expert_ids[:, :, 0].astype(np.int64)  # top-1 experts

    def agreement(a: int, b: int) -> float:
        # share of tokens whose top-1 pair (a, b) is the most common partner of its top-1 at a
        joint = np.zeros((32, 32))
        np.add.at(joint, (ids[:, a], ids[:, b]), 1)
        return float(joint.max(axis=1).sum() / joint.sum())

    near, far = agreement(0, 1), agreement(0, 11)
    assert near > 0.3 and far > 0.8 * near


def test_lognormal_shares_and_inclusion_caps():
    assert np.allclose(lognormal_shares(8, 0.0), 1 / 8)
    s = lognormal_shares(64, 1.0)
    assert abs(s.sum() - 1) < 1e-12 and (np.diff(s) < 0).all()
    assert lognormal_shares(64, 1.5)[0] > s[0]
    pi = inclusion_probabilities(np.array([[10.0, 1.0, 1.0, 1.0, 1.0]]), top_k=2)  # 2 x 10/14 > 1
    assert pi.max() <= MAX_INCLUSION + 1e-12 and abs(pi.sum() - 2) < 1e-9
    assert np.allclose(pi[0, 1:], (2 - MAX_INCLUSION) / 4)  # the excess spread evenly over equal shares


def test_every_expert_is_named_by_its_share_of_types():
    rng = np.random.default_rng(3)
    pi = inclusion_probabilities(rng.dirichlet(np.ones(10), size=2), top_k=3)
    order, ends = type_layout(pi, 3, rng)
    assert np.allclose(ends[:, -1], 3)
    u = (np.arange(20_000) + 0.5) / 20_000  # types spread evenly over [0, 1)
    for layer in range(2):
        slots = np.searchsorted(ends[layer], u[:, None] + np.arange(3), side="right")
        named = order[layer][np.minimum(slots, 9)]
        assert (np.sort(named, axis=1)[:, 1:] != np.sort(named, axis=1)[:, :-1]).all()  # K distinct
        freq = np.bincount(named.ravel(), minlength=10) / len(u)
        assert np.allclose(freq, pi[layer], atol=2e-4)


BAD_KNOBS = [
    ("num_layers", dict(num_layers=0)),
    ("num_experts", dict(num_experts=-1)),
    ("top_k", dict(top_k=20)),
    ("num_sequences", dict(num_sequences=0)),
    ("num_layers", dict(num_layers=True)),
    ("temporal", dict(temporal=-0.1)),
    ("temporal", dict(temporal=float("nan"))),
    ("affinity", dict(affinity=1.5)),
    ("skew", dict(skew=-1.0)),
    ("skew", dict(skew=(0.5, 0.5))),
    ("skew", dict(skew="steep")),
    ("popularity", dict(popularity=((1.0, 2.0),))),
    ("popularity", dict(popularity=tuple((-1.0,) * 16 for _ in range(6)))),
    ("popularity", dict(popularity=tuple((0.0,) * 16 for _ in range(6)))),
    ("prompt_tokens", dict(prompt_tokens=0, output_tokens=0)),
    ("output_tokens", dict(output_tokens=-1)),
    ("num_zero_experts", dict(num_zero_experts=16)),
    ("seed", dict(seed=-3)),
    ("layer_map", dict(layer_map=(0, 1))),
]


@pytest.mark.parametrize("key,knobs", BAD_KNOBS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD_KNOBS)])
def test_bad_knobs_are_one_line_input_errors(key, knobs):
    with pytest.raises(InputError) as err:
        SMALL.with_(**knobs)
    assert err.value.key == key
    assert "\n" not in str(err.value) and "expected" in str(err.value)


def test_lists_from_json_are_accepted():
    w = SyntheticWorkload(num_layers=2, num_experts=4, top_k=2, skew=[0.1, 0.2], popularity=None,
                          layer_map=[3, 4], num_sequences=2, prompt_tokens=2, output_tokens=0)
    assert w.skew == (0.1, 0.2) and w.layer_map == (3, 4)
    hash(w)


# ----------------------------------------------------------------------------- CLI, explicit knobs


def test_cli_synth_from_knobs(run_cli, tmp_path):
    out = tmp_path / "t.npz"
    r = run_cli("trace", "synth", "--layers", "4", "--experts", "8", "--top-k", "2", "--skew", "0.3",
                "--temporal", "0.2", "--affinity", "0.5", "--sequences", "10", "--prompt-tokens", "6",
                "--output-tokens", "2", "--seed", "7", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["written"] == str(out) and data["tokens"] == 80 and data["moe_layers"] == 4
    assert data["knobs"] == {"temporal": 0.2, "affinity": 0.5, "skew": 0.3, "seed": 7}
    t = load_trace(out)
    assert t.expert_ids.shape == (80, 4, 2) and (t.phase == DECODE).sum() == 20
    # the same options give the same file
    again = tmp_path / "u.npz"
    run_cli("trace", "synth", "--layers", "4", "--experts", "8", "--top-k", "2", "--skew", "0.3",
            "--temporal", "0.2", "--affinity", "0.5", "--sequences", "10", "--prompt-tokens", "6",
            "--output-tokens", "2", "--seed", "7", "--out", again)
    assert out.read_bytes() == again.read_bytes()


def test_cli_synth_never_overwrites_without_force(run_cli, tmp_path):
    out = tmp_path / "t.npz"
    out.write_bytes(b"precious")
    args = ("trace", "synth", "--layers", "2", "--experts", "4", "--top-k", "1", "--sequences", "2", "--out", out)
    r = run_cli(*args)
    assert r.exit_code == 1 and "output file exists" in r.output and "--force" in r.output
    assert out.read_bytes() == b"precious"
    assert run_cli(*args, "--force").exit_code == 0
    assert load_trace(out).num_layers == 2


@pytest.mark.parametrize("args,words", [
    (("--experts", "8", "--top-k", "2"), "--layers"),
    (("--layers", "2", "--experts", "8", "--top-k", "2", "--temporal", "1.5"), "--temporal"),
    (("--layers", "2", "--experts", "8", "--top-k", "2", "--affinity", "-1"), "--affinity"),
    (("--layers", "2", "--experts", "8", "--top-k", "9"), "top_k"),
    (("--layers", "3", "--experts", "8", "--top-k", "2", "--skew", "0.1,0.2"), "--skew"),
    (("--layers", "3", "--experts", "8", "--top-k", "2", "--skew", "steep"), "--skew"),
    (("--model", "mixtral-8x7b", "--layers", "3"), "--layers"),
    (("--model", "no-such-model",), "no-such-model"),
])
def test_cli_synth_bad_input_is_one_line_exit_1(run_cli, tmp_path, args, words):
    r = run_cli("trace", "synth", *args, "--out", tmp_path / "t.npz")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and words in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "t.npz").exists()


def test_cli_synth_output_must_be_npz(run_cli, tmp_path):
    r = run_cli("trace", "synth", "--layers", "2", "--experts", "4", "--top-k", "1", "--out", tmp_path / "t.json")
    assert r.exit_code == 1 and ".npz" in r.output


def test_record_is_attached(run_cli):
    from planner.commands.trace import trace

    assert {"stats", "import", "synth", "record"} <= set(trace.commands)
    r = run_cli("trace", "record", "--help")
    assert r.exit_code == 0 and "--prompts" in r.output
