"""`planner profiles`: list, show and validate hardware profiles."""

from __future__ import annotations

import json
import math

import click
from rich.table import Table

from profiles.hardware import Hardware, HardwareProfile, bundled_profiles, load_profile
from profiles.units import format_bandwidth, format_size, format_throughput, format_time

from ..output import get_output
from ._common import common_options, validate_files

__all__ = ["profiles"]


@click.group()
def profiles() -> None:
    """Hardware profiles: the bundled ones, and checks for your own YAML files.

    A profile is a cluster of nodes; each node lists devices (gpu, cpu, nvme, accelerator,
    switch) with memory, bandwidth, peak throughput per number format, and their links
    (pcie, nvlink, nic, unified). Values take units: 24GiB, 1008GB/s, 165TFLOPS, 5us.
    Start from a bundled one: `planner profiles show desktop-4090 --yaml > mine.yaml`.
    """


def summary(hw: Hardware) -> dict:
    """The figures `list` and `show` print, as plain data."""
    count = {k: len(hw.devices_of_kind(k)) for k in ("gpu", "cpu", "nvme", "accelerator")}
    tiers: dict[str, float] = {}
    for mem in hw.memories.values():
        tiers[mem.tier] = tiers.get(mem.tier, 0.0) + mem.capacity_bytes
    return {"name": hw.name, "description": hw.description, "nodes": len(hw.nodes), "devices": count,
            "memory_bytes_by_tier": tiers, "price_per_hour_usd": hw.price_per_hour_usd, "power_w": hw.power_w}


@profiles.command("list")
@common_options
def list_profiles() -> None:
    """List the bundled hardware profiles."""
    rows = [summary(load_profile(path)[1]) | {"file": str(path)} for path in bundled_profiles().values()]

    def render(console):
        table = Table(title="Bundled hardware profiles")
        for col in ("name", "GPUs", "HBM/VRAM", "DRAM", "NVMe", "accel", "$/h", "description"):
            table.add_column(col, overflow="fold")
        for r in rows:
            t = r["memory_bytes_by_tier"]
            table.add_row(
                r["name"], str(r["devices"]["gpu"]), _size(t.get("hbm")), _size(t.get("dram")),
                _size(t.get("nvme"), binary=False), str(r["devices"]["accelerator"] or "-"),
                f"{r['price_per_hour_usd']:.2f}" if r["price_per_hour_usd"] is not None else "-", r["description"])
        console.print(table)

    get_output().emit(rows, render)


@profiles.command("show")
@click.argument("profile")
@click.option("--yaml", "as_yaml", is_flag=True, help="Print the profile file itself (a template for your own).")
@common_options
def show(profile: str, as_yaml: bool) -> None:
    """Show a profile's devices, links, memory pools and routes.

    PROFILE is a bundled name (see `planner profiles list`) or a path to a YAML file.
    """
    spec, hw = load_profile(profile)
    if as_yaml:
        path = bundled_profiles().get(profile)
        click.echo(path.read_text() if path else open(profile, encoding="utf-8").read(), nl=False)
        return
    data = summary(hw) | {
        "devices_detail": [
            {"id": d.id, "kind": d.kind, "model": d.model, "memory_bytes": d.memory_bytes,
             "memory_bytes_per_s": d.memory_bytes_per_s, "peak_ops_per_s": d.peak_ops_per_s,
             "launch_overhead_s": d.launch_overhead_s if d.is_compute else None,
             "efficiency": d.efficiency.model_dump() if d.efficiency else None}
            for d in hw.devices.values()],
        "links": [{"id": l.id, "kind": l.kind, "bytes_per_s": l.bytes_per_s, "latency_s": l.latency_s}
                  for l in hw.links],
        "memories": [{"id": m.id, "tier": m.tier, "devices": list(m.devices), "capacity_bytes": m.capacity_bytes,
                      "bytes_per_s": m.bytes_per_s} for m in hw.memories.values()],
        "routes": _routes(hw),
    }

    def render(console):
        console.print(f"[bold]{hw.name}[/bold]: {hw.description}")
        devices = Table(title="Devices")
        for col in ("id", "kind", "model", "memory", "bandwidth", "peak (dense)", "overhead"):
            devices.add_column(col, overflow="fold")
        for d in hw.devices.values():
            peaks = ", ".join(f"{k} {format_throughput(v, 'OPS' if k.startswith('int') else 'FLOPS')}"
                              for k, v in d.peak_ops_per_s.items())
            devices.add_row(d.id, d.kind, d.model, _size(d.memory_bytes, binary=d.kind != "nvme"),
                            format_bandwidth(d.memory_bytes_per_s) if d.memory_bytes_per_s else "-", peaks or "-",
                            format_time(d.launch_overhead_s) if d.is_compute else "-")
        console.print(devices)
        links = Table(title="Links (full duplex, per direction)")
        for col in ("id", "kind", "bandwidth", "latency"):
            links.add_column(col)
        for l in hw.links:
            links.add_row(l.id, l.kind, "shared memory" if math.isinf(l.bytes_per_s) else format_bandwidth(l.bytes_per_s),
                          format_time(l.latency_s))
        console.print(links)
        routes = Table(title="Routes to each accelerator memory")
        for col in ("from", "to", "hops", "bottleneck"):
            routes.add_column(col)
        for r in data["routes"]:
            routes.add_row(r["src"], r["dst"], str(r["hops"]),
                           "no copy (shared)" if r["bottleneck_bytes_per_s"] is None
                           else format_bandwidth(r["bottleneck_bytes_per_s"]))
        console.print(routes)
        if hw.price_per_hour_usd is not None:
            console.print(f"price: ${hw.price_per_hour_usd:.2f}/h")

    get_output().emit(data, render)


