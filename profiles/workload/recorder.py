"""Record routing traces from a Hugging Face transformers MoE model (the ``[runtime]`` extra).

Legend: T = tokens, L = MoE layers (in model order), K = experts per token (top-k),
E = routed experts per layer, S = sequences (one per prompt), P = prompt tokens,
N = generated tokens per prompt.

What is recorded is what the model used, not a re-implementation of its routing. In
transformers 5 every MoE block computes its routing (softmax top-k for Mixtral, Qwen3-MoE
and OLMoE; sigmoid scores plus a correction bias and group-limited top-k for DeepSeek-V3)
and then calls its experts module as ``experts(hidden_states, top_k_index, top_k_weights)``:
``top_k_index [rows, K]`` are the experts that run for each row (token) and
``top_k_weights [rows, K]`` what their outputs are multiplied by. A forward pre-hook on each
``experts`` module captures those two tensors. Where the routing happens varies between
families and releases (the router module returns the selection in 5.2x; in 5.0 DeepSeek-V3
selected in the MoE block itself), the experts' inputs do not.

Each prompt is one sequence, run alone (batch 1, so no padding rows reach the routers):
one prefill forward over its P tokens (phase 0), then N greedy decode steps with the KV
cache, one token per forward (phase 1). Generated token i is recorded when it is fed back
in, so all N generated tokens are recorded (the model runs N + 1 forwards per prompt).
Generation never stops early at an end-of-sequence token: every sequence has P + N tokens.

torch and transformers are imported inside functions: the core package imports without them.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from .trace import DECODE, PREFILL, Trace

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DTYPES", "TESTED_MODEL_TYPES", "read_prompts", "check_generate_tokens", "load_model",
           "find_moe_experts", "record_routing", "record_trace"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Model types whose recording is checked against the router by tests/test_recorder.py.
TESTED_MODEL_TYPES = ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3")
# Config keys that hold the number of routed experts (transformers aliases most of them).
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
# Whether a family renormalises its top-k weights when its config has no norm_topk_prob.
_ALWAYS_NORMALISED = {"mixtral": True}
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_RUNTIME_FIX = "pip install torch==2.13.0 && pip install 'moe-planner[runtime]'"


def read_prompts(path: str | Path) -> list[str]:
    """Read a prompts file: one prompt per line, blank lines skipped.

    Args:
        path: a UTF-8 text file.

    Returns:
        The prompts in file order, without their line endings.

    Raises:
        InputError: the file is missing, unreadable, not UTF-8 or holds no prompt.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise InputError(f"prompts file {what}", file=path, expected="a text file with one prompt per line",
                         fix="check the --prompts path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"prompts file is not UTF-8 text (byte {exc.start})", file=path,
                         fix="save the file as UTF-8") from None
    except OSError as exc:
        raise InputError(f"cannot read prompts file ({exc.strerror})", file=path, fix="check its permissions") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError("prompts file holds no prompt", file=path, expected="at least one non-blank line",
                         fix="write one prompt per line")
    return prompts


def check_generate_tokens(generate_tokens: int) -> None:
    """Raise :class:`InputError` unless ``generate_tokens`` (``--generate``) is >= 0."""
    if generate_tokens < 0:
        raise InputError("must not be negative", key="--generate", value=generate_tokens,
                         expected="a token count >= 0", fix="pass --generate 0 to record prompts only")


