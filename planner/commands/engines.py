"""`planner engines`: list, show, validate engine profiles (the software that runs a plan)."""

from __future__ import annotations

import json

import click
import yaml
from rich.table import Table

from profiles.engines import EngineProfile, bundled_engines, load_engine, overhead_rows
from profiles.errors import UserError
from profiles.units import format_time

from ..output import get_output
from ._common import common_options

__all__ = ["engines"]


@click.group()
def engines() -> None:
    """Engine profiles: how the software that runs a plan turns hardware into speed.

    A prediction is for (hardware, engine). An engine profile states framework overheads
    (per layer, per expert call, per step), the kernel path of each format on each kind of
    device (native, unpack-then-matmul at a rate, unsupported), the CPU kernel family,
    pinned or pageable host memory, and what it can place, cache and prefetch. Every number
    names its source. `planner optimize --engine NAME` plans for one; the default is
    `bundle`, this project's runtime.
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
                text = path if isinstance(path, str) else (f"unpack at {path.unpack_weights_per_s / 1e9:g}G weights/s "
                                                           f"({path.source})")
                kernels.add_row(kind, fmt, text)
        console.print(kernels)
        console.print(f"placement per {p.placement}; sites {', '.join(p.sites)}; eviction "
                      f"{', '.join(p.eviction) or 'none (no expert cache)'}; prefetch {', '.join(p.prefetch)}; "
                      f"host memory {p.host_memory}; cpu kernels {p.cpu.kernel_family} ({p.cpu.numa})", highlight=False)
    get_output().emit(data, render)


@engines.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@common_options
def validate(files: tuple[str, ...]) -> None:
    """Check engine profile FILES; each error names the file, line, key, value and a fix."""
    results = []
    for f in files:
        try:
            e = load_engine(f)
            results.append({"file": f, "ok": True, "name": e.name})
        except UserError as exc:
            results.append({"file": f, "ok": False, "error": str(exc)})

    def render(console):
        for r in results:
            if r["ok"]:
                console.print(f"ok: {r['file']} (engine {r['name']})", highlight=False)
    get_output().emit(results, render)
    for r in results:
        if not r["ok"]:
            click.echo(f"error: {r['error']}", err=True)
    if any(not r["ok"] for r in results):
        raise click.exceptions.Exit(1)


@engines.command("schema")
def schema() -> None:
    """Print the JSON Schema of an engine profile."""
    click.echo(json.dumps(EngineProfile.model_json_schema(), indent=2))
