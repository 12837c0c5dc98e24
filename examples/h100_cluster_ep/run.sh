#!/usr/bin/env bash
# Expert parallelism for DeepSeek-V3 (58 MoE layers x 256 experts, top-8, 8 groups) on H100
# clusters: which GPU owns which expert, which experts get redundant copies, what the layout
# costs in straggler load and cross-node all-to-all traffic; then the same layout written for
# SGLang (--init-expert-location) and vLLM (EPLB config; vLLM-Ascend expert map), with the
# launch commands.
# Run from anywhere: bash examples/h100_cluster_ep/run.sh
set -euo pipefail
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. Two DGX H100 nodes (16 GPUs, NVLink inside a node, 400 Gb/s InfiniBand per GPU between
#    nodes). A profile with several GPUs makes `planner optimize` plan expert parallelism
#    (--parallel auto; --parallel offload forces the single-GPU offload planner). 256 experts
#    + 32 redundant = 18 slots per GPU; bf16 does not fit 80 GB with the dense weights, so
#    the planner takes the next format of --formats (int8). --compare scores EPLB
#    (global, hierarchical) and vLLM's linear / round-robin placements on the same workload.
#    --time-limit bounds the placement search (the plan is valid whenever it stops).
planner optimize --hardware cluster-h100-2node --model deepseek-v3 --compare --time-limit 6 \
    --out "$work/2node/plan.json"

# 2. Engine files from the plan: SGLang's physical_to_logical_map [61 layers, 288] and the
#    vLLM / vLLM-Ascend files; each prints the command line that uses it.
python3 -m exporters.engines.sglang "$work/2node/plan.json" "$work/2node/engines"
python3 -m exporters.engines.vllm "$work/2node/plan.json" "$work/2node/engines"
python3 -m exporters.engines.vllm --ascend "$work/2node/plan.json" "$work/2node/engines"

# 3. Eight nodes (64 GPUs): 256 + 64 redundant = 5 slots per GPU, bf16 fits. --json for scripts.
planner --json optimize --hardware cluster-h100-8node --model deepseek-v3 --compare --time-limit 6 \
    --out "$work/8node/plan.json" | python3 -c "
import json, sys
s = json.load(sys.stdin)['summary']
g = next(b for b in s['baselines'] if b['method'] == 'eplb-global')
print('layout:', s['layout']['gpus'], 'GPUs x', s['layout']['slots_per_gpu'], 'slots,', s['layout']['expert_format'])
# the placer plans for the expected load, not this sample's (EPLB fits the sample's noise):
# compare balance out of sample, as benchmarks/bench_cluster.py does (results/cluster.json)
print('max/mean load on the planning sample: %.3f (eplb-global %.3f)' % (s['plan']['max_mean_load'], g['max_mean_load']))
print('fewer cross-node tokens than eplb-global:', s['plan']['cross_node_fraction'] < g['cross_node_fraction'])"
python3 -m exporters.engines.sglang "$work/8node/plan.json" "$work/8node/engines"
python3 -m exporters.engines.vllm "$work/8node/plan.json" "$work/8node/engines"
ls "$work/8node/engines"
