"""ONNX expert templates: one graph per (format, shape), the expert's weights as its inputs.

Legend: T = tokens routed to the expert, H = hidden size, I = expert intermediate size.

An expert is ``y = down(silu(x @ gate^T) * (x @ up^T))``. Its ONNX template takes
``x [T, H]`` and the expert's weights as graph inputs and returns ``y [T, H]``:

- float formats (``fp32``/``bf16``/``fp16``; the CPU computes them in float32):
  ``MatMul(x, gate_up.t [H, 2I])`` ... ``MatMul(h, down.t [I, H])``;
- ``int8``/``int4``: the same graph passed through onnxruntime's ``MatMulNBitsQuantizer``,
  which turns each MatMul into ``MatMulNBits`` (inputs ``*.q``, ``*.scales``, ``*.zp``).

:func:`matmul_template` is one int8/int4 dense matrix (see dense.py) built the same way.
The sessions that run templates are in :mod:`.sessions`; the ``kernels/`` directory that
holds them and the quantised weights in :mod:`.kernels`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from .errors import RuntimeInputError
from .formats import tensor_names
from .planfile import FLOAT_FORMATS, QUANT_FORMATS
from .quant import QUANT_SPECS, block_size_for, quantizer_module

__all__ = ["ACTIVATIONS", "OPSET", "expert_template", "float_arrays", "kernel_format", "matmul_template",
           "weight_inputs"]

ACTIVATIONS = ("silu",)
OPSET = 18  # Split with num_outputs


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
