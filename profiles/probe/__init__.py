"""Measure this machine and write it as a hardware profile (`planner profiles probe`).

What is measured, and how (every figure keeps its method in :class:`Figure`), one module each:

1. the host (:mod:`.host`): CPU model, usable cores, kernel families (``flags`` in
   ``/proc/cpuinfo``: avx2, avx512, amx), DRAM capacity (``/proc``, ``os``, ``platform``);
2. DRAM read and copy bandwidth (:mod:`.dram`): numpy over arrays larger than the caches, one
   thread per core (numpy releases the GIL in reductions and copies), best of N;
3. sequential read bandwidth of the filesystem holding ``directory`` (:mod:`.disk`): a
   temporary file is written and fsynced, then read with ``O_DIRECT`` (past the page cache),
   or after ``posix_fadvise(DONTNEED)`` where ``O_DIRECT`` is refused; the file is removed;
4. CPU matmul throughput per format (:mod:`.cpu_gemm`): fp32 (torch, else numpy), bf16
   (torch), int8 and int4 (ONNX Runtime ``MatMulNBits``, weights quantised by onnxruntime's
   own block quantiser, :mod:`.kernels`), each skipped with a reason when its library is
   missing or it is too slow for the time budget;
5. the efficiency curve of one gated expert FFN call vs tokens (1, 2, 4, ... 256)
   (:mod:`.cpu_ffn`), cycling through copies of the expert, fitted to
   :class:`~profiles.hardware.EfficiencySpec` (:mod:`.efficiency`), and the bytes ONNX Runtime
   holds per stored expert byte (:mod:`.kernel_bytes`);
6. with a CUDA GPU (``torch.cuda.is_available()``): host-to-device bandwidth pinned and
   pageable (:mod:`.links`), device memory bandwidth, matmul per format, launch overhead and
   the same FFN efficiency curve (:mod:`.gpu`), once per distinct GPU model.

Each measurement runs a small first size and is sized from it to fit its share of the mode's
time budget (:mod:`.budget`; quick 15 s, full 60 s). :mod:`.render` writes the YAML,
:mod:`.run` runs it all.

torch and onnxruntime are imported inside functions only: ``profiles`` must import without
them (DESIGN.md), and a probe without them measures what it can and says what it skipped.

    result = probe(".", QUICK)
    text = render_profile_yaml(result, name="my-machine")   # loads with load_profile
"""

from __future__ import annotations

from .efficiency import fit_efficiency
from .render import check_output, profile_name, render_profile_yaml, write_profile
from .results import CpuFigures, DiskFigures, EfficiencyFit, Figure, GpuFigures, ProbeResult
from .run import check_directory, probe
from .settings import FULL, QUICK, SETTINGS, TINY, ProbeSettings

__all__ = [
    "FULL",
    "QUICK",
    "SETTINGS",
    "TINY",
    "CpuFigures",
    "DiskFigures",
    "EfficiencyFit",
    "Figure",
    "GpuFigures",
    "ProbeResult",
    "ProbeSettings",
    "check_directory",
    "check_output",
    "fit_efficiency",
    "probe",
    "profile_name",
    "render_profile_yaml",
    "write_profile",
]
