"""Hugging Face ``config.json`` -> :class:`~profiles.models.ModelSpec`, one builder per architecture.

Each builder looks up the fields its architecture's modeling code reads (explicitly, so a
missing field names itself and the architecture) and counts parameters the way that code
allocates them: biases, norms, routers, MLA projections, attention sinks, Mamba mixers.
Counts cover the main model: DeepSeek-V3's multi-token-prediction layer and Llama-4's
vision encoder are left out (a note on the spec says so).

Legend: L = layers, H = hidden, I = expert intermediate, E = routed experts, k = top-k,
V = vocab, D = heads·head_dim.

Adding an architecture is one function decorated with :func:`register`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import InputError, format_key
from .limits import MAX_EXPERTS, MAX_LAYERS, MAX_MODEL_DIM, MAX_TOP_K
from .models import GATED_FFN_MATRICES, ModelSpec, PublishedParams, ZeroExperts

__all__ = ["Architecture", "ARCHITECTURES", "ConfigReader", "register", "spec_from_config", "supported_architectures"]

_REQUIRED = object()

# Largest value a config field may hold (the rest: MAX_MODEL_DIM): beyond these a model is
# not one this planner could ever place, and counts that drive loops stay bounded.
_MAXIMUM = {
    **dict.fromkeys(("num_hidden_layers", "n_layers", "num_layers"), MAX_LAYERS),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "zero_expert_num",
                     "n_group", "topk_group", "n_shared_experts"), MAX_EXPERTS),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "moe_top_k", "experts_per_token"), MAX_TOP_K),
}
_FFN = GATED_FFN_MATRICES

# What a new architecture would need: listed in the unknown-architecture error.
NEEDED_FIELDS = ("num_hidden_layers", "hidden_size", "the expert FFN width (moe_intermediate_size)",
                 "routed experts (num_experts)", "num_experts_per_tok", "which layers are MoE",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")


@dataclass(frozen=True)
class Architecture:
    """A supported HF architecture: its class name, ``model_type`` values and builder."""

    name: str
    model_types: tuple[str, ...]
    family: str
    build: Callable[["ConfigReader"], dict[str, Any]]


ARCHITECTURES: dict[str, Architecture] = {}


def register(name: str, model_types: tuple[str, ...], family: str):
    """Decorator: register a builder for HF architecture ``name``; duplicates are refused."""
    def wrap(build: Callable[["ConfigReader"], dict[str, Any]]):
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} registered twice")
        ARCHITECTURES[name] = Architecture(name, model_types, family, build)
        return build
    return wrap


def supported_architectures() -> list[str]:
    """Architecture class names that :func:`spec_from_config` accepts."""
    return sorted(ARCHITECTURES)


class ConfigReader:
    """Explicit field lookups on a config mapping; errors name the file, key and architecture."""

    def __init__(self, data: dict[str, Any], *, architecture: str, file: str | Path | None = None,
                 lines: dict[tuple, int] | None = None, key_prefix: tuple = ()):
        self.data, self.architecture, self.file = data, architecture, file
        self.lines, self.prefix = lines or {}, key_prefix

    def error(self, message: str, key: str | None, **kw: Any) -> InputError:
        loc = self.prefix + ((key,) if key else ())
        probe, line = loc, None
        while probe and line is None:
            line = self.lines.get(probe)
            probe = probe[:-1]
        return InputError(message, file=self.file, key=format_key(loc) or None, line=line, **kw)

    def _get(self, key: str, default: Any, expected: str) -> Any:
        value = self.data.get(key)
        if value is None:
            if default is _REQUIRED:
                raise self.error(f"required field for {self.architecture} is missing", key, expected=expected,
                                 fix="add it; copy it from the model's config.json on the Hugging Face hub")
            return default
        return value

    def int(self, key: str, default: Any = _REQUIRED, *, minimum: int = 1) -> Any:
        """An integer in ``[minimum, _MAXIMUM(key)]``; ``default`` when absent or null (required if none given)."""
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        value = self._get(key, default, expected)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:  # 1e308 is no layer count
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error("must be an integer", key, value=value, expected=expected,
                             fix="use the value from the model's config.json")
        if value < minimum:
            raise self.error("must be positive" if minimum == 1 else f"must be at least {minimum}", key,
                             value=value, expected=expected, fix="use the value from the model's config.json")
        maximum = _MAXIMUM.get(key, MAX_MODEL_DIM)
        if value > maximum:
            raise self.error("too large for any real model", key, value=value,
                             expected=f"at most {maximum:,}", fix="use the value from the model's config.json")
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default, "true or false")
        if not isinstance(value, bool):
            raise self.error("must be true or false", key, value=value, expected="true or false",
                             fix="write true or false (JSON booleans, unquoted)")
        return value

    def str(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default, "a string")
        if value is not default and not isinstance(value, str):
            raise self.error("must be a string", key, value=value, expected="a string", fix="quote it")
        return value

    def int_list(self, key: str, default: Any, *, length: int | None = None, minimum: int = 0) -> Any:
        value = self._get(key, default, "a list of integers")
        if value is default:
            return value
        if (not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum
                                               or v > MAX_MODEL_DIM for v in value)):
            raise self.error("must be a list of integers", key, value=value,
                             expected=f"a list of integers >= {minimum}", fix="use the value from config.json")
        if length is not None and len(value) != length:
            raise self.error(f"must have one entry per layer ({length})", key, value=len(value),
                             expected=f"{length} entries", fix="give one entry per decoder layer")
        return tuple(value)

    def str_list(self, key: str, default: Any, *, length: int) -> Any:
        value = self._get(key, default, "a list of strings")
        if value is default:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error("must be a list of strings", key, value=value, expected="a list of strings",
                             fix="use the value from config.json")
        if len(value) != length:
            raise self.error(f"must have one entry per layer ({length})", key, value=len(value),
                             expected=f"{length} entries", fix="give one entry per decoder layer")
        return tuple(value)

    def sub(self, key: str) -> "ConfigReader":
        value = self._get(key, _REQUIRED, "a mapping")
        if not isinstance(value, dict):
            raise self.error("must be a mapping", key, value=value, expected="a JSON object",
                             fix="use the value from config.json")
        return ConfigReader(value, architecture=self.architecture, file=self.file, lines=self.lines,
                            key_prefix=self.prefix + (key,))


# --------------------------------------------------------------------------- shared pieces


def _heads(r: ConfigReader, hidden: int, *, head_dim_default: int | None = None) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) of a GQA model."""
    heads = r.int("num_attention_heads")
    kv = r.int("num_key_value_heads", heads)  # absent: multi-head attention (one KV head per query head)
    if heads % kv:
        raise r.error("num_attention_heads must be a multiple of num_key_value_heads", "num_key_value_heads",
                      value=kv, expected=f"a divisor of {heads}", fix="use the value from config.json")
    default = head_dim_default
    if default is None and not hidden % heads:
        default = hidden // heads
    if default is None and r.data.get("head_dim") is None:
        raise r.error("hidden_size is not a multiple of num_attention_heads and head_dim is not given",
                      "head_dim", expected="a positive integer", fix="add head_dim from config.json")
    return heads, kv, r.int("head_dim", default)


