"""Model specs: the shape of a Mixture-of-Experts model, as the planner and simulator see it.

A :class:`ModelSpec` comes from a Hugging Face ``config.json`` (a file, or a directory
holding one) or from a bundled preset (``profiles/models/<name>.yaml``: the same
``config.json`` fields plus the publisher's parameter counts); both go through
:func:`profiles.hf_config.spec_from_config`.

Shape legend (gpt-fast style):

    L     = num_hidden_layers            L_moe = len(moe_layer_indices)
    H     = hidden_size                  I     = expert_intermediate_size
    E     = num_experts (routed, with weights)   k = top_k (experts chosen per token)
    Z     = zero_experts.count (null/copy/constant experts: no weights, no flops)
    V     = vocab_size

An expert is a gated FFN (gate, up, down projections: 3·H·I weights, plus biases for
gpt-oss). Everything that is not a routed expert is "dense": embeddings, attention, Mamba
mixers, dense FFN layers, shared experts, routers and norms. Shared experts run for every
token, so they are dense for placement; they are counted apart so a plan can say so.

    spec = load_model("mixtral-8x7b")          # preset name, config.json path or directory
    spec.total_params, spec.active_params()    # 46.7e9, 12.9e9
    spec.expert_bytes("int4")                  # one expert at int4, scales and zeros included
    spec.kv_cache_bytes(4096, batch_size=1)    # KV (and Mamba state) for one 4k sequence
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError, from_validation_error
from .formats import FORMATS, get_format
from .limits import MAX_EXPERTS
from .yamlio import load_json, load_yaml

__all__ = [
    "ZeroExperts", "PublishedParams", "ModelSpec", "ModelPreset", "MemoryFit",
    "load_model", "bundled_models", "memory_fit", "describe_model", "BUNDLED_DIR", "GATED_FFN_MATRICES",
]

BUNDLED_DIR = Path(__file__).parent / "models"

# gate, up and down projections of a gated (SwiGLU/GeGLU) FFN: every supported model uses one.
GATED_FFN_MATRICES = 3

# Quantisers (GPTQ, AWQ, MXFP4, llama.cpp) quantise matrices; biases and norm weights stay
# 16-bit. They are < 0.1% of any supported model, so bytes count every parameter at the
# format's width and say so, rather than carry a second width everywhere.


@dataclass(frozen=True)
class ZeroExperts:
    """Zero-computation experts per MoE layer (MoE++, AdaMoE, LongCat-Flash).

    They are router choices with no weights and no flops: ``null`` returns zeros (AdaMoE's
    null expert, MoE++'s zero expert), ``copy`` returns its input (MoE++ copy, LongCat-Flash
    identity), ``constant`` returns a trained vector (MoE++; its H-vector is negligible and
    lives on every device). A token that picks one uses one fewer real expert.
    """

    null: int = 0
    copy: int = 0
    constant: int = 0

    def __post_init__(self) -> None:
        for kind in ("null", "copy", "constant"):
            value = getattr(self, kind)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError("zero-expert count must be a non-negative integer", key=f"zero_experts.{kind}",
                                 value=value, fix="write e.g. zero_experts: {null: 1, copy: 1, constant: 2}")

    @property
    def count(self) -> int:
        """Z: zero-computation experts per MoE layer."""
        return self.null + self.copy + self.constant


@dataclass(frozen=True)
class PublishedParams:
    """Parameter counts as the publisher states them, and how they count.

    Attributes:
        total_params: total parameters (main model: DeepSeek-V3's MTP layer excluded).
        active_params: parameters used per token.
        active_counts_input_embedding: whether ``active_params`` includes the input
            embedding table (a lookup, not a matmul). Mixtral's 12.9B does; gpt-oss's 5.13B
            and DeepSeek-V3's 36.6B count the unembedding (output head) but not the input
            embedding.
        source: where the figures are printed (model card, paper, README).
        non_embedding_params: total without embedding tables, where the publisher states it
            (Qwen); ``None`` otherwise.
        tolerance: relative tolerance a test allows between computed and published counts:
            0.01 unless the publisher prints too few digits for 1% (then ``note`` says why).
        note: why the tolerance is wider, or any other remark.
    """

    total_params: float
    active_params: float
    active_counts_input_embedding: bool
    source: str
    non_embedding_params: float | None = None
    tolerance: float = 0.01
    note: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """The shape of an MoE model and the parameter counts derived from its config.

    Parameter-count fields (``*_params``) are whole-model totals of that component, in
    parameters (multiply by bits per weight / 8 for bytes).

    Attributes:
        name: preset name, or the config's directory name.
        architecture: HF architecture class, e.g. ``"DeepseekV3ForCausalLM"``.
        num_hidden_layers: L, decoder layers (DeepSeek-V3's MTP layer excluded).
        moe_layer_indices: decoder layers that hold routed experts, ascending.
        hidden_size: H.
        expert_intermediate_size: I, width of one routed expert's FFN.
        num_experts: E, routed experts with weights per MoE layer.
        top_k: k, experts the router picks per token (zero experts included).
        num_shared_experts: experts every token runs (DeepSeek, Qwen2-MoE, Llama-4).
        shared_expert_intermediate_size: FFN width of one shared expert.
        zero_experts: null/copy/constant experts per MoE layer (no bytes, no flops).
        n_group: expert groups of group-limited routing (DeepSeek ``n_group``; 1 = none).
        topk_group: groups a token may use (DeepSeek ``topk_group``).
        vocab_size: V.
        tie_word_embeddings: the output head shares the input embedding's weights.
        attention: ``"gqa"`` (multi-head, grouped-query or multi-query) or ``"mla"``.
        num_attention_heads: query heads.
        num_key_value_heads: KV heads (GQA); equal to query heads for MLA.
        head_dim: GQA head width (MLA: ``qk_nope_head_dim + qk_rope_head_dim``).
        q_lora_rank: MLA query compression rank (0: no query compression).
        kv_lora_rank: MLA compressed KV width (0 for GQA).
        qk_nope_head_dim: MLA per-head query/key width without RoPE.
        qk_rope_head_dim: MLA decoupled RoPE key width, shared by all heads.
        v_head_dim: MLA per-head value width.
        attention_layer_indices: decoder layer of every attention sublayer that keeps a KV
            cache (Jamba: 4 of 32 layers; LongCat-Flash: two per layer, so each index twice).
        attention_window_tokens: per entry of ``attention_layer_indices``, the tokens it
            attends to: ``None`` = the whole context, an int = a sliding window (gpt-oss,
            every other layer, 128) or an attention chunk (Llama-4, 8192).
        mamba_layer_indices: decoder layers with a Mamba mixer instead of attention.
        mamba_state_elements_per_layer: recurrent state per sequence of one Mamba layer
            (conv state + SSM state), in elements; it does not grow with the context.
        expert_bias_params: bias parameters of one routed expert (gpt-oss: 2·I + H).
        embedding_params: input embedding table, V·H.
        lm_head_params: output head (0 when tied), bias included (Phi-3.5-MoE).
        attention_params: attention projections, MLA norms, sinks, biases; all layers.
        mamba_params: Mamba mixers, all layers.
        dense_mlp_params: FFNs of layers without routed experts (DeepSeek's first layers,
            Jamba's even layers, Llama-4 Maverick's dense layers, LongCat's two per layer).
        shared_expert_params: shared experts and their gates, all MoE layers.
        router_params: router weights, biases and score-correction biases, all MoE layers.
        norm_params: decoder-layer norms and the final norm.
        published: the publisher's counts, for presets.
        source: the file the spec came from.
        notes: remarks on the shape worth showing a user (sliding windows, what is left out).
    """

    name: str
    architecture: str
    num_hidden_layers: int
    moe_layer_indices: tuple[int, ...]
    hidden_size: int
    expert_intermediate_size: int
    num_experts: int
    top_k: int
    vocab_size: int
    tie_word_embeddings: bool
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_layer_indices: tuple[int, ...]
    attention_window_tokens: tuple[int | None, ...]
    embedding_params: int
    lm_head_params: int
    attention_params: int
    norm_params: int
    router_params: int
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    zero_experts: ZeroExperts = field(default_factory=ZeroExperts)
    n_group: int = 1
    topk_group: int = 1
    attention: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    mamba_layer_indices: tuple[int, ...] = ()
    mamba_state_elements_per_layer: int = 0
    expert_bias_params: int = 0
    mamba_params: int = 0
    dense_mlp_params: int = 0
    shared_expert_params: int = 0
    published: PublishedParams | None = None
    source: str = ""
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The config readers check every field with its file and key; these checks keep a
        # spec built or `replace()`d in code just as consistent.
        def bad(key: str, value: Any, expected: str) -> InputError:
            return InputError(f"invalid model spec {self.name!r}", key=key, value=value, expected=expected)

        for key in ("num_hidden_layers", "hidden_size", "expert_intermediate_size", "num_experts", "top_k",
                    "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "n_group", "topk_group"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, value, "a positive integer")
        layers = self.moe_layer_indices
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= self.num_hidden_layers:
            raise bad("moe_layer_indices", layers, f"distinct ascending layer indices in [0, {self.num_hidden_layers})")
        if len(self.attention_window_tokens) != len(self.attention_layer_indices):
            raise bad("attention_window_tokens", len(self.attention_window_tokens),
                      f"one entry per attention layer ({len(self.attention_layer_indices)})")
        if self.top_k > self.num_router_choices:
            raise bad("top_k", self.top_k, f"at most num_experts + zero experts ({self.num_router_choices})")
        if self.attention not in ("gqa", "mla"):
            raise bad("attention", self.attention, "'gqa' or 'mla'")

    # ------------------------------------------------------------------ shape

    @property
    def num_moe_layers(self) -> int:
        """L_moe: layers with routed experts."""
        return len(self.moe_layer_indices)

    @property
    def num_router_choices(self) -> int:
        """E + Z: what the router picks from (real and zero-computation experts)."""
        return self.num_experts + self.zero_experts.count

    # ------------------------------------------------------------------ parameters

    @property
    def params_per_expert(self) -> int:
        """Parameters of one routed expert: 3·H·I (+ biases)."""
        return GATED_FFN_MATRICES * self.hidden_size * self.expert_intermediate_size + self.expert_bias_params

    @property
    def expert_params(self) -> int:
        """Parameters of all routed experts: L_moe·E·params_per_expert."""
        return self.num_moe_layers * self.num_experts * self.params_per_expert

    @property
    def dense_params(self) -> int:
        """Parameters that are not routed experts (shared experts included)."""
        return (self.embedding_params + self.lm_head_params + self.attention_params + self.mamba_params
                + self.dense_mlp_params + self.shared_expert_params + self.router_params + self.norm_params)

    @property
    def total_params(self) -> int:
        """All parameters of the main model."""
        return self.dense_params + self.expert_params

    def active_params(self, include_input_embedding: bool = True, real_experts_per_token: float | None = None) -> float:
        """Parameters one token uses: dense ones plus ``real_experts_per_token`` experts per MoE layer.

        Args:
            include_input_embedding: count the input embedding table (a lookup of one row,
                but publishers such as Mistral count it; OpenAI and DeepSeek do not). A tied
                table counts once with it and not at all without it (IBM's Granite "A800M"
                counts neither the lookup nor the tied head).
            real_experts_per_token: routed experts with weights a token runs per MoE layer.
                Default ``min(top_k, num_experts)``: the most, as when no zero expert is
                picked (LongCat-Flash publishes a range because it varies per token).
        """
        k = min(self.top_k, self.num_experts) if real_experts_per_token is None else real_experts_per_token
        dense = self.dense_params
        if not include_input_embedding:
            dense -= self.embedding_params
        active = dense + self.num_moe_layers * k * self.params_per_expert
        return int(active) if float(k).is_integer() else active

    # ------------------------------------------------------------------ bytes and flops

    def expert_bytes(self, fmt: str = "bf16") -> float:
        """Bytes of one routed expert stored in ``fmt``, group-wise scales/zeros included.

        Every parameter counts at the format's width, biases too (gpt-oss; < 0.1% of an expert).
        """
        return self.params_per_expert * get_format(fmt).bits_per_weight / 8

    def experts_bytes(self, fmt: str = "bf16") -> float:
        """Bytes of all routed experts in ``fmt`` (zero experts take none)."""
        return self.expert_params * get_format(fmt).bits_per_weight / 8

    def dense_bytes(self, fmt: str = "bf16") -> float:
        """Bytes of the dense (non-expert) parameters in ``fmt``."""
        return self.dense_params * get_format(fmt).bits_per_weight / 8

    def weight_bytes(self, fmt: str = "bf16") -> float:
        """Bytes of every weight in ``fmt``: dense + all routed experts."""
        return self.dense_bytes(fmt) + self.experts_bytes(fmt)

    @property
    def expert_flops_per_token(self) -> int:
        """FLOPs of one expert for one token: 2·3·H·I (multiply-add per weight; biases ignored)."""
        return 2 * GATED_FFN_MATRICES * self.hidden_size * self.expert_intermediate_size

    # ------------------------------------------------------------------ KV cache

    @property
    def kv_elements_per_token_per_layer(self) -> int:
        """Cached elements per token of one attention layer.

        GQA: keys and values, 2·num_key_value_heads·head_dim. MLA: the compressed latent and
        the shared RoPE key, kv_lora_rank + qk_rope_head_dim (what DeepSeek's inference
        caches; expanding it per head would be 2·heads·... and defeat MLA).
        """
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, fmt: str = "bf16") -> float:
        """Bytes one token adds to the KV cache while every attention layer still keeps it.

        All attention layers count; a sliding-window (gpt-oss) or chunked (Llama-4) layer
        stops growing once the context passes its window, which :meth:`kv_cache_bytes`
        accounts for. Mamba layers keep a fixed state instead (:meth:`mamba_state_bytes`).
        """
        bits = get_format(fmt).bits_per_weight
        return len(self.attention_layer_indices) * self.kv_elements_per_token_per_layer * bits / 8

    def mamba_state_bytes(self, fmt: str = "bf16") -> float:
        """Bytes of Mamba recurrent state of one sequence, all Mamba layers (any context)."""
        return len(self.mamba_layer_indices) * self.mamba_state_elements_per_layer * get_format(fmt).bits_per_weight / 8

    def kv_cache_bytes(self, context_tokens: int, batch_size: int = 1, fmt: str = "bf16") -> float:
        """KV cache plus Mamba state for ``batch_size`` sequences of ``context_tokens`` tokens.

        A windowed layer keeps ``min(context_tokens, window)`` tokens.

        Raises:
            InputError: a negative context or a batch below 1.
        """
        if isinstance(context_tokens, bool) or not isinstance(context_tokens, int) or context_tokens < 0:
            raise InputError("context must be a non-negative number of tokens", key="context_tokens",
                             value=context_tokens, fix="pass e.g. --context 4096")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError("batch size must be at least 1", key="batch_size", value=batch_size,
                             fix="pass e.g. --batch 1")
        bits = get_format(fmt).bits_per_weight
        tokens = sum(context_tokens if w is None else min(context_tokens, w) for w in self.attention_window_tokens)
        per_sequence = tokens * self.kv_elements_per_token_per_layer * bits / 8 + self.mamba_state_bytes(fmt)
        return batch_size * per_sequence

    # ------------------------------------------------------------------ summary

    def summary(self) -> dict[str, Any]:
        """Fields and derived figures as plain data (what ``planner models show --json`` prints)."""
        data = asdict(self)
        data["moe_layer_indices"] = list(self.moe_layer_indices)
        data.update(
            num_moe_layers=self.num_moe_layers,
            params_per_expert=self.params_per_expert,
            expert_params=self.expert_params,
            dense_params=self.dense_params,
            total_params=self.total_params,
            active_params=self.active_params(include_input_embedding=True),
            active_params_without_input_embedding=self.active_params(include_input_embedding=False),
            expert_flops_per_token=self.expert_flops_per_token,
            kv_bytes_per_token_bf16=self.kv_bytes_per_token("bf16"),
            mamba_state_bytes_bf16=self.mamba_state_bytes("bf16"),
        )
        return data


# --------------------------------------------------------------------------- presets


_STRICT = ConfigDict(extra="forbid", frozen=True)


class _PublishedModel(BaseModel):
    model_config = _STRICT

    total_params: float = Field(gt=0, le=1e15)
    active_params: float = Field(gt=0, le=1e15)
    active_counts_input_embedding: bool
    source: str = Field(min_length=1)
    non_embedding_params: float | None = Field(default=None, gt=0, le=1e15)
    tolerance: float = Field(default=0.01, gt=0, le=0.05)
    note: str = ""

    @model_validator(mode="after")
    def _wide_tolerance_needs_a_reason(self) -> "_PublishedModel":
        if self.tolerance > 0.01 and not self.note:
            raise InputError("a tolerance above 1% needs a note saying why", key="tolerance", value=self.tolerance,
                             fix="add `note:` (e.g. the publisher prints two digits only), or use 0.01")
        return self


class _ZeroExpertsModel(BaseModel):
    model_config = _STRICT

    null: int = Field(default=0, ge=0, le=MAX_EXPERTS)
    copy_: int = Field(default=0, ge=0, le=MAX_EXPERTS, alias="copy")
    constant: int = Field(default=0, ge=0, le=MAX_EXPERTS)


class ModelPreset(BaseModel):
    """A bundled preset file: the model's HF ``config.json`` fields and its published counts."""

    model_config = _STRICT

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    description: str = ""
    hf_repo: str = ""
    source: str = Field(min_length=1, description="where the config fields come from (config.json URL)")
    published: _PublishedModel | None = None
    zero_experts: _ZeroExpertsModel | None = None
    config: dict[str, Any]


def bundled_models() -> dict[str, Path]:
    """Bundled preset names (file stems) and their paths."""
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob("*.yaml"))}


def load_model(name_or_path: str | Path) -> ModelSpec:
    """Load a model spec from a bundled preset name, a ``config.json`` path or its directory.

    A ``.yaml``/``.yml`` path is read as a preset file (the bundled format).

    Raises:
        InputError: unknown name, missing or malformed file, unknown architecture, a
            missing or invalid field (one line naming the file, key, value and a fix).
    """
    from .hf_config import spec_from_config

    text = str(name_or_path)
    path = Path(text)
    if not path.exists():
        bundled = bundled_models()
        if text in bundled:
            return _load_preset(bundled[text])
        if path.suffix in (".json", ".yaml", ".yml") or "/" in text or "\\" in text:
            raise InputError("file not found", file=text,
                             fix="check the path, or use a bundled model name (planner models list)")
        raise InputError("unknown model", value=text,
                         expected="a config.json path, a directory holding one, or one of: " + ", ".join(bundled),
                         fix="run `planner models list`")
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise InputError("directory holds no config.json", file=path,
                             fix="name the model's Hugging Face checkpoint directory, or its config.json")
        path = config_path
    if path.suffix in (".yaml", ".yml"):
        return _load_preset(path)
    data = load_json(path)
    name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    return spec_from_config(data, name=name, file=path)


def _load_preset(path: Path) -> ModelSpec:
    from .hf_config import spec_from_config

    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError("a model preset must be a YAML mapping", file=path, value=type(data).__name__,
                         fix="start the file with `name: ...`, `source: ...` and `config: {...}`")
    zero = data.get("zero_experts")
    if isinstance(zero, dict) and None in zero:
        # YAML reads a bare `null:` key as None; the user meant the null expert
        data = dict(data, zero_experts={("null" if k is None else k): v for k, v in zero.items()})
    try:
        preset = ModelPreset.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc, file=path, lines=lines) from None
    published = PublishedParams(**preset.published.model_dump()) if preset.published else None
    zero = None
    if preset.zero_experts is not None:
        z = preset.zero_experts
        zero = ZeroExperts(null=z.null, copy=z.copy_, constant=z.constant)
    return spec_from_config(preset.config, name=preset.name, file=path, lines=lines, key_prefix=("config",),
                            published=published, zero_experts=zero)


