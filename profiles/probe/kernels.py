"""The expert kernels the probe times: ONNX Runtime ``MatMulNBits`` graphs (int8/int4, as the
bundle runtime builds them) and the torch gated FFN (CPU and GPU)."""

from __future__ import annotations

import math

import numpy as np

from .settings import BLOCK_SIZE


def _quantise(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-quantise ``w: [K, N]`` fp32 with onnxruntime's own kernel (the one behind
    ``MatMulNBitsQuantizer``), asymmetric, blocks of 128 along K.

    Returns:
        ``(packed: [N, K/128, 128*bits/8] uint8, scales: [N*K/128] fp32, zero_points: uint8)``.
    """
    from onnxruntime.capi import _pybind_state as ortc

    quantise = {4: ortc.quantize_matmul_4bits, 8: ortc.quantize_matmul_8bits}[bits]
    k, n = w.shape
    per_byte = 8 // bits
    k_blocks = (k + BLOCK_SIZE - 1) // BLOCK_SIZE
    if k_blocks * BLOCK_SIZE != k:
        w = np.pad(w, ((0, k_blocks * BLOCK_SIZE - k), (0, 0)))
    packed = np.zeros((n, k_blocks, BLOCK_SIZE // per_byte), dtype=np.uint8)
    zero_points = np.zeros((n, (k_blocks + per_byte - 1) // per_byte), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    quantise(packed, np.ascontiguousarray(w, dtype=np.float32), scales, zero_points, BLOCK_SIZE, n, k, False)
    return packed, scales.reshape(-1), zero_points.reshape(-1)


def _matmul_nbits(onnx_helper, numpy_helper, name: str, x: str, w: np.ndarray, bits: int, inits: list) -> object:
    k, n = w.shape
    packed, scales, zero_points = _quantise(w, bits)
    inits += [numpy_helper.from_array(packed, f"{name}_q"), numpy_helper.from_array(scales, f"{name}_scales"),
              numpy_helper.from_array(zero_points, f"{name}_zp")]
    return onnx_helper.make_node("MatMulNBits", [x, f"{name}_q", f"{name}_scales", f"{name}_zp"], [f"{name}_y"],
                                 domain="com.microsoft", K=k, N=n, bits=bits, block_size=BLOCK_SIZE,
                                 accuracy_level=4)


def _ort_model(nodes: list, inits: list, k: int, out: str, n: int) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", n])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def _ort_matmul_model(w: np.ndarray, bits: int) -> bytes:
    from onnx import helper, numpy_helper

    inits: list = []
    node = _matmul_nbits(helper, numpy_helper, "w", "x", w, bits, inits)
    return _ort_model([node], inits, w.shape[0], "w_y", w.shape[1])


def _ort_ffn_model(gate: np.ndarray, up: np.ndarray, down: np.ndarray, bits: int) -> bytes:
    """A gated expert FFN: ``down(silu(x @ gate) * (x @ up))``; gate, up: [H, I], down: [I, H]."""
    from onnx import helper, numpy_helper

    inits: list = []
    nodes = [
        _matmul_nbits(helper, numpy_helper, "gate", "x", gate, bits, inits),   # [n, I]
        _matmul_nbits(helper, numpy_helper, "up", "x", up, bits, inits),       # [n, I]
        helper.make_node("Sigmoid", ["gate_y"], ["gate_sig"]),
        helper.make_node("Mul", ["gate_y", "gate_sig"], ["gate_silu"]),
        helper.make_node("Mul", ["gate_silu", "up_y"], ["hidden"]),             # [n, I]
        _matmul_nbits(helper, numpy_helper, "down", "hidden", down, bits, inits),  # [n, H]
    ]
    return _ort_model(nodes, inits, gate.shape[0], "down_y", down.shape[1])


def _ort_session(model: bytes, ort, threads: int, weights: tuple[list[str], list] | None = None):
    """A CPU session as the bundle runtime makes them (exporters/runtime/sessions.py): its own
    intra-op pool of ``threads``, sleeping rather than spinning between runs, so that many
    expert sessions share the cores (spinning pools lose up to 10x on a busy 2-core box);
    ``weights`` (from :func:`_weights_outside`) are fed as in-memory external initializers,
    as the runtime feeds its memory-mapped expert weights."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if weights is not None:
        names, arrays = weights
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays])
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _weights_outside(model: bytes) -> tuple[bytes, tuple[list[str], list[np.ndarray]]]:
    """``model`` with its initializers replaced by in-memory external placeholders, and the
    ``(names, arrays)`` a session then takes (:func:`_ort_session`)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    proto = onnx.load_from_string(model)
    names, arrays, placeholders = [], [], []
    for init in proto.graph.initializer:
        array = np.ascontiguousarray(numpy_helper.to_array(init))
        holder = TensorProto(name=init.name, data_type=init.data_type, dims=array.shape,
                             data_location=TensorProto.EXTERNAL)
        holder.external_data.add(key="location", value="in-memory")
        names.append(init.name)
        arrays.append(array)
        placeholders.append(holder)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(placeholders)
    return proto.SerializeToString(), (names, arrays)


def _quantised_bytes(h: int, i: int, bits: int) -> float:
    """Bytes of one expert in MatMulNBits layout: payload, fp32 scales and zero points."""
    def matrix(k: int, n: int) -> float:
        blocks = math.ceil(k / BLOCK_SIZE)
        return n * blocks * (BLOCK_SIZE * bits / 8 + 4 + bits / 8)
    return 2 * matrix(h, i) + matrix(i, h)


def _torch_ffn(torch, expert, x):
    """``down(silu(x @ gate) * (x @ up))``; x: [n, H], gate, up: [H, I], down: [I, H] -> [n, H]."""
    gate, up, down = expert
    return torch.matmul(torch.nn.functional.silu(torch.matmul(x, gate)) * torch.matmul(x, up), down)