def _gqa_params(hidden: int, heads: int, kv: int, head_dim: int, *, qkv_bias: bool = False,
                o_bias: bool = False) -> int:
    """q, k, v, o projections: H·D + 2·H·kv·head_dim + D·H (+ biases); D = heads·head_dim."""
    q, kv_width = heads * head_dim, kv * head_dim
    weights = hidden * q + 2 * hidden * kv_width + q * hidden
    return weights + ((q + 2 * kv_width) if qkv_bias else 0) + (hidden if o_bias else 0)


def _mla_params(hidden: int, heads: int, q_lora: int, kv_lora: int, nope: int, rope: int, v: int,
                bias: bool) -> int:
    """DeepSeek multi-head latent attention: q (LoRA or direct), kv_a, kv_b, o, and their norms."""
    if q_lora:  # q_a_proj [H -> q_lora] (+bias), q_a_layernorm, q_b_proj [q_lora -> heads·(nope+rope)]
        q = hidden * q_lora + (q_lora if bias else 0) + q_lora + q_lora * heads * (nope + rope)
    else:  # q_proj [H -> heads·(nope+rope)], never biased
        q = hidden * heads * (nope + rope)
    # kv_a_proj_with_mqa [H -> kv_lora+rope] (+bias), kv_a_layernorm, kv_b_proj [kv_lora -> heads·(nope+v)]
    kv = hidden * (kv_lora + rope) + ((kv_lora + rope) if bias else 0) + kv_lora + kv_lora * heads * (nope + v)
    o = heads * v * hidden + (hidden if bias else 0)
    return q + kv + o


def _embeddings(r: ConfigReader, hidden: int, vocab: int, *, head_bias: bool = False) -> dict[str, Any]:
    tie = r.bool("tie_word_embeddings", False)
    head = 0 if tie else vocab * hidden
    return dict(vocab_size=vocab, tie_word_embeddings=tie, embedding_params=vocab * hidden,
                lm_head_params=head + (vocab if head_bias else 0))


