"""Nested (bit-plane) formats: an int8 expert stored as two int4 planes (D²MoE-style).

Legend: N = output features, kb = groups per row, Kb = group size, b = bits of a code,
h = b / 2 bits of a plane.

A b-bit code ``q`` (unsigned, ``0 <= q < 2^b``) splits exactly into a high plane and a low
plane of h bits each::

    hi = q >> h,   lo = q & (2^h - 1),   q = 2^h * hi + lo            (exact)

The high plane alone is a valid h-bit quantisation of the same weights: it stands for the
middle of the ``2^h`` codes it covers, ``q ~ 2^h * hi + (2^h - 1) / 2``, a uniform quantiser
with ``2^h`` levels, a step ``2^h`` times the full code's, and the same group scales (and zero
point). With onnxruntime's symmetric int8 (``W = (q - 128) * s``, the runtime's ``int8``,
:mod:`quant`) the high plane is a 16-level mid-rise quantiser of step ``16 s``: levels
``(hi - 7.5) * 16 s``, symmetric about zero, covering ``[-120 s, 120 s]`` of the int8 range
``[-128 s, 127 s]``; its error is plain int4's (the tests compare them). int4 as 2 + 2 works the
same way on int4 codes (``W = (q - zp) * s``).

So the bundle stores an int8 expert's planes instead of its codes (the same bytes: two
nibbles a byte each), and the runtime

- assembles the exact int8 codes from both planes (a resident expert holding both, or one
  whose low plane was fetched on this use): the int8 kernel then computes exactly what the
  plain int8 expert computes;
- or unpacks the high plane alone (:func:`dequantize_high`) at int4 quality.

Planes are packed two codes a byte (4-bit) or four (2-bit), the lowest bits first, like
MatMulNBits' int4. numpy at export, torch at run time (imported inside functions).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PLANE_SUFFIXES", "assemble", "dequantize_high", "high_value", "join_codes", "pack_plane", "plane_names",
           "split_codes", "split_matrix", "unpack_plane"]

PLANE_SUFFIXES = ("qh", "ql")  # tensor names of a matrix's planes: prefix.qh, prefix.ql


def split_codes(codes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(hi, lo)`` planes of unsigned ``bits``-bit codes (uint8): ``codes = 2^(bits/2) hi + lo``."""
    if bits % 2 or not 2 <= bits <= 8:
        raise ValueError(f"a nested format splits an even width of 2..8 bits, not {bits}")
    h = bits // 2
    codes = np.asarray(codes, dtype=np.uint8)
    return codes >> h, codes & np.uint8((1 << h) - 1)


def join_codes(hi, lo, bits: int):
    """The codes of :func:`split_codes`'s planes (numpy or torch alike): exact."""
    return (hi << (bits // 2)) | lo


def high_value(hi, bits: int):
    """The code the high plane alone stands for: the middle of the ``2^(bits/2)`` codes it covers."""
    h = bits // 2
    return hi * float(1 << h) + ((1 << h) - 1) / 2


def pack_plane(plane: np.ndarray, plane_bits: int) -> np.ndarray:
    """Codes ``[..., n]`` of ``plane_bits`` (2 or 4) bits packed ``8 / plane_bits`` a byte, lowest
    bits first: ``[..., n * plane_bits / 8]`` uint8 (n a multiple of the codes per byte)."""
    per = 8 // plane_bits
    p = np.asarray(plane, dtype=np.uint8).reshape(*plane.shape[:-1], -1, per)
    out = np.zeros(p.shape[:-1], np.uint8)
    for i in range(per):
        out |= p[..., i] << np.uint8(i * plane_bits)
    return out


def unpack_plane(packed, plane_bits: int):
    """Inverse of :func:`pack_plane` on a torch uint8 tensor ``[..., m]`` -> ``[..., m * 8 / plane_bits]``."""
    import torch

    per = 8 // plane_bits
    mask = (1 << plane_bits) - 1
    parts = [(packed >> (i * plane_bits)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)


def plane_names(prefix: str, which: tuple[str, ...] = PLANE_SUFFIXES) -> tuple[str, ...]:
    """Tensor names of one nested int8 matrix: its planes (``which``) and its scales."""
    return tuple(f"{prefix}.{w}" for w in which) + (f"{prefix}.scales",)


def split_matrix(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """One int8 matrix in MatMulNBits' layout (:func:`quant.quantize_matrix`: ``prefix.q``
    ``[N, kb, Kb]`` uint8, ``prefix.scales``) as its two packed int4 planes and its scales."""
    hi, lo = split_codes(tensors[f"{prefix}.q"], 8)
    return {f"{prefix}.qh": pack_plane(hi, 4), f"{prefix}.ql": pack_plane(lo, 4),
            f"{prefix}.scales": tensors[f"{prefix}.scales"]}


def assemble(high: dict[str, Any], low: dict[str, Any], prefixes=("gate_up", "down")) -> dict[str, Any]:
    """The plain int8 tensors (``prefix.q``, ``prefix.scales``) of an expert from its high
    plane and scales (``high``) and its low plane (``low``), torch: the exact int8 codes."""
    out = {}
    for prefix in prefixes:
        hi = unpack_plane(high[f"{prefix}.qh"], 4)
        lo = unpack_plane(low[f"{prefix}.ql"], 4)
        out[f"{prefix}.q"] = join_codes(hi, lo, 8)
        out[f"{prefix}.scales"] = high[f"{prefix}.scales"]
    return out


def dequantize_high(tensors: dict[str, Any], prefix: str, k: int):
    """``[N, K]`` float32 (torch) of one int8 matrix from its high plane alone: the int4 copy,
    ``W ~ (16 hi + 7.5 - 128) * s``."""
    hi = unpack_plane(tensors[f"{prefix}.qh"], 4)  # [N, kb, Kb]
    scales = tensors[f"{prefix}.scales"]
    weight = (high_value(hi.float(), 8) - 128.0) * scales[..., None].float()
    return weight.reshape(hi.shape[0], -1)[:, :k]
