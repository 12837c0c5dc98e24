"""Measured expert quality (``planner quality measure`` writes it, ``optimize --quality`` reads it).

Legend: L = MoE layers, E = routed experts per layer, b = formats measured.

A quality file holds, per (MoE layer, expert, format), the expert's relative output error
when its weights are stored at that format and unpacked as the bundle runtime unpacks them:

    error = sqrt( sum_t ||y_q(x_t) - y(x_t)||^2 / sum_t ||y(x_t)||^2 )

over the expert's sampled tokens x_t (the inputs the router sent it while the prompts ran),
with y the fp32 expert and y_q the quantised one: a normalised RMS error, the quantity of
the planner's per-format constants (``planner.costs.QUANT_ERROR``). An expert the prompts
never routed to has ``tokens: 0`` and no errors; the planner gives it its layer's
token-weighted mean error at that format.

Per expert it also keeps the largest magnitude of the down projection's input and output
over the sampled tokens, and ``super_expert`` (a Super Experts candidate, Su et al. 2025,
arXiv 2507.23279: experts whose down_proj output carries rare, extreme activation outliers).
The file states the rule it used (``super_expert_rule``).

The file enters the planner here and is checked whole: JSON, known keys only (pydantic,
``extra="forbid"``), the schema version, known formats, one entry per layer and expert in
order, finite non-negative errors; :func:`check_matches` holds it to the planned model.
This module imports neither torch nor the planner.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InputError, from_validation_error
from .formats import get_format

__all__ = ["SCHEMA", "QualityFile", "ExpertQuality", "LayerQuality", "load_quality", "check_matches",
           "error_table", "super_experts", "file_digest"]

SCHEMA = "moe-planner/quality/1"
_FIX = "measure it again with `planner quality measure --checkpoint DIR --out quality.json`"
_STRICT = ConfigDict(extra="forbid", frozen=True)


class ExpertQuality(BaseModel):
    model_config = _STRICT

    expert: int = Field(ge=0)
    tokens: int = Field(ge=0)  # sampled tokens the errors average over
    error: dict[str, float]  # format -> relative output error (empty when tokens == 0)
    down_in_max_abs: float = Field(ge=0)
    down_out_max_abs: float = Field(ge=0)
    super_expert: bool

    @field_validator("error")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        for fm, x in v.items():
            if not (math.isfinite(x) and x >= 0):
                raise ValueError(f"error at {fm} is {x}: expected a finite number >= 0")
        return v


class LayerQuality(BaseModel):
    model_config = _STRICT

    moe_layer: int = Field(ge=0)
    hidden_layer: int = Field(ge=0)
    experts: list[ExpertQuality]


class QualityFile(BaseModel):
    """One measured checkpoint."""

    model_config = _STRICT

    schema_: Literal["moe-planner/quality/1"] = Field(alias="schema")
    model: str  # the planner's model name for the checkpoint (profiles.models.load_model)
    model_digest: str  # planner.plan_digest.model_digest of that spec
    checkpoint: str
    formats: list[str]
    metric: str
    tokens_per_expert: int = Field(ge=1)  # the sample bound
    super_expert_rule: str
    outlier_factor: float = Field(gt=0)
    prompts: int = Field(ge=0)
    layers: list[LayerQuality]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> int:
        return len(self.layers[0].experts) if self.layers else 0


def file_digest(path: str | Path) -> str:
    """sha256 (16 hex digits) of the file's bytes: what a plan records of its quality file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def load_quality(path: str | Path) -> QualityFile:
    """Read and check a quality file; every problem is one :class:`InputError` line."""
    path = Path(path)
    if not path.is_file():
        raise InputError("quality file not found" if not path.exists() else "quality file is a directory", file=path,
                         key="--quality", expected="a JSON file written by `planner quality measure`", fix=_FIX)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"quality file is not valid JSON ({exc})", file=path, fix=_FIX) from None
    if not isinstance(raw, dict):
        raise InputError("quality file is not a JSON object", file=path, fix=_FIX)
    if raw.get("schema") != SCHEMA:
        raise InputError("not a quality file of this version", file=path, key="schema", value=raw.get("schema"),
                         expected=SCHEMA, fix=_FIX)
    try:
        q = QualityFile.model_validate(raw)
    except ValidationError as exc:
        raise from_validation_error(exc, file=path, fixes={"missing": _FIX}) from None
    for i, fm in enumerate(q.formats):
        try:
            get_format(fm)
        except InputError as exc:
            raise InputError(exc.message, file=path, key=f"formats[{i}]", value=fm, expected=exc.expected,
                             fix=_FIX) from None
    if not q.layers or not q.layers[0].experts:
        raise InputError("quality file measures no expert", file=path, key="layers", fix=_FIX)
    E = q.num_experts
    for l, layer in enumerate(q.layers):
        where = f"layers[{l}]"
        if layer.moe_layer != l:
            raise InputError("MoE layers out of order", file=path, key=f"{where}.moe_layer", value=layer.moe_layer,
                             expected=str(l), fix=_FIX)
        if len(layer.experts) != E:
            raise InputError("layers measure different expert counts", file=path, key=f"{where}.experts",
                             value=len(layer.experts), expected=f"{E} experts, as layers[0]", fix=_FIX)
        for e, ex in enumerate(layer.experts):
            key = f"{where}.experts[{e}]"
            if ex.expert != e:
                raise InputError("experts out of order", file=path, key=f"{key}.expert", value=ex.expert,
                                 expected=str(e), fix=_FIX)
            want = set(q.formats) if ex.tokens else set()
            if set(ex.error) != want:
                raise InputError("errors do not cover the measured formats" if ex.tokens else
                                 "an expert with no sampled token has errors", file=path, key=f"{key}.error",
                                 value=sorted(ex.error), expected=", ".join(sorted(want)) or "{}", fix=_FIX)
    return q


