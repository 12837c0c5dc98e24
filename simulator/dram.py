"""Memory-bandwidth contention in the simulator: host DRAM as one port (:mod:`profiles.dram`).

With contention on (``SimConfig.dram_contention``, or the plan's ``inputs.dram_contention``),
every layer's expert work draws on the host's DRAM port: the weights the host CPU reads for
the experts it runs (their port bytes, :func:`profiles.dram.call_port_bytes`), every copy that
starts or ends in host DRAM (fetches, cache fills, streamed and op-offloaded experts) and,
twice, a disk read staged there on its way to the device. The port serves them together, so
the layer cannot end before

    router + (bytes through the port) / dram_bw

(the fluid rule :meth:`simulator.resources.Network.exchange` uses for a shared bandwidth),
which :meth:`DramPort.start` adds to the layer's waits: the planner's
``max(device, cpu, link, D / dram_bw)`` (:mod:`planner.dram`), played out. Everything else in
the layer (streams, copy engine, links) runs as without contention.

How it is wired: :func:`contend_dram` turns the simulation's event-free shortcuts off
(``play_ahead = False``: every layer with waiting work is played out by
:meth:`simulator.experts.ExpertWork._start`) and wraps ``_start`` on the instance, so a run
without contention has no hook at all. The port's busy seconds are reported as the
utilisation of ``"<host memory> dram port"``. Experts prefetched for the next layer are
charged to that layer when it next starts waiting work (wrapped ``prefetcher``), as the planner
charges the predicted set to the layer it serves.
"""

from __future__ import annotations

from profiles.dram import call_port_bytes, copy_factor, port_bytes_per_s

from .experts import RESIDENT

__all__ = ["DramPort", "contend_dram"]


class DramPort:
    """The host DRAM port of one simulation: the bytes a layer moves through it."""

    def __init__(self, sim) -> None:
        self.sim = sim
        host = sim.hw.devices[sim.host_id]
        self.host = host
        self.mem = sim.hw.memory_of(host.id).id
        self.key = f"{self.mem} dram port"
        self.bytes_per_s = port_bytes_per_s(host)
        self._factor: dict[tuple[str, str], float] = {}
        self._read: dict[tuple[str, str], float] = {}
        self.prefetched: dict[int, float] = {}  # layer -> bytes prefetched for it, not yet charged

    def factor(self, src: str, dst: str) -> float:
        """How many times a copy from memory ``src`` to ``dst`` crosses the port."""
        key = (src, dst)
        if key not in self._factor:
            self._factor[key] = copy_factor(self.sim.hw, self.host, src, dst)
        return self._factor[key]

    def read(self, device_id: str, fmt: str) -> float:
        """Port bytes of one call on ``device_id`` (0 off host DRAM)."""
        key = (device_id, fmt)
        if key not in self._read:
            sim = self.sim
            here = sim.hw.memory_of(device_id).id == self.mem
            self._read[key] = call_port_bytes(sim.hw.devices[device_id], fmt, sim.model.expert_bytes(fmt)) \
                if here else 0.0
        return self._read[key]

    def layer_bytes(self, l: int, jobs: list, ids) -> float:
        """Bytes layer ``l``'s work of this step (``jobs``, :meth:`ExpertWork._classify`) moves
        through the port; ``ids``: the step's routed experts ``[n, L, K]``."""
        sim = self.sim
        lay, dst = sim.layers[l], sim.layer_mem[l]
        total = self.prefetched.pop(l, 0.0) if self.prefetched else 0.0
        local = set()
        for job in jobs:
            kind = job[0]
            if kind == "fetch":  # ("fetch", e, n, fmt, copy, seconds)
                total += self.factor(lay.home[job[1]], dst) * sim.model.expert_bytes(job[3])
            elif kind == "fill":  # ("fill", e, fmt, copy)
                total += self.factor(lay.home[job[1]], dst) * sim.model.expert_bytes(job[2])
            elif kind == "local":  # ("local", dev, calls, tokens, seconds, activations)
                dev = job[1]
                dev_mem = sim.hw.memory_of(dev).id
                for e, _n in job[2]:
                    local.add(e)
                    total += self.read(dev, lay.fmt[e])
                    if sim.hw.memories[lay.home[e]].tier == "nvme":  # read into memory first
                        total += self.factor(lay.home[e], dev_mem) * sim.model.expert_bytes(lay.fmt[e])
            elif kind == "stream":
                copy = getattr(sim, "_offload_copy", None)
                if copy is not None and l in copy:  # an op-offloaded step: one copy from host memory
                    total += self.factor(self.mem, dst) * copy[l]
                else:
                    for e in lay.streamed:
                        total += self.factor(lay.home[e], dst) * sim.model.expert_bytes(lay.fmt[e])
        if dst == self.mem:  # the compute device's memory is the host's: its own calls read it too
            seen = {int(e) for e in ids[:, l, :].ravel() if 0 <= e < sim.E} - local
            for e in seen:
                fmt = lay.fmt[e] if lay.code[e] == RESIDENT else lay.copy_format[e]
                total += self.read(sim.layer_dev[l], fmt)
        return total

    def start(self, start, l: int, block: dict, jobs: list, ids) -> list:
        """``_start`` (bound, passed as ``start``) plus the port's floor on the layer's end."""
        waits = start(l, block, jobs, ids)
        n_bytes = self.layer_bytes(l, jobs, ids)
        if n_bytes > 0:
            seconds = n_bytes / self.bytes_per_s
            self.sim.net.busy_s[self.key] += seconds
            waits.append(self.sim.env.timeout(seconds))
        return waits


    def prefetch(self, prefetcher, l: int, rows, step_ids, current, idle_s=None) -> None:
        """``prefetcher`` (bound, :meth:`simulator.prefetcher.Prefetcher.prefetcher`), and the
        bytes of the copies it starts charged to layer ``l``, the layer they serve (as the
        planner charges the predicted set)."""
        sim = self.sim
        before = {e: ev for (ll, e), ev in sim.inflight.items() if ll == l}
        prefetcher(l, rows, step_ids, current, idle_s)
        lay = sim.layers[l]
        for (ll, e), ev in sim.inflight.items():
            if ll == l and before.get(e) is not ev:
                fmt = lay.cache_format or lay.fmt[e]
                self.prefetched[l] = self.prefetched.get(l, 0.0) + \
                    self.factor(lay.home[e], sim.layer_mem[l]) * sim.model.expert_bytes(fmt)


def contend_dram(sim) -> DramPort:
    """Make ``sim`` (a :class:`simulator.engine.Simulation`) share host DRAM between CPU expert
    reads and copies: see the module docstring."""
    port = DramPort(sim)
    start = sim._start
    sim.play_ahead = False
    sim._start = lambda l, block, jobs, ids: port.start(start, l, block, jobs, ids)
    prefetcher = sim.prefetcher
    sim.prefetcher = lambda l, rows, step_ids, current, idle_s=None: port.prefetch(prefetcher, l, rows, step_ids,
                                                                                   current, idle_s)
    return port
