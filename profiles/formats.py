"""Number formats: how many bits a stored weight takes, and which devices compute in it.

A format's storage cost includes its group-wise quantisation metadata (scales and zero
points), so ``bits_per_weight("int4") == 4 + (16 + 4) / 128``: 4-bit payload, one fp16 scale
and one 4-bit zero point per group of 128 weights (the GPTQ/AWQ/ONNX MatMulNBits layout).

CPUs may state peak throughput for the general formats, GPUs also for fp4/mxfp4 (Blackwell
tensor cores); fp6, int3, int2 and ternary compute formats are only accepted on
``accelerator`` devices (FPGA-like fabrics): elsewhere they are stored, then computed in a
wider format.

Besides these built-in formats, every GGUF type and llama.cpp file-type mix is a format
(:mod:`profiles.gguf_formats`, read from the ``gguf`` package on first use), and users add
group-quantised formats (HQQ-style bits, group size, scale/zero dtypes) in YAML:

    formats:
      - {name: hqq3g64, bits: 3, group_size: 64, scale_dtype: fp16, zero_dtype: fp16, kind: int}

    load_formats("my-formats.yaml")   # validated, then registered for this process
    bits_per_weight("hqq3g64")        # 3 + (16 + 16) / 64 = 3.5
    default_quant_error("q4_k_m")     # interpolated over bits per weight
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputError, format_key, from_validation_error
from .yamlio import load_yaml

__all__ = ["NumberFormat", "FORMATS", "GENERAL_COMPUTE_FORMATS", "GPU_COMPUTE_FORMATS", "ACCELERATOR_COMPUTE_FORMATS",
           "SOURCES", "GGUF_FLOAT_ALIASES", "DTYPE_BITS", "NAME_PATTERN", "FormatSpec", "FormatsFile",
           "get_format", "bits_per_weight", "all_formats", "load_formats", "register_format",
           "default_quant_error", "quant_error_for_bits"]

# where a format comes from, in the order `all_formats` lists them
SOURCES = ("builtin", "gguf", "gguf-mix", "user")


@dataclass(frozen=True)
class NumberFormat:
    """A storage/compute number format.

    Attributes:
        name: short name used in profiles and plans (``"int4"``).
        payload_bits: bits per element before metadata (GGUF types: the block's average,
            scales included; a llama.cpp mix: its expert layer average, see ``source``).
        kind: ``"float"``, ``"int"`` or ``"ternary"``.
        group_size: elements that share one scale (0 = no per-group metadata); for a GGUF
            type, the weights per block.
        scale_bits: bits of one group's scale.
        zero_bits: bits of one group's zero point (0 for symmetric formats).
        block_bytes: GGUF types only: bytes of one block of ``group_size`` weights.
        source: ``"builtin"``, ``"gguf"`` (a ggml type), ``"gguf-mix"`` (a llama.cpp file
            type; its bits are the layer average for a typical 32-layer model) or ``"user"``.
        quant_error: relative output error of an expert stored in this format, when known
            (built-in and user formats); otherwise :func:`default_quant_error` interpolates it.
    """

    name: str
    payload_bits: float
    kind: str
    group_size: int = 0
    scale_bits: int = 0
    zero_bits: int = 0
    block_bytes: int = 0
    source: str = "builtin"
    quant_error: float | None = None

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, group metadata included."""
        if self.block_bytes:
            return 8 * self.block_bytes / self.group_size
        if not self.group_size:
            return self.payload_bits
        return self.payload_bits + (self.scale_bits + self.zero_bits) / self.group_size

    @property
    def is_quantised(self) -> bool:
        return self.group_size > 1 or self.source == "gguf-mix"


