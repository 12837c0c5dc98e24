"""StepAhead._book_block books a run of copies' links after the run: the same floats as one
``Network.account`` per copy (each link's bytes and each bandwidth's seconds added up in copy
order), also across paths that share a bandwidth, a path that crosses one twice, and blocks
left due (``due``) for the caller to add."""

from collections import defaultdict
from types import SimpleNamespace

from simulator.step_ahead import StepAhead, _account


def _path(keys, link_ids, latency_s):
    return SimpleNamespace(keys=keys, link_ids=link_ids, latency_s=latency_s, key_set=frozenset(keys),
                           crosses_once=len(set(keys)) == len(keys) and len(set(link_ids)) == len(link_ids))


def _sim():
    return SimpleNamespace(net=SimpleNamespace(bytes=defaultdict(float), busy_s=defaultdict(float)),
                           bytes_moved=defaultdict(float))


def _stream(free_at_s=0.0):
    return SimpleNamespace(free_at_s=free_at_s, busy_s=0.0)


def _per_copy(sim, compute, router_at, hit_s, misses, secs):
    """The bookings one copy at a time (Network.account and Stream.reserve per copy)."""
    end = router_at
    if hit_s is not None:
        end = compute.free_at_s = max(compute.free_at_s, router_at) + hit_s
        compute.busy_s += hit_s
    engine_free = router_at
    for (_, dur, n_bytes, tier, path, latency_s, _fmt), sec in zip(misses, secs):
        arrived = engine_free + dur
        if path is not None:
            for lid in path.link_ids:
                sim.net.bytes[lid] += n_bytes
            x = arrived - engine_free - latency_s
            for k in path.keys:
                sim.net.busy_s[k] += x
        sim.bytes_moved[tier] += n_bytes
        engine_free = arrived
        done = compute.free_at_s = max(compute.free_at_s, arrived) + sec
        compute.busy_s += sec
        end = max(end, done)
    return end


# copy seconds whose sums depend on their order in floats: 0.1 + 0.2 + 0.3 != 0.3 + 0.2 + 0.1
DURS = [0.1, 0.2, 0.3, 1e-9, 7.3, 0.1]
NVME = _path(("pcie cpu->gpu", "nvme read", "hbm write"), ("pcie0",), 3e-6)
DRAM = _path(("pcie cpu->gpu", "dram read", "hbm write"), ("pcie0",), 1e-6)
TWICE = _path(("pcie cpu->gpu", "pcie cpu->gpu", "hbm write"), ("pcie0", "pcie0"), 2e-6)


def _misses(paths):
    return [(2e-4, dur, 3.5e6 + i, "nvme" if p is NVME else "dram", p, 0.0 if p is None else p.latency_s, "int8")
            for i, (dur, p) in enumerate(zip(DURS, paths))]


def _same(a, b):
    assert dict(a.net.bytes) == dict(b.net.bytes)
    assert dict(a.net.busy_s) == dict(b.net.busy_s)
    assert dict(a.bytes_moved) == dict(b.bytes_moved)


def test_order_matters_for_these_seconds():
    # the test below could not tell a reordering apart otherwise
    assert (0.1 + 0.2) + 0.3 != 0.1 + (0.2 + 0.3)


def test_runs_of_copies_book_as_one_copy_at_a_time():
    for paths in ([NVME] * 6, [NVME, NVME, DRAM, DRAM, NVME, None], [TWICE, NVME, TWICE, TWICE, None, DRAM]):
        misses = _misses(paths)
        secs = [1e-4 * (i + 1) for i in range(len(misses))]
        for hit_s in (None, 5e-5):
            sim, ref = _sim(), _sim()
            sim.net.busy_s["pcie cpu->gpu"] = ref.net.busy_s["pcie cpu->gpu"] = 0.7  # booked before
            c1, c2 = _stream(0.25), _stream(0.25)
            end = StepAhead._book_block(sim, c1, 0.2, hit_s, misses, secs)
            assert end == _per_copy(ref, c2, 0.2, hit_s, misses, secs)
            assert (c1.free_at_s, c1.busy_s) == (c2.free_at_s, c2.busy_s)
            _same(sim, ref)


def test_blocks_left_due_book_as_each_block_at_once():
    first, second = _misses([NVME, NVME, DRAM]), _misses([DRAM, NVME, NVME])
    sim, ref = _sim(), _sim()
    c1, c2 = _stream(), _stream()
    due = [None, [], []]
    end1 = StepAhead._book_block(sim, c1, 0.0, None, first, None, due)
    end2 = StepAhead._book_block(sim, c1, end1, 1e-5, second, None, due)
    assert due[0] is NVME and sim.net.busy_s["nvme read"] != 0.0  # DRAM's run ended the first one
    _account(sim.net.bytes, sim.net.busy_s, *due)
    r1 = _per_copy(ref, c2, 0.0, None, first, [m[0] for m in first])
    r2 = _per_copy(ref, c2, r1, 1e-5, second, [m[0] for m in second])
    assert (end1, end2) == (r1, r2)
    _same(sim, ref)
