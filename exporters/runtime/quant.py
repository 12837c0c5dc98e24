"""Weight-only group-wise quantisation (int8, int4) in ONNX Runtime's MatMulNBits layout.

Legend: N = output features (rows of an HF weight), K = input features, kb = K / block
groups per row (rounded up), Kb = block size (group of K sharing one scale).

One layout serves both execution paths, so an expert computes the same numbers wherever it
runs: weights are quantised once by onnxruntime's own quantiser
(``onnxruntime.quantization.matmul_nbits_quantizer.DefaultWeightOnlyQuantizer``, the code
``MatMulNBitsQuantizer`` runs for each MatMul), the CPU runs them with the ``MatMulNBits``
contrib op, and the torch side (the compute device, GPU or CPU) unpacks them with
:func:`dequantize` right before its matmul. The unpacking is written here by hand because
no library in this package's allowed set (torch, onnxruntime, ...) dequantises the
MatMulNBits layout in torch; torch's own int4 kernels (``torch._weight_int4pack_mm``) are
private, device-specific and take a different packing. Tests hold :func:`dequantize` to the
MatMulNBits op's output.

Formats (planner profiles/formats.py): ``int8`` symmetric (implicit zero point 128),
``int4`` asymmetric with a 4-bit zero point per group; groups of 128 along K (smaller,
a power of two >= 16, when K is smaller). Scales are float32 (the op takes scales in the
activation dtype, and the CPU path runs in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["QUANT_SPECS", "QuantSpec", "block_size_for", "dequantize", "quant_names", "quantize_matrix",
           "quantizer_module"]

GROUP_SIZE = 128  # weights per scale (profiles/formats.py int8/int4)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    symmetric: bool
    # MatMulNBits accuracy_level: 4 computes with int8 activations per block (10-50x faster
    # on x86 than level 0 for 8-bit weights; cosine to fp32 >= 0.9999 in the tests)
    accuracy_level: int = 4


QUANT_SPECS = {"int8": QuantSpec(bits=8, symmetric=True), "int4": QuantSpec(bits=4, symmetric=False)}


def block_size_for(k: int) -> int:
    """Group size along K: 128, or the smallest power of two >= max(K, 16) when K < 128."""
    size = 16
    while size < min(k, GROUP_SIZE):
        size *= 2
    return size


def quant_names(prefix: str, fmt: str) -> tuple[str, ...]:
    """Tensor names of one quantised matrix: packed weights, scales (and zero points)."""
    names = (f"{prefix}.q", f"{prefix}.scales")
    return names if QUANT_SPECS[fmt].symmetric else names + (f"{prefix}.zp",)


def quantizer_module():
    """``onnxruntime.quantization.matmul_nbits_quantizer`` (it needs ``onnx`` and ``onnx-ir``,
    which onnxruntime does not install by itself)."""
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    except ImportError as exc:
        from .errors import RuntimeInputError

        raise RuntimeInputError(f"int8/int4 kernels need onnxruntime's quantiser, which needs {exc.name}",
                                fix="pip install onnx onnx-ir") from None
    return matmul_nbits_quantizer


def quantize_matrix(weight: np.ndarray, fmt: str, prefix: str) -> dict[str, np.ndarray]:
    """Quantise one HF weight ``[N, K]`` with onnxruntime's quantiser.

    Returns:
        ``{prefix.q: [N, kb, Kb*bits/8] uint8, prefix.scales: [N, kb] float32,
        prefix.zp: [N, ceil(kb*bits/8)] uint8 (asymmetric only)}``.
    """
    q = quantizer_module()
    spec = QUANT_SPECS[fmt]
    k = weight.shape[1]
    config = q.DefaultWeightOnlyQuantConfig(block_size=block_size_for(k), is_symmetric=spec.symmetric,
                                            bits=spec.bits, accuracy_level=spec.accuracy_level)
    # the quantiser takes a MatMul's B = W^T [K, N] and quantises along K
    packed, scales, zero_points = q.DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weight.T, dtype=np.float32))
    out = {f"{prefix}.q": packed, f"{prefix}.scales": scales}
    if not spec.symmetric:
        out[f"{prefix}.zp"] = zero_points
    return out


def dequantize(tensors: dict[str, Any], prefix: str, fmt: str, k: int):
    """Unpack one matrix quantised by :func:`quantize_matrix` into ``[N, K]`` float32 (torch).

    ``W[n, k] = (q[n, k] - zero[n, k // Kb]) * scale[n, k // Kb]``; 4-bit values are packed
    two per byte, the lower nibble first, as are the 4-bit zero points.
    """
    import torch

    spec = QUANT_SPECS[fmt]
    q, scales = tensors[f"{prefix}.q"], tensors[f"{prefix}.scales"]
    n, kb, _ = q.shape
    if spec.bits == 4:
        q = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(n, kb, -1)  # [N, kb, Kb]
    if spec.symmetric:
        zero = torch.full((1, 1, 1), float(1 << (spec.bits - 1)), device=q.device)
    else:
        zp = tensors[f"{prefix}.zp"]
        if spec.bits == 4:
            zp = torch.stack([zp & 0xF, zp >> 4], dim=-1).reshape(n, -1)
        zero = zp[:, :kb, None].float()
    weight = (q.float() - zero) * scales[..., None].float()
    return weight.reshape(n, -1)[:, :k]
