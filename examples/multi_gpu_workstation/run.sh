#!/usr/bin/env bash
# Mixtral-8x7B on a workstation with two RTX 3090s (24 GiB each, PCIe 4.0 x16 each, no NVLink,
# 256 GiB DDR4) at the int8 quality budget: plan over both GPUs, compare with what a multi-GPU
# user runs today (llama.cpp's layer split with --n-cpu-moe, accelerate's device_map="auto"),
# simulate the plan, export it as a bundle (each layer on its GPU) and for llama.cpp and accelerate.
# Run from anywhere: bash examples/multi_gpu_workstation/run.sh   (see README.md for the output)
set -euo pipefail
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
HW=workstation-2x3090-pcie

# 1. Plan for the bundle runtime. The experts do not fit both GPUs at int8, so --parallel auto
#    (the default) plans pipeline offload: each layer on one GPU, the rest in host DRAM.
planner optimize -H "$HW" -m mixtral-8x7b --quality-budget 0.006 --parallel auto --compare --out "$work/plan.json"

# 2. The same box planned for llama.cpp (its GGUF formats), against llama.cpp's own layer split.
planner optimize -H "$HW" -m mixtral-8x7b --quality-budget 0.006 --parallel auto --engine llama.cpp \
    --formats bf16,q8_0,q4_k --compare --out "$work/plan-llamacpp.json"

# 3. Replay the default workload under each plan: every layer on its GPU, fetches over that
#    GPU's link, activation hops between the GPUs.
planner simulate -p "$work/plan.json"
planner simulate -p "$work/plan-llamacpp.json"

# 4. The bundle: the runtime runs each layer on its GPU (devices.json maps node/gpuN to cuda:N;
#    run.py --device-map gpu0=cpu,gpu1=cpu remaps them), with the plan's llama.cpp and
#    accelerate renderings under engines/. Without --checkpoint, run.py builds the kernels at start-up.
planner export "$work/plan.json" --out "$work/bundle"
python3 -c "
import json, sys
print('bundle devices:', {d: v['torch'] for d, v in json.load(open(sys.argv[1]))['devices'].items()})" "$work/bundle/devices.json"

# 5. The llama.cpp plan's GGUF formats (q8_0, q4_k) are not the bundle runtime's: its engine
#    configs alone (llama-server with --device/--tensor-split/-ot, an accelerate device_map).
planner export "$work/plan-llamacpp.json" --engines-only --out "$work/deploy"
python3 -c "
import json, sys
cfg = json.load(open(sys.argv[1]))
print('llama.cpp split:', cfg['split'])
print('rounded for llama.cpp: %.2f tok/s (plan %.2f)' % (cfg['predicted']['rounded']['tokens_per_s'],
                                                       cfg['predicted']['plan_tokens_per_s']))" "$work/deploy/engines/llamacpp.json"
