"""Tensors read from safetensors files with positional reads, each read into memory of its own.

Legend: E = routed experts, H = hidden size, I = expert intermediate size.

Why not ``safetensors.safe_open`` (a memory map) for expert weights: a mapped file keeps every
page it ever read mapped into the process, so after a few tokens of a plan that reads experts
from disk, the page cache holding the whole checkpoint is charged to the process (a memory
cgroup counts it; measured on a 0.9 GB fp32 checkpoint planned at 300 MiB: 698 MiB of mapped
file pages besides the planned weights). A plan prices a disk-tier expert as a read from the
drive at every use and counts no page cache for it. Here:

- each :func:`read_tensors` makes one anonymous memory map for the tensors asked for (each at
  a 64-byte offset in it) and reads into it with ``os.preadv``: no intermediate copy (an
  expert's gate and up rows land next to each other, so ``gate_up [2I, H]`` needs no
  ``torch.cat``), and the memory goes back to the OS when its last tensor is freed (torch's
  allocator took such buffers from malloc arenas that a worker thread allocated and the main
  thread freed; they grew by ~190 MiB over three generations on the same plan);
- the file is opened with ``O_DIRECT`` where the OS and filesystem allow it: reads bypass the
  page cache (nothing of them is charged to the process, no copy out of the cache; 1.45x the
  buffered rate for an fp32 expert on the dev machine). ``O_DIRECT`` reads whole 4 KiB blocks
  into 4 KiB-aligned memory, so each tensor's blocks are read just past where it goes and its
  bytes moved down into place (``memmove``);
- elsewhere (tmpfs, macOS) reads go through the page cache without readahead
  (``POSIX_FADV_RANDOM``: the kernel's readahead window, 8 MiB on the dev machine's virtual
  disk, read past the spans asked for: 2x the bytes needed) and the pages read are dropped
  (``POSIX_FADV_DONTNEED``) piece by piece (``PIECE_BYTES``).

Thread-safe: positional reads on one descriptor per file.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import struct
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RuntimeInputError

__all__ = ["PIECE_BYTES", "Span", "TensorFile", "drop_cached", "read_tensors"]

PIECE_BYTES = 8 << 20  # buffered reads: read (and dropped from the page cache) at most this much at a time
_BLOCK = 4096  # O_DIRECT: offsets, lengths and memory addresses in whole blocks (4 KiB covers 512-byte disks)
_ALIGN = 64  # byte offset of each tensor in a read buffer (torch views need the dtype's alignment)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_FIX = "re-save the checkpoint with save_pretrained(safe_serialization=True)"


@dataclass(frozen=True)
class Span:
    """Bytes of one tensor (or of one index along its first dimension) in a file."""

    file: TensorFile
    offset: int  # from the start of the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class TensorFile:
    """One safetensors file: its header parsed, its tensors read on demand.

    Args:
        path: the ``.safetensors`` file.
        direct: read with ``O_DIRECT`` where possible (else through the page cache, dropping
            what was read).
    """

    def __init__(self, path: str | Path, *, direct: bool = True) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, fd)
        self._fd, self._direct_fd, self._use_direct = fd, None, False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                weakref.finalize(self, os.close, self._direct_fd)
                self._use_direct = True
            except OSError:  # EINVAL: the filesystem has no direct I/O
                pass
        if hasattr(os, "posix_fadvise"):  # every read asks for exactly what it needs: no readahead past it
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        size = os.fstat(fd).st_size
        try:
            (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            if header_len > size - 8:
                raise ValueError(f"header of {header_len} bytes in a {size}-byte file")
            header = json.loads(os.pread(fd, header_len, 8))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise RuntimeInputError(f"not a safetensors file ({exc})", file=self.path, fix=_FIX) from None
        start = 8 + header_len
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries: dict[str, Span] = {}
        for key, info in header.items():
            try:
                begin, end = info["data_offsets"]
                dtype, shape = _DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
            except (KeyError, TypeError, ValueError) as exc:
                raise RuntimeInputError(f"tensor entry not understood ({exc!r})", file=self.path, key=key,
                                        expected=f"dtype in {', '.join(_DTYPES)}, shape, data_offsets",
                                        fix=_FIX) from None
            if not 0 <= begin <= end <= size - start:
                raise RuntimeInputError("tensor data outside the file", file=self.path, key=key,
                                        value=[begin, end], fix=_FIX)
            self._entries[key] = Span(self, start + begin, end - begin, dtype, shape)

    @property
    def direct(self) -> bool:
        """Whether reads bypass the page cache (``O_DIRECT``)."""
        return self._use_direct

    def keys(self) -> list[str]:
        return list(self._entries)

    def span(self, key: str, index: int | None = None) -> Span:
        """The bytes of tensor ``key``, or of ``key[index]`` (a slice along the first dimension)."""
        whole = self._entries[key]
        if index is None:
            return whole
        if not 0 <= index < whole.shape[0]:
            raise RuntimeInputError("index outside the tensor", file=self.path, key=key, value=index,
                                    expected=f"0..{whole.shape[0] - 1}")
        step = whole.nbytes // whole.shape[0]
        return Span(self, whole.offset + index * step, step, whole.dtype, whole.shape[1:])

    def read_blocks(self, view: memoryview, offset: int, nbytes: int) -> bool:
        """``O_DIRECT``: fill ``view`` (4 KiB-aligned memory) with the file's whole blocks from
        ``offset`` (a block boundary) until ``nbytes`` are in. False where the filesystem refused
        direct I/O after all (reads go through the page cache from then on)."""
        done = 0
        while done < nbytes:
            try:
                got = os.preadv(self._direct_fd, [view[done:]], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or done:
                    raise
                self._use_direct = False  # the descriptor stays open until the finalizer closes it
                return False
            if got <= 0:
                raise RuntimeInputError("file shorter than its header says", file=self.path, fix=_FIX)
            done += got
        return True

    def read_into(self, view: memoryview, offset: int) -> None:
        """Through the page cache: fill ``view`` with the file's bytes from ``offset`` on, then
        drop their pages."""
        done = 0
        while done < len(view):
            piece = view[done:done + PIECE_BYTES]
            got = os.preadv(self._fd, [piece], offset + done)
            if got <= 0:
                raise RuntimeInputError("file shorter than its header says", file=self.path, fix=_FIX)
            if hasattr(os, "posix_fadvise"):
                first = (offset + done) // mmap.PAGESIZE * mmap.PAGESIZE
                os.posix_fadvise(self._fd, first, offset + done + got - first, os.POSIX_FADV_DONTNEED)
            done += got


def _up(n: int, to: int) -> int:
    return -(-n // to) * to


def read_tensors(parts: Mapping[str, Sequence[Span]]) -> dict[str, torch.Tensor]:
    """Read tensors into one buffer of their own (an anonymous memory map, see the module docstring).

    Args:
        parts: output name -> spans (of any files), concatenated along the first dimension
            (same dtype and trailing dimensions; one span: that tensor as stored).

    Returns:
        output name -> CPU tensor ``[sum of first dims, *trailing]``, each at a 64-byte offset.
    """
    layout, reads, total = {}, [], 0  # reads: (span, where its bytes go), in buffer order
    for name, spans in parts.items():
        dtype, rest = spans[0].dtype, spans[0].shape[1:]
        if any(s.dtype != dtype or s.shape[1:] != rest for s in spans):
            raise ValueError(f"{name}: spans of different dtypes or trailing shapes")  # a bug, not input
        shape = (sum(s.shape[0] for s in spans), *rest) if len(spans) > 1 else spans[0].shape
        layout[name] = (total, dtype, shape)
        for s in spans:
            reads.append((s, total))
            total += s.nbytes
        total = _up(total, _ALIGN)
    # a direct read lands its blocks at the first block boundary at or after where its bytes
    # go (past every byte already in place), then moves them down: the buffer ends past the last
    end = max([total] + [_up(at, _BLOCK) + _up(s.offset + s.nbytes, _BLOCK) - s.offset // _BLOCK * _BLOCK
                         for s, at in reads if s.file.direct])
    if not end:
        return {name: torch.empty(shape, dtype=dtype) for name, (_, dtype, shape) in layout.items()}
    # private: anonymous memory (MAP_SHARED would be shared memory, which memory.stat files as page cache)
    memory = mmap.mmap(-1, end, flags=mmap.MAP_PRIVATE)
    view = memoryview(memory)
    anchor = ctypes.c_char.from_buffer(memory)
    base = ctypes.addressof(anchor)
    for s, at in reads:
        lo = s.offset // _BLOCK * _BLOCK
        staged = _up(at, _BLOCK)
        if s.file.direct and s.file.read_blocks(view[staged:staged + _up(s.offset + s.nbytes, _BLOCK) - lo], lo,
                                                s.offset + s.nbytes - lo):
            if staged + s.offset - lo != at:
                ctypes.memmove(base + at, base + staged + s.offset - lo, s.nbytes)
        else:
            s.file.read_into(view[at:at + s.nbytes], s.offset)
    del view, anchor  # no exports left: the staging room past the tensors can go
    if end > total:
        memory.resize(total)
    buffer = torch.frombuffer(memory, dtype=torch.uint8)
    out = {}
    for name, (at, dtype, shape) in layout.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        out[name] = buffer[at:at + nbytes].view(dtype).view(shape)
    return out


def drop_cached(path: str | Path) -> None:
    """Drop a file's pages from the page cache (those no process maps); a no-op where the OS
    has no ``posix_fadvise``."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
