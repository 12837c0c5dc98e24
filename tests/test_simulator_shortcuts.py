"""The simulator's shortcuts give the results of the long way, float for float.

Each shortcut is held against the code it stands in for: a contended layer replayed without
events (:mod:`simulator.contention`) against SimPy's processes, the LRU cache serving a
step's accesses in one loop against access by access, the step's routing in numpy against
a plain loop, expert-call prices by the array against :func:`profiles.perf.expert_call_s`.
The golden files (``test_simulator_golden.py``) hold the whole results; these say which
shortcut broke.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from profiles.engines import load_engine
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.perf import expert_call_s
from profiles.workload.defaults import default_workload
from simulator.engine import SimConfig, Simulation
from simulator.lru_steps import serve_lru_step
from simulator.policies import ExpertCache, LRUCache
from simulator.routing import route_step
from test_simulator import _decode_only, _hand_plan


class _Replays(Simulation):
    """Counts the layers replayed without events."""

    def _worked_out(self, *args):
        end = super()._worked_out(*args)
        self.replayed = getattr(self, "replayed", 0) + (end is not None)
        return end


class _Processes(Simulation):
    """Plays every contended layer out with SimPy processes."""

    def _worked_out(self, *args):
        return None


@pytest.mark.parametrize("batch", [1, 3])
def test_contended_layers_replay_as_processes_play_them(batch):
    """Half of each layer's experts fetched from host memory, half computed by the CPU: the
    CPU's results come back over the PCIe direction the fetches use."""
    model = load_model("mixtral-8x7b")
    trace = default_workload(model).subset_sequences([0, 1, 2])
    if batch == 1:
        trace = _decode_only(trace)
    cpu = "node/cpu0"
    layer = {"home": (cpu,) * 8, "format": ("int4",) * 8, "site": ("fetch",) * 4 + ("local",) * 4}
    plan = _hand_plan(model, "desktop-3060", [layer] * model.num_moe_layers)
    hw = load_engine(plan.inputs.engine).apply(load_profile("desktop-3060")[1])
    cfg = SimConfig(batch_size=batch)
    fast = _Replays(plan, hw, model, trace, cfg)
    fast_report = fast.run()
    assert fast.replayed > 10
    assert fast_report.metrics == _Processes(plan, hw, model, trace, cfg).run().metrics


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(0, 5), E=st.integers(2, 9), K=st.integers(1, 3), seed=st.integers(0, 10**6),
       tokens=st.integers(1, 12))
def test_lru_serves_a_step_as_access_by_access(slots, E, K, seed, tokens):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, E + 2, size=(tokens, K)).tolist()  # ids >= E: zero experts
    wanted = frozenset(e for e in range(E) if rng.random() < 0.7)
    one_loop, by_access = LRUCache(slots), LRUCache(slots)
    for _ in range(3):  # a few steps: the cache carries over
        got = one_loop.serve(ids, None, np.arange(tokens), K, E, wanted)
        want = ExpertCache.serve(by_access, ids, None, np.arange(tokens), K, E, wanted)
        assert got == want
        assert list(one_loop.items) == list(by_access.items)
        ids = rng.integers(0, E + 2, size=(tokens, K)).tolist()


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(0, 5), E=st.integers(2, 9), K=st.integers(1, 3), seed=st.integers(0, 10**6),
       tokens=st.integers(1, 12))
def test_lru_serving_every_access_is_serving_them_all_wanted(slots, E, K, seed, tokens):
    # wanted=None (every id routed and cached: simulator.one_pass._fetch_layer) skips the test per access
    rng = np.random.default_rng(seed)
    every, tested = LRUCache(slots), LRUCache(slots)
    for _ in range(4):  # a few steps: the cache fills, then stays full
        ids = rng.integers(0, E, size=(tokens, K)).tolist()
        assert every.serve(ids, None, np.arange(tokens), K, E, None) == \
            tested.serve(ids, None, np.arange(tokens), K, E, frozenset(range(E)))
        assert list(every.items) == list(tested.items)


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(0, 20), E=st.integers(2, 300), K=st.integers(1, 8), seed=st.integers(0, 10**6),
       tokens=st.integers(128, 600), skew=st.booleans())
