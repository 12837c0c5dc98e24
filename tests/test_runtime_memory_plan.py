"""The planner counts what an engine's runtime holds besides the weights it places
(engine profile ``runtime_memory``, planner.costs.runtime_memory), in one place: the fixed
workspace that the ILP, the baselines and the plan's memory report share."""

from __future__ import annotations

import dataclasses

import pytest

from planner.costs import capacity, fixed_costs, runtime_memory
from planner.optimize import OptimizeRequest, optimize
from profiles.engines import load_engine

MiB = 2**20
PROFILE = """\
name: cpu-box
nodes:
  - name: node
    devices:
      - name: cpu0
        kind: cpu
        cores: 16
        memory_bytes: 6GiB
        memory_bytes_per_s: 50GB/s
        peak_ops_per_s: {fp32: 1TFLOPS, bf16: 1TFLOPS, int8: 2TOPS}
        kernel_bytes_factor: {int8: 1.5, int4: 1.25}
      - name: nvme0
        kind: nvme
        memory_bytes: 1TB
        memory_bytes_per_s: 3GB/s
        links:
          - {kind: pcie, to: cpu0, gen: 4, lanes: 4}
"""


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """The olmoe preset planned on a CPU box whose memory holds part of it: with the bundle
    profile as bundled, and with its runtime_memory block left out."""
    tmp = tmp_path_factory.mktemp("box")
    (tmp / "box.yaml").write_text(PROFILE)
    bundle = load_engine("bundle")
    without = tmp / "bare-bundle.yaml"
    import yaml

    doc = bundle.profile.model_dump(mode="json", exclude_none=True)
    doc.pop("runtime_memory")
    without.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = {}
    for name, engine in (("counted", None), ("uncounted", str(without))):
        out[name] = optimize(OptimizeRequest(hardware=str(tmp / "box.yaml"), model="olmoe-1b-7b", context_tokens=256,
                                             engine=engine))
    return out


def test_staging_and_the_runtimes_own_memory_by_hand(plans):
    s = plans["counted"].setup
    spec = s.engine.profile.runtime_memory
    assert s.compute.kind == "cpu" and set(s.formats) == {"bf16", "int8", "int4"}
    eb = {fm: s.model.expert_bytes(fm) for fm in s.formats}
    # a staged int8 expert is held twice over while its session is built: 1 + 1.5
    staged = spec.staging_experts.value * max(eb["bf16"], eb["int8"] * 2.5, eb["int4"] * 2.25)
    build = spec.session_build_experts.value * s.model.num_experts * eb["int8"]
    own = spec.fixed_bytes.value + spec.workspace_experts.value * eb["bf16"]
    assert runtime_memory(s) == pytest.approx((max(staged, build), own))
    fc = fixed_costs(s, "bf16")
    assert (fc.staging_bytes, fc.runtime_bytes) == pytest.approx(runtime_memory(s))
    activations = fixed_costs(dataclasses.replace(s, engine=None), "bf16").workspace_bytes
    assert fc.workspace_bytes == pytest.approx(activations + fc.staging_bytes + fc.runtime_bytes)


def test_the_plan_leaves_that_room_free(plans):
    counted, uncounted = (plans[k].plan for k in ("counted", "uncounted"))
    staging, own = runtime_memory(plans["counted"].setup)
    assert runtime_memory(plans["uncounted"].setup) == (0.0, 0.0)
    use, bare = (p.memory[p.compute_device] for p in (counted, uncounted))
    assert use.workspace_bytes - bare.workspace_bytes == pytest.approx(staging + own)
    # the ILP's capacity row held it: everything counted, the staging and own memory with it,
    # within the device's usable bytes
    s = plans["counted"].setup
    assert use.used_bytes <= capacity(s, s.hardware.memory_of(s.compute.id).id) + 1.0


def test_a_gpu_keeps_only_the_staged_experts_free():
    """On a GPU the staged experts land in its memory; the process's own memory is host
    memory (the host reserve's), so the GPU's plan counts only the staging."""
    plan = optimize(OptimizeRequest(hardware="desktop-4090", model="mixtral-8x7b", context_tokens=512))
    s = plan.setup
    staging, own = runtime_memory(s)
    assert s.compute.kind == "gpu" and own == 0.0
    assert staging == pytest.approx(s.engine.profile.runtime_memory.staging_experts.value
                                    * max(s.model.expert_bytes(fm) for fm in s.formats))
