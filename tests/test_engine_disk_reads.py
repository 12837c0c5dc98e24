"""A disk miss priced as the bundle runtime pays it (issue 14): a fixed cost per expert read
(opening it, the reading calls, an ONNX Runtime session built over it) plus its bytes at a
fraction of the drive's rate. The engine probe measures both at two or more expert sizes
(:func:`fit_miss_costs`); with one size the fixed part hid in the rate, and a miss of half
the bytes was priced at half the time. No wall-clock assertions.
"""

from __future__ import annotations

import pytest
import simpy
import yaml

from exporters.engine_probe import TINY, ProbeSettings, fit_miss_costs, engine_profile_doc
from profiles.engines import ENGINES_DIR, load_engine
from profiles.hardware import load_profile
from simulator.resources import Network
from tests.test_engine_probe import result

FIXED, PER_BYTE = 1.2e-3, 2.5e-9  # seconds, seconds per byte (0.4 GB/s)


def test_fit_separates_the_fixed_cost_from_the_cost_per_byte():
    samples = [(b, FIXED + b * PER_BYTE) for b in (0.5e6, 2e6, 7e6)]
    fixed, per_byte = fit_miss_costs(samples)
    assert fixed == pytest.approx(FIXED, rel=1e-9)
    assert per_byte == pytest.approx(PER_BYTE, rel=1e-9)
    # the old single-size figure: one rate through the origin, right at its own size only
    one_rate = samples[-1][1] / samples[-1][0]
    assert 0.5e6 * one_rate < 0.6 * samples[0][1]


def test_fit_never_gives_a_negative_fixed_cost():
    samples = [(1e6, 1.0e-3), (2e6, 2.3e-3), (4e6, 4.9e-3)]  # a line through below the origin
    fixed, per_byte = fit_miss_costs(samples)
    assert fixed == 0.0
    assert per_byte == pytest.approx(sum(b * t for b, t in samples) / sum(b * b for b, _ in samples))


def test_fit_without_a_positive_cost_per_byte_falls_back_to_one_rate():
    samples = [(1e5, 3.0e-3), (2e5, 2.8e-3)]  # noise larger than the bytes' cost: the slope comes out negative
    fixed, per_byte = fit_miss_costs(samples)
    assert fixed == 0.0 and per_byte == pytest.approx((1e5 * 3.0e-3 + 2e5 * 2.8e-3) / (1e10 + 4e10))


def test_fit_needs_two_sizes():
    with pytest.raises(ValueError, match="two sizes"):
        fit_miss_costs([(1e6, 2e-3), (1e6, 2.1e-3)])


def test_probe_settings_time_misses_at_two_sizes_or_more():
    assert len(set(ProbeSettings().disk_sizes)) >= 2
    assert len(set(TINY.disk_sizes)) >= 2


def engine_with_overhead(tmp_path, seconds: str = "1.5ms", fraction: float = 0.4):
    doc = yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text())
    doc["disk_read_fraction"] = {"value": fraction, "source": "probe (test)"}
    doc["disk_read_overhead_s"] = {"value": seconds, "source": "probe (test)"}
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_engine(path)


def test_a_disk_read_pays_the_fixed_cost_once_and_its_bytes_at_the_fraction(tmp_path):
    _, hw = load_profile("desktop-4090")
    nvme = next(d for d in hw.devices.values() if d.kind == "nvme")
    disk = hw.memory_of(nvme.id).id
    gpu = next(d for d in hw.devices.values() if d.kind == "gpu")
    cpu = next(d for d in hw.devices.values() if d.kind == "cpu")
    dram, hbm = hw.memory_of(cpu.id).id, hw.memory_of(gpu.id).id
    (tmp_path / "plain").mkdir()
    plain, priced = engine_with_overhead(tmp_path / "plain", "0us"), engine_with_overhead(tmp_path)
    hw0, hw1 = plain.apply(hw), priced.apply(hw)
    for n_bytes in (0.5e6, 4e6):
        for dst in (dram, hbm):
            assert hw1.route(disk, dst).transfer_s(n_bytes) - hw0.route(disk, dst).transfer_s(n_bytes) == \
                pytest.approx(1.5e-3, rel=1e-9)
        # the simulator's network prices the same route the same way
        net0, net1 = Network(simpy.Environment(), hw0), Network(simpy.Environment(), hw1)
        assert net1.transfer_s(disk, dram, n_bytes) - net0.transfer_s(disk, dram, n_bytes) == \
            pytest.approx(1.5e-3, rel=1e-9)
    assert hw1.route(dram, hbm).transfer_s(4e6) == hw0.route(dram, hbm).transfer_s(4e6)  # no drive: untouched
    # a miss of 8x the bytes costs less than 8x: the fixed part is paid once per read
    small, big = (hw1.route(disk, dram).transfer_s(b) for b in (0.5e6, 4e6))
    assert big < 8 * small


