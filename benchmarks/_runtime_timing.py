"""Where a bundle run's time goes, measured in its own process, set against the priced terms.

:class:`StepTimer` wraps the runtime's methods (a profiler with a handful of named probes, no
change to what runs) while ``planner verify`` runs a bundle in this process, and sums the
seconds each part takes per phase (prefill, decode), leaving out each load's warm-up prompt
as ``verify`` does. Parts (main thread unless said):

- ``step``: the whole forward step (``metrics.ttft_s`` / ``tpot_s``);
- ``moe_layers``: the MoE blocks' expert stores (``PlannedExperts.forward``); ``dense`` is
  ``step - moe_layers`` (attention, router, norms, head, the model's Python);
- ``expert_calls``: the expert kernels (``_compute``: a cached expert's own ONNX Runtime
  session; ``_run_cpu``: the layer session of resident CPU experts), with their tokens and
  whether each ran from the cache (its own session, priced at the engine's ``cached_efficiency``);
- ``miss_wait``: waiting for a copy (``Slot.get`` of a slot not ready when asked);
- ``moe_bookkeeping``: ``moe_layers - expert_calls - miss_wait`` (routing, indexing, sums);
- ``miss_read`` / ``miss_ready`` (copy worker): reading a missed expert from disk, and making
  it ready to compute (an ONNX Runtime session built over its weights), per miss.

:func:`priced_components` prices the same counts with :mod:`profiles.perf` on the hardware
seen through the engine: the dense step (roofline + per-layer, per-token, per-dense-linear and
per-step framework costs), one expert call per measured call at its token count (a cached
expert's at the cached experts' price), one disk-to-host copy per miss.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

__all__ = ["StepTimer", "priced_components"]


class StepTimer:
    """Install with ``with StepTimer() as timer:``; read ``timer.per_step()`` after each run
    (``timer.reset()`` between runs)."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)  # (phase, part) -> s
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        # phase -> (tokens, from the cache) of every expert call
        self.call_tokens: dict[str, list[tuple[int, bool]]] = defaultdict(list)
        self.steps = {"prefill": 0, "decode": 0}
        self._phase = "prefill"
        self._skip = False

    # -- installing --------------------------------------------------------------------

    def __enter__(self) -> StepTimer:
        from exporters.runtime import prefetch, runtime, store

        self._wrap(store.PlannedExperts, "forward", "moe_layers")
        self._wrap(store.PlannedExperts, "_compute", "expert_calls",  # (self, weights, x): cached if not resident
                   tokens=lambda args: [(int(args[2].shape[0]), args[1] not in args[0].resident.values())])
        self._wrap(store.PlannedExperts, "_run_cpu", "expert_calls",
                   tokens=lambda args: [(int(x.shape[0]), False) for x in args[1].values()])
        self._wrap(store.PlannedExperts, "_ready", "miss_ready")
        self._wrap(store.ExpertHome, "read", "miss_read")
        self._wrap_get(prefetch.Slot)
        self._wrap_generate(runtime.PlannedRuntime)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()

    def _add(self, part: str, seconds: float, n: int = 1) -> None:
        if not self._skip:
            self.seconds[(self._phase, part)] += seconds
            self.counts[(self._phase, part)] += n

    def _wrap(self, owner, name: str, part: str, tokens=None) -> None:
        fn = getattr(owner, name)
        self._saved.append((owner, name, fn))
        timer = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - start
                if tokens is not None and not timer._skip:
                    timer.call_tokens[timer._phase] += tokens(args)
                worker = threading.current_thread() is not threading.main_thread()
                # reads on the main thread are loads (host tier at start-up), not misses
                if part.startswith("miss_") == worker:
                    timer._add(part, seconds, len(tokens(args)) if tokens else 1)

        setattr(owner, name, timed)

    def _wrap_get(self, slot_cls) -> None:
        fn = slot_cls.get
        self._saved.append((slot_cls, "get", fn))
        timer = self

        def get(slot):
            if slot.ready:
                return fn(slot)
            start = time.perf_counter()
            try:
                return fn(slot)
            finally:
                timer._add("miss_wait", time.perf_counter() - start)

        slot_cls.get = get

    def _wrap_generate(self, rt_cls) -> None:
        fn = rt_cls.generate
        self._saved.append((rt_cls, "generate", fn))
        timer, seen = self, set()

        def generate(rt, *args, **kwargs):
            timer._skip = id(rt) not in seen  # the first prompt of each load: verify's warm-up
            seen.add(id(rt))
            metrics, setattr_ = rt.metrics, type(rt.metrics).__setattr__
            ttft, tpot = len(metrics.ttft_s), len(metrics.tpot_s)
            timer._phase = "prefill"
            phases = _PhaseWatch(metrics, timer)
            try:
                return fn(rt, *args, **kwargs)
            finally:
                phases.close(setattr_)
                if not timer._skip:
                    timer.seconds[("prefill", "step")] += sum(metrics.ttft_s[ttft:])
                    timer.seconds[("decode", "step")] += sum(metrics.tpot_s[tpot:])
                    timer.steps["prefill"] += len(metrics.ttft_s) - ttft
                    timer.steps["decode"] += len(metrics.tpot_s) - tpot
                timer._skip = False

        rt_cls.generate = generate

    # -- reading -------------------------------------------------------------------------

    def per_step(self) -> dict[str, dict[str, Any]]:
        """phase -> {part: seconds per step, ..., "per_miss": {...}, "calls_per_step", "steps"}."""
        out: dict[str, dict[str, Any]] = {}
        for phase, steps in self.steps.items():
            if not steps:
                continue
            s = {part: self.seconds[(phase, part)] / steps
                 for part in ("step", "moe_layers", "expert_calls", "miss_wait", "miss_read", "miss_ready")}
            s["dense"] = s["step"] - s["moe_layers"]
            s["moe_bookkeeping"] = s["moe_layers"] - s["expert_calls"] - s["miss_wait"]
            misses = self.counts[(phase, "miss_ready")]
            out[phase] = {"seconds_per_step": s, "steps": steps,
                          "expert_calls_per_step": self.counts[(phase, "expert_calls")] / steps,
                          "misses_per_step": misses / steps,
                          "per_miss_s": {p: self.seconds[(phase, p)] / misses for p in ("miss_read", "miss_ready")}
                          if misses else None}
        return out


