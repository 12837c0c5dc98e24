"""Measure the bundle runtime's framework costs on this machine (``planner engines probe``).

Legend: L = hidden layers (every one MoE), E = routed experts, K = top-k, N = expert calls
of a forward step (distinct experts per layer, summed over layers), P = prompt tokens.

The bundle runtime's engine profile (``profiles/engines/bundle.yaml``) prices what its
Python and framework layers add to the roofline (:mod:`profiles.perf`): a cost per forward
step, per hidden layer and per expert call, and the share of a drive's read rate that its
expert reads on a miss reach. This module measures them with the runtime itself, on
tiny random Mixtral checkpoints built from a config (no download, H = I = 64: every matmul
reads a few KiB, so compute is negligible), under hand-written plans:

1. decode steps for L in (1, 2, 4) x K in (1, 2, 4), every expert either resident or in a
   cache that holds them all (after a warm-up every access hits), timed by the runtime's
   own clock (``metrics.tpot_s``); the median step of each of the 18 configurations, fitted
   by least squares (numpy) as ``t = step + L * layer + N * call``, gives the three costs
   (then scaled to the mean step: see below);
2. prefill steps of P = 16 tokens on the same models: the prefill step cost is the median
   of ``t - L * layer - N * call``, N counted from the routers' choices;
3. the kernel call the hardware profile already prices (``launch_overhead_s``: one ONNX
   Runtime call of a tiny expert, fastest of many, as ``planner profiles probe`` times it;
   one torch matmul on CUDA) is taken off: a layer launches two kernels, an expert call one,
   a step one (:func:`profiles.perf.dense_step_s`);
4. disk: experts of three sizes (H = I = 384, 768, 1536: 0.5-7 MiB at int8) in safetensors
   files, read the way a cache miss reads them (the runtime's positional reads past the page
   cache, then made ready to compute: on a CPU a pre-packed ONNX Runtime session) with their
   pages dropped from the page cache (``posix_fadvise(DONTNEED)``) or cached; the median miss
   of each size, fitted by least squares as ``t = fixed + bytes * per_byte``
   (:mod:`exporters.engine_probe_disk`), gives ``disk_read_overhead_s`` (the fixed part: opening, reading
   calls, building the session) and, set against a sequential read of the largest file past
   the page cache, ``disk_read_fraction`` (``1 / per_byte`` over the sequential rate; cold by
   default). One size alone folds the fixed part into the rate, which then holds at that
   size only: a miss of half the bytes was priced at half the time. The copy worker's
   thread CPU time of the same misses, fitted alike, gives ``miss_host_cpu_s``: what a miss
   takes from the compute where the compute device is this CPU (profiles.perf.miss_compute_s).
5. CPU kernels past the caches (:mod:`exporters.engine_probe_kernels`): the runtime's own
   expert kernel for ``fmt`` on experts of two sizes that hold twice the last-level cache,
   against this machine's streaming read rate and GEMM peak measured as the hardware probe
   measures them: the profile's CPU ``efficiency`` (memory share, compute curve), which
   prices the bundle's CPU kernels over a probed hardware efficiency (:mod:`profiles.engines`),
   and the fixed part of a call there beyond the tiny call, added to the expert call cost;
   and the runtime's dense int8/int4 linear (its own one-matmul session) past the caches,
   whose fixed part beyond the tiny call each dense linear adds (``host_s_per_linear``).

The configurations stay loaded and are timed in rounds, one generation of each per round,
the number of rounds sized from the first within a budget (:class:`ProbeSettings`): on 2
CPU cores the probe takes 25-30 s (12 s of rounds, ~8 s of imports and tiny checkpoints, the
rest loading, launch and disk).

Medians for the split, means for the level: a run's TPOT and TTFT are means over its steps,
and a step's time on a shared machine is skewed to the right (another process takes a core,
a pool thread wakes late), so costs fitted to median steps under-price the mean step a run
pays (bundle runs measured 1.2-1.7x the median-priced steps). Least squares over
per-configuration means, though, splits the time between step, layer and call erratically
under load (one delayed configuration moves every term: at 100% CPU pressure it put a layer
at 0.47 ms and an expert call at 0.53 ms, against 0.97 and 0.09 ms from the medians, which
stay put). So the terms are fitted to the per-configuration medians and then scaled by the
grid's skew, the sum of the configurations' mean steps over the sum of their median steps
(:func:`mean_over_median`): the expected step at the medians' split. On an idle machine the
skew is near 1. A machine busy throughout inflates every figure, as it inflates the runs.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporters.engine_probe_disk import expert_reads, fit_miss_costs
from exporters.engine_probe_kernels import (CACHE_MULTIPLE, DENSE_SIZES, SHAPES, TOKENS, DenseLinearCost,
                                            KernelEfficiency, probe_dense_linear, probe_runtime_kernels)
from exporters.engine_probe_profile import dense_linear_s, engine_profile_doc, engine_profile_text, machine_line
from profiles.probe import Figure

__all__ = ["PROMPT", "TINY", "ProbeSettings", "EngineProbeResult", "References", "StepSample", "config_stat",
           "dense_linear_s", "fit_miss_costs", "fit_step_costs", "fit_warning", "mean_over_median", "scaled",
           "probe_engine",
           "engine_profile_doc", "engine_profile_text"]

EXPERTS = 8
SIZE = {"hidden_size": 64, "intermediate_size": 64}
PROMPT = list(range(3, 19))  # P = 16 token ids of the checkpoint's vocabulary
TERMS = ("step", "layer", "call")


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe times and for how long.

    Attributes:
        budget_s: seconds of timed generation, all configurations together.
        layers, top_k: the grid of hidden layers x top-k; every point runs twice (experts
            resident, experts cached).
        steps_per_round: decode steps of each configuration's generation in one round (one
            prefill each, too).
        min_rounds, max_rounds: rounds over every configuration (sized from the first).
        disk_sizes: H = I of the disk test's experts, one file per size (at least two sizes:
            the fit separates a fixed cost per miss from a cost per byte).
        disk_experts: experts in each size's file (each read once cold, once warm).
        kernel_budget_s, kernel_shapes, kernel_tokens, kernel_cache_multiple: the CPU kernel
            efficiency test (:mod:`exporters.engine_probe_kernels`): seconds of timed passes,
            (H, I) of its experts, tokens per call, and how many LLCs its experts hold.
        dense_sizes: K = N of the dense linears timed past the caches (their budget: a
            quarter of ``kernel_budget_s``).
    """

    budget_s: float = 12.0
    layers: tuple[int, ...] = (1, 2, 4)
    top_k: tuple[int, ...] = (1, 2, 4)
    steps_per_round: int = 4
    min_rounds: int = 3
    max_rounds: int = 40
    disk_sizes: tuple[int, ...] = (384, 768, 1536)
    disk_experts: int = 6
    kernel_budget_s: float = 4.0
    kernel_shapes: tuple[tuple[int, int], ...] = SHAPES
    kernel_tokens: tuple[int, ...] = TOKENS
    kernel_cache_multiple: float = CACHE_MULTIPLE
    dense_sizes: tuple[int, ...] = DENSE_SIZES


