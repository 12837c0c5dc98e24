"""Facts about the host read from the OS: libraries, cores, CPU model and kernel families,
memory, caches (``/proc``, ``/sys``, ``os``, ``platform``); and the sizes that follow from them."""

from __future__ import annotations

import math
import os
import platform
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..hardware import CPU_KERNEL_FAMILIES
from .results import Figure
from .settings import MiB, ProbeSettings

CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo flags a kernel family needs (Linux's names): AVX2 kernels use FMA too; AMX
# kernels need the tiles and at least one of the bf16 and int8 tile multiplies
ISA_FLAGS = {"avx2": (("avx2", "fma"),), "avx512": (("avx512f",),),
             "amx": (("amx_tile", "amx_bf16"), ("amx_tile", "amx_int8"))}
ISA_METHOD = ("flags in /proc/cpuinfo: avx2 + fma -> avx2, avx512f -> avx512, "
              "amx_tile + amx_bf16 or amx_int8 -> amx")


def _optional(name: str):
    """Import an optional library: ``(module, "")`` or ``(None, why it is unavailable)``."""
    import importlib

    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # noqa: BLE001 - an ImportError, or a broken install failing on import
        return None, f"{name} is not installed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def _cuda_available(torch) -> bool:
    try:
        return bool(torch.cuda.is_available()) and torch.cuda.device_count() > 0
    except Exception:  # noqa: BLE001 - a broken driver means no GPU to probe
        return False


def _versions(torch, ort) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        out["moe-planner"] = version("moe-planner")
    except PackageNotFoundError:
        pass
    if torch is not None:
        out["torch"] = torch.__version__
        if _cuda_available(torch) and torch.version.cuda:
            out["cuda"] = str(torch.version.cuda)
    if ort is not None:
        out["onnxruntime"] = ort.__version__
    return out


def _usable_cores() -> Figure:
    try:
        usable = len(os.sched_getaffinity(0))
        how = "os.sched_getaffinity (CPUs this process may run on)"
    except AttributeError:  # macOS, Windows
        usable = os.cpu_count() or 1
        how = "os.cpu_count"
    quota = _cgroup_cpu_quota()
    if quota is not None and quota < usable:
        usable, how = max(1, math.floor(quota)), f"cgroup cpu.max quota ({quota:g} CPUs)"
    logical = os.cpu_count() or usable
    physical = _physical_cores()
    detail = f"{logical} logical" + (f", {physical} physical" if physical else "") + " on the machine"
    return Figure(float(usable), f"{how}; {detail}")


class _OtherLoad:
    """Share of the machine's CPU time that other processes took since construction (Linux)."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), time.process_time(), self._busy_s())

    @staticmethod
    def _busy_s() -> float | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def share(self) -> float | None:
        wall0, own0, busy0 = self.start
        busy1 = self._busy_s()
        if busy0 is None or busy1 is None:
            return None
        wall = time.perf_counter() - wall0
        cpus = os.cpu_count() or 1
        others = (busy1 - busy0) - (time.process_time() - own0)
        return max(0.0, others / (wall * cpus)) if wall > 0 else None


def _cgroup_cpu_quota() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _physical_cores() -> int | None:
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    pairs = set(re.findall(r"physical id\s*:\s*(\d+)[\s\S]*?core id\s*:\s*(\d+)", text))
    return len(pairs) or None


def _cpu_model() -> str:
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def kernel_families(cpuinfo: str | Path = CPUINFO) -> tuple[tuple[str, ...], str]:
    """The CPU kernel families the first CPU's ``flags`` line in ``/proc/cpuinfo`` has, narrowest
    first, and how they were read (``""`` where there is no flags line to read: not Linux, not x86).

    Args:
        cpuinfo: the text of ``/proc/cpuinfo``, or (a :class:`~pathlib.Path`) the file to read it from.

    >>> kernel_families("processor : 0\\nflags : fpu sse avx avx2 fma avx512f\\n")[0]
    ('avx2', 'avx512')
    """
    text = _read(cpuinfo) if isinstance(cpuinfo, Path) else cpuinfo
    m = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    if m is None:
        return (), ""
    flags = set(m.group(1).split())
    families = tuple(f for f in CPU_KERNEL_FAMILIES if any(set(need) <= flags for need in ISA_FLAGS[f]))
    return families, ISA_METHOD


def _memory_bytes() -> Figure:
    total, how = None, ""
    try:
        m = re.search(r"^MemTotal:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if m:
            total, how = int(m.group(1)) * 1024, "MemTotal in /proc/meminfo"
    except OSError:
        pass
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        how = "sysconf(SC_PHYS_PAGES) x page size"
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max" and int(limit) < total:
            total, how = int(limit), "cgroup memory.max (below the machine's MemTotal)"
    except (OSError, ValueError):
        pass
    return Figure(float(total), how)


def _available_bytes() -> float:
    try:
        m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if m:
            return int(m.group(1)) * 1024.0
    except OSError:
        pass
    return _memory_bytes().value / 2


def _fit_in_memory(n_bytes: float, share: float = 0.2) -> int:
    """``n_bytes`` or less, whole MiB: one test array may take ``share`` of the available memory."""
    cap = int(_available_bytes() * share)
    return max(4 * MiB, int(min(n_bytes, cap)) // MiB * MiB)


def _last_level_cache() -> Figure:
    """Size of the largest CPU cache (Linux sysfs); 32 MiB when unknown."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        m = re.fullmatch(r"(\d+)([KMG]?)", _read(index / "size"))
        if m:
            sizes.append(int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])
    if sizes:
        return Figure(float(max(sizes)), "largest cache under /sys/devices/system/cpu/cpu0/cache")
    return Figure(32.0 * MiB, "unknown (no sysfs cache entries): 32 MiB assumed")


def _past_the_cache(settings: ProbeSettings, llc_bytes: float) -> ProbeSettings:
    """Settings whose DRAM arrays and CPU expert working set exceed the last-level cache.

    DRAM arrays: at least ``cache_multiple`` x LLC (within 20% of the available memory);
    expert working set: ``cache_multiple`` x LLC, at least 128 MiB, at most the mode's cap
    (and 10% of the available memory: each measured format holds one working set).
    """
    if not settings.cache_multiple:
        return settings
    past = settings.cache_multiple * llc_bytes
    working_set = min(settings.ffn_working_set_bytes, max(past, 128 * MiB))
    return replace(settings, dram_bytes=_fit_in_memory(max(settings.dram_bytes, past)),
                   ffn_working_set_bytes=_fit_in_memory(working_set, share=0.1))


class _Threads:
    """Pins torch's intra-op threads to the usable cores for the probe; restores them after."""

    def __init__(self, torch, cores: float) -> None:
        self.torch = torch
        self.before = torch.get_num_threads() if torch is not None else None
        if torch is not None:
            torch.set_num_threads(int(cores))

    def restore(self) -> None:
        if self.torch is not None and self.before is not None:
            self.torch.set_num_threads(self.before)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
