"""The ``kernels/`` directory of a bundle: ONNX expert templates by format (:mod:`.templates`),
the quantised weights, and a manifest that ties them to one plan.

:func:`build_kernels` writes ``kernels/``: ``manifest.json``, one template per format and
``weights/moe{l}.safetensors`` with every quantised expert of MoE layer ``l``
(``{e}.gate_up.q`` ...), quantised once with onnxruntime's quantiser; float experts are
read from the checkpoint itself. :class:`Kernels` reads it back, checked against a plan.

The sessions that run CPU experts live in :mod:`.sessions`. The engine probe
(``exporters/engine_probe*.py``) times the runtime's own kernels through this module's names,
so the sessions' and templates' public names are importable from here too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import ExpertSource, read_config
from .errors import RuntimeInputError
from .formats import UNPACK_FORMATS, quantize
from .nested import plane_names, split_matrix
from .planfile import QUANT_FORMATS, STORED_FORMATS, RuntimePlan, parse_plan, read_plan
from .quant import QUANT_SPECS, block_size_for
# the engine probe (exporters/engine_probe*.py) imports these from here
from .sessions import CACHED_EXPERT_THREADS, CpuLayerKernel, CpuMatMulKernel, CpuStreamKernel, default_threads
from .templates import ACTIVATIONS, expert_template, float_arrays, kernel_format, matmul_template, weight_inputs
from .tensorfile import TensorFile, read_tensors

__all__ = [
    "ACTIVATIONS",
    "CACHED_EXPERT_THREADS",
    "KERNELS_FORMAT_VERSION",
    "CpuLayerKernel",
    "CpuMatMulKernel",
    "CpuStreamKernel",
    "Kernels",
    "build_kernels",
    "default_threads",
    "expert_template",
    "float_arrays",
    "kernel_format",
    "matmul_template",
    "weight_inputs",
]

KERNELS_FORMAT_VERSION = 1
_FIX_REBUILD = "rebuild them with build_kernels(plan, checkpoint, out_dir) (planner export does this)"


class Kernels:
    """A ``kernels/`` directory written by :func:`build_kernels`, checked against a plan."""

    def __init__(self, directory: str | Path, plan: RuntimePlan) -> None:
        import onnx

        from .miss_copy import copy_entry  # it reads the weights file this class opens

        self.directory = Path(directory).resolve()
        manifest_path = self.directory / "manifest.json"
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RuntimeInputError("kernels directory has no manifest.json", file=self.directory,
                                    fix=_FIX_REBUILD) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise RuntimeInputError(f"not valid JSON ({exc})", file=manifest_path, fix=_FIX_REBUILD) from None
        m = self.manifest
        if not isinstance(m, dict) or m.get("format_version") != KERNELS_FORMAT_VERSION:
            raise RuntimeInputError("unsupported kernels format version", file=manifest_path, key="format_version",
                                    value=m.get("format_version") if isinstance(m, dict) else m,
                                    expected=str(KERNELS_FORMAT_VERSION), fix=_FIX_REBUILD)
        self.hidden, self.inter = int(m["hidden_size"]), int(m["intermediate_size"])
        self.activation = m["activation"]
        self.templates = {}
        for kfmt, rel in m["templates"].items():
            self.templates[kfmt] = onnx.load(str(self._inside(rel)))
        self._weights: dict[int, Any] = {}
        by_moe = {int(k): v for k, v in m["layers"].items()}
        for layer in plan.layers:
            entry = by_moe.get(layer.moe_layer, {"experts": {}})
            built = {int(e): f for e, f in entry["experts"].items()}
            for e, fmt in enumerate(layer.format):
                if ((fmt not in UNPACK_FORMATS and kernel_format(fmt) not in self.templates)
                        or (fmt in STORED_FORMATS and built.get(e) != fmt)):
                    raise RuntimeInputError("kernels were built for another plan", file=manifest_path,
                                            key=f"layers.{layer.moe_layer}.experts.{e}", value=built.get(e),
                                            expected=fmt, fix=_FIX_REBUILD)
            nested = sorted(str(e) for e in range(layer.num_experts) if layer.planes_of(e))
            if entry.get("nested", []) != nested:  # stored as planes exactly where the plan nests
                raise RuntimeInputError("kernels were built for another plan", file=manifest_path,
                                        key=f"layers.{layer.moe_layer}.nested", value=entry.get("nested", []),
                                        expected=str(nested), fix=_FIX_REBUILD)
            if entry.get("copies") != copy_entry(layer):  # low-bit copies exactly where the plan has them
                raise RuntimeInputError("kernels were built for another plan", file=manifest_path,
                                        key=f"layers.{layer.moe_layer}.copies", value=entry.get("copies"),
                                        expected=str(copy_entry(layer)), fix=_FIX_REBUILD)
            if built or layer.miss_copy is not None:
                self._weights[layer.moe_layer] = TensorFile(self._inside(entry["file"]))

    def _inside(self, rel: str) -> Path:
        path = (self.directory / rel).resolve()
        if self.directory not in path.parents or not path.is_file():
            raise RuntimeInputError("kernel file missing or outside the kernels directory", file=self.directory,
                                    key=rel, fix=_FIX_REBUILD)
        return path

    def weights_file(self, moe_layer: int) -> TensorFile:
        """The layer's weights file (quantised experts, planes, low-bit copies)."""
        return self._weights[moe_layer]

    def quantised(self, moe_layer: int, expert: int, fmt: str) -> dict[str, Any]:
        """One quantised expert's tensors (CPU torch, in one buffer of their own; :mod:`tensorfile`)."""
        tf = self._weights[moe_layer]
        return read_tensors({name: [tf.span(f"{expert}.{name}")] for name in weight_inputs(fmt)})

    def planes(self, moe_layer: int, expert: int, which: tuple[str, ...], fmt: str = "int8") -> dict[str, Any]:
        """A nested ``fmt`` (int8, int4) expert's planes ``which`` (``("qh",)``: the high plane
        with the scales and int4's zero points; ``("ql",)``: the low plane alone; both: all of
        it), as :meth:`quantised` reads them."""
        tf = self._weights[moe_layer]
        names = [n for prefix in ("gate_up", "down") for n in plane_names(prefix, which, fmt)]
        return read_tensors({name: [tf.span(f"{expert}.{name}")] for name in names})