TINY = ProbeSettings(budget_s=0.0, layers=(1, 2), top_k=(1, 2), steps_per_round=2, min_rounds=2, max_rounds=2,
                     disk_sizes=(128, 256), disk_experts=2, kernel_budget_s=0.0,
                     kernel_shapes=((128, 128), (128, 256)), kernel_tokens=(1, 4), kernel_cache_multiple=0.0,
                     dense_sizes=(128, 256))  # tests: counts, not timings


@dataclass(frozen=True)
class StepSample:
    """One timed forward step: its seconds, layers, expert calls, phase and tokens."""

    seconds: float
    layers: int
    calls: int
    phase: str = "decode"
    config: str = ""
    tokens: int = 1  # tokens the step runs (a prefill: its prompt's)


@dataclass(frozen=True)
class EngineProbeResult:
    """What ``planner engines probe`` measured; :func:`engine_profile_doc` writes it as a profile."""

    device_kind: str  # cpu | gpu
    layer_overhead_s: Figure
    expert_call_overhead_s: Figure
    decode_step_s: Figure
    prefill_step_s: Figure
    disk_reads: dict[str, Figure]  # "cold" / "warm" -> the fraction of the drive's rate a miss's bytes reach
    launch_s: float
    fit: dict[str, Any] = field(default_factory=dict)  # raw coefficients, residuals, samples
    elapsed_s: float = 0.0
    disk_overheads: dict[str, Figure] = field(default_factory=dict)  # "cold" / "warm" -> fixed seconds per miss
    kernel: KernelEfficiency | None = None  # the CPU kernels past the caches (cpu only)
    # ... of a cached expert's own session, where the runtime runs it on fewer threads (cpu only)
    cached_kernel: KernelEfficiency | None = None
    token_overhead_s: Figure | None = None  # per hidden layer per token of a step past the first
    dense_linear: DenseLinearCost | None = None  # a dense int8/int4 linear's session past the caches (cpu only)
    # "cold" / "warm" -> the copy worker's CPU time per miss: {fixed_s, per_byte_s, source} (engine_probe_disk)
    miss_host_cpu: dict[str, dict[str, Any]] = field(default_factory=dict)


