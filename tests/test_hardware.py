"""Schema, resolution and topology of hardware profiles (the bundled files are tested in
test_hardware_profiles.py)."""

import math
import textwrap

import pytest

from profiles.errors import InputError
from profiles.hardware import PCIE_EFFECTIVE_X16_BYTES_PER_S, load_profile
from profiles.perf import compute_format, expert_call_s


def write(tmp_path, text, name="hw.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


CLUSTER = """
name: two-nodes
switches:
  - {name: ib, kind: switch}
nodes:
  - name: n
    count: 2
    price_per_hour_usd: 10
    devices:
      - {name: cpu0, kind: cpu, cores: 32, memory_bytes: 512GiB, memory_bytes_per_s: 300GB/s,
         peak_ops_per_s: {bf16: 10TFLOPS}}
      - {name: nvsw, kind: switch}
      - name: gpu
        kind: gpu
        count: 4
        memory_bytes: 80GiB
        memory_bytes_per_s: 3.35TB/s
        peak_ops_per_s: {bf16: 989TFLOPS, fp8: 1979TFLOPS}
        links:
          - {kind: pcie, to: cpu0, gen: 5, lanes: 16}
          - {kind: nvlink, to: nvsw, bytes_per_s: 450GB/s}
          - {kind: nic, to: ib, bytes_per_s: 400Gb/s}
      - name: nvme
        kind: nvme
        count: 2
        memory_bytes: 4TB
        memory_bytes_per_s: 7GB/s
        links: [{kind: pcie, to: cpu0, gen: 5, lanes: 4}]
"""


def test_counts_expand_into_named_devices_and_nodes(tmp_path):
    _, hw = load_profile(write(tmp_path, CLUSTER))
    assert hw.nodes == ("n0", "n1")
    gpus = [d.id for d in hw.devices_of_kind("gpu")]
    assert gpus == ["n0/gpu0", "n0/gpu1", "n0/gpu2", "n0/gpu3", "n1/gpu0", "n1/gpu1", "n1/gpu2", "n1/gpu3"]
    assert len(hw.devices_of_kind("nvme")) == 4
    assert hw.price_per_hour_usd == 20
    # every link keeps its identity, so transfers sharing one can be told apart
    assert len({l.id for l in hw.links}) == len(hw.links) == 2 * (4 * 3 + 2)


def test_routes_take_the_fast_path_and_report_the_bottleneck(tmp_path):
    _, hw = load_profile(write(tmp_path, CLUSTER))
    intra = hw.route("n0/gpu0", "n0/gpu3")
    assert [l.kind for l in intra.links] == ["nvlink", "nvlink"]
    assert intra.bottleneck_bytes_per_s == 450e9
    inter = hw.route("n0/gpu1", "n1/gpu2")
    assert [l.kind for l in inter.links] == ["nic", "nic"]
    assert inter.bottleneck_bytes_per_s == 50e9
    host = hw.route("n0/cpu0", "n0/gpu2")
    assert [l.kind for l in host.links] == ["pcie"] and host.bottleneck_bytes_per_s == PCIE_EFFECTIVE_X16_BYTES_PER_S[5]
    disk = hw.route("n1/nvme1", "n1/gpu0")  # the node's two 7 GB/s drives are striped
    assert disk.bottleneck_bytes_per_s == 14e9 and len(disk.links) == 2
    assert disk.transfer_s(14e9) == pytest.approx(1.0 + sum(l.latency_s for l in disk.links))


def test_unified_memory_is_one_pool_and_needs_no_copy(tmp_path):
    path = write(tmp_path, """
        name: soc
        nodes:
          - name: board
            devices:
              - {name: cpu0, kind: cpu, cores: 12, memory_bytes: 64GiB, memory_bytes_per_s: 204.8GB/s,
                 peak_ops_per_s: {fp32: 0.5TFLOPS}}
              - name: gpu0
                kind: gpu
                memory_bytes: 64GiB
                memory_bytes_per_s: 204.8GB/s
                peak_ops_per_s: {fp16: 42TFLOPS}
                links: [{kind: unified, to: cpu0}]
    """)
    _, hw = load_profile(path)
    assert list(hw.memories) == ["board/gpu0"]
    assert hw.memories["board/gpu0"].capacity_bytes == 64 * 2**30
    route = hw.route("board/cpu0", "board/gpu0")
    assert route.links == () and route.transfer_s(1e9) == 0.0


def test_efficiency_defaults_and_measured_points(tmp_path):
    path = write(tmp_path, CLUSTER.replace("peak_ops_per_s: {bf16: 10TFLOPS}}",
                                           "peak_ops_per_s: {bf16: 10TFLOPS},\n"
                                           "         efficiency: {points: [[1, 0.01], [16, 0.2], [256, 0.4]]}}"))
    _, hw = load_profile(path)
    cpu = hw.devices["n0/cpu0"]
    eff = cpu.efficiency
    assert eff.memory_fraction == 0.35  # the CPU default fills what the file leaves out
    assert eff.compute_fraction(1) == 0.01 and eff.compute_fraction(256) == 0.4
    assert eff.compute_fraction(4) == pytest.approx(0.01 + 0.5 * (0.2 - 0.01))  # log2-linear halfway
    gpu = hw.devices["n0/gpu0"].efficiency
    assert gpu.half_tokens == 8.0  # small-batch kernels are memory-bound (profiles/hardware.py)
    assert gpu.compute_fraction(8) == pytest.approx(0.7 * 0.5)  # half of max at half_tokens


def test_perf_model_roofline(tmp_path):
    _, hw = load_profile(write(tmp_path, CLUSTER))
    gpu = hw.devices["n0/gpu0"]
    H, I = 4096, 14336
    weight_bytes = 3 * H * I * 2
    # one token: memory-bound -> bytes / (bw * memory_fraction) + overhead
    t1 = expert_call_s(gpu, "bf16", weight_bytes, 2 * 3 * H * I, 1)
    assert t1 == pytest.approx(weight_bytes / (3.35e12 * 0.8) + gpu.launch_overhead_s)
    # many tokens: compute-bound at fp8 when the device computes fp8 natively
    n = 8192
    t8 = expert_call_s(gpu, "fp8", weight_bytes / 2, 2 * n * 3 * H * I, n)
    assert t8 == pytest.approx(2 * n * 3 * H * I / (1979e12 * 0.7 * n / (n + 8)) + gpu.launch_overhead_s)
    assert compute_format(gpu, "int4") == "bf16"  # weight-only int4 is dequantised to bf16


@pytest.mark.parametrize("edit, needle", [
    (("count: 4\n", "count: 0\n"), "count: out of range"),
    (("to: nvsw,", "to: nvswitch,"), "link to an unknown device"),
    (("- {name: ib, kind: switch}", "- {name: ib, kind: gpu, memory_bytes: 1GB, memory_bytes_per_s: 1GB/s, "
      "peak_ops_per_s: {bf16: 1TFLOPS}}"), "cluster-level entries must be switches"),
    (("          - {kind: nic, to: ib, bytes_per_s: 400Gb/s}\n", ""), "is not connected to the rest of the cluster"),
])
def test_topology_errors_name_the_key(tmp_path, edit, needle):
    path = write(tmp_path, CLUSTER.replace(*edit))
    with pytest.raises(InputError) as err:
        load_profile(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_unknown_profile_name_lists_the_bundled_ones():
    with pytest.raises(InputError) as err:
        load_profile("desktop-9090")
    assert "desktop-4090" in str(err.value) and "planner profiles list" in str(err.value)


def test_link_bandwidth_is_finite_except_unified(tmp_path):
    _, hw = load_profile(write(tmp_path, CLUSTER))
    assert all(math.isfinite(l.bytes_per_s) for l in hw.links)


def test_layer_overhead_is_paid_once_per_hidden_layer_and_only_by_compute_devices():
    from profiles.models import load_model
    from profiles.perf import dense_step_s

    from profiles.hardware import HardwareProfile, bundled_profiles
    from profiles.yamlio import load_yaml

    doc, _ = load_yaml(bundled_profiles()["desktop-4090"])
    model = load_model("mixtral-8x7b")
    base = HardwareProfile.model_validate(doc).resolve().devices_of_kind("gpu")[0]
    for node in doc["nodes"]:
        for dev in node["devices"]:
            if dev["kind"] == "gpu":
                dev["layer_overhead_s"] = "200us"
    slow = HardwareProfile.model_validate(doc).resolve().devices_of_kind("gpu")[0]
    assert slow.layer_overhead_s == pytest.approx(2e-4)
    extra = dense_step_s(slow, model, "bf16", 1, 0.0) - dense_step_s(base, model, "bf16", 1, 0.0)
    assert extra == pytest.approx(model.num_hidden_layers * 2e-4)
    for node in doc["nodes"]:
        for dev in node["devices"]:
            if dev["kind"] == "nvme":
                dev["layer_overhead_s"] = "1ms"
    with pytest.raises(ValueError, match="layer_overhead_s: a nvme device does not compute"):
        HardwareProfile.model_validate(doc)
