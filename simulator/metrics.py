"""What a simulation measured: the SimReport, its JSON, Chrome trace and plots.

Metric names are shared with the runtime's recorder (``tokens_per_s``, ``ttft_s``,
``tpot_s``, ``hit_rate`` per layer, ``bytes_moved`` per source tier) so that a prediction
and a measurement can be held against each other key by key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from planner.plan import _round  # the Plan's float rounding: the same JSON conventions
from profiles.energy import energy_j

from .resources import Span

if TYPE_CHECKING:
    from .engine import Simulation

__all__ = ["SimReport", "percentiles", "served_one_by_one", "serving", "summarise"]


def percentiles(values) -> dict[str, float] | None:
    """``{"mean", "p50", "p90", "p99"}`` of ``values`` (None when there are none)."""
    v = np.asarray(list(values), float)
    if v.size == 0:
        return None
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def served_one_by_one(per_request: list[dict], skip: int = 0) -> tuple[float | None, float]:
    """Mean TPOT and TTFT as a runtime serving one prompt after another measures them.

    A runtime that times each prompt from the moment it starts it sees no queue: TTFT is
    counted from admission (``ttft_s - queue_s``), not from the arrival at t = 0. The first
    ``skip`` requests (warm-up) are left out.
    """
    timed = per_request[skip:]
    steps = [t for r in timed for t in r["tpot_s"]]
    ttft = [r["ttft_s"] - r["queue_s"] for r in timed if r["ttft_s"] is not None]
    return (float(np.mean(steps)) if steps else None), float(np.mean(ttft))


@dataclass(frozen=True, eq=False)
class SimReport:
    """Metrics of one simulation (``metrics`` is JSON-ready and deterministic).

    ``spans`` (kernels and transfers) and ``events`` (``(time_s, actor, what)``) are kept
    when the run recorded them; ``wall_s`` is how long the simulation itself took.
    ``serving`` is what the scheduler and the KV cache did (:func:`serving`): the KV
    cache's size and utilisation, preemptions, swapped bytes, steps by phase and how much
    of TTFT was queueing; ``to_json`` writes it under ``serving`` beside the metrics.
    """

    metrics: dict
    spans: tuple[Span, ...] | None
    events: tuple[tuple[float, str, str], ...] | None
    wall_s: float
    serving: dict | None = None

    def to_json(self) -> str:
        data = self.metrics if self.serving is None else {**self.metrics, "serving": self.serving}
        return json.dumps(_round(data), sort_keys=True, indent=1) + "\n"

    def chrome_trace(self) -> dict:
        """The spans as a Chrome/Perfetto trace (``chrome://tracing``, ui.perfetto.dev)."""
        if self.spans is None:
            raise ValueError("the simulation did not record spans (SimConfig(record=True))")
        names = sorted({s.resource for s in self.spans})
        tid = {n: i for i, n in enumerate(names)}
        events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid[n], "args": {"name": n}} for n in names]
        for s in sorted(self.spans, key=lambda s: (s.start_s, s.resource, s.name)):
            events.append({"name": s.name, "cat": "link" if s.resource.startswith("link") else "kernel", "ph": "X",
                           "pid": 0, "tid": tid[s.resource], "ts": round(s.start_s * 1e6, 3),
                           "dur": round((s.end_s - s.start_s) * 1e6, 3), "args": dict(s.args)})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def write_chrome_trace(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.chrome_trace()), encoding="utf-8")
        return path

    def write_plots(self, out_dir: str | Path) -> list[Path]:
        """``utilisation.png`` (busy share per resource) and ``layer_time.png`` (per MoE layer)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        util = self.metrics["utilisation"]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(util) + 1.2))
        names = sorted(util)
        ax.barh(names, [util[n] for n in names])
        ax.set_xlim(0, 1)
        ax.set_xlabel("busy share of the simulated time")
        ax.set_title("Utilisation per resource")
        fig.tight_layout()
        files = [out / "utilisation.png"]
        fig.savefig(files[0], dpi=110)
        plt.close(fig)
        per_layer = self.metrics["layer_time_s"]
        fig, ax = plt.subplots(figsize=(8, 3.2))
        ax.bar(range(len(per_layer)), [1e3 * t for t in per_layer])
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("ms per step (mean)")
        ax.set_title("Time per layer")
        fig.tight_layout()
        files.append(out / "layer_time.png")
        fig.savefig(files[1], dpi=110)
        plt.close(fig)
        return files


def summarise(sim: Simulation, wall_s: float) -> SimReport:
    """Collect the metrics of a finished simulation."""
    reqs = sim.requests
    makespan = max(sim.env.now, 1e-300)
    outputs = sum(len(r.token_s) for r in reqs)
    ttft = [r.token_s[0] - r.arrival_s for r in reqs if r.token_s]
    tpot = [(r.token_s[-1] - r.token_s[0]) / (len(r.token_s) - 1) for r in reqs if len(r.token_s) > 1]
    latency = [r.token_s[-1] - r.arrival_s for r in reqs if r.token_s]
    decode_steps = [end - start for phase, _, start, end in sim.steps if phase == "decode"]
    n_steps = max(len(sim.steps), 1)
    hit = [float(h / a) if a else None for h, a in zip(sim.cache_hit, sim.cache_access)]
    busy = {name: st.busy_s for name, st in sim.streams.items()}
    util = {name: min(b / makespan, 1.0) for name, b in busy.items()}
    util.update({k: min(b / makespan, 1.0) for k, b in sim.net.busy_s.items()})
    # the planner's model (profiles.energy): busy seconds at active power, idle power all along
    energy = energy_j(sim.hw, busy, sim.env.now, devices=(sim.plan.compute_device, sim.plan.host_device))
    metrics = {
        "requests": len(reqs),
        "output_tokens": outputs,
        "makespan_s": sim.env.now,
        "tokens_per_s": outputs / makespan,
        "ttft_s": percentiles(ttft),
        "tpot_s": percentiles(tpot),
        "latency_s": percentiles(latency),
        "decode_step_s": percentiles(decode_steps),
        "prefill_steps": sum(1 for s in sim.steps if s[0] == "prefill"),
        "decode_steps": len(decode_steps),
        "hit_rate": hit,
        "expert_hit_rate": (sum(sim.resident_access) + sum(sim.cache_hit)) / max(sim.expert_accesses, 1),
        "expert_calls": sim.expert_calls,
        "expert_accesses": sim.expert_accesses,
        "cache_accesses": sum(sim.cache_access),
        "local_calls": sum(sim.local_access),
        "bytes_moved": dict(sorted(sim.bytes_moved.items())),
        "link_bytes": dict(sorted(sim.net.bytes.items())),
        "utilisation": dict(sorted(util.items())),
        "busy_s": dict(sorted(busy.items())),
        "energy_j": energy,
        "layer_time_s": [t / n_steps for t in sim.layer_wall_s],
        "per_request": [{"arrival_s": r.arrival_s, "queue_s": r.admitted_s - r.arrival_s,
                         "ttft_s": r.token_s[0] - r.arrival_s if r.token_s else None,
                         "tpot_s": [b - a for a, b in zip(r.token_s, r.token_s[1:])]} for r in reqs],
        "expert_parallel": None if not sim.ep_tokens else {
            "gpus": len(sim.gpus),
            "cross_gpu_token_fraction": sim.ep_cross_gpu / sim.ep_tokens,
            "cross_node_token_fraction": sim.ep_cross_node / sim.ep_tokens,
            "max_over_mean_gpu_load": [r / max(n, 1) for r, n in zip(sim.ep_load_ratio, sim.ep_layer_steps)],
            **_ep_runtime_metrics(sim)},
        "policies": {"eviction": sim.eviction, "prefetch": sim.prefetch_name, "miss": sim.cfg.miss,
                     "batching": sim.cfg.batching, "batch_size": sim.batch_size},
    }
    return SimReport(metrics=metrics, spans=tuple(sim.spans) if sim.spans is not None else None,
                     events=_in_time_order(sim.events), wall_s=wall_s, serving=serving(sim, metrics))


def _ep_runtime_metrics(sim: Simulation) -> dict:
    """Layer re-placements (one per layer per period) and the expert bytes they moved, when the
    run re-places experts (else nothing, so runs without it report as before)."""
    if sim.cfg.ep_rebalance_every is None:
        return {}
    st = sim._ep_runtime()
    return {"layer_replacements": st["replacements"], "replacement_bytes": st["bytes"]}


def serving(sim: Simulation, metrics: dict) -> dict:
    """The scheduler's and the KV cache's figures, and whether TTFT is mostly queueing.

    ``ttft.queueing``: every request arrived at t = 0 (no ``arrival_rate_per_s``) and more
    of them than run at once, so a request's TTFT counts its wait for a place in the batch
    (or for KV blocks), not only its prefill; ``queue_share`` is the mean wait over the
    mean TTFT.
    """
    reqs = sim.requests
    waits = [r["queue_s"] for r in metrics["per_request"]]
    ttfts = [r["ttft_s"] for r in metrics["per_request"] if r["ttft_s"] is not None]
    mean_ttft = float(np.mean(ttfts)) if ttfts else None
    mean_wait = float(np.mean(waits)) if waits else 0.0
    phases = {"prefill": 0, "decode": 0, "mixed": 0}
    for phase, *_ in sim.steps:
        phases[phase] = phases.get(phase, 0) + 1
    closed = sim.cfg.arrival_rate_per_s is None
    return {
        "scheduler": sim.cfg.batching,
        "chunk_tokens": sim.cfg.chunk_tokens,
        "kv_cache": sim.kv.summary(sim.env.now),
        "steps": phases,
        "preempted_requests": sum(1 for r in reqs if r.preemptions),
        "ttft": {"closed_loop": closed, "mean_s": mean_ttft, "mean_queue_s": mean_wait,
                 "queue_share": mean_wait / mean_ttft if mean_ttft else None,
                 "queueing": bool(closed and mean_ttft and mean_wait > 0.0)},
    }


def _in_time_order(events: list | None) -> tuple | None:
    """The event log by time; events at the same time keep the order they were logged in."""
    if events is None:
        return None
    return tuple(sorted(events, key=lambda ev: ev[0]))