def fit_step_costs(samples: Sequence[StepSample]) -> dict[str, Any]:
    """Least squares of decode step times on layers and expert calls.

    ``t = step + L * layer + N * call`` over the decode samples. ``prefill_layer`` is the
    per-layer slope of the prefill samples' ``t - N * call`` (None unless they have two
    depths): a prefill layer of P tokens costs more than a decode layer of one, by
    ``(P - 1) * token`` -- the framework work of a layer that grows with the tokens
    (routing, gathering and scattering rows, eager ops), which the profile states as
    ``token_overhead_s`` (0 when the prefill layer is no dearer, or without the slope).
    The prefill step cost is the median of ``t - N * call - L * (layer + (P - 1) * token)``
    over the prefill samples (None without any).

    Returns:
        ``{"step": s, "layer": s, "call": s, "token": s, "prefill_step": s | None,
        "prefill_layer": s | None, "prefill_tokens": P | None, "rms_rel": r, "samples": n}``;
        ``rms_rel`` is the root mean square of the decode residuals over the mean decode step
        time.

    Raises:
        ValueError: fewer than 3 decode samples, or layers and calls that do not vary
            independently (the design matrix is singular).
    """
    decode = [s for s in samples if s.phase == "decode"]
    a = np.array([[1.0, s.layers, s.calls] for s in decode])  # [S, 3]
    t = np.array([s.seconds for s in decode])  # [S]
    if len(decode) < 3 or np.linalg.matrix_rank(a) < 3:
        raise ValueError("the decode samples must vary layers and expert calls independently")
    coef, *_ = np.linalg.lstsq(a, t, rcond=None)
    residual = t - a @ coef
    out: dict[str, Any] = dict(zip(TERMS, (float(c) for c in coef)))
    prefill = [s for s in samples if s.phase == "prefill"]
    left = np.array([s.seconds - s.calls * out["call"] for s in prefill])  # [S]
    depths = np.array([[1.0, s.layers] for s in prefill])  # [S, 2]
    out["prefill_layer"] = float(np.linalg.lstsq(depths, left, rcond=None)[0][1]) \
        if len({s.layers for s in prefill}) > 1 else None
    tokens = np.array([s.tokens for s in prefill])  # [S]
    out["prefill_tokens"] = int(np.median(tokens)) if prefill else None
    out["token"] = max(out["prefill_layer"] - out["layer"], 0.0) / (out["prefill_tokens"] - 1) \
        if out["prefill_layer"] is not None and out["prefill_tokens"] > 1 else 0.0
    per_layer = out["layer"] + (tokens - 1) * out["token"]  # [S]
    out["prefill_step"] = float(np.median(left - per_layer * np.array([s.layers for s in prefill]))) \
        if prefill else None
    out["rms_rel"] = float(np.sqrt(np.mean(residual**2)) / np.mean(t))
    out["samples"] = len(samples)
    return out


