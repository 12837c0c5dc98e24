"""A default workload for every model, so planning works with no trace at all.

Each model family has a JSON file in ``defaults/`` with knob values calibrated from the
public routing data available for that family (``benchmarks/calibrate_defaults.py``
regenerates them from ``../shared/traces``; the files say exactly what came from where):

- ``deepseek.json``: the ESFT DeepSeek-V2-Lite per-token trace (skew, temporal, affinity);
- ``olmoe.json``: OLMoE-1B-7B expert counts (skew); temporal and affinity from DeepSeek;
- ``mixtral.json``: Mixtral-8x7B popularity on MMLU (skew); temporal and affinity from DeepSeek;
- ``generic.json``: models without public routing data here (Qwen3, gpt-oss, Phi-3.5-MoE,
  ...): the DeepSeek-calibrated knobs.

Per-layer skew is stored against relative depth and resampled to the model's MoE layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .synthetic import SyntheticWorkload, generate
from .trace import Trace

__all__ = ["DEFAULTS_DIR", "FAMILY_OF", "default_knobs", "default_spec", "default_workload"]

DEFAULTS_DIR = Path(__file__).parent / "defaults"

# HF architecture -> defaults file
FAMILY_OF = {"DeepseekV2ForCausalLM": "deepseek", "DeepseekV3ForCausalLM": "deepseek",
             "OlmoeForCausalLM": "olmoe", "MixtralForCausalLM": "mixtral"}


def default_knobs(architecture: str) -> dict[str, Any]:
    """The defaults file of ``architecture``'s family (``generic`` when none has data)."""
    family = FAMILY_OF.get(architecture, "generic")
    path = DEFAULTS_DIR / f"{family}.json"
    if not path.is_file():
        raise InputError("default workload file missing from the installation", file=path,
                         fix="reinstall moe-planner, or pass --trace")
    return json.loads(path.read_text())


def default_spec(model: Any, *, num_sequences: int = 48, prompt_tokens: int = 32, output_tokens: int = 16,
                 seed: int = 0) -> SyntheticWorkload:
    """The synthetic workload knobs for ``model`` (a ``ModelSpec`` or a preset name)."""
    if isinstance(model, str):
        from ..models import load_model

        model = load_model(model)
    knobs = default_knobs(model.architecture)
    L = model.num_moe_layers
    depth = np.asarray(knobs["skew_by_depth"], float)  # skew at evenly spaced relative depths
    skew = tuple(float(x) for x in np.interp(np.linspace(0, 1, L), np.linspace(0, 1, len(depth)), depth))
    return SyntheticWorkload(
        num_layers=L, num_experts=model.num_experts, top_k=model.top_k, skew=skew, temporal=knobs["temporal"],
        affinity=knobs["affinity"], fanout=knobs.get("fanout", 2), num_shared_experts=model.num_shared_experts,
        prompt_tokens=prompt_tokens, output_tokens=output_tokens, num_sequences=num_sequences, seed=seed,
        model=model.name, layer_map=tuple(int(i) for i in model.moe_layer_indices),
        note=f"default workload ({knobs['family']}): {knobs['calibrated_from']}")


def default_workload(model: Any, **kwargs: Any) -> Trace:
    """A trace from :func:`default_spec` (same model and seed: the same trace, byte for byte)."""
    return generate(default_spec(model, **kwargs))
