"""What a bundle's runtime holds, by component, measured in its own process (no cgroup needed).

    python -m exporters.runtime_memory --plan plan.json --checkpoint CKPT [--kernels DIR] [--tokens 8]

prints one JSON object (the run's stages and components; see :func:`measure`).

What it measures: the process's resident set (``VmRSS``) and its peak (``VmHWM``, reset at
each stage through ``/proc/self/clear_refs``) from ``/proc/self/status``, Linux only. That is
the anonymous memory and the file pages *mapped* into the process (libraries, memory maps),
not the page cache of files read with ``read()``/``O_DIRECT`` (the runtime's expert reads),
so it is what the process needs to run, not what a cgroup would also charge it for cached
files. The **baseline** is the process after importing what every runtime imports (torch,
transformers, onnxruntime, the runtime), building the checkpoint's model class on the meta
device (its modeling code, no weights) and one small matmul: the same baseline the
bundle-vs-accelerate benchmark subtracts. Everything after it is the runtime's.

Components are counted from the runtime's own objects where they are torch tensors
(dense weights, resident experts, cache slots) and from the config (KV cache at the tokens
held); what the ONNX Runtime sessions hold (int8/int4 weights on a CPU), the allocator's and
libraries' slack and the transients of a step (staged experts, activations) are differences
of resident sets: ``transient`` = a stage's peak - its resident set at the end, ``untracked``
= the resident set above the baseline - the tensors counted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["AnonSampler", "process_memory", "reset_peak", "measure", "held_tensors", "main"]

PROMPT = list(range(3, 19))  # 16 prompt tokens (a prefill step that routes to many experts)


_STATUS = {"VmRSS": "rss_bytes", "VmHWM": "peak_bytes", "RssAnon": "anon_bytes", "RssFile": "file_bytes"}


def process_memory() -> dict[str, int]:
    """``{"rss_bytes", "peak_bytes", "anon_bytes", "file_bytes"}``: this process's VmRSS, VmHWM,
    RssAnon and RssFile (Linux)."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _STATUS:
                out[_STATUS[key]] = int(value.split()[0]) * 1024
    return out


class AnonSampler:
    """The largest anonymous resident set (``/proc/self/statm``: resident less shared pages)
    seen by a thread that reads it every ``interval_s``: a lower bound of the anonymous peak
    (a shorter peak between two reads is missed), where :func:`measure`'s HWM figure is an
    upper bound."""

    def __init__(self, interval_s: float = 0.001) -> None:
        import os
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, name="anon-sampler", daemon=True)
        self._thread.start()

    def anon_bytes(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * self.page

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.anon_bytes())

    def take(self) -> int:
        """The peak since the last take (or the start), and start anew."""
        peak, self.peak = max(self.peak, self.anon_bytes()), 0
        return peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def reset_peak() -> bool:
    """Reset VmHWM to the current VmRSS (``echo 5 > /proc/self/clear_refs``); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def held_tensors(rt) -> dict[str, int]:
    """Bytes of the torch tensors a :class:`PlannedRuntime` holds, by component: the dense
    weights (the model's parameters and buffers), resident experts and ready cache slots
    (their tensors; an int8/int4 expert a CPU runs lives in its ONNX Runtime session instead,
    which is not a tensor and is not counted here)."""
    dense = _bytes([*rt.model.parameters(), *rt.model.buffers()])
    resident = _bytes(t for store in rt.stores for w in store.resident.values() for t in w.tensors.values())
    slots = _bytes(t for store in rt.stores for slot in store.slots.values() if slot.ready
                   for t in slot.get().tensors.values())
    in_sessions = sum(1 for store in rt.stores for slot in store.slots.values() if slot.ready
                      and slot.get().kernel is not None)
    return {"dense_weights": dense, "resident_experts": resident, "cache_slots": slots,
            "cache_slots_in_onnx_sessions": in_sessions}


def _kv_bytes(config: dict, tokens: int, element_bytes: int) -> int:
    """KV cache bytes of ``tokens`` tokens (every layer's keys and values)."""
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * heads * head_dim * tokens * element_bytes


def measure(plan: str | Path, checkpoint: str | Path, kernels_dir: str | Path | None = None, tokens: int = 8,
            threads: int | None = None) -> dict[str, Any]:
    """Load the plan's runtime, prefill a 16-token prompt, decode ``tokens`` tokens; the memory
    of each stage above the baseline and the components (see the module docstring)."""
    import torch
    import transformers

    import exporters.runtime as runtime

    importlib.import_module("onnxruntime")  # part of the baseline, as in the benchmark's
    checkpoint = Path(checkpoint)
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(config)
    (torch.ones(64, 64) @ torch.ones(64, 64)).sum().item()
    base = process_memory()
    peak_resets = reset_peak()
    sampler = AnonSampler()
    sampler.take()
    stages: dict[str, dict[str, int]] = {}
    before = dict(base)

    def stage(name: str) -> None:
        now = process_memory()
        stages[name] = {"rss_above_baseline_bytes": now["rss_bytes"] - base["rss_bytes"],
                        "anon_above_baseline_bytes": now["anon_bytes"] - base["anon_bytes"],
                        "file_above_baseline_bytes": now["file_bytes"] - base["file_bytes"],
                        "peak_above_baseline_bytes": now["peak_bytes"] - base["rss_bytes"],
                        # an upper bound of the anonymous peak: mapped file pages only grow within a stage
                        "anon_peak_above_baseline_bytes": now["peak_bytes"] - before["file_bytes"]
                        - base["anon_bytes"],
                        "sampled_anon_peak_above_baseline_bytes": sampler.take() - base["anon_bytes"]}
        before.update(now)
        reset_peak()

    rt = runtime.load_planned_model(plan, checkpoint, kernels_dir=kernels_dir, device="cpu", threads=threads)
    try:
        stage("load")
        rt.generate(PROMPT, 1)
        stage("prefill")
        rt.generate(PROMPT, tokens)
        stage("decode")
        held = held_tensors(rt)
        dtype_bytes = next(rt.model.parameters()).element_size()
    finally:
        rt.close()
        sampler.close()
    kv = _kv_bytes(config.to_dict(), len(PROMPT) + tokens, dtype_bytes)
    end = stages["decode"]["anon_above_baseline_bytes"]
    counted = held["dense_weights"] + held["resident_experts"] + held["cache_slots"] + kv
    steps_peak = max(stages[s]["anon_peak_above_baseline_bytes"] for s in ("prefill", "decode"))
    return {"what": "VmRSS/VmHWM of this process above its baseline (imports, the model class on the meta "
                    "device, a 64x64 matmul), from /proc/self/status; peaks reset per stage by /proc/self/clear_refs",
            "baseline": base, "peak_resets": peak_resets, "stages": stages,
            "peak_above_baseline_bytes": max(s["peak_above_baseline_bytes"] for s in stages.values()),
            "anon_peak_above_baseline_bytes": max(s["anon_peak_above_baseline_bytes"] for s in stages.values()),
            "sampled_anon_peak_above_baseline_bytes": max(s["sampled_anon_peak_above_baseline_bytes"]
                                                          for s in stages.values()),
            "components": {**{k + "_bytes" if not k.endswith("sessions") else k: v for k, v in held.items()},
                           "kv_cache_bytes": kv,
                           "step_transient_bytes": steps_peak - end,
                           "load_transient_bytes": stages["load"]["anon_peak_above_baseline_bytes"]
                           - stages["load"]["anon_above_baseline_bytes"],
                           "untracked_bytes": end - counted}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--kernels", default=None)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    json.dump(measure(args.plan, args.checkpoint, args.kernels, args.tokens, args.threads), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