def _check_model_dir(model_dir: Path) -> dict[str, Any]:
    """The directory's ``config.json`` as a dict; checks that need neither torch nor transformers."""
    if not model_dir.is_dir():
        what = "is a file, not a directory" if model_dir.exists() else "not found"
        raise InputError(f"model directory {what}", file=model_dir,
                         expected="a directory with config.json, safetensors weights and a tokenizer",
                         fix="point --model at a local Hugging Face checkpoint directory")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise InputError("model directory has no config.json", file=model_dir,
                         expected="a Hugging Face checkpoint directory",
                         fix="download or save the checkpoint with save_pretrained() into this directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"config.json is not valid JSON ({exc})", file=config_path, fix="restore the file") from None
    if not isinstance(config, dict):
        raise InputError("config.json is not a JSON object", file=config_path, fix="restore the file")
    return config


def _import_runtime() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise InputError(f"recording needs the runtime extra ({exc.name} is not installed)",
                         fix=_RUNTIME_FIX) from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise InputError("recording needs transformers 5 (MoE blocks with separate experts modules)",
                         value=transformers.__version__, expected="transformers>=5,<6",
                         fix="pip install 'transformers>=5,<6'")
    return torch, transformers


def load_model(model_dir: str | Path, *, device: str = "cpu", dtype: str = "auto") -> tuple[Any, Any]:
    """Load a local MoE checkpoint and its tokenizer as a real deployment would.

    Only local files are read (no hub access), weights only from safetensors (no pickle) and
    no remote code runs.

    Args:
        model_dir: a directory with ``config.json``, ``*.safetensors`` and tokenizer files.
        device: torch device for the weights, e.g. ``"cpu"``, ``"cuda:0"`` (loaded on the CPU, then moved).
        dtype: one of :data:`DTYPES`; ``"auto"`` keeps the checkpoint's dtype.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        InputError: missing directory or files, a non-MoE architecture, missing runtime extra.
    """
    model_dir = Path(model_dir)
    raw = _check_model_dir(model_dir)
    if dtype not in DTYPES:
        raise InputError("unknown dtype", key="--dtype", value=dtype, expected=", ".join(DTYPES),
                         fix="pick one of the listed dtypes")
    torch, transformers = _import_runtime()
    config_file = model_dir / "config.json"
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"transformers cannot read this config ({_first_line(exc)})", file=config_file,
                         key="model_type", value=raw.get("model_type"),
                         expected=f"a model type transformers {transformers.__version__} knows",
                         fix="upgrade transformers or check model_type") from None
    if _routed_experts(config) is None:
        raise InputError("not a Mixture-of-Experts model: the config has no routed experts", file=config_file,
                         key="model_type", value=config.model_type,
                         expected=f"an MoE architecture (tested: {', '.join(TESTED_MODEL_TYPES)})",
                         fix="record traces from an MoE checkpoint")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, use_safetensors=True, trust_remote_code=False,
            dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the model weights ({_first_line(exc)})", file=model_dir,
                         expected="*.safetensors weights matching config.json (pickled .bin weights are not read)",
                         fix="convert the checkpoint to safetensors") from None
    try:
        model.to(torch.device(device))
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise InputError(f"cannot move the model to this device ({_first_line(exc)})", key="--device",
                         value=device, expected="a torch device available here, e.g. cpu or cuda:0",
                         fix="pick another --device") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"cannot load the tokenizer ({_first_line(exc)})", file=model_dir,
                         expected="tokenizer files (tokenizer.json, tokenizer_config.json)",
                         fix="save the tokenizer into the model directory with save_pretrained()") from None
    model.eval()
    return model, tokenizer


def find_moe_experts(model: Any) -> list[tuple[int, Any]]:
    """The experts module of every MoE block, in model order.

    An MoE block is a module with both a ``gate`` (router) and an ``experts`` child whose
    ``forward(hidden_states, top_k_index, top_k_weights)`` runs the chosen experts.

    Args:
        model: a transformers model.

    Returns:
        ``[(hidden_layer_index, experts_module)]`` sorted by hidden layer, one per MoE layer.

    Raises:
        InputError: no MoE block, one outside the decoder's ``layers`` list, or experts kept
            as a list of modules (the transformers 4 layout).
    """
    from torch import nn

    found: list[tuple[int, Any]] = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or not isinstance(getattr(module, "gate", None), nn.Module):
            continue
        if isinstance(experts, (nn.ModuleList, nn.ModuleDict)):
            raise InputError("experts kept as a list of modules are not supported", key=f"{name}.experts",
                             value=type(module).__name__, expected="one experts module called with the top-k",
                             fix="use transformers>=5,<6")
        match = _LAYER_INDEX.search(f"{name}.experts")
        if match is None:
            raise InputError("MoE block outside the decoder layers is not supported", key=name,
                             expected="MoE blocks under model.layers[i]", fix="report this model type")
        found.append((int(match.group(1)), experts))
    layers = [layer for layer, _ in found]
    if not found:
        raise InputError("not a Mixture-of-Experts model: no module has a router (gate) and experts",
                         value=type(model).__name__,
                         expected=f"an MoE architecture (tested: {', '.join(TESTED_MODEL_TYPES)})",
                         fix="record traces from an MoE checkpoint")
    if len(set(layers)) != len(layers):
        raise InputError("more than one MoE block in a decoder layer is not supported", value=type(model).__name__,
                         fix="report this model type")
    return sorted(found, key=lambda item: item[0])


