"""A miss's host CPU work priced on a CPU compute device (issue 14): the bundle runtime reads a
missed expert and builds its ONNX Runtime session on a copy worker, a thread on the same cores
the CPU compute uses. The engine probe measures that thread's CPU time per miss
(``miss_host_cpu_s``); planner and simulator add it to the compute device's work where the
compute device is that CPU (:func:`profiles.perf.miss_compute_s`), one price for both, and a
GPU compute device's prices do not change."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import yaml

from exporters.engine_probe_disk import expert_reads
from planner.optimize import OptimizeRequest, optimize
from profiles.engines import ENGINES_DIR, load_engine
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.perf import miss_compute_s
from profiles.workload.defaults import default_workload
from profiles.workload.trace import DECODE
from simulator.engine import SimConfig, simulate
from tests.test_cached_expert_price import PROFILE  # the same CPU-only box


def engine(tmp_path, fixed: str | None, per_byte: float = 0.0):
    """The bundled bundle profile, with ``miss_host_cpu_s`` (None: without)."""
    doc = yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text())
    doc.pop("miss_host_cpu_s", None)
    if fixed is not None:
        doc["miss_host_cpu_s"] = {"fixed_s": fixed, "per_byte_s": per_byte, "source": "probe (test)"}
    path = tmp_path / f"bundle-{fixed}-{per_byte}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("miss-cpu")
    hw_path = tmp / "cpu-box.yaml"
    hw_path.write_text(PROFILE)
    model = load_model("olmoe-1b-7b")
    trace = default_workload(model).subset_sequences([0, 1])
    trace = dataclasses.replace(trace, phase=np.full(trace.num_tokens, DECODE, np.uint8))
    return tmp, hw_path, model, trace


def test_a_miss_takes_its_host_cpu_time_from_a_cpu_compute_device_only(tmp_path):
    """Hand-worked: 2 ms + 1 ns/B on a 6.3 MB expert = 8.3 ms; the compute on 8 of the 16
    cores loses half of it; a GPU compute device loses none (a host core does the work)."""
    path = engine(tmp_path, "2ms", 1e-9)
    (tmp_path / "cpu-box.yaml").write_text(PROFILE)
    cpu = load_engine(path).apply(load_profile(str(tmp_path / "cpu-box.yaml"))[1]).devices["node/cpu0"]
    assert cpu.miss_host_cpu_s == (pytest.approx(2e-3), 1e-9)
    assert miss_compute_s(cpu, cpu, 6.3e6) == pytest.approx(8.3e-3)
    assert miss_compute_s(cpu, cpu, 6.3e6, threads=8) == pytest.approx(4.15e-3)
    hw = load_engine(path).apply(load_profile("desktop-4090")[1])
    assert miss_compute_s(hw.devices["node/gpu0"], hw.devices["node/cpu0"], 6.3e6) == 0.0
    bare = load_profile("desktop-4090")[1].devices["node/cpu0"]
    assert bare.miss_host_cpu_s == (0.0, 0.0) and miss_compute_s(bare, bare, 6.3e6) == 0.0


def test_planner_and_simulator_price_a_misss_cpu_work_alike(box):
    """A disk-offloading plan on a CPU-only box whose misses cost 10 ms of the compute's CPU
    each (more than a miss's read: the CPU work, not the drive, bounds the layer): the
    planner's decode step = the simulator's (1%), and it is dearer than the same plan priced
    without that work (simulated on hardware whose engine states none), by about the misses'
    CPU time less what overlaps their reads."""
    tmp, hw_path, model, trace = box
    _, hw = load_profile(str(hw_path))
    path = engine(tmp, "10ms")
    plan = optimize(OptimizeRequest(hardware=str(hw_path), model="olmoe-1b-7b", trace=trace, formats=("int8",),
                                    engine=str(path))).plan
    assert plan.counts()["site"].get("fetch", 0) > 0
    report = simulate(plan, load_engine(path).apply(hw), model, trace, SimConfig(batch_size=1, kv_context="plan"))
    assert report.metrics["decode_step_s"]["mean"] == pytest.approx(plan.predicted["tpot_s"], rel=0.01)
    free = simulate(plan, load_engine(engine(tmp, None)).apply(hw), model, trace,
                    SimConfig(batch_size=1, kv_context="plan"))
    misses = report.metrics["decode_step_s"]["mean"] - free.metrics["decode_step_s"]["mean"]
    assert misses > 1e-3  # the old price left the misses' CPU work out


def test_gpu_compute_prices_do_not_change(tmp_path):
    """The same engine with and without ``miss_host_cpu_s`` on a GPU box: the same plan, the
    same predicted step (the copy worker's core is not the GPU's)."""
    model = load_model("olmoe-1b-7b")
    trace = default_workload(model).subset_sequences([0, 1])
    trace = dataclasses.replace(trace, phase=np.full(trace.num_tokens, DECODE, np.uint8))
    plans = [optimize(OptimizeRequest(hardware="laptop-4060", model="olmoe-1b-7b", trace=trace, formats=("int8",),
                                      engine=str(engine(tmp_path, fixed)))).plan for fixed in (None, "10ms")]
    sites = plans[0].counts()["site"]
    assert sites.get("fetch", 0) + sites.get("hybrid", 0) > 0  # experts copied to the GPU on a miss
    assert plans[0].predicted == plans[1].predicted
    assert [lp.site for lp in plans[0].layers] == [lp.site for lp in plans[1].layers]


def test_the_disk_probe_times_the_copy_workers_cpu_per_miss(tmp_path):
    """``expert_reads`` gives, per page-cache state, the copy worker's thread CPU time of a
    miss at each size and its fit (the engine profile's ``miss_host_cpu_s``), which loads."""
    from exporters.engine_probe import engine_profile_doc
    from profiles.probe import Figure

    _, _, raw = expert_reads(tmp_path, (64, 128), 2, "int8", "cpu", lambda how: f"probe ({how})")
    if not raw:
        pytest.skip("the page cache cannot be dropped here")
    cpu = raw["host_cpu"]["cold"]
    assert [m["bytes"] for m in cpu["misses"]] == [m["bytes"] for m in raw["cold"]["misses"]]
    assert all(m["cpu_s"] > 0 for m in cpu["misses"])  # a session build is CPU work
    assert cpu["fixed_s"] >= 0 and cpu["per_byte_s"] >= 0 and cpu["source"].startswith("probe (")
    from tests.test_dense_linear_cost import probe_result

    res = dataclasses.replace(probe_result(), disk_reads={"cold": Figure(0.3, "probe (test)")},
                              miss_host_cpu=raw["host_cpu"])
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump(engine_profile_doc(res, yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text())),
                                   sort_keys=False))
    stated = load_engine(path).profile.miss_host_cpu_s
    assert stated.fixed_s == pytest.approx(cpu["fixed_s"], rel=1e-3, abs=1e-7)
    assert stated.per_byte_s == pytest.approx(cpu["per_byte_s"], rel=1e-3)