def _routes(hw: Hardware, limit: int = 12) -> list[dict]:
    """Routes from each host/NVMe memory to the first GPU/accelerator memories (enough to read)."""
    fast = [m for m in hw.memories.values() if m.tier in ("hbm", "accel")]
    slow = [m for m in hw.memories.values() if m.tier in ("dram", "nvme")]
    out = []
    for dst in fast[:2]:
        for src in slow[:4] + [m for m in fast[:2] if m is not dst]:
            r = hw.route(src.id, dst.id)
            out.append({"src": src.id, "dst": dst.id, "hops": len(r.links),
                        "bottleneck_bytes_per_s": None if math.isinf(r.bottleneck_bytes_per_s)
                        else r.bottleneck_bytes_per_s, "links": [l.id for l in r.links]})
    return out[:limit]


@profiles.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@common_options
def validate(files: tuple[str, ...]) -> None:
    """Check hardware profile FILES; each error names the file, line, key, value and a fix."""
    def check(f: str) -> dict:
        _, hw = load_profile(f)
        return {"nodes": len(hw.nodes), "devices": len(hw.devices)}

    validate_files(files, check, lambda r: f"{r['nodes']} nodes, {r['devices']} devices")


@profiles.command("schema")
def schema() -> None:
    """Print the JSON Schema of a hardware profile file."""
    click.echo(json.dumps(HardwareProfile.model_json_schema(), indent=2))


def _size(n: float | None, binary: bool = True) -> str:
    return format_size(n, binary=binary) if n else "-"


@profiles.command("probe")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Write the measured hardware profile (YAML) here.")
@click.option("--dir", "directory", default=".", show_default=True, metavar="DIR",
              help="Measure the read bandwidth of the disk holding this directory (a temporary file is written "
                   "there and removed).")
@click.option("--quick", is_flag=True,
              help="Smaller arrays and fewer repeats: a 15 s budget instead of 60 s (every measurement is sized to fit).")