def build_kernels(plan_json: str | Path | Mapping[str, Any], checkpoint_dir: str | Path, out_dir: str | Path, *,
                  memory_tiers: Mapping[str, str] | None = None) -> Path:
    """Write ``out_dir`` (a bundle's ``kernels/``): templates, quantised weights, manifest.

    Args:
        plan_json: path of plan.json, or its parsed JSON object.
        checkpoint_dir: the HF safetensors checkpoint the plan is for.
        out_dir: created if missing; existing files of the same names are replaced.
        memory_tiers: optional memory id -> device | host | disk (see planfile).

    Returns:
        The path of ``out_dir/manifest.json``. Deterministic: the same plan and checkpoint
        give the same bytes (safetensors and ONNX files carry no timestamps).
    """
    from safetensors.numpy import save_file

    from .miss_copy import copy_arrays, copy_entry

    if isinstance(plan_json, Mapping):
        plan = parse_plan(dict(plan_json), memory_tiers=memory_tiers)
    else:
        plan = read_plan(plan_json, memory_tiers=memory_tiers)
    config = read_config(checkpoint_dir)
    source = ExpertSource(checkpoint_dir)
    first = plan.layers[0]
    gate_up, down = source.read(first.hidden_layer, 0)
    hidden, inter = int(down.shape[0]), int(down.shape[1])
    activation = str(config.get("hidden_act", "silu"))
    out = Path(out_dir)
    (out / "weights").mkdir(parents=True, exist_ok=True)
    templates = {}
    for kfmt in sorted({kernel_format(f) for f in plan.formats if f not in UNPACK_FORMATS}):  # no ORT kernel
        rel = f"expert_{kfmt}_h{hidden}_i{inter}.onnx"
        (out / rel).write_bytes(expert_template(kfmt, hidden, inter, activation).SerializeToString())
        templates[kfmt] = rel
    layers = {}
    for layer in plan.layers:
        quantised = {e: f for e, f in enumerate(layer.format) if f in STORED_FORMATS}
        entry: dict[str, Any] = {"hidden_layer": layer.hidden_layer, "experts": {str(e): f for e, f in quantised.items()}}
        if any(layer.planes):
            entry["nested"] = sorted(str(e) for e in quantised if layer.planes_of(e))  # stored as planes
        if layer.miss_copy is not None:
            entry["copies"] = copy_entry(layer)  # low-bit copies (miss_copy.py)
        if quantised or layer.miss_copy is not None:
            arrays: dict[str, np.ndarray] = copy_arrays(layer, source, quantize)
            for e, fmt in quantised.items():
                gate_up, down = source.read(layer.hidden_layer, e)
                for prefix, w in (("gate_up", gate_up), ("down", down)):
                    tensors = quantize(w.float().numpy(), fmt, prefix)
                    if layer.planes_of(e):  # nested: the codes as their two half-width planes (nested.py)
                        tensors = split_matrix(tensors, prefix, fmt)
                    for name, a in tensors.items():
                        arrays[f"{e}.{name}"] = a
            rel = f"weights/moe{layer.moe_layer}.safetensors"
            save_file(arrays, str(out / rel), metadata={"format": "moe-planner-kernels"})
            entry["file"] = rel
        layers[str(layer.moe_layer)] = entry
    manifest = {
        "format_version": KERNELS_FORMAT_VERSION,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "activation": activation,
        "templates": templates,
        "quant": {f: {"bits": QUANT_SPECS[f].bits, "symmetric": QUANT_SPECS[f].symmetric,
                      "accuracy_level": QUANT_SPECS[f].accuracy_level,
                      "block_size": {"gate_up": block_size_for(hidden), "down": block_size_for(inter)}}
                  for f in QUANT_FORMATS if f in plan.formats},
        "layers": layers,
        "files_sha256": {rel: _sha256(out / rel) for rel in sorted(
            [*templates.values(), *(v["file"] for v in layers.values() if "file" in v)])},
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

