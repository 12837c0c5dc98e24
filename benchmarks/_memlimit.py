"""A memory limit a benchmark can trust: a fresh memory cgroup per child process.

A cgroup's memory limit covers anonymous memory *and* the page cache its processes fault
in, so files read beyond the limit are reclaimed and must be read from disk again: a budget
the page cache cannot quietly exceed. Linux only, as root (or with a delegated cgroup):

- cgroup v1: ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` where swap is
  accounted, so swap cannot stretch the budget), peak ``memory.max_usage_in_bytes``,
  ``memory.failcnt``, OOM kills from ``memory.oom_control``;
- cgroup v2: ``memory.max`` (``memory.swap.max`` = 0), peak ``memory.peak``, ``memory.events``.

The new cgroup is made inside this process's own memory cgroup (so whatever limits and
accounts for that one still does), else at the hierarchy's root. A child joins it before
it runs anything (:meth:`MemCgroup.command` wraps its argv in ``sh -c 'echo $$ > cgroup.procs
&& exec ...'``), so everything its interpreter allocates or reads is charged to it.

Pages are charged to the cgroup that first faults them in: files already in the page cache
(shared libraries this parent loaded) are not charged to a child. :func:`drop_file_cache`
evicts chosen files (``posix_fadvise(DONTNEED)`` after ``fsync``) so that no child starts
with another cgroup's warm cache of them; :func:`cached_bytes` (``mincore``) checks it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["CgroupUnavailable", "MemCgroup", "cached_bytes", "drop_file_cache", "memory_cgroup_base", "read_stat",
           "reset_peak"]


class CgroupUnavailable(RuntimeError):
    """No writable memory cgroup here (the message says why)."""


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fstype, super options) of every cgroup mount."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) >= 5 and len(rfields) >= 3 and rfields[0] in ("cgroup", "cgroup2"):
                out.append((fields[4].replace("\\040", " "), rfields[0], rfields[2]))
    return out


def _own_paths() -> dict[str, str]:
    """controller ("memory", or "" for the v2 unified hierarchy) -> this process's cgroup path."""
    out = {}
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                out[c] = path
    return out


def memory_cgroup_base() -> tuple[int, Path]:
    """(cgroup version, directory under which a memory cgroup can be made), or raise
    :class:`CgroupUnavailable`."""
    if not sys.platform.startswith("linux"):
        raise CgroupUnavailable(f"cgroups are Linux only (platform {sys.platform})")
    if os.geteuid() != 0:
        raise CgroupUnavailable("not root: making and limiting a memory cgroup needs root (or a delegated cgroup)")
    try:
        mounts, own = _mounts(), _own_paths()
    except OSError as exc:
        raise CgroupUnavailable(f"cannot read /proc/self/mountinfo or /proc/self/cgroup ({exc})") from None
    tried = []
    for point, fstype, opts in mounts:
        if fstype == "cgroup" and "memory" in opts.split(","):
            rel = own.get("memory", "/").lstrip("/")
            for base in dict.fromkeys([Path(point) / rel, Path(point)]):
                if (base / "memory.limit_in_bytes").exists() and os.access(base, os.W_OK):
                    return 1, base
                tried.append(str(base))
    for point, fstype, _ in mounts:
        if fstype != "cgroup2":
            continue
        try:
            if "memory" not in (Path(point) / "cgroup.controllers").read_text().split():
                tried.append(f"{point} (memory controller bound to v1 or disabled)")
                continue
        except OSError:
            continue
        rel = own.get("", "/").lstrip("/")
        for base in dict.fromkeys([Path(point) / rel, Path(point)]):
            sub = base / "cgroup.subtree_control"
            try:
                if "memory" not in sub.read_text().split():
                    sub.write_text("+memory")  # EBUSY where base itself holds processes (not the root)
                if "memory" in sub.read_text().split() and os.access(base, os.W_OK):
                    return 2, base
            except OSError as exc:
                tried.append(f"{base} ({exc.strerror})")
                continue
            tried.append(str(base))
    raise CgroupUnavailable("no writable memory cgroup" + (f" (tried {', '.join(tried)})" if tried else
                                                            " (no cgroup v1 memory or v2 mount)"))


