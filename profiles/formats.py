"""Number formats: how many bits a stored weight takes, and which devices compute in it.

A format's storage cost includes its group-wise quantisation metadata (scales and zero
points), so ``bits_per_weight("int4") == 4 + (16 + 4) / 128``: 4-bit payload, one fp16 scale
and one 4-bit zero point per group of 128 weights (the GPTQ/AWQ/ONNX MatMulNBits layout).

CPUs may state peak throughput for the general formats, GPUs also for fp4/mxfp4 (Blackwell
tensor cores); fp6, int3, int2 and ternary compute formats are only accepted on
``accelerator`` devices (FPGA-like fabrics): elsewhere they are stored, then computed in a
wider format.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

__all__ = ["NumberFormat", "FORMATS", "GENERAL_COMPUTE_FORMATS", "GPU_COMPUTE_FORMATS", "ACCELERATOR_COMPUTE_FORMATS",
           "get_format", "bits_per_weight"]


@dataclass(frozen=True)
class NumberFormat:
    """A storage/compute number format.

    Attributes:
        name: short name used in profiles and plans (``"int4"``).
        payload_bits: bits per element before metadata.
        kind: ``"float"``, ``"int"`` or ``"ternary"``.
        group_size: elements that share one scale (0 = no per-group metadata).
        scale_bits: bits of one group's scale.
        zero_bits: bits of one group's zero point (0 for symmetric formats).
    """

    name: str
    payload_bits: float
    kind: str
    group_size: int = 0
    scale_bits: int = 0
    zero_bits: int = 0

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, group metadata included."""
        if not self.group_size:
            return self.payload_bits
        return self.payload_bits + (self.scale_bits + self.zero_bits) / self.group_size

    @property
    def is_quantised(self) -> bool:
        return self.group_size > 0


FORMATS: dict[str, NumberFormat] = {
    f.name: f
    for f in [
        NumberFormat("fp32", 32, "float"),
        NumberFormat("bf16", 16, "float"),
        NumberFormat("fp16", 16, "float"),
        # DeepSeek-V3 style fp8 e4m3 with one fp32 scale per 128x128 block
        NumberFormat("fp8", 8, "float", group_size=128 * 128, scale_bits=32),
        # symmetric int8, one fp16 scale per 128 weights
        NumberFormat("int8", 8, "int", group_size=128, scale_bits=16),
        # asymmetric int4, fp16 scale + 4-bit zero point per 128 (GPTQ / AWQ / MatMulNBits)
        NumberFormat("int4", 4, "int", group_size=128, scale_bits=16, zero_bits=4),
        NumberFormat("int3", 3, "int", group_size=128, scale_bits=16, zero_bits=3),
        NumberFormat("int2", 2, "int", group_size=64, scale_bits=16, zero_bits=2),
        # OCP microscaling: 8-bit shared exponent per 32 elements (gpt-oss ships MXFP4)
        NumberFormat("mxfp4", 4, "float", group_size=32, scale_bits=8),
        NumberFormat("fp6", 6, "float", group_size=32, scale_bits=8),
        NumberFormat("fp4", 4, "float", group_size=32, scale_bits=8),
        # BitNet b1.58: 5 trits per byte (1.6 bits), one fp16 scale per 256 weights
        NumberFormat("ternary", 1.6, "ternary", group_size=256, scale_bits=16),
    ]
}

GENERAL_COMPUTE_FORMATS = ("fp32", "bf16", "fp16", "fp8", "int8", "int4")
# Blackwell-class tensor cores compute fp4/mxfp4 natively; CPUs do not
GPU_COMPUTE_FORMATS = GENERAL_COMPUTE_FORMATS + ("mxfp4", "fp4")
ACCELERATOR_COMPUTE_FORMATS = GPU_COMPUTE_FORMATS + ("int3", "int2", "fp6", "ternary")


def get_format(name: str) -> NumberFormat:
    """Look up a format by name; an unknown name lists the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise InputError(f"unknown number format {name!r}", value=name,
                         expected="one of " + ", ".join(FORMATS)) from None


def bits_per_weight(name: str) -> float:
    """Stored bits per weight of format ``name``, quantisation metadata included."""
    return get_format(name).bits_per_weight
