"""Expected per-step costs of every per-layer option: the numbers the ILP and the baselines share.

Legend: L = MoE layers, E = routed experts per layer, P = pinned-count grid points,
C = cache sizes 0..E, B = batch (tokens per decode step), b = storage format.

A per-layer **option** is a tuple ``(p, b_res, c, b_off, home, mode)``: the ``p`` most
frequent experts of the layer are resident on the compute device at format ``b_res``; the
other ``E - p`` live in ``home`` (host DRAM or NVMe) at ``b_off`` and run by ``mode``:

- ``fetch``: on a miss in the layer's ``c``-slot cache the weights cross the link, then run on
  the compute device;
- ``local``: computed by the host CPU where they live (activations cross the link instead;
  ``c = 0``);
- ``hybrid``: a cache hit runs on the compute device, a miss runs on the CPU while the
  weights are fetched in the background for next time;
- ``stream``: every offloaded expert of the layer crosses the link each step, used or not
  (HF accelerate's CPU offload moves a whole module's weights per forward; ``c = 0``).

For one decode step with B tokens, expert e of layer l is active with probability
``a_e = 1 - (1 - f_e)^B`` (``f_e``: activations per token, ``sum_e f_e = K``) and then serves
``n_e = B f_e / a_e`` tokens. With a hit rate ``h(p, c)`` of the unpinned accesses (the
workload's LRU curve with the top-p experts pinned), an option costs per step

    G = sum_{e<p} a_e t_dev(b_res, n_e) + sum_{e>=p} a_e [fetch: t_dev(b_off, n_e) | hybrid: h t_dev]
    U = sum_{e>=p} a_e [local: t_cpu(b_off, n_e) + 2 x_act(n_e) | hybrid: (1 - h)(t_cpu + 2 x_act)]
    F = sum_{e>=p} a_e (1 - h) x(bytes(b_off))          (fetch and hybrid; c = 0 for local)
    F = (E - p) x(bytes(b_off)), G as fetch              (stream)

where G is compute-device busy time, U host-CPU busy time, F link time of expert fetches,
t_dev/t_cpu come from :func:`profiles.perf.expert_call_s` and x from the route's bottleneck.
Memory: ``p bytes(b_res) + c bytes(b_off)`` on the device, ``(E - p) bytes(b_off)`` at home.
Quality: ``sum_e w_e err(b_e)`` with ``w_e = f_e * mean gate weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from profiles.errors import InputError
from profiles.hardware import Device, Hardware
from profiles.models import ModelSpec
from profiles.perf import expert_call_s

from .workload_view import PlanningStats

__all__ = ["Setup", "OptionTable", "layer_options", "QUANT_ERROR",
           "DEFAULT_FORMATS", "MODES"]

MODES = ("fetch", "local", "hybrid", "stream")
DEFAULT_FORMATS = ("bf16", "int8", "int4")

# Relative output error of an expert stored in each format (normalised RMS error of the
# FFN output under group-wise round-to-nearest, order of magnitude from the GPTQ/AWQ and
# MC-MoE measurements). Replaceable: `planner optimize --quant-error FILE`.
QUANT_ERROR = {"fp32": 0.0, "bf16": 0.0, "fp16": 0.0, "fp8": 0.004, "int8": 0.006, "fp6": 0.012,
               "int4": 0.04, "mxfp4": 0.045, "fp4": 0.05, "int3": 0.11, "int2": 0.30, "ternary": 0.45}


@dataclass(frozen=True, eq=False)
class OptionTable:
    """All options of one layer as columns (one row per option)."""

    p: np.ndarray  # [N] resident experts (top-p by frequency)
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

    def __len__(self) -> int:
        return int(self.p.shape[0])

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
    critical: tuple[tuple[int, ...], ...] = ()  # per layer: experts that stay at full precision
    cache_grid: tuple[int, ...] | None = None
    device_reserve: tuple[float, float] = (0.05, 512 * 2**20)  # (fraction, bytes) kept free on the device
    host_reserve: tuple[float, float] = (0.10, 4 * 2**30)  # (fraction, bytes) kept free in host DRAM

    @property
    def unified(self) -> bool:
        """Compute device and host share one memory: nothing is ever copied."""
        return self.hardware.memory_of(self.compute.id).id == self.hardware.memory_of(self.host.id).id

    def expert_bytes(self, fmt: str) -> float:
        return float(self.model.expert_bytes(fmt))

    def transfer_s(self, home: str, n_bytes: float) -> float:
        return self.hardware.route(home, self.compute.id).transfer_s(n_bytes)

    def activation_s(self, tokens: float) -> float:
        """Link seconds to move ``tokens`` hidden states (bf16) one way between host and device."""
        return self.hardware.route(self.host.id, self.compute.id).transfer_s(tokens * self.model.hidden_size * 2)

    def call_s(self, device: Device, fmt: str, tokens: np.ndarray) -> np.ndarray:
        """``[...]`` seconds of one expert call per token count (vectorised over tokens)."""
        wb = self.expert_bytes(fmt)
        flops_per_token = self.model.expert_flops_per_token
        return np.array([expert_call_s(device, fmt, wb, flops_per_token * n, n) for n in np.ravel(tokens)]
                        ).reshape(np.shape(tokens))

    def cache_sizes(self) -> list[int]:
        if self.cache_grid is not None:
            return sorted(set(int(c) for c in self.cache_grid))
        E, K = self.model.num_experts, self.model.top_k
        grid = {0, K, 2 * K, 4 * K, E // 8, E // 4, E // 2}
        return sorted(c for c in grid if 0 <= c <= E)


SPEC_COLUMNS = ("p", "b_res", "c", "b_off", "home", "mode")


def option_specs(s: Setup, layer: int) -> np.ndarray:
    """``[N, 6]`` the grid of options the ILP chooses from (columns: SPEC_COLUMNS).

    p runs over the workload's pinned grid and E; c over :meth:`Setup.cache_sizes`; the
    offloaded format is never wider than the resident one (the cold experts are offloaded);
    ``local`` and ``hybrid`` compute on the CPU that holds the first home (host DRAM).
    """
    E = s.stats.num_experts
    rows = []
    full = _full_format(s)
    crit = _critical_by_rank(s, layer)
    homes = range(len(s.homes)) if not s.unified else ()
    for p in sorted(set(int(p) for p in s.stats.pinned_grid) | {E}):
        for bi, br in enumerate(s.formats):
            if crit[:p].any() and br != full:
                continue  # a resident critical expert stays at full precision
            if p == E:
                rows.append((p, bi, 0, bi, 0, MODES.index("fetch")))
                continue
            for bo_i, bo in enumerate(s.formats):
                if s.expert_bytes(bo) > s.expert_bytes(br) or (p == 0 and bo != br):
                    continue  # cold experts never wider than hot ones; p = 0: one spelling
                if crit[p:].any() and bo != full:
                    continue
                for hi in homes:
                    for c in s.cache_sizes():
                        if c >= E - p and c > 0:
                            continue  # a cache that holds every offloaded expert is residency, not a cache
                        rows.append((p, bi, c, bo_i, hi, MODES.index("fetch")))
                        if hi == 0:
                            rows.append((p, bi, c, bo_i, hi, MODES.index("hybrid" if c else "local")))
                    rows.append((p, bi, 0, bo_i, hi, MODES.index("stream")))
    if not rows:
        raise InputError("no way to place this layer's experts", key=f"layer {layer}",
                         fix="add host memory, or use formats the devices support")
    return np.array(rows, dtype=np.int64)


def _full_format(s: Setup) -> str:
    return min(s.formats, key=lambda fm: s.quant_error.get(fm, 0.0))


def _critical_by_rank(s: Setup, layer: int) -> np.ndarray:
    """``[E]`` whether the expert at each frequency rank is critical (full precision)."""
    E = s.stats.num_experts
    crit = np.zeros(E, bool)
    if s.critical and s.critical[layer]:
        rank = np.empty(E, int)
        rank[s.stats.order[layer]] = np.arange(E)
        crit[rank[list(s.critical[layer])]] = True
    return crit


def option_costs(s: Setup, layer: int, specs: np.ndarray) -> OptionTable:
    """Costs of the options ``specs`` (``[N, 6]``, SPEC_COLUMNS) of ``layer``: see the module docstring."""
    st = s.stats
    E, B = st.num_experts, s.batch_size
    f = st.frequency[layer][st.order[layer]]  # [E] by descending frequency
    w = st.importance[layer][st.order[layer]]  # [E]
    act = 1.0 - (1.0 - np.clip(f, 0.0, 1.0)) ** B  # [E] P(active in a step)
    tokens = np.where(act > 0, B * f / np.maximum(act, 1e-300), 1.0)  # [E] tokens per call

    def cum(v: np.ndarray) -> np.ndarray:  # [E+1] prefix sums over experts by rank
        return np.concatenate([[0.0], np.cumsum(v)])

    act_c = cum(act)
    actx_c = cum(act * 2 * np.array([s.activation_s(n) for n in tokens]))  # activations both ways
    dev_c = {fm: cum(act * s.call_s(s.compute, fm, tokens)) for fm in s.formats}
    cpu_c = {fm: cum(act * s.call_s(s.host, fm, tokens)) for fm in s.formats}
    err_c = {fm: cum(w * s.quant_error[fm]) for fm in s.formats}
    eb = {fm: s.expert_bytes(fm) for fm in s.formats}
    xfer = {(hi, fm): s.transfer_s(home, eb[fm]) for hi, home in enumerate(s.homes) for fm in s.formats}

    r = float(st.predictability[layer])
    per_token = B == 1 and st.access_rank is not None
    one = {fm: (float(s.call_s(s.compute, fm, np.array([1.0]))[0]), float(s.call_s(s.host, fm, np.array([1.0]))[0]))
           for fm in s.formats}  # one-token call seconds on (device, cpu)
    ax1 = 2 * s.activation_s(1.0)
    out = np.zeros((len(specs), 8))  # G, U, F, dev_bytes, home_bytes, error, tau, tau_prefetch
    for i, (p, bi, c, bo_i, hi, mode) in enumerate(specs):
        br, bo = s.formats[bi], s.formats[bo_i]
        n_off = E - p
        res_G = dev_c[br][p]
        err = err_c[br][p] + err_c[bo][E] - err_c[bo][p]
        dev_bytes = p * eb[br] + c * eb[bo]
        if n_off == 0:
            out[i] = (res_G, 0.0, 0.0, dev_bytes, 0.0, err, res_G, res_G)
            continue
        off_G = dev_c[bo][E] - dev_c[bo][p]
        off_U = cpu_c[bo][E] - cpu_c[bo][p] + actx_c[E] - actx_c[p]
        x = xfer[(hi, bo)]
        h = st.hit_rate(layer, p, c)
        miss = (act_c[E] - act_c[p]) * (1 - h)  # expected fetches per step
        name = MODES[mode]
        if name == "fetch":  # every miss waits for its weights
            G, U, F = res_G + off_G, 0.0, miss * x
        elif name == "local":  # the CPU computes where the weights live
            G, U, F = res_G, off_U, 0.0
        elif name == "hybrid":  # hits on the device, misses on the CPU, fetched in the background
            G, U, F = res_G + h * off_G, (1 - h) * off_U, miss * x
        else:  # stream: every offloaded expert of the layer crosses the link each step
            G, U, F = res_G + off_G, 0.0, n_off * x
        if per_token:
            tau0, tau1 = _expected_max(st.token_outcomes(layer, p, c), name, one[br][0], one[bo][0], one[bo][1] + ax1,
                                       x, n_off, r)
        else:
            tau0, tau1 = (_averaged_max(G, U, F, name, r, pf) for pf in (False, True))
        out[i] = (G, U, F, dev_bytes, n_off * eb[bo], err, tau0, tau1)
    return OptionTable(p=specs[:, 0].copy(), b_res=specs[:, 1].copy(), c=specs[:, 2].copy(),
                       b_off=specs[:, 3].copy(), home=specs[:, 4].copy(), mode=specs[:, 5].copy(),
                       G=out[:, 0], U=out[:, 1], F=out[:, 2], dev_bytes=out[:, 3], home_bytes=out[:, 4],
                       error=out[:, 5], tau=out[:, 6], tau_prefetch=out[:, 7])


def _averaged_max(G: float, U: float, F: float, mode: str, r: float, prefetch: bool) -> float:
    """Layer seconds per step from expected busy times: ``max(G + (1 - pi r) S, U, (1 - pi r) F + pi F)``.

    Right when a step holds many tokens (their work interleaves on every resource); at batch 1
    :func:`_expected_max` is used instead.
    """
    pi_r = r if prefetch else 0.0
    stall = F if mode in ("fetch", "stream") else 0.0
    link = (1 - pi_r) * F + (F if prefetch and mode != "stream" else 0.0)
    return max(G + (1 - pi_r) * stall, U, link)


def _expected_max(outcomes: tuple[np.ndarray, ...], mode: str, t_res: float, t_off: float, t_cpu: float,
                  x: float, n_off: int, r: float) -> tuple[float, float]:
    """Expected seconds of one token's layer at batch 1, without and with prefetch.

    A token waits for the slowest resource it uses, so the layer lasts
    ``E_t[max(device_t + stall_t, cpu_t, link_t)]``, not the max of the averages: an expert
    the CPU runs for one token in ten still stalls that token. ``outcomes`` are the
    workload's distinct (resident, hit, miss) counts per token with their shares
    (:meth:`PlanningStats.token_outcomes`).
    """
    n_res, n_hit, n_miss, share = outcomes
    dev = n_res * t_res
    if mode == "fetch":
        dev, cpu, miss_x = dev + (n_hit + n_miss) * t_off, 0.0, n_miss * x
    elif mode == "local":
        dev, cpu, miss_x = dev, n_miss * t_cpu, 0.0
    elif mode == "hybrid":
        dev, cpu, miss_x = dev + n_hit * t_off, n_miss * t_cpu, n_miss * x
    else:  # stream: all offloaded experts cross the link every step, used or not
        dev, cpu, miss_x = dev + (n_hit + n_miss) * t_off, 0.0, np.full(dev.shape, n_off * x)
    stalls = mode in ("fetch", "stream")
    out = []
    for prefetch in (False, True):
        pi_r = r if prefetch and mode != "stream" else 0.0
        link = (1 - pi_r) * miss_x + (miss_x if prefetch and mode != "stream" else 0.0)
        time = np.maximum(np.maximum(dev + (1 - pi_r) * (miss_x if stalls else 0.0), cpu), link)
        out.append(float(np.dot(share, time)))
    return out[0], out[1]


def layer_options(s: Setup, layer: int, extra: np.ndarray | None = None) -> OptionTable:
    """The option grid of ``layer`` plus any ``extra`` specs (baselines), with their costs."""
    specs = option_specs(s, layer)
    if extra is not None and len(extra):
        specs = np.unique(np.concatenate([specs, np.asarray(extra, dtype=np.int64).reshape(-1, 6)]), axis=0)
    return option_costs(s, layer, specs)


@dataclass(frozen=True)
class FixedCosts:
    """Costs that no expert decision changes, for one dense-weight format."""

    dense_format: str
    dense_s: float  # compute-device seconds per step: attention/dense weights, shared experts, KV reads
    dense_bytes: float  # dense weights (shared experts included) on the compute device
    kv_bytes: float  # KV cache for context x batch
    workspace_bytes: float  # activations, allocator slack and runtime context
    error: float  # quality error charged to the dense weights


def fixed_costs(s: Setup, dense_format: str) -> FixedCosts:
    """Dense (non-expert) work of one decode step at ``dense_format``."""
    m, B = s.model, s.batch_size
    dense_bytes = float(m.dense_bytes(dense_format))
    dense_flops = 2.0 * B * m.dense_params  # every dense weight is used once per token
    dense_s = expert_call_s(s.compute, dense_format, dense_bytes, dense_flops, B)
    kv_bytes = float(m.kv_cache_bytes(s.context_tokens, batch_size=B))
    # each step reads the whole KV cache once (attention over the context)
    kv_read_s = kv_bytes / (s.compute.memory_bytes_per_s * s.compute.efficiency.memory_fraction)
    # one launch per hidden layer for attention and one for the dense/shared MLP
    launches_s = 2 * m.num_hidden_layers * s.compute.launch_overhead_s
    workspace = B * (m.hidden_size * 4 + m.expert_intermediate_size * 2) * 2 * 8.0  # bf16 activations, margin 8x
    return FixedCosts(dense_format=dense_format, dense_s=dense_s + kv_read_s + launches_s, dense_bytes=dense_bytes,
                      kv_bytes=kv_bytes, workspace_bytes=workspace, error=s.quant_error[dense_format])


def capacity(s: Setup, memory_id: str) -> float:
    """Usable bytes of a memory pool after the runtime reserve."""
    mem = s.hardware.memories[memory_id]
    if memory_id == s.hardware.memory_of(s.compute.id).id:
        frac, fixed = s.device_reserve  # CUDA context, cuBLAS workspace, allocator slack
    elif mem.tier == "dram":
        frac, fixed = s.host_reserve  # the OS and the serving process
    else:
        frac, fixed = 0.0, 0.0
    return max(mem.capacity_bytes * (1 - frac) - fixed, 0.0)


def option_time(t: OptionTable, prefetch: bool) -> np.ndarray:
    """``[N]`` seconds each option of a layer lasts per decode step (FlexGen's max() over the
    device, the host CPU and the link; see :func:`_expected_max` and :func:`_averaged_max`).

    With prefetch, the predicted share r of the misses is fetched while the previous layer
    computes, so the device no longer waits for it, but the link carries the whole predicted
    set (right and wrong guesses) on top of the remaining demand misses; that traffic is
    charged to the layer it serves.
    """
    return t.tau_prefetch if prefetch else t.tau


def step_time(s: Setup, tables: Sequence[OptionTable], choice: Sequence[int], fixed: FixedCosts,
              prefetch: bool) -> tuple[float, np.ndarray]:
    """Seconds of one decode step for one option per layer, and ``[L]`` per-layer times."""
    tau = np.array([option_time(t, prefetch)[w] for t, w in zip(tables, choice)])
    return float(tau.sum() + fixed.dense_s), tau
