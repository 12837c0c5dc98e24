#!/usr/bin/env bash
# Plan MoE models that do not fit a desktop GPU: where every expert lives (GPU, host DRAM,
# NVMe), at which bitwidth, which run on the CPU, and how big each layer's GPU expert cache
# is; then compare the plan with what people run today (llama.cpp --n-cpu-moe, HF accelerate
# offload, Mixtral-offloading's LRU cache, kTransformers/Fiddler CPU experts).
# Run from anywhere: bash examples/desktop_offload/run.sh
set -euo pipefail
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. Mixtral-8x7B (47B parameters, ~23 GiB of int4 experts) on the RTX 4090 desktop (24 GiB).
#    With no --trace the planner uses the model's default workload. --compare scores every
#    baseline with the same cost model at the same quality budget (uniform int4 error by
#    default) and prints the plan's speed-up over each. --report writes report.md with three
#    plots (memory per pool, time per layer, experts and cache per layer) and plan.json.
planner optimize --hardware desktop-4090 --model mixtral-8x7b --compare \
    --report "$work/mixtral-4090" --out "$work/mixtral-4090/plan.json"

# 2. The same model on an RTX 3060 (12 GiB) with 32 GiB of DRAM: most experts leave the GPU.
planner optimize --hardware desktop-3060 --model mixtral-8x7b --compare \
    --report "$work/mixtral-3060" --out "$work/mixtral-3060/plan.json"

# 3. Qwen3-30B-A3B (48 layers x 128 experts, top-8) on both machines.
planner optimize --hardware desktop-4090 --model qwen3-30b-a3b --compare \
    --report "$work/qwen3-4090" --out "$work/qwen3-4090/plan.json"
planner optimize --hardware desktop-3060 --model qwen3-30b-a3b --compare \
    --report "$work/qwen3-3060" --out "$work/qwen3-3060/plan.json"
ls "$work/qwen3-3060"

# 4. A tighter quality budget: the error of uniform int8 instead of int4. The baselines must
#    then use int8 (or bf16) for the whole model; the planner may mix formats within the budget.
planner optimize --hardware desktop-4090 --model mixtral-8x7b --quality-budget 0.006 --compare

# 5. For scripts: --json prints only JSON on stdout (the summary, and the plan itself).
planner --json optimize --hardware desktop-3060 --model mixtral-8x7b --compare | python3 -c "
import json, sys
d = json.load(sys.stdin)['summary']
best = d['best_baseline']
print('fastest baseline on desktop-3060:', best['name'])
# baselines are priced on their own engines; on the plan's own engine (bundle) none is faster
print('plan at least as fast as every baseline on its engine:',
      all(b['ratio'] >= 1 - 1e-9 for b in d['baselines'] if b['engine'] == 'bundle'))
print('experts placed:', sum(d['experts']['by_home'].values()), 'of', d['experts']['total'])"
