"""One contender of ``bench_bundle_vs_accelerate``, run as a child process in its own memory cgroup.

    python benchmarks/_contenders.py --contender NAME --ckpt DIR --bundle DIR --offload DIR --result FILE ...

The parent (``bench_bundle_vs_accelerate.py``) starts it; it writes its figures to ``--result``
after every stage, so a child killed for memory still says how far it got. Contenders:

- ``bundle-*``: the exported bundle run by its runtime (``exporters.runtime``);
- ``accelerate-fp32``: transformers + accelerate ``device_map="auto"``, ``max_memory`` = the
  budget, an ``offload_folder`` for the rest, fp32 (what HF users do when a model does not fit);
- ``accelerate-torchao-int8``: the same, loading the checkpoint quantised by torchao (int8
  weight-only: attention, the output head and the fused 3-D expert tensors) and saved by the
  parent (``--ckpt`` is that checkpoint).
- ``baseline``: imports and builds the model's class on the meta device, no weights (what a
  process needs before it holds any weight: the parent adds the budget to its peak).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

from _memlimit import read_stat, reset_peak

PROMPTS = ["the cat sat on the mat", "experts route tokens through layers of a sparse model"]
MEMORY_KEYS = ("cache", "rss", "mapped_file", "file", "anon", "file_mapped")


def decode_tps(generate, ids, tokens: int) -> float:
    """Decode tokens/s: (time for ``tokens`` new tokens - time for 1) / (tokens - 1), best of 2."""
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        generate(ids, 1)
        t1 = time.perf_counter()
        generate(ids, tokens)
        t2 = time.perf_counter()
        best = min(best, ((t2 - t1) - (t1 - t0)) / (tokens - 1))
    return 1.0 / best


def import_stack():
    """What every child (and the parent, to warm the shared libraries) imports: torch,
    transformers with its quantiser registry (which imports torchao where it is installed,
    for every contender alike), onnxruntime, accelerate."""
    import accelerate  # noqa: F401 (its import is part of the baseline)
    import onnxruntime  # noqa: F401
    import torch
    import transformers
    import transformers.quantizers.auto  # noqa: F401 (from_pretrained imports it)

    transformers.utils.logging.set_verbosity_error()
    return torch, transformers


def weightless_model(ckpt: Path) -> None:
    """The checkpoint's model class built on the meta device: imports its modeling code (which
    pulls in ~1400 modules, ~100 MiB here) that every contender needs, allocates no weights."""
    torch, transformers = import_stack()
    config = transformers.AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(config)


def torchao_int8_config(transformers):
    """``TorchAoConfig``: int8 weight-only (per-channel scales) for attention, the output head
    and the fused expert tensors ``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``."""
    from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig

    patch_torchao_quantizer()
    int8 = Int8WeightOnlyConfig()
    return transformers.TorchAoConfig(FqnToConfig({r"re:.*\.self_attn\.[qkvo]_proj": int8, "lm_head": int8,
                                                   r"re:.*\.experts\.(gate_up_proj|down_proj)": int8}))


def patch_torchao_quantizer() -> None:
    """transformers 5.25 splits every name at its last dot when the config is an FqnToConfig,
    and accelerate's buffer sizing asks about a submodule's own buffer names (rotary_emb's
    "inv_freq"): ValueError. A name without a dot is no quantised weight."""
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    needs = TorchAoHfQuantizer.param_needs_quantization
    if getattr(needs, "patched", False):
        return

    def param_needs_quantization(self, model, name, **kw):
        return "." in name and needs(self, model, name, **kw)

    param_needs_quantization.patched = True
    TorchAoHfQuantizer.param_needs_quantization = param_needs_quantization


def save_torchao_int8(ckpt: Path, out: Path) -> None:
    """``ckpt`` quantised by torchao (int8 weight-only, :func:`torchao_int8_config`) and saved
    to ``out`` with its tokenizer: the contender loads int8 weights, as the bundle does, instead
    of quantising fp32 ones on load (whose fp32 layers alone pass the budget)."""
    torch, transformers = import_stack()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, quantization_config=torchao_int8_config(transformers), experts_implementation="eager",
        device_map="cpu", dtype=torch.float32)
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(ckpt).save_pretrained(out)


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the model's parameters by device (a torchao tensor: its data and scales)."""
    out: dict[str, int] = {}
    for p in model.parameters():
        parts = [getattr(p, n) for n in p.__tensor_flatten__()[0]] if hasattr(p, "__tensor_flatten__") else [p]
        key = str(p.device)
        out[key] = out.get(key, 0) + sum(t.numel() * t.element_size() for t in parts)
    return out


def _cpu_ticks() -> tuple[int, int] | None:
    """Machine-wide (busy, iowait) CPU ticks from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v[:8]) - v[3] - v[4], v[4]
    except (OSError, ValueError, IndexError):
        return None


def _io_snapshot(cgroup: str | None) -> dict:
    """Bytes this process read from storage, its major faults and CPU time, the machine's CPU
    ticks (to tell whether others competed for the cores), its cgroup's file refaults."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    snap = {"major_faults": ru.ru_majflt, "cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": time.perf_counter(),
            "ticks": _cpu_ticks()}
    try:
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        snap["read_bytes"] = int(io["read_bytes"])
    except (OSError, KeyError, ValueError):
        snap["read_bytes"] = None
    if cgroup:
        try:
            s = read_stat(cgroup)
            snap["cgroup"] = {k: s[k] for k in (*MEMORY_KEYS, "pgmajfault", "workingset_refault_file",
                                                "workingset_refault") if k in s}
        except (OSError, ValueError):
            pass
    return snap


