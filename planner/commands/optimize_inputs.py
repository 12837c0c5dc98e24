"""What `planner optimize` reads besides its plain options: the number formats, the critical
experts, the measured quality file, per-layer fixes, a given configuration (--policy, --fix-*)
and the routing trace, each checked at the boundary with one-line errors."""

from __future__ import annotations

from typing import Callable, get_args

import click

from profiles.errors import InputError
from profiles.limits import MAX_EXPERTS, MAX_LAYERS
from profiles.units import parse_size

from ..baselines import BASELINE_ENGINES, BASELINES
from ..given import HOME_TIERS, Fixes, GivenPolicy
from ..plan import Plan

__all__ = ["parse_miss_copy", "parse_formats", "parse_critical", "load_quality", "given_configuration",
           "given_options", "load_trace", "check_requested_planes"]


def check_requested_planes(engine: str | None, nested: bool, miss_copy: str | None, formats: tuple[str, ...]) -> None:
    """``--nested`` and ``--miss-copy`` that no plan could use, refused in one line: the engine
    runs no nested planes (no low-bit copies, or no fetched experts), or no candidate format
    has its half among the candidates (int8 nests as int4 + int4, int4 as int2 + int2). Other
    cases stay plans: the ILP is offered the feature and may not choose it."""
    from profiles.engines import load_engine
    from profiles.nested import NESTED

    if not nested and miss_copy is None:
        return
    eng = load_engine(engine)
    flag = " --engine bundle" if eng.name != "bundle" else ""
    if nested and not (eng.profile.nested and eng.profile.nested.value):
        raise InputError(f"engine {eng.name} does not run nested planes (its profile has no nested flag)",
                         key="--nested", fix=f"drop --nested, or plan for an engine that runs them{flag}")
    if nested and not any(f in formats and half in formats for f, half in NESTED.items()):
        pairs = " or ".join(f"{f} with {half}" for f, half in NESTED.items())
        raise InputError("--nested needs a nestable format and its half among --formats", key="--nested",
                         value=",".join(formats), expected=pairs,
                         fix=f"e.g. --formats {','.join(dict.fromkeys((*formats, 'int8', 'int4')))}, or drop --nested")
    if miss_copy is not None and not (eng.profile.miss_copy and eng.profile.miss_copy.value
                                      and "fetch" in eng.profile.sites):
        raise InputError(f"engine {eng.name} does not load low-bit copies of fetched experts", key="--miss-copy",
                         value=miss_copy, fix=f"drop --miss-copy, or plan for an engine that runs them{flag}")


def parse_miss_copy(text: str | None) -> tuple[str, float] | None:
    """``--miss-copy FORMAT:GATE`` as ``(format, gate)`` (planner.miss_copy_options); None: not asked."""
    from profiles.miss_copy import COPY_FORMATS

    if text is None:
        return None
    fmt, _, gate = text.partition(":")
    try:
        value = float(gate)
    except ValueError:
        value = float("nan")
    if fmt not in COPY_FORMATS or not 0 < value <= 1:
        raise InputError("--miss-copy takes a copy format and a gate threshold", key="--miss-copy", value=text,
                         expected=f"FORMAT:GATE, FORMAT one of {', '.join(COPY_FORMATS)}, 0 < GATE <= 1",
                         fix="e.g. --miss-copy int4:0.3")
    return fmt, value


def parse_formats(value: str) -> tuple[str, ...]:
    from profiles.formats import get_format

    formats = tuple(f.strip() for f in value.split(",") if f.strip())
    if not formats:
        raise InputError("no formats given", key="--formats", value=value, expected="e.g. bf16,int8,int4",
                         fix="list one or more number formats")
    for fm in formats:
        try:
            get_format(fm)
        except InputError as exc:
            raise InputError(exc.message, key="--formats", value=fm, expected=exc.expected,
                             fix="use known formats, comma-separated") from None
    return formats


