"""Host-to-device copies: bandwidth from pinned and from pageable (ordinary) host memory,
and the latency of a tiny copy. The pinned rate is the pcie link's ``bytes_per_s``, the
pageable one its ``pageable_bytes_per_s`` (the driver stages pageable memory through a pinned
bounce buffer, so an engine that does not pin its host weights gets the lower rate)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from .budget import size_that_fits
from .results import Figure, _mib
from .settings import MiB

# the first copy, from pageable memory (the slower kind): its rate sizes the real ones
FIRST_BYTES = 8 * MiB


def _wall_best_s(torch, fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall-clock time of ``fn`` followed by a device synchronise (s)."""
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def _gpu_transfers(torch, dev, n: int, reps: int, share_s: float) -> tuple[Figure, Figure, Figure]:
    """Host-to-device bandwidth from pinned and from pageable memory, and a tiny copy's latency.

    Copies are ``n`` bytes or fewer: as many as let a warm-up and ``reps`` timed copies of each
    kind fit in ``share_s`` at the rate of a first :data:`FIRST_BYTES` pageable copy.
    """
    first = min(n, FIRST_BYTES)
    first_dst = torch.empty(first, dtype=torch.uint8, device=dev)
    first_src = torch.ones(first, dtype=torch.uint8)
    first_s = _wall_best_s(torch, lambda: first_dst.copy_(first_src), 1)
    del first_dst, first_src
    n = size_that_fits(first_s / first, share_s, calls=2 * (1 + reps), most=n, least=first, step=MiB) or first
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    pageable = torch.ones(n, dtype=torch.uint8)
    small_host = torch.empty(64, dtype=torch.uint8, pin_memory=True).fill_(1)
    small_dev = torch.empty(64, dtype=torch.uint8, device=dev)
    how = f"copy_ of {_mib(n)} from {{}} host memory, wall clock to synchronize, best of {reps}"
    return (
        Figure(n / _wall_best_s(torch, lambda: dst.copy_(pinned, non_blocking=True), reps), how.format("pinned")),
        Figure(n / _wall_best_s(torch, lambda: dst.copy_(pageable), reps), how.format("pageable")),
        Figure(_wall_best_s(torch, lambda: small_dev.copy_(small_host, non_blocking=True), max(20, reps)),
               f"64-byte pinned host-to-device copy to synchronize, best of {max(20, reps)}"),
    )
