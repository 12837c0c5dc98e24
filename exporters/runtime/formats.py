"""Every expert format the bundle runs: quantised at export, unpacked before the matmul.

Legend: N = output features (rows of an HF weight), K = input features, G = group size
(weights along K sharing one scale), kb = ceil(K / G) groups per row, Kp = kb * G.

``int8``/``int4`` keep onnxruntime's MatMulNBits layout (:mod:`quant`): the CPU runs them
in pre-packed ONNX Runtime sessions, the GPU unpacks them. Every other format the planner
prices (profiles/formats.py) has no kernel in torch or ONNX Runtime that reads it, so it is
stored packed, at the bits per weight the planner counts, and unpacked to float32 right
before each matmul, on the GPU or on the CPU alike (:func:`dequantize`):

=======  ================================  =======  =======================  ======
format   element                           G        scale (and zero point)   bits/w
=======  ================================  =======  =======================  ======
fp8      e4m3 (``torch.float8_e4m3fn``)    128x128  fp32 per block           8.002
fp6      e2m3 (OCP MXFP6)                  32       e8m0                     6.25
fp4      e2m1                              32       e4m3, one fp32/matrix    4.25
mxfp4    e2m1 (OCP MXFP4)                  32       e8m0                     4.25
int3     asymmetric, clip-searched         128      fp16 + 3-bit zero        3.148
int2     asymmetric, clip-searched         64       fp16 + 2-bit zero        2.281
ternary  {-1, 0, 1}, 5 trits a byte (TWN)  256      fp16                     1.6625
=======  ================================  =======  =======================  ======

Codes of b bits are packed little-endian along K, ``lcm(b, 8) / b`` codes in
``lcm(b, 8) / 8`` bytes; a row is padded with zeros to whole groups (so files match the bits
per weight when K is a multiple of G, and carry that padding otherwise); int3/int2 zero
points are packed over the whole matrix, row after row (a row's few would fill a chunk).
The MX scale is ``2^(floor(log2(amax)) - 2)`` (OCP MX v1.0: both elements' largest
exponent is 2); fp4's group scale is ``amax / 6`` stored in e4m3 relative to one fp32 scale
per matrix (NVFP4's two-level scheme, with MXFP4's group of 32); int3/int2 pick each
group's clipping range from five shrink factors by least squared error; ternary keeps
weights above ``0.7 * mean|w|`` with the mean of their magnitudes as scale (ternary weight
networks, Li et al. 2016).

Unpacking decodes through a table with a row per byte where a byte holds whole codes (fp8,
fp4, mxfp4, int2, ternary), else per code. This module imports torch only inside functions:
the plan reader imports its names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

__all__ = ["ORT_FORMATS", "UNPACK_FORMATS", "Layout", "LAYOUTS", "dequantize", "layout_bits_per_weight",
           "quantize", "tensor_names"]

ORT_FORMATS = ("int8", "int4")  # quant.QUANT_SPECS: MatMulNBits, ONNX Runtime on the CPU


@dataclass(frozen=True)
class Layout:
    """How one unpack format stores a matrix.

    Attributes:
        kind: ``float`` (minifloat elements), ``fp8``, ``int`` (asymmetric) or ``ternary``.
        bits: bits of one stored element code.
        group: G, weights along K per scale (fp8: the side of a square block).
        scale: ``e8m0``, ``e4m3`` (with one fp32 per matrix), ``fp16`` or ``fp32``.
        exp_bits, man_bits: minifloat element (``float`` kind).
    """

    kind: str
    bits: int
    group: int
    scale: str
    exp_bits: int = 0
    man_bits: int = 0

    @property
    def zero_bits(self) -> int:
        return self.bits if self.kind == "int" else 0


LAYOUTS = {
    "fp8": Layout("fp8", 8, 128, "fp32"),
    "fp6": Layout("float", 6, 32, "e8m0", exp_bits=2, man_bits=3),
    "fp4": Layout("float", 4, 32, "e4m3", exp_bits=2, man_bits=1),
    "mxfp4": Layout("float", 4, 32, "e8m0", exp_bits=2, man_bits=1),
    "int3": Layout("int", 3, 128, "fp16"),
    "int2": Layout("int", 2, 64, "fp16"),
    "ternary": Layout("ternary", 0, 256, "fp16"),
}
UNPACK_FORMATS = tuple(LAYOUTS)
_SCALE_BITS = {"e8m0": 8, "e4m3": 8, "fp16": 16, "fp32": 32}
_SHRINK = (1.0, 0.9, 0.8, 0.7, 0.6)  # int clipping candidates (fractions of the group's range)
_TERNARY_PER_BYTE = 5  # 3^5 = 243 <= 256


def layout_bits_per_weight(fmt: str) -> float:
    """Stored bits per weight of ``fmt`` for a matrix whose sides are whole groups (fp8:
    whole blocks), per-matrix scalars left out."""
    lay = LAYOUTS[fmt]
    if lay.kind == "fp8":
        return 8 + 32 / lay.group ** 2
    element = 8 / _TERNARY_PER_BYTE if lay.kind == "ternary" else lay.bits
    return element + (_SCALE_BITS[lay.scale] + lay.zero_bits) / lay.group


def tensor_names(prefix: str, fmt: str) -> tuple[str, ...]:
    """Tensor names of one stored matrix in ``fmt`` (int8/int4: :func:`quant.quant_names`)."""
    if fmt in ORT_FORMATS:
        from .quant import quant_names

        return quant_names(prefix, fmt)
    lay = LAYOUTS[fmt]
    names = (f"{prefix}.q", f"{prefix}.scales")
    if lay.kind == "int":
        names += (f"{prefix}.zp",)
    if lay.scale == "e4m3":
        names += (f"{prefix}.tscale",)
    return names


# ----------------------------------------------------------------------------- element tables

@cache
def minifloat_values(exp_bits: int, man_bits: int) -> np.ndarray:
    """Value of every code ``sign | exponent | mantissa`` of an OCP MX minifloat without
    inf/NaN (bias ``2^(exp_bits-1) - 1``); codes below ``2^(exp_bits+man_bits)`` are >= 0
    and increase with the code."""
    bias = (1 << (exp_bits - 1)) - 1
    mags = []
    for code in range(1 << (exp_bits + man_bits)):
        e, m = code >> man_bits, code & ((1 << man_bits) - 1)
        frac = m / (1 << man_bits)
        mags.append(frac * 2.0 ** (1 - bias) if e == 0 else (1 + frac) * 2.0 ** (e - bias))
    mags = np.array(mags, np.float32)
    return np.concatenate([mags, -mags])


def _e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> e4m3 codes (uint8), round to nearest, saturating at 448."""
    import torch

    t = torch.from_numpy(np.clip(x, -448, 448).astype(np.float32))
    return t.to(torch.float8_e4m3fn).view(torch.uint8).numpy()


