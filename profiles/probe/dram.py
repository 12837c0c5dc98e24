"""DRAM read and copy bandwidth: numpy over arrays larger than the caches, one thread per
core (numpy releases the GIL in reductions and copies), best of N."""

from __future__ import annotations

import itertools
import mmap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .budget import Clock, best_s, size_that_fits
from .results import Figure, _mib
from .settings import MiB, ProbeSettings

# the first, small fill that sizes the arrays
FIRST_BYTES = 16 * MiB


def _big_array(n_bytes: int) -> np.ndarray:
    """``n_bytes`` of float32 ones, on transparent huge pages where the OS offers them (fewer
    page faults to fill it, fewer TLB misses to stream it)."""
    n_bytes = n_bytes // 4 * 4
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf = mmap.mmap(-1, n_bytes)
        buf.madvise(mmap.MADV_HUGEPAGE)
        a = np.frombuffer(buf, dtype=np.float32)
    else:
        a = np.empty(n_bytes // 4, dtype=np.float32)
    a.fill(1.0)
    return a


def _dram(settings: ProbeSettings, threads: int, least_bytes: int, share_s: float,
          clock: Clock = time.perf_counter) -> tuple[np.ndarray, Figure, Figure]:
    """The DRAM test array (float ones, reused as fp32 expert weights) and its read and copy
    bandwidth, within ``share_s``.

    A first :data:`FIRST_BYTES` fill times the allocation (page faults included, the slowest
    pass); the arrays (the test array and the copy's destination) get at most half the share,
    and are never smaller than ``least_bytes`` (past the caches). Reads and copies take a
    quarter each, their repeats cut by :func:`~.budget.best_s`.
    """
    t = clock()
    _big_array(FIRST_BYTES)
    fill_s = clock() - t
    n_bytes = size_that_fits(fill_s / FIRST_BYTES, share_s / 2, calls=2, most=settings.dram_bytes,
                             least=least_bytes, step=MiB) or least_bytes
    a = _big_array(n_bytes)
    read = _dram_read(a, settings.dram_repeats, threads, share_s / 4, clock)
    copy = _dram_copy(a, settings.dram_repeats, threads, share_s / 4, clock)
    return a, read, copy


def _chunks(n: int, parts: int) -> list[slice]:
    bounds = np.linspace(0, n, parts + 1).astype(int)
    return [slice(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds)]


def _dram_read(a: np.ndarray, repeats: int, threads: int, budget_s: float, clock: Clock) -> Figure:
    """Read bandwidth: each thread sums its slice of ``a`` (viewed as int64: one add per 8 bytes)."""
    words = a.view(np.int64)
    parts = _chunks(words.size, threads)
    with ThreadPoolExecutor(threads) as pool:
        best = best_s(lambda: list(pool.map(lambda s: np.add.reduce(words[s]), parts)), repeats,
                      budget_s=budget_s, clock=clock)
    return Figure(a.nbytes / best, f"numpy sum over a {_mib(a.nbytes)} array, {threads} threads, "
                  f"best of up to {repeats} (bytes read / s)")


def _dram_copy(a: np.ndarray, repeats: int, threads: int, budget_s: float, clock: Clock) -> Figure:
    """Copy bandwidth, STREAM convention: bytes read + bytes written per second."""
    dst = _big_array(a.nbytes)  # filled: its page faults stay out of the timed copies
    parts = _chunks(a.size, threads)
    with ThreadPoolExecutor(threads) as pool:
        best = best_s(lambda: list(pool.map(lambda s: np.copyto(dst[s], a[s]), parts)), repeats,
                      budget_s=budget_s, clock=clock)
    return Figure(2 * a.nbytes / best, f"numpy copyto of a {_mib(a.nbytes)} array, {threads} threads, "
                  f"best of up to {repeats} (STREAM convention: bytes read + written / s)")
