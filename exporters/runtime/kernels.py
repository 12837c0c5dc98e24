"""ONNX expert kernels: one template per (format, shape), the quantised weights, and the
ONNX Runtime sessions that run CPU experts.

Legend: T = tokens routed to the expert, H = hidden size, I = expert intermediate size.

An expert is ``y = down(silu(x @ gate^T) * (x @ up^T))``. Its ONNX template takes
``x [T, H]`` and the expert's weights as graph inputs and returns ``y [T, H]``:

- float formats (``fp32``/``bf16``/``fp16``; the CPU computes them in float32):
  ``MatMul(x, gate_up.t [H, 2I])`` ... ``MatMul(h, down.t [I, H])``;
- ``int8``/``int4``: the same graph passed through onnxruntime's ``MatMulNBitsQuantizer``,
  which turns each MatMul into ``MatMulNBits`` (inputs ``*.q``, ``*.scales``, ``*.zp``).

Two ways to run them, both ONNX Runtime on the CPU:

- :class:`CpuLayerKernel`, for the CPU experts of one layer held in host memory: one
  session per layer whose graph holds one copy of the template per expert, the weights
  given as initializers (``SessionOptions.add_external_initializers``) so ORT pre-packs them
  once; one ``run`` per layer step computes every CPU expert of the step.
- :class:`CpuStreamKernel`, for CPU experts homed on disk: the template itself, the weights
  read on demand and fed as inputs (no pre-packing, slower per call, no resident copy).

:class:`CpuMatMulKernel` runs one int8/int4 dense matrix (:func:`matmul_template`, see
dense.py) the way :class:`CpuLayerKernel` runs experts.

:func:`build_kernels` writes ``kernels/``: ``manifest.json``, one template per format and
``weights/moe{l}.safetensors`` with every quantised expert of MoE layer ``l``
(``{e}.gate_up.q`` ...), quantised once with onnxruntime's quantiser; float experts are
read from the checkpoint itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import ExpertSource, read_config
from .errors import RuntimeInputError
from .formats import UNPACK_FORMATS, quantize, tensor_names
from .nested import plane_names, split_matrix
from .planfile import FLOAT_FORMATS, QUANT_FORMATS, STORED_FORMATS, RuntimePlan, parse_plan, read_plan
from .quant import (
    QUANT_SPECS,
    block_size_for,
    quantizer_module,
)
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
    "expert_template",
    "float_arrays",
    "kernel_format",
    "matmul_template",
    "weight_inputs",
]

KERNELS_FORMAT_VERSION = 1
ACTIVATIONS = ("silu",)
OPSET = 18  # Split with num_outputs
_FIX_REBUILD = "rebuild them with build_kernels(plan, checkpoint, out_dir) (planner export does this)"


def kernel_format(fmt: str) -> str:
    """Template family of a plan format: ``float`` for fp32/bf16/fp16, else the format."""
    return "float" if fmt in FLOAT_FORMATS else fmt


def weight_inputs(fmt: str) -> tuple[str, ...]:
    """Names of the weight inputs of a template (and of the arrays a CPU kernel takes)."""
    kfmt = kernel_format(fmt)
    if kfmt == "float":
        return ("gate_up.t", "down.t")
    return tensor_names("gate_up", kfmt) + tensor_names("down", kfmt)


def float_arrays(gate_up, down) -> dict[str, np.ndarray]:
    """A float expert's CPU kernel inputs from HF tensors ``gate_up [2I, H]``, ``down [H, I]``."""
    import torch

    def t(w):
        return np.ascontiguousarray(w.detach().to("cpu", torch.float32).numpy().T)

    return {"gate_up.t": t(gate_up), "down.t": t(down)}


