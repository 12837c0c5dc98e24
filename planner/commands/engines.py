"""`planner engines`: list, show, validate engine profiles (the software that runs a plan), and
probe the bundle runtime's own costs on this machine."""

from __future__ import annotations

import json

import click
import yaml
from rich.table import Table

from profiles.engines import EngineProfile, bundled_engines, load_engine, overhead_rows
from profiles.errors import InputError
from profiles.units import format_time

from ..output import get_output
from ._common import common_options, validate_files

__all__ = ["engines"]


@click.group()
def engines() -> None:
    """Engine profiles: how the software that runs a plan turns hardware into speed.

    A prediction is for (hardware, engine). An engine profile states framework overheads
    (per layer, per expert call, per step), the kernel path of each format on each kind of
    device (native, unpack-then-matmul at a rate, unsupported), the CPU kernel family,
    pinned or pageable host memory, and what it can place, cache and prefetch. Every number
    names its source. `planner optimize --engine NAME` plans for one; the default is
    `bundle`, this project's runtime, whose costs `planner engines probe` measures here.
    """


@engines.command("list")
@common_options
def list_engines() -> None:
    """List the bundled engine profiles."""
    rows = []
    for name, path in bundled_engines().items():
        e = load_engine(path)
        p = e.profile
        rows.append({"name": p.name, "description": p.description, "placement": p.placement, "sites": list(p.sites),
                     "eviction": list(p.eviction), "prefetch": list(p.prefetch), "host_memory": p.host_memory,
                     "cpu_kernel_family": p.cpu.kernel_family, "devices": [k for k in ("gpu", "cpu", "accelerator")
                                                                           if e.runs_on(k)], "file": str(path)})

    def render(console):
        table = Table(title="Bundled engine profiles")
        for col in ("name", "placement", "sites", "cache", "prefetch", "host memory", "cpu kernels"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(r["name"], r["placement"], ",".join(r["sites"]), ",".join(r["eviction"]) or "-",
                          ",".join(r["prefetch"]), r["host_memory"], r["cpu_kernel_family"])
        console.print(table)
    get_output().emit(rows, render)


@engines.command("show")
@click.argument("engine")
@click.option("--yaml", "as_yaml", is_flag=True, help="Print the profile as YAML (a start for your own).")
@common_options
def show(engine: str, as_yaml: bool) -> None:
    """Show one engine profile: overheads with their sources, kernel paths, capabilities."""
    e = load_engine(engine)
    if as_yaml:
        click.echo(yaml.safe_dump(e.profile.model_dump(mode="json", exclude_none=True), sort_keys=False))
        return
    data = e.profile.model_dump(mode="json", exclude_none=True)

    def render(console):
        p = e.profile
        console.print(f"[bold]{p.name}[/bold]: {p.description}", highlight=False)
        table = Table(title="Framework overheads")
        for col in ("where", "what", "time", "source"):
            table.add_column(col, overflow="fold")
        for kind, what, seconds, source in overhead_rows(e):
            table.add_row(kind, what, format_time(seconds), source)
        console.print(table)
        kernels = Table(title="Kernel path per format")
        kernels.add_column("device")
        kernels.add_column("format")
        kernels.add_column("path", overflow="fold")
        for kind in ("gpu", "cpu", "accelerator"):
            spec = e.kind_spec(kind)
            for fmt, path in (spec.kernels.items() if spec else ()):
                if isinstance(path, str):
                    text = path
                elif hasattr(path, "host_s_per_linear"):
                    text = f"native, +{format_time(path.host_s_per_linear)} host per linear ({path.source})"
                elif hasattr(path, "computes_in"):
                    text = f"weight-only, computes in {path.computes_in} ({path.source})"
                else:
                    text = f"unpack at {path.unpack_weights_per_s / 1e9:g}G weights/s ({path.source})"
                kernels.add_row(kind, fmt, text)
        console.print(kernels)
        console.print(f"placement per {p.placement}; sites {', '.join(p.sites)}; eviction "
                      f"{', '.join(p.eviction) or 'none (no expert cache)'}; prefetch {', '.join(p.prefetch)}; "
                      f"host memory {p.host_memory}; cpu kernels {p.cpu.kernel_family} ({p.cpu.numa})", highlight=False)
        runs = [what for key, what in (("expert_parallel", "expert parallelism"), ("uneven_ranks", "uneven EP ranks"),
                                       ("nested", "nested int8/int4 planes"), ("miss_copy", "low-bit miss copies"),
                                       ("kv_offload", "KV cache in host memory"))
                if getattr(getattr(p, key), "value", getattr(p, key))]
        console.print("also runs: " + (", ".join(runs) or "none of expert parallelism, uneven EP ranks, nested "
                                                          "planes, miss copies, a host KV cache"), highlight=False)
        gpu = e.kind_spec("gpu")
        unpacked = {fm: k for fm, k in (gpu.kernels.items() if gpu else ()) if fm in ("int8", "int4", "int2")
                    and hasattr(k, "unpack_weights_per_s")}
        if p.nested and p.nested.value and unpacked:  # why its plans rarely hold planes (README, nested formats)
            rates = ", ".join(f"{fm} {k.unpack_weights_per_s / 1e9:g}G" for fm, k in unpacked.items())
            console.print(f"nested planes run on its GPU's unpack path ({rates} weights/s, every call): the planner "
                          "chooses them only where that beats the CPU running the same experts", highlight=False)
    get_output().emit(data, render)


@engines.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@common_options
def validate(files: tuple[str, ...]) -> None:
    """Check engine profile FILES; each error names the file, line, key, value and a fix."""
    validate_files(files, lambda f: {"name": load_engine(f).name}, lambda r: f"engine {r['name']}")


@engines.command("schema")
def schema() -> None:
    """Print the JSON Schema of an engine profile."""
    click.echo(json.dumps(EngineProfile.model_json_schema(), indent=2))


@engines.command("probe")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Write the measured engine profile (YAML) here.")
@click.option("--dir", "directory", default=".", show_default=True, metavar="DIR",
              help="Time expert reads from the disk holding this directory (a temporary file is written there "
                   "and removed).")
@click.option("--work", type=click.Path(file_okay=False), default=None,
              help="Keep the tiny checkpoints and kernels here (default: a temporary directory).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Time the runtime on this device: cpu fills the profile's cpu section, cuda its gpu section.")
@click.option("--budget", "budget_s", type=click.FloatRange(1.0, 600.0), default=12.0, show_default=True,
              help="Seconds of timed forward steps (imports and building the checkpoint come on top).")
@click.option("--page-cache", type=click.Choice(["cold", "warm"]), default="cold", show_default=True,
              help="Which disk read fraction the profile gets: cold (experts read from the drive) or warm (free "
                   "memory keeps the disk tier's files in the page cache). Both are measured and printed.")
@click.option("--hardware", "-H", "hardware", default=None, metavar="PROFILE",
              help="The hardware profile the engine will be priced on (a probed one of this machine): the CPU "
                   "kernel's efficiency and the disk read fraction are taken relative to its CPU bandwidth and peak "
                   "and its drive's rate, so that it prices the kernel and a miss at the times measured here "
                   "(default: the probe measures those figures itself, as `planner profiles probe` does).")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
@click.option("--tiny", is_flag=True, hidden=True, help="For tests: a few steps of a smaller grid, rough figures.")
@common_options
def probe(out: str, directory: str, work: str | None, device: str, budget_s: float, page_cache: str,
          hardware: str | None, force: bool, tiny: bool) -> None:
    """Measure the bundle runtime's framework costs here and write them as an engine profile.

    Runs the runtime on tiny random checkpoints (built from a config: nothing is
    downloaded; compute is negligible) while varying the layers and the expert calls of a
    step, fits the cost per decode step, per prefill step, per layer, per token of a layer
    and per expert call by least squares, and times a cache miss (an expert read from the
    disk holding --dir and made ready to compute), with its pages cached or not, against a
    sequential read of that disk (or the drive's rate in --hardware), and the runtime's CPU
    expert kernel past the caches (against --hardware's CPU figures where given). The output
    is the bundled `bundle` profile with these numbers, each with its source. Takes about
    half a minute on 2 idle cores; other processes inflate every figure.

    \b
    Examples:
      planner engines probe --out my-bundle.yaml --hardware my-machine.yaml
      planner optimize --engine my-bundle.yaml --hardware my-machine.yaml -m olmoe-1b-7b
    """
    import tempfile
    from pathlib import Path

    from profiles.engines import ENGINES_DIR
    from profiles.probe import check_directory, check_output

    check_output(out, force)  # fail before half a minute of measuring, not after
    disk_dir = check_directory(directory)
    references = _references(hardware) if hardware else None
    try:
        import exporters.runtime  # noqa: F401  (first: it makes torch's OpenMP threads sleep, as in a bundle)
        from exporters.engine_probe import (PROMPT, TINY, ProbeSettings, References, check_device, engine_profile_doc,
                                            engine_profile_text, probe_engine)
    except ImportError as exc:
        raise InputError(f"probing the runtime needs the runtime extra ({exc.name} is missing)",
                         fix="pip install torch==2.13.0 && pip install 'moe-planner[runtime]'") from None
    check_device(device)
    output = get_output()
    with tempfile.TemporaryDirectory(prefix="engine-probe-") as tmp:
        settings = TINY if tiny else ProbeSettings(budget_s=budget_s)
        result = probe_engine(work or tmp, settings, device=device, disk_dir=disk_dir,
                              references=References(**references) if references else None,
                              progress=lambda line: output.log.print(f"probe: {line}", highlight=False))
    base = yaml.safe_load((ENGINES_DIR / "bundle.yaml").read_text(encoding="utf-8"))
    doc = engine_profile_doc(result, base, page_cache)
    target = Path(out)
    previous = target.read_text(encoding="utf-8") if target.is_file() else None  # its comments stay (--force)
    target.write_text(engine_profile_text(doc, result, previous), encoding="utf-8")
    engine = load_engine(target)  # what was written loads
    data = {"file": str(target), "name": engine.name, "elapsed_s": result.elapsed_s, "launch_s": result.launch_s,
            "fit": result.fit, "disk_read_fraction": {k: m.value for k, m in result.disk_reads.items()},
            "disk_read_overhead_s": {k: m.value for k, m in result.disk_overheads.items()},
            "overheads": [{"where": k, "what": w, "seconds": s, "source": src} for k, w, s, src in overhead_rows(engine)]}

    def render(console):
        table = Table(title=f"bundle runtime on this machine ({result.elapsed_s:.0f} s)")
        for col in ("where", "what", "time", "source"):
            table.add_column(col, overflow="fold")
        for kind, what, seconds, source in overhead_rows(engine):
            table.add_row(kind, what, format_time(seconds), source)
        for state, m in result.disk_reads.items():
            mark = " (in the profile)" if state == page_cache else ""
            table.add_row("disk", f"read fraction, {state}{mark}", f"{m.value:.2f}", m.method)
        for state, m in result.disk_overheads.items():
            mark = " (in the profile)" if state == page_cache else ""
            table.add_row("disk", f"fixed cost per read, {state}{mark}", format_time(m.value), m.method)
        console.print(table)
        fit = result.fit
        note = "" if fit["prefill_layer"] is None else (
            f"; a prefill layer costs {format_time(fit['prefill_layer'])} ({len(PROMPT)} tokens), a decode layer "
            f"{format_time(fit['layer'])}: {format_time(fit['token'])} per token past the first (token_overhead_s)")
        console.print(f"fit: decode residuals {fit['rms_rel']:.1%} rms of the mean step{note}; wrote {target}",
                      highlight=False)
    output.emit(data, render)


def _references(path: str) -> dict:
    """The figures of hardware profile ``path`` the engine probe's fractions are taken
    against (``exporters.engine_probe.References``): the first CPU's memory bandwidth and
    int8 peak as the bundle engine sees them (its kernel family picks the peak), the first
    drive's read rate; one-line error for a bad profile."""
    from profiles.hardware import load_profile
    from profiles.perf import compute_format

    _, hw = load_profile(path)
    seen = load_engine("bundle").apply(hw)
    cpu = next((d for d in seen.devices.values() if d.kind == "cpu" and d.peak_ops_per_s), None)
    disk = next((d for d in hw.devices.values() if d.kind == "nvme"), None)
    return {"name": path, "read_bytes_per_s": cpu.memory_bytes_per_s if cpu else None,
            "peak_ops_per_s": cpu.peak_ops_per_s[compute_format(cpu, "int8")] if cpu else None,
            "disk_bytes_per_s": disk.memory_bytes_per_s if disk else None}