def record_routing(
    model: Any,
    sequences: Sequence[Sequence[int]],
    *,
    generate_tokens: int,
    seed: int = 0,
    model_name: str = "",
    source: str = "",
    progress: Callable[[int, int], None] | None = None,
    on_inputs: Callable[[int, "torch.Tensor", "torch.Tensor"], None] | None = None,
) -> Trace:
    """Run tokenised prompts through a loaded model and record every token's routing.

    Args:
        model: a transformers causal-LM MoE model (see :func:`load_model`); put in eval mode.
        sequences: ``[S]`` lists of prompt token ids, one per sequence.
        generate_tokens: N, greedy tokens generated (and recorded) after each prompt.
        seed: seeds torch before recording (greedy decoding needs no randomness; this
            pins anything else that might draw from the generator).
        model_name: stored as the trace's ``model``.
        source: stored as the trace's ``source``.
        progress: called as ``progress(done_sequences, total_sequences)``.
        on_inputs: called at every experts call as ``on_inputs(moe_layer, hidden_states
            [rows, H], top_k_index [rows, K])`` with the routed experts' inputs (what
            ``planner quality measure`` runs the experts on); the tensors are the model's own,
            copy what you keep.

    Returns:
        A :class:`Trace` with ``expert_ids [T, L, K]``, ``gate_weights [T, L, K]`` (float32,
        exactly what the expert outputs were multiplied by), ``seq_lens [S]`` (P_s + N),
        ``phase [T]`` and ``layer_map [L]``.

    Raises:
        InputError: negative ``generate_tokens``, an empty sequence, or a model whose
            experts do not take ``(hidden_states, top_k_index, top_k_weights)``.
    """
    import torch

    check_generate_tokens(generate_tokens)
    if not sequences:
        raise InputError("no prompt to record", expected="at least one prompt", fix="add prompts")
    for s, ids in enumerate(sequences):
        if len(ids) == 0:
            raise InputError(f"sequence {s} has no tokens", key=f"sequences[{s}]",
                             fix="remove the prompt or add text to it")
    blocks = find_moe_experts(model)
    model.eval()  # no router jitter, no dropout
    layer_map = tuple(layer for layer, _ in blocks)
    captured: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in blocks]  # per MoE layer, per call

    def make_hook(l: int, experts: Any) -> Callable:
        signature = inspect.signature(experts.forward)

        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            hidden, index, weights = _experts_routing_args(signature, module, args, kwargs)
            if on_inputs is not None:
                on_inputs(l, hidden, index)
            captured[l].append((index.detach().to("cpu", torch.int64), weights.detach().to("cpu", torch.float32)))
        return hook

    handles = [experts.register_forward_pre_hook(make_hook(l, experts), with_kwargs=True)
               for l, (_, experts) in enumerate(blocks)]
    ids_rows: list[np.ndarray] = []  # per forward: [n, L, K]
    weight_rows: list[np.ndarray] = []
    seq_lens: list[int] = []
    phase: list[np.ndarray] = []
    device = _input_device(model)
    torch.manual_seed(seed)
    try:
        with torch.inference_mode():
            for s, prompt in enumerate(sequences):
                # 1. Prefill: all P prompt tokens in one forward; keep only the last logits.
                input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # [1, P]
                out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
                _collect(captured, len(prompt), ids_rows, weight_rows)
                # 2. Decode: feed each greedy token back, one forward per token, with the KV cache.
                for _ in range(generate_tokens):
                    next_id = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)  # [1, 1]
                    out = model(input_ids=next_id, past_key_values=out.past_key_values, use_cache=True,
                                logits_to_keep=1)
                    _collect(captured, 1, ids_rows, weight_rows)
                seq_lens.append(len(prompt) + generate_tokens)
                phase.append(np.array([PREFILL] * len(prompt) + [DECODE] * generate_tokens, np.uint8))
                if progress is not None:
                    progress(s + 1, len(sequences))
    finally:
        for handle in handles:
            handle.remove()
    expert_ids = np.concatenate(ids_rows)  # [T, L, K]
    num_experts = int(getattr(blocks[0][1], "num_experts", 0)) or _routed_experts(model.config)
    config = model.config
    scale = float(getattr(config, "routed_scaling_factor", 1.0) or 1.0)
    normalised = getattr(config, "norm_topk_prob", _ALWAYS_NORMALISED.get(config.model_type))
    meta: dict[str, Any] = dict(
        model_type=config.model_type,
        architecture=type(model).__name__,
        hidden_layers=int(config.num_hidden_layers),
        top_k=int(expert_ids.shape[2]),
        gate_weights_scale=scale,
        generate_tokens=int(generate_tokens),
        decoding="greedy, KV cache, batch 1, no early stop at end-of-sequence",
        recorded_at=f"{type(blocks[0][1]).__name__} inputs (top_k_index, top_k_weights)",
        seed=int(seed),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        device=str(device),
        **_versions(),
    )
    if normalised is not None:
        # True: the K weights of a token sum to gate_weights_scale (renormalised top-k).
        meta["gate_weights_normalised"] = bool(normalised)
    if config.model_type not in TESTED_MODEL_TYPES:
        meta["notes"] = f"model type {config.model_type!r} is not among the tested {list(TESTED_MODEL_TYPES)}"
    return Trace(
        expert_ids=expert_ids, seq_lens=np.array(seq_lens, np.int64), phase=np.concatenate(phase),
        num_experts=num_experts, layer_map=layer_map, gate_weights=np.concatenate(weight_rows),
        model=model_name, source=source, meta=meta,
    )


