"""The planning problem as the cost model sees it: the resolved inputs (:class:`Setup`), the
columns every layer's options share (:class:`OptionTable`, :data:`SPEC_COLUMNS`) and the
constants the model starts from (formats, execution modes, quantisation errors). What the
columns mean and how they are priced is :mod:`planner.costs`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np

from profiles.engines import Engine, load_engine
from profiles.errors import InputError
from profiles.formats import default_quant_error, get_format
from profiles.hardware import Device, Hardware
from profiles.models import ModelSpec
from profiles.perf import KVHost, expert_calls_s, kv_host, miss_compute_s

from .workload_view import PlanningStats

if TYPE_CHECKING:
    from .given import Fixes

__all__ = ["DEFAULT_FORMATS", "MODES", "N_SPEC", "QUANT_ERROR", "SPEC_COLUMNS", "OptionTable", "Setup",
           "make_setup", "runnable_formats"]

# "nested": the layer resident as bit-planes, hot experts fetching their low plane (planner.nested_options)
# "copy": a fetch band whose low-gate misses load a low-bit copy (planner.miss_copy_options)
MODES = ("fetch", "local", "hybrid", "stream", "nested", "copy")
DEFAULT_FORMATS = ("bf16", "int8", "int4")

# Relative output error of an expert stored in each format (normalised RMS error of the
# FFN output under group-wise round-to-nearest, order of magnitude from the GPTQ/AWQ and
# MC-MoE measurements). Replaceable: `planner optimize --quant-error FILE`.
QUANT_ERROR = {"fp32": 0.0, "bf16": 0.0, "fp16": 0.0, "fp8": 0.004, "int8": 0.006, "fp6": 0.012,
               "int4": 0.04, "mxfp4": 0.045, "fp4": 0.05, "int3": 0.11, "int2": 0.30, "ternary": 0.45}



def runnable_formats(engine: Engine, formats: Sequence[str], compute: Device, host: Device) -> tuple[str, ...]:
    """``formats`` as ``engine`` stores them, those it runs on ``compute`` or ``host`` (in order);
    none: one line naming the formats the engine runs there."""
    stored = tuple(dict.fromkeys(engine.stored(fm) for fm in formats))
    runnable = tuple(fm for fm in stored if engine.supports(compute.kind, fm) or engine.supports(host.kind, fm))
    if not runnable:
        raise InputError(f"engine {engine.name} runs none of the candidate formats", key="--formats",
                         value=list(formats), expected=", ".join(engine.kind_spec(compute.kind).kernels),
                         fix=f"pick formats `planner engines show {engine.name}` lists")
    return runnable

@dataclass(frozen=True, eq=False)
class OptionTable:
    """All options of one layer as columns (one row per option)."""

    p: np.ndarray  # [N] resident experts (top-p by frequency)
    q: np.ndarray  # [N] split rank: ranks [p, q) go through the cache, [q, E) run on the CPU
    b_res: np.ndarray  # [N] index into Setup.formats
    c: np.ndarray  # [N] cache slots
    b_off: np.ndarray  # [N]
    home: np.ndarray  # [N] index into Setup.homes
    mode: np.ndarray  # [N] index into MODES
    G: np.ndarray  # [N] compute-device busy seconds per step
    U: np.ndarray  # [N] host CPU busy seconds per step
    F: np.ndarray  # [N] link seconds of expert fetches per step
    dev_bytes: np.ndarray  # [N] bytes on the compute device (resident + cache)
    home_bytes: np.ndarray  # [N] bytes in the home memory
    error: np.ndarray  # [N] importance-weighted quantisation error
    tau: np.ndarray  # [N] seconds the layer lasts per step without prefetch
    tau_prefetch: np.ndarray  # [N] ... with next-layer prefetch
    k: np.ndarray  # [N] tail experts in the option's tier (planner.format_tiers; 0: none)
    b_up: np.ndarray  # [N] the tier's format (index into Setup.formats; b_off where k = 0)

    def __len__(self) -> int:
        return int(self.p.shape[0])

    def specs(self, rows) -> np.ndarray:
        """``[n, 7]`` the option specs (SPEC_COLUMNS) of ``rows``."""
        return np.stack([getattr(self, k)[rows] for k in SPEC_COLUMNS], axis=-1).astype(np.int64)

    def tiers(self, rows) -> np.ndarray:
        """``[n, 2]`` the tiers ``(k, b_up)`` of ``rows`` (planner.format_tiers)."""
        return np.stack([self.k[rows], self.b_up[rows]], axis=-1).astype(np.int64)

    def take(self, rows: np.ndarray) -> "OptionTable":
        return OptionTable(**{k: getattr(self, k)[rows] for k in self.__dataclass_fields__})


@dataclass(frozen=True, eq=False)
class Setup:
    """Resolved inputs of one planning problem."""

    hardware: Hardware
    model: ModelSpec
    stats: PlanningStats
    batch_size: int
    context_tokens: int
    formats: tuple[str, ...]
    compute: Device  # the device that runs attention and resident experts
    host: Device  # the CPU that holds host memory
    homes: tuple[str, ...]  # memory pool ids where offloaded experts may live (DRAM first)
    quant_error: dict[str, float] = field(default_factory=lambda: dict(QUANT_ERROR))
    # measured error (planner quality measure): format -> [L, E] by expert id; a format it
    # lacks keeps its quant_error constant
    expert_error: dict[str, np.ndarray] | None = None
    critical: tuple[tuple[int, ...], ...] = ()  # per layer: experts that stay at full precision
    cache_grid: tuple[int, ...] | None = None
    device_reserve: tuple[float, float] = (0.05, 512 * 2**20)  # (fraction, bytes) kept free on the device
    host_reserve: tuple[float, float] = (0.10, 4 * 2**30)  # (fraction, bytes) kept free in host DRAM
    engine: Engine | None = None  # the software that runs the plan (hardware is already seen through it)
    bare: Hardware | None = None  # the hardware before the engine was applied
    phase: str = "decode"  # "prefill": a step prices the prompt (the engine's prefill step cost)
    # per-phase execution sites (planner.prefill_sites): the planner picks, per layer, whether a
    # prompt's pass copies the host-held tail it uses to the compute device (prefill_offload)
    prefill_choice: bool = False
    prefill_offload: bool = False  # this prefill pass runs the host-held tail on the compute device ...
    prefill_copied: int | None = None  # ... its first (most used) this many ranks, the CPU the rest; None: all
    fixes: "Fixes | None" = None  # parts of every layer's option the user fixed (planner.given)
    # task-specific plans (planner.task): per layer the experts the plan drops (the stats come from
    # the trace with them dropped, so they are never called) and the importance they carried
    # (error 1 each: their whole contribution), charged to every option of the layer
    dropped: tuple[tuple[int, ...], ...] = ()
    dropped_importance: tuple[float, ...] = ()
    # host DRAM as one port shared by CPU expert reads and copies (planner.dram); off: as before
    dram_contention: bool = False
    # offer nested options: a layer resident as int8 bit-planes (planner.nested_options; --nested)
    nested: bool = False
    # planned low-bit copies (planner.miss_copy_options; --miss-copy): (format, gate threshold) and
    # the workload's shares of calls loading a copy at the setup's batch, ([L, E] of calls, [L, E] of
    # gate mass: planner.miss_copy_options.copy_shares); None: none
    miss_copy: tuple[str, float] | None = None
    low_gate: tuple[np.ndarray, np.ndarray] | None = None

    def runs(self, device: Device, fmt: str) -> bool:
        """Whether the engine runs weights stored as ``fmt`` on ``device`` (an accelerator: only
        formats it states a peak for, as make_setup holds an accelerator compute device to)."""
        if device.kind == "accelerator" and fmt not in device.peak_ops_per_s:
            return False
        return self.engine is None or self.engine.supports(device.kind, fmt)

    def with_engine(self, engine: Engine, formats: Sequence[str] = ()) -> "Setup":
        """The same problem seen through another engine (``formats`` added to the candidates)."""
        if self.engine is not None and engine.name == self.engine.name:
            return self
        if self.bare is None:
            raise ValueError("this Setup does not keep its bare hardware (build it with make_setup)")
        hw = engine.apply(self.bare)
        extra = tuple(f for f in formats if f not in self.formats)
        errors = dict(self.quant_error) | {f: default_quant_error(f) for f in extra}
        return dataclasses.replace(self, hardware=hw, compute=hw.devices[self.compute.id], host=hw.devices[self.host.id],
                                   engine=engine, formats=self.formats + extra, quant_error=errors)

    def errors_of(self, layer: int, fmt: str) -> np.ndarray:
        """``[E]`` each expert's quantisation error at ``fmt`` (by expert id): measured, else the constant."""
        if self.expert_error is not None and fmt in self.expert_error:
            return self.expert_error[fmt][layer]
        return np.full(self.stats.num_experts, self.quant_error[fmt])

    def uniform_error(self, fmt: str) -> float:
        """The importance-weighted error of every expert at ``fmt`` (what the quality budget bounds)."""
        if self.expert_error is None or fmt not in self.expert_error:
            return self.quant_error[fmt]
        w = self.stats.importance
        return float((w * self.expert_error[fmt]).sum() / max(float(w.sum()), 1e-300))

    def engine_can(self, what: str) -> bool:
        """Whether the engine has a site (``fetch``, ``local``, ...) or a prefetch policy."""
        if self.engine is None:
            return True
        return what in self.engine.profile.sites or what in self.engine.profile.prefetch

    @property
    def unified(self) -> bool:
        """Compute device and host share one memory: nothing is ever copied."""
        return self.hardware.memory_of(self.compute.id).id == self.hardware.memory_of(self.host.id).id

    def expert_bytes(self, fmt: str) -> float:
        return float(self.model.expert_bytes(fmt))

    def kv_host(self) -> KVHost | None:
        """Where the engine reads a KV cache kept in host DRAM (None: it cannot keep it there:
        no ``kv_offload`` in its profile, or the compute device's memory is the host's)."""
        spec = self.engine.kv_offload if self.engine is not None else None
        if spec is None or self.unified or self.compute.kind == "cpu":
            return None
        return kv_host(self.hardware, self.compute.id, self.host.id, spec)

    def kernel_factor(self, device: Device, fmt: str) -> float:
        """Bytes held per stored byte of an expert (or dense matrix) that ``device`` runs: a CPU
        runs int8/int4 weights in ONNX Runtime sessions, which keep their own pre-packed copy
        (``kernel_bytes_factor``, measured by the probe); anything else holds what it stores."""
        return device.kernel_bytes_factor.get(fmt, 1.0) if device.kind == "cpu" else 1.0

    def in_host_dram(self, home_index: int) -> bool:
        """Whether ``homes[home_index]`` is the host CPU's own memory."""
        return bool(self.homes) and self.homes[home_index] == self.hardware.memory_of(self.host.id).id

    def transfer_s(self, home: str, n_bytes: float) -> float:
        return self.hardware.route(home, self.compute.id).transfer_s(n_bytes)

    def activation_s(self, tokens: float) -> float:
        """Link seconds to move ``tokens`` hidden states (bf16) one way between host and device."""
        return self.hardware.route(self.host.id, self.compute.id).transfer_s(tokens * self.model.hidden_size * 2)

    def miss_compute_s(self, fmt: str) -> float:
        """Compute-device seconds one miss of a ``fmt`` expert's copy takes from the compute
        (its host CPU work, where the compute device is the host CPU: :func:`profiles.perf.miss_compute_s`)."""
        return miss_compute_s(self.compute, self.host, self.expert_bytes(fmt))

    def call_s(self, device: Device, fmt: str, tokens: np.ndarray, cached: bool = False) -> np.ndarray:
        """``[...]`` seconds of one expert call per token count (vectorised over tokens; ``cached``:
        an expert run from the engine's expert cache, :func:`profiles.perf.efficiency_of`)."""
        wb = self.expert_bytes(fmt)
        flops_per_token = self.model.expert_flops_per_token
        return expert_calls_s(device, fmt, wb, flops_per_token, tokens, cached)

    def cache_sizes(self) -> list[int]:
        if self.cache_grid is not None:
            return sorted(set(int(c) for c in self.cache_grid))
        E, K = self.model.num_experts, self.model.top_k
        grid = {0, K, 2 * K, 4 * K, E // 8, E // 4, E // 2}
        return sorted(c for c in grid if 0 <= c <= E)


SPEC_COLUMNS = ("p", "q", "b_res", "c", "b_off", "home", "mode")
N_SPEC = len(SPEC_COLUMNS)


def make_setup(hw: Hardware, model: ModelSpec, stats: PlanningStats, *, batch_size: int, context_tokens: int,
               formats: tuple[str, ...], critical: tuple[tuple[int, ...], ...] = (),
               quant_error: dict[str, float] | None = None, engine: Engine | None = None,
               fixes: Fixes | None = None, expert_error: dict[str, np.ndarray] | None = None,
               dram_contention: bool = False) -> Setup:
    """Pick the compute device (first GPU, else first accelerator, else the CPU), the host CPU of
    its node and the homes for offloaded experts (host DRAM, then the node's first NVMe).

    ``hw`` is seen through ``engine`` (default: the bundle runtime's profile), and only the
    formats the engine runs on the compute device or the host CPU stay candidates. ``fixes``
    (planner.given.Fixes, checked here) filter every layer's options.
    """
    engine = engine or load_engine(None)
    bare, hw = hw, engine.apply(hw)
    gpus = [d for d in hw.devices_of_kind("gpu") or hw.devices_of_kind("accelerator") if engine.runs_on(d.kind)]
    cpus = hw.devices_of_kind("cpu")
    compute = gpus[0] if gpus else cpus[0]
    host = next(c for c in cpus if c.node == compute.node)
    homes = [hw.memory_of(host.id).id]
    homes += [m.id for m in hw.memories.values() if m.tier == "nvme" and m.devices[0].split("/")[0] == compute.node][:1]
    # offloading into the compute device's own pool is no offloading (a CPU-only box, or the
    # unified memory of a Jetson / Apple machine): only the disk is left to hold experts
    homes = [m for m in homes if m != hw.memory_of(compute.id).id]
    for fm in formats:
        get_format(fm)
        if compute.kind == "accelerator" and fm not in compute.peak_ops_per_s:
            raise InputError(f"the accelerator {compute.id} cannot compute {fm}", key="--formats", value=fm,
                             expected=", ".join(compute.peak_ops_per_s), fix="pick formats the accelerator supports")
    formats = runnable_formats(engine, formats, compute, host)
    errors = dict(QUANT_ERROR if quant_error is None else quant_error)
    # formats the --quant-error file does not name: their stated or bits-interpolated error
    errors |= {fm: default_quant_error(fm) for fm in formats if fm not in errors}
    if stats.num_experts != model.num_experts or stats.num_layers != model.num_moe_layers:
        raise InputError("the workload does not match the model", key="--trace",
                         value=f"{stats.num_layers} layers x {stats.num_experts} experts",
                         expected=f"{model.num_moe_layers} MoE layers x {model.num_experts} experts ({model.name})",
                         fix="record or synthesise a trace for this model (planner trace synth --model ...)")
    # at batch > 1 a cache hit saves a call only if it is the step's first access to the expert
    stats = stats.at_batch(batch_size)
    s = Setup(hardware=hw, model=model, stats=stats, batch_size=batch_size, context_tokens=context_tokens,
              formats=tuple(formats), compute=compute, host=host, homes=tuple(homes), quant_error=errors,
              critical=critical, engine=engine, bare=bare, expert_error=expert_error, dram_contention=dram_contention,
              fixes=fixes.through(engine) if fixes is not None else None)
    if s.fixes is not None:
        s.fixes.check(s)
    return s