class MemCgroup:
    """A fresh memory cgroup, limited to ``limit`` bytes (None: no limit, only measured).

    Use :meth:`command` to start a child inside it, read :meth:`peak`, :meth:`failcnt`,
    :meth:`oom_kills`, :meth:`stat` after it ran, then :meth:`remove`.
    """

    def __init__(self, name: str, limit: int | None = None) -> None:
        self.version, base = memory_cgroup_base()
        self.path = base / f"{name}-{os.getpid()}"
        try:
            self.path.mkdir()
        except OSError as exc:
            raise CgroupUnavailable(f"cannot make {self.path} ({exc.strerror})") from None
        self.limit = limit
        try:
            if limit is not None:
                if self.version == 1:
                    self._write("memory.limit_in_bytes", limit)
                    if (self.path / "memory.memsw.limit_in_bytes").exists():
                        self._write("memory.memsw.limit_in_bytes", limit)  # no swapping out of the budget
                else:
                    self._write("memory.max", limit)
                    if (self.path / "memory.swap.max").exists():
                        self._write("memory.swap.max", 0)
                    if (self.path / "memory.oom.group").exists():
                        self._write("memory.oom.group", 1)  # an OOM kill ends the whole child
        except OSError as exc:
            self.remove()
            raise CgroupUnavailable(f"cannot set the limit on {self.path} ({exc.strerror})") from None

    def _write(self, name: str, value: int | str) -> None:
        (self.path / name).write_text(str(value))

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run by a shell that first moves itself into this cgroup, then execs it."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs_file), *argv]

    def usage(self) -> int:
        return int(self._read("memory.usage_in_bytes" if self.version == 1 else "memory.current"))

    def peak(self) -> int | None:
        """Highest usage since made (or since :func:`reset_peak`); None where v2 has no memory.peak."""
        try:
            return int(self._read("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"))
        except (OSError, ValueError):
            return None

    def _events(self) -> dict[str, int]:
        return {k: int(v) for k, v in (line.split() for line in self._read("memory.events").splitlines())}

    def failcnt(self) -> int:
        """Times usage hit the limit (v1 ``memory.failcnt``; v2 ``memory.events`` max)."""
        return int(self._read("memory.failcnt")) if self.version == 1 else self._events().get("max", 0)

    def oom_kills(self) -> int | None:
        """Processes the OOM killer killed in this cgroup (None where the kernel does not say)."""
        if self.version == 2:
            return self._events().get("oom_kill")
        fields = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return int(fields["oom_kill"]) if "oom_kill" in fields else None

    def stat(self) -> dict[str, int]:
        return read_stat(self.path)

    def remove(self, timeout: float = 10.0) -> None:
        """rmdir once its processes are gone (they must have exited; it never kills them)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def read_stat(path: str | Path) -> dict[str, int]:
    """``memory.stat`` of the cgroup at ``path`` (v1: cache, rss, pgmajfault, ...; v2: file, anon, ...)."""
    return {k: int(v) for k, v in (line.split() for line in (Path(path) / "memory.stat").read_text().splitlines())}


def reset_peak(path: str | Path) -> bool:
    """Restart the peak of the v1 cgroup at ``path`` from its current usage (v2: no)."""
    f = Path(path) / "memory.max_usage_in_bytes"
    try:
        f.write_text("0")
        return True
    except OSError:
        return False


def _files(paths: Iterable[str | Path]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and not q.is_symlink())
        elif p.is_file():
            out.append(p)
    return out


def drop_file_cache(paths: Iterable[str | Path]) -> int:
    """Evict every file under ``paths`` from the page cache (dirty pages written first).
    Returns the number of bytes of those files (not how many were cached: see
    :func:`cached_bytes`)."""
    total = 0
    for f in _files(paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


_libc = None


def cached_bytes(paths: Iterable[str | Path]) -> int | None:
    """Bytes of the files under ``paths`` now in the page cache (``mincore``); None where
    that cannot be asked."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if not name:
            return None
        _libc = ctypes.CDLL(name, use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    total = 0
    for f in _files(paths):
        size = f.stat().st_size
        if not size:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = ctypes.create_string_buffer((size + page - 1) // page)
                if _libc.mincore(addr, size, vec) != 0:
                    return None
                total += sum(b & 1 for b in vec.raw) * page
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
    return total