def record_trace(
    model_dir: str | Path,
    prompts: Sequence[str],
    *,
    generate_tokens: int = 32,
    device: str = "cpu",
    dtype: str = "auto",
    seed: int = 0,
    prompts_file: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Trace:
    """Load a local checkpoint, tokenise ``prompts`` and record their routing.

    Args:
        model_dir: local Hugging Face checkpoint directory (see :func:`load_model`).
        prompts: ``[S]`` prompt texts, one sequence each (see :func:`read_prompts`).
        generate_tokens: N, greedy tokens generated and recorded per prompt (default 32).
        device: torch device for the model (default ``"cpu"``).
        dtype: one of :data:`DTYPES` (default ``"auto"``: the checkpoint's dtype).
        seed: torch seed (default 0).
        prompts_file: where the prompts came from, for ``source`` and error messages.
        progress: called as ``progress(done_sequences, total_sequences)``.

    Returns:
        The recorded :class:`Trace`; ``model`` is the directory's name.

    Raises:
        InputError: any bad input, before the model is loaded where possible.
    """
    model_dir = Path(model_dir)
    check_generate_tokens(generate_tokens)
    if not prompts:
        raise InputError("no prompt to record", file=prompts_file, expected="at least one prompt", fix="add prompts")
    model, tokenizer = load_model(model_dir, device=device, dtype=dtype)
    sequences = [list(tokenizer(text)["input_ids"]) for text in prompts]
    max_positions = getattr(model.config, "max_position_embeddings", None)
    for s, ids in enumerate(sequences):
        if not ids:
            raise InputError(f"prompt {s + 1} tokenises to no tokens", file=prompts_file, value=prompts[s][:40],
                             fix="remove the prompt or add text to it")
        if max_positions and len(ids) + generate_tokens > max_positions:
            raise InputError(f"prompt {s + 1} plus --generate exceeds the model's context",
                             file=prompts_file, value=len(ids) + generate_tokens,
                             expected=f"at most max_position_embeddings = {max_positions} tokens",
                             fix="shorten the prompt or lower --generate")
    where = f" on {prompts_file}" if prompts_file is not None else ""
    return record_routing(
        model, sequences, generate_tokens=generate_tokens, seed=seed,
        model_name=model_dir.resolve().name,
        source=f"recorded from {model_dir}{where} with transformers",
        progress=progress,
    )


def _experts_routing_args(signature: inspect.Signature, module: Any, args: tuple,
                          kwargs: dict) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """``(hidden_states [rows, H], top_k_index [rows, K], top_k_weights [rows, K])`` from an
    experts module's call."""
    import torch

    try:
        bound = signature.bind(*args, **kwargs)
        values = list(bound.arguments.values())
        hidden, index, weights = values[0], values[1], values[2]
    except (TypeError, IndexError):
        hidden = index = weights = None
    ok = (isinstance(index, torch.Tensor) and isinstance(weights, torch.Tensor) and index.ndim == 2
          and not index.is_floating_point() and weights.is_floating_point() and weights.shape == index.shape)
    if not ok:
        raise InputError("this model's experts are not called as experts(hidden_states, top_k_index, top_k_weights)",
                         value=type(module).__name__,
                         expected=f"an MoE block like those of {', '.join(TESTED_MODEL_TYPES)}",
                         fix="report this model type")
    return hidden, index, weights


def _collect(captured: list[list], rows: int, ids_rows: list[np.ndarray], weight_rows: list[np.ndarray]) -> None:
    """Move one forward's captures (one call per MoE layer, ``rows`` tokens each) into the output lists."""
    for l, calls in enumerate(captured):
        if len(calls) != 1 or calls[0][0].shape[0] != rows:
            shapes = [tuple(index.shape) for index, _ in calls]
            raise RuntimeError(f"MoE layer {l}: expected one experts call with {rows} rows, saw {shapes}")
    ids_rows.append(np.stack([calls[0][0].numpy() for calls in captured], axis=1))  # [rows, L, K]
    weight_rows.append(np.stack([calls[0][1].numpy() for calls in captured], axis=1))
    for calls in captured:
        calls.clear()


def _routed_experts(config: Any) -> int | None:
    for key in _EXPERT_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _input_device(model: Any) -> "torch.device":
    return model.get_input_embeddings().weight.device


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"transformers_version": transformers.__version__, "torch_version": torch.__version__}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__