@click.option("--name", help="Profile name (default: the --out file name without .yaml).")
@click.option("--no-gpu", is_flag=True, help="Do not probe CUDA GPUs even if torch sees some.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@click.option("--tiny", is_flag=True, hidden=True, help="For tests: a seconds-long probe with rough figures.")
@common_options
def probe_cmd(out: str, directory: str, quick: bool, name: str | None, no_gpu: bool, force: bool, tiny: bool) -> None:
    """Measure this machine and write it as a hardware profile.

    Measures the CPU (model, cores, DRAM capacity, DRAM read/copy bandwidth, matmul
    throughput in fp32, bf16, int8 and int4, and the efficiency of one expert FFN call vs
    tokens), the read bandwidth of the disk holding --dir (past the page cache), and each
    CUDA GPU torch sees (host-to-device bandwidth, memory bandwidth, matmul per format,
    launch overhead, FFN efficiency). bf16 needs torch, int8/int4 need onnxruntime; what
    cannot be measured is skipped and said so. Every figure in the file says how it was
    measured. Run it on an idle machine: other processes lower every figure.

    \b
    Examples:
      planner profiles probe --out my-machine.yaml
      planner profiles probe --quick --out my-machine.yaml --dir /mnt/nvme
      planner optimize --hardware my-machine.yaml -m olmoe-1b-7b
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from profiles.probe import (
        SETTINGS,
        check_directory,
        check_output,
        probe,
        profile_name,
        write_profile,
    )

    check_output(out, force)  # fail before a minute of measuring, not after
    check_directory(directory)
    name = name or profile_name(out)
    settings = SETTINGS["tiny" if tiny else "quick" if quick else "full"]
    output = get_output()
    columns = (TextColumn("probe"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=output.log, transient=True) as bar:
        task = bar.add_task("starting", total=1.0)
        result = probe(directory, settings, progress=lambda what, done: bar.update(task, completed=done,
                                                                                    description=what),
                       gpus=not no_gpu)
    path = write_profile(result, out, name=name, force=force)
    data = {"file": str(path), "name": name} | result.to_dict()
    for warning in result.warnings:
        output.log.print(f"warning: {warning}", highlight=False)

    def render(console):
        table = Table(title=f"{name}: measured in {result.duration_s:.1f} s ({result.mode})")
        for col in ("device", "figure", "value", "how"):
            table.add_column(col, overflow="fold")
        for device, figure, value, how in _probe_rows(result):
            table.add_row(device, figure, value, how)
        console.print(table)
        console.print(f"wrote {path}", highlight=False)

    output.emit(data, render)


def _probe_rows(result) -> list[tuple[str, str, str, str]]:
    """(device, figure, value, method) rows of a probe, for the table."""
    cpu, rows = result.cpu, []
    rows.append(("cpu0", "model", cpu.model, ""))
    rows.append(("cpu0", "cores", f"{cpu.cores.value:.0f}", cpu.cores.method))
    rows.append(("cpu0", "DRAM", format_size(cpu.memory_bytes.value), cpu.memory_bytes.method))
    rows.append(("cpu0", "DRAM read", format_bandwidth(cpu.dram_read_bytes_per_s.value),
                 cpu.dram_read_bytes_per_s.method))
    rows.append(("cpu0", "DRAM copy", format_bandwidth(cpu.dram_copy_bytes_per_s.value),
                 cpu.dram_copy_bytes_per_s.method))
    rows += _peak_rows("cpu0", cpu.peak_ops_per_s, cpu.skipped)
    if cpu.launch_overhead_s is not None:
        rows.append(("cpu0", "call overhead", format_time(cpu.launch_overhead_s.value), cpu.launch_overhead_s.method))
    rows += _efficiency_rows("cpu0", cpu.efficiency)
    if result.disk is not None:
        d = result.disk
        rows.append(("disk0", "capacity", format_size(d.capacity_bytes.value, binary=False), d.capacity_bytes.method))
        rows.append(("disk0", "read", format_bandwidth(d.read_bytes_per_s.value), d.read_bytes_per_s.method))
    for g in result.gpus:
        dev = f"gpu{','.join(map(str, g.indices))}"
        rows.append((dev, "model", g.model, ""))
        rows.append((dev, "memory", format_size(g.memory_bytes.value), g.memory_bytes.method))
        rows.append((dev, "memory read", format_bandwidth(g.memory_bytes_per_s.value), g.memory_bytes_per_s.method))
        rows.append((dev, "H2D pinned", format_bandwidth(g.h2d_pinned_bytes_per_s.value),
                     g.h2d_pinned_bytes_per_s.method))
        rows.append((dev, "H2D pageable", format_bandwidth(g.h2d_pageable_bytes_per_s.value),
                     g.h2d_pageable_bytes_per_s.method))
        rows += _peak_rows(dev, g.peak_ops_per_s, g.skipped)
        rows.append((dev, "call overhead", format_time(g.launch_overhead_s.value), g.launch_overhead_s.method))
        rows += _efficiency_rows(dev, g.efficiency)
    return rows


def _peak_rows(device: str, peaks: dict, skipped: dict[str, str]) -> list[tuple[str, str, str, str]]:
    rows = [(device, f"matmul {fmt}", format_throughput(f.value, "OPS" if fmt.startswith("int") else "FLOPS"),
             f.method) for fmt, f in peaks.items()]
    return rows + [(device, f"matmul {fmt}", "skipped", why) for fmt, why in skipped.items()]


def _efficiency_rows(device: str, fit) -> list[tuple[str, str, str, str]]:
    if fit is None:
        return [(device, "efficiency", "not measured", "defaults apply")]
    points = " ".join(f"{n}:{f:.2f}" for n, f in fit.points)
    return [(device, f"efficiency ({fit.format})", points, "fraction of peak by tokens per expert call"),
            (device, "memory fraction", f"{fit.memory_fraction:.2f}", "share of memory read bandwidth, 1 token")]