def test_written_profile_carries_the_fixed_cost_of_the_page_cache_state_asked(tmp_path):
    from profiles.probe import Figure

    base = yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text())
    res = result()
    res = type(res)(**{**res.__dict__, "disk_overheads": {"cold": Figure(2.0e-3, "probe (cold fixed, test)"),
                                                          "warm": Figure(0.7e-3, "probe (warm fixed, test)")}})
    for state, seconds in (("cold", 2.0e-3), ("warm", 0.7e-3)):
        path = tmp_path / f"{state}.yaml"
        path.write_text(yaml.safe_dump(engine_profile_doc(res, base, state), sort_keys=False))
        read = load_engine(path).profile.disk_read_overhead_s
        assert read.value == pytest.approx(seconds)
        assert read.source.startswith("probe (")


def test_reprobing_the_bundled_profile_changes_only_the_probed_lines():
    from exporters.engine_probe import engine_profile_text
    from profiles.probe import Figure

    text = (ENGINES_DIR / "bundle.yaml").read_text()
    base = yaml.safe_load(text)
    res = result()
    res = type(res)(**{**res.__dict__, "disk_overheads": {"cold": Figure(2.0e-3, "probe (cold fixed, test)")}})
    doc = engine_profile_doc(res, base)
    out = engine_profile_text(doc, res, text)
    assert yaml.safe_load(out) == doc  # what was asked is what loads
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert comments and all(c in out.splitlines() for c in comments)  # the file's comments stay
    changed = set(out.splitlines()) - set(text.splitlines())
    # 2 cpu overheads, the per-token cost (a new line), 2 step overheads, read fraction, fixed read cost, probe source
    assert len(changed) == 8
    lines = out.splitlines()
    call = next(i for i, line in enumerate(lines) if line.startswith("  expert_call_overhead_s:")
                and i > lines.index("cpu:"))
    assert lines[call + 1].startswith("  token_overhead_s: {value: 21.0us")  # in the cpu section, after the call cost
    fraction = next(i for i, line in enumerate(lines) if line.startswith("disk_read_fraction:"))
    assert lines[fraction + 1].startswith("disk_read_overhead_s:")
    assert engine_profile_text(doc, res).startswith("# planner engines probe")  # no previous file: the whole document


def test_a_probed_miss_is_made_ready_on_the_copy_worker_and_its_first_call_counts(tmp_path, monkeypatch):
    """As PlannedExperts pays a miss: the read and the session build on the runtime's copy
    worker (the main thread hands it over and waits), then the fresh session's first call on
    the main thread; the steady call after it is returned, to be left out of the miss."""
    import threading

    from exporters import engine_probe_disk
    from exporters.runtime import kernels

    built, runs = [], []
    init, run = kernels.CpuLayerKernel.__init__, kernels.CpuLayerKernel.run

    def recording_init(self, *args, **kwargs):
        built.append(threading.current_thread().name)
        init(self, *args, **kwargs)

    def recording_run(self, xs):
        runs.append((threading.current_thread() is threading.main_thread(), {e: x.shape for e, x in xs.items()}))
        return run(self, xs)

    monkeypatch.setattr(kernels.CpuLayerKernel, "__init__", recording_init)
    monkeypatch.setattr(kernels.CpuLayerKernel, "run", recording_run)
    miss = engine_probe_disk._miss_reader(tmp_path / "experts.safetensors", 64, 2, "int8", "cpu")
    try:
        steady = miss(1)
    finally:
        miss.close()
    assert len(built) == 1 and built[0].startswith("expert-fetch")
    assert runs == [(True, {0: (1, 64)}), (True, {0: (1, 64)})]  # first call, then the steady one
    assert steady > 0
    # the steady call's seconds are left out of the timed miss
    assert engine_probe_disk._timed(tmp_path / "experts.safetensors", lambda: 10.0, drop=False) < 0
