"""DeepSeek EPLB in numpy (planner/eplb.py) and vLLM's static placements."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.eplb import (
    PLACEMENTS,
    balanced_packing,
    linear_placement,
    rebalance_experts,
    replicate_experts,
    round_robin_placement,
)
from profiles.errors import InputError

# The published example (DeepSeek's EPLB README; ../shared/REFERENCE.md).
WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
           [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_published_example_gives_the_published_phy2log():
    phy2log, log2phy, logcnt = rebalance_experts(np.array(WEIGHT), 16, 4, 2, 8)
    assert phy2log.tolist() == PHY2LOG
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    assert log2phy.shape == (2, 12, 2)
    assert log2phy[0].tolist() == [[12, -1], [15, 13], [11, -1], [6, -1], [7, 5], [0, 2], [1, -1], [3, -1],
                                   [4, -1], [9, -1], [8, 10], [14, -1]]


def test_hierarchical_keeps_each_group_on_one_node():
    phy2log, _, _ = rebalance_experts(np.array(WEIGHT), 16, 4, 2, 8)
    group_of = phy2log // 3  # 4 groups of 3 experts
    for layer in group_of:
        node0, node1 = set(layer[:8].tolist()), set(layer[8:].tolist())
        assert not node0 & node1 and len(node0) == len(node1) == 2


def test_groups_that_do_not_divide_over_nodes_fall_back_to_global():
    w = np.array(WEIGHT)
    assert (rebalance_experts(w, 16, 3, 2, 8)[0] == rebalance_experts(w, 16, 1, 1, 8)[0]).all()
    assert (PLACEMENTS["eplb-global"](w, 16, 4, 2, 8) == rebalance_experts(w, 16, 1, 1, 8)[0]).all()


def test_replicate_adds_copies_to_the_largest_load_per_copy():
    phy2log, rank, logcnt = replicate_experts(np.array([[10.0, 4.0, 3.0]]), 5)
    assert phy2log.tolist() == [[0, 1, 2, 0, 0]]  # 10/2 = 5 still beats 4, so expert 0 gets both copies
    assert rank.tolist() == [[0, 0, 0, 1, 2]]
    assert logcnt.tolist() == [[3, 1, 1]]


def test_balanced_packing_gives_equal_counts_heaviest_first():
    pack, rank = balanced_packing(np.array([[5.0, 4.0, 3.0, 2.0]]), 2)
    assert pack.tolist() == [[0, 1, 1, 0]]
    assert rank.tolist() == [[0, 0, 1, 1]]


def test_vllm_linear_and_round_robin():
    w = np.ones((1, 6))
    assert linear_placement(w, 8, num_gpus=4).tolist() == [[0, 1, 2, 3, 4, 5, 0, 1]]
    # GPU g holds linear entries g, g + 4: GPU0 = (0, 4), GPU1 = (1, 5), GPU2 = (2, 0), GPU3 = (3, 1)
    assert round_robin_placement(w, 8, num_gpus=4).tolist() == [[0, 4, 1, 5, 2, 0, 3, 1]]


@pytest.mark.parametrize("replicas,gpus,nodes", [(10, 4, 1), (7, 8, 1), (16, 8, 3)])
def test_bad_shapes_are_input_errors(replicas, gpus, nodes):
    with pytest.raises(InputError) as err:
        rebalance_experts(np.ones((1, 8)), replicas, 1, nodes, gpus)
    assert "\n" not in str(err.value)


def test_negative_load_is_an_input_error():
    with pytest.raises(InputError, match="non-negative"):
        rebalance_experts(-np.ones((1, 4)), 4, 1, 1, 2)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([(8, 16, 4, 2, 4), (16, 24, 4, 2, 8), (12, 12, 4, 4, 4)]))
def test_every_expert_placed_and_maps_agree(seed, shape):
    E, R, groups, nodes, gpus = shape
    w = np.random.default_rng(seed).lognormal(size=(3, E))
    phy2log, log2phy, logcnt = rebalance_experts(w, R, groups, nodes, gpus)
    assert phy2log.shape == (3, R) and logcnt.sum(1).tolist() == [R] * 3
    for l in range(3):
        assert np.bincount(phy2log[l], minlength=E).tolist() == logcnt[l].tolist()
        for e in range(E):
            slots = log2phy[l, e][log2phy[l, e] >= 0]
            assert len(slots) == logcnt[l, e] and (phy2log[l, slots] == e).all()