def _e4m3_values(codes: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn).float().numpy()


# ----------------------------------------------------------------------------- bit packing

def _chunk(bits: int) -> tuple[int, int]:
    """``(codes, bytes)`` of one packing chunk: lcm(bits, 8) bits."""
    lcm = bits * 8 // math.gcd(bits, 8)
    return lcm // bits, lcm // 8


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """``[..., M]`` codes < 2^bits -> ``[..., ceil(M / c) * B]`` bytes (c codes in B bytes)."""
    per, nbytes = _chunk(bits)
    m = codes.shape[-1]
    pad = -m % per
    c = np.pad(codes.astype(np.uint32), [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    c = c.reshape(*codes.shape[:-1], -1, per)
    word = (c << (bits * np.arange(per, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)
    out = (word[..., None] >> (8 * np.arange(nbytes, dtype=np.uint32))) & 0xFF
    return out.astype(np.uint8).reshape(*codes.shape[:-1], -1)


def unpack_bits(packed, bits: int, m: int):
    """Inverse of :func:`pack_bits` in torch: ``[..., nbytes]`` uint8 -> ``[..., m]`` int32 codes."""
    import torch

    per, nbytes = _chunk(bits)
    b = packed.reshape(*packed.shape[:-1], -1, nbytes).to(torch.int32)
    word = b[..., 0]
    for j in range(1, nbytes):
        word = word | (b[..., j] << (8 * j))
    # one shift and mask per code position: broadcast shifts over a new axis run several
    # times slower on a CPU
    mask = (1 << bits) - 1
    codes = torch.stack([(word >> (bits * i)) & mask for i in range(per)], dim=-1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :m]


# ----------------------------------------------------------------------------- quantise (numpy)

def quantize(weight: np.ndarray, fmt: str, prefix: str) -> dict[str, np.ndarray]:
    """Quantise one HF weight ``[N, K]`` (float32) to ``fmt``; int8/int4 through onnxruntime's
    quantiser (:func:`quant.quantize_matrix`), the rest as the module docstring says.

    Returns:
        ``{name: array}`` named by :func:`tensor_names`.
    """
    if fmt in ORT_FORMATS:
        from .quant import quantize_matrix

        return quantize_matrix(weight, fmt, prefix)
    lay = LAYOUTS[fmt]
    w = np.asarray(weight, np.float32)
    n, k = w.shape
    if lay.kind == "fp8":
        return _quantize_fp8(w, lay.group, prefix)
    kb = -(-k // lay.group)
    g = np.pad(w, [(0, 0), (0, kb * lay.group - k)]).reshape(n, kb, lay.group)  # [N, kb, G]
    if lay.kind == "float":
        return _quantize_minifloat(g, lay, prefix)
    if lay.kind == "int":
        return _quantize_int(g, lay, prefix)
    return _quantize_ternary(g, prefix)


def _quantize_fp8(w: np.ndarray, block: int, prefix: str) -> dict[str, np.ndarray]:
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = np.pad(w, [(0, nb * block - n), (0, kb * block - k)]).reshape(nb, block, kb, block)
    amax = np.abs(padded).max(axis=(1, 3))  # [nb, kb]
    scales = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
    full = np.repeat(np.repeat(scales, block, axis=0), block, axis=1)[:n, :k]
    return {f"{prefix}.q": _e4m3(w / full), f"{prefix}.scales": scales}


def _nearest_codes(x: np.ndarray, exp_bits: int, man_bits: int) -> np.ndarray:
    """Round ``x`` to the nearest minifloat value (saturating); returns the codes."""
    values = minifloat_values(exp_bits, man_bits)
    half = len(values) // 2
    mags = values[:half]
    idx = np.searchsorted((mags[1:] + mags[:-1]) / 2, np.abs(x))  # nearest magnitude, clipped at the top
    return (idx + np.where(x < 0, half, 0)).astype(np.uint8)


def _quantize_minifloat(g: np.ndarray, lay: Layout, prefix: str) -> dict[str, np.ndarray]:
    n, kb, _ = g.shape
    amax = np.abs(g).max(axis=-1)  # [N, kb]
    top = minifloat_values(lay.exp_bits, lay.man_bits).max()
    out = {}
    if lay.scale == "e8m0":
        safe = np.where(amax > 0, amax, 1.0)
        exp = np.floor(np.log2(safe)) - math.floor(math.log2(top))
        exp = np.where(amax > 0, np.clip(exp, -127, 127), -127)
        scales = (2.0 ** exp).astype(np.float32)
        out[f"{prefix}.scales"] = (exp + 127).astype(np.uint8)
    else:  # e4m3 group scale relative to one fp32 scale of the matrix
        want = amax / top
        tscale = np.float32(want.max() / 448.0) if want.max() > 0 else np.float32(1.0)
        codes = _e4m3(want / tscale)
        scales = _e4m3_values(codes) * tscale
        out[f"{prefix}.scales"] = codes
        out[f"{prefix}.tscale"] = np.array([tscale], np.float32)
    x = g / np.where(scales > 0, scales, 1.0)[..., None]
    out[f"{prefix}.q"] = pack_bits(_nearest_codes(x, lay.exp_bits, lay.man_bits).reshape(n, -1), lay.bits)
    return out


def _quantize_int(g: np.ndarray, lay: Layout, prefix: str) -> dict[str, np.ndarray]:
    n, kb, _ = g.shape
    qmax = (1 << lay.bits) - 1
    lo0, hi0 = np.minimum(g.min(axis=-1), 0.0), np.maximum(g.max(axis=-1), 0.0)  # [N, kb], 0 representable
    best_err = np.full((n, kb), np.inf, np.float32)
    best = None
    for shrink in _SHRINK:
        lo, hi = lo0 * shrink, hi0 * shrink
        scale = ((hi - lo) / qmax).astype(np.float16).astype(np.float32)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, qmax)
        q = np.clip(np.round(g / scale[..., None]) + zero[..., None], 0, qmax)
        err = (((q - zero[..., None]) * scale[..., None] - g) ** 2).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        if best is None:
            best = [q, scale, zero]
        else:
            best = [np.where(better[..., None], q, best[0]), np.where(better, scale, best[1]),
                    np.where(better, zero, best[2])]
    q, scale, zero = best
    return {f"{prefix}.q": pack_bits(q.astype(np.uint8).reshape(n, -1), lay.bits),
            f"{prefix}.scales": scale.astype(np.float16),
            f"{prefix}.zp": pack_bits(zero.astype(np.uint8).reshape(-1), lay.bits)}  # the matrix's, row-major


def _quantize_ternary(g: np.ndarray, prefix: str) -> dict[str, np.ndarray]:
    n = g.shape[0]
    mag = np.abs(g)
    keep = mag > 0.7 * mag.mean(axis=-1, keepdims=True)
    alpha = (mag * keep).sum(axis=-1) / np.maximum(keep.sum(axis=-1), 1)
    digits = (np.sign(g) * keep + 1).astype(np.uint8).reshape(n, -1)  # {-1, 0, 1} + 1
    digits = np.pad(digits, [(0, 0), (0, -digits.shape[1] % _TERNARY_PER_BYTE)], constant_values=1)
    digits = digits.reshape(n, -1, _TERNARY_PER_BYTE).astype(np.uint16)
    packed = (digits * (3 ** np.arange(_TERNARY_PER_BYTE, dtype=np.uint16))).sum(axis=-1).astype(np.uint8)
    return {f"{prefix}.q": packed, f"{prefix}.scales": alpha.astype(np.float16)}


# ----------------------------------------------------------------------------- unpack (torch)

_TABLES: dict[tuple[str, str], Any] = {}  # (table, device) -> torch tensor


def _table(lay: Layout, device) -> Any:
    """The values of every byte (``[256, codes a byte]``) where a byte holds whole codes
    (ternary, 2-, 4- and 8-bit), else of every code (``[2^bits, 1]``); int codes as floats."""
    import torch

    key = (f"{lay.kind}{lay.bits}e{lay.exp_bits}m{lay.man_bits}", str(device))
    if key not in _TABLES:
        if lay.kind == "fp8":  # torch's own e4m3 decoding of every byte
            values = _e4m3_values(np.arange(256, dtype=np.uint8))[:, None]
        elif lay.kind == "ternary":
            values = (np.arange(256)[:, None] // (3 ** np.arange(_TERNARY_PER_BYTE)) % 3).astype(np.float32) - 1.0
        else:
            codes = (np.arange(1 << lay.bits, dtype=np.float32) if lay.kind == "int"
                     else minifloat_values(lay.exp_bits, lay.man_bits))
            per = 8 // lay.bits if 8 % lay.bits == 0 else 1
            if per > 1:  # byte b holds codes (b >> bits*i) & mask, lowest first
                idx = np.arange(256)[:, None] >> (lay.bits * np.arange(per)) & ((1 << lay.bits) - 1)
                values = codes[idx]
            else:
                values = codes[:, None]
        _TABLES[key] = torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(device)
    return _TABLES[key]


def _decode(q, lay: Layout, kp: int):
    """Element values ``[n, Kp]`` float32 of the packed codes ``q [n, bytes]``: one table row
    per byte, or per code where codes straddle bytes (index_select: the fastest gather on a
    CPU, several times faster than advanced indexing)."""
    import torch

    table = _table(lay, q.device)
    n = q.shape[0]
    if table.shape[0] == 256:  # fp8: [256, 1]
        return table.index_select(0, q.reshape(-1).to(torch.int32)).reshape(n, -1)[:, :kp]
    codes = unpack_bits(q, lay.bits, kp).reshape(-1)
    return table.index_select(0, codes).reshape(n, kp)


def dequantize(tensors: dict[str, Any], prefix: str, fmt: str, k: int, rows=None):
    """Unpack one matrix stored by :func:`quantize` into ``[N, K]`` float32 (torch), on the
    tensors' device; ``rows`` (a 1-D index tensor) unpacks only those rows (an embedding)."""
    import torch

    if fmt in ORT_FORMATS:
        from .quant import dequantize as ort_dequantize

        if rows is not None:
            tensors = {name: t[rows] for name, t in tensors.items()}
        return ort_dequantize(tensors, prefix, fmt, k)
    lay = LAYOUTS[fmt]
    q, scales = tensors[f"{prefix}.q"], tensors[f"{prefix}.scales"]
    if lay.kind == "fp8":
        b = lay.group
        if rows is not None:
            q, scales = q[rows], scales[rows // b]
            return _decode(q, lay, k) * scales.repeat_interleave(b, dim=1)[:, :k]
        n = q.shape[0]
        w = _decode(q, lay, k)  # a table of 256 values: faster than torch's float8 cast on a CPU
        if n % b or k % b:  # partial blocks at the edges
            return w * scales.repeat_interleave(b, dim=0).repeat_interleave(b, dim=1)[:n, :k]
        return (w.reshape(n // b, b, k // b, b) * scales[:, None, :, None]).reshape(n, k)
    n_all = q.shape[0]
    if rows is not None:
        q, scales = q[rows], scales[rows]
    n, kb = scales.shape
    kp = kb * lay.group
    if lay.kind == "ternary":
        w = _decode(q, lay, kp)
        scale = scales.float()
    elif lay.kind == "float":
        w = _decode(q, lay, kp)
        if lay.scale == "e8m0":
            scale = torch.exp2(scales.float() - 127.0)
        else:
            scale = scales.view(torch.float8_e4m3fn).float() * tensors[f"{prefix}.tscale"].float()
    else:
        zero = unpack_bits(tensors[f"{prefix}.zp"], lay.bits, n_all * kb).reshape(n_all, kb).float()
        if rows is not None:
            zero = zero[rows]
        w = _decode(q, lay, kp).reshape(n, kb, lay.group) - zero[..., None]
        scale = scales.float()
    return (w.reshape(n, kb, lay.group) * scale[..., None]).reshape(n, kp)[:, :k]
