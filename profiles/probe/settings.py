"""Probe modes: sizes, repeats and the time budget of ``full``, ``quick`` and ``tiny``."""

from __future__ import annotations

from dataclasses import dataclass, replace

MiB = 2**20
GiB = 2**30
# powers of two from 1 to 256 tokens per expert call: decode (1) up to a prefill chunk
CPU_FFN_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GPU_FFN_TOKENS = CPU_FFN_TOKENS + (512, 1024, 2048, 4096)
# MatMulNBits quantisation block: the GPTQ/AWQ group of profiles.formats (int4, int8)
BLOCK_SIZE = 128

# The CPU curve written to the profile comes from the first of these that was measured:
# the runtime runs CPU-resident experts through ONNX Runtime's quantised kernels (DESIGN.md).
CURVE_PREFERENCE = ("int4", "int8", "fp32", "bf16")


@dataclass(frozen=True)
class ProbeSettings:
    """Sizes and repeats of one probe mode: the most each measurement does. Each is cut to its
    share of ``budget_s`` after a small first run (:mod:`.budget`); bigger, steadier figures
    where the machine is fast enough.

    Attributes:
        mode: ``"full"``, ``"quick"`` or ``"tiny"`` (tests: seconds, rough figures).
        budget_s: wall-clock seconds the whole probe aims to stay within, library loading included.
        dram_bytes: size of each DRAM test array (two are allocated); larger than the caches.
        dram_repeats: best of this many passes.
        disk_bytes: size of the temporary file read back from the disk.
        disk_repeats: reads of it (each past the page cache), best kept.
        gemm_m: rows of the activations in a throughput GEMM; gemm_k = gemm_n = gemm_dim.
        gemm_dim: inner and output dimension of the throughput GEMM.
        gemm_repeats: best of this many GEMMs.
        ffn_hidden: H of the probed CPU expert (2048: DeepSeek-V2-Lite, Qwen1.5-MoE).
        ffn_intermediate: I of the probed CPU expert (1408, a multiple of 128).
        ffn_tokens: token counts of the CPU efficiency curve.
        ffn_other_tokens: token counts timed for the formats whose curve is not written.
        ffn_working_set_bytes: expert weights cycled through per format (past the caches).
        ffn_point_s: time spent on one token count of the curve, at least 3 calls.
        ffn_formats: formats whose FFN curve is measured (the profile uses one, see
            :data:`CURVE_PREFERENCE`; the others are reported in the JSON only).
        gpu_transfer_bytes: host-to-device copy size.
        gpu_copy_bytes: device-to-device array size for memory bandwidth.
        gpu_gemm_dim: M = K = N of the GPU throughput GEMMs.
        gpu_ffn_hidden, gpu_ffn_intermediate: the GPU expert (Mixtral-8x7B: 4096, 14336).
        gpu_ffn_tokens: token counts of the GPU efficiency curve.
        gpu_ffn_working_set_bytes: GPU expert weights cycled through (past the L2).
        gpu_repeats: best of this many timings of each GPU figure.
        cache_multiple: the DRAM arrays are at least this many times the last-level cache,
            and the CPU expert working set too (up to ``ffn_working_set_bytes``); 0: sizes as given.
    """

    mode: str
    budget_s: float
    dram_bytes: int
    dram_repeats: int
    disk_bytes: int
    disk_repeats: int
    gemm_m: int
    gemm_dim: int
    gemm_repeats: int
    ffn_hidden: int
    ffn_intermediate: int
    ffn_tokens: tuple[int, ...]
    ffn_other_tokens: tuple[int, ...]
    ffn_working_set_bytes: int
    ffn_point_s: float
    ffn_formats: tuple[str, ...]
    gpu_transfer_bytes: int
    gpu_copy_bytes: int
    gpu_gemm_dim: int
    gpu_ffn_hidden: int
    gpu_ffn_intermediate: int
    gpu_ffn_tokens: tuple[int, ...]
    gpu_ffn_working_set_bytes: int
    gpu_repeats: int
    cache_multiple: float


FULL = ProbeSettings(
    mode="full", budget_s=60.0, dram_bytes=512 * MiB, dram_repeats=5, disk_bytes=1 * GiB, disk_repeats=2,
    gemm_m=1024, gemm_dim=2048, gemm_repeats=5,
    ffn_hidden=2048, ffn_intermediate=1408, ffn_tokens=CPU_FFN_TOKENS, ffn_other_tokens=CPU_FFN_TOKENS,
    ffn_working_set_bytes=512 * MiB, ffn_point_s=0.4, ffn_formats=("fp32", "bf16", "int8", "int4"),
    gpu_transfer_bytes=512 * MiB, gpu_copy_bytes=1 * GiB, gpu_gemm_dim=8192,
    gpu_ffn_hidden=4096, gpu_ffn_intermediate=14336, gpu_ffn_tokens=GPU_FFN_TOKENS,
    gpu_ffn_working_set_bytes=1 * GiB, gpu_repeats=5, cache_multiple=2.0,
)
QUICK = replace(
    FULL, mode="quick", budget_s=15.0, dram_bytes=256 * MiB, dram_repeats=3, disk_bytes=256 * MiB,
    disk_repeats=1, gemm_m=512, gemm_repeats=3,
    ffn_other_tokens=(1,), ffn_working_set_bytes=256 * MiB, ffn_point_s=0.12, ffn_formats=("fp32", "int8", "int4"),
    gpu_transfer_bytes=128 * MiB, gpu_copy_bytes=256 * MiB, gpu_gemm_dim=4096, gpu_ffn_tokens=GPU_FFN_TOKENS[:11],
    gpu_ffn_working_set_bytes=768 * MiB, gpu_repeats=3, cache_multiple=1.0,
)
# for tests: every code path, small arrays, figures only roughly right; a budget so loose
# that a busy test machine still measures everything
TINY = replace(
    QUICK, mode="tiny", budget_s=60.0, dram_bytes=16 * MiB, dram_repeats=2, disk_bytes=8 * MiB,
    gemm_m=64, gemm_dim=256, gemm_repeats=2,
    ffn_hidden=256, ffn_intermediate=256, ffn_tokens=(1, 4, 16), ffn_working_set_bytes=1 * MiB, ffn_point_s=0.01,
    gpu_transfer_bytes=8 * MiB, gpu_copy_bytes=16 * MiB, gpu_gemm_dim=512, gpu_ffn_hidden=256,
    gpu_ffn_intermediate=512, gpu_ffn_tokens=(1, 4, 16), gpu_ffn_working_set_bytes=16 * MiB, gpu_repeats=2,
    cache_multiple=0.0,
)
SETTINGS = {s.mode: s for s in (FULL, QUICK, TINY)}
