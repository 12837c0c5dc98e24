"""A planned bundle vs transformers + accelerate offloading, under the same memory budget.

A Mixtral-shaped random checkpoint (fp32, larger than the budget) is
1. planned against this machine's probed profile with its memory cut to the budget, exported
   as a bundle and run by the bundle's runtime;
2. loaded by transformers with accelerate's ``device_map="auto"``, ``max_memory`` = the budget
   and an ``offload_folder`` for the rest (what HF users do when a model does not fit).
Both generate the same greedy tokens for the same prompts after a warm-up; decode tok/s of
each and their ratio go to JSON (target: bundle >= 2x accelerate). Everything runs on the CPU.

How the budget is enforced: each contender runs in a child process (this script with the
hidden ``--contender``) inside its own fresh memory cgroup (``_memlimit``), joined before the
interpreter imports anything, whose limit covers its anonymous memory *and* the page cache it
faults in. Without that, "offloaded to disk" files would sit in this machine's page cache and
accelerate's disk reads would be memory reads. The limit, the same for both, is
``budget + baseline`` (``--headroom-mib`` adds the same to both): the baseline is the peak of a
third child in an unlimited cgroup that imports torch, transformers, onnxruntime and
accelerate, loads the tokenizer, runs a tiny matmul and builds the model's class on the meta
device (its modeling code, ~100 MiB of imports here, no weights): what a process needs before
it holds any weight. Before each child starts, the pages of
the checkpoint, the bundle and the offload folder are evicted from the page cache
(``posix_fadvise(DONTNEED)``), so none starts warm with pages charged elsewhere. Shared
libraries this parent already loaded stay cached and are charged to no child (alike for
the baseline and both contenders). A contender killed by the OOM killer is recorded as such.

Needs Linux, root (or a delegated cgroup) and the cgroup v1 ``memory`` controller or cgroup
v2 with ``memory`` enabled; without them (or with ``--no-limit``) the children run unlimited
and the JSON says ``"budget_enforced": false`` and why.

    pip install accelerate   # not a dependency of moe-planner
    sudo python benchmarks/bench_bundle_vs_accelerate.py [--budget-mib 300] [--tokens 24]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _memlimit import (
    CgroupUnavailable,
    MemCgroup,
    cached_bytes,
    drop_file_cache,
    read_stat,
    reset_peak,
)
from _provenance import ROOT, provenance

PROMPTS = ["the cat sat on the mat", "experts route tokens through layers of a sparse model"]
SHAPE = {"hidden_size": 768, "intermediate_size": 1536, "num_hidden_layers": 8}
CONTENDERS = ("bundle", "accelerate")


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


# ----------------------------------------------------------------------------- child side

def _import_stack():
    """What every child (and this parent, to warm the shared libraries) imports."""
    import accelerate  # noqa: F401 (its import is part of the baseline)
    import onnxruntime  # noqa: F401
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    return torch, transformers


def _weightless_model(ckpt: Path) -> None:
    """The checkpoint's model class built on the meta device: imports its modeling code (which
    pulls in ~1400 modules, ~100 MiB here) that both contenders need, allocates no weights."""
    torch, transformers = _import_stack()
    config = transformers.AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(config)


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
            snap["cgroup"] = {k: s[k] for k in ("cache", "rss", "mapped_file", "file", "anon", "file_mapped",
                                                "pgmajfault", "workingset_refault_file", "workingset_refault")
                              if k in s}
        except (OSError, ValueError):
            pass
    return snap


def _cgroup_file(cgroup: str | None, name: str) -> int | None:
    try:
        return int((Path(cgroup) / name).read_text()) if cgroup else None
    except (OSError, ValueError):
        return None


def run_contender(args: argparse.Namespace) -> None:
    """Child: one contender (or the baseline); its figures go to ``args.result`` after every stage."""
    state: dict = {"contender": args.contender, "pid": os.getpid()}
    cg = args.cgroup or None
    peak_name = "memory.max_usage_in_bytes" if cg and (Path(cg) / "memory.max_usage_in_bytes").exists() \
        else "memory.peak"

    def save(stage: str, **figures) -> None:
        state.update(figures, stage=stage, usage_at_last_stage_bytes=_cgroup_file(
            cg, "memory.usage_in_bytes" if peak_name == "memory.max_usage_in_bytes" else "memory.current"))
        tmp = args.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(args.result)

    save("importing", loadavg_at_start=os.getloadavg())
    torch, transformers = _import_stack()
    tok = transformers.AutoTokenizer.from_pretrained(args.ckpt)
    (torch.ones(64, 64) @ torch.ones(64, 64)).sum().item()
    if args.contender == "baseline":
        _weightless_model(args.ckpt)
        save("done")
        return
    warm_ids, ids = tok(PROMPTS[0])["input_ids"], tok(PROMPTS[1])["input_ids"]
    save("loading")
    t = time.perf_counter()
    rt = None
    if args.contender == "bundle":
        from exporters.runtime import load_planned_model

        rt = load_planned_model(args.bundle / "plan.json", args.ckpt, kernels_dir=args.bundle / "kernels",
                                device="cpu")

        def generate(i, n):
            return rt.generate(i, n)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            args.ckpt, device_map="auto", max_memory={"cpu": f"{args.budget_mib:.0f}MiB"},
            offload_folder=str(args.offload), dtype=torch.float32)
        hf.eval()
        state["device_map_counts"] = {str(d): list(hf.hf_device_map.values()).count(d)
                                      for d in sorted(set(map(str, hf.hf_device_map.values())))}

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
    save("tokens", decode_tokens_per_s=tps, during_decode=delta,
         decode_generate_calls=f"2 x (1 + {args.tokens}) new tokens",
         memory_at_end_of_decode={k: v for k, v in after.get("cgroup", {}).items()
                                  if k in ("cache", "rss", "mapped_file", "file", "anon", "file_mapped")})
    tokens = generate(ids, args.tokens)
    if rt is not None:
        rt.close()
    save("done", tokens=tokens, loadavg_at_end=os.getloadavg())


# ----------------------------------------------------------------------------- parent side

def _spawn(name: str, args: argparse.Namespace, paths: dict, limit: int | None, cgroups: bool) -> dict:
    """Run one child (in a fresh cgroup limited to ``limit`` when ``cgroups``); its result plus
    what the cgroup saw."""
    work = paths["work"]
    result, log = work / f"{name}.result.json", work / f"{name}.log"
    result.unlink(missing_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "--contender", name, "--ckpt", str(paths["ckpt"]),
            "--bundle", str(paths["bundle"]), "--offload", str(paths["offload"]), "--result", str(result),
            "--tokens", str(args.tokens), "--budget-mib", str(args.budget_mib)]
    watched = [paths["ckpt"], paths["bundle"], paths["offload"]]
    drop_file_cache(watched)
    entry: dict = {"cache_at_start_bytes": cached_bytes(watched)}
    cg = None
    if cgroups:
        try:
            cg = MemCgroup(f"bench-{name}", limit)
        except CgroupUnavailable as exc:
            raise SystemExit(f"the memory cgroup for {name} failed after the others worked: {exc}") from None
        argv = cg.command([*argv, "--cgroup", str(cg.path)])
    t = time.perf_counter()
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                rc = proc.wait(timeout=args.child_timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                proc.kill()
                rc, timed_out = proc.wait(), True
            except BaseException:  # interrupted: end the child before its cgroup goes
                proc.kill()
                proc.wait()
                raise
        entry["wall_s"] = time.perf_counter() - t
        child = json.loads(result.read_text()) if result.exists() else {}
        entry.update({k: v for k, v in child.items() if k not in ("contender", "pid")})
        entry["returncode"] = rc
        if cg is not None:
            peak = cg.peak()
            if entry.get("peak_reset_before_decode"):  # cg.peak() is since the decode began
                entry["peak_decode_bytes"] = peak
                peak = max(peak, entry.get("peak_until_decode_bytes") or 0)
            entry.update(cgroup=cg.path.name, limit_bytes=limit, peak_bytes=peak, failcnt=cg.failcnt(),
                         oom_kills=cg.oom_kills())
            if limit is not None and peak is not None and peak >= limit and not entry["failcnt"]:
                entry["failcnt_note"] = "0 although usage reached the limit: this kernel does not count it"
    finally:
        if cg is not None:
            cg.remove()
    if timed_out:
        entry["outcome"] = f"timeout after {args.child_timeout}s (killed) in stage {child.get('stage')}"
    elif rc == 0 and child.get("stage") == "done":
        entry["outcome"] = "ok"
    elif entry.get("oom_kills") or (rc == -9 and limit is not None):
        entry["outcome"] = f"oom-killed in stage {child.get('stage')}: over {limit} bytes"
    else:
        entry["outcome"] = f"failed (exit {rc}) in stage {child.get('stage')}"
    if entry["outcome"] != "ok":
        entry["log_tail"] = log.read_text(errors="replace")[-3000:]
    tps = entry.get("decode_tokens_per_s")
    peak = entry.get("peak_bytes")
    print(f"  {name}: {entry['outcome']}" + (f", peak {peak} bytes" if peak else "")
          + (f", {tps:.2f} tok/s" if tps else ""), flush=True)
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-mib", type=float, default=300.0, help="memory for weights, MiB")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--work", type=Path, default=None, help="keep the checkpoint and bundle here")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bundle_vs_accelerate.json")
    ap.add_argument("--no-limit", action="store_true", help="run the children without a memory limit (comparison)")
    ap.add_argument("--headroom-mib", type=float, default=0.0,
                    help="added to both contenders' limit (budget + baseline + this); 0: the budget as is")
    ap.add_argument("--child-timeout", type=float, default=1800.0, help="seconds before a contender is killed")
    # the child side (one contender per process, see the module docstring)
    ap.add_argument("--contender", choices=("baseline", *CONTENDERS), help=argparse.SUPPRESS)
    for flag in ("--ckpt", "--bundle", "--offload", "--result"):
        ap.add_argument(flag, type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cgroup", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.contender:
        run_contender(args)
        return
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench-bundle-"))).resolve()
    try:
        compare(args, work)
    finally:
        if args.work is None:  # a temporary checkpoint, bundle and offload folder (~2 GB)
            shutil.rmtree(work, ignore_errors=True)


def compare(args: argparse.Namespace, work: Path) -> None:
    """Plan and export the bundle, measure the baseline, run both contenders, write the JSON."""
    from _machine import probed_profile

    from exporters.bundle import write_bundle
    from exporters.checkpoints import make_random_checkpoint
    from planner.costs import Setup
    from planner.optimize import OptimizeRequest, optimize
    from profiles.models import load_model

    _import_stack()
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        make_random_checkpoint("mixtral", ckpt, **SHAPE)
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    # 1. this machine, measured; its memory cut so that the planner has `budget` for weights
    # the CPU computes, so the planner keeps its compute-device reserve free (Setup.device_reserve):
    # size the memory so that exactly the budget is left for weights, KV cache and workspace
    frac, fixed = Setup.__dataclass_fields__["device_reserve"].default
    memory = (fixed + args.budget_mib * 2**20) / (1 - frac)
    profile_path, profile, hw, _ = probed_profile(work, f"{memory:.0f}B", "budget.yaml")
    model = load_model(ckpt / "config.json")
    t = time.perf_counter()
    plan = optimize(OptimizeRequest(hardware=str(profile_path), model=str(ckpt / "config.json"),
                                    context_tokens=512)).plan
    plan_s = time.perf_counter() - t
    bundle = write_bundle(plan, model=model, hardware=hw, profile=profile, out_dir=work / "bundle", checkpoint=ckpt,
                          force=True).path
    paths = {"work": work, "ckpt": ckpt, "bundle": bundle, "offload": work / "offload"}
    _weightless_model(ckpt)  # the libraries every child maps are now cached (charged to no child)
    budget = int(args.budget_mib * 2**20)

    # 2. the budget: budget + baseline per child cgroup, or why not
    try:  # with --no-limit, unlimited cgroups still measure each child's peak
        check = MemCgroup("bench-check")
        cgroups, version, why_not = True, check.version, "--no-limit" if args.no_limit else None
        check.remove()
    except CgroupUnavailable as exc:
        cgroups, version, why_not = False, None, str(exc)
    enforce = cgroups and not args.no_limit
    baseline = _spawn("baseline", args, paths, None, cgroups)
    if baseline["outcome"] != "ok":
        raise SystemExit(f"the baseline child failed: {baseline.get('log_tail')}")
    headroom = int(args.headroom_mib * 2**20)
    limit = budget + baseline["peak_bytes"] + headroom if enforce else None
    print(f"limit {limit} bytes = budget {budget} + baseline {baseline['peak_bytes']} + headroom {headroom}"
          if enforce else f"no memory limit: {why_not}", flush=True)
    # 3. the contenders, each in its own cgroup with the same limit
    shutil.rmtree(paths["offload"], ignore_errors=True)
    runs = {}
    for name in CONTENDERS:
        runs[name] = _spawn(name, args, paths, limit, cgroups)
    ours, theirs = (runs[n].get("decode_tokens_per_s") if runs[n]["outcome"] == "ok" else None for n in CONTENDERS)
    ours_tokens, theirs_tokens = (runs[n].get("tokens") for n in CONTENDERS)
    for r in runs.values():
        r.pop("tokens", None)
    result = {"provenance": provenance(("numpy", "torch", "transformers", "accelerate", "onnxruntime")),
              "checkpoint": {"shape": SHAPE, "bytes": ckpt_bytes, "dtype": "fp32"},
              "budget_bytes": budget, "plan": {"sites": plan.counts()["site"],
                                               "formats": plan.counts()["format"], "dense_format": plan.dense_format,
                                               "plan_s": plan_s},
              "budget_enforced": enforce,
              "budget_not_enforced_because": why_not,
              "memory_limit": {
                  "mechanism": (f"one memory cgroup (v{version}) per child, limit = budget + baseline + "
                                "headroom, the same for both; their files evicted from the page cache before each "
                                "child" if enforce else "none: the children ran without a limit, the page cache "
                                "can hold the offloaded files" + (" (unlimited cgroups measured their peaks)"
                                                                  if cgroups else "")),
                  "limit_bytes": limit, "baseline_bytes": baseline.get("peak_bytes"),
                  "headroom_bytes": headroom if enforce else None,
                  "reading": "a contender's peak reaches the limit whenever the page cache fills the room left "
                             "(reclaimable); memory_at_end_of_decode (rss: anonymous, cache: page cache) and "
                             "during_decode.read_bytes (bytes read from the disk while decoding) tell what it held",
                  "baseline": {"what": "peak of an unlimited child importing torch, transformers, onnxruntime, "
                                       "accelerate, loading the tokenizer, one 64x64 matmul, and building the "
                                       "checkpoint's model class on the meta device (its modeling code, no weights)",
                               **{k: baseline.get(k) for k in ("peak_bytes", "wall_s")}}},
              "contenders": runs,
              "bundle_decode_tokens_per_s": ours, "accelerate_decode_tokens_per_s": theirs,
              "ratio": ours / theirs if ours and theirs else None,
              "target_ratio": 2.0,
              "same_tokens_as_accelerate": (ours_tokens == theirs_tokens) if ours_tokens and theirs_tokens else None,
              "note": "the plan quantises cold experts (int8/int4 within the quality budget); accelerate runs "
                      "fp32, so greedy tokens can differ"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    print(f"bundle {fmt(ours)} tok/s ({runs['bundle']['outcome']}), accelerate {fmt(theirs)} tok/s "
          f"({runs['accelerate']['outcome']}), ratio {fmt(result['ratio'])}x, budget enforced: {enforce} "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
