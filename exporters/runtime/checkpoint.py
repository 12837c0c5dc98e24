"""An HF safetensors checkpoint, split in two: the dense model (loaded by transformers, with
placeholder experts) and the routed experts (read one expert at a time, :mod:`tensorfile`).

Legend: E = routed experts per layer, H = hidden size, I = expert intermediate size.

Checkpoints on disk keep each expert's projections as 2-D tensors (the hub layout, and what
transformers 5's ``save_pretrained`` writes back): Mixtral
``model.layers.{l}.block_sparse_moe.experts.{e}.w1|w3|w2.weight`` (gate, up, down),
Qwen3-MoE / OLMoE / DeepSeek-V3 ``model.layers.{l}.mlp.experts.{e}.gate_proj|up_proj|down_proj
.weight``. transformers 5 fuses them on load into ``experts.gate_up_proj [E, 2I, H]``
(gate rows first) and ``experts.down_proj [E, H, I]``; a checkpoint saved in that fused
layout is read too (one expert is one slice of the 3-D tensor).

The dense part is loaded with ``from_pretrained`` on a subclass of the model class whose MoE
blocks get parameter-less placeholder experts, so the checkpoint's expert tensors are
"unexpected keys" that transformers never reads: peak memory is the dense model only.
transformers leaves weights whose dtype is the file's as views of its memory map of the
checkpoint; once the dense weights are at the plan's format, :func:`own_mapped_weights`
copies those left into memory of the process's own, as the plan counts them: mapped pages
are page cache, which the kernel evicts under memory pressure (a memory cgroup at its limit)
and reads back from the drive at the next step that touches them.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RuntimeInputError
from .tensorfile import TensorFile, drop_cached, read_tensors

__all__ = ["ExpertSource", "find_moe_blocks", "load_dense_model", "own_mapped_weights", "read_config"]

_PER_EXPERT = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                         r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_FIX_CKPT = "point --checkpoint at a Hugging Face checkpoint directory saved with save_pretrained()"


def read_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's ``config.json`` as a dict (checks the directory first)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise RuntimeInputError("checkpoint directory not found", file=directory, fix=_FIX_CKPT)
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RuntimeInputError("checkpoint has no config.json", file=directory, fix=_FIX_CKPT) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise RuntimeInputError(f"config.json is not valid JSON ({exc})", file=path, fix=_FIX_CKPT) from None
    if not isinstance(config, dict):
        raise RuntimeInputError("config.json is not an object", file=path, fix=_FIX_CKPT)
    return config


@dataclass(frozen=True)
class _Ref:
    file: str
    key: str
    index: int | None  # expert index into a fused 3-D tensor, None for a per-expert 2-D one


class ExpertSource:
    """Routed expert weights of a safetensors checkpoint, read on demand (:mod:`tensorfile`).

    Args:
        checkpoint_dir: directory with ``*.safetensors`` (and ``model.safetensors.index.json``
            when sharded).

    ``read(hidden_layer, e)`` returns fresh CPU tensors ``gate_up [2I, H]`` (gate rows, then
    up rows: the transformers 5 layout) and ``down [H, I]`` in the checkpoint's dtype, in one
    buffer of their own, read past the page cache (no memory map; :mod:`tensorfile`);
    ``bytes_read`` counts what was read. Thread-safe (the prefetch worker reads too).
    """

    def __init__(self, checkpoint_dir: str | Path) -> None:
        self.directory = Path(checkpoint_dir)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise RuntimeInputError("no *.safetensors weights in the checkpoint", file=self.directory,
                                    fix="save the model with save_pretrained(safe_serialization=True)")
        self._files: dict[str, TensorFile] = {}
        self._refs: dict[tuple[int, int], dict[str, _Ref]] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        for path in files:
            try:
                tf = TensorFile(path)
            except OSError as exc:
                raise RuntimeInputError(f"cannot open safetensors file ({exc})", file=path, fix=_FIX_CKPT) from None
            self._files[path.name] = tf
            for key in tf.keys():
                if m := _PER_EXPERT.search(key):
                    layer, e, role = int(m.group(1)), int(m.group(2)), _ROLE[m.group(3)]
                    self._refs.setdefault((layer, e), {})[role] = _Ref(path.name, key, None)
                elif m := _FUSED.search(key):
                    layer, name = int(m.group(1)), m.group(2)
                    for e in range(tf.span(key).shape[0]):
                        role = "down" if name == "down_proj" else "gate_up"
                        self._refs.setdefault((layer, e), {})[role] = _Ref(path.name, key, e)

    def layers(self) -> dict[int, int]:
        """hidden layer -> number of experts found."""
        out: dict[int, int] = {}
        for layer, e in self._refs:
            out[layer] = max(out.get(layer, 0), e + 1)
        return out

    def has(self, hidden_layer: int, expert: int) -> bool:
        refs = self._refs.get((hidden_layer, expert), {})
        return "down" in refs and ("gate_up" in refs or {"gate", "up"} <= refs.keys())

    def read(self, hidden_layer: int, expert: int):
        """``(gate_up [2I, H], down [H, I])`` of one expert, read from the checkpoint's files."""
        refs = self._refs.get((hidden_layer, expert))
        if refs is None or not self.has(hidden_layer, expert):
            raise RuntimeInputError("expert weights not found in the checkpoint", file=self.directory,
                                    key=f"layers.{hidden_layer}.experts.{expert}",
                                    fix="use the checkpoint the plan was made for")
        parts = {"gate_up": [refs["gate_up"]] if "gate_up" in refs else [refs["gate"], refs["up"]],
                 "down": [refs["down"]]}
        out = read_tensors({name: [self._files[r.file].span(r.key, r.index) for r in rs] for name, rs in parts.items()})
        gate_up, down = out["gate_up"], out["down"]
        with self._lock:
            self.bytes_read += gate_up.numel() * gate_up.element_size() + down.numel() * down.element_size()
        return gate_up, down


