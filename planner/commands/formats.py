"""`planner formats`: list the number formats, show one, validate a user formats file."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from profiles.formats import (SOURCES, NumberFormat, all_formats, default_quant_error, get_format, load_formats,
                              quant_error_for_bits)

from ..output import get_output
from ._common import common_options

__all__ = ["formats"]

_FILE_OPTION = click.option("--file", "-f", "files", multiple=True, type=click.Path(path_type=Path),
                            help="A formats YAML file to load first (repeatable).")


@click.group()
def formats() -> None:
    """Number formats: built-in, every GGUF type, llama.cpp file-type mixes, and your own.

    A user formats file is YAML:

    \b
      formats:
        - {name: hqq3g64, bits: 3, group_size: 64, scale_dtype: fp16, zero_dtype: fp16, kind: int}

    A mix (q4_k_m, ...) stores expert tensors in several GGUF types by llama.cpp's rules; its
    bits/weight is the layer average for a 32-layer model (`formats show NAME --layers N`).
    """


@formats.command("list")
@click.option("--source", type=click.Choice(SOURCES), help="Only formats from this source.")
@_FILE_OPTION
@common_options
def list_formats(source: str | None, files: tuple[Path, ...]) -> None:
    """List every known format: name, kind, bits/weight, group, source."""
    for path in files:
        load_formats(path)
    rows = [_row(f) for f in all_formats().values() if source in (None, f.source)]

    def render(console):
        table = Table(title="Number formats (bits/weight include scales and zero points)")
        for col in ("name", "kind", "bits/weight", "group", "source", "quant error"):
            table.add_column(col, justify="right" if col in ("bits/weight", "group", "quant error") else "left")
        for r in rows:
            table.add_row(r["name"], r["kind"], f"{r['bits_per_weight']:.4g}", str(r["group_size"] or "-"),
                          r["source"], f"{r['quant_error']:.3g}")
        console.print(table)

    get_output().emit(rows, render)


@formats.command("show")
@click.argument("name")
@click.option("--layers", "n_layers", type=click.IntRange(min=1), default=None,
              help="Hidden layers of the model, for a llama.cpp mix (default 32).")
@click.option("--experts", "n_experts", type=click.IntRange(min=1), default=8, show_default=True,
              help="Routed experts per layer, for a llama.cpp mix (IQ3_M treats 8 specially).")
@_FILE_OPTION
@common_options
def show(name: str, n_layers: int | None, n_experts: int, files: tuple[Path, ...]) -> None:
    """Show one format's layout, bits/weight and quantisation error; a mix's types per layer."""
    for path in files:
        load_formats(path)
    fmt = get_format(name)
    data = _row(fmt)
    if fmt.source == "gguf-mix":
        from profiles.gguf_formats import MIXES, TYPICAL_N_LAYERS, mix_layer_bits, mix_layer_types

        n = n_layers or TYPICAL_N_LAYERS
        bits = mix_layer_bits(name, n, n_experts=n_experts)
        types = mix_layer_types(name, n, n_experts=n_experts)
        del data["payload_bits"]  # the 32-layer average; bits_per_weight is this model's
        data.update(file_type=MIXES[name], n_layers=n, n_experts=n_experts, bits_per_weight=sum(bits) / n,
                    quant_error=quant_error_for_bits(sum(bits) / n),
                    layers=[{"layer": i, **t, "bits_per_weight": b} for i, (t, b) in enumerate(zip(types, bits))])

    def render(console):
        table = Table(title=f"{fmt.name} ({fmt.source})", show_header=False)
        table.add_column("field")
        table.add_column("value", overflow="fold")
        for key, value in data.items():
            if key == "layers" or (value in (None, 0) and key != "quant_error"):
                continue  # zero scale bits, no block bytes: nothing to say
            table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
        console.print(table)
        if "layers" in data:
            console.print(_layers_table(data["layers"]))

    get_output().emit(data, render)


@formats.command("validate")
@click.argument("file", type=click.Path(path_type=Path))
@common_options
def validate(file: Path) -> None:
    """Check a formats file without registering it; exit 1 with one line if it is wrong."""
    rows = [_row(f) for f in load_formats(file, register=False)]
    data = {"file": str(file), "valid": True, "formats": rows}

    def render(console):
        console.print(f"{file}: {len(rows)} format(s) ok", highlight=False)
        for r in rows:
            console.print(f"  {r['name']}: {r['bits_per_weight']:.6g} bits/weight, quant error "
                          f"{r['quant_error']:.3g}", highlight=False)

    get_output().emit(data, render)


def _row(f: NumberFormat) -> dict:
    return {"name": f.name, "kind": f.kind, "bits_per_weight": f.bits_per_weight, "group_size": f.group_size,
            "source": f.source, "payload_bits": f.payload_bits, "scale_bits": f.scale_bits, "zero_bits": f.zero_bits,
            "block_bytes": f.block_bytes, "quant_error": default_quant_error(f),
            "quant_error_stated": f.quant_error is not None}


def _layers_table(layers: list[dict]) -> Table:
    # consecutive layers with the same types collapse into one row
    table = Table(title="Expert tensor types per layer")
    for col in ("layers", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "bits/weight"):
        table.add_column(col, justify="right" if col == "bits/weight" else "left")
    runs: list[list[dict]] = []
    for row in layers:
        if runs and all(runs[-1][-1][k] == row[k] for k in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
            runs[-1].append(row)
        else:
            runs.append([row])
    for run in runs:
        first, last = run[0]["layer"], run[-1]["layer"]
        table.add_row(str(first) if first == last else f"{first}-{last}", run[0]["ffn_gate_exps"],
                      run[0]["ffn_up_exps"], run[0]["ffn_down_exps"], f"{run[0]['bits_per_weight']:.4g}")
    return table
