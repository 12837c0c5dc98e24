#!/usr/bin/env bash
# llama.cpp rendering of a moe-planner plan for olmoe-1b-7b on desktop-alveo-u280.
# Run from a llama.cpp checkout/build; see llamacpp.json for the rounded layers and predictions.
# predicted decode: 29.40 tok/s after rounding (plan: 58.72 tok/s)
set -euo pipefail

# 1. HF checkpoint -> GGUF
python convert_hf_to_gguf.py CHECKPOINT_DIR --outtype bf16 --outfile MODEL-bf16.gguf

# 2. quantise with the plan's per-layer types
llama-quantize --token-embedding-type q4_k --output-tensor-type q4_k --tensor-type '^(?!blk\.[0-9]+\.ffn_(?:up|down|gate|gate_up)_(?:ch|)exps)=q4_k' --tensor-type 'blk\.[0-9]+\.ffn_(?:up|down|gate|gate_up)_(?:ch|)exps=q4_k' MODEL-bf16.gguf MODEL.gguf Q4_K_S

# 3. serve with the plan's expert placement
llama-server -m MODEL.gguf -ngl 0 -c 4096 -t 16
