"""ONNX Runtime sessions that run CPU experts (and quantised dense matrices) from the
templates of :mod:`.templates`.

Legend: T = tokens routed to the expert, H = hidden size, K x N = a dense matrix's shape.

Two ways to run experts, both ONNX Runtime on the CPU:

- :class:`CpuLayerKernel`, for the CPU experts of one layer held in host memory: one
  session per layer whose graph holds one copy of the template per expert, the weights
  given as initializers (``SessionOptions.add_external_initializers``) so ORT pre-packs them
  once; one ``run`` per layer step computes every CPU expert of the step.
- :class:`CpuStreamKernel`, for CPU experts homed on disk: the template itself, the weights
  read on demand and fed as inputs (no pre-packing, slower per call, no resident copy).

:class:`CpuMatMulKernel` runs one int8/int4 dense matrix (:func:`.templates.matmul_template`,
see dense.py) the way :class:`CpuLayerKernel` runs experts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .templates import OPSET, kernel_format

__all__ = ["CACHED_EXPERT_THREADS", "CpuLayerKernel", "CpuMatMulKernel", "CpuStreamKernel", "default_threads"]


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


# intra-op threads of a cached expert's own session, built on every miss and dropped on every
# eviction: one, so that the session starts and joins no thread pool of its own (ONNX Runtime
# gives each session with more threads a pool). On the 2-core dev machine under load, building
# and dropping a 1.5 MiB int8 expert's session took 12-20 ms of wall time with a pool of two
# threads and 2-11 ms with none, for 2-3 ms of CPU either way; a one-token call is no slower.
# A cached expert's prefill call of many tokens runs on one core (resident experts keep all).
CACHED_EXPERT_THREADS = 1


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