def find_moe_blocks(model: Any) -> dict[int, Any]:
    """hidden layer index -> MoE block (a module with a ``gate`` router and ``experts``)."""
    from torch import nn

    found: dict[int, Any] = {}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "experts", None), nn.Module) and isinstance(getattr(module, "gate", None),
                                                                                 nn.Module):
            m = _LAYER_INDEX.search(name + ".")
            if m is not None:
                found[int(m.group(1))] = module
    return found


def load_dense_model(checkpoint_dir: str | Path, *, dtype: Any, make_placeholder: Callable[[Any, int], Any]):
    """Load the model with transformers, every MoE block's experts replaced before loading.

    Args:
        checkpoint_dir: the HF checkpoint directory.
        dtype: torch dtype for the dense weights, or ``"auto"`` (the checkpoint's).
        make_placeholder: ``(config, hidden_layer) -> nn.Module`` without parameters, put in
            place of each block's ``experts``.

    Returns:
        The model on the CPU in eval mode; its ``experts`` modules are the placeholders. Its
        weights may be views of a memory map of the checkpoint (see :func:`own_mapped_weights`).
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    read_config(checkpoint_dir)
    try:
        config = transformers.AutoConfig.from_pretrained(str(checkpoint_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise RuntimeInputError(f"transformers cannot read config.json ({str(exc).splitlines()[0]})",
                                file=checkpoint_dir, fix="use a checkpoint of a model type transformers 5 knows") from None
    try:
        base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise RuntimeInputError("not a causal language model known to transformers", file=checkpoint_dir,
                                value=config.model_type, fix="use a Mixtral, Qwen3-MoE, OLMoE or DeepSeek-V3 checkpoint") from None

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        for layer, block in find_moe_blocks(self).items():
            block.experts = make_placeholder(config, layer)

    planned = type(base.__name__, (base,), {
        "__init__": __init__,
        "__module__": base.__module__,
        # the checkpoint's routed-expert tensors stay on disk: the planned store reads them
        "_keys_to_ignore_on_load_unexpected": [r"\.experts\."],
    })
    model = planned.from_pretrained(str(checkpoint_dir), config=config, dtype=dtype, local_files_only=True)
    if not find_moe_blocks(model):
        raise RuntimeInputError("not a Mixture-of-Experts model: no block has a router (gate) and experts",
                                file=checkpoint_dir, value=config.model_type,
                                expected="Mixtral, Qwen3-MoE, OLMoE or DeepSeek-V3", fix="use an MoE checkpoint")
    return model.eval()


def own_mapped_weights(model: Any, files: list[Path]) -> int:
    """Copy ``model``'s parameters and buffers that are views of a memory map of ``files``
    into memory of the process's own, one tensor at a time (tied tensors stay tied), then drop
    the files' pages from the page cache. Returns the bytes copied (0 where the process's
    maps cannot be read: not Linux).
    """
    import torch

    paths = {str(f.resolve()) for f in files}
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") in paths:
                    ranges.append(tuple(int(x, 16) for x in fields[0].split("-")))
    except OSError:
        return 0
    copied, done = 0, {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or not any(lo <= t.data_ptr() < hi for lo, hi in ranges):
                    continue
                if id(t) not in done:
                    copy = t.detach().clone()
                    is_parameter = isinstance(t, torch.nn.Parameter)
                    done[id(t)] = torch.nn.Parameter(copy, t.requires_grad) if is_parameter else copy
                    copied += copy.numel() * copy.element_size()
                table[name] = done[id(t)]
    del done
    for f in files:
        drop_cached(f)
    return copied