def _windows(r: ConfigReader, layers: int, attention_layers: list[int], *, sliding: int | None,
             default_types: tuple[str, ...] | None = None, chunk: int | None = None) -> tuple[int | None, ...]:
    """Tokens each attention layer attends to, from ``layer_types`` when the config has it.

    Without ``layer_types`` every layer uses ``sliding`` (Mistral semantics: None = full).
    """
    types = r.str_list("layer_types", default_types, length=layers)
    if types is None:
        return tuple(sliding for _ in attention_layers)
    by_type = {"full_attention": None, "sliding_attention": sliding, "chunked_attention": chunk}
    out = []
    for i in attention_layers:
        if types[i] not in by_type:
            raise r.error("unknown layer type", "layer_types", value=types[i],
                          expected="full_attention, sliding_attention or chunked_attention",
                          fix="use the value from config.json")
        if types[i] != "full_attention" and by_type[types[i]] is None:
            need = "sliding_window" if types[i] == "sliding_attention" else "attention_chunk_size"
            raise r.error(f"layer_types uses {types[i]} but {need} is not set", need,
                          expected="a positive integer", fix=f"add {need} from config.json")
        out.append(by_type[types[i]])
    return tuple(out)


def _check_routing(r: ConfigReader, key: str, top_k: int, experts: int, zero: int = 0) -> None:
    if top_k > experts + zero:
        raise r.error("top-k is larger than the number of experts", key, value=top_k,
                      expected=f"at most {experts + zero} (routed experts{' + zero experts' if zero else ''})",
                      fix="use the value from config.json")


def _check_moe_layers(r: ConfigReader, key: str, moe: list[int], layers: int) -> tuple[int, ...]:
    if not moe:
        raise r.error("the config describes no MoE layer", key, fix="this planner needs a Mixture-of-Experts model")
    if moe[-1] >= layers or moe[0] < 0 or len(set(moe)) != len(moe):
        raise r.error("MoE layer indices must be distinct and in range", key, value=moe,
                      expected=f"indices in [0, {layers})", fix="use the value from config.json")
    return tuple(sorted(moe))


def _gqa_model(r: ConfigReader, *, experts_key: str, inter_key: str, qkv_bias: bool, o_bias: bool,
               extra_attention_per_layer: int = 0, head_dim_default: int | None = None) -> dict[str, Any]:
    """The layout shared by Mixtral, Qwen-MoE, OLMoE, Phi-3.5-MoE, GraniteMoE: every layer GQA + MoE."""
    hidden, layers = r.int("hidden_size"), r.int("num_hidden_layers")
    # transformers 5 writes Qwen3-MoE configs with num_local_experts, the Hub's with num_experts
    alias = {"num_experts": "num_local_experts", "num_local_experts": "num_experts"}[experts_key]
    if r.data.get(experts_key) is None and r.data.get(alias) is not None:
        experts_key = alias
    experts, top_k = r.int(experts_key), r.int("num_experts_per_tok")
    _check_routing(r, "num_experts_per_tok", top_k, experts)
    heads, kv, head_dim = _heads(r, hidden, head_dim_default=head_dim_default)
    attention = layers * (_gqa_params(hidden, heads, kv, head_dim, qkv_bias=qkv_bias, o_bias=o_bias)
                          + extra_attention_per_layer)
    return dict(num_hidden_layers=layers, moe_layer_indices=tuple(range(layers)), hidden_size=hidden,
                expert_intermediate_size=r.int(inter_key), num_experts=experts, top_k=top_k,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                attention_layer_indices=tuple(range(layers)), attention_params=attention,
                norm_params=(2 * layers + 1) * hidden,  # input + post-attention norm per layer, final norm
                router_params=layers * experts * hidden)


# --------------------------------------------------------------------------- architectures


@register("MixtralForCausalLM", ("mixtral",), "Mixtral")
def _mixtral(r: ConfigReader) -> dict[str, Any]:
    spec = _gqa_model(r, experts_key="num_local_experts", inter_key="intermediate_size", qkv_bias=False, o_bias=False)
    spec["attention_window_tokens"] = _windows(r, spec["num_hidden_layers"], list(spec["attention_layer_indices"]),
                                               sliding=r.int("sliding_window", None))
    return spec | _embeddings(r, spec["hidden_size"], r.int("vocab_size"))


