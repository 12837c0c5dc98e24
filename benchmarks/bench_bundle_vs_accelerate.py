"""A planned bundle vs transformers + accelerate offloading, under the same memory budget.

A Mixtral-shaped random checkpoint (fp32, larger than the budget) is run by five contenders,
each in a child process (``_contenders.py``) with the same enforced memory limit:

- ``bundle-fp32``: planned against this machine's probed profile with its memory cut to the
  budget, every weight at fp32 (``--formats fp32``), exported and run by the bundle runtime;
- ``accelerate-fp32``: transformers with accelerate's ``device_map="auto"``, ``max_memory`` =
  the budget and an ``offload_folder`` for the rest, fp32 (what HF users do when a model does
  not fit);
- ``bundle-int8`` (``--formats int8``, dense weights int8 too) and ``accelerate-torchao-int8``
  (the same HF load with torchao's int8 weight-only quantisation of attention, the output head
  and the fused expert tensors): the same bytes per weight, both quantised on this CPU;
- ``bundle-mixed``: the default plan (bf16/int8/int4 within the quality budget; bf16 stays
  fp32 on an fp32 checkpoint).

Rows, each a ratio of decode tok/s measured in the same run: ``fp32`` (like for like, the
headline: target bundle >= 2x accelerate), ``int8`` (like for like at the same bytes), and
``mixed`` (the default plan vs accelerate at fp32: not like for like, the bundle holds fewer
bytes). Both of a row generate greedy tokens for the same prompt after a warm-up; the JSON
says whether they are the same tokens. Everything runs on the CPU. For each bundle the JSON
also holds the plan's memory and predicted tok/s next to what the run used and measured.

Each bundle is planned for the budget: its plan counts what the runtime holds besides the
weights, KV cache and activations (the engine profile's ``runtime_memory``: experts staged
while fetched, the runtime's own memory; the JSON splits them out of the plan's workspace,
``plans.*.workspace_of_which``). Each bundle's memory is also measured by component in a
child without a limit (``python -m exporters.runtime_memory``: anonymous memory above its
baseline, at its peak over load, prefill and decode) and tabled against its plan
(``plans.*.memory_components``), as is a second, smaller checkpoint planned at fp32 for
``SECOND_BUDGET_MIB`` (``second_shape``). torchao's checkpoint is quantised and saved by this
parent (unlimited), as the bundle's int8 kernels are built at export.

How the budget is enforced: each contender runs inside its own fresh memory cgroup
(``_memlimit``), joined before the interpreter imports anything, whose limit covers its
anonymous memory *and* the page cache it faults in. Without that, "offloaded to disk" files
would sit in this machine's page cache and disk reads would be memory reads. The limit, the
same for all, is ``budget + baseline`` (``--headroom-mib`` adds the same to all): the baseline
is the peak of a child in an unlimited cgroup that imports torch, transformers (with its
quantiser registry, which imports torchao where installed), onnxruntime and accelerate, loads
the tokenizer, runs a tiny matmul and builds the model's class on the meta device (its
modeling code, no weights): what a process needs before it holds any weight. Before each
child starts, the pages of the checkpoint, its bundle and its offload folder are evicted from
the page cache (``posix_fadvise(DONTNEED)``), so none starts warm with pages charged
elsewhere. Shared libraries this parent already loaded stay cached and are charged to no
child (alike for all). A contender killed by the OOM killer is recorded as such.

Needs Linux, root (or a delegated cgroup) and the cgroup v1 ``memory`` controller or cgroup
v2 with ``memory`` enabled; without them (or with ``--no-limit``) the children run unlimited
and the JSON says ``"budget_enforced": false`` and why.

    pip install accelerate 'moe-planner[bench]'   # accelerate, torchao: not dependencies of moe-planner
    sudo python benchmarks/bench_bundle_vs_accelerate.py [--budget-mib 300] [--tokens 24]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

from _bundle_memory import components, measure
from _contenders import import_stack, save_torchao_int8, weightless_model
from _memlimit import CgroupUnavailable, MemCgroup, cached_bytes, drop_file_cache
from _provenance import ROOT, provenance

SHAPE = {"hidden_size": 768, "intermediate_size": 1536, "num_hidden_layers": 8}
PLANS = {"fp32": ("fp32",), "int8": ("int8",), "mixed": None}  # plan -> --formats (None: the default)
CONTENDERS = {  # name -> the plan it runs (bundles), or what it needs installed
    "bundle-fp32": {"plan": "fp32"},
    "accelerate-fp32": {},
    "bundle-int8": {"plan": "int8"},
    "accelerate-torchao-int8": {"needs": "torchao"},
    "bundle-mixed": {"plan": "mixed"},
}
ROWS = [  # the first is the headline
    {"row": "fp32", "ours": "bundle-fp32", "theirs": "accelerate-fp32", "like_for_like": True,
     "what": "every weight fp32 in both"},
    {"row": "int8", "ours": "bundle-int8", "theirs": "accelerate-torchao-int8", "like_for_like": True,
     "what": "every weight of attention, experts and the output head int8 in both (the bundle's "
             "groups of 128 with fp32 scales, torchao's per-channel scales); the bundle's embedding "
             "is int8 too, torchao's fp32"},
    {"row": "mixed", "ours": "bundle-mixed", "theirs": "accelerate-fp32", "like_for_like": False,
     "what": "the default plan (cold experts int8/int4 within the quality budget) vs accelerate at "
             "fp32: the bundle holds fewer bytes, so greedy tokens can differ"},
]
TARGET_RATIO = 2.0
SECOND_SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4}  # memory components only
SECOND_BUDGET_MIB = 48.0  # its dense weights, the runtime's own memory and part of its experts (48 MiB)


# ----------------------------------------------------------------------------- parent side

def _spawn(name: str, args: argparse.Namespace, work: Path, limit: int | None, cgroups: bool) -> dict:
    """Run one child (in a fresh cgroup limited to ``limit`` when ``cgroups``); its result plus
    what the cgroup saw."""
    result, log = work / f"{name}.result.json", work / f"{name}.log"
    result.unlink(missing_ok=True)
    bundle, offload = work / f"bundle-{CONTENDERS.get(name, {}).get('plan', 'none')}", work / f"offload-{name}"
    shutil.rmtree(offload, ignore_errors=True)
    ckpt = work / ("ckpt-torchao-int8" if name == "accelerate-torchao-int8" else "ckpt")
    argv = [sys.executable, str(Path(__file__).with_name("_contenders.py")), "--contender", name,
            "--ckpt", str(ckpt), "--bundle", str(bundle), "--offload", str(offload), "--result", str(result),
            "--tokens", str(args.tokens), "--budget-mib", str(args.budget_mib)]
    watched = [ckpt, bundle, offload]
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
    ap.add_argument("--work", type=Path, default=None, help="keep the checkpoint and bundles here")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bundle_vs_accelerate.json")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"comma-separated subset of {', '.join(CONTENDERS)}")
    ap.add_argument("--no-limit", action="store_true", help="run the children without a memory limit (comparison)")
    ap.add_argument("--headroom-mib", type=float, default=0.0,
                    help="added to every contender's limit (budget + baseline + this); 0: the budget as is")
    ap.add_argument("--child-timeout", type=float, default=1800.0, help="seconds before a contender is killed")
    args = ap.parse_args()
    unknown = set(args.contenders.split(",")) - set(CONTENDERS)
    if unknown:
        ap.error(f"unknown contenders {sorted(unknown)}; known: {', '.join(CONTENDERS)}")
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench-bundle-"))).resolve()
    try:
        compare(args, work)
    finally:
        if args.work is None:  # a temporary checkpoint, bundles and offload folders (~3 GB)
            shutil.rmtree(work, ignore_errors=True)


def make_bundles(args: argparse.Namespace, work: Path, names: list[str]) -> dict[str, dict]:
    """Plan (against this machine, its memory cut to the budget) and export each plan the
    chosen bundles run, and measure each bundle's memory by component; plan name -> what the
    plan says and what the bundle held."""
    from _machine import probed_profile

    from exporters.checkpoints import make_random_checkpoint

    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        make_random_checkpoint("mixtral", ckpt, **SHAPE)
    profile_path = probed_profile(work, f"{_memory_for(args.budget_mib):.0f}B", "budget.yaml")[0]
    plans = {}
    for name in dict.fromkeys(CONTENDERS[n]["plan"] for n in names if "plan" in CONTENDERS[n]):
        plans[name] = _plan_and_export(profile_path, ckpt, work / f"bundle-{name}", PLANS[name], args.budget_mib)
    return plans


def _memory_for(budget_mib: float) -> float:
    """Memory of a CPU whose planner budget (Setup.device_reserve kept free: the CPU computes)
    is ``budget_mib``, for weights, KV cache, workspace and the runtime's own memory."""
    from planner.costs import Setup

    frac, fixed = Setup.__dataclass_fields__["device_reserve"].default
    return (fixed + budget_mib * 2**20) / (1 - frac)


