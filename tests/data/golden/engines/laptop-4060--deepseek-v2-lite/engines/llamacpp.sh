#!/usr/bin/env bash
# llama.cpp rendering of a moe-planner plan for deepseek-v2-lite on laptop-4060.
# Run from a llama.cpp checkout/build; see llamacpp.json for the rounded layers and predictions.
# predicted decode: 31.91 tok/s after rounding (plan: 20.63 tok/s)
set -euo pipefail

# 1. HF checkpoint -> GGUF
python convert_hf_to_gguf.py CHECKPOINT_DIR --outtype bf16 --outfile MODEL-bf16.gguf

# 2. quantise with the plan's per-layer types
llama-quantize --token-embedding-type bf16 --output-tensor-type bf16 --tensor-type '^(?!blk\.[0-9]+\.ffn_(?:up|down|gate|gate_up)_(?:ch|)exps)=bf16' --tensor-type 'blk\.(?:1|2|3|4|6|7|8|9|10|11|12|13|14|16|19|20|23|24|25)\.ffn_(?:up|gate|gate_up)_(?:ch|)exps=q4_k' --tensor-type 'blk\.(?:1|2|3|4|6|7|8|9|10|11|12|13|14|16|19|20|23|24|25)\.ffn_down_(?:ch|)exps=iq4_nl' --tensor-type 'blk\.(?:5|15|17|18|21|22|26)\.ffn_(?:up|down|gate|gate_up)_(?:ch|)exps=bf16' MODEL-bf16.gguf MODEL.gguf Q4_K_S

# 3. serve with the plan's expert placement
llama-server -m MODEL.gguf -ngl 999 -ot 'blk\.[0-9]+\.ffn_(?:up|down|gate)_shexp=CUDA0,blk\.(?:1|2|3|4|5|6|7|8|9|10|11|12|13|14|15|16|17|19|20|23|24)\.ffn_(?:up|down|gate|gate_up)_(?:ch|)exps=CPU' -c 4096 -t 8 --no-mmap

# alternative, --n-cpu-moe only: 32.99 tok/s predicted
# llama-server -m MODEL.gguf -ngl 999 --n-cpu-moe 20 -c 4096 -t 8 --no-mmap
