"""`planner models`: list the bundled presets, show one model (or an HF config.json)."""

from __future__ import annotations

import click
from rich.table import Table

from profiles.formats import FORMATS
from profiles.hardware import load_profile
from profiles.hf_config import ARCHITECTURES
from profiles.limits import MAX_BATCH, MAX_CONTEXT_TOKENS
from profiles.models import bundled_models, describe_model, load_model
from profiles.units import format_size

from ..output import get_output
from ._common import common_options

__all__ = ["models"]


@click.group()
def models() -> None:
    """Model specs: the bundled presets and Hugging Face config.json files.

    A model is a preset name (see `planner models list`), a config.json, or a checkpoint
    directory holding one. Supported: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, GLM-4.5,
    Phi-3.5-MoE, gpt-oss, GraniteMoE, DBRX, Jamba, Llama-4 and LongCat-Flash.
    """


@models.command("list")
@common_options
def list_models() -> None:
    """List the bundled model presets with their computed and published parameter counts."""
    rows = []
    for name in bundled_models():
        spec = load_model(name)
        pub = spec.published
        rows.append({
            "name": spec.name, "architecture": spec.architecture, "num_hidden_layers": spec.num_hidden_layers,
            "num_moe_layers": spec.num_moe_layers, "num_experts": spec.num_experts,
            "num_shared_experts": spec.num_shared_experts, "zero_experts": spec.zero_experts.count,
            "top_k": spec.top_k, "total_params": spec.total_params, "active_params": spec.active_params(),
            "active_params_without_input_embedding": spec.active_params(include_input_embedding=False),
            "published_total_params": pub.total_params if pub else None,
            "published_active_params": pub.active_params if pub else None,
            "active_counts_input_embedding": pub.active_counts_input_embedding if pub else None,
        })

    def render(console):
        table = Table(title="Bundled models (active: as the publisher counts it)")
        for col in ("name", "family", "layers", "MoE layers", "experts", "top-k", "total", "active",
                    "published"):
            table.add_column(col, no_wrap=col in ("name", "total", "active"), overflow="fold")
        for r in rows:
            shared = f" + {r['num_shared_experts']} shared" if r["num_shared_experts"] else ""
            counts_embedding = r["active_counts_input_embedding"] is not False
            active = r["active_params"] if counts_embedding else r["active_params_without_input_embedding"]
            published = (f"{_params(r['published_total_params'], 'g')} / {_params(r['published_active_params'], 'g')}"
                         if r["published_total_params"] else "-")
            table.add_row(r["name"], ARCHITECTURES[r["architecture"]].family, str(r["num_hidden_layers"]),
                          str(r["num_moe_layers"]), f"{r['num_experts']}{shared}", str(r["top_k"]),
                          _params(r["total_params"]), _params(active), published)
        console.print(table)

    get_output().emit(rows, render)


@models.command("show")
@click.argument("model")
@click.option("--hardware", "hardware", metavar="PROFILE",
              help="Hardware profile (bundled name or YAML path): check which formats fit each memory pool.")
@click.option("--context", "context_tokens", type=click.IntRange(min=0, max=MAX_CONTEXT_TOKENS), default=4096, show_default=True,
              help="Tokens per sequence held in the KV cache for the fit check.")
@click.option("--batch", "batch_size", type=click.IntRange(min=1, max=MAX_BATCH), default=1, show_default=True,
              help="Sequences held at once for the fit check.")
@click.option("--kv-format", type=click.Choice(list(FORMATS)), default="bf16", show_default=True,
              help="Number format of the KV cache.")
@common_options
def show(model: str, hardware: str | None, context_tokens: int, batch_size: int, kv_format: str) -> None:
    """Show a model's shape, parameters, bytes per format and KV cache.

    MODEL is a bundled preset name, a config.json path, or a directory holding config.json.
    With --hardware, each memory pool of the profile is checked: do all weights in each
    format, plus the KV cache for --context tokens x --batch sequences, fit in it alone?
    """
    spec = load_model(model)
    memories = list(load_profile(hardware)[1].memories.values()) if hardware else None
    data = describe_model(spec, context_tokens=context_tokens, batch_size=batch_size, kv_format=kv_format,
                          memories=memories)
    data["hardware"] = hardware

    def render(console):
        console.print(f"[bold]{spec.name}[/bold] ({spec.architecture}) from {spec.source}", highlight=False)
        console.print(_shape_table(data))
        console.print(_params_table(data))
        console.print(_bytes_table(data))
        kv = data["kv_cache"]
        line = (f"KV cache ({kv['format']}): {format_size(kv['bytes_per_token'])} per token; "
                f"{format_size(kv['bytes'])} for {kv['context_tokens']} tokens x {kv['batch_size']} sequence(s)")
        if kv["mamba_state_bytes_per_sequence"]:
            line += f" (Mamba state {format_size(kv['mamba_state_bytes_per_sequence'])} per sequence included)"
        console.print(line, highlight=False)
        for note in data["notes"]:
            console.print(f"note: {note}", highlight=False)
        if "fit" in data:
            console.print(_fit_table(data))

    get_output().emit(data, render)


# --------------------------------------------------------------------------- rendering


