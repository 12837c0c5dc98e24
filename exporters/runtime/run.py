"""Generate text with a checkpoint run as planned, and write what was measured.

    python run.py --bundle BUNDLE --checkpoint CKPT --prompt "the cat" [--max-new-tokens 32]
    python run.py --plan plan.json --checkpoint CKPT --prompts prompts.txt --metrics-out m.json
    python run.py --bundle BUNDLE --checkpoint CKPT --prompt "the cat" --device-map gpu0=cuda:0,gpu1=cpu

A multi-GPU plan runs each MoE layer on its plan device, mapped to a torch device by the
bundle's ``devices.json`` unless ``--device-map`` (or ``$MOE_DEVICE_MAP``) says otherwise
(devices.py); stderr names each plan device's torch device and layers.

Prints each prompt's generated text on stdout (``--json``: one JSON object with the texts
and the metrics instead). Bad input: one line on stderr, exit 1; usage errors exit 2.
Works as ``python runtime/run.py`` (bundle), ``python -m runtime`` and
``python -m exporters.runtime``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package this file sits in
    _here = Path(__file__).resolve().parent
    # the script's own directory must not be on the path: its modules (kernels.py, ...) would
    # shadow top-level packages of the same names that transformers probes for
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))
    _pkg = importlib.import_module(_here.name)
else:
    _pkg = importlib.import_module(__package__)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run.py", description="Run an MoE checkpoint as planned and measure it.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="bundle directory (plan.json, kernels/)")
    src.add_argument("--plan", help="plan.json (kernels are built in a temporary directory)")
    p.add_argument("--checkpoint", required=True, help="HF safetensors checkpoint directory (with a tokenizer)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a text file, one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--metrics-out", help="write the metrics JSON here")
    p.add_argument("--kernels", help="kernels directory (default: BUNDLE/kernels, else built now)")
    p.add_argument("--routing", help="routing trace .npz known in advance (belady, static, oracle prefetch)")
    p.add_argument("--device", default="auto",
                   help="torch device for every compute device of the plan (default: auto: the bundle's devices.json, "
                        "CUDA for a GPU plan when there is one, else the CPU)")
    p.add_argument("--device-map", default=None,
                   help="torch devices for named plan devices, e.g. gpu0=cuda:0,gpu1=cpu (a multi-GPU plan runs "
                        "each layer on its device; default: $MOE_DEVICE_MAP, else the bundle's devices.json)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="activations, and dense weights unless the plan quantises them (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for CPU experts")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")
    return p


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        try:
            prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise _pkg.RuntimeInputError(f"cannot read prompts file ({exc})", file=path,
                                         fix="pass a UTF-8 text file, one prompt per line") from None
    if not prompts:
        raise _pkg.RuntimeInputError("no prompt given", key="--prompt", fix="pass --prompt TEXT or --prompts FILE")
    return prompts


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise _pkg.RuntimeInputError("must be at least 1", key="--max-new-tokens", value=args.max_new_tokens)
    prompts = _prompts(args)
    kernels = args.kernels
    if args.bundle:
        bundle = Path(args.bundle)
        if not (bundle / "plan.json").is_file():
            raise _pkg.RuntimeInputError("bundle has no plan.json", file=bundle, fix="pass a directory from planner export")
        _pkg.verify_bundle(bundle)
        plan = bundle / "plan.json"
        bundle_devices = _pkg.read_device_map(bundle)
        if kernels is None and (bundle / "kernels" / "manifest.json").is_file():
            kernels = bundle / "kernels"
    else:
        plan = Path(args.plan)
        bundle_devices = None
    plan = _pkg.read_plan(plan)  # bad input fails here, before the slow imports
    _pkg.resolve_devices(plan, device=args.device, device_map=args.device_map, bundle_map=bundle_devices)
    _pkg.read_config(args.checkpoint)
    routing = _pkg.load_routing(args.routing) if args.routing else None
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.checkpoint, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise _pkg.RuntimeInputError(f"cannot load the tokenizer ({str(exc).splitlines()[0]})", file=args.checkpoint,
                                     fix="save the tokenizer into the checkpoint directory") from None
    texts = []
    with _pkg.load_planned_model(plan, args.checkpoint, kernels_dir=kernels, device=args.device, dtype=args.dtype,
                                 threads=args.threads, routing=routing, device_map=args.device_map,
                                 bundle_devices=bundle_devices) as rt:
        eos = None if args.ignore_eos else tokenizer.eos_token_id
        for prompt in prompts:
            ids = tokenizer(prompt)["input_ids"]
            if not ids:
                raise _pkg.RuntimeInputError("prompt has no tokens", key="--prompt", value=prompt)
            out = rt.generate(ids, args.max_new_tokens, eos_token_id=eos)
            texts.append(tokenizer.decode(out, skip_special_tokens=True))
        extra = {"device": str(rt.device), "prompts": len(prompts), "plan": plan.source,
                 "device_map": {d: str(t) for d, t in rt.devices.items()}}
        metrics_text = rt.metrics.to_json(args.metrics_out, extra=extra)
    if args.json:
        print(json.dumps({"texts": texts, "metrics": json.loads(metrics_text)}, indent=1, sort_keys=True))
    else:
        for text in texts:
            print(text)
        summary = json.loads(metrics_text)
        if len(summary["devices"]) > 1:
            print("; ".join(f"{d} on {v['torch_device']}: MoE layers {','.join(map(str, v['moe_layers']))}"
                            for d, v in summary["devices"].items()), file=sys.stderr)
        tps = summary["tokens_per_s"]
        print(f"{summary['generated_tokens']} tokens, decode {tps:.2f} tok/s" if tps else
              f"{summary['generated_tokens']} tokens", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except _pkg.RuntimeInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