def test_lru_serves_a_long_step_in_numpy_as_access_by_access(slots, E, K, seed, tokens, skew):
    """A prefill's thousands of accesses (LONG_STEP or more) are served in numpy
    (simulator.lru_steps), with the same hits, first hits and cache contents as one by one."""
    rng = np.random.default_rng(seed)
    in_numpy, by_access = LRUCache(slots), LRUCache(slots)
    for _ in range(3):  # a few steps: the cache carries over, long and short
        ids = (rng.zipf(1.3, size=(tokens, K)) - 1) % (E + 2) if skew else rng.integers(0, E + 2, size=(tokens, K))
        wanted = frozenset(e for e in range(E) if rng.random() < 0.8)
        got = in_numpy.serve(ids, None, np.arange(tokens), K, E, wanted)
        want = ExpertCache.serve(by_access, ids.tolist(), None, np.arange(tokens), K, E, wanted)
        assert got == want
        assert list(in_numpy.items) == list(by_access.items)
        assert all(type(e) is int for e in in_numpy.items)
        tokens = int(rng.integers(1, 600))


def test_lru_long_steps_are_served_in_numpy():
    """The numpy path is taken (not its fallback) on a step like a prefill of DeepSeek-V3's."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=1536 * 8)
    cache = LRUCache(16)
    assert serve_lru_step(cache.items, 16, x) is not None
    assert len(cache.items) == 16


def _route_by_loop(ids: np.ndarray, gates: np.ndarray, E: int) -> list:
    n, L, K = ids.shape
    out = []
    for l in range(L):
        seen: dict[int, list] = {}
        for t in range(n):
            for k in range(K):
                e = int(ids[t, l, k])
                if e < E:
                    entry = seen.setdefault(e, [0, 0.0])
                    entry[0] += 1
                    entry[1] += float(gates[t, l, k])
        out.append(([e for e in seen], [c for c, _ in seen.values()], [s / c for c, s in seen.values()]))
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), L=st.integers(1, 5), K=st.integers(1, 4), E=st.integers(1, 12),
       seed=st.integers(0, 10**6))
def test_step_routing_is_the_plain_loop(n, L, K, E, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, E + 2, size=(n, L, K)).astype(np.int32)
    gates = rng.random((n, L, K)).astype(np.float32)
    assert route_step(ids, gates, E) == _route_by_loop(ids, gates, E)
    no_gates = route_step(ids, None, E)
    assert [(e, c) for e, c, _ in no_gates] == [(e, c) for e, c, _ in _route_by_loop(ids, gates, E)]


@pytest.mark.parametrize("hw_name, model_name", [("desktop-4090", "deepseek-v3"), ("cpu-server-4090", "mixtral-8x7b"),
                                                 ("laptop-4060", "qwen3-30b-a3b")])
def test_call_prices_by_the_array_are_expert_call_s(hw_name, model_name):
    model = load_model(model_name)
    trace = _decode_only(default_workload(model).subset_sequences([0]))
    layer = {"home": ("node/cpu0",) * model.num_experts, "format": ("int4",) * model.num_experts,
             "site": ("local",) * model.num_experts}
    plan = _hand_plan(model, hw_name, [layer] * model.num_moe_layers)
    hw = load_engine(plan.inputs.engine).apply(load_profile(hw_name)[1])
    sim = Simulation(plan, hw, model, trace, SimConfig())
    for dev in (d for d in hw.devices.values() if d.is_compute):
        for fmt in ("int4", "bf16"):
            table = sim.costs(dev.id, fmt)
            for n in (1, 2, 63, 64, 65, 200, 2500):
                assert table[n] == expert_call_s(dev, fmt, model.expert_bytes(fmt),
                                                 model.expert_flops_per_token * n, n)
