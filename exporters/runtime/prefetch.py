"""Copies of expert weights to the compute device, on a worker thread (and CUDA stream).

A :class:`Fetcher` runs copy jobs on one worker thread (the runtime has one per plan device:
a multi-GPU plan copies over each GPU's link at once); with CUDA each job copies on its own
stream (from pinned host memory, ``non_blocking``) and records an event, so a copy overlaps
the compute stream until someone needs the weights: :meth:`Slot.get` waits for the job and
makes the current stream wait for the event. Without CUDA the worker thread does the copy
(and any disk read) while the main thread computes.

A copy can be deferred (``submit(..., start=False)``): it starts when :meth:`Slot.start` or
:meth:`Slot.get` is called, so a layer step can keep one copy ahead of its compute instead of
holding every expert it fetches at once (see ``PlannedExperts.forward``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["Fetcher", "Slot"]


class Slot:
    """A cache entry: an expert's weights on the compute device, ready, on their way, or
    deferred (a copy not started yet)."""

    __slots__ = ("_event", "_fetcher", "_future", "_load", "_weights", "prefetched")

    def __init__(self, weights: Any = None, future: Future | None = None, prefetched: bool = False, *,
                 load: Callable[[], Any] | None = None, fetcher: Fetcher | None = None) -> None:
        self._weights = weights
        self._future = future
        self._event = None
        self._load, self._fetcher = load, fetcher
        self.prefetched = prefetched

    @property
    def ready(self) -> bool:
        """Whether :meth:`get` returns without waiting for a copy."""
        return self._load is None and (self._future is None or self._future.done())

    def start(self) -> None:
        """Start a deferred copy (nothing otherwise)."""
        if self._load is None:
            return
        load, self._load = self._load, None
        if self._fetcher._pool is None:
            self._weights = load()
        else:
            self._future = self._fetcher._pool.submit(self._fetcher._run, load)

    def get(self) -> Any:
        """The weights, once copied (starts a deferred copy, waits for a background one)."""
        self.start()
        if self._future is not None:
            self._weights, self._event = self._future.result()
            self._future = None
        if self._event is not None:
            import torch

            # the compute stream of the device the weights were copied to (with several GPUs
            # it need not be the current device)
            stream = torch.cuda.current_stream(self._fetcher.device)
            stream.wait_event(self._event)
            # the tensors were allocated on the copy stream: keep their memory from being
            # reused there while the compute stream may still read them
            self._weights.record_stream(stream)
            self._event = None
        return self._weights


class Fetcher:
    """Runs ``load()`` jobs that return an expert's weights on the compute device.

    Args:
        device: the torch compute device.
        background: run :meth:`submit` jobs on a worker thread (False: run them at once).
    """

    def __init__(self, device: Any, background: bool = True) -> None:
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-fetch") if background else None

    def submit(self, load: Callable[[], Any], prefetched: bool = False, *, start: bool = True) -> Slot:
        """Copy in the background (``start=False``: once the slot is started); :meth:`Slot.get`
        waits for it."""
        slot = Slot(prefetched=prefetched, load=load, fetcher=self)
        if start:
            slot.start()
        return slot

    def _run(self, load: Callable[[], Any]):
        if not self.cuda:
            return load(), None
        import torch

        with torch.cuda.stream(self._stream):
            weights = load()
            event = torch.cuda.Event()
            event.record(self._stream)
        return weights, event

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
