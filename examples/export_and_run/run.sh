#!/usr/bin/env bash
# From plan to running model: build a tiny random Mixtral-shaped checkpoint (no download),
# plan it for a GPU too small to hold it, export the deployment bundle, generate text with
# the bundle's own runtime, and hold the measurement against the simulator's prediction.
# Needs the runtime extra (torch, transformers, onnxruntime).
# Run from anywhere: bash examples/export_and_run/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

# 1. A random checkpoint: 8 layers x 8 experts, hidden 512, expert width 1024 (~430 MB in
#    fp32), saved with save_pretrained, plus a word-level tokenizer.
python3 -c "
from exporters.checkpoints import make_random_checkpoint
make_random_checkpoint('mixtral', 'ckpt', hidden_size=512, intermediate_size=1024, num_hidden_layers=8)
print('checkpoint written')"

# 2. Plan it for small-gpu-box.yaml: an RTX 3060 desktop whose GPU has 600 MiB. Some experts
#    stay on the GPU, the rest live in host memory and are fetched into per-layer caches or
#    computed by the CPU (hybrid: hits on the GPU, misses on the CPU).
planner optimize --hardware "$here/small-gpu-box.yaml" --model ckpt/config.json --context 512 \
    --formats bf16,int8 --compare --out plan.json

# 3. The bundle: plan, profile, model spec, the runtime, ONNX kernels and int8 experts built
#    from the checkpoint, llama.cpp / accelerate configs, run.py, README, sha256 manifest.
planner export plan.json --checkpoint ckpt --hardware "$here/small-gpu-box.yaml" --out bundle
ls bundle bundle/kernels bundle/engines

# 4. Generate with the bundle alone (torch + onnxruntime + transformers), writing metrics.
python3 bundle/run.py --checkpoint ckpt --prompt "the cat sat on the mat" --max-new-tokens 16 \
    --ignore-eos --metrics-out metrics.json
python3 -c "
import json; m = json.load(open('metrics.json'))
print('generated', m['generated_tokens'], 'tokens; per-layer hit rates', [None if h is None else round(h, 3) for h in m['hit_rate']])"

# 5. Measured vs predicted: the routing the runtime saw is replayed through the simulator
#    under the same plan and policies, so per-layer hit rates must be equal. Times are
#    this machine's (with no GPU here, the GPU's share runs on the CPU), not the profile's.
planner verify bundle --checkpoint ckpt --max-new-tokens 12

# 6. A changed file is refused (nothing is ever run from a bundle that does not match).
echo "# edited" >> bundle/run.py
if planner verify bundle --checkpoint ckpt; then exit 1; else echo "changed bundle refused"; fi
