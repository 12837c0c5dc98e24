"""Random MoE checkpoints built from configs, for examples, tests and benchmarks (no download).

    make_random_checkpoint("mixtral", "ckpt/", hidden_size=256, num_hidden_layers=4)

writes an HF safetensors checkpoint (random weights, ``save_pretrained``) and a word-level
tokenizer trained on nothing (a fixed vocabulary), so ``planner export`` / ``run.py`` /
``planner verify`` run end to end. Needs the runtime extra (torch, transformers, tokenizers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from profiles.errors import InputError

__all__ = ["FAMILIES", "make_random_checkpoint", "save_tokenizer"]

# family -> (transformers config class, defaults). Router weights are spread (std 0.2) so
# routing is not a tie; experts keep the default init.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                                  "num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 128,
                                     "head_dim": 32, "num_hidden_layers": 4, "num_experts": 16,
                                     "num_experts_per_tok": 4, "norm_topk_prob": True}),
    "olmoe": ("OlmoeConfig", {"hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 4,
                              "num_experts": 16, "num_experts_per_tok": 4}),
}
_ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "tie_word_embeddings": False}
WORDS = ["the", "cat", "sat", "on", "the", "mat", "while", "experts", "route", "tokens", "through", "layers", "of", "a", "sparse", "model", "and", "the", "planner", "decides", "where", "every", "expert", "lives", "so", "that", "the", "cache", "holds", "the", "hot", "ones"]


def make_random_checkpoint(family: str, out_dir: str | Path, *, seed: int = 0, vocab_size: int = 256,
                           **config: Any) -> Path:
    """Write a random ``family`` checkpoint with a tokenizer to ``out_dir``; returns it.

    Args:
        family: one of :data:`FAMILIES` (mixtral, qwen3_moe, olmoe).
        out_dir: created; must not hold a checkpoint already.
        seed: torch seed of the weights.
        vocab_size: tokenizer and embedding size (>= 64).
        config: overrides of the family's config (``hidden_size=1024``, ``num_hidden_layers=8``...).
    """
    if family not in FAMILIES:
        raise InputError("unknown model family", key="family", value=family, expected=", ".join(FAMILIES),
                         fix="pick one of the listed families")
    out = Path(out_dir)
    if (out / "config.json").exists():
        raise InputError("a checkpoint is there already", file=out, fix="choose an empty directory")
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise InputError(f"building a checkpoint needs the runtime extra ({exc.name} is missing)",
                         fix="pip install torch==2.13.0 && pip install 'moe-planner[runtime]'") from None
    cls, defaults = FAMILIES[family]
    cfg = getattr(transformers, cls)(**{**_ATTENTION, **defaults, "vocab_size": vocab_size, **config})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "weight") and hasattr(layer.mlp, "experts"):
                gate.weight.normal_(0.0, 0.2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(out, vocab_size)
    return out


def save_tokenizer(directory: str | Path, vocab_size: int = 256) -> None:
    """A word-level tokenizer over :data:`WORDS` padded to ``vocab_size`` ids, BOS prepended
    (ids: 0 unknown, 1 BOS, 2 EOS), saved into ``directory`` (no download)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["[UNK]", "[BOS]", "[EOS]", *dict.fromkeys(WORDS)])}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]",
                                         eos_token="[EOS]").save_pretrained(directory)