# --------------------------------------------------------------------------- memory fit


@dataclass(frozen=True)
class MemoryFit:
    """Whether a model's weights in one format, plus its KV cache, fit one memory pool.

    Attributes:
        memory: memory pool id (``node/gpu0``).
        tier: ``hbm``, ``dram``, ``nvme`` or ``accel``.
        capacity_bytes: the pool's capacity.
        format: number format of every weight.
        weight_bytes: dense + routed-expert bytes in ``format``.
        kv_bytes: KV cache (+ Mamba state) for the stated context and batch.
        needed_bytes: weight_bytes + kv_bytes.
        fits: needed_bytes <= capacity_bytes.
        free_bytes: capacity_bytes - needed_bytes (negative: the shortfall).
    """

    memory: str
    tier: str
    capacity_bytes: float
    format: str
    weight_bytes: float
    kv_bytes: float
    needed_bytes: float
    fits: bool
    free_bytes: float


def memory_fit(spec: ModelSpec, memories: Iterable[Any], *, context_tokens: int = 4096, batch_size: int = 1,
               kv_format: str = "bf16", formats: Iterable[str] | None = None) -> list[MemoryFit]:
    """For each memory pool and format: do all weights plus the KV cache fit on their own?

    This is the naive "could it live in one place" check, before any planning: no
    activation workspace, no runtime overhead, no split across pools.

    Args:
        spec: the model.
        memories: memory pools (``Hardware.memories.values()``: objects with ``id``,
            ``tier`` and ``capacity_bytes``).
        context_tokens: tokens per sequence held in the KV cache (default 4096).
        batch_size: sequences held at once (default 1).
        kv_format: number format of the KV cache (default bf16).
        formats: weight formats to try (default: every format in ``profiles.formats``).
    """
    kv = spec.kv_cache_bytes(context_tokens, batch_size, kv_format)
    names = list(formats) if formats is not None else list(FORMATS)
    out = []
    for mem in memories:
        for fmt in names:
            weights = spec.weight_bytes(fmt)
            needed = weights + kv
            out.append(MemoryFit(memory=mem.id, tier=mem.tier, capacity_bytes=mem.capacity_bytes, format=fmt,
                                 weight_bytes=weights, kv_bytes=kv, needed_bytes=needed,
                                 fits=needed <= mem.capacity_bytes, free_bytes=mem.capacity_bytes - needed))
    return out


