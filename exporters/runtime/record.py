"""Run prompts through a bundle and record what the router chose, for `planner verify`.

    result = run_and_record("bundle/", "ckpt/", ["the cat sat"], max_new_tokens=16)

returns the metrics summary (times without the first, warm-up prompt), the routing the
runtime saw as ``expert_ids [T, L, K]`` and each prompt's (prompt tokens, decode tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RuntimeInputError
from .runtime import load_planned_model

__all__ = ["run_and_record"]


def run_and_record(bundle_dir: str | Path, checkpoint: str | Path, prompts: Sequence[str],
                   max_new_tokens: int) -> dict[str, Any]:
    """Generate greedily for ``prompts`` (the first one a warm-up whose times are left out)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    bundle = Path(bundle_dir)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise RuntimeInputError(f"cannot load the tokenizer ({str(exc).splitlines()[0]})", file=checkpoint,
                                fix="save the tokenizer into the checkpoint directory") from None
    kernels = bundle / "kernels" if (bundle / "kernels" / "manifest.json").is_file() else None
    seqs: list[tuple[int, int]] = []
    with load_planned_model(bundle / "plan.json", checkpoint, kernels_dir=kernels, device="auto") as rt:
        calls: list[list[np.ndarray]] = [[] for _ in rt.stores]
        for i, store in enumerate(rt.stores):
            store.register_forward_pre_hook(lambda mod, args, i=i: calls[i].append(args[1].detach().cpu().numpy()))
        for text in prompts:
            ids = tokenizer(text)["input_ids"]
            out = rt.generate(ids, max_new_tokens)
            seqs.append((len(ids), len(out) - 1))  # the last generated token is never fed back
        measured = rt.metrics.summary()
        skip = seqs[0][1]  # decode steps of the warm-up prompt
        measured["ttft_s"] = float(np.mean(rt.metrics.ttft_s[1:]))
        measured["tpot_s"] = float(np.mean(rt.metrics.tpot_s[skip:])) if len(rt.metrics.tpot_s) > skip else None
        measured["tokens_per_s"] = 1.0 / measured["tpot_s"] if measured["tpot_s"] else None
    routing = np.stack([np.concatenate(c) for c in calls], axis=1).astype(np.int64)  # [T, L, K]
    return {"measured": measured, "routing": routing, "sequences": seqs}
