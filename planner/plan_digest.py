"""The digests a plan records of its inputs (``inputs.*_digest``), so a stale plan is recognised:
each is the first 16 hex digits of a sha256, stable across runs and machines."""

from __future__ import annotations

import hashlib
import json

__all__ = ["digest", "model_digest", "workload_digest"]


def digest(*parts: object) -> str:
    """sha256 (first 16 hex digits) of the JSON of ``parts``: stable across runs and machines."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_digest(model) -> str:
    """sha256 (16 hex digits) of a model's specification, not of where its file lies: two
    checkouts of the same commit plan the same bytes (``inputs.model_digest``)."""
    import dataclasses

    spec = dataclasses.asdict(model)
    spec.pop("source", None)
    return digest(spec)


def workload_digest(trace) -> str:
    """sha256 (16 hex digits) of a trace's routing and sequence lengths: the one digest a plan
    records for its workload and every consumer compares (``inputs.workload_digest``)."""
    import numpy as np

    h = hashlib.sha256(np.ascontiguousarray(trace.expert_ids).tobytes())
    h.update(np.ascontiguousarray(trace.seq_lens).tobytes())
    return h.hexdigest()[:16]
