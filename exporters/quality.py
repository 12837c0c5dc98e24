"""Measure each routed expert's output error at each format (``planner quality measure``).

Legend: L = MoE layers, E = routed experts per layer, H = hidden size, I = expert
intermediate size, n = sampled tokens of one expert (at most ``tokens_per_expert``).

1. The checkpoint runs the prompts as ``planner trace record`` runs them (fp32 weights,
   :func:`profiles.workload.recorder.record_routing`); a hook on each experts module keeps,
   per (layer, expert), the first ``tokens_per_expert`` hidden states the router sent it
   (prefill and decode tokens in the order they ran).
2. Each expert's weights are read from the checkpoint as the bundle runtime reads them
   (:class:`exporters.runtime.checkpoint.ExpertSource`: ``gate_up [2I, H]``, ``down [H, I]``),
   and run in fp32: ``y = down @ (act(gate x) * (up x))``.
3. At each format the two matrices are quantised and unpacked by the runtime's own code
   (:func:`exporters.runtime.formats.quantize` / ``dequantize``: onnxruntime's MatMulNBits
   quantiser for int8/int4, fp8 e4m3 with 128x128 block scales, the project's packers for
   fp6/fp4/mxfp4/int3/int2/ternary; bf16/fp16 a torch cast), the expert runs again, and the
   error is ``sqrt(sum ||y_q - y||^2 / sum ||y||^2)`` over its n tokens (:mod:`profiles.quality`).
4. Super-expert candidates (Su et al. 2025, arXiv 2507.23279, find them by the extreme
   activation outliers of their down_proj output): an expert is flagged when its largest
   down_proj output magnitude over its tokens exceeds ``outlier_factor`` (default 10) times
   the median of that figure over its layer's sampled experts. The paper's own threshold is
   not reproduced; the factor is this tool's choice and is written into the file.

torch and transformers are imported inside functions (the ``[runtime]`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from profiles.errors import InputError
from profiles.quality import SCHEMA

__all__ = ["MEASURABLE", "DEFAULT_TOKENS_PER_EXPERT", "DEFAULT_OUTLIER_FACTOR", "capture_expert_inputs",
           "measure_quality"]

CASTS = ("fp32", "bf16", "fp16")
MEASURABLE = CASTS + ("int8", "int4", "fp8", "fp6", "fp4", "mxfp4", "int3", "int2", "ternary")
DEFAULT_TOKENS_PER_EXPERT = 256
DEFAULT_OUTLIER_FACTOR = 10.0
METRIC = "sqrt(sum_t ||y_q - y||^2 / sum_t ||y||^2) over the expert's sampled tokens (normalised RMS)"


def capture_expert_inputs(model: Any, sequences: Sequence[Sequence[int]], *, generate_tokens: int,
                          tokens_per_expert: int, seed: int = 0) -> tuple[list[list[Any]], tuple[int, ...]]:
    """Run ``sequences`` through ``model`` and keep each expert's first routed inputs.

    Returns:
        ``(inputs, layer_map)``: ``inputs[l][e]`` a float32 CPU tensor ``[n, H]`` (n <= the
        bound; ``[0, H]`` for an expert never routed to), ``layer_map[l]`` the hidden layer.
    """
    import torch

    from profiles.workload.recorder import record_routing

    kept: dict[tuple[int, int], list[Any]] = {}
    count: dict[tuple[int, int], int] = {}
    hidden_size = [0]

    def on_inputs(l: int, hidden: Any, index: Any) -> None:
        x = hidden.reshape(-1, hidden.shape[-1])
        hidden_size[0] = x.shape[-1]
        for e in torch.unique(index).tolist():
            left = tokens_per_expert - count.get((l, e), 0)
            if left <= 0:
                continue
            rows = (index == e).any(dim=-1).nonzero().flatten()[:left]
            kept.setdefault((l, e), []).append(x[rows].detach().to("cpu", torch.float32).clone())
            count[(l, e)] = count.get((l, e), 0) + len(rows)

    trace = record_routing(model, sequences, generate_tokens=generate_tokens, seed=seed, on_inputs=on_inputs)
    L, E = trace.num_layers, trace.num_experts
    empty = torch.zeros(0, hidden_size[0])
    inputs = [[torch.cat(kept[(l, e)]) if (l, e) in kept else empty for e in range(E)] for l in range(L)]
    return inputs, tuple(trace.layer_map)


def _roundtrip(weight: Any, fmt: str) -> Any:
    """``weight`` ``[N, K]`` stored at ``fmt`` and unpacked to float32 as the runtime does."""
    import torch

    if fmt in CASTS:
        return weight.to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[fmt])).float()
    from .runtime.formats import dequantize, quantize

    arrays = quantize(weight.numpy(), fmt, "w")
    return dequantize({k: torch.from_numpy(v) for k, v in arrays.items()}, "w", fmt, weight.shape[1]).float()


def _run(x: Any, gate_up: Any, down: Any, act: Callable) -> tuple[Any, Any]:
    """``(down input [n, I], output [n, H])`` of one expert."""
    g, u = (x @ gate_up.T).chunk(2, dim=-1)
    h = act(g) * u
    return h, h @ down.T


def measure_quality(checkpoint_dir: str | Path, prompts: Sequence[str], formats: Sequence[str], *,
                    model_name: str, model_digest: str, generate_tokens: int = 0,
                    tokens_per_expert: int = DEFAULT_TOKENS_PER_EXPERT,
                    outlier_factor: float = DEFAULT_OUTLIER_FACTOR, seed: int = 0,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Measure every routed expert of ``checkpoint_dir`` at ``formats``; returns the quality
    file's JSON object (:class:`profiles.quality.QualityFile`); ``prompts`` run as in
    ``planner trace record`` (one sequence each, then ``generate_tokens`` greedy tokens)."""
    import torch
    from transformers.activations import ACT2FN

    from profiles.workload.recorder import load_model

    from .runtime.checkpoint import ExpertSource

    bad = [fm for fm in formats if fm not in MEASURABLE]
    if bad:
        raise InputError("the runtime has no quantiser for this format", key="--formats", value=bad[0],
                         expected=", ".join(MEASURABLE), fix="measure formats the bundle runtime runs")
    if tokens_per_expert < 1:
        raise InputError("must be at least 1", key="--tokens-per-expert", value=tokens_per_expert,
                         fix="sample at least one token per expert")
    model, tokenizer = load_model(checkpoint_dir, dtype="float32")
    sequences = [list(tokenizer(text)["input_ids"]) for text in prompts]
    limit = getattr(model.config, "max_position_embeddings", None)
    for i, ids in enumerate(sequences):
        if not ids or (limit and len(ids) + generate_tokens > limit):
            raise InputError(f"prompt {i + 1} is empty or longer than the model's context with --generate",
                             value=len(ids) + generate_tokens, expected=f"1 to {limit} tokens",
                             fix="shorten the prompt or lower --generate")
    act_name = getattr(model.config, "hidden_act", "silu")
    if act_name != "silu":
        raise InputError("expert activation not supported", file=Path(checkpoint_dir) / "config.json",
                         key="hidden_act", value=act_name, expected="silu (the runtime's experts)",
                         fix="measure a checkpoint the bundle runtime runs")
    act = ACT2FN[act_name]
    torch.manual_seed(seed)
    inputs, layer_map = capture_expert_inputs(model, sequences, generate_tokens=generate_tokens,
                                              tokens_per_expert=tokens_per_expert, seed=seed)
    del model
    source = ExpertSource(checkpoint_dir)
    layers = []
    with torch.inference_mode():
        for l, hidden_layer in enumerate(layer_map):
            experts = []
            for e, x in enumerate(inputs[l]):
                gate_up, down = (w.float() for w in source.read(hidden_layer, e))
                entry: dict[str, Any] = {"expert": e, "tokens": int(x.shape[0]), "error": {},
                                         "down_in_max_abs": 0.0, "down_out_max_abs": 0.0}
                if x.shape[0]:
                    h, y = _run(x, gate_up, down, act)
                    entry["down_in_max_abs"] = float(h.abs().max())
                    entry["down_out_max_abs"] = float(y.abs().max())
                    ref = float((y.double() ** 2).sum())
                    for fm in formats:
                        _, yq = _run(x, _roundtrip(gate_up, fm), _roundtrip(down, fm), act)
                        diff = float(((yq.double() - y.double()) ** 2).sum())
                        entry["error"][fm] = float(np.sqrt(diff / ref)) if ref > 0 else 0.0
                experts.append(entry)
            _flag_super_experts(experts, outlier_factor)
            layers.append({"moe_layer": l, "hidden_layer": int(hidden_layer), "experts": experts})
            if progress is not None:
                progress(l + 1, len(layer_map))
    return {"schema": SCHEMA, "model": model_name, "model_digest": model_digest, "checkpoint": str(checkpoint_dir),
            "formats": list(formats), "metric": METRIC, "tokens_per_expert": int(tokens_per_expert),
            "super_expert_rule": f"down_proj output max-abs > {outlier_factor:g} x the layer's median over its "
                                 "sampled experts (Super Experts, arXiv 2507.23279: extreme down_proj output outliers)",
            "outlier_factor": float(outlier_factor), "prompts": len(sequences), "layers": layers}


def _flag_super_experts(experts: list[dict[str, Any]], factor: float) -> None:
    peaks = np.array([ex["down_out_max_abs"] for ex in experts if ex["tokens"]])
    median = float(np.median(peaks)) if len(peaks) else 0.0
    for ex in experts:
        ex["super_expert"] = bool(ex["tokens"] and median > 0 and ex["down_out_max_abs"] > factor * median)