# quant_error: normalised RMS error of the FFN output under group-wise round-to-nearest, order
# of magnitude from the GPTQ/AWQ and MC-MoE measurements (the numbers of planner/costs.py
# QUANT_ERROR, which a test holds equal); they anchor every other format's default error.
FORMATS: dict[str, NumberFormat] = {
    f.name: f
    for f in [
        NumberFormat("fp32", 32, "float", quant_error=0.0),
        NumberFormat("bf16", 16, "float", quant_error=0.0),
        NumberFormat("fp16", 16, "float", quant_error=0.0),
        # DeepSeek-V3 style fp8 e4m3 with one fp32 scale per 128x128 block
        NumberFormat("fp8", 8, "float", group_size=128 * 128, scale_bits=32, quant_error=0.004),
        # symmetric int8, one fp16 scale per 128 weights
        NumberFormat("int8", 8, "int", group_size=128, scale_bits=16, quant_error=0.006),
        # asymmetric int4, fp16 scale + 4-bit zero point per 128 (GPTQ / AWQ / MatMulNBits)
        NumberFormat("int4", 4, "int", group_size=128, scale_bits=16, zero_bits=4, quant_error=0.04),
        NumberFormat("int3", 3, "int", group_size=128, scale_bits=16, zero_bits=3, quant_error=0.11),
        NumberFormat("int2", 2, "int", group_size=64, scale_bits=16, zero_bits=2, quant_error=0.30),
        # OCP microscaling: 8-bit shared exponent per 32 elements (gpt-oss ships MXFP4)
        NumberFormat("mxfp4", 4, "float", group_size=32, scale_bits=8, quant_error=0.045),
        NumberFormat("fp6", 6, "float", group_size=32, scale_bits=8, quant_error=0.012),
        NumberFormat("fp4", 4, "float", group_size=32, scale_bits=8, quant_error=0.05),
        # BitNet b1.58: 5 trits per byte (1.6 bits), one fp16 scale per 256 weights
        NumberFormat("ternary", 1.6, "ternary", group_size=256, scale_bits=16, quant_error=0.45),
    ]
}

GENERAL_COMPUTE_FORMATS = ("fp32", "bf16", "fp16", "fp8", "int8", "int4")
# Blackwell-class tensor cores compute fp4/mxfp4 natively; CPUs do not
GPU_COMPUTE_FORMATS = GENERAL_COMPUTE_FORMATS + ("mxfp4", "fp4")
ACCELERATOR_COMPUTE_FORMATS = GPU_COMPUTE_FORMATS + ("int3", "int2", "fp6", "ternary")

# GGUF float type names that are built-in formats under another name (GGUF's bf16 and mxfp4
# have the built-in name and layout already)
GGUF_FLOAT_ALIASES = {"f32": "fp32", "f16": "fp16"}

# formats registered by load_formats for this process
_USER: dict[str, NumberFormat] = {}


@cache
def _gguf_formats() -> dict[str, NumberFormat]:
    """Every GGUF type, then every llama.cpp mix (imports the gguf package on first use)."""
    from . import gguf_formats as gg

    out = {}
    for name, (block, nbytes) in gg.GGUF_TYPES.items():
        if name not in FORMATS and name not in GGUF_FLOAT_ALIASES:  # bf16, mxfp4: the built-in one
            out[name] = NumberFormat(name, 8 * nbytes / block, gg.gguf_kind(name), group_size=block,
                                     block_bytes=nbytes, source="gguf")
    for name, ftype in gg.MIXES.items():
        out[name] = NumberFormat(name, gg.mix_bits_per_weight(name), gg.gguf_kind(gg.FILE_TYPE_DEFAULT[ftype]),
                                 source="gguf-mix")
    return out


def all_formats() -> dict[str, NumberFormat]:
    """Every known format by name: built-in, GGUF types, llama.cpp mixes, then user formats."""
    return {**FORMATS, **_gguf_formats(), **_USER}