def expert_template(fmt: str, hidden: int, inter: int, activation: str = "silu"):
    """The ONNX model of one expert in ``fmt``, weights as graph inputs (see module docstring)."""
    from onnx import helper

    if activation not in ACTIVATIONS:
        raise RuntimeInputError("expert activation not supported by the ONNX kernels", key="hidden_act",
                                value=activation, expected=" | ".join(ACTIVATIONS), fix="use a SwiGLU (silu) model")
    H, I = hidden, inter
    nodes = [
        helper.make_node("MatMul", ["x", "gate_up"], ["gu"], name="gate_up"),
        helper.make_node("Split", ["gu"], ["gate", "up"], name="split", axis=1, num_outputs=2),
        helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
        helper.make_node("Mul", ["gate", "sig"], ["act"], name="silu"),
        helper.make_node("Mul", ["act", "up"], ["h"], name="glu"),
        helper.make_node("MatMul", ["h", "down"], ["y"], name="down"),
    ]
    model = _template(f"expert_{fmt}_h{H}_i{I}", nodes, H, H, {"gate_up": (H, 2 * I), "down": (I, H)}, fmt)
    missing = set(weight_inputs(fmt)) - {v.name for v in model.graph.input}
    if missing:
        raise RuntimeError(f"{fmt} template lacks inputs {sorted(missing)}")
    return model


def matmul_template(fmt: str, k: int, n: int):
    """The ONNX model of one int8/int4 matrix: ``y [T, N] = x [T, K] @ W^T`` as ``MatMulNBits``
    with inputs ``x`` and ``w.q``, ``w.scales`` (``w.zp``), the layout of
    ``quant.quantize_matrix(W, fmt, "w")`` (dense weights at a quantised ``dense_format``)."""
    from onnx import helper

    if fmt not in QUANT_FORMATS:
        raise ValueError(f"matmul_template takes int8 or int4, not {fmt}")
    return _template(f"matmul_{fmt}_k{k}_n{n}", [helper.make_node("MatMul", ["x", "w"], ["y"], name="w")], k, n,
                     {"w": (k, n)}, fmt)