def parse_critical(value: str | None, num_layers: int) -> tuple[tuple[int, ...], ...]:
    if not value:
        return ()
    per_layer: list[set[int]] = [set() for _ in range(num_layers)]
    for item in value.split(","):
        try:
            layer, expert = (int(x) for x in item.strip().split(":"))
            per_layer[layer].add(expert)
        except (ValueError, IndexError):
            raise InputError("invalid critical expert", key="--critical", value=item.strip(),
                             expected=f"MOE_LAYER:EXPERT pairs with MOE_LAYER < {num_layers}",
                             fix="write e.g. --critical 0:3,1:17") from None
    return tuple(tuple(sorted(s)) for s in per_layer)


def load_quality(path: str | None, spec, critical: str | None, candidates: tuple[str, ...]) -> dict:
    """``--quality``: ``{errors: {format: [L, E]} | None, digest, critical: per-layer super experts}``.

    Every quantised candidate the runtime can measure must be in the file: a measured int4 next
    to int3's constant would compare numbers of different origin (formats it cannot measure,
    e.g. GGUF types, keep their constant)."""
    if path is None:
        if critical == "auto":
            raise InputError("--critical auto pins the super experts a quality file flags", key="--critical",
                             value="auto", fix="add --quality quality.json (planner quality measure), or list "
                             "MOE_LAYER:EXPERT pairs")
        return {"errors": None, "digest": None, "critical": ()}
    from profiles.quality import check_matches, error_table, file_digest, load_quality, super_experts

    from ..plan_digest import model_digest

    q = load_quality(path)
    check_matches(q, path, model_name=spec.name, model_digest=model_digest(spec), num_layers=spec.num_moe_layers,
                  num_experts=spec.num_experts)
    from exporters.quality import CASTS, MEASURABLE

    missing = [fm for fm in candidates if fm in MEASURABLE and fm not in CASTS and fm not in q.formats]
    if missing:
        raise InputError("the quality file has no measured errors for a candidate format", file=path,
                         key="formats", value=q.formats, expected=f"also {', '.join(missing)}",
                         fix=f"measure them (planner quality measure --formats {','.join(q.formats + missing)}) "
                             "or drop them from --formats")
    return {"errors": error_table(q, q.formats), "digest": file_digest(path), "critical": super_experts(q)}


def _parse_per_layer(value: str | None, flag: str, num_layers: int) -> tuple[int | None, ...]:
    """``N`` (every MoE layer) or ``MOE_LAYER:N`` pairs -> one entry per MoE layer (None: not fixed)."""
    if value is None:
        return ()
    expected = f"N or MOE_LAYER:N pairs (e.g. 0:2,5:4) with MOE_LAYER < {num_layers} and N >= 0"
    try:
        if ":" not in value:
            per_layer = [int(value)] * num_layers
        else:
            per_layer = [None] * num_layers
            for item in value.split(","):
                layer, n = (int(x) for x in item.strip().split(":"))
                if not 0 <= layer < num_layers:
                    raise ValueError
                per_layer[layer] = n
    except ValueError:
        raise InputError("invalid per-layer value", key=flag, value=value, expected=expected,
                         fix=f"write e.g. {flag} 2 or {flag} 0:2,5:4") from None
    if any(n is not None and n < 0 for n in per_layer):
        raise InputError("a count cannot be negative", key=flag, value=value, expected=expected, fix="give N >= 0")
    return tuple(per_layer)


def given_configuration(options: dict, num_layers: int) -> tuple[GivenPolicy | None, Fixes | None, tuple[str, ...]]:
    """The given configuration, the fixes and the formats they name, from the CLI's options."""
    policy, gpu_memory = options["policy"], options["gpu_memory"]
    params = {"gpu_memory_bytes": parse_size(gpu_memory) if gpu_memory is not None else None,
              "n_cpu_moe": options["n_cpu_moe"], "cache_slots": options["cache_slots"]}
    if policy is None:
        flag = next((f"--{k.replace('_', '-')}" for k in ("gpu_memory", "n_cpu_moe", "cache_slots")
                     if options[k] is not None), None)
        if flag:
            raise InputError(f"{flag} is a parameter of a given configuration", key=flag, fix="add --policy NAME")
    for fm in (options["fix_format"], options["fix_dense_format"]):
        if fm is not None:
            parse_formats(fm)
    fixes = Fixes(cache_slots=_parse_per_layer(options["fix_cache_slots"], "--fix-cache-slots", num_layers),
                  resident=_parse_per_layer(options["fix_resident"], "--fix-resident", num_layers),
                  expert_format=options["fix_format"], dense_format=options["fix_dense_format"],
                  home=options["fix_home"])
    if policy is not None:
        placed = next((f for f, v in (("--fix-cache-slots", fixes.cache_slots), ("--fix-resident", fixes.resident),
                                      ("--fix-home", fixes.home)) if v), None)
        if placed:
            raise InputError(f"{placed} fixes part of an ILP plan; --policy {policy} places every expert itself",
                             key=placed, fix="drop it, or use the policy's own parameter (--cache-slots, "
                                             "--n-cpu-moe, --gpu-memory)")
    return (GivenPolicy(policy, **params) if policy else None, fixes if fixes != Fixes() else None,
            fixes.formats())