# --------------------------------------------------------------------------- measuring


def check_device(device: str) -> None:
    """Refuse ``cuda`` where torch sees no CUDA device (before any measuring)."""
    import torch

    from profiles.errors import InputError

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("torch sees no CUDA device", key="--device", value=device, fix="probe with --device cpu")


@dataclass(frozen=True)
class References:
    """The figures of the hardware profile the engine will be priced on that the probe's
    fractions are relative to (``planner engines probe --hardware``): its CPU's memory
    bandwidth and ``fmt`` peak as the bundle engine sees them, its drive's read rate (None:
    the probe measures each itself, as ``planner profiles probe`` would). With them, that
    profile prices the kernel and a miss at the times measured here."""

    name: str  # the profile, for the sources
    read_bytes_per_s: float | None = None
    peak_ops_per_s: float | None = None
    disk_bytes_per_s: float | None = None


def probe_engine(work: str | Path, settings: ProbeSettings = ProbeSettings(), *, device: str = "cpu",
                 fmt: str = "int8", disk_dir: str | Path | None = None, references: References | None = None,
                 progress: Callable[[str], None] | None = None) -> EngineProbeResult:
    """Time the bundle runtime on tiny checkpoints under ``work`` and fit its costs.

    Args:
        work: a directory for the checkpoints and kernels (kept; reused when probed again).
        settings: what to time and for how long (:class:`ProbeSettings`).
        device: ``cpu``, or ``cuda`` (the profile's gpu section) where torch has CUDA.
        fmt: the experts' and dense weights' format, int8 or int4 (its kernel path is timed).
        disk_dir: where the disk test's file goes (default ``work``): on the drive experts live on.
        references: the priced hardware's figures the fractions are relative to (:class:`References`).
        progress: called with a line before each stage.
    """
    say = progress or (lambda line: None)
    t0 = time.perf_counter()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    say("building a tiny random checkpoint and its kernels")
    ckpt, kernels = _tiny_checkpoint(work, fmt, max(settings.layers))
    configs = [(L, K, site) for L in settings.layers for K in settings.top_k for site in ("resident", "fetch")]
    say(f"timing {len(configs)} configurations in rounds")
    steps = _time_grid(work, ckpt, kernels, configs, fmt, device, settings)
    medians, skew = config_stat(steps, np.median), mean_over_median(steps)
    fit = {**scaled(fit_step_costs(medians), skew), "mean_over_median": skew}
    warning = fit_warning(fit)
    if warning:
        say(warning)
    launch_s = _launch_s(kernels, fmt, device)
    stamp = f"{time.strftime('%Y-%m-%d')}, {machine_line()}"
    past = cached = dense = None  # the CPU kernel past the caches: in the layer's session, in a cached expert's own
    if not device.startswith("cuda"):
        say("timing the runtime's CPU expert kernel past the last-level cache")
        ref = references if references and references.read_bytes_per_s and references.peak_ops_per_s else None
        past, cached = probe_runtime_kernels(fmt, launch_s, settings.kernel_budget_s, shapes=settings.kernel_shapes,
                                             tokens=settings.kernel_tokens, multiple=settings.kernel_cache_multiple,
                                             stamp=stamp, reference_s=4.0 if settings.kernel_budget_s else 0.2,
                                             reference=(ref.read_bytes_per_s, ref.peak_ops_per_s) if ref else None,
                                             reference_from=f"hardware profile {ref.name}'s" if ref else "")
        say("timing the runtime's dense linear past the last-level cache")
        dense = probe_dense_linear(fmt, launch_s, settings.kernel_budget_s / 4, llc_bytes=past.fit["llc_bytes"],
                                   sizes=settings.dense_sizes, multiple=settings.kernel_cache_multiple, stamp=stamp)
    say("reading experts from disk as a miss does vs sequentially")

    def src(how: str) -> str:
        return f"probe ({how}; {stamp})"

    sequential = (references.disk_bytes_per_s, f"the drive's read rate in hardware profile {references.name}") \
        if references and references.disk_bytes_per_s else None
    reads, overheads, disk_fit = expert_reads(Path(disk_dir or work), settings.disk_sizes, settings.disk_experts, fmt,
                                              device, src, sequential)
    what = (f"medians x their mean/median ({skew:.2f}) of {len(steps)} decode and prefill steps in {len(configs)} "
            f"runs of tiny random Mixtral "
            f"checkpoints (H=I=64, {EXPERTS} experts, {fmt}, resident or cached) at layers {list(settings.layers)} "
            f"x top-k {list(settings.top_k)}")
    kernel = "one torch matmul" if device.startswith("cuda") else "one ONNX Runtime expert call"
    less = f"less the kernel call the hardware profile prices ({launch_s * 1e6:.0f} us: {kernel})"
    return EngineProbeResult(
        device_kind="gpu" if device.startswith("cuda") else "cpu",
        layer_overhead_s=Figure(max(fit["layer"] - 2 * launch_s, 0.0),
                                src(f"least squares per layer over the {what}, {less} x2")),
        expert_call_overhead_s=_call_overhead(fit["call"], launch_s, past, src(f"least squares per expert call over "
                                                                             f"the {what}, {less}")),
        decode_step_s=Figure(max(fit["step"] - launch_s, 0.0),
                             src(f"least squares per decode step over the {what}, {less}")),
        prefill_step_s=Figure(max((fit["prefill_step"] or fit["step"]) - launch_s, 0.0),
                              src(f"median prefill step of {len(PROMPT)} tokens (x the grid's mean/median) less its "
                                  f"layers "
                                  f"(with their "
                                  f"per-token cost) and expert calls at the fitted costs, {less}; same runs")),
        token_overhead_s=Figure(fit["token"], src(
            f"per hidden layer per token past the first: the per-layer slope of {len(PROMPT)}-token prefill steps "
            f"(less their expert calls) over layers {list(settings.layers)}, less the decode layer's, over "
            f"{len(PROMPT) - 1} tokens; same runs")),
        disk_reads=reads, disk_overheads=overheads, launch_s=launch_s, kernel=past, cached_kernel=cached,
        dense_linear=dense, miss_host_cpu=disk_fit.get("host_cpu", {}),
        fit={**fit, "timed_steps": len(steps), "configs": [s.__dict__ for s in medians], "disk": disk_fit,
             "kernel": past.fit if past else None, "cached_kernel": cached.fit if cached else None,
             "dense_linear": dense.fit if dense else None},
        elapsed_s=time.perf_counter() - t0)