def _plan_and_export(profile_path: Path, ckpt: Path, out: Path, formats: tuple[str, ...] | None,
                     budget_mib: float) -> dict:
    """Plan ``ckpt`` for the machine of ``profile_path`` (``formats``: None = the default),
    export the bundle to ``out``, measure its memory by component; what the plan says."""
    from exporters.bundle import write_bundle
    from planner.costs import runtime_memory
    from planner.optimize import OptimizeRequest, optimize
    from profiles.hardware import load_profile
    from profiles.models import load_model

    profile, hw = load_profile(profile_path)
    t = time.perf_counter()
    result = optimize(OptimizeRequest(hardware=str(profile_path), model=str(ckpt / "config.json"),
                                      context_tokens=512, **({"formats": formats} if formats else {})))
    plan, plan_s = result.plan, time.perf_counter() - t
    write_bundle(plan, model=load_model(ckpt / "config.json"), hardware=hw, profile=profile, out_dir=out,
                 checkpoint=ckpt, force=True)
    compute = plan.memory[plan.compute_device].model_dump(exclude={"capacity_bytes"})
    staging, runtime = runtime_memory(result.setup)
    return {"formats_allowed": list(formats or ("default",)), "sites": plan.counts()["site"],
            "planned_for_bytes": budget_mib * 2**20, "formats": plan.counts()["format"],
            "dense_format": plan.dense_format, "plan_s": plan_s, "memory_bytes": compute,
            "workspace_of_which": {"staging_bytes": staging, "runtime_bytes": runtime,
                                   "source": "engine profile runtime_memory (planner.costs.runtime_memory)"},
            "memory_components": components(compute, staging, runtime, measure(out, ckpt)),
            "predicted_decode_tokens_per_s": plan.predicted["tokens_per_s"]}