def get_format(name: str) -> NumberFormat:
    """Look up a format by name (``f16``/``f32`` are fp16/fp32); an unknown name says where to look."""
    fmt = FORMATS.get(GGUF_FLOAT_ALIASES.get(name, name)) or _USER.get(name) or _gguf_formats().get(name)
    if fmt is None:
        raise InputError(f"unknown number format {name!r}", value=name,
                         expected="one of " + ", ".join(FORMATS) + ", a GGUF type (q4_k, iq4_xs, ...), a llama.cpp "
                                  "mix (q4_k_m, ...) or a format loaded from a formats file",
                         fix="run `planner formats list`")
    return fmt


def bits_per_weight(name: str, n_layers: int | None = None) -> float:
    """Stored bits per weight of format ``name``, quantisation metadata included.

    A llama.cpp mix's bits depend on each expert layer's position in the model: without
    ``n_layers`` this is its layer average for a typical 32-layer model (Mixtral-8x7B);
    with it, the average over that many layers. ``profiles.gguf_formats.mix_bits_per_weight``
    takes the MoE layer indices, row sizes and imatrix too, ``mix_layer_bits`` gives each layer.
    """
    fmt = get_format(name)
    if n_layers is not None and fmt.source == "gguf-mix":
        from .gguf_formats import mix_bits_per_weight

        return mix_bits_per_weight(name, n_layers)
    return fmt.bits_per_weight


# --------------------------------------------------------------------------- quantisation error

# the built-in integer formats whose errors anchor the interpolation
_ERROR_ANCHORS = ("int2", "int3", "int4", "int8")


def quant_error_for_bits(bits: float) -> float:
    """Quantisation error of a format that stores ``bits`` bits per weight.

    log(error) is interpolated linearly in bits per weight between the built-in integer
    formats (int2 2.28 bits: 0.30, int3 3.15: 0.11, int4 4.16: 0.04, int8 8.13: 0.006) and
    extrapolated with the end segments' slopes; capped at 1, and 0 from 16 bits up (the
    unquantised reference). Non-increasing in ``bits``.
    """
    if bits >= 16:
        return 0.0
    points = sorted((FORMATS[n].bits_per_weight, math.log(FORMATS[n].quant_error)) for n in _ERROR_ANCHORS)
    segments = list(zip(points, points[1:]))
    (x0, y0), (x1, y1) = next((s for s in segments if bits <= s[1][0]), segments[-1])
    return min(1.0, math.exp(y0 + (bits - x0) * (y1 - y0) / (x1 - x0)))


def default_quant_error(name: str | NumberFormat) -> float:
    """Quantisation error of format ``name`` (a name or the format itself): as stated
    (built-in and user formats with ``quant_error``), else :func:`quant_error_for_bits` of
    its bits per weight."""
    fmt = name if isinstance(name, NumberFormat) else get_format(name)
    return fmt.quant_error if fmt.quant_error is not None else quant_error_for_bits(fmt.bits_per_weight)


# --------------------------------------------------------------------------- user formats (YAML)

NAME_PATTERN = r"^[a-z][a-z0-9_.-]*$"

# bits of one scale or zero point, by dtype (e8m0: the OCP microscaling shared exponent)
DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "e8m0": 8, "int8": 8, "int4": 4, "int3": 3,
              "int2": 2, "none": 0}
Dtype = Literal["fp32", "fp16", "bf16", "fp8", "e8m0", "int8", "int4", "int3", "int2", "none"]

_STRICT = ConfigDict(extra="forbid", frozen=True)