def _call_overhead(grid_call_s: float, launch_s: float, kernel: KernelEfficiency | None, how: str) -> Figure:
    """An expert call's cost beyond its roofline and launch: the H = 64 grid's (caches warm)
    plus, past the caches, the kernel's fixed part beyond the tiny call (``launch_s``)."""
    grid = max(grid_call_s - launch_s, 0.0)
    if kernel is None:
        return Figure(grid, how)
    extra = max(kernel.call_fixed_s.value - launch_s, 0.0)
    return Figure(grid + extra, f"{how}; plus {extra * 1e6:.0f} us past the caches: {kernel.call_fixed_s.method}")


# the grid's residual (root mean square over the mean decode step) past which its fit is not
# the runtime's costs but the load's: 0.02-0.04 on the 2-core dev machine when quiet, 0.21 at
# 100% CPU pressure (a layer's and an expert call's costs then swapped places)
RESIDUAL_WARN = 0.10


def fit_warning(fit: dict[str, Any]) -> str | None:
    """A line for the user where the grid's fit does not explain its steps (:data:`RESIDUAL_WARN`), else None."""
    if fit["rms_rel"] <= RESIDUAL_WARN:
        return None
    return (f"warning: the step fit leaves {fit['rms_rel']:.0%} of a step unexplained (over {RESIDUAL_WARN:.0%}): "
            "other processes held the cores while it was timed, and the costs written are theirs as much as the "
            "runtime's; probe again when the machine is quiet")