def _params(n: float | None, digits: str = ".2f") -> str:
    """Parameter count with a B/M/K suffix: 46.70B, 44.0M, 9.2K."""
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:{digits}}{suffix}"
    return f"{n:.0f}"


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 9] -> '0-2, 5, 7, 9' (long runs of a stride stay readable)."""
    parts, start = [], 0
    while start < len(indices):
        end = start
        while end + 1 < len(indices) and indices[end + 1] == indices[end] + 1:
            end += 1
        parts.append(str(indices[start]) if end == start else f"{indices[start]}-{indices[end]}")
        start = end + 1
    text = ", ".join(parts)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _shape_table(d: dict) -> Table:
    table = Table(title="Shape", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    experts = f"{d['num_experts']} routed, top-{d['top_k']}"
    if d["num_shared_experts"]:
        experts += f", {d['num_shared_experts']} shared (FFN {d['shared_expert_intermediate_size']})"
    zero = d["zero_experts"]
    if any(zero.values()):
        experts += ", zero-computation: " + ", ".join(f"{v} {k}" for k, v in zero.items() if v)
    if d["n_group"] > 1:
        experts += f"; {d['n_group']} groups, {d['topk_group']} per token"
    if d["attention"] == "mla":
        attention = (f"MLA, {d['num_attention_heads']} heads, kv_lora_rank {d['kv_lora_rank']}, "
                     f"rope {d['qk_rope_head_dim']}, q_lora_rank {d['q_lora_rank'] or '-'}")
    else:
        attention = f"GQA, {d['num_attention_heads']} heads / {d['num_key_value_heads']} KV, head_dim {d['head_dim']}"
    windows = sorted({w for w in d["attention_window_tokens"] if w is not None})
    if windows:
        attention += f"; windowed layers: {sum(w is not None for w in d['attention_window_tokens'])} (" + \
            ", ".join(str(w) for w in windows) + " tokens)"
    rows = [
        ("layers", f"{d['num_hidden_layers']} ({d['num_moe_layers']} MoE: {_ranges(d['moe_layer_indices'])})"),
        ("hidden / expert FFN", f"{d['hidden_size']} / {d['expert_intermediate_size']}"),
        ("experts per MoE layer", experts),
        ("attention", attention + f" in {len(d['attention_layer_indices'])} sublayers"),
        ("vocab", f"{d['vocab_size']}" + (" (tied embeddings)" if d["tie_word_embeddings"] else "")),
    ]
    if d["mamba_layer_indices"]:
        rows.insert(4, ("Mamba layers", _ranges(d["mamba_layer_indices"])))
    for row in rows:
        table.add_row(*row)
    return table


def _params_table(d: dict) -> Table:
    table = Table(title="Parameters")
    table.add_column("part")
    table.add_column("params", justify="right")
    for label, key in (("routed experts (all)", "expert_params"), ("one routed expert", "params_per_expert"),
                       ("embedding", "embedding_params"), ("output head", "lm_head_params"),
                       ("attention", "attention_params"), ("Mamba", "mamba_params"),
                       ("dense FFN layers", "dense_mlp_params"), ("shared experts", "shared_expert_params"),
                       ("routers", "router_params"), ("norms", "norm_params"), ("dense (non-expert)", "dense_params"),
                       ("total", "total_params"), ("active per token", "active_params"),
                       ("active, input embedding not counted", "active_params_without_input_embedding")):
        if d[key] or key in ("total_params", "active_params"):
            table.add_row(label, _params(d[key]))
    pub = d["published"]
    if pub:
        table.add_row("published total / active",
                      f"{_params(pub['total_params'], 'g')} / {_params(pub['active_params'], 'g')}"
                      f" ({'with' if pub['active_counts_input_embedding'] else 'without'} input embedding)")
    return table


def _bytes_table(d: dict) -> Table:
    table = Table(title="Weights by number format (group-wise scales/zeros included)")
    for col in ("format", "bits/weight", "one expert", "all experts", "dense", "total"):
        table.add_column(col, justify="right" if col != "format" else "left")
    for r in d["bytes_by_format"]:
        table.add_row(r["format"], f"{r['bits_per_weight']:.3f}", format_size(r["expert_bytes"]),
                      format_size(r["experts_bytes"]), format_size(r["dense_bytes"]), format_size(r["weight_bytes"]))
    return table


def _fit_table(d: dict) -> Table:
    # Identical pools (8 GPUs of a node) collapse into one column so a cluster stays readable.
    groups: dict[tuple, list[str]] = {}
    for r in d["fit"]:
        key = (r["tier"], r["capacity_bytes"])
        if r["memory"] not in groups.setdefault(key, []):
            groups[key].append(r["memory"])
    kv = d["kv_cache"]
    table = Table(title=f"Fits alone? all weights + KV for {kv['context_tokens']} tokens x {kv['batch_size']} "
                        f"({format_size(kv['bytes'])}) on {d['hardware']}")
    table.add_column("format")
    for (tier, capacity), ids in groups.items():
        more = f" (+{len(ids) - 1} alike)" if len(ids) > 1 else ""
        table.add_column(f"{ids[0]}{more}\n{tier} {format_size(capacity)}", justify="right")
    by_cell = {(r["format"], r["memory"]): r for r in d["fit"]}
    for fmt in FORMATS:
        cells = []
        for ids in groups.values():
            r = by_cell[(fmt, ids[0])]
            cells.append(f"yes, {format_size(r['free_bytes'])} free" if r["fits"]
                         else f"no, {format_size(-r['free_bytes'])} short")
        table.add_row(fmt, *cells)
    return table
