#!/usr/bin/env bash
# llama.cpp rendering of a moe-planner plan for mixtral-8x7b on desktop-4090.
# Run from a llama.cpp checkout/build; see llamacpp.json for the rounded layers and predictions.
# predicted decode: 17.99 tok/s after rounding (plan: 7.18 tok/s)
set -euo pipefail

# 1. HF checkpoint -> GGUF
python convert_hf_to_gguf.py CHECKPOINT_DIR --outtype bf16 --outfile MODEL-bf16.gguf

# 2. quantise with the plan's per-layer types
llama-quantize --token-embedding-type bf16 --output-tensor-type bf16 --tensor-type '^(?!blk\.[0-9]+\.ffn_(?:up|down|gate|gate_up)_(?:ch|)exps)=bf16' --tensor-type 'blk\.(?:0|1|2|3|4|5|6|7|8|10|11|13|14|15|18|19|20|21|22|23|24|26|27|28|29|30|31)\.ffn_(?:up|down|gate|gate_up)_(?:ch|)exps=q4_k' --tensor-type 'blk\.(?:9|12|16|17|25)\.ffn_(?:up|down|gate|gate_up)_(?:ch|)exps=bf16' MODEL-bf16.gguf MODEL.gguf Q4_K_S

# 3. serve with the plan's expert placement
llama-server -m MODEL.gguf -ngl 999 -ot 'blk\.(?:0|1|2|3|4|5|6|7|8|10|11|13|14|15|21|22|23|24|28|30)\.ffn_(?:up|down|gate|gate_up)_(?:ch|)exps=CPU' -c 4096 -t 16 --no-mmap

# alternative, --n-cpu-moe only: 17.60 tok/s predicted
# llama-server -m MODEL.gguf -ngl 999 --n-cpu-moe 15 -c 4096 -t 16 --no-mmap