def _qwen_moe(r: ConfigReader, *, qwen3: bool) -> dict[str, Any]:
    bias = r.bool("attention_bias", False) if qwen3 else r.bool("qkv_bias", True)
    head_dim = None
    if qwen3:  # q_norm and k_norm: one RMSNorm weight of head_dim each, per layer
        head_dim = _heads(r, r.int("hidden_size"))[2]
    spec = _gqa_model(r, experts_key="num_experts", inter_key="moe_intermediate_size", qkv_bias=bias,
                      o_bias=bias and qwen3, extra_attention_per_layer=2 * head_dim if qwen3 else 0)
    hidden, layers, experts = spec["hidden_size"], spec["num_hidden_layers"], spec["num_experts"]
    # Layer i has routed experts unless listed in mlp_only_layers or off the decoder_sparse_step grid.
    step = r.int("decoder_sparse_step", 1)
    mlp_only = set(r.int_list("mlp_only_layers", ()))
    sparse = [i for i in range(layers) if i not in mlp_only and (i + 1) % step == 0]
    moe = _check_moe_layers(r, "mlp_only_layers", sparse, layers)
    dense_layers = layers - len(moe)
    dense_inter = r.int("intermediate_size") if dense_layers else 0
    spec.update(moe_layer_indices=moe, router_params=len(moe) * experts * hidden,
                dense_mlp_params=dense_layers * _FFN * hidden * dense_inter)
    if not qwen3:
        shared = r.int("shared_expert_intermediate_size", 0, minimum=0)
        if shared:  # one shared expert plus its sigmoid gate Linear(H, 1)
            spec.update(num_shared_experts=1, shared_expert_intermediate_size=shared,
                        shared_expert_params=len(moe) * (_FFN * hidden * shared + hidden))
    window = r.int("sliding_window", None) if r.bool("use_sliding_window", False) else None
    first_windowed = r.int("max_window_layers", 0, minimum=0)
    types = None
    if window:  # Qwen2 semantics: layers from max_window_layers on use the sliding window
        types = tuple("sliding_attention" if i >= first_windowed else "full_attention" for i in range(layers))
    spec["attention_window_tokens"] = _windows(r, layers, list(range(layers)), sliding=window, default_types=types)
    return spec | _embeddings(r, hidden, r.int("vocab_size"))


@register("Qwen2MoeForCausalLM", ("qwen2_moe",), "Qwen2-MoE / Qwen1.5-MoE")
def _qwen2_moe(r: ConfigReader) -> dict[str, Any]:
    return _qwen_moe(r, qwen3=False)


@register("Qwen3MoeForCausalLM", ("qwen3_moe",), "Qwen3-MoE")
def _qwen3_moe(r: ConfigReader) -> dict[str, Any]:
    return _qwen_moe(r, qwen3=True)


@register("OlmoeForCausalLM", ("olmoe",), "OLMoE")
def _olmoe(r: ConfigReader) -> dict[str, Any]:
    hidden = r.int("hidden_size")
    heads, kv, head_dim = _heads(r, hidden)
    bias = r.bool("attention_bias", False)
    # q_norm over the whole query (H), k_norm over the whole key (kv·head_dim), per layer
    spec = _gqa_model(r, experts_key="num_experts", inter_key="intermediate_size", qkv_bias=bias, o_bias=bias,
                      extra_attention_per_layer=hidden + kv * head_dim)
    spec["attention_window_tokens"] = (None,) * spec["num_hidden_layers"]
    return spec | _embeddings(r, hidden, r.int("vocab_size"))


@register("PhimoeForCausalLM", ("phimoe",), "Phi-3.5-MoE")
def _phimoe(r: ConfigReader) -> dict[str, Any]:
    bias = r.bool("attention_bias", False)
    spec = _gqa_model(r, experts_key="num_local_experts", inter_key="intermediate_size", qkv_bias=bias, o_bias=bias)
    layers, hidden = spec["num_hidden_layers"], spec["hidden_size"]
    spec["norm_params"] *= 2  # LayerNorm with weight and bias, not RMSNorm
    spec["attention_window_tokens"] = _windows(r, layers, list(range(layers)), sliding=r.int("sliding_window", None))
    return spec | _embeddings(r, hidden, r.int("vocab_size"), head_bias=r.bool("lm_head_bias", False))


@register("GptOssForCausalLM", ("gpt_oss",), "gpt-oss")
def _gpt_oss(r: ConfigReader) -> dict[str, Any]:
    if r.data.get("num_experts_per_tok") is None and r.data.get("experts_per_token") is not None:
        r = ConfigReader(dict(r.data, num_experts_per_tok=r.data["experts_per_token"]), architecture=r.architecture,
                         file=r.file, lines=r.lines, key_prefix=r.prefix)
    hidden = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    bias = r.bool("attention_bias", True)
    # one learned attention-sink logit per query head, per layer; head_dim 64 is the GptOssConfig default
    spec = _gqa_model(r, experts_key="num_local_experts", inter_key="intermediate_size", qkv_bias=bias, o_bias=bias,
                      extra_attention_per_layer=heads, head_dim_default=64)
    layers, experts, inter = spec["num_hidden_layers"], spec["num_experts"], spec["expert_intermediate_size"]
    alternating = tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers))
    spec.update(
        expert_bias_params=2 * inter + hidden,  # gate_up_proj_bias [2I] + down_proj_bias [H]
        router_params=layers * (experts * hidden + experts),  # router weight [E, H] + bias [E]
        attention_window_tokens=_windows(r, layers, list(range(layers)), sliding=r.int("sliding_window", 128),
                                         default_types=alternating),
        notes=("sliding-window (128-token) and full-attention layers alternate: the KV cache of "
               "sliding layers stops growing past the window",),
    )
    return spec | _embeddings(r, hidden, r.int("vocab_size"))