def config_stat(steps: Sequence[StepSample], stat: Callable = np.median) -> list[StepSample]:
    """One sample per configuration and phase: ``stat`` of its steps' seconds, with the median
    of its expert calls."""
    return [StepSample(float(stat([s.seconds for s in group])), group[0].layers,
                       int(np.median([s.calls for s in group])), group[0].phase, group[0].config, group[0].tokens)
            for group in _groups(steps)]


def mean_over_median(steps: Sequence[StepSample]) -> float:
    """The grid's skew: the configurations' mean steps summed over their median steps summed
    (>= 1 where delays only ever add; see the module docstring)."""
    means, medians = config_stat(steps, np.mean), config_stat(steps, np.median)
    return float(sum(s.seconds for s in means) / sum(s.seconds for s in medians))


def scaled(fit: dict[str, Any], factor: float) -> dict[str, Any]:
    """``fit`` (:func:`fit_step_costs`) with its times multiplied by ``factor``."""
    times = ("step", "layer", "call", "token", "prefill_step", "prefill_layer")
    return {k: (v * factor if k in times and v is not None else v) for k, v in fit.items()}


def _groups(steps: Sequence[StepSample]) -> list[list[StepSample]]:
    by: dict[tuple[str, str], list[StepSample]] = {}
    for s in steps:
        by.setdefault((s.config, s.phase), []).append(s)
    return list(by.values())


def _tiny_checkpoint(work: Path, fmt: str, layers: int) -> tuple[Path, Path]:
    """A random Mixtral checkpoint of ``layers`` layers and its kernels (every expert ``fmt``)."""
    import transformers

    from exporters.checkpoints import make_random_checkpoint
    from exporters.runtime import build_kernels

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ckpt = work / f"tiny-ckpt-L{layers}"
    if not (ckpt / "config.json").exists():
        make_random_checkpoint("mixtral", ckpt, vocab_size=64, num_hidden_layers=layers, num_local_experts=EXPERTS,
                               num_experts_per_tok=1, max_position_embeddings=1024, **SIZE)
    kernels = work / f"tiny-kernels-L{layers}-{fmt}"
    if not (kernels / "manifest.json").exists():
        build_kernels(_plan(layers, "resident", fmt, "cpu"), ckpt, kernels)
    return ckpt, kernels


def _plan(layers: int, site: str, fmt: str, device: str) -> dict[str, Any]:
    """Every expert of ``layers`` MoE layers at ``site``: resident, or fetched from disk into
    a cache that holds all E of them."""
    compute = "node/gpu0" if device.startswith("cuda") else "node/cpu0"
    home = compute if site == "resident" else "node/disk0"
    slots = EXPERTS if site == "fetch" else 0
    return {"format_version": 1, "compute_device": compute, "host_device": "node/cpu0", "prefetch": "none",
            "eviction": "lru", "dense_format": fmt,
            "layers": [{"moe_layer": i, "hidden_layer": i, "home": [home] * EXPERTS, "format": [fmt] * EXPERTS,
                        "site": [site] * EXPERTS, "cache_slots": slots, "cache_device": compute if slots else None}
                       for i in range(layers)]}