def given_options(func: Callable) -> Callable:
    """The options of a given configuration (--policy ...), the --fix-* options and the policies."""
    options = [
        click.option("--policy", type=click.Choice(list(BASELINES)), default=None,
                     help="Price this tool's placement as the plan instead of solving (a published or your own "
                     "setup), on its engine unless --engine names another: " + ", ".join(
                         f"{n} ({e})" for n, e in BASELINE_ENGINES.items()) + ". Parameters: --gpu-memory, "
                     "--n-cpu-moe, --cache-slots. A placement that does not fit exits 3 naming the shortfall."),
        click.option("--gpu-memory", default=None, help="--policy accelerate: its max_memory for the GPU, the "
                     "weights it places there (dense, then whole MoE layers), e.g. 10GiB. Default: what fits."),
        click.option("--n-cpu-moe", type=click.IntRange(min=0, max=MAX_LAYERS), default=None,
                     help="--policy llama.cpp: the experts of exactly the first N MoE layers run on the CPU. "
                     "Default: the smallest N that fits."),
        click.option("--cache-slots", type=click.IntRange(min=1, max=MAX_EXPERTS), default=None,
                     help="--policy lru-offload: expert-cache slots per layer (every expert offloaded). "
                     "Default: the fastest that fits."),
        click.option("--prefetch", type=click.Choice(get_args(Plan.model_fields["prefetch"].annotation)),
                     default=None, help="Prefetch policy the plan records and the simulator runs; the engine must "
                     "list it; any but none is priced as next-layer prefetch. Default: the faster of none and "
                     "next-layer (a --policy: its own)."),
        click.option("--eviction", type=click.Choice(get_args(Plan.model_fields["eviction"].annotation)),
                     default=None, help="Cache eviction the plan records and the simulator runs; the engine must "
                     "list it. Priced by LRU hit rates. Default: lru."),
        click.option("--fix-cache-slots", default=None, help="ILP: cache slots of every MoE layer (2) or per MoE "
                     "layer (0:2,5:4); the ILP decides the rest."),
        click.option("--fix-resident", default=None, help="ILP: how many of each layer's most frequent experts "
                     "stay resident on the GPU, N or MOE_LAYER:N pairs."),
        click.option("--fix-format", default=None, help="Format of every routed expert (resident and offloaded); "
                     "with --policy: the format you run, whatever the quality budget."),
        click.option("--fix-dense-format", default=None, help="Format of the dense (non-expert) weights."),
        click.option("--fix-home", type=click.Choice(HOME_TIERS), default=None,
                     help="ILP: where offloaded experts live (host DRAM or NVMe)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def load_trace(path: str | None, task: str | None):
    """The routing trace at ``path`` (``task`` inside a multi-task file); None without a path.

    ``--task`` without ``--trace`` is refused: it names a task of the trace file, and a plan
    from the model's default workload would not be the task's."""
    from profiles.workload.importers import load_workload
    from profiles.workload.trace import Trace

    if path is None:
        if task:
            raise InputError("--task names a task inside a --trace file; no --trace was given", key="--task",
                             value=task, fix="add --trace FILE (a multi-task trace, e.g. ESFT's), or drop --task")
        return None
    workload = load_workload(path, task)
    if not isinstance(workload, Trace):
        raise InputError("an aggregate workload has no per-token routing to measure cache hit rates on", file=path,
                         fix=f"synthesise a calibrated trace first: planner trace synth --like {path} --out trace.npz")
    return workload
