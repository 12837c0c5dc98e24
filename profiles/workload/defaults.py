"""A default synthetic workload for every model, so that planning works with no trace.

Legend: L = MoE layers, E = router choices per layer, K = top-k.

Each bundled model preset has ``defaults/<preset>.json``: scale-free knobs calibrated on the
public routing data of its family, and their provenance (what data, which licence, how
close the calibration came). ``benchmarks/calibrate_defaults.py`` writes the files from
``../shared/traces``; they hold derived numbers only, never the data.

=================  =======================================================================
key                meaning
=================  =======================================================================
``preset``         the model preset the file is for
``family``         model family whose data was used
``knobs``          ``skew_by_depth``: ``[[depth, σ], ...]`` log-normal σ of the selection
                   shares at relative depth ``l / (L - 1)`` of the source model, ascending;
                   ``temporal`` (τ), ``affinity`` (α); ``prompt_tokens``,
                   ``output_tokens`` of the sequences the knobs were calibrated with
``provenance``     ``calibrated_from`` (one line), ``sources`` (data, repository, commit,
                   licence, use), ``method``, ``notes``, ``calibration`` (target vs
                   achieved per source)
=================  =======================================================================

:func:`default_workload` scales the knobs to a model: σ is interpolated over relative depth
onto the model's L MoE layers (σ is a law of shares, so it carries over to another E), τ
and α carry over as they are, K and E come from the model. A model that is not a bundled
preset uses its architecture's family file (``generic.json`` for architectures without
one).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..models import ModelSpec, load_model
from .synthetic import SyntheticWorkload, generate
from .trace import Trace

__all__ = ["DEFAULTS_DIR", "DEFAULT_TOKENS", "DefaultKnobs", "load_defaults", "defaults_for", "default_knobs",
           "default_workload"]

DEFAULTS_DIR = Path(__file__).parent / "defaults"
# Tokens of a default workload: DeepSeek-V3 (58 layers x 256 experts) draws them in about
# 1 s, and every layer's hit-rate curve then rests on 3,072 x K accesses.
DEFAULT_TOKENS = 3072
# Non-preset models: the preset file of their architecture's family.
_FAMILY_FILE = {
    "DeepseekV2ForCausalLM": "deepseek-v2-lite", "DeepseekV3ForCausalLM": "deepseek-v3",
    "MixtralForCausalLM": "mixtral-8x7b", "OlmoeForCausalLM": "olmoe-1b-7b",
    "Qwen3MoeForCausalLM": "qwen3-30b-a3b", "GptOssForCausalLM": "gpt-oss-20b",
    "PhimoeForCausalLM": "phi-3.5-moe",
}
_GENERIC = "generic"


@dataclass(frozen=True)
class DefaultKnobs:
    """One ``defaults/<name>.json`` file.

    Attributes:
        name: the file's stem (a preset name, or ``generic``).
        family: the model family whose data calibrated it.
        skew_by_depth: ``[(depth, σ), ...]`` with depth in [0, 1], ascending.
        temporal: τ.
        affinity: α.
        prompt_tokens, output_tokens: sequence shape the knobs were calibrated with.
        provenance: the file's ``provenance`` object.
        path: the file.
    """

    name: str
    family: str
    skew_by_depth: tuple[tuple[float, float], ...]
    temporal: float
    affinity: float
    prompt_tokens: int
    output_tokens: int
    provenance: dict[str, Any]
    path: Path

    def skew_for(self, num_layers: int) -> tuple[float, ...]:
        """``[L]`` σ per MoE layer: interpolated over relative depth."""
        depth, sigma = np.array(self.skew_by_depth, dtype=float).T
        at = np.linspace(0.0, 1.0, num_layers) if num_layers > 1 else np.zeros(1)
        return tuple(round(float(s), 4) for s in np.interp(at, depth, sigma))


def load_defaults(name: str) -> DefaultKnobs:
    """Read ``defaults/<name>.json``; a missing or malformed file is one :class:`InputError`."""
    path = DEFAULTS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in DEFAULTS_DIR.glob("*.json"))
        raise InputError("no default workload for this name", file=path, value=name, expected=", ".join(known),
                         fix="pass a trace with --trace, or a bundled preset")
    try:
        data = json.loads(path.read_text())
        knobs = data["knobs"]
        pairs = tuple((float(d), float(s)) for d, s in knobs["skew_by_depth"])
        out = DefaultKnobs(name=name, family=str(data["family"]), skew_by_depth=pairs,
                           temporal=float(knobs["temporal"]), affinity=float(knobs["affinity"]),
                           prompt_tokens=int(knobs["prompt_tokens"]), output_tokens=int(knobs["output_tokens"]),
                           provenance=dict(data["provenance"]), path=path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"malformed default workload file ({type(exc).__name__}: {exc})", file=path,
                         fix="regenerate it with benchmarks/calibrate_defaults.py") from None
    depths = [d for d, _ in pairs]
    if not pairs or depths != sorted(depths) or depths[0] < 0 or depths[-1] > 1 or any(s < 0 for _, s in pairs):
        raise InputError("skew_by_depth must be ascending depths in [0, 1] with σ >= 0", file=path,
                         key="knobs.skew_by_depth", value=pairs[:3], fix="regenerate the file")
    return out


def defaults_for(model: ModelSpec | str) -> DefaultKnobs:
    """The defaults file of ``model``: its preset's, else its architecture family's, else
    ``generic.json``."""
    spec = load_model(model) if isinstance(model, (str, Path)) else model
    if (DEFAULTS_DIR / f"{spec.name}.json").is_file():
        return load_defaults(spec.name)
    return load_defaults(_FAMILY_FILE.get(spec.architecture, _GENERIC))


def default_knobs(model: ModelSpec | str, *, tokens: int = DEFAULT_TOKENS, seed: int = 0) -> SyntheticWorkload:
    """The default :class:`SyntheticWorkload` of ``model``, scaled to its L, E and K.

    Args:
        model: a :class:`ModelSpec`, or a preset name / config path for :func:`load_model`.
        tokens: at least this many tokens, in whole sequences of the calibrated length.
        seed: the workload's seed.
    """
    spec = load_model(model) if isinstance(model, (str, Path)) else model
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise InputError("token count must be a positive integer", key="tokens", value=tokens,
                         expected="e.g. 3072", fix="pass tokens=3072")
    d = defaults_for(spec)
    P = d.prompt_tokens + d.output_tokens
    return SyntheticWorkload(
        num_layers=spec.num_moe_layers, num_experts=spec.num_router_choices, top_k=spec.top_k,
        skew=d.skew_for(spec.num_moe_layers), temporal=d.temporal, affinity=d.affinity,
        num_shared_experts=spec.num_shared_experts, num_zero_experts=spec.zero_experts.count,
        prompt_tokens=d.prompt_tokens, output_tokens=d.output_tokens, num_sequences=max(1, math.ceil(tokens / P)),
        seed=seed, model=spec.name, layer_map=tuple(spec.moe_layer_indices),
        note=f"default workload ({d.path.name}): {d.provenance.get('calibrated_from', '')}",
    )


def default_workload(model: ModelSpec | str, *, tokens: int = DEFAULT_TOKENS, seed: int = 0) -> Trace:
    """A synthetic trace for ``model`` from its family's calibrated knobs.

    The trace's meta names the defaults file and what it was calibrated from
    (``default_workload``), the shared experts (``num_shared_experts``) and any
    zero-computation experts (``zero_experts``: counts by kind; they are the ids
    ``E .. E + Z - 1`` after the E routed experts).

    Args:
        model: a :class:`ModelSpec`, or a preset name / config path.
        tokens: at least this many tokens (whole sequences of 64).
        seed: seed of every random draw.

    Returns:
        A :class:`Trace` of ``[T, L, K]`` expert ids with the model's L MoE layers,
        ``E + Z`` router choices and top-K.
    """
    spec = load_model(model) if isinstance(model, (str, Path)) else model
    w = default_knobs(spec, tokens=tokens, seed=seed)
    trace = generate(w)
    d = defaults_for(spec)
    meta = dict(trace.meta)
    meta["default_workload"] = {"file": d.path.name, "family": d.family,
                                "calibrated_from": d.provenance.get("calibrated_from", "")}
    if spec.zero_experts.count:
        z = spec.zero_experts
        meta["zero_experts"] = {"null": z.null, "copy": z.copy, "constant": z.constant,
                                "ids": [spec.num_experts, spec.num_router_choices - 1]}
    return Trace(expert_ids=trace.expert_ids, seq_lens=trace.seq_lens, phase=trace.phase,
                 num_experts=trace.num_experts, layer_map=trace.layer_map, gate_weights=trace.gate_weights,
                 model=trace.model, source=f"default workload for {spec.name} ({d.path.name})", meta=meta)
