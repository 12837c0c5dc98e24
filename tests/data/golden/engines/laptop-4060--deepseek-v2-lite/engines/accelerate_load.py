"""Load the model with the device_map moe-planner rounded for HF accelerate, optionally generate.

    python engines/accelerate_load.py --checkpoint CHECKPOINT_DIR [--prompt "Hello"] [--max-new-tokens 32]

Needs torch, transformers>=5 and accelerate; reads accelerate.json next to this file.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(checkpoint, offload_folder=None):
    cfg = json.loads(Path(__file__).with_name("accelerate.json").read_text(encoding="utf-8"))
    # JSON keys are strings: GPU indices back to ints
    max_memory = {int(k) if k.isdigit() else k: v for k, v in cfg["max_memory"].items()}
    return AutoModelForCausalLM.from_pretrained(
        checkpoint, device_map=cfg["device_map"], max_memory=max_memory,
        offload_folder=offload_folder or cfg["offload_folder"], dtype=getattr(torch, cfg["dtype"]))


def main():
    ap = argparse.ArgumentParser(description="Load (and run) the model with the planned device_map.")
    ap.add_argument("--checkpoint", required=True, help="HF checkpoint directory")
    ap.add_argument("--prompt", default=None, help="generate from this prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--offload-folder", default=None, help="override accelerate.json's offload_folder")
    args = ap.parse_args()
    model = load(args.checkpoint, args.offload_folder)
    print(getattr(model, "hf_device_map", None))
    if args.prompt:
        tok = AutoTokenizer.from_pretrained(args.checkpoint)
        ids = tok(args.prompt, return_tensors="pt").to(model.device)
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        print(tok.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
