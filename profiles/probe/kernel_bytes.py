"""The kernel-bytes factor: bytes ONNX Runtime holds per stored byte of an expert it runs
(its pre-packed copy of the weights, scratch, the session itself), from the process's
anonymous resident memory before and after its expert sessions ran once."""

from __future__ import annotations

from pathlib import Path

from .host import _read
from .results import Figure, _mib


def _anon_bytes() -> float | None:
    """This process's resident anonymous memory (Linux ``RssAnon``), or None where unknown."""
    for line in _read(Path("/proc/self/status")).splitlines():
        if line.startswith("RssAnon:"):
            return float(line.split()[1]) * 1024
    return None


def _held_factor(before: float | None, after: float | None, count: int, expert_bytes: float, fmt: str,
                 tokens: int) -> Figure | None:
    """``(after - before)`` anonymous bytes over the ``count`` experts' stored bytes; None
    where unknown (not Linux) or nothing was added."""
    if before is None or after is None or after <= before:
        return None
    return Figure((after - before) / (count * expert_bytes),
                  f"anonymous memory (RssAnon) {count} one-expert MatMulNBits sessions added, run once at "
                  f"{tokens} tokens, per byte of the expert's {fmt} weights "
                  f"({_mib(count * expert_bytes)}, fed as external initializers): the pre-packed copy, "
                  "scratch and the session itself")
