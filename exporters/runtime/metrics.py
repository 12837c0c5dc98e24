"""What a run measured, under the names the planner predicts and the simulator reports.

- ``tokens_per_s``: decode throughput, generated tokens after the first per second of
  decode (``batch / tpot`` in the planner's terms); ``end_to_end_tokens_per_s`` counts
  every generated token over the whole generation, prefill included;
- ``ttft_s``: prompt in, first token out (the prefill forward), mean over prompts, with
  ``ttft_s_p50/p90/p99``;
- ``tpot_s``: seconds per output token after the first, mean, with ``tpot_s_p50/p90/p99``;
- ``hit_rate``: per MoE layer, hits / (hits + misses) over the accesses that go through the
  layer's cache (sites ``fetch`` and ``hybrid``); ``null`` for a layer without any;
  ``hits`` and ``misses`` give the counts; ``cache_hit_rate`` pools all layers;
- ``expert_hit_rate``: the planner's prediction of the same name: resident accesses plus
  cache hits over all expert accesses;
- ``bytes_moved``: bytes read from each memory pool (plan memory ids) to serve experts:
  cache fills, prefetches, streamed experts and on-demand disk reads; ``bytes_moved_by_tier``
  the same by runtime tier (``host``, ``disk``);
- ``expert_fetches_per_step``: experts copied to the compute device per decode step;
- ``devices``: per plan compute device (``layer_devices`` of a multi-GPU plan, else the one
  ``compute_device``): its torch device, MoE layers, bytes held (``dense_bytes``: decoder
  layers placed there, plus the embedding and head on ``compute_device``;
  ``resident_expert_bytes``; ``cache_bytes_peak``: the experts its layers' caches held at
  most, at their stored size), its layers' cache hits, misses and resident accesses, and the
  expert copies into it (``copies_in``, ``bytes_in``);
- ``links``: expert copies per route ``FROM->TO`` (home memory to the layer's device; a
  disk read for a CPU expert goes to ``host_device``), ``{copies, bytes}``; ``hops``: hidden
  states moved between plan devices at layer boundaries, ``{count, bytes}``;
- ``placement``: per MoE layer its plan device and torch device, and per expert the memory
  that holds its weights as run (``experts``) and the device that computes it (``compute``).

Metrics are written as JSON (sorted keys) by :meth:`MetricsRecorder.to_json`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricsRecorder", "percentile"]

METRICS_FORMAT_VERSION = 1


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); ``None`` when empty."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class MetricsRecorder:
    """Counters the expert stores update, and the timings of the generation loop.

    Args:
        num_layers: MoE layers, in plan order.
        tiers: memory id -> runtime tier, for ``bytes_moved_by_tier``.
    """

    def __init__(self, num_layers: int, tiers: dict[str, str] | None = None, *,
                 layer_devices: Sequence[str] | None = None, host: str = "host",
                 torch_devices: dict[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self.tiers = dict(tiers or {})
        self.num_layers = num_layers
        self.notes: list[str] = []  # about the configuration: kept by reset()
        self.layer_devices = list(layer_devices or ["device"] * num_layers)
        self.host = host
        self.torch_devices = dict(torch_devices or {})
        # what loading placed (kept by reset): plan device -> bytes; MoE layer -> its record
        self.dense_bytes: dict[str, int] = {}
        self.resident_bytes: dict[str, int] = {}
        self.placement: list[dict[str, Any] | None] = [None] * num_layers
        self.cache_now = [0] * num_layers  # bytes each layer's cache holds
        self.reset()

    def reset(self) -> None:
        """Forget everything measured so far (caches keep their contents)."""
        with self._lock:
            self.hits = [0] * self.num_layers
            self.misses = [0] * self.num_layers
            self.resident_accesses = [0] * self.num_layers
            self.other_accesses = [0] * self.num_layers  # local and stream
            self.bytes_moved: dict[str, int] = {}
            self.fetches = 0
            self.decode_fetches = 0
            self.prefetches = 0
            self.prefetch_hits = 0
            self.cpu_expert_calls = 0
            self.miss_copies = 0  # misses served by a low-bit copy (miss_copy.py)
            self.ttft_s: list[float] = []
            self.tpot_s: list[float] = []
            self.generated_tokens = 0
            self.generation_s = 0.0
            self.phase = "prefill"
            self.links: dict[str, list[int]] = {}  # "FROM->TO" -> [copies, bytes]
            self.hops: dict[str, list[int]] = {}
            self.cache_peak = {d: self._held(d) for d in self.layer_devices}

    # -- updates from the stores (any thread) -------------------------------------------

    def access(self, layer: int, kind: str, n: int = 1) -> None:
        """``kind``: hit | miss | resident | other."""
        with self._lock:
            {"hit": self.hits, "miss": self.misses, "resident": self.resident_accesses,
             "other": self.other_accesses}[kind][layer] += n

    def moved(self, memory_id: str, nbytes: int, *, fetch: bool = False, prefetch: bool = False,
              to: str | None = None) -> None:
        """``nbytes`` read from ``memory_id`` into plan device ``to`` (None: into host memory)."""
        with self._lock:
            self.bytes_moved[memory_id] = self.bytes_moved.get(memory_id, 0) + int(nbytes)
            link = self.links.setdefault(f"{memory_id}->{to or self.host}", [0, 0])
            link[0] += 1
            link[1] += int(nbytes)
            if fetch or prefetch:
                self.fetches += 1
                self.decode_fetches += self.phase == "decode"
            self.prefetches += prefetch

    def hop(self, src: str, dst: str, nbytes: int) -> None:
        """Hidden states moved from plan device ``src`` to ``dst``."""
        with self._lock:
            hop = self.hops.setdefault(f"{src}->{dst}", [0, 0])
            hop[0] += 1
            hop[1] += int(nbytes)

    def _held(self, device: str) -> int:
        return sum(n for d, n in zip(self.layer_devices, self.cache_now) if d == device)

    def cache_held(self, layer: int, nbytes: int) -> None:
        """Layer ``layer``'s cache holds ``nbytes`` now; keeps its device's peak."""
        with self._lock:
            self.cache_now[layer] = int(nbytes)
            device = self.layer_devices[layer]
            self.cache_peak[device] = max(self.cache_peak.get(device, 0), self._held(device))

    def dense(self, device: str, nbytes: int) -> None:
        self.dense_bytes[device] = self.dense_bytes.get(device, 0) + int(nbytes)

    def place(self, layer: int, record: dict[str, Any], resident_bytes: int) -> None:
        """What loading put where for MoE layer ``layer`` (see ``placement``)."""
        self.placement[layer] = record
        device = self.layer_devices[layer]
        self.resident_bytes[device] = self.resident_bytes.get(device, 0) + int(resident_bytes)

    def _devices(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for d in dict.fromkeys([*self.dense_bytes, *self.layer_devices]):
            mine = [i for i, x in enumerate(self.layer_devices) if x == d]
            into = [v for k, v in self.links.items() if k.endswith(f"->{d}")]
            out[d] = {"torch_device": self.torch_devices.get(d), "moe_layers": mine,
                      "dense_bytes": self.dense_bytes.get(d, 0), "resident_expert_bytes": self.resident_bytes.get(d, 0),
                      "cache_bytes_peak": self.cache_peak.get(d, 0), "hits": sum(self.hits[i] for i in mine),
                      "misses": sum(self.misses[i] for i in mine),
                      "resident_accesses": sum(self.resident_accesses[i] for i in mine),
                      "copies_in": sum(v[0] for v in into), "bytes_in": sum(v[1] for v in into)}
        return out

    def count(self, counter: str, n: int = 1) -> None:
        """Add ``n`` to ``prefetch_hits``, ``cpu_expert_calls`` or ``miss_copies``."""
        with self._lock:
            setattr(self, counter, getattr(self, counter) + n)

    def note(self, text: str) -> None:
        with self._lock:
            if text not in self.notes:
                self.notes.append(text)

    # -- report --------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        with self._lock:
            hit_rate = [h / (h + m) if h + m else None for h, m in zip(self.hits, self.misses)]
            total_hits, total_misses = sum(self.hits), sum(self.misses)
            resident = sum(self.resident_accesses)
            accesses = resident + total_hits + total_misses + sum(self.other_accesses)
            decode_s = sum(self.tpot_s)
            by_tier: dict[str, int] = {}
            for memory_id, n in self.bytes_moved.items():
                tier = self.tiers.get(memory_id, "unknown")
                by_tier[tier] = by_tier.get(tier, 0) + n
            out: dict[str, Any] = {
                "format_version": METRICS_FORMAT_VERSION,
                "tokens_per_s": len(self.tpot_s) / decode_s if decode_s > 0 else None,
                "end_to_end_tokens_per_s": (self.generated_tokens / self.generation_s
                                            if self.generation_s > 0 else None),
                "generated_tokens": self.generated_tokens,
                "ttft_s": sum(self.ttft_s) / len(self.ttft_s) if self.ttft_s else None,
                "tpot_s": decode_s / len(self.tpot_s) if self.tpot_s else None,
                "hit_rate": hit_rate,
                "hits": list(self.hits),
                "misses": list(self.misses),
                "cache_hit_rate": total_hits / (total_hits + total_misses) if total_hits + total_misses else None,
                "expert_hit_rate": (resident + total_hits) / accesses if accesses else None,
                "expert_accesses": accesses,
                "bytes_moved": dict(sorted(self.bytes_moved.items())),
                "bytes_moved_by_tier": dict(sorted(by_tier.items())),
                "expert_fetches": self.fetches,
                "expert_fetches_per_step": self.decode_fetches / len(self.tpot_s) if self.tpot_s else None,
                "prefetches": self.prefetches,
                "prefetch_hits": self.prefetch_hits,
                "cpu_expert_calls": self.cpu_expert_calls,
                **({"miss_copies": self.miss_copies} if self.miss_copies else {}),  # plans with copies only
                "notes": list(self.notes),
                "devices": self._devices(),
                "links": {k: {"copies": v[0], "bytes": v[1]} for k, v in sorted(self.links.items())},
                "hops": {k: {"count": v[0], "bytes": v[1]} for k, v in sorted(self.hops.items())},
                "placement": list(self.placement),
            }
            for name, values in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s)):
                for q in (50, 90, 99):
                    out[f"{name}_p{q}"] = percentile(values, q)
            return out

    def to_json(self, path: str | Path | None = None, extra: dict[str, Any] | None = None) -> str:
        """The summary as JSON text (sorted keys); written to ``path`` when given."""
        data = self.summary()
        data.update(extra or {})
        text = json.dumps(data, indent=1, sort_keys=True) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text