def second_shape(work: Path) -> dict:
    """A smaller checkpoint (``SECOND_SHAPE``) planned at fp32 for ``SECOND_BUDGET_MIB`` on this
    machine's probed profile (``budget.yaml``'s, its memory changed), its memory by component."""
    import yaml

    from exporters.checkpoints import make_random_checkpoint

    ckpt = work / "ckpt-second"
    if not (ckpt / "config.json").exists():
        make_random_checkpoint("mixtral", ckpt, **SECOND_SHAPE)
    doc = yaml.safe_load((work / "budget.yaml").read_text())
    for node in doc["nodes"]:
        for dev in node["devices"]:
            if dev["kind"] == "cpu":
                dev["memory_bytes"] = f"{_memory_for(SECOND_BUDGET_MIB):.0f}B"
    path = work / "budget-second.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return {"shape": SECOND_SHAPE, "budget_bytes": SECOND_BUDGET_MIB * 2**20,
            "plan": _plan_and_export(path, ckpt, work / "bundle-second", ("fp32",), SECOND_BUDGET_MIB)}


def compare(args: argparse.Namespace, work: Path) -> None:
    """Plan and export the bundles, measure the baseline, run the contenders, write the JSON."""
    names = args.contenders.split(",")
    import_stack()
    plans = make_bundles(args, work, names)
    second = second_shape(work)
    for name, plan in [*plans.items(), ("second-shape fp32", second["plan"])]:
        peak = plan["memory_components"].get("peak") or {}
        print(f"  plan {name}: memory {peak.get('planned_bytes', 0) / 2**20:.1f} MiB, the bundle peaked at "
              f"{(peak.get('measured_bytes') or 0) / 2**20:.1f} MiB above its baseline (sampled: "
              f"{(peak.get('sampled_bytes') or 0) / 2**20:.1f} MiB; unlimited child)", flush=True)
    if "accelerate-torchao-int8" in names and find_spec("torchao") and not (work / "ckpt-torchao-int8").exists():
        save_torchao_int8(work / "ckpt", work / "ckpt-torchao-int8")
    ckpt_bytes = sum(p.stat().st_size for p in (work / "ckpt").glob("*.safetensors"))
    weightless_model(work / "ckpt")  # the libraries every child maps are now cached (charged to no child)
    budget = int(args.budget_mib * 2**20)

    # the budget: budget + baseline per child cgroup, or why not
    try:  # with --no-limit, unlimited cgroups still measure each child's peak
        check = MemCgroup("bench-check")
        cgroups, version, why_not = True, check.version, "--no-limit" if args.no_limit else None
        check.remove()
    except CgroupUnavailable as exc:
        cgroups, version, why_not = False, None, str(exc)
    enforce = cgroups and not args.no_limit
    baseline = _spawn("baseline", args, work, None, cgroups)
    if baseline["outcome"] != "ok":
        raise SystemExit(f"the baseline child failed: {baseline.get('log_tail')}")
    headroom = int(args.headroom_mib * 2**20)
    limit = budget + baseline["peak_bytes"] + headroom if enforce else None
    print(f"limit {limit} bytes = budget {budget} + baseline {baseline['peak_bytes']} + headroom {headroom}"
          if enforce else f"no memory limit: {why_not}", flush=True)
    # the contenders, each in its own cgroup with the same limit
    runs, tokens = {}, {}
    for name in names:
        needs = CONTENDERS[name].get("needs")
        if needs and find_spec(needs) is None:
            runs[name] = {"outcome": f"not run: {needs} is not installed (pip install 'moe-planner[bench]')"}
            continue
        runs[name] = _spawn(name, args, work, limit, cgroups)
        tokens[name] = runs[name].pop("tokens", None)
        plan = plans.get(CONTENDERS[name].get("plan"))
        if plan is not None:
            runs[name]["against_plan"] = _against_plan(runs[name], plan, baseline)
    rows = [_row(r, runs, tokens) for r in ROWS if r["ours"] in runs and r["theirs"] in runs]
    headline = rows[0] if rows and rows[0]["row"] == ROWS[0]["row"] else None
    result = {"provenance": provenance(("numpy", "torch", "transformers", "accelerate", "onnxruntime", "torchao")),
              "checkpoint": {"shape": SHAPE, "bytes": ckpt_bytes, "dtype": "fp32"},
              "budget_bytes": budget, "plans": plans, "second_shape": second,
              "budget_enforced": enforce,
              "budget_not_enforced_because": why_not,
              "memory_limit": {
                  "mechanism": (f"one memory cgroup (v{version}) per child, limit = budget + baseline + "
                                "headroom, the same for all; their files evicted from the page cache before each "
                                "child" if enforce else "none: the children ran without a limit, the page cache "
                                "can hold the offloaded files" + (" (unlimited cgroups measured their peaks)"
                                                                  if cgroups else "")),
                  "limit_bytes": limit, "baseline_bytes": baseline.get("peak_bytes"),
                  "headroom_bytes": headroom if enforce else None,
                  "reading": "a contender's peak reaches the limit whenever the page cache fills the room left "
                             "(reclaimable); memory_at_end_of_decode (rss: anonymous, cache: page cache) and "
                             "during_decode.read_bytes (bytes read from the disk while decoding) tell what it held",
                  "baseline": {"what": "peak of an unlimited child importing torch, transformers (and its quantiser "
                                       "registry), onnxruntime, accelerate, loading the tokenizer, one 64x64 matmul, "
                                       "and building the checkpoint's model class on the meta device (its modeling "
                                       "code, no weights)",
                               **{k: baseline.get(k) for k in ("peak_bytes", "wall_s", "memory_at_end")}}},
              "contenders": runs,
              "rows": rows,
              "headline_row": headline and headline["row"],
              "ratio": headline and headline["ratio"],
              "target_ratio": TARGET_RATIO,
              "target_met": None if not headline or headline["ratio"] is None else headline["ratio"] >= TARGET_RATIO}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    for r in rows:
        print(f"{r['row']:>6}: {r['ours']} {fmt(r['ours_decode_tokens_per_s'])} tok/s vs {r['theirs']} "
              f"{fmt(r['theirs_decode_tokens_per_s'])} tok/s: {fmt(r['ratio'])}x"
              + (" (like for like)" if r["like_for_like"] else ""))
    print(f"budget enforced: {enforce} -> {args.out}")


