"""GGUF number formats and llama.cpp file-type mixes, as data.

Every ggml tensor type is a format whose block layout comes from the ``gguf`` package
(``gguf.constants.GGML_QUANT_SIZES``: type -> (weights per block, bytes per block)), so
``bits_per_weight = 8 * bytes_per_block / weights_per_block`` exactly: q4_k = 8·144/256 =
4.5, q6_k = 8·210/256 = 6.5625, q8_0 = 8·34/32 = 8.5. Names are the lowercase type names.

A llama.cpp *file type* (``llama-quantize ... Q4_K_M``) is a mix: a default type plus
per-tensor rules that raise some tensors to wider types. Only the routed-expert tensors
matter here (``blk.N.ffn_gate_exps``, ``ffn_up_exps``, ``ffn_down_exps``; equal element
counts H·I·E each), so a mix's bits per weight is, per layer, the mean of its three expert
tensors' types, averaged over the layers. The rules follow ``llama_tensor_get_type_impl``,
``tensor_type_fallback`` and ``llama_ftype_get_default_type`` in llama.cpp's
``src/llama-quant.cpp`` (ggml-org/llama.cpp, 2025). Mix names are the lowercase file-type
names (``q4_k_m``, ``q3_k_l``, ``iq3_m``); where that name is already a type (``q2_k``,
``iq4_xs``) and the mix differs from the type on expert tensors, the mix is ``<name>-mix``.
File types whose expert tensors are all their default type (q8_0, q6_k, q4_1, ...) are that
type: no separate mix.

    mix_layer_types("q4_k_m", 32)[0]  # {'ffn_gate_exps': 'q4_k', 'ffn_up_exps': 'q4_k', 'ffn_down_exps': 'q6_k'}
    mix_bits_per_weight("q4_k_m", 32)  # 4.84375 (Mixtral-8x7B)
"""

from __future__ import annotations

from typing import Sequence

from gguf.constants import GGML_QUANT_SIZES

from .errors import InputError

__all__ = ["GGUF_TYPES", "FLOAT_ALIASES", "FILE_TYPE_DEFAULT", "MIXES", "PROJECTIONS", "TYPICAL_N_LAYERS",
           "TYPICAL_N_EXPERTS", "gguf_kind", "type_bits", "mix_layer_types", "mix_layer_bits",
           "mix_bits_per_weight", "needs_imatrix"]

# type name -> (weights per block, bytes per block), straight from the installed gguf package
GGUF_TYPES: dict[str, tuple[int, int]] = {
    t.name.lower(): (int(size[0]), int(size[1])) for t, size in GGML_QUANT_SIZES.items()
}

# GGUF names of plain float types that are this project's built-in formats under another name
# (bf16 and mxfp4 have the same name and layout in both)
FLOAT_ALIASES = {"f32": "fp32", "f16": "fp16"}

PROJECTIONS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")

# the "typical 32-layer model" a mix's plain bits_per_weight stands for: Mixtral-8x7B
TYPICAL_N_LAYERS = 32
TYPICAL_N_EXPERTS = 8

# file type -> its default tensor type (llama_ftype_get_default_type in src/llama-quant.cpp);
# f16/bf16/f32 files are not mixes
FILE_TYPE_DEFAULT = {
    "q4_0": "q4_0", "q4_1": "q4_1", "q5_0": "q5_0", "q5_1": "q5_1", "q8_0": "q8_0", "q1_0": "q1_0",
    "mxfp4_moe": "mxfp4", "nvfp4": "nvfp4",
    "q2_k_s": "q2_k", "q2_k": "q2_k", "iq3_xs": "iq3_s",
    "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k",
    "q4_k_s": "q4_k", "q4_k_m": "q4_k", "q5_k_s": "q5_k", "q5_k_m": "q5_k", "q6_k": "q6_k",
    "tq1_0": "tq1_0", "tq2_0": "tq2_0",
    "iq2_xxs": "iq2_xxs", "iq2_xs": "iq2_xs", "iq2_s": "iq2_xs", "iq2_m": "iq2_s",
    "iq3_xxs": "iq3_xxs", "iq1_s": "iq1_s", "iq1_m": "iq1_m", "iq4_nl": "iq4_nl", "iq4_xs": "iq4_xs",
    "iq3_s": "iq3_s", "iq3_m": "iq3_s",
}
# only the file types whose default type the installed gguf package knows
FILE_TYPE_DEFAULT = {ft: t for ft, t in FILE_TYPE_DEFAULT.items() if t in GGUF_TYPES}

# file types whose ffn_down rule counts ffn_down tensors instead of parsing the layer
_IQ_LOW = ("iq2_xxs", "iq2_xs", "iq1_s", "iq2_s", "iq2_m", "iq1_m")

