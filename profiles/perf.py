"""The performance model shared by the planner and the simulator.

Legend: H = hidden size, I = expert intermediate size, n = tokens in one expert call.

An expert call on device d at storage format b for n tokens costs

    t = unpack(d, b) + max(read_bytes(b) / (mem_bw(d) * mem_frac(d)),
                           flops(n) / (peak(d, c) * eff(d, n))) + launch(d) + call_overhead(d)

where flops(n) = 2 * n * 3 * H * I for a gated FFN (gate, up, down projections) and c is the
format the device computes in for weights stored as b (:func:`compute_format`). When the
engine runs b by unpack-then-matmul (its profile gives an unpack rate R for b on this kind
of device), ``unpack = params / R`` and the matmul reads the fp16 copy (``read_bytes = 2
params``) at the widest float peak; otherwise a fused kernel reads the stored bytes
(``unpack = 0``, ``read_bytes = weight_bytes(b)``). ``call_overhead`` is the engine's
framework cost per expert call (dispatch, Python), ``launch`` the device's kernel launch.
The efficiency is the device's, or, for an expert run from the engine's expert cache (a hit or
a fetched miss), ``cached_efficiency`` where the engine runs those otherwise (the bundle on a
CPU: a single-thread session per cached expert; :func:`efficiency_of`).
An engine that runs all of a layer's routed experts as one fused kernel per projection
(``Device.fused_experts``: llama.cpp's MUL_MAT_ID, vLLM/SGLang fused_moe, kTransformers'
CPU MoE op) pays no launch per expert call; each MoE layer's dense step pays the fused
kernel's launches instead (:data:`FUSED_MOE_LAUNCHES`, :func:`dense_step_s`).
An engine whose path for format b costs host time per linear call (``Device.linear_host_s``,
transformers' fp8: Triton launches and a device sync around every linear) adds it per linear:
:data:`LINEARS_PER_EXPERT` per expert call, :data:`ATTENTION_LINEARS` per hidden layer (one
that costs the dense step's linears only, ``Device.dense_linear_host_s``: the bundle's int8
dense matrices on a CPU, one ONNX Runtime call each, adds it per attention linear and for
the output head); an
engine that visits every expert of a layer each step (``Device.visits_every_expert``) pays,
per unrouted expert, its call overhead and its linears' host time (no kernel: empty batch).
A transfer of B bytes over a route costs ``B / bottleneck + latency`` (:meth:`Route.transfer_s`).
The planner takes expectations of these; the simulator plays them out with contention.

An engine with op offload (``profiles.engines.OpOffload``, llama.cpp) processes a prompt in
micro-batches (:func:`micro_batches`); in a forward pass of at least its threshold of tokens
(:func:`op_offloads`) the experts a GPU's host holds are copied over the host->GPU route and
run on the GPU, the copy first, then the computation.

An engine that keeps the KV cache in host memory (``profiles.engines.KVOffload``, a plan's
``kv_cache: host``) reads it where it lives (:class:`KVHost`): attention on the host CPU,
the longer of its read of the cache and its FLOPs (:func:`attention_compute_s`) plus,
per attention layer, the step's query, keys and values to the CPU and the output back
(two transfers), or, with attention on the device, ``kv_bytes`` over the route per pass
(one transfer per attention layer); the compute device then reads no KV of its own.

Devices carry the engine's terms once :meth:`profiles.engines.Engine.apply` has run; on bare
hardware they are zero, and the formula is the datasheet roofline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .formats import get_format
from .hardware import Device

if TYPE_CHECKING:
    from .models import ModelSpec

__all__ = ["activation_bytes", "compute_format", "dense_call_s", "dense_step_s", "efficiency_of", "expert_call_s",
           "expert_calls_s",
           "FUSED_MOE_LAUNCHES", "LINEARS_PER_EXPERT", "ATTENTION_LINEARS", "token_layer_s", "unrouted_visits_s",
           "micro_batches", "miss_compute_s", "op_offloads", "KVHost", "kv_host"]

# kernels a fused MoE layer launches once, whatever the number of experts it runs: the
# gate/up projection, the down projection and the weighted combine (llama.cpp: two
# MUL_MAT_ID and the combine; fused_moe: two grouped GEMMs and the sum)
FUSED_MOE_LAUNCHES = 3

# linear (matmul) calls of one expert call (gate, up, down projections) and of one hidden
# layer's attention (q, k, v, o projections): what a per-linear host cost multiplies
LINEARS_PER_EXPERT = 3
ATTENTION_LINEARS = 4

# formats a device falls back to when it has no peak for the stored format, widest last
_FALLBACK = ("bf16", "fp16", "fp32")


def compute_format(device: Device, storage_format: str) -> str:
    """Format the device computes in for weights stored as ``storage_format``.

    A device computes natively in a format it states a peak for (W8A8 int8 on a GPU, int4
    on an FPGA); otherwise weights are dequantised and the call runs at bf16/fp16/fp32.
    """
    get_format(storage_format)  # validate the name
    if storage_format in device.peak_ops_per_s:
        return storage_format
    for fmt in _FALLBACK:
        if fmt in device.peak_ops_per_s:
            return fmt
    return max(device.peak_ops_per_s, key=device.peak_ops_per_s.get)


def expert_call_s(device: Device, storage_format: str, weight_bytes: float, flops: float, tokens: float,
                  cached: bool = False) -> float:
    """Seconds for one expert call on ``device`` (roofline with efficiency plus overhead).

    Args:
        device: a compute device (gpu, cpu, accelerator).
        storage_format: format the weights are stored in (``"int4"``).
        weight_bytes: bytes of the expert's weights in that format.
        flops: floating-point operations of the call (2 * n * 3 * H * I for a gated FFN).
        tokens: tokens in the call (n), which sets the efficiency.
        cached: the expert runs from the engine's expert cache (a hit, or a fetched miss):
            priced at the device's ``cached_efficiency`` where the engine states one
            (:func:`efficiency_of`).
    """
    launch = not device.fused_experts  # a fused engine launches per layer (dense_step_s), not per call
    return (_kernel_s(device, storage_format, weight_bytes, flops, tokens, launch, cached)
            + device.expert_call_overhead_s
            + LINEARS_PER_EXPERT * device.linear_host_s.get(storage_format, 0.0))


def expert_calls_s(device: Device, storage_format: str, weight_bytes: float, flops_per_token: float,
                   tokens: np.ndarray, cached: bool = False) -> np.ndarray:
    """:func:`expert_call_s` for an array of token counts (the planner prices every rank at once)."""
    tokens = np.asarray(tokens, dtype=float)
    launch = not device.fused_experts
    memory_s, compute_rate, fixed_s = _roofline_parts(device, storage_format, weight_bytes, cached)
    flops = flops_per_token * tokens
    eff = efficiency_of(device, cached)
    compute_s = np.where(flops > 0, flops / (compute_rate * eff.compute_fractions(tokens)), 0.0)
    return fixed_s + np.maximum(memory_s, compute_s) + (device.launch_overhead_s if launch else 0.0) \
        + device.expert_call_overhead_s + LINEARS_PER_EXPERT * device.linear_host_s.get(storage_format, 0.0)


def efficiency_of(device: Device, cached: bool = False):
    """The efficiency an expert call on ``device`` reaches: ``device.cached_efficiency`` for an
    expert run from the engine's expert cache where the engine runs those otherwise than its
    resident ones (the bundle on a CPU: a single-thread session per cached expert, its resident
    and CPU-local experts in the layer's session on every thread), else ``device.efficiency``."""
    if cached and device.cached_efficiency is not None:
        return device.cached_efficiency
    return device.efficiency


def _roofline_parts(device: Device, storage_format: str, weight_bytes: float,
                    cached: bool = False) -> tuple[float, float, float]:
    """``(memory seconds, peak ops/s of the compute format, unpack seconds)`` of one matmul call."""
    if not device.is_compute or device.efficiency is None:
        raise ValueError(f"{device.id} does not compute")
    eff = efficiency_of(device, cached)
    rate = device.unpack_weights_per_s.get(storage_format)
    if rate:
        params = weight_bytes * 8.0 / get_format(storage_format).bits_per_weight
        unpack_s, read_bytes = params / rate, 2.0 * params
        compute_fmt = compute_format(device, "bf16")
    else:
        unpack_s, read_bytes = 0.0, weight_bytes
        compute_fmt = compute_format(device, storage_format)
    memory_s = read_bytes / (device.memory_bytes_per_s * eff.memory_fraction)
    return memory_s, device.peak_ops_per_s[compute_fmt], unpack_s


def _kernel_s(device: Device, storage_format: str, weight_bytes: float, flops: float, tokens: float,
              launch: bool = True, cached: bool = False) -> float:
    """The roofline of one matmul call (unpack included), without the engine's per-call cost."""
    memory_s, peak, unpack_s = _roofline_parts(device, storage_format, weight_bytes, cached)
    compute_s = flops / (peak * efficiency_of(device, cached).compute_fraction(tokens)) if flops > 0 else 0.0
    return unpack_s + max(memory_s, compute_s) + (device.launch_overhead_s if launch else 0.0)


def dense_call_s(device: Device, weight_bytes: float, flops: float, tokens: float, fmt: str = "bf16") -> float:
    """Seconds for a dense (non-expert) block on ``device``: the same roofline, one call."""
    return _kernel_s(device, fmt, weight_bytes, flops, tokens)


@dataclass(frozen=True)
class KVHost:
    """A KV cache kept in host memory (see the module docstring): where attention runs
    (``host``: the host CPU ``cpu``; ``device``: the compute device, the cache crossing the
    route) and the route between host memory and the compute device."""

    attention: str  # "host" | "device"
    cpu: Device
    link_bytes_per_s: float
    link_latency_s: float

    def transfer_s(self, n_bytes: float) -> float:
        return n_bytes / self.link_bytes_per_s + self.link_latency_s

    def attention_s(self, device: Device, model: ModelSpec, tokens: int, kv_bytes: float,
                    prefill: bool = False) -> float:
        """Seconds of the step's attention over ``kv_bytes`` of cache (all its sequences) kept in
        host memory. ``host``: the host CPU's roofline of it (its read of the cache, or its
        FLOPs at the engine's attention share, :func:`attention_compute_s`: the longer) and, per
        attention layer, the step's query, keys and values to the CPU and the output back;
        ``device``: the cache over the route per pass (one transfer per attention layer) or
        ``device``'s FLOPs, the longer."""
        layers = len(model.attention_layer_indices)
        if self.attention == "device":
            return max(kv_bytes / self.link_bytes_per_s + layers * self.link_latency_s,
                       attention_compute_s(device, model, tokens, kv_bytes, prefill))
        read_s = kv_bytes / (self.cpu.memory_bytes_per_s * self.cpu.efficiency.memory_fraction)
        qkv = tokens * (model.hidden_size + 2 * model.num_key_value_heads * model.head_dim) * 2.0
        out = tokens * model.hidden_size * 2.0
        return max(read_s, attention_compute_s(self.cpu, model, tokens, kv_bytes, prefill)) \
            + layers * (self.transfer_s(qkv) + self.transfer_s(out))


def kv_host(hw, compute_id: str, host_id: str, kv_offload) -> KVHost:
    """The :class:`KVHost` of an engine's ``kv_offload`` (``profiles.engines.KVOffload``) on
    ``hw`` (seen through that engine): the host CPU and the route from its memory."""
    route = hw.route(hw.memory_of(host_id).id, compute_id)
    return KVHost(attention=kv_offload.attention, cpu=hw.devices[host_id],
                  link_bytes_per_s=route.bottleneck_bytes_per_s, link_latency_s=route.latency_s)


def dense_step_s(device: Device, model: ModelSpec, fmt: str, tokens: int, kv_bytes: float,
                 prefill: bool = False, kv_on_host: KVHost | None = None) -> float:
    """Seconds of the dense (non-expert) work of one forward step of ``tokens`` tokens.

    Every dense weight that runs as a matmul (attention, shared experts, dense layers, head)
    is read once and used by every token: one roofline call over those bytes and ``2 * tokens
    * params`` FLOPs. An untied input-embedding table is not a matmul: the step gathers one
    row per token (``min(tokens, V)`` rows of ``H`` weights, no FLOPs), so only those rows
    are read -- as :func:`planner.costs.fixed_costs` already counts it for memory (a tied
    table is the output head and is read whole). Attention reads the whole KV cache
    (``kv_bytes``, all sequences of the step) once, on the device or, ``kv_on_host``, where
    the host keeps it (:meth:`KVHost.attention_s`);
    each hidden layer launches two kernels (attention, dense/shared MLP) and pays the
    device's fixed per-layer framework cost (``layer_overhead_s``, a one-token step's) and, for
    each token of the step past the first, the engine's per-token cost (``token_overhead_s``:
    routing, gathering and scattering rows, eager ops whose work grows with the tokens; the
    bundle runtime's probe measures it as a prefill layer's cost over a decode layer's); on an engine with fused
    experts (``device.fused_experts``) each MoE layer launches the fused kernel's
    :data:`FUSED_MOE_LAUNCHES` kernels once (its expert calls launch none); the step pays the engine's
    per-step cost once (``step_overhead_s``, or ``prefill_step_overhead_s`` for a prefill).
    """
    bytes_per_weight = get_format(fmt).bits_per_weight / 8
    table = 0 if model.tie_word_embeddings else model.embedding_params  # V*H, looked up, not multiplied
    rows = min(float(tokens), float(model.vocab_size)) * model.hidden_size
    matmul_params = model.dense_params - table
    weights_s = _kernel_s(device, fmt, (matmul_params + (rows if table else 0.0)) * bytes_per_weight,
                          2.0 * tokens * matmul_params, tokens)
    kv_read_s = kv_bytes / (device.memory_bytes_per_s * device.efficiency.memory_fraction)
    per_layer_s = 2 * device.launch_overhead_s + device.layer_overhead_s + token_layer_s(device, tokens)
    fused_s = model.num_moe_layers * FUSED_MOE_LAUNCHES * device.launch_overhead_s if device.fused_experts else 0.0
    step_s = device.prefill_step_overhead_s if prefill else device.step_overhead_s
    host_s = device.linear_host_s.get(fmt, 0.0)  # the attention's linears are in the dense format
    per_layer_s += ATTENTION_LINEARS * host_s
    # a dense-only host cost per linear call: the attention's and the output head's
    dense_host_s = (model.num_hidden_layers * ATTENTION_LINEARS + 1) * device.dense_linear_host_s.get(fmt, 0.0)
    # attention over the cached context as one roofline: its KV read or its FLOPs at the share of
    # peak the engine's attention kernels reach, whichever is longer (no stated share: the read)
    attention_s = max(kv_read_s, attention_compute_s(device, model, tokens, kv_bytes, prefill)) if kv_on_host is None \
        else kv_on_host.attention_s(device, model, tokens, kv_bytes, prefill)  # where the host keeps the cache
    return weights_s + attention_s + model.num_hidden_layers * per_layer_s + fused_s + step_s + dense_host_s \
        + model.num_moe_layers * unrouted_visits_s(device, model, fmt, tokens)


def attention_flops(model: ModelSpec, tokens: int, kv_bytes: float, prefill: bool = False) -> float:
    """FLOPs of one forward step's attention over the cached context (``kv_bytes``: bf16, all
    sequences of the step, sliding windows applied, as :meth:`ModelSpec.kv_cache_bytes`).

    Per (query token, cached token, attention layer) pair, the logits q.k and the weighted sum
    p.v cost ``2 heads key_size`` FLOPs each (Hoffmann et al. 2022, "Training Compute-Optimal
    Large Language Models", Appendix F: attention logits and softmax @ query reduction,
    ``2 x seq x key_size x heads`` each per token): ``4 heads head_dim`` for GQA; for MLA the
    absorbed form engines run (llama.cpp, SGLang, kTransformers), the keys ``kv_lora_rank +
    qk_rope_head_dim`` wide and the values ``kv_lora_rank``. A decode step's tokens are one per
    sequence, each attending to its own: the pairs are the cached token-layers. A prefill pass of
    ``n`` tokens of one sequence whose cache ends at ``c`` tokens per layer (this pass's
    included) is causal: ``n (c - (n - 1) / 2)`` pairs per layer (windowed layers counted as if
    ``c`` were their cached tokens: an approximation).
    """
    per_token_layer = model.kv_elements_per_token_per_layer * 2.0  # bf16 bytes
    layers = len(model.attention_layer_indices)
    if per_token_layer <= 0 or layers == 0:
        return 0.0
    sequences = 1 if prefill else max(int(tokens), 1)
    token_layers = max(kv_bytes - sequences * model.mamba_state_bytes(), 0.0) / per_token_layer
    if model.attention == "mla":
        per_pair = 2.0 * model.num_attention_heads * (2 * model.kv_lora_rank + model.qk_rope_head_dim)
    else:
        per_pair = 4.0 * model.num_attention_heads * model.head_dim
    pairs = token_layers
    if prefill and tokens > 1:
        context = max(token_layers / layers, float(tokens))
        pairs = token_layers * tokens * (1.0 - (tokens - 1) / (2.0 * context))
    return pairs * per_pair


def attention_compute_s(device: Device, model: ModelSpec, tokens: int, kv_bytes: float, prefill: bool = False) -> float:
    """Seconds of :func:`attention_flops` at the share of ``device``'s bf16 (or widest float)
    peak the engine's attention kernels reach (``device.attention_fraction``, set by an engine
    profile's ``attention_fraction``); 0 where none is stated (attention priced as its KV read)."""
    if not device.attention_fraction:
        return 0.0
    peak = device.peak_ops_per_s[compute_format(device, "bf16")]
    return attention_flops(model, tokens, kv_bytes, prefill) / (peak * device.attention_fraction)


def token_layer_s(device: Device, tokens: float) -> float:
    """Seconds one hidden layer's framework work adds for the tokens of a forward step past
    the first (``device.token_overhead_s`` each; ``layer_overhead_s`` is a one-token step's)."""
    return max(float(tokens) - 1.0, 0.0) * device.token_overhead_s


def miss_compute_s(compute: Device, host: Device, weight_bytes: float, threads: int | None = None) -> float:
    """Seconds one expert-cache miss of ``weight_bytes`` takes from the compute device's work:
    the host CPU time of the engine's copy worker (``host.miss_host_cpu_s``: reading the
    expert, making it ready), where the compute device is that CPU; 0 where it is not (a GPU
    or an accelerator computes while a host core does the miss's work).

    The worker is one thread on the CPU's ``C`` cores (``host.cores``); the compute runs its
    kernels on ``T`` of them (``threads``; None: all, as the bundle runtime's ONNX Runtime
    sessions and torch do). The OS spreads the worker's CPU time over the cores, ``T / C`` of
    it on cores the compute is using, and a kernel's threads wait for the slowest of them at
    each op's end, so that share is lost to the compute whole:
    ``min(1, T / C) x (fixed + weight_bytes x per_byte)``.
    """
    fixed, per_byte = host.miss_host_cpu_s
    if compute.id != host.id or (fixed == 0.0 and per_byte == 0.0):
        return 0.0
    cores = host.cores or 1
    share = min(1.0, (threads if threads is not None else cores) / cores)
    return share * (fixed + float(weight_bytes) * per_byte)


def unrouted_visits_s(device: Device, model: ModelSpec, fmt: str, tokens: float) -> float:
    """Seconds one MoE layer spends on the experts no token routes to, on an engine that visits
    every expert each step (``device.visits_every_expert``, else 0): each costs the engine's
    per-call overhead and its linears' host time, its kernels run on an empty batch.

    With ``tokens`` tokens each picking ``k`` of ``E`` experts, ``E * (1 - k/E)**tokens``
    experts are expected to get none. Their linears are priced at ``fmt``'s host cost (the
    dense step knows no expert format; a fully fp8 or bf16 checkpoint has one).
    """
    if not device.visits_every_expert or model.num_experts <= 0:
        return 0.0
    E, k = float(model.num_experts), float(min(model.top_k, model.num_experts))
    unrouted = E * (1.0 - k / E) ** max(float(tokens), 0.0)
    return unrouted * (device.expert_call_overhead_s + LINEARS_PER_EXPERT * device.linear_host_s.get(fmt, 0.0))


def activation_bytes(model: ModelSpec, tokens: float) -> float:
    """Bytes of ``tokens`` hidden states in bf16: what crosses a link when an expert runs elsewhere."""
    return tokens * model.hidden_size * 2.0


def micro_batches(tokens: int, micro_batch_tokens: int | None) -> list[tuple[int, int]]:
    """``[(tokens, count)]``: the forward passes a step of ``tokens`` tokens runs as, when the
    engine processes at most ``micro_batch_tokens`` at a time (llama.cpp's ``-ub``): full
    micro-batches first, the last one smaller; ``None``: one pass of all of them.

    >>> micro_batches(1400, 512)
    [(512, 2), (376, 1)]
    """
    tokens = max(int(tokens), 1)
    if micro_batch_tokens is None or tokens <= micro_batch_tokens:
        return [(tokens, 1)]
    full, rest = divmod(tokens, micro_batch_tokens)
    return [(micro_batch_tokens, full)] + ([(rest, 1)] if rest else [])


def op_offloads(op_offload, device: Device, tokens: float) -> bool:
    """Whether a forward pass of ``tokens`` tokens on compute device ``device`` runs the
    host-held experts on it after copying them (``op_offload``: the engine's
    ``profiles.engines.OpOffload`` or None): only a GPU, and from the engine's threshold on."""
    return op_offload is not None and device.kind == "gpu" and tokens >= op_offload.min_batch_tokens
