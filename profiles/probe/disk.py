"""Sequential read bandwidth of the filesystem holding a directory: a temporary file is
written and fsynced, then read with ``O_DIRECT`` (past the page cache), or after
``posix_fadvise(DONTNEED)`` where ``O_DIRECT`` is refused; the file is removed."""

from __future__ import annotations

import math
import mmap
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .budget import size_that_fits
from .host import _read
from .results import DiskFigures, Figure, _mib
from .settings import MiB

IN_MEMORY_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs")


def _probe_disk(directory: Path, n_bytes: int, repeats: int, share_s: float) -> DiskFigures | None:
    """Write ``n_bytes`` to a temporary file in ``directory``, read it back past the page cache.

    The first chunk is written and fsynced alone: its rate sizes the file so that writing it
    and reading it ``repeats`` times fits in ``share_s`` (reads are rarely slower than writes).
    """
    usage = shutil.disk_usage(directory)
    n_bytes = min(n_bytes, int(usage.free * 0.25) // MiB * MiB)
    if n_bytes < 4 * MiB:
        return None
    chunk = min(8 * MiB, n_bytes)
    n_bytes = n_bytes // chunk * chunk
    # random bytes: a compressing filesystem (btrfs, zfs) would read zeros back too fast
    payload = np.random.default_rng(0).integers(0, 256, chunk, dtype=np.uint8).tobytes()
    fd, name = tempfile.mkstemp(prefix=".planner-probe-", suffix=".bin", dir=directory)
    start = time.perf_counter()
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            f.write(payload)
            os.fsync(f.fileno())
            first_s = time.perf_counter() - start
            passes = 1 + max(1, repeats)
            n_bytes = size_that_fits(first_s / chunk, share_s, passes, most=n_bytes, least=chunk, step=chunk) or chunk
            for _ in range(n_bytes // chunk - 1):
                f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        best, how, reads = math.inf, "", 0
        for _ in range(max(1, repeats)):
            if reads and time.perf_counter() - start + best > share_s:
                break
            seconds, how = _read_uncached(name, n_bytes, chunk)
            best, reads = min(best, seconds), reads + 1
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass
    device, model, gen, lanes = _block_device(directory)
    fs = _filesystem_type(directory)
    method = (f"sequential read of a {_mib(n_bytes)} temporary file in {directory} ({fs or 'unknown filesystem'}) "
              f"in {_mib(chunk)} reads, {how}, best of {reads}; file removed")
    if fs in IN_MEMORY_FILESYSTEMS:
        model = model or f"{fs} (memory, not a disk)"
        method += f"; {fs} lives in memory: this is not a disk's bandwidth"
    elif device.startswith("vd") or "virtio" in model:
        method += "; a virtual disk: the hypervisor's own cache may still serve reads"
    return DiskFigures(
        path=str(directory), device=device, model=model, filesystem=fs,
        capacity_bytes=Figure(float(usage.total), f"size of the filesystem holding {directory} (shutil.disk_usage)"),
        read_bytes_per_s=Figure(n_bytes / best, method), pcie_gen=gen, pcie_lanes=lanes)


def _read_uncached(name: str, n_bytes: int, chunk: int) -> tuple[float, str]:
    """Seconds to read the file once past the page cache, and which way was used."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            fd = os.open(name, os.O_RDONLY | direct)
        except OSError:
            fd = -1
        if fd >= 0:
            buf = mmap.mmap(-1, chunk)  # page aligned, as O_DIRECT requires
            try:
                t = time.perf_counter()
                got = 0
                while got < n_bytes:
                    n = os.readv(fd, [buf])
                    if n <= 0:
                        break
                    got += n
                seconds = time.perf_counter() - t
                if got >= n_bytes:
                    return seconds, "O_DIRECT (page cache bypassed)"
            except OSError:
                pass  # the filesystem refuses O_DIRECT reads (tmpfs, some FUSE): drop the cache instead
            finally:
                os.close(fd)
                buf.close()
    fd = os.open(name, os.O_RDONLY)
    try:
        how = "plain reads (this OS can neither bypass nor drop the page cache: the figure may be cached)"
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            how = "posix_fadvise(POSIX_FADV_DONTNEED) before reading (O_DIRECT refused here)"
        elif _nocache(fd):
            how = "fcntl(F_NOCACHE) reads (macOS)"
        buf = bytearray(chunk)
        view = memoryview(buf)
        t = time.perf_counter()
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while f.readinto(view):
                pass
        return time.perf_counter() - t, how
    finally:
        os.close(fd)


def _filesystem_type(directory: Path) -> str:
    """Type of the filesystem mounted at the longest mount point above ``directory`` (Linux)."""
    best, kind = "", ""
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mount = parts[1].replace("\\040", " ")
            if (str(directory) == mount or str(directory).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def _nocache(fd: int) -> bool:
    """Turn the page cache off for ``fd`` where fcntl has F_NOCACHE (macOS)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return False
    if not hasattr(fcntl, "F_NOCACHE"):
        return False
    fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
    return True


_GT_PER_S_TO_GEN = {"2.5": 1, "5.0": 2, "5": 2, "8.0": 3, "8": 3, "16.0": 4, "16": 4, "32.0": 5, "32": 5,
                    "64.0": 6, "64": 6}


def _block_device(directory: Path) -> tuple[str, str, int | None, int | None]:
    """``(device name, model, pcie gen, pcie lanes)`` of the block device under ``directory``, best effort."""
    try:
        st = os.stat(directory)
        sys_dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
    except (OSError, AttributeError):
        return "", "", None, None
    if not sys_dev.exists():
        return "", "", None, None
    if (sys_dev / "partition").exists():
        sys_dev = sys_dev.parent
    name = sys_dev.name
    dev = sys_dev / "device"
    model = _read(dev / "model")
    if not model:
        driver = Path(os.path.realpath(dev / "driver")).name if (dev / "driver").exists() else ""
        model = f"{name} ({driver})" if driver else name
    if _read(sys_dev / "queue" / "rotational") == "1":
        model += ", rotational"
    gen = lanes = None
    for pci in (dev, dev / "device"):
        speed, width = _read(pci / "current_link_speed"), _read(pci / "current_link_width")
        if speed and width:
            m = re.match(r"([\d.]+)\s*GT/s", speed)
            gen = _GT_PER_S_TO_GEN.get(m.group(1)) if m else None
            lanes = int(width) if width.isdigit() and int(width) in (1, 2, 4, 8, 16) else None
            break
    return name, model, gen if lanes else None, lanes if gen else None
