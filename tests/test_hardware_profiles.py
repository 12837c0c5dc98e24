"""The bundled hardware profiles: every one loads, cites its numbers, and has the topology
facts the planner relies on (schema rules themselves are tested in test_hardware.py)."""

from __future__ import annotations

import math
import re

import pytest
import yaml

from profiles.hardware import PCIE_EFFECTIVE_X16_BYTES_PER_S, bundled_profiles, load_profile

BUNDLED = bundled_profiles()
GiB = 2**30

_CACHE: dict = {}


def hw_of(name: str):
    """Resolved hardware of a bundled profile (resolved once per test session)."""
    if name not in _CACHE:
        _CACHE[name] = load_profile(name)
    return _CACHE[name][1]


def header_comment(path) -> str:
    """The comment block the file starts with, without the leading '#'."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return "\n".join(lines)


def test_at_least_fourteen_profiles_are_bundled():
    assert len(BUNDLED) >= 14, sorted(BUNDLED)
    for required in ("laptop-4060", "desktop-4090", "workstation-3090", "desktop-3060", "cloud-t4",
                     "server-a100-80gb", "server-l40s", "node-h100-sxm", "cluster-h100-2node",
                     "cluster-h100-8node", "cpu-server-4090", "jetson-agx-orin-64gb",
                     "apple-m2-ultra-192gb", "desktop-alveo-u280"):
        assert required in BUNDLED


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_profile_loads_resolves_and_cites_its_sources(name):
    profile, hw = load_profile(name)
    assert profile.name == name, "the `name:` must equal the file stem users type"
    assert profile.description and profile.sources
    assert all(s.strip() for s in profile.sources)
    header = header_comment(BUNDLED[name])
    assert len(header.splitlines()) >= 3, "start the file with a comment block citing the datasheets"
    assert "peak" in header.lower() or "dense" in header.lower()
    # every node has a host, every compute device can compute and every memory is reachable
    for node in hw.nodes:
        assert any(d.kind == "cpu" and d.node == node for d in hw.devices.values())
    for dev in hw.devices.values():
        if dev.is_compute:
            assert dev.peak_ops_per_s and all(v > 0 for v in dev.peak_ops_per_s.values())
            assert dev.memory_bytes > 0 and dev.memory_bytes_per_s > 0
    host = next(d.id for d in hw.devices.values() if d.kind == "cpu")
    for mem in hw.memories.values():
        route = hw.route(mem.id, host)
        assert route.bottleneck_bytes_per_s > 0


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_every_stated_number_is_cited_in_the_header(name):
    """Each bandwidth and peak written in the body also appears in the header comment."""
    path = BUNDLED[name]
    header = re.sub(r"(?<=\d),(?=\d{3})", "", header_comment(path))  # 1,979 -> 1979
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    values = []
    for node in data["nodes"]:
        for dev in node["devices"]:
            if dev.get("memory_bytes_per_s") is not None:
                values.append(dev["memory_bytes_per_s"])
            values.extend((dev.get("peak_ops_per_s") or {}).values())
            values.extend(link["bytes_per_s"] for link in dev.get("links", ()) if "bytes_per_s" in link)
    missing = []
    for value in values:
        number = re.match(r"[\d.]+", str(value)).group(0)
        if not re.search(rf"(?<![\d.]){re.escape(number)}(?!\d|\.\d)", header):
            missing.append(value)
    assert not missing, f"{path.name}: numbers not cited in the header comment: {missing}"


def test_h100_node_gpus_talk_over_nvlink():
    hw = hw_of("node-h100-sxm")
    assert len(hw.devices_of_kind("gpu")) == 8
    route = hw.route("node/gpu0", "node/gpu1")
    assert route.links and all(link.kind == "nvlink" for link in route.links)
    assert route.bottleneck_bytes_per_s == pytest.approx(450e9)
    assert hw.price_per_hour_usd is not None


def test_h100_two_node_cluster_crosses_nodes_over_the_nics():
    hw = hw_of("cluster-h100-2node")
    assert hw.nodes == ("node0", "node1")
    assert len(hw.devices_of_kind("gpu")) == 16
    across = hw.route("node0/gpu0", "node1/gpu3")
    assert across.links and all(link.kind == "nic" for link in across.links)
    assert across.bottleneck_bytes_per_s == pytest.approx(50e9)
    inside = hw.route("node1/gpu2", "node1/gpu5")
    assert all(link.kind == "nvlink" for link in inside.links)
    assert inside.bottleneck_bytes_per_s == pytest.approx(450e9)
    assert hw.price_per_hour_usd == pytest.approx(2 * hw_of("node-h100-sxm").price_per_hour_usd)


def test_h100_eight_node_cluster_has_64_gpus():
    hw = hw_of("cluster-h100-8node")
    assert len(hw.nodes) == 8
    assert len(hw.devices_of_kind("gpu")) == 64
    route = hw.route("node0/gpu7", "node7/gpu0")
    assert all(link.kind == "nic" for link in route.links)
    assert route.bottleneck_bytes_per_s == pytest.approx(50e9)
    # the file stays short: counts expand it, nothing is spelled out per node
    assert len(BUNDLED["cluster-h100-8node"].read_text().splitlines()) < 100


@pytest.mark.parametrize("name,capacity", [("jetson-agx-orin-64gb", 64 * GiB), ("apple-m2-ultra-192gb", 192 * GiB)])
def test_unified_memory_cpu_and_gpu_share_one_pool(name, capacity):
    hw = hw_of(name)
    (gpu,), (cpu,) = hw.devices_of_kind("gpu"), hw.devices_of_kind("cpu")
    pool = hw.memory_of(gpu.id)
    assert hw.memory_of(cpu.id) == pool
    assert set(pool.devices) == {gpu.id, cpu.id}
    assert pool.capacity_bytes == capacity
    pools_with_compute = [m for m in hw.memories.values() if m.tier != "nvme"]
    assert pools_with_compute == [pool]
    route = hw.route(cpu.id, gpu.id)
    assert route.links == () and route.transfer_s(1e9) == 0.0


def test_desktop_4090_nvme_to_gpu_is_bound_by_the_drive():
    hw = hw_of("desktop-4090")
    nvme, gpu = hw.devices["node/nvme0"], hw.devices["node/gpu0"]
    route = hw.route(nvme.id, gpu.id)
    assert [link.kind for link in route.links] == ["pcie", "pcie"]
    assert route.bottleneck_bytes_per_s == nvme.memory_bytes_per_s
    assert all(link.bytes_per_s > nvme.memory_bytes_per_s for link in route.links)


def test_alveo_is_an_int_accelerator_on_pcie_gen4_x8():
    hw = hw_of("desktop-alveo-u280")
    (fpga,) = hw.devices_of_kind("accelerator")
    assert fpga.peak_ops_per_s["int8"] > 0 and fpga.peak_ops_per_s["int4"] > fpga.peak_ops_per_s["int8"]
    assert fpga.memory_bytes == 8 * GiB and fpga.memory_bytes_per_s == pytest.approx(460e9)
    assert hw.memory_of(fpga.id).tier == "accel"
    (link,) = [l for l in hw.links if fpga.id in (l.a, l.b)]
    assert link.kind == "pcie"
    assert link.bytes_per_s == pytest.approx(12.5e9) == PCIE_EFFECTIVE_X16_BYTES_PER_S[4] / 2
    host = hw.devices_of_kind("cpu")[0]
    assert hw.route(fpga.id, host.id).bottleneck_bytes_per_s == pytest.approx(12.5e9)


def test_laptop_4060_has_an_8_gib_gpu_on_pcie_x8():
    hw = hw_of("laptop-4060")
    (gpu,) = hw.devices_of_kind("gpu")
    assert gpu.memory_bytes == 8 * GiB
    assert gpu.memory_bytes_per_s == pytest.approx(256e9)
    route = hw.route(gpu.id, hw.devices_of_kind("cpu")[0].id)
    assert route.bottleneck_bytes_per_s == pytest.approx(12.5e9)


def test_gpu_peaks_are_dense_datasheet_figures():
    """Spot checks against the datasheets (dense, not the 2x sparse figures)."""
    checks = {
        ("node-h100-sxm", "bf16"): 989e12, ("node-h100-sxm", "fp8"): 1979e12,
        ("server-a100-80gb", "bf16"): 312e12, ("workstation-3090", "int8"): 284e12,
        ("cloud-t4", "fp16"): 65e12, ("server-l40s", "bf16"): 362.05e12,
        ("desktop-4090", "bf16"): 165.2e12,
    }
    for (name, fmt), peak in checks.items():
        gpu = hw_of(name).devices_of_kind("gpu")[0]
        assert gpu.peak_ops_per_s[fmt] == pytest.approx(peak), (name, fmt)


def test_multi_gpu_links_match_the_interconnect():
    a100 = hw_of("server-a100-80gb").route("node/gpu0", "node/gpu7")
    assert all(l.kind == "nvlink" for l in a100.links) and a100.bottleneck_bytes_per_s == pytest.approx(300e9)
    l40s = hw_of("server-l40s").route("node/gpu0", "node/gpu1")  # no NVLink: through the host
    assert [l.kind for l in l40s.links] == ["pcie", "pcie"]
    assert l40s.bottleneck_bytes_per_s == pytest.approx(PCIE_EFFECTIVE_X16_BYTES_PER_S[4])
    if "workstation-2x3090-nvlink" in BUNDLED:
        bridge = hw_of("workstation-2x3090-nvlink").route("node/gpu0", "node/gpu1")
        assert [l.kind for l in bridge.links] == ["nvlink"]
        assert bridge.bottleneck_bytes_per_s == pytest.approx(56.25e9)
    for name in BUNDLED:
        for link in hw_of(name).links:
            assert link.bytes_per_s > 0 and (link.kind == "unified" or math.isfinite(link.bytes_per_s))


# the boxes of issue 19 (every device in the box): several GPUs with a link each, unlike GPUs,
# a GPU beside an FPGA card, a dual-socket host, and a cluster of two GPU generations
MULTI_DEVICE_BOXES = ("workstation-2x3090-nvlink", "workstation-2x3090-pcie", "workstation-4x4090", "server-8x4090",
                      "desktop-3090-3060", "workstation-4090-alveo-u280", "cluster-h100-a100")


def test_the_multi_device_boxes_are_bundled():
    assert set(MULTI_DEVICE_BOXES) <= set(BUNDLED)


@pytest.mark.parametrize("name,gpus,lanes", [("workstation-2x3090-pcie", 2, 16), ("workstation-4x4090", 4, 16),
                                             ("server-8x4090", 8, 16), ("desktop-3090-3060", 2, 8)])
def test_every_gpu_of_a_pcie_box_has_its_own_host_link(name, gpus, lanes):
    hw = hw_of(name)
    ids = [g.id for g in hw.devices_of_kind("gpu")]
    assert len(ids) == gpus
    host = hw.devices_of_kind("cpu")[0].id
    up = [hw.route(host, g).links for g in ids]
    assert all(len(links) == 1 and links[0].kind == "pcie" for links in up)
    assert len({links[0] for links in up}) == gpus, "one link per GPU, none shared"
    assert all(links[0].bytes_per_s == pytest.approx(PCIE_EFFECTIVE_X16_BYTES_PER_S[4] * lanes / 16) for links in up)
    peer = hw.route(ids[0], ids[1])  # no NVLink: through the host
    assert [l.kind for l in peer.links] == ["pcie", "pcie"]


def test_unlike_gpus_keep_their_own_figures():
    big, small = hw_of("desktop-3090-3060").devices_of_kind("gpu")
    assert (big.memory_bytes, small.memory_bytes) == (24 * GiB, 12 * GiB)
    assert big.peak_ops_per_s["bf16"] == pytest.approx(71e12) and small.peak_ops_per_s["bf16"] == pytest.approx(25.5e12)
    assert big.memory_bytes_per_s == pytest.approx(936e9) and small.memory_bytes_per_s == pytest.approx(360e9)


def test_gpu_and_fpga_card_share_one_host():
    hw = hw_of("workstation-4090-alveo-u280")
    (gpu,), (fpga,), (cpu,) = hw.devices_of_kind("gpu"), hw.devices_of_kind("accelerator"), hw.devices_of_kind("cpu")
    assert hw.memory_of(fpga.id).tier == "accel" and fpga.peak_ops_per_s["int8"] == pytest.approx(24.5e12)
    assert hw.route(cpu.id, gpu.id).bottleneck_bytes_per_s == pytest.approx(PCIE_EFFECTIVE_X16_BYTES_PER_S[4])
    assert hw.route(cpu.id, fpga.id).bottleneck_bytes_per_s == pytest.approx(PCIE_EFFECTIVE_X16_BYTES_PER_S[4] / 2)
    assert [l.kind for l in hw.route(gpu.id, fpga.id).links] == ["pcie", "pcie"]


def test_eight_4090_server_is_dual_socket_with_a_terabyte():
    (cpu,) = hw_of("server-8x4090").devices_of_kind("cpu")
    assert cpu.sockets == 2 and cpu.cross_socket_bytes_per_s == pytest.approx(128e9)
    assert cpu.memory_bytes == 1024 * GiB and cpu.memory_bytes_per_s == pytest.approx(614.4e9)
    assert set(cpu.isa) == {"avx2", "avx512", "amx"}


def test_mixed_cluster_has_two_gpu_generations_and_the_slower_nic_binds():
    hw = hw_of("cluster-h100-a100")
    assert set(hw.nodes) == {"h100", "a100"}
    h100, a100 = hw.devices["h100/gpu0"], hw.devices["a100/gpu0"]
    assert h100.peak_ops_per_s["bf16"] == pytest.approx(989e12) and a100.peak_ops_per_s["bf16"] == pytest.approx(312e12)
    assert "fp8" in h100.peak_ops_per_s and "fp8" not in a100.peak_ops_per_s
    across = hw.route("h100/gpu0", "a100/gpu3")
    assert all(l.kind == "nic" for l in across.links) and across.bottleneck_bytes_per_s == pytest.approx(25e9)
    assert hw.route("h100/gpu0", "h100/gpu7").bottleneck_bytes_per_s == pytest.approx(450e9)
    assert hw.route("a100/gpu0", "a100/gpu7").bottleneck_bytes_per_s == pytest.approx(300e9)
    assert hw.price_per_hour_usd == pytest.approx(98.32 + 40.96)