def describe_model(spec: ModelSpec, *, context_tokens: int = 4096, batch_size: int = 1, kv_format: str = "bf16",
                   memories: Iterable[Any] | None = None) -> dict[str, Any]:
    """Everything ``planner models show`` prints, as plain data.

    The spec's fields and derived counts (:meth:`ModelSpec.summary`), ``bytes_by_format``
    (one row per number format: bits per weight, one expert, all experts, dense, total),
    ``kv_cache`` (per token and for ``batch_size`` sequences of ``context_tokens``) and,
    when ``memories`` are given, ``fit`` (:func:`memory_fit` rows).
    """
    data = spec.summary()
    if spec.published is not None:
        data["active_params_as_published"] = spec.active_params(spec.published.active_counts_input_embedding)
    data["bytes_by_format"] = [
        {"format": fmt, "bits_per_weight": f.bits_per_weight, "expert_bytes": spec.expert_bytes(fmt),
         "experts_bytes": spec.experts_bytes(fmt), "dense_bytes": spec.dense_bytes(fmt),
         "weight_bytes": spec.weight_bytes(fmt)}
        for fmt, f in FORMATS.items()]
    data["kv_cache"] = {
        "format": kv_format, "bytes_per_token": spec.kv_bytes_per_token(kv_format),
        "context_tokens": context_tokens, "batch_size": batch_size,
        "bytes": spec.kv_cache_bytes(context_tokens, batch_size, kv_format),
        "mamba_state_bytes_per_sequence": spec.mamba_state_bytes(kv_format),
    }
    if memories is not None:
        data["fit"] = [asdict(row) for row in memory_fit(spec, memories, context_tokens=context_tokens,
                                                         batch_size=batch_size, kv_format=kv_format)]
    return data