def check_matches(q: QualityFile, path: str | Path, *, model_name: str, model_digest: str, num_layers: int,
                  num_experts: int) -> None:
    """Refuse a quality file measured on another model than the one planned."""
    fix = "plan the model you measured (-m CHECKPOINT_DIR), or measure this one"
    if (q.num_layers, q.num_experts) != (num_layers, num_experts):
        raise InputError("quality file does not match the model", file=path, key="layers",
                         value=f"{q.num_layers} layers x {q.num_experts} experts",
                         expected=f"{num_layers} MoE layers x {num_experts} experts ({model_name})", fix=fix)
    if q.model != model_name or q.model_digest != model_digest:
        raise InputError("quality file was measured on another model", file=path, key="model",
                         value=f"{q.model} ({q.model_digest})", expected=f"{model_name} ({model_digest})", fix=fix)


def error_table(q: QualityFile, formats: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """``{format: [L, E]}`` measured errors for the formats the file measured (others absent);
    an expert with no sampled token gets its layer's token-weighted mean (0 if none was sampled)."""
    out: dict[str, np.ndarray] = {}
    for fm in formats:
        if fm not in q.formats:
            continue
        table = np.zeros((q.num_layers, q.num_experts))
        for l, layer in enumerate(q.layers):
            tokens = np.array([ex.tokens for ex in layer.experts], float)
            err = np.array([ex.error.get(fm, 0.0) for ex in layer.experts])
            mean = float((tokens * err).sum() / tokens.sum()) if tokens.sum() else 0.0
            table[l] = np.where(tokens > 0, err, mean)
        out[fm] = table
    return out


def super_experts(q: QualityFile) -> tuple[tuple[int, ...], ...]:
    """Per MoE layer, the experts the file flags as super experts (``--critical auto``)."""
    return tuple(tuple(ex.expert for ex in layer.experts if ex.super_expert) for layer in q.layers)
