"""Host DRAM as one shared port (memory-bandwidth contention), for the planner and the simulator.

A CPU running experts reads their weights from host DRAM; a host->device copy of an expert
reads the same DRAM; a disk read bound for the GPU lands in host memory first (DMA in, then
the copy out: twice the bytes). All of it goes through one memory port of
``host.memory_bytes_per_s`` (the sum over the CPU's sockets: the traffic is taken to spread
over them evenly, as interleaved pages or NUMA-aware placement make it; an engine that
interleaves across a slow socket link has already lowered the figure,
:meth:`profiles.engines.Engine.apply`). So while they overlap, a layer cannot end before

    D / dram_bw,   D = CPU expert read bytes + bytes copied from or staged in host DRAM

after its router, on top of the device, CPU and link times the cost model already takes the
max of (:mod:`planner.dram` prices it per option, :mod:`simulator.dram` books it per layer).
With contention off (the default, ``--dram-contention`` turns it on) nothing here is used.

The bytes an expert call reads are its roofline's (:func:`profiles.perf.expert_call_s`): the
stored bytes, or for a format the engine unpacks first, the fp16 copy it multiplies with.
"""

from __future__ import annotations

from .formats import get_format
from .hardware import Device, Hardware

__all__ = ["call_read_bytes", "copy_factor", "port_bytes_per_s"]


def port_bytes_per_s(host: Device) -> float:
    """Bandwidth of the host DRAM port every reader and copy shares (bytes/s)."""
    return host.memory_bytes_per_s


def call_read_bytes(device: Device, fmt: str, weight_bytes: float) -> float:
    """Bytes one expert call on ``device`` reads from its memory (weights stored as ``fmt``,
    ``weight_bytes`` of them): what :func:`profiles.perf.expert_call_s` divides by the
    memory bandwidth."""
    if device.unpack_weights_per_s.get(fmt):
        return 2.0 * weight_bytes * 8.0 / get_format(fmt).bits_per_weight  # the fp16 copy
    return weight_bytes


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
