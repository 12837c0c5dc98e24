"""The probed profile as YAML, valid for :func:`profiles.hardware.load_profile`, and the
writer that validates it before it replaces the output file."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

from ..errors import InputError
from .results import CpuFigures, DiskFigures, EfficiencyFit, Figure, GpuFigures, ProbeResult, Source, _num, _ops_unit
from .settings import GiB


def _gib_floor(n_bytes: float) -> str:
    """Capacity in GiB rounded down to 0.01: never states more memory than there is."""
    return f"{math.floor(n_bytes / GiB * 100) / 100:g}GiB"


def _gb_floor(n_bytes: float) -> str:
    return f"{math.floor(n_bytes / 1e9)}GB" if n_bytes >= 1e9 else f"{math.floor(n_bytes / 1e6)}MB"


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


def _c(text: str) -> str:
    return "  # " + " ".join(text.split())


def render_profile_yaml(result: ProbeResult, name: str) -> str:
    """The hardware profile YAML of a probe: valid for :func:`profiles.hardware.load_profile`.

    The schema has no per-figure provenance field, so every figure carries its method
    twice: a YAML comment on its line, and one ``sources`` entry (``key: method``) that
    survives loading and re-saving.
    """
    cpu, disk = result.cpu, result.disk
    sources = [f"planner profiles probe ({result.mode} mode) on {result.host} at {result.started_utc}, "
               f"{result.duration_s:.1f} s; " + ", ".join(f"{k} {v}" for k, v in result.versions.items())]
    sources += [f"warning: {w}" for w in result.warnings]

    def src(key: str, how: Figure | str) -> None:
        sources.append(f"{key}: {how.method if isinstance(how, Figure) else how}")

    devices = _cpu_lines(cpu, src)
    if disk is not None:
        devices += _disk_lines(disk, src)
    first = 0
    for g in result.gpus:
        devices += _gpu_lines(g, first, src)
        first += len(g.indices)
    if first > 1:
        devices.append("      # GPU-to-GPU links (NVLink) are not probed: add them by hand")

    gpu_text = ", ".join(f"{len(g.indices)}x {g.model}" for g in result.gpus)
    description = (f"probed: {cpu.model}, {int(cpu.cores.value)} cores, {_gib_floor(cpu.memory_bytes.value)} DRAM"
                   + (f", {gpu_text}" if gpu_text else "") + (f", disk {disk.model}" if disk else ""))
    lines = [
        f"# Measured by `planner profiles probe` ({result.mode} mode) on {result.host}, {result.started_utc}.",
        "# peak_ops_per_s are what large GEMMs reached on this machine (not datasheet peaks);",
        "# efficiency is what one expert FFN call reached relative to them, per tokens per call.",
        "# Each figure says how it was measured, in a comment and again under `sources`.",
    ]
    lines += [f"# WARNING: {w}" for w in result.warnings]
    lines += [f"name: {name}", f"description: {_q(description)}", "sources:"]
    lines += [f"  - {_q(s)}" for s in sources]
    lines += ["nodes:", "  - name: node", "    devices:"] + devices
    return "\n".join(lines) + "\n"


def _cpu_lines(cpu: CpuFigures, src: Source) -> list[str]:
    lines = [
        "      - name: cpu0",
        "        kind: cpu",
        f"        model: {_q(cpu.model)}",
        f"        cores: {int(cpu.cores.value)}" + _c(cpu.cores.method),
        f"        memory_bytes: {_gib_floor(cpu.memory_bytes.value)}" + _c(cpu.memory_bytes.method),
        f"        memory_bytes_per_s: {_num(cpu.dram_read_bytes_per_s.value, 'B/s')}"
        + _c("DRAM read: " + cpu.dram_read_bytes_per_s.method),
        f"        # DRAM copy: {_num(cpu.dram_copy_bytes_per_s.value, 'B/s')}, {cpu.dram_copy_bytes_per_s.method}",
    ]
    src("cpu0.cores", cpu.cores)
    src("cpu0.memory_bytes", cpu.memory_bytes)
    src("cpu0.memory_bytes_per_s", "DRAM read, " + cpu.dram_read_bytes_per_s.method)
    src("cpu0 DRAM copy (not in the schema)",
        f"{_num(cpu.dram_copy_bytes_per_s.value, 'B/s')}, {cpu.dram_copy_bytes_per_s.method}")
    lines += _peak_lines("cpu0", cpu.peak_ops_per_s, cpu.skipped, src)
    lines += _isa_lines(cpu, src)
    if cpu.launch_overhead_s is not None:
        lines.append(f"        launch_overhead_s: {_num(cpu.launch_overhead_s.value, 's')}"
                     + _c(cpu.launch_overhead_s.method))
        src("cpu0.launch_overhead_s", cpu.launch_overhead_s)
    if cpu.kernel_bytes_factor:
        lines.append("        kernel_bytes_factor:"
                     + _c("bytes ONNX Runtime holds per stored byte of an expert it runs"))
        for fmt, fig in cpu.kernel_bytes_factor.items():
            lines.append(f"          {fmt}: {fig.value:.3f}" + _c(fig.method))
            src(f"cpu0.kernel_bytes_factor.{fmt}", fig)
    if cpu.efficiency is not None:
        lines += _efficiency_lines(cpu.efficiency, "cpu0", src)
    else:
        lines.append("        # efficiency: not measured (no expert FFN ran); the cpu defaults apply")
    return lines


def _isa_lines(cpu: CpuFigures, src: Source) -> list[str]:
    """``isa`` and, under the widest family, the measured peaks: torch and onnxruntime pick the
    widest kernels the CPU has, so an engine profile using that family gets these figures."""
    if not cpu.isa_method:
        return []
    if not cpu.isa:
        src("cpu0.isa", "none of avx2, avx512, amx: " + cpu.isa_method)
        return ["        # isa: none of avx2, avx512, amx" + _c(cpu.isa_method)]
    widest = cpu.isa[-1]
    peaks = ", ".join(f"{fmt}: {_num(fig.value, _ops_unit(fmt))}" for fmt, fig in cpu.peak_ops_per_s.items())
    src("cpu0.isa", cpu.isa_method)
    src(f"cpu0.peak_ops_per_s_by_kernel.{widest}",
        "the peak_ops_per_s above: the probe's kernels (torch, onnxruntime) use the widest family the CPU has")
    return [f"        isa: [{', '.join(cpu.isa)}]" + _c(cpu.isa_method),
            "        peak_ops_per_s_by_kernel:" + _c("the measured peaks belong to the widest family, "
                                                    "which the probe's kernels (torch, onnxruntime) used"),
            f"          {widest}: {{{peaks}}}"]


def _disk_lines(disk: DiskFigures, src: Source) -> list[str]:
    lines = [
        "      - name: disk0",
        "        kind: nvme" + _c("the schema's storage kind, whatever the disk is"),
        f"        model: {_q(disk.model or disk.device or 'unknown disk')}",
        f"        memory_bytes: {_gb_floor(disk.capacity_bytes.value)}" + _c(disk.capacity_bytes.method),
        f"        memory_bytes_per_s: {_num(disk.read_bytes_per_s.value, 'B/s')}" + _c(disk.read_bytes_per_s.method),
        "        links:",
    ]
    src("disk0.memory_bytes", disk.capacity_bytes)
    src("disk0.memory_bytes_per_s", disk.read_bytes_per_s)
    if disk.pcie_gen and disk.pcie_lanes:
        lines.append(f"          - {{kind: pcie, to: cpu0, gen: {disk.pcie_gen}, lanes: {disk.pcie_lanes}}}"
                     + _c("current_link_speed / current_link_width in /sys"))
        src("disk0.links[0]", "PCIe gen and lanes from /sys current_link_speed and current_link_width")
    else:
        lines.append(f"          - {{kind: pcie, to: cpu0, bytes_per_s: {_num(disk.read_bytes_per_s.value, 'B/s')}}}"
                     + _c("link not measured: set to the disk's read bandwidth, so the disk is the bottleneck"))
        src("disk0.links[0]", "not measured: bytes_per_s set to the disk's measured read bandwidth")
    return lines


def _gpu_lines(g: GpuFigures, first: int, src: Source) -> list[str]:
    """One device entry for GPUs ``first .. first + len(g.indices) - 1`` (``count`` when several)."""
    count = len(g.indices)
    if count == 1 and first == 0:
        lines = ["      - name: gpu0"]
    else:
        lines = ["      - name: gpu", f"        count: {count}"] + ([f"        index_from: {first}"] if first else [])
    key = f"gpu{first}" if count == 1 else f"gpu{first}..gpu{first + count - 1}"
    lines += [
        "        kind: gpu",
        f"        model: {_q(g.model)}",
        f"        memory_bytes: {_gib_floor(g.memory_bytes.value)}" + _c(g.memory_bytes.method),
        f"        memory_bytes_per_s: {_num(g.memory_bytes_per_s.value, 'B/s')}" + _c(g.memory_bytes_per_s.method),
        f"        # device copy: {_num(g.copy_bytes_per_s.value, 'B/s')}, {g.copy_bytes_per_s.method}",
    ]
    src(f"{key}.memory_bytes", g.memory_bytes)
    src(f"{key}.memory_bytes_per_s", g.memory_bytes_per_s)
    lines += _peak_lines(key, g.peak_ops_per_s, g.skipped, src)
    lines.append(f"        launch_overhead_s: {_num(g.launch_overhead_s.value, 's')}" + _c(g.launch_overhead_s.method))
    src(f"{key}.launch_overhead_s", g.launch_overhead_s)
    if g.efficiency is not None:
        lines += _efficiency_lines(g.efficiency, key, src)
    pinned, pageable = g.h2d_pinned_bytes_per_s, g.h2d_pageable_bytes_per_s
    lines += [
        "        links:",
        f"          - {{kind: pcie, to: cpu0, bytes_per_s: {_num(pinned.value, 'B/s')}, "
        f"pageable_bytes_per_s: {_num(pageable.value, 'B/s')}, latency_s: {_num(g.h2d_latency_s.value, 's')}}}"
        + _c("host-to-device from pinned memory, and from pageable (ordinary) memory"),
    ]
    src(f"{key}.links[0].bytes_per_s", "pinned H2D, " + pinned.method)
    src(f"{key}.links[0].pageable_bytes_per_s", "pageable H2D, " + pageable.method)
    src(f"{key}.links[0].latency_s", g.h2d_latency_s)
    return lines


def _peak_lines(key: str, peaks: dict[str, Figure], skipped: dict[str, str], src: Source) -> list[str]:
    lines = ["        peak_ops_per_s:" + _c("what a large GEMM reached here, not a datasheet peak")]
    for fmt, fig in peaks.items():
        lines.append(f"          {fmt}: {_num(fig.value, _ops_unit(fmt))}" + _c(fig.method))
        src(f"{key}.peak_ops_per_s.{fmt}", fig)
    for fmt, why in skipped.items():
        lines.append(f"          # {fmt}: skipped, {why}")
        src(f"{key}.peak_ops_per_s.{fmt}", "skipped, " + why)
    return lines


def _efficiency_lines(fit: EfficiencyFit, key: str, src: Source) -> list[str]:
    points = ", ".join(f"[{n}, {f:g}]" for n, f in fit.points)
    src(f"{key}.efficiency", fit.method)
    return [
        "        efficiency:",
        f"          compute_max_fraction: {fit.compute_max_fraction:g}"
        + _c("least-squares fit of a*n/(n+h) to the points (used only without points)"),
        f"          half_tokens: {fit.half_tokens:g}",
        f"          memory_fraction: {fit.memory_fraction:g}"
        + _c("best share of memory_bytes_per_s a one-token expert call streamed at"),
        f"          points: [{points}]" + _c(f"[tokens, fraction of the {fit.format} peak] measured"),
        f"          source: {_q('measured by planner profiles probe: ' + fit.method)}",
    ]


def write_profile(result: ProbeResult, out: str | Path, name: str | None = None, force: bool = False) -> Path:
    """Render, validate (:func:`~profiles.hardware.load_profile`) and write the profile.

    Raises:
        InputError: ``out`` exists and ``force`` is false, or its directory is missing.
    """
    from ..hardware import load_profile

    out = Path(out)
    check_output(out, force)
    name = name or profile_name(out)
    text = render_profile_yaml(result, name)
    fd, tmp = tempfile.mkstemp(prefix=".probe-", suffix=".yaml", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        load_profile(tmp)  # a profile that does not load is a bug here, not a user error
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def check_output(out: str | Path, force: bool) -> None:
    """Refuse an existing ``out`` without ``force``, a directory, or a missing parent."""
    out = Path(out)
    if out.is_dir():
        raise InputError("is a directory, not a file", file=out, key="--out", fix="name a .yaml file to write")
    if out.exists() and not force:
        raise InputError("output file exists", file=out, fix="pass --force to overwrite it, or choose another path")
    if not out.parent.exists():
        raise InputError("directory of the output file not found", file=out, key="--out",
                         fix="create the directory first, or write elsewhere")


def profile_name(out: str | Path) -> str:
    """A profile name from the output file's stem (``my-machine.yaml`` -> ``my-machine``)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(out).stem).strip("-.")
    if not stem or not stem[0].isalpha():
        stem = f"probed-{stem}" if stem else "probed"
    return stem