def _row(spec: dict, runs: dict, tokens: dict) -> dict:
    """One ratio of the JSON: ours / theirs decode tok/s (None where either did not finish)."""
    ours, theirs = (runs[spec[k]].get("decode_tokens_per_s") if runs[spec[k]].get("outcome") == "ok" else None
                    for k in ("ours", "theirs"))
    a, b = tokens.get(spec["ours"]), tokens.get(spec["theirs"])
    return {**spec, "ours_decode_tokens_per_s": ours, "theirs_decode_tokens_per_s": theirs,
            "ratio": ours / theirs if ours and theirs else None,
            "same_tokens": (a == b) if a and b else None}


def _against_plan(run: dict, plan: dict, baseline: dict) -> dict:
    """A bundle's run next to its plan: decode tok/s, and the anonymous memory it held at the end
    of decoding above the baseline's (the weights it holds) vs the plan's memory; its peak as the
    unlimited measurement saw it (``memory_components``: the cgroup's peak counts the page cache)."""
    planned = sum(plan["memory_bytes"].values())
    rss, base = (run.get("memory_at_end_of_decode") or {}).get("rss"), (baseline.get("memory_at_end") or {}).get("rss")
    tps = run.get("decode_tokens_per_s")
    peak = plan.get("memory_components", {}).get("peak", {})
    return {"predicted_decode_tokens_per_s": plan["predicted_decode_tokens_per_s"],
            "measured_over_predicted": tps / plan["predicted_decode_tokens_per_s"] if tps else None,
            "plan_memory_bytes": planned,
            "rss_above_baseline_at_end_of_decode_bytes": rss - base if rss is not None and base is not None else None,
            "peak_above_baseline_bytes": (run["peak_bytes"] - baseline["peak_bytes"])
            if run.get("peak_bytes") and baseline.get("peak_bytes") else None,
            "anon_peak_above_baseline_unlimited_bytes": peak.get("measured_bytes"),
            "anon_peak_within_plan": peak.get("within_plan")}


if __name__ == "__main__":
    main()
