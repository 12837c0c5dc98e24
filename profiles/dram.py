"""Host DRAM as one shared port (memory-bandwidth contention), for the planner and the simulator.

A CPU running experts reads their weights from host DRAM; a host->device copy of an expert
reads the same DRAM; a disk read bound for the GPU lands in host memory first (DMA in, then
the copy out: twice the bytes). All of it goes through one memory port of
``host.memory_bytes_per_s`` (the sum over the CPU's sockets: the traffic is taken to spread
over them evenly, as interleaved pages or NUMA-aware placement make it; an engine that
interleaves across a slow socket link has already lowered the figure,
:meth:`profiles.engines.Engine.apply`).

The port is time-shared: each reader holds it for its bytes over the rate it reaches alone.
A copy streams whole pages at the port's rate (``bytes / dram_bw``). An expert call reads at
``memory_fraction`` of it, the rate :func:`profiles.perf.expert_call_s` prices the call's
memory time with: a memory-bound call is, by that roofline, limited by this memory, so while
it streams it holds the whole port. Its port bytes (:func:`call_port_bytes`) are therefore
its read bytes over ``memory_fraction``: what the port would move at full rate in the time the
call holds it. So while they overlap, a layer cannot end before

    D / dram_bw,   D = CPU expert port bytes + bytes copied from or staged in host DRAM

after its router, on top of the device, CPU and link times the cost model already takes the
max of (:mod:`planner.dram` prices it per option, :mod:`simulator.dram` books it per layer).

Why the port bytes and not the bytes: priced at the port's peak, CPU reads at the default
CPU ``memory_fraction`` of 0.35 fill a third of the port, and a desktop's PCIe copies
(12-25 GB/s against 51-90 GB/s of DRAM) under a third, so ``(read + copied) / dram_bw`` never
exceeds ``max(read / (0.35 dram_bw), copied / pcie_bw)``: the term could never bind on any
bundled desktop profile, whatever the plan, although the roofline calls those CPU calls
memory-bound (they leave no DRAM time to a copy).

With contention off (the default, ``--dram-contention`` turns it on) nothing here is used.
The bytes an expert call reads are its roofline's: the stored bytes, or for a format the
engine unpacks first, the fp16 copy it multiplies with.
"""

from __future__ import annotations

from .formats import get_format
from .hardware import Device, Hardware

__all__ = ["call_port_bytes", "copy_factor", "port_bytes_per_s"]


def port_bytes_per_s(host: Device) -> float:
    """Bandwidth of the host DRAM port every reader and copy shares (bytes/s)."""
    return host.memory_bytes_per_s


def call_port_bytes(device: Device, fmt: str, weight_bytes: float) -> float:
    """Port bytes of one expert call on ``device`` (weights stored as ``fmt``, ``weight_bytes`` of
    them): the bytes it reads (what :func:`profiles.perf.expert_call_s` divides by the memory
    bandwidth) over the share of that bandwidth it reaches (``memory_fraction``), so that over
    ``port_bytes_per_s`` they give the seconds the call holds the port (module docstring)."""
    if device.unpack_weights_per_s.get(fmt):
        read = 2.0 * weight_bytes * 8.0 / get_format(fmt).bits_per_weight  # the fp16 copy
    else:
        read = weight_bytes
    return read / device.efficiency.memory_fraction if device.efficiency is not None else read


def copy_factor(hw: Hardware, host: Device, src_memory: str, dst_memory: str) -> float:
    """How many times a transfer from ``src_memory`` to ``dst_memory`` crosses ``host``'s DRAM
    port: once when it starts or ends there, twice when its route passes through the host CPU
    (a disk read for the GPU is DMAed into host memory, then copied out), else 0."""
    dram = hw.memory_of(host.id).id
    src, dst = hw.memory_of(src_memory).id, hw.memory_of(dst_memory).id
    if src == dst:
        return 0.0
    if dram in (src, dst):
        return 1.0
    route = hw.route(src, dst)
    through = {d for link in route.links for d in (link.a, link.b)}
    return 2.0 if host.id in through else 0.0