class FormatSpec(BaseModel):
    """One user format: ``bits`` payload bits per weight, and per ``group_size`` weights one
    scale of ``scale_dtype`` and one zero point of ``zero_dtype`` (``none``: symmetric)."""

    model_config = _STRICT

    name: str = Field(pattern=NAME_PATTERN)
    bits: float = Field(gt=0, le=32)
    group_size: int = Field(default=0, ge=0)
    scale_dtype: Dtype = "none"
    zero_dtype: Dtype = "none"
    kind: Literal["int", "float", "ternary"] = "int"
    quant_error: float | None = Field(default=None, ge=0, le=1)

    @field_validator("scale_dtype", "zero_dtype", mode="before")
    @classmethod
    def _null_is_none(cls, value: object) -> object:
        return "none" if value is None else value  # `zero_dtype: null` reads as YAML null

    @model_validator(mode="after")
    def _groups_and_scales(self) -> "FormatSpec":
        if self.group_size and self.scale_dtype == "none":
            raise InputError("a grouped format needs a scale per group", key="scale_dtype", value="none",
                             fix="state e.g. `scale_dtype: fp16`, or set `group_size: 0`")
        if not self.group_size and (self.scale_dtype, self.zero_dtype) != ("none", "none"):
            raise InputError("scales and zero points need a group size", key="group_size", value=0,
                             fix="state e.g. `group_size: 64`, or remove scale_dtype and zero_dtype")
        return self

    def to_format(self) -> NumberFormat:
        return NumberFormat(self.name, self.bits, self.kind, group_size=self.group_size,
                            scale_bits=DTYPE_BITS[self.scale_dtype], zero_bits=DTYPE_BITS[self.zero_dtype],
                            source="user", quant_error=self.quant_error)


class FormatsFile(BaseModel):
    """A formats file: ``formats: [FormatSpec, ...]``."""

    model_config = _STRICT

    formats: tuple[FormatSpec, ...] = Field(min_length=1)


_FIXES = {"string_pattern_mismatch": "use lowercase letters, digits, '_', '.' and '-', starting with a letter",
          "extra_forbidden": "remove it or fix its spelling: the file holds `formats:`, a format name, bits, "
                             "group_size, scale_dtype, zero_dtype, kind and quant_error"}


def load_formats(path: str | Path, *, register: bool = True) -> list[NumberFormat]:
    """Read and validate a formats file; register its formats for this process.

    Args:
        path: a YAML file ``formats: [{name, bits, group_size, scale_dtype, zero_dtype, kind,
            quant_error}, ...]``.
        register: add the formats to the registry (``False``: only validate).

    Returns:
        The file's formats, in file order.

    Raises:
        InputError: unreadable file, schema error, a name used twice or already taken by a
            built-in, GGUF or differently defined user format (one line).
    """
    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError("the file is empty" if data is None else "a formats file must be a YAML mapping",
                         file=path, value=InputError._UNSET if data is None else type(data).__name__,
                         fix="start the file with `formats:` and a list of {name, bits, group_size, ...}")
    try:
        doc = FormatsFile.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc, file=path, lines=lines, fixes=_FIXES) from None
    taken = {**FORMATS, **{alias: FORMATS[b] for alias, b in GGUF_FLOAT_ALIASES.items()}, **_gguf_formats()}
    formats: list[NumberFormat] = []
    for i, spec in enumerate(doc.formats):
        key = ("formats", i, "name")
        where = dict(file=path, key=format_key(key), value=spec.name, line=lines.get(key))
        earlier = [j for j, f in enumerate(formats) if f.name == spec.name]
        if earlier:
            raise InputError("duplicate format name", **where, fix=f"rename it or formats[{earlier[0]}]")
        if spec.name in taken:
            raise InputError(f"name taken by the {taken[spec.name].source} format {spec.name!r}", **where,
                             fix="pick another name (`planner formats list` shows the taken ones)")
        fmt = spec.to_format()
        if _USER.get(fmt.name, fmt) != fmt:
            raise InputError("a different format of this name is already loaded", **where,
                             fix="give one of the two formats another name")
        formats.append(fmt)
    if register:
        for fmt in formats:
            register_format(fmt)
    return formats


def register_format(fmt: NumberFormat) -> None:
    """Add a user format to this process's registry; an identical re-registration is a no-op.

    Raises:
        InputError: the name is taken by another format.
    """
    try:
        known = get_format(fmt.name)
    except InputError:
        known = fmt
    if known != fmt:
        raise InputError(f"format name {fmt.name!r} is already taken by the {known.source} format", value=fmt.name,
                         fix="pick another name")
    _USER[fmt.name] = fmt
