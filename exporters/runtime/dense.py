"""Dense weights at the plan's ``dense_format``.

Legend: N = output features (rows of an HF weight), K = input features, V = vocabulary.

A plan's ``dense_format`` is the format of every weight that is not a routed expert:
attention, shared experts, dense MLP layers, the embedding table and the output head
(profiles ``ModelSpec.dense_params``). Float formats keep the checkpoint's dtype, as float
experts do (planfile.FLOAT_FORMATS). ``int8``/``int4`` quantise each of those matrices at
load with onnxruntime's quantiser, in the experts' layout (quant.py), so the model holds
what the plan counts:

- ``nn.Linear`` -> :class:`QuantLinear`: on a CPU compute device a pre-packed MatMulNBits
  session (sessions.CpuMatMulKernel); on a GPU the weights are unpacked
  (quant.dequantize) right before each matmul;
- ``nn.Embedding`` -> :class:`QuantEmbedding`: only the rows looked up are unpacked.

The other stored formats (fp8, fp6, fp4, mxfp4, int3, int2, ternary; formats.py) are
quantised at load the same way and unpacked in torch before each matmul on any device.

The routers (each MoE block's ``gate``) stay in the checkpoint's dtype: they are a few
thousand weights a layer, and a top-k choice flipped by rounding costs more accuracy than
their bytes are worth. Norms and biases stay too. Only modules of exactly these two classes
are replaced: a subclass (a scaled embedding, say) may compute something else.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .formats import dequantize, quantize
from .planfile import QUANT_FORMATS, STORED_FORMATS
from .sessions import CpuMatMulKernel
from .templates import matmul_template

__all__ = ["QuantEmbedding", "QuantLinear", "quantise_dense"]


class _Quantised(nn.Module):
    """The MatMulNBits tensors of one ``[N, K]`` matrix as buffers ``q``, ``scales``, ``zp``."""

    def __init__(self, tensors: dict[str, torch.Tensor], fmt: str, k: int) -> None:
        super().__init__()
        self.fmt, self.k = fmt, k
        self.register_buffer("q", tensors["w.q"], persistent=False)
        self.register_buffer("scales", tensors["w.scales"], persistent=False)
        self.register_buffer("zp", tensors.get("w.zp"), persistent=False)
        self.register_buffer("tscale", tensors.get("w.tscale"), persistent=False)  # fp4's scale of the matrix

    def tensors(self, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        named = {"w.q": self.q, "w.scales": self.scales, "w.zp": self.zp, "w.tscale": self.tscale}
        return {k: (t if rows is None else t[rows]) for k, t in named.items() if t is not None}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class QuantLinear(_Quantised):
    """``nn.Linear`` with int8/int4 group-wise weights; the bias stays as it was."""

    def __init__(self, tensors: dict[str, torch.Tensor], fmt: str, linear: nn.Linear,
                 kernel: CpuMatMulKernel | None) -> None:
        super().__init__(tensors, fmt, linear.in_features)
        self.out_features = linear.out_features
        self.bias = linear.bias
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        if self.kernel is not None:  # set on a CPU device only
            y = torch.from_numpy(self.kernel.run(x2.detach().float().numpy())).to(x.dtype)
        else:
            y = x2 @ dequantize(self.tensors(), "w", self.fmt, self.k).to(x.dtype).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class QuantEmbedding(_Quantised):
    """``nn.Embedding`` with int8/int4 group-wise rows, unpacked as they are looked up."""

    def __init__(self, tensors: dict[str, torch.Tensor], fmt: str, embedding: nn.Embedding) -> None:
        super().__init__(tensors, fmt, embedding.embedding_dim)
        self.dtype = embedding.weight.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.reshape(-1)
        return dequantize(self.tensors(), "w", self.fmt, self.k, rows=rows).to(self.dtype).reshape(*ids.shape, self.k)


def quantise_dense(model: nn.Module, fmt: str, *, keep: Iterable[nn.Module], device: torch.device,
                   threads: int | None = None) -> None:
    """Replace ``model``'s dense ``nn.Linear``/``nn.Embedding`` modules by quantised ones.

    Args:
        model: the HF model.
        fmt: a stored format (planfile.STORED_FORMATS); a float one leaves the model as it is.
        keep: modules left alone with everything inside them (the routers, the expert stores).
        device: the compute device; the quantised tensors are put there now, so a tied
            embedding and head keep sharing them when the model moves. On a CPU the Linear
            layers run in ONNX Runtime sessions.
        threads: the sessions' intra-op threads.
    """
    if fmt not in STORED_FORMATS:
        return
    kept = {id(m) for root in keep for m in root.modules()}
    done: dict[int, dict[str, torch.Tensor]] = {}  # weight id -> tensors (tied embedding and head: once)
    templates: dict[tuple[int, int], object] = {}
    for name, module in list(model.named_modules()):
        if id(module) in kept or type(module) not in (nn.Linear, nn.Embedding):
            continue
        weight = module.weight
        tensors = done.get(id(weight))
        if tensors is None:
            arrays = quantize(weight.detach().float().cpu().numpy(), fmt, "w")
            tensors = done[id(weight)] = {k: torch.from_numpy(a).to(device) for k, a in arrays.items()}
        if type(module) is nn.Embedding:
            new: nn.Module = QuantEmbedding(tensors, fmt, module)
        else:
            kernel = None
            if device.type == "cpu" and fmt in QUANT_FORMATS:  # the other formats: torch unpacks them
                shape = (module.in_features, module.out_features)
                if shape not in templates:
                    templates[shape] = matmul_template(fmt, *shape)
                kernel = CpuMatMulKernel(templates[shape], {k: t.numpy() for k, t in tensors.items()}, threads)
            new = QuantLinear(tensors, fmt, module, kernel)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