# types llama-quantize refuses to write without an importance matrix (tensor_requires_imatrix;
# q2_k also, but only inside a Q2_K_S file)
_IMATRIX_TYPES = ("iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s")

# a row whose length does not divide the block size falls back (tensor_type_fallback)
_FALLBACK = {"iq1_s": "iq4_nl", "iq1_m": "iq4_nl", "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl", "iq2_s": "iq4_nl",
             "iq3_xxs": "iq4_nl", "iq3_s": "iq4_nl", "iq4_xs": "iq4_nl", "q2_k": "q4_0", "q3_k": "q4_0",
             "tq1_0": "q4_0", "tq2_0": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def gguf_kind(name: str) -> str:
    """``"float"``, ``"int"`` or ``"ternary"`` for a GGUF type name."""
    if name.startswith("tq"):
        return "ternary"
    if name.startswith(("f", "bf", "mxfp", "nvfp")):
        return "float"
    return "int"


def type_bits(name: str) -> float:
    """Stored bits per weight of GGUF type ``name``: 8 · bytes per block / weights per block."""
    block, nbytes = GGUF_TYPES[name]
    return 8 * nbytes / block


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp's use_more_bits: the first and last eighth, and every third layer between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _expert_types(ftype: str, i: int, n: int, n_experts: int, imatrix: bool) -> tuple[str, str, str]:
    """(gate, up, down) types of layer ``i`` of ``n`` in file type ``ftype``, before fallback.

    Transcribes the branches of ``llama_tensor_get_type_impl`` (src/llama-quant.cpp) that can
    reach an expert tensor, non-Falcon architectures, no ``--tensor-type`` overrides.
    """
    base = FILE_TYPE_DEFAULT[ftype]
    gate = up = down = base
    if ftype == "mxfp4_moe":  # 3-D (expert) tensors -> MXFP4, everything else Q8_0
        return "mxfp4", "mxfp4", "mxfp4"
    if ftype in _IQ_LOW:
        # `qs.i_ffn_down < qs.n_ffn_down/8`: a counter over ffn_down tensors in layer order;
        # equal to the layer index when each layer has one (no shared expert, no dense FFN)
        if i < n // 8:
            down = "iq3_s" if ftype in ("iq2_s", "iq2_m") else "q2_k"
        return gate, up, down
    # ffn_down: an else-if chain, the first matching file type wins
    if ftype == "q2_k":
        down = "q3_k"
    elif ftype == "q2_k_s":
        down = "q4_k" if i < n // 8 else down
    elif ftype == "iq3_xxs" and not imatrix:
        down = "q4_k" if i < n // 8 else "q3_k"
    elif ftype == "q3_k_m":
        down = "q5_k" if i < n // 16 else "q4_k"
    elif ftype == "iq3_m" and (i < n // 8 or (n_experts == 8 and _use_more_bits(i, n))):
        down = "q4_k"
    elif ftype == "q3_k_l":
        down = "q5_k"
    elif ftype == "q4_k_m":
        down = "q6_k" if _use_more_bits(i, n) else down
    elif i < n // 8 and ftype in ("iq4_nl", "iq4_xs") and not imatrix:
        down = "q5_k"
    elif ftype == "q5_k_m" and _use_more_bits(i, n):
        down = "q6_k"
    elif ftype == "q4_k_s" and i < n // 8:
        down = "q5_k"
    elif ftype in ("q4_0", "q5_0") and imatrix and i < n // 8:
        down = "q4_1" if ftype == "q4_0" else "q5_1"
    # ffn_gate / ffn_up: only IQ3_XS lowers the middle layers
    if ftype == "iq3_xs" and n // 8 <= i < 7 * n // 8:
        gate = up = "iq3_xxs"
    return gate, up, down


def needs_imatrix(ftype: str, n_layers: int = TYPICAL_N_LAYERS, n_experts: int = TYPICAL_N_EXPERTS) -> bool:
    """Whether llama-quantize needs an importance matrix to write file type ``ftype``.

    A file that exists was then made with one, so the mix rules run with ``has_imatrix``.
    """
    if ftype == "q2_k_s":
        return True
    return any(t in _IMATRIX_TYPES for i in range(n_layers)
               for t in _expert_types(ftype, i, n_layers, n_experts, imatrix=False))


def _fallback(type_name: str, ncols: int | None) -> str:
    # tensor_type_fallback: a row of ncols weights must hold whole blocks
    if ncols is None or ncols % GGUF_TYPES[type_name][0] == 0:
        return type_name
    wider = _FALLBACK.get(type_name)
    if wider is None:
        raise InputError(f"llama.cpp cannot store a row of {ncols} weights as {type_name}", value=ncols,
                         expected=f"a multiple of {GGUF_TYPES[type_name][0]}", fix="pick another type")
    return wider if ncols % GGUF_TYPES[wider][0] == 0 else "f16"


def _resolve(name: str) -> tuple[str | None, str | None]:
    """Format name -> (file type, None) for a mix, (None, type) for a plain GGUF type."""
    if name in MIXES:
        return MIXES[name], None
    if name in GGUF_TYPES:
        return None, name
    raise InputError(f"{name!r} is neither a llama.cpp file-type mix nor a GGUF type", value=name,
                     expected="one of " + ", ".join(MIXES), fix="run `planner formats list`")


def mix_layer_types(name: str, n_layers: int = TYPICAL_N_LAYERS, *, n_experts: int = TYPICAL_N_EXPERTS,
                    imatrix: bool | None = None, hidden_size: int | None = None,
                    intermediate_size: int | None = None) -> list[dict[str, str]]:
    """GGUF type of each expert tensor, per layer, for mix (or plain GGUF type) ``name``.

    Args:
        name: a mix (``"q4_k_m"``, ``"q2_k-mix"``) or a GGUF type (then every tensor has it).
        n_layers: the model's ``block_count`` (all hidden layers, dense ones included).
        n_experts: routed experts per layer; only IQ3_M reads it (8 raises more ffn_down).
        imatrix: whether the file was made with an importance matrix; ``None``: exactly when
            llama-quantize requires one for this file type.
        hidden_size, intermediate_size: row lengths of gate/up (H) and down (I); when given,
            a type whose block does not divide the row falls back as llama.cpp does.

    Returns:
        ``[n_layers]`` dicts ``{"ffn_gate_exps": type, "ffn_up_exps": type, "ffn_down_exps": type}``.
    """
    if n_layers < 1:
        raise InputError("a model has at least one layer", key="n_layers", value=n_layers, fix="pass n_layers >= 1")
    ftype, plain = _resolve(name)
    if ftype is not None and imatrix is None:
        imatrix = needs_imatrix(ftype, n_layers, n_experts)
    rows = []
    for i in range(n_layers):
        types = (plain,) * 3 if plain else _expert_types(ftype, i, n_layers, n_experts, bool(imatrix))
        cols = (hidden_size, hidden_size, intermediate_size)
        rows.append({p: _fallback(t, c) for p, t, c in zip(PROJECTIONS, types, cols)})
    return rows


def mix_layer_bits(name: str, n_layers: int = TYPICAL_N_LAYERS, **kwargs) -> list[float]:
    """Expert bits per weight of each layer: the mean of its three expert tensors' types.

    ``kwargs`` as in :func:`mix_layer_types`. Returns ``[n_layers]``.
    """
    return [sum(type_bits(t) for t in row.values()) / len(row) for row in mix_layer_types(name, n_layers, **kwargs)]


def mix_bits_per_weight(name: str, n_layers: int = TYPICAL_N_LAYERS, *, moe_layers: Sequence[int] | None = None,
                        **kwargs) -> float:
    """Expert bits per weight of mix ``name``, averaged over a model's MoE layers.

    Args:
        name: a mix or a GGUF type (see :func:`mix_layer_types`).
        n_layers: the model's hidden layers; the rules depend on each layer's position.
        moe_layers: indices of the layers that hold experts (default: all).
        kwargs: ``n_experts``, ``imatrix``, ``hidden_size``, ``intermediate_size`` as in
            :func:`mix_layer_types`.

    >>> mix_bits_per_weight("q4_k_m", 32)  # 16 layers at (4.5+4.5+6.5625)/3, 16 at 4.5
    4.84375
    """
    bits = mix_layer_bits(name, n_layers, **kwargs)
    layers = list(range(n_layers)) if moe_layers is None else list(moe_layers)
    if not layers or any(not 0 <= i < n_layers for i in layers):
        raise InputError("MoE layer indices must be in [0, n_layers)", key="moe_layers", value=layers,
                         fix=f"pass indices below {n_layers}")
    return sum(bits[i] for i in layers) / len(layers)


def _mix_names() -> dict[str, str]:
    """Format name -> file type, for every file type that is not just its default type."""
    names = {}
    for ftype in FILE_TYPE_DEFAULT:
        base = FILE_TYPE_DEFAULT[ftype]
        differs = ftype not in GGUF_TYPES or any(
            set(_expert_types(ftype, i, n, TYPICAL_N_EXPERTS, imatrix)) != {base}
            for n in (TYPICAL_N_LAYERS, 61) for i in range(n) for imatrix in (False, True))
        if differs:
            names[ftype if ftype not in GGUF_TYPES else f"{ftype}-mix"] = ftype
    return names


# format name -> llama.cpp file type
MIXES: dict[str, str] = _mix_names()
