"""The fidelity set's inputs: ``benchmarks/fidelity/cases.yaml`` read and checked against the
reserved sources, and what each case names resolved -- its engine profile, its hardware profile
(bundled, or ``benchmarks/fidelity/hardware/<name>.yaml``), its model and workload statistics --
plus the policies the cost model cannot price (skipped, with the reason)."""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))
import yaml  # noqa: E402

from planner.workload_view import planning_stats  # noqa: E402
from profiles.engines import Engine, load_engine  # noqa: E402
from profiles.hardware import Hardware, load_profile  # noqa: E402
from profiles.models import load_model  # noqa: E402
from profiles.workload.defaults import default_workload  # noqa: E402

FIDELITY = ROOT / "benchmarks" / "fidelity"
CASES = FIDELITY / "cases.yaml"

# engines the cases name that have no bundled profile, and the profile that stands for them
ENGINE_MAP = {"llama.cpp-vulkan": "llama.cpp", "llama.cpp-rocm": "llama.cpp",
              "llama.cpp-metal": "llama.cpp", "transformers": "accelerate", "fiddler": "bundle",
              "moe-infinity": "bundle"}
# policies the planner cannot express as one option per layer: skipped with the reason
SKIP_POLICY = {
    "disk-offload": "the planner's CPU-compute ('local') path only reads experts from host DRAM; experts paged "
                    "from disk by mmap and computed on the CPU have no price in the cost model",
    "other": "llama.cpp layer split (-ngl N) runs whole layers, attention included, on the CPU; the planner "
             "always runs dense weights on the compute device",
}
RESERVED = ("eliseev", "mixtral-offloading", "deepseekr1_v3_tutorial", "deepseek-r1_v3", "moe-infinity-readme")
METRICS = ("ttft_s", "tpot_s", "decode_tok_s", "prefill_tok_s", "throughput_tok_s")
REQUIRED = ("id", "source", "where", "hardware", "profile", "engine", "engine_version", "model", "format",
            "dense_format", "config", "batch", "prompt_tokens", "output_tokens", "metric", "value", "assumptions")
CONFIG_KEYS = ("policy", "n", "slots", "gpus", "threads", "notes")
POLICIES = ("all-gpu", "cpu-experts", "n-cpu-moe", "lru-offload", "accelerate", "cpu-only", "disk-offload", "other")
DEFAULT_DENSE = "bf16"  # dense weights when the case does not state their format


def load_cases(path: Path = CASES) -> tuple[list[dict], list[dict]]:
    """(cases, dropped): every case, minus those that cite a reserved source."""
    data = yaml.safe_load(path.read_text())
    sources = {s["id"]: s for s in data["sources"]}
    kept, dropped = [], []
    for c in data["cases"]:
        src = sources.get(c["source"], {})
        text = " ".join(str(x) for x in (c["source"], c.get("where", ""), src.get("title", ""), src.get("url", ""))).lower()
        if any(r in text for r in RESERVED):
            dropped.append({"id": c["id"], "reason": "cites a reserved source"})
        else:
            kept.append(c)
    return kept, dropped


def engine_name(case: dict) -> str:
    """The engine a case ran, as the split and the fit key it (``ENGINE_MAP`` applied)."""
    return ENGINE_MAP.get(case["engine"], case["engine"])


def profile_name(case: dict) -> str:
    """The engine profile a case is priced with: its ``engine_profile`` where it names a build
    whose cost differs from the engine's current one (``benchmarks/fidelity/engines/<name>.yaml``
    or a bundled name), else its engine's. The split and the fit still key it by
    :func:`engine_name`, so a version profile moves no case between halves."""
    return case.get("engine_profile") or engine_name(case)


@lru_cache(maxsize=None)
def _hardware(profile: str) -> Hardware:
    local = FIDELITY / "hardware" / f"{profile}.yaml"
    return load_profile(local if local.is_file() else profile)[1]


@lru_cache(maxsize=None)
def _engine(name: str) -> Engine:
    local = FIDELITY / "engines" / f"{name}.yaml"
    return load_engine(local if local.is_file() else name)


def hardware_of(case: dict) -> Hardware:
    return _hardware(case["profile"])


def dense_format(case: dict) -> str:
    return case.get("dense_format") or DEFAULT_DENSE


@lru_cache(maxsize=None)
def _stats(model_name: str):
    model = load_model(model_name)
    return model, planning_stats(default_workload(model), real_experts=model.num_experts)


def skip_reason(case: dict) -> str | None:
    policy = case["config"]["policy"]
    if policy in SKIP_POLICY:
        return SKIP_POLICY[policy]
    try:
        _engine(profile_name(case))
    except Exception as exc:  # noqa: BLE001 -- an unknown engine is a skip, with its reason
        return f"no engine profile for {case['engine']}: {exc}"
    return None
