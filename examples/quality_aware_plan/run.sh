#!/usr/bin/env bash
# Measured quality: build a tiny random Mixtral-shaped checkpoint (no download) with one
# planted super expert, measure every expert's output error at bf16/int8/int4 with the
# runtime's own quantisers, then plan with the measured errors (--quality) and with the
# super experts pinned (--critical auto), next to the plan made with one constant per format;
# then export the pinned plan and a uniform-int4 plan, run both bundles, and compare their
# output error against the fp32 checkpoint and their decode speed.
# Needs the runtime extra (torch, transformers, onnxruntime).
# Run from anywhere: bash examples/quality_aware_plan/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
box="$here/../export_and_run/small-gpu-box.yaml"  # an RTX 3060 desktop whose GPU has 600 MiB
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

# 1. A random checkpoint (4 layers x 8 experts, hidden 512, expert width 1024); expert 5 of
#    MoE layer 2 gets 100x its down_proj weights: its output has the massive activations
#    that mark a super expert.
python3 -c "
import torch
from safetensors.torch import load_file, save_file
from exporters.checkpoints import make_random_checkpoint, WORDS
make_random_checkpoint('mixtral', 'ckpt', hidden_size=512, intermediate_size=1024, num_hidden_layers=4)
t = load_file('ckpt/model.safetensors')
t['model.layers.2.block_sparse_moe.experts.5.w2.weight'] *= 100  # Mixtral's down_proj of expert 5
save_file(t, 'ckpt/model.safetensors', metadata={'format': 'pt'})
open('prompts.txt', 'w').write('\n'.join(' '.join(WORDS[i:] + WORDS[:i]) for i in range(0, 32, 4)) + '\n')
print('checkpoint written')"

# 2. Measure: each expert on (at most 64 of) the tokens routed to it, fp32 vs each format.
planner quality measure --checkpoint ckpt --prompts prompts.txt --generate 8 --formats bf16,int8,int4 \
    --tokens-per-expert 64 --out quality.json
python3 -c "
import json; q = json.load(open('quality.json'))
for f in q['formats']:
    errs = [e['error'][f] for l in q['layers'] for e in l['experts'] if e['tokens']]
    print(f'{f}: measured error {min(errs):.4f}-{max(errs):.4f} over {len(errs)} experts')"

# 3. Plan three ways at the same budget: one constant error per format, measured errors,
#    and measured errors with the super experts at full precision.
common=(--hardware "$box" --model ckpt/config.json --context 512 --formats bf16,int8,int4 --parallel offload)
planner optimize "${common[@]}" --quality-budget 0.03 --out constant.json
planner optimize "${common[@]}" --quality-budget 0.03 --quality quality.json --out measured.json
planner optimize "${common[@]}" --quality-budget 0.03 --quality quality.json --critical auto --out pinned.json
python3 -c "
import json
for name in ('constant', 'measured', 'pinned'):
    p = json.load(open(name + '.json'))
    print(name, 'layer 2 formats', p['layers'][2]['format'], 'quality_error', round(p['quality_error'], 4),
          'quality file', p['inputs'].get('quality_digest'))"

# 4. Export two plans and run them: the measured plan with its super experts pinned, and a
#    uniform-int4 plan (every expert int4, dense weights bf16 as in the others). Each bundle
#    decodes the prompts with its own run.py (decode tok/s on this machine; with no GPU here the
#    GPU's share runs on the CPU, and each miss builds an ONNX Runtime session, so these are not
#    the profile's figures: the plan's prediction for the RTX 3060 is printed beside them), and
#    its logits on every prompt are held against the fp32 checkpoint's (relative error over
#    all positions).
planner optimize "${common[@]}" --formats int4 --fix-dense-format bf16 --out int4.json
for name in pinned int4; do
    planner export "$name.json" --checkpoint ckpt --hardware "$box" --out "bundle-$name" > /dev/null
    python3 "bundle-$name/run.py" --checkpoint ckpt --prompts prompts.txt --max-new-tokens 16 --ignore-eos \
        --device cpu --metrics-out "metrics-$name.json" > /dev/null
done
python3 -c "
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from exporters.runtime import load_planned_model
tok = AutoTokenizer.from_pretrained('ckpt')
prompts = [torch.tensor([tok(p).input_ids]) for p in open('prompts.txt').read().splitlines() if p]
def logits(model):
    with torch.no_grad():
        return [model(ids).logits[0].float() for ids in prompts]
ref = logits(AutoModelForCausalLM.from_pretrained('ckpt', dtype=torch.float32).eval())
errors = {}
for name in ('pinned', 'int4'):
    with load_planned_model(f'bundle-{name}/plan.json', 'ckpt', kernels_dir=f'bundle-{name}/kernels', device='cpu',
                            background=False) as rt:
        out = logits(rt.model)
    errors[name] = (sum(float((o - r).norm() ** 2) for o, r in zip(out, ref)) / sum(float(r.norm() ** 2) for r in ref)) ** 0.5
    measured = json.load(open(f'metrics-{name}.json'))['tokens_per_s']
    predicted = json.load(open(f'{name}.json'))['predicted']['tokens_per_s']
    print(f'{name} bundle: output error vs fp32 {errors[name]:.4f}, decode {measured:.1f} tok/s measured here, '
          f'{predicted:.0f} tok/s predicted on the RTX 3060')
assert errors['pinned'] < errors['int4'], errors  # what measuring quality buys
print(f'uniform int4 output error / pinned plan output error: {errors[\"int4\"] / errors[\"pinned\"]:.1f}x')"
