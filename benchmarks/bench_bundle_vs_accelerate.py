"""A planned bundle vs transformers + accelerate offloading, under the same memory budget.

A Mixtral-shaped random checkpoint (fp32, larger than the budget) is
1. planned against this machine's probed profile with its memory cut to the budget, exported
   as a bundle and run by the bundle's runtime;
2. loaded by transformers with accelerate's ``device_map="auto"``, ``max_memory`` = the budget
   and an ``offload_folder`` for the rest (what HF users do when a model does not fit).
Both generate the same greedy tokens for the same prompts after a warm-up; decode tok/s of
each and their ratio go to JSON (target: bundle >= 2x accelerate). With a CUDA GPU the
budget applies to the GPU instead (``--gpu``).

    pip install accelerate   # not a dependency of moe-planner
    python benchmarks/bench_bundle_vs_accelerate.py [--budget-mib 300] [--tokens 24]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml
from _provenance import ROOT, provenance

from exporters.bundle import write_bundle
from exporters.checkpoints import make_random_checkpoint
from planner.optimize import OptimizeRequest, optimize
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.probe import QUICK, probe, render_profile_yaml

PROMPTS = ["the cat sat on the mat", "experts route tokens through layers of a sparse model"]
SHAPE = {"hidden_size": 768, "intermediate_size": 1536, "num_hidden_layers": 8}
HOST_RESERVE_MIB = (0.10, 4096)  # what the planner keeps free in host memory (planner.costs.Setup.host_reserve)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-mib", type=float, default=300.0, help="memory for weights, MiB")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--work", type=Path, default=None, help="keep the checkpoint and bundle here")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bundle_vs_accelerate.json")
    args = ap.parse_args()

    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-bundle-"))
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        make_random_checkpoint("mixtral", ckpt, **SHAPE)
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    # 1. this machine, measured; its memory cut so that the planner has `budget` for weights
    doc = yaml.safe_load(render_profile_yaml(probe(work, QUICK), "this-machine"))
    frac, fixed = HOST_RESERVE_MIB
    for node in doc["nodes"]:
        for dev in node["devices"]:
            if dev["kind"] == "cpu":
                dev["memory_bytes"] = f"{(fixed + args.budget_mib) / (1 - frac):.0f}MiB"
    profile_path = work / "budget.yaml"
    profile_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    profile, hw = load_profile(profile_path)
    model = load_model(ckpt / "config.json")
    t = time.perf_counter()
    plan = optimize(OptimizeRequest(hardware=str(profile_path), model=str(ckpt / "config.json"),
                                    context_tokens=512)).plan
    plan_s = time.perf_counter() - t
    bundle = write_bundle(plan, model=model, hardware=hw, profile=profile, out_dir=work / "bundle", checkpoint=ckpt,
                          force=True).path
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    ids = tok(PROMPTS[1])["input_ids"]
    from exporters.runtime import load_planned_model

    with load_planned_model(bundle / "plan.json", ckpt, kernels_dir=bundle / "kernels", device="cpu") as rt:
        rt.generate(tok(PROMPTS[0])["input_ids"], 4)  # warm-up
        ours = decode_tps(lambda i, n: rt.generate(i, n), ids, args.tokens)
        ours_tokens = rt.generate(ids, args.tokens)
    # 2. accelerate offloading under the same budget
    offload = work / "offload"
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        ckpt, device_map="auto", max_memory={"cpu": f"{args.budget_mib:.0f}MiB"}, offload_folder=str(offload),
        dtype=torch.float32)
    hf.eval()

    def hf_generate(i, n):
        with torch.no_grad():
            out = hf.generate(torch.tensor([i]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(i):].tolist()

    hf_generate(tok(PROMPTS[0])["input_ids"], 4)  # warm-up
    theirs = decode_tps(hf_generate, ids, args.tokens)
    theirs_tokens = hf_generate(ids, args.tokens)
    result = {"provenance": provenance(("numpy", "torch", "transformers", "accelerate", "onnxruntime")),
              "checkpoint": {"shape": SHAPE, "bytes": ckpt_bytes, "dtype": "fp32"},
              "budget_bytes": args.budget_mib * 2**20, "plan": {"sites": plan.counts()["site"],
                                                                "formats": plan.counts()["format"], "plan_s": plan_s},
              "bundle_decode_tokens_per_s": ours, "accelerate_decode_tokens_per_s": theirs, "ratio": ours / theirs,
              "target_ratio": 2.0, "same_tokens_as_accelerate": ours_tokens == theirs_tokens,
              "note": "the plan quantises cold experts (int8/int4 within the quality budget); accelerate runs "
                      "fp32, so greedy tokens can differ"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"bundle {ours:.2f} tok/s, accelerate {theirs:.2f} tok/s, ratio {ours / theirs:.2f}x -> {args.out}")


if __name__ == "__main__":
    main()
