"""Nested (bit-plane) formats: an int8 expert stored as two int4 planes, an int4 one as two
2-bit planes (D²MoE-style).

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
``[-128 s, 127 s]``; its error is plain int4's (the tests compare them).

int4 as 2 + 2 works the same way on onnxruntime's asymmetric int4 codes (``W = (q - zp) s``,
the runtime's ``int4``): the high plane alone is ``W ~ (4 hi + 1.5 - zp) s``, a 4-level
uniform quantiser of step ``4 s`` in the int4 groups (128 along K), keeping int4's fp32 scale
and 4-bit zero point per group: 2 + 36 / 128 = 2.28 bits a weight, the runtime's plain
``int2`` (:mod:`formats`: groups of 64, fp16 scale, 2-bit zero point, 2 + 18 / 64) has the
same, but it is not that layout: its zero point is int4's (fractional in 2-bit steps) and its
range is int4's min/max, not clip-searched. Measured on gaussian weights (tests): high plane
0.404 relative error, plain int2 0.357, 1.13x (int8's high plane vs plain int4: 0.104 vs
0.101, 1.03x); :data:`profiles.nested.HIGH_ERROR` carries these ratios into the price.

So the bundle stores a nested expert's planes instead of its codes (the same bytes: int8's two
nibbles a byte each, int4's four 2-bit codes a byte each; the scales, and int4's zero
points, with the high plane), and the runtime

- assembles the exact codes in the plain format's own layout from both planes (a resident
  expert holding both, or one whose low plane was fetched on this use): the format's kernel
  then computes exactly what the plain expert computes;
- or unpacks the high plane alone (:func:`dequantize_high`) at its half format's quality.

Planes are packed two codes a byte (4-bit) or four (2-bit), the lowest bits first, like
MatMulNBits' int4. numpy at export, torch at run time (imported inside functions).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["NESTED_BITS", "PLANE_SUFFIXES", "assemble", "dequantize_high", "high_value", "join_codes", "pack_plane", "plane_names",
           "split_codes", "split_matrix", "unpack_plane"]

PLANE_SUFFIXES = ("qh", "ql")  # tensor names of a matrix's planes: prefix.qh, prefix.ql
NESTED_BITS = {"int8": 8, "int4": 4}  # a nestable format -> bits of its code (planes of half)


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


def plane_names(prefix: str, which: tuple[str, ...] = PLANE_SUFFIXES, fmt: str = "int8") -> tuple[str, ...]:
    """Tensor names of one nested matrix at ``fmt``: its planes (``which``) and, with the high
    plane, its scales (and int4's zero points)."""
    meta = (f"{prefix}.scales",) + ((f"{prefix}.zp",) if fmt == "int4" else ())
    return tuple(f"{prefix}.{w}" for w in which) + (meta if "qh" in which else ())


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """MatMulNBits' int4 bytes ``[..., m]`` -> codes ``[..., 2 m]``, the lower nibble first."""
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def split_matrix(tensors: dict[str, np.ndarray], prefix: str, fmt: str = "int8") -> dict[str, np.ndarray]:
    """One int8 or int4 matrix in MatMulNBits' layout (:func:`quant.quantize_matrix`: ``prefix.q``
    ``[N, kb, Kb * bits / 8]`` uint8, ``prefix.scales`` (and int4's ``prefix.zp``)) as its two
    packed planes of ``bits / 2`` (``[N, kb, Kb * bits / 16]`` each) and its scales (and zero points)."""
    bits = NESTED_BITS[fmt]
    codes = tensors[f"{prefix}.q"]
    if bits == 4:
        codes = _nibbles(codes)  # [N, kb, Kb]
    hi, lo = split_codes(codes, bits)
    out = {f"{prefix}.qh": pack_plane(hi, bits // 2), f"{prefix}.ql": pack_plane(lo, bits // 2),
           f"{prefix}.scales": tensors[f"{prefix}.scales"]}
    if fmt == "int4":
        out[f"{prefix}.zp"] = tensors[f"{prefix}.zp"]
    return out


def assemble(high: dict[str, Any], low: dict[str, Any], prefixes=("gate_up", "down"), fmt: str = "int8") -> dict[str, Any]:
    """The plain ``fmt`` tensors (``prefix.q``, ``prefix.scales``, int4's ``prefix.zp``) of an
    expert from its high plane and scales (``high``) and its low plane (``low``), torch: the
    exact codes, packed as the plain format packs them."""
    bits = NESTED_BITS[fmt]
    out = {}
    for prefix in prefixes:
        hi = unpack_plane(high[f"{prefix}.qh"], bits // 2)
        lo = unpack_plane(low[f"{prefix}.ql"], bits // 2)
        codes = join_codes(hi, lo, bits)  # [N, kb, Kb]
        if bits == 4:  # two codes a byte, the lower nibble first (MatMulNBits)
            pairs = codes.reshape(*codes.shape[:-1], -1, 2)
            codes = pairs[..., 0] | (pairs[..., 1] << 4)
        out[f"{prefix}.q"] = codes
        out[f"{prefix}.scales"] = high[f"{prefix}.scales"]
        if fmt == "int4":
            out[f"{prefix}.zp"] = high[f"{prefix}.zp"]
    return out


def dequantize_high(tensors: dict[str, Any], prefix: str, k: int, fmt: str = "int8"):
    """``[N, K]`` float32 (torch) of one nested matrix from its high plane alone: int8's int4
    copy ``W ~ (16 hi + 7.5 - 128) s``, or int4's 2-bit copy ``W ~ (4 hi + 1.5 - zp) s``."""
    import torch

    bits = NESTED_BITS[fmt]
    hi = unpack_plane(tensors[f"{prefix}.qh"], bits // 2)  # [N, kb, Kb]
    scales = tensors[f"{prefix}.scales"]
    n, kb = scales.shape
    if fmt == "int4":
        zp = tensors[f"{prefix}.zp"]
        zero = torch.stack([zp & 0xF, zp >> 4], dim=-1).reshape(n, -1)[:, :kb, None].float()  # [N, kb, 1]
    else:
        zero = 128.0
    weight = (high_value(hi.float(), bits) - zero) * scales[..., None].float()
    return weight.reshape(n, -1)[:, :k]