def _granite(r: ConfigReader, *, shared: bool) -> dict[str, Any]:
    bias = r.bool("attention_bias", False)
    spec = _gqa_model(r, experts_key="num_local_experts", inter_key="intermediate_size", qkv_bias=bias, o_bias=bias)
    layers, hidden = spec["num_hidden_layers"], spec["hidden_size"]
    spec["attention_window_tokens"] = (None,) * layers
    width = r.int("shared_intermediate_size", 0, minimum=0) if shared else 0
    if width:  # shared_mlp: input_linear [H -> 2·S], output_linear [S -> H]
        spec.update(num_shared_experts=1, shared_expert_intermediate_size=width,
                    shared_expert_params=layers * _FFN * hidden * width)
    return spec | _embeddings(r, hidden, r.int("vocab_size"))


@register("GraniteMoeForCausalLM", ("granitemoe",), "GraniteMoE")
def _granitemoe(r: ConfigReader) -> dict[str, Any]:
    return _granite(r, shared=False)


@register("GraniteMoeSharedForCausalLM", ("granitemoeshared",), "GraniteMoE (shared expert)")
def _granitemoe_shared(r: ConfigReader) -> dict[str, Any]:
    return _granite(r, shared=True)


def _deepseek_moe(r: ConfigReader, *, noaux_default: bool) -> dict[str, Any]:
    """The DeepSeek-style MoE part (routed + shared experts, dense first layers, grouped routing),
    shared by DeepSeek-V2/V3 and GLM-4.5."""
    hidden, layers = r.int("hidden_size"), r.int("num_hidden_layers")
    experts, top_k = r.int("n_routed_experts"), r.int("num_experts_per_tok")
    _check_routing(r, "num_experts_per_tok", top_k, experts)
    inter = r.int("moe_intermediate_size")
    # DeepSeek's modeling code: routed experts from first_k_dense_replace on, every moe_layer_freq-th layer
    first_dense, freq = r.int("first_k_dense_replace", 0, minimum=0), r.int("moe_layer_freq", 1)
    moe = _check_moe_layers(r, "first_k_dense_replace",
                            [i for i in range(layers) if i >= first_dense and i % freq == 0], layers)
    dense_layers = layers - len(moe)
    dense_inter = r.int("intermediate_size") if dense_layers else 0
    mlp_bias = r.bool("mlp_bias", False)
    n_shared = r.int("n_shared_experts", 0, minimum=0)
    n_group, topk_group = r.int("n_group", 1), r.int("topk_group", 1)
    if experts % n_group:
        raise r.error("n_routed_experts must divide into n_group groups", "n_group", value=n_group,
                      expected=f"a divisor of {experts}", fix="use the value from config.json")
    if topk_group > n_group or top_k > topk_group * (experts // n_group):
        raise r.error("topk_group groups cannot hold num_experts_per_tok experts", "topk_group", value=topk_group,
                      expected=f"at most n_group ({n_group}), with topk_group·{experts // n_group} >= {top_k}",
                      fix="use the value from config.json")
    # noaux_tc routing (V3, GLM-4.5) keeps a per-expert score-correction bias in the checkpoint
    noaux = r.str("topk_method", "noaux_tc" if noaux_default else "greedy") == "noaux_tc"
    notes = []
    if r.int("num_nextn_predict_layers", 0, minimum=0):
        notes.append("multi-token-prediction (MTP) layers are not counted: they serve speculative decoding only")
    return dict(
        num_hidden_layers=layers, moe_layer_indices=moe, hidden_size=hidden, expert_intermediate_size=inter,
        num_experts=experts, top_k=top_k, num_shared_experts=n_shared,
        shared_expert_intermediate_size=inter if n_shared else 0, n_group=n_group, topk_group=topk_group,
        attention_layer_indices=tuple(range(layers)), attention_window_tokens=(None,) * layers,
        # the shared experts are one MLP of width n_shared·I
        shared_expert_params=len(moe) * _FFN * hidden * inter * n_shared,
        dense_mlp_params=dense_layers * (_FFN * hidden * dense_inter + ((2 * dense_inter + hidden) if mlp_bias else 0)),
        router_params=len(moe) * (experts * hidden + (experts if noaux else 0)), norm_params=(2 * layers + 1) * hidden,
        notes=tuple(notes),
    ) | _embeddings(r, hidden, r.int("vocab_size"))


def _deepseek(r: ConfigReader, *, v3: bool) -> dict[str, Any]:
    spec = _deepseek_moe(r, noaux_default=v3)
    hidden, layers = spec["hidden_size"], spec["num_hidden_layers"]
    heads = r.int("num_attention_heads")
    q_lora = r.int("q_lora_rank", 0, minimum=0)  # null in V2-Lite: queries are not compressed
    kv_lora, nope, rope, v = (r.int("kv_lora_rank"), r.int("qk_nope_head_dim"), r.int("qk_rope_head_dim"),
                              r.int("v_head_dim"))
    return spec | dict(
        attention="mla", num_attention_heads=heads, num_key_value_heads=heads, head_dim=nope + rope,
        q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
        attention_params=layers * _mla_params(hidden, heads, q_lora, kv_lora, nope, rope, v,
                                              r.bool("attention_bias", False)))


@register("Glm4MoeForCausalLM", ("glm4_moe",), "GLM-4.5")
def _glm4_moe(r: ConfigReader) -> dict[str, Any]:
    """GLM-4.5 / 4.5-Air / 4.6: DeepSeek-V3's MoE layout (dense first layers, 1 shared expert,
    noaux_tc routing) with GQA attention (q/k/v biases, optional q/k RMSNorm)."""
    spec = _deepseek_moe(r, noaux_default=True)
    hidden, layers = spec["hidden_size"], spec["num_hidden_layers"]
    heads, kv, head_dim = _heads(r, hidden)
    qk_norm = 2 * head_dim if r.bool("use_qk_norm", False) else 0
    return spec | dict(
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        attention_params=layers * (_gqa_params(hidden, heads, kv, head_dim, qkv_bias=r.bool("attention_bias", False))
                                   + qk_norm))


@register("DeepseekV2ForCausalLM", ("deepseek_v2",), "DeepSeek-V2")
def _deepseek_v2(r: ConfigReader) -> dict[str, Any]:
    return _deepseek(r, v3=False)


@register("DeepseekV3ForCausalLM", ("deepseek_v3",), "DeepSeek-V3 / R1")
def _deepseek_v3(r: ConfigReader) -> dict[str, Any]:
    return _deepseek(r, v3=True)


@register("DbrxForCausalLM", ("dbrx",), "DBRX")
def _dbrx(r: ConfigReader) -> dict[str, Any]:
    hidden, layers, heads = r.int("d_model"), r.int("n_layers"), r.int("n_heads")
    attn, ffn = r.sub("attn_config"), r.sub("ffn_config")
    kv = attn.int("kv_n_heads")
    if heads % kv or hidden % heads:
        raise attn.error("n_heads must divide d_model and be a multiple of kv_n_heads", "kv_n_heads", value=kv,
                         expected=f"a divisor of {heads}", fix="use the value from config.json")
    head_dim = hidden // heads
    experts, top_k = ffn.int("moe_num_experts"), ffn.int("moe_top_k")
    _check_routing(ffn, "moe_top_k", top_k, experts)
    return dict(
        num_hidden_layers=layers, moe_layer_indices=tuple(range(layers)), hidden_size=hidden,
        expert_intermediate_size=ffn.int("ffn_hidden_size"), num_experts=experts, top_k=top_k,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        attention_layer_indices=tuple(range(layers)), attention_window_tokens=(None,) * layers,
        attention_params=layers * _gqa_params(hidden, heads, kv, head_dim),  # fused Wqkv + out_proj
        norm_params=(2 * layers + 1) * hidden,  # LayerNorm without bias
        router_params=layers * experts * hidden,
    ) | _embeddings(r, hidden, r.int("vocab_size"))


@register("JambaForCausalLM", ("jamba",), "Jamba")
def _jamba(r: ConfigReader) -> dict[str, Any]:
    hidden, layers = r.int("hidden_size"), r.int("num_hidden_layers")
    experts, top_k = r.int("num_experts"), r.int("num_experts_per_tok")
    _check_routing(r, "num_experts_per_tok", top_k, experts)
    inter = r.int("intermediate_size")
    e_period, e_offset = r.int("expert_layer_period", 2), r.int("expert_layer_offset", 1, minimum=0)
    a_period, a_offset = r.int("attn_layer_period", 8), r.int("attn_layer_offset", 4, minimum=0)
    moe = _check_moe_layers(r, "expert_layer_period",
                            [i for i in range(layers) if i % e_period == e_offset] if experts > 1 else [], layers)
    attention_layers = [i for i in range(layers) if i % a_period == a_offset]
    mamba_layers = [i for i in range(layers) if i % a_period != a_offset]
    heads, kv, head_dim = _heads(r, hidden)
    # Mamba mixer: d_inner = expand·H; dt_rank "auto" = ceil(H / 16) (JambaConfig)
    d_state, d_conv, expand = r.int("mamba_d_state", 16), r.int("mamba_d_conv", 4), r.int("mamba_expand", 2)
    d_inner = expand * hidden
    auto_rank = math.ceil(hidden / 16)
    dt_rank = auto_rank if r.data.get("mamba_dt_rank") == "auto" else r.int("mamba_dt_rank", auto_rank)
    conv_bias, proj_bias = r.bool("mamba_conv_bias", True), r.bool("mamba_proj_bias", False)
    mamba = (hidden * 2 * d_inner + (2 * d_inner if proj_bias else 0)        # in_proj
             + d_inner * d_conv + (d_inner if conv_bias else 0)               # depthwise conv1d
             + d_inner * (dt_rank + 2 * d_state)                              # x_proj
             + dt_rank * d_inner + d_inner                                    # dt_proj (+bias)
             + d_inner * d_state + d_inner                                    # A_log, D
             + d_inner * hidden + (hidden if proj_bias else 0)                # out_proj
             + dt_rank + 2 * d_state)                                         # dt/B/C RMSNorms
    return dict(
        num_hidden_layers=layers, moe_layer_indices=moe, hidden_size=hidden, expert_intermediate_size=inter,
        num_experts=experts, top_k=top_k, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        attention_layer_indices=tuple(attention_layers),
        attention_window_tokens=tuple(r.int("sliding_window", None) for _ in attention_layers),
        attention_params=len(attention_layers) * _gqa_params(hidden, heads, kv, head_dim),
        mamba_layer_indices=tuple(mamba_layers), mamba_params=len(mamba_layers) * mamba,
        mamba_state_elements_per_layer=d_inner * (d_conv + d_state),  # conv state + SSM state
        dense_mlp_params=(layers - len(moe)) * _FFN * hidden * inter,
        router_params=len(moe) * experts * hidden, norm_params=(2 * layers + 1) * hidden,
        notes=(f"{len(mamba_layers)} Mamba layers keep a fixed state per sequence, not a per-token KV cache",),
    ) | _embeddings(r, hidden, r.int("vocab_size"))


def _llama4(r: ConfigReader) -> dict[str, Any]:
    notes = []
    if "text_config" in r.data:  # Llama4ForConditionalGeneration: the language model is text_config
        r = r.sub("text_config")
        notes.append("text model only: the vision encoder and projector are not counted")
    hidden, layers = r.int("hidden_size"), r.int("num_hidden_layers")
    experts, top_k = r.int("num_local_experts"), r.int("num_experts_per_tok")
    _check_routing(r, "num_experts_per_tok", top_k, experts)
    inter = r.int("intermediate_size")
    step = r.int("interleave_moe_layer_step", 1)
    moe = _check_moe_layers(r, "moe_layers", list(r.int_list("moe_layers", tuple(range(step - 1, layers, step)))),
                            layers)
    dense_layers = layers - len(moe)
    heads, kv, head_dim = _heads(r, hidden)
    # RoPE layers use chunked attention (attention_chunk_size); every 4th layer is a global NoPE layer
    no_rope = r.int_list("no_rope_layers", tuple(int((i + 1) % 4 != 0) for i in range(layers)), length=layers)
    types = tuple("chunked_attention" if use_rope else "full_attention" for use_rope in no_rope)
    chunk = r.int("attention_chunk_size", None)
    if chunk is None:
        types = tuple("full_attention" for _ in range(layers))
    notes.append("chunked-attention layers keep at most attention_chunk_size tokens of KV cache")
    return dict(
        num_hidden_layers=layers, moe_layer_indices=moe, hidden_size=hidden, expert_intermediate_size=inter,
        num_experts=experts, top_k=top_k, num_shared_experts=1, shared_expert_intermediate_size=inter,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        attention_layer_indices=tuple(range(layers)),
        attention_window_tokens=_windows(r, layers, list(range(layers)), sliding=None, default_types=types,
                                         chunk=chunk),
        attention_params=layers * _gqa_params(hidden, heads, kv, head_dim, qkv_bias=r.bool("attention_bias", False),
                                              o_bias=r.bool("attention_bias", False)),  # qk L2 norm has no weights
        shared_expert_params=len(moe) * _FFN * hidden * inter,
        dense_mlp_params=dense_layers * _FFN * hidden * (r.int("intermediate_size_mlp") if dense_layers else 0),
        router_params=len(moe) * experts * hidden, norm_params=(2 * layers + 1) * hidden, notes=tuple(notes),
    ) | _embeddings(r, hidden, r.int("vocab_size"))


register("Llama4ForConditionalGeneration", ("llama4",), "Llama-4 (text model)")(_llama4)
register("Llama4ForCausalLM", ("llama4_text",), "Llama-4 text")(_llama4)


@register("LongcatFlashForCausalLM", ("longcat_flash",), "LongCat-Flash")
def _longcat_flash(r: ConfigReader) -> dict[str, Any]:
    # A LongCat layer holds two attention sublayers, two dense FFNs and one MoE ("shortcut" MoE).
    hidden, layers = r.int("hidden_size"), r.int("num_layers")
    experts, top_k = r.int("n_routed_experts"), r.int("moe_topk")
    zero = r.int("zero_expert_num", 0, minimum=0)
    kind = r.str("zero_expert_type", "identity")
    if kind not in ("identity", "zero"):
        raise r.error("unknown zero_expert_type", "zero_expert_type", value=kind, expected="identity or zero",
                      fix="use the value from config.json")
    _check_routing(r, "moe_topk", top_k, experts, zero)
    zero_experts = ZeroExperts(copy=zero) if kind == "identity" else ZeroExperts(null=zero)
    heads = r.int("num_attention_heads")
    q_lora = r.int("q_lora_rank", 0, minimum=0)
    kv_lora, nope, rope, v = (r.int("kv_lora_rank"), r.int("qk_nope_head_dim"), r.int("qk_rope_head_dim"),
                              r.int("v_head_dim"))
    choices = experts + zero
    return dict(
        num_hidden_layers=layers, moe_layer_indices=tuple(range(layers)), hidden_size=hidden,
        expert_intermediate_size=r.int("expert_ffn_hidden_size"), num_experts=experts, top_k=top_k,
        zero_experts=zero_experts, attention="mla", num_attention_heads=heads, num_key_value_heads=heads,
        head_dim=nope + rope, q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_nope_head_dim=nope,
        qk_rope_head_dim=rope, v_head_dim=v,
        attention_layer_indices=tuple(i // 2 for i in range(2 * layers)), attention_window_tokens=(None,) * 2 * layers,
        attention_params=2 * layers * _mla_params(hidden, heads, q_lora, kv_lora, nope, rope, v,
                                                  r.bool("attention_bias", False)),
        dense_mlp_params=2 * layers * _FFN * hidden * r.int("ffn_hidden_size"),
        # classifier over real + zero experts (+ bias if router_bias), and its score-correction bias
        router_params=layers * (choices * hidden + choices * (2 if r.bool("router_bias", False) else 1)),
        norm_params=(4 * layers + 1) * hidden,
        notes=(f"{zero} zero-computation (identity) experts per layer: a token picks {top_k} of {choices}, so it "
               f"runs between {max(0, top_k - zero)} and {min(top_k, experts)} real experts",),
    ) | _embeddings(r, hidden, r.int("vocab_size"))


# --------------------------------------------------------------------------- entry point


def _architecture_of(config: dict[str, Any], reader: ConfigReader) -> Architecture:
    names = config.get("architectures")
    names = names if isinstance(names, list) else []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = config.get("model_type")
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    key, value = ("architectures", names[0]) if names else ("model_type", model_type)
    if value is None:
        raise reader.error("the config names no architecture", "architectures",
                           expected="an `architectures` list or a `model_type`",
                           fix="add e.g. \"architectures\": [\"MixtralForCausalLM\"] from the model's config.json")
    raise reader.error("unsupported model architecture", key, value=value,
                       expected="one of " + ", ".join(supported_architectures()),
                       fix="use a supported model or a bundled preset; supporting a new one needs "
                           + ", ".join(NEEDED_FIELDS))


def spec_from_config(config: Any, *, name: str, file: str | Path | None = None, lines: dict[tuple, int] | None = None,
                     key_prefix: tuple = (), published: PublishedParams | None = None,
                     zero_experts: ZeroExperts | None = None) -> ModelSpec:
    """Build a :class:`ModelSpec` from the fields of an HF ``config.json``.

    Args:
        config: the parsed ``config.json`` (a dict).
        name: the spec's name.
        file: where the fields came from, for error messages.
        lines: key path -> line number (presets, from :func:`profiles.yamlio.load_yaml`).
        key_prefix: key path of the config inside ``file`` (``("config",)`` in a preset).
        published: the publisher's parameter counts (presets).
        zero_experts: zero-computation experts per MoE layer, overriding the config's.

    Raises:
        InputError: unknown architecture, a missing, mistyped or non-positive field, top-k
            larger than the experts, inconsistent groups.
    """
    root = ConfigReader(config if isinstance(config, dict) else {}, architecture="this model", file=file,
                        lines=lines, key_prefix=key_prefix)
    if not isinstance(config, dict):
        raise root.error("a config must be a JSON object", None, value=type(config).__name__,
                         fix="name the model's config.json")
    arch = _architecture_of(config, root)
    reader = ConfigReader(config, architecture=arch.name, file=file, lines=lines, key_prefix=key_prefix)
    fields = arch.build(reader)
    if zero_experts is not None:
        fields["zero_experts"] = zero_experts
        key = "zero_experts" if key_prefix == ("config",) else None
        if fields["top_k"] > fields["num_experts"] + zero_experts.count:
            raise InputError("top-k is larger than the routed plus zero experts", file=file, key=key,
                             value=fields["top_k"], expected=f"at most {fields['num_experts'] + zero_experts.count}",
                             fix="check the zero-expert counts")
    return ModelSpec(name=name, architecture=arch.name, published=published, source=str(file) if file else "",
                     **fields)