def _variant(work: Path, ckpt: Path, layers: int, top_k: int) -> Path:
    """The checkpoint with its config cut to ``layers`` layers and top-k ``top_k`` (the
    weights of the layers left out are never read: the plan and the model stop before them)."""
    out = work / f"{ckpt.name}-as-L{layers}-K{top_k}"
    if not (out / "config.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        config = json.loads((ckpt / "config.json").read_text())
        config.update(num_hidden_layers=layers, num_experts_per_tok=top_k)
        for path in ckpt.glob("*.safetensors"):
            shutil.copyfile(path, out / path.name)
        (out / "config.json").write_text(json.dumps(config))
    return out


def _time_grid(work: Path, ckpt: Path, kernels: Path, configs: list[tuple[int, int, str]], fmt: str, device: str,
               settings: ProbeSettings) -> list[StepSample]:
    """Decode and prefill steps of every configuration, timed by the runtime's own metrics.

    Every configuration stays loaded and each round generates once with each of them, so a
    stretch of time when another process took the cores slows all configurations alike
    instead of skewing one of them; the first round sizes the number of rounds.
    """
    from exporters.runtime import load_planned_model

    with ExitStack() as stack:
        runs = []
        for layers, top_k, site in configs:
            rt = stack.enter_context(load_planned_model(_plan(layers, site, fmt, device),
                                                        _variant(work, ckpt, layers, top_k), kernels_dir=kernels,
                                                        device=device))
            distinct: list[int] = []  # per MoE layer call: experts used
            for store in rt.stores:
                store.register_forward_pre_hook(
                    lambda mod, args, d=distinct: d.append(len(set(args[1].reshape(-1).tolist()))))
            rt.generate(PROMPT, 4)  # warm-up: kernels chosen, caches filled, first-call costs paid
            runs.append((f"L{layers}-K{top_k}-{site}", layers, top_k, rt, distinct))
        out: list[StepSample] = []
        rounds, r = settings.min_rounds, 0
        while r < rounds:
            start = time.perf_counter()
            for name, layers, top_k, rt, distinct in runs:
                rt.metrics.reset()
                distinct.clear()
                rt.generate(PROMPT, settings.steps_per_round + 1)
                out += [StepSample(s, layers, layers * top_k, "decode", name) for s in rt.metrics.tpot_s]
                out.append(StepSample(rt.metrics.ttft_s[0], layers, sum(distinct[:layers]), "prefill", name,
                                      len(PROMPT)))
            if r == 0:  # the first round sizes the rest
                round_s = time.perf_counter() - start
                rounds = int(min(settings.max_rounds, max(settings.min_rounds, settings.budget_s / round_s)))
            r += 1
    return out


def _launch_s(kernels: Path, fmt: str, device: str, calls: int = 200) -> float:
    """The fastest single kernel call: one expert's ONNX Runtime session (CPU), one matmul (CUDA)."""
    import torch

    if device.startswith("cuda"):
        x = torch.zeros(1, SIZE["hidden_size"], device=device)
        w = torch.zeros(SIZE["intermediate_size"], SIZE["hidden_size"], device=device)
        return _fastest(lambda: (x @ w.T, torch.cuda.synchronize()), calls)
    from exporters.runtime.kernels import CpuLayerKernel, Kernels, default_threads
    from exporters.runtime.planfile import parse_plan

    ks = Kernels(kernels, parse_plan(_plan(1, "resident", fmt, device)))
    kernel = CpuLayerKernel(ks.templates, {0: (fmt, {n: t.numpy() for n, t in ks.quantised(0, 0, fmt).items()})},
                            threads=default_threads())
    x = {0: np.zeros((1, SIZE["hidden_size"]), np.float32)}
    return _fastest(lambda: kernel.run(x), calls)


def _fastest(fn: Callable[[], object], calls: int) -> float:
    fn()
    best = math.inf
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