def _template(name: str, nodes: list, x_dim: int, y_dim: int, weights: Mapping[str, tuple[int, int]], fmt: str):
    """A graph ``x [T, x_dim] -> y [T, y_dim]`` whose MatMul weights (initializer = node name
    -> ``[K, N]``) become graph inputs: ``{w}.t`` in float formats, else the MatMulNBits
    tensors onnxruntime's quantiser makes of them, renamed as :func:`quant.quant_names`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)  # any values: only the graph is kept, not the weights
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", x_dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", y_dim])],
                              [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), w)
                               for w, shape in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="moe-planner")
    kfmt = kernel_format(fmt)
    if kfmt == "float":
        rename = {w: f"{w}.t" for w in weights}
    else:
        q = quantizer_module()

        spec = QUANT_SPECS[kfmt]
        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        # each MatMul quantised with the group size that fits its K
        for w, (k, _) in weights.items():
            config = q.DefaultWeightOnlyQuantConfig(block_size=block_size_for(k), is_symmetric=spec.symmetric,
                                                    bits=spec.bits, accuracy_level=spec.accuracy_level,
                                                    op_types_to_quantize=("NoSuchOp",))
            quantizer = q.MatMulNBitsQuantizer(model, nodes_to_include=[w], algo_config=config)
            quantizer.process()
            model = quantizer.model.model
        rename = {}
        for w in weights:
            rename[f"{w}_Q{spec.bits}"] = f"{w}.q"
            rename[f"{w}_scales"] = f"{w}.scales"
            rename[f"{w}_zero_points"] = f"{w}.zp"
    # weights become graph inputs with the runtime's names
    graph = model.graph
    inputs = []
    for init in graph.initializer:
        if init.name not in rename:
            raise RuntimeError(f"unexpected initializer {init.name} in the {fmt} template")  # a bug, not input
        inputs.append(helper.make_tensor_value_info(rename[init.name], init.data_type, list(init.dims)))
    del graph.initializer[:]
    for node in graph.node:
        for i, input_name in enumerate(node.input):
            node.input[i] = rename.get(input_name, input_name)
    graph.input.extend(sorted(inputs, key=lambda v: v.name))
    onnx.checker.check_model(model)
    return model


# ----------------------------------------------------------------------------- sessions

def _session_options(threads: int | None):
    """Per-session intra-op pools that sleep instead of spinning between runs: torch's own
    threads and the other layers' sessions share the cores (spinning pools measured up to
    10x slower per decode step on a loaded 2-core machine)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads or 0
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def _session(nodes: list, inputs: list, outputs: list, weights: Mapping[str, tuple[int, np.ndarray]],
             threads: int | None):
    """A CPU session of ``nodes`` whose ``weights`` (name -> (elem type, array)) are in-memory
    initializers: placeholders the session replaces with the arrays
    (``SessionOptions.add_external_initializers``: no 2 GiB protobuf limit, no serialised
    copy; ORT copies the arrays into the session and pre-packs them once, so the caller may
    free its arrays once the session is built)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inits, names, values = [], [], []
    for name, (elem_type, array) in weights.items():
        array = np.ascontiguousarray(array)
        init = TensorProto(name=name, data_type=elem_type, dims=array.shape, data_location=TensorProto.EXTERNAL)
        init.external_data.add(key="location", value="in-memory")
        inits.append(init)
        names.append(name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    graph = helper.make_graph(nodes, "cpu_kernel", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = _session_options(threads)
    so.add_external_initializers(names, values)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class CpuLayerKernel:
    """One ORT session computing the CPU experts of one layer, their weights pre-packed.

    Args:
        templates: format -> template model (:func:`expert_template`).
        experts: expert id -> (format, weight arrays named as :func:`weight_inputs`).
        threads: intra-op threads (0: ORT's default).
    """

    def __init__(self, templates: Mapping[str, Any], experts: Mapping[int, tuple[str, Mapping[str, np.ndarray]]],
                 threads: int | None = None) -> None:
        from onnx import TensorProto, helper

        self.experts = sorted(experts)
        hidden = None
        nodes, inputs, outputs, weights = [], [], [], {}
        for e in self.experts:
            fmt, arrays = experts[e]
            template = templates[kernel_format(fmt)].graph
            hidden = template.input[0].type.tensor_type.shape.dim[1].dim_value
            p = f"e{e}."
            for node in template.node:
                copy = helper.make_node(node.op_type, [p + n for n in node.input], [p + n for n in node.output],
                                        name=p + node.name, domain=node.domain)
                copy.attribute.extend(node.attribute)
                nodes.append(copy)
            for vi in template.input:
                if vi.name == "x":
                    inputs.append(helper.make_tensor_value_info(p + "x", TensorProto.FLOAT, [f"T{e}", hidden]))
                else:
                    weights[p + vi.name] = (vi.type.tensor_type.elem_type, arrays[vi.name])
            outputs.append(helper.make_tensor_value_info(p + "y", TensorProto.FLOAT, [f"T{e}", hidden]))
        self.session = _session(nodes, inputs, outputs, weights, threads)
        self.hidden = hidden
        self._empty = np.zeros((0, hidden or 0), np.float32)

    def run(self, xs: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
        """expert id -> ``x [T_e, H]`` float32  =>  expert id -> ``y [T_e, H]``."""
        feeds = {f"e{e}.x": np.ascontiguousarray(xs.get(e, self._empty), dtype=np.float32) for e in self.experts}
        wanted = sorted(xs)
        ys = self.session.run([f"e{e}.y" for e in wanted], feeds)
        return dict(zip(wanted, ys))


class CpuMatMulKernel:
    """One int8/int4 matrix (:func:`matmul_template`) as a session, its weights pre-packed."""

    def __init__(self, template: Any, arrays: Mapping[str, np.ndarray], threads: int | None = None) -> None:
        graph = template.graph
        weights = {vi.name: (vi.type.tensor_type.elem_type, arrays[vi.name]) for vi in graph.input if vi.name != "x"}
        x = [vi for vi in graph.input if vi.name == "x"]
        self.session = _session(list(graph.node), x, list(graph.output), weights, threads)

    def run(self, x: np.ndarray) -> np.ndarray:
        """``x [T, K]`` float32 -> ``y [T, N]``."""
        return self.session.run(["y"], {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]


class CpuStreamKernel:
    """The template of one format as a session: weights fed with every call."""

    def __init__(self, template: Any, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(template.SerializeToString(), _session_options(threads),
                                            providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        feeds = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
        feeds["x"] = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run(["y"], feeds)[0]


# ----------------------------------------------------------------------------- kernels/ dir


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


# intra-op threads of a cached expert's own session, built on every miss and dropped on every
# eviction: one, so that the session starts and joins no thread pool of its own (ONNX Runtime
# gives each session with more threads a pool). On the 2-core dev machine under load, building
# and dropping a 1.5 MiB int8 expert's session took 12-20 ms of wall time with a pool of two
# threads and 2-11 ms with none, for 2-3 ms of CPU either way; a one-token call is no slower.
# A cached expert's prefill call of many tokens runs on one core (resident experts keep all).
CACHED_EXPERT_THREADS = 1


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