def _delta(before: dict, after: dict) -> dict:
    delta = {"read_bytes": None if before["read_bytes"] is None else after["read_bytes"] - before["read_bytes"],
             "major_faults": after["major_faults"] - before["major_faults"],
             "wall_s": after["wall_s"] - before["wall_s"], "own_cpu_s": after["cpu_s"] - before["cpu_s"]}
    if before["ticks"] and after["ticks"]:
        hz = os.sysconf("SC_CLK_TCK")
        busy = (after["ticks"][0] - before["ticks"][0]) / hz
        delta["machine_busy_cpu_s"] = busy
        delta["others_cpu_s"] = max(0.0, busy - delta["own_cpu_s"])  # other processes on this machine
        delta["machine_iowait_s"] = (after["ticks"][1] - before["ticks"][1]) / hz
    for k in ("pgmajfault", "workingset_refault_file", "workingset_refault"):
        if k in before.get("cgroup", {}) and k in after.get("cgroup", {}):
            delta[f"cgroup_{k}" + ("_pages" if "refault" in k else "")] = after["cgroup"][k] - before["cgroup"][k]
    return delta


def _cgroup_file(cgroup: str | None, name: str) -> int | None:
    try:
        return int((Path(cgroup) / name).read_text()) if cgroup else None
    except (OSError, ValueError):
        return None


def run_contender(args: argparse.Namespace) -> None:
    """One contender (or the baseline); its figures go to ``args.result`` after every stage."""
    state: dict = {"contender": args.contender, "pid": os.getpid()}
    cg = args.cgroup or None
    v1 = bool(cg) and (Path(cg) / "memory.max_usage_in_bytes").exists()
    peak_name, usage_name = ("memory.max_usage_in_bytes", "memory.usage_in_bytes") if v1 else \
        ("memory.peak", "memory.current")

    def save(stage: str, **figures) -> None:
        state.update(figures, stage=stage, usage_at_last_stage_bytes=_cgroup_file(cg, usage_name))
        tmp = args.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(args.result)

    save("importing", loadavg_at_start=os.getloadavg())
    torch, transformers = import_stack()
    tok = transformers.AutoTokenizer.from_pretrained(args.ckpt)
    (torch.ones(64, 64) @ torch.ones(64, 64)).sum().item()
    if args.contender == "baseline":
        weightless_model(args.ckpt)
        save("done", memory_at_end={k: v for k, v in _io_snapshot(cg).get("cgroup", {}).items() if k in MEMORY_KEYS})
        return
    warm_ids, ids = tok(PROMPTS[0])["input_ids"], tok(PROMPTS[1])["input_ids"]
    save("loading")
    t = time.perf_counter()
    rt = None
    if args.contender.startswith("bundle"):
        from exporters.runtime import load_planned_model

        rt = load_planned_model(args.bundle / "plan.json", args.ckpt, kernels_dir=args.bundle / "kernels",
                                device="cpu")

        def generate(i, n):
            return rt.generate(i, n)
    else:
        extra = {}
        if args.contender == "accelerate-torchao-int8":  # torchao's int8 tensors need the eager expert loop
            patch_torchao_quantizer()
            extra = {"experts_implementation": "eager"}
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            args.ckpt, device_map="auto", max_memory={"cpu": f"{args.budget_mib:.0f}MiB"},
            offload_folder=str(args.offload), dtype=torch.float32, **extra)
        hf.eval()
        placed = list(map(str, getattr(hf, "hf_device_map", {"": "cpu"}).values()))
        state["device_map_counts"] = {d: placed.count(d) for d in sorted(set(placed))}
        state["weight_bytes"] = weight_bytes(hf)

        def generate(i, n):
            with torch.no_grad():
                out = hf.generate(torch.tensor([i]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return out[0, len(i):].tolist()
    save("warm-up", load_s=time.perf_counter() - t, peak_load_bytes=_cgroup_file(cg, peak_name))
    generate(warm_ids, 4)
    state["peak_until_decode_bytes"] = _cgroup_file(cg, peak_name)
    state["peak_reset_before_decode"] = bool(cg) and reset_peak(cg)
    before = _io_snapshot(cg)
    save("decode")
    tps = decode_tps(generate, ids, args.tokens)
    after = _io_snapshot(cg)
    save("tokens", decode_tokens_per_s=tps, during_decode=_delta(before, after),
         decode_generate_calls=f"2 x (1 + {args.tokens}) new tokens",
         memory_at_end_of_decode={k: v for k, v in after.get("cgroup", {}).items() if k in MEMORY_KEYS})
    tokens = generate(ids, args.tokens)
    if rt is not None:
        rt.close()
    save("done", tokens=tokens, loadavg_at_end=os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contender", required=True)
    for flag in ("--ckpt", "--bundle", "--offload", "--result"):
        ap.add_argument(flag, type=Path)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--budget-mib", type=float, default=300.0)
    ap.add_argument("--cgroup", default="")
    run_contender(ap.parse_args())


if __name__ == "__main__":
    main()