class _PhaseWatch:
    """Follows ``metrics.phase`` (the runtime sets it to prefill, then decode) into the timer."""

    def __init__(self, metrics, timer: StepTimer) -> None:
        cls = type(metrics)
        self._cls, self._orig = cls, cls.__setattr__

        def setattr_(obj, name, value, orig=self._orig):
            if name == "phase" and obj is metrics:
                timer._phase = value
            orig(obj, name, value)

        cls.__setattr__ = setattr_

    def close(self, _unused=None) -> None:
        self._cls.__setattr__ = self._orig


def priced_components(hw, model, plan, measured: dict[str, dict[str, Any]], call_tokens: dict[str, list[int]],
                      prompt_tokens: float, kv_bytes: dict[str, float]) -> dict[str, dict[str, float]]:
    """The planner's prices of the counts ``measured`` (from :meth:`StepTimer.per_step`), per step.

    Args:
        hw: hardware seen through the engine (``Engine.apply``).
        model, plan: the run's model spec and plan.
        call_tokens: phase -> (tokens, from the cache) of every expert call the run made.
        prompt_tokens: mean prompt length (the prefill step's tokens).
        kv_bytes: phase -> mean KV bytes a step reads.
    """
    from profiles.perf import ATTENTION_LINEARS, _kernel_s, dense_step_s, expert_call_s, miss_compute_s, token_layer_s

    cpu = hw.devices[plan.compute_device] if plan.compute_device in hw.devices else \
        next(d for d in hw.devices.values() if d.kind == "cpu")
    fmt = plan.layers[0].format[0]
    n_bytes, flops = model.expert_bytes(fmt), model.expert_flops_per_token
    disk = next(m for m, mem in hw.memories.items() if mem.tier == "nvme")
    copy_s = hw.route(disk, hw.memory_of(cpu.id).id).transfer_s(n_bytes)
    out = {}
    for phase, m in measured.items():
        steps, tokens = m["steps"], (prompt_tokens if phase == "prefill" else 1)
        calls = call_tokens.get(phase, [])
        dense = dense_step_s(cpu, model, plan.dense_format, int(round(tokens)), kv_bytes[phase],
                             prefill=phase == "prefill")
        framework = model.num_hidden_layers * (cpu.layer_overhead_s + token_layer_s(cpu, tokens)) + (
            cpu.prefill_step_overhead_s if phase == "prefill" else cpu.step_overhead_s) + (
            model.num_hidden_layers * ATTENTION_LINEARS + 1) * cpu.dense_linear_host_s.get(plan.dense_format, 0.0)
        call_s = sum(expert_call_s(cpu, fmt, n_bytes, flops * n, n, cached=c) for n, c in calls) / steps
        kernel_s = sum(_kernel_s(cpu, fmt, n_bytes, flops * n, n, cached=c) for n, c in calls) / steps
        out[phase] = {"dense": dense, "dense_framework": framework, "expert_calls": kernel_s,
                      "moe_bookkeeping": call_s - kernel_s, "miss_wait": m["misses_per_step"] * copy_s,
                      "per_miss_s": copy_s, "per_miss_cpu_s": miss_compute_s(cpu, cpu, n_bytes)}
        out[phase]["step"] = dense + call_s + out[phase]["miss_wait"]
    return out
