"""Fit a hardware profile's efficiency parameters to measured runs (least squares, bounded).

A run (``planner verify --out RUN.json``) holds the plan, the model's config, the routing
the runtime saw and what it measured. Replaying the routing under the plan through the
simulator predicts the run's time per output token and time to first token; calibration
adjusts, for every compute device the runs used,

- ``memory_fraction``: the share of memory bandwidth an expert call streams weights at,
- ``compute_max_fraction`` and ``half_tokens``: the compute efficiency curve
  ``fraction(n) = max * n / (n + half)`` over tokens per call,
- ``launch_overhead_s``: fixed cost per kernel call,
- ``layer_overhead_s``: fixed framework cost per hidden layer per forward step,

plus one factor on every link's and drive's bandwidth, to minimise the squared log-ratios of
predicted to measured TPOT and TTFT (``scipy.optimize.least_squares``, trust-region
reflective, within physical bounds), with a weak pull of each parameter towards the
profile's value so that what the runs do not constrain stays as probed. Errors are
reported before and after, on the runs used for the fit and on held-out runs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from planner.plan import Plan
from profiles.errors import InputError
from profiles.hardware import HardwareProfile
from profiles.models import ModelSpec, load_model
from profiles.workload.trace import Trace

from .engine import SimConfig, simulate
from .metrics import served_one_by_one

__all__ = ["CalibrationResult", "Run", "calibrate_profile", "load_run", "predict"]

# name -> (lower, upper); every parameter is positive and fitted in log space
BOUNDS = {"memory_fraction": (0.01, 1.0), "compute_max_fraction": (0.002, 1.0),
          "half_tokens": (0.25, 4096.0), "launch_overhead_s": (1e-7, 0.05), "layer_overhead_s": (1e-7, 0.05)}
EFFICIENCY = ("memory_fraction", "compute_max_fraction", "half_tokens")
OVERHEADS = ("launch_overhead_s", "layer_overhead_s")
PRIOR_WEIGHT = 0.05  # per unit of log-parameter change, against log-ratio residuals
LINK_BOUNDS = (0.02, 50.0)


@dataclass(frozen=True, eq=False)
class Run:
    """One measured bundle run: the plan, the model, the routing and the measurement."""

    name: str
    plan: Plan
    model: ModelSpec
    trace: Trace
    tpot_s: float
    ttft_s: float
    warm_up: int = 0  # leading requests whose times the measurement left out


def load_run(path: str | Path) -> Run:
    """Read a run written by ``planner verify --out``."""
    from profiles.workload.trace import DECODE, PREFILL
    from profiles.yamlio import load_json

    data = load_json(path)
    try:
        plan = Plan.model_validate(data["plan"])
        model = load_model(data["model_config"])
        ids = np.asarray(data["routing"]["expert_ids"], np.int64)
        seqs = data["routing"]["sequences"]  # [[prompt_tokens, decode_tokens], ...]
        measured = data["measured"]
        tpot, ttft = float(measured["tpot_s"]), float(measured["ttft_s"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"not a run record ({exc.__class__.__name__}: {exc})", file=path,
                         fix="write runs with planner verify BUNDLE --checkpoint CKPT --out RUN.json") from None
    phase = np.concatenate([np.r_[np.full(p, PREFILL), np.full(d, DECODE)] for p, d in seqs]).astype(np.uint8)
    trace = Trace(expert_ids=ids, seq_lens=np.array([p + d for p, d in seqs]), phase=phase,
                  num_experts=model.num_experts, layer_map=tuple(lp.hidden_layer for lp in plan.layers),
                  model=model.name, source=str(path))
    return Run(name=Path(path).name, plan=plan, model=model, trace=trace, tpot_s=tpot, ttft_s=ttft,
               warm_up=int(data.get("warm_up_requests", 0)))


def predict(doc: dict, run: Run) -> tuple[float, float]:
    """``(tpot_s, ttft_s)`` the simulator predicts for ``run`` on the profile document ``doc``."""
    hw = HardwareProfile.model_validate(doc).resolve()
    report = simulate(run.plan, hw, run.model, run.trace, SimConfig(batch_size=1))
    return served_one_by_one(report.metrics["per_request"], run.warm_up)


def _devices(doc: dict, runs: list[Run]) -> list[tuple[int, int]]:
    """(node, device) indices of the compute devices the runs' plans use."""
    used = set()
    for run in runs:
        used |= {run.plan.compute_device.split("/")[-1], run.plan.host_device.split("/")[-1]}
    out = []
    for ni, node in enumerate(doc["nodes"]):
        for di, dev in enumerate(node["devices"]):
            if dev["kind"] in ("gpu", "cpu", "accelerator") and dev["name"] in used:
                out.append((ni, di))
    return out


def _apply(doc: dict, devices: list[tuple[int, int]], x: np.ndarray) -> dict:
    from profiles.hardware import DEFAULT_EFFICIENCY
    from profiles.units import parse_bandwidth

    new = copy.deepcopy(doc)
    i = 0
    for ni, di in devices:
        dev = new["nodes"][ni]["devices"][di]
        eff = {**DEFAULT_EFFICIENCY[dev["kind"]], **(dev.get("efficiency") or {})}
        eff.pop("points", None)
        for name in EFFICIENCY:
            eff[name] = float(x[i])
            i += 1
        eff["source"] = "calibrated by planner calibrate"
        dev["efficiency"] = eff
        for name in OVERHEADS:
            dev[name] = float(x[i])
            i += 1
    factor = float(x[i])
    for node in new["nodes"]:
        for dev in node["devices"]:
            if dev["kind"] == "nvme":  # a drive's read rate bounds its transfers as much as its link
                dev["memory_bytes_per_s"] = parse_bandwidth(dev["memory_bytes_per_s"]) * factor
            for link in dev.get("links", []) or []:
                if link.get("kind") == "unified":
                    continue
                link["bytes_per_s"] = _link_bytes_per_s(link) * factor
                link.pop("gen", None)
                link.pop("lanes", None)
    return new


def _link_bytes_per_s(link: dict) -> float:
    from profiles.hardware import LinkSpec

    return LinkSpec.model_validate(link).effective_bytes_per_s


def _start(doc: dict, devices: list[tuple[int, int]]) -> np.ndarray:
    from profiles.hardware import DEFAULT_EFFICIENCY, DEFAULT_LAUNCH_OVERHEAD_S
    from profiles.units import parse_time

    x = []
    for ni, di in devices:
        dev = doc["nodes"][ni]["devices"][di]
        eff = {**DEFAULT_EFFICIENCY[dev["kind"]], **(dev.get("efficiency") or {})}
        x += [eff[name] for name in EFFICIENCY]
        overhead = dev.get("launch_overhead_s")
        x.append(parse_time(overhead) if overhead is not None else DEFAULT_LAUNCH_OVERHEAD_S[dev["kind"]])
        x.append(parse_time(dev.get("layer_overhead_s") or 0.0))  # clipped to its lower bound
    return np.array(x + [1.0], float)


def _bounds(devices: list) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = [], []
    for _ in devices:
        for name in EFFICIENCY + OVERHEADS:
            lo.append(BOUNDS[name][0])
            hi.append(BOUNDS[name][1])
    return np.array(lo + [LINK_BOUNDS[0]]), np.array(hi + [LINK_BOUNDS[1]])


def errors(doc: dict, runs: list[Run]) -> list[dict]:
    """Per run: predicted and measured TPOT/TTFT and their relative errors."""
    out = []
    for run in runs:
        tpot, ttft = predict(doc, run)
        out.append({"run": run.name, "tpot_s": {"measured": run.tpot_s, "predicted": tpot,
                                                 "error": tpot / run.tpot_s - 1},
                    "ttft_s": {"measured": run.ttft_s, "predicted": ttft, "error": ttft / run.ttft_s - 1}})
    return out


@dataclass(frozen=True)
class CalibrationResult:
    profile: dict  # the calibrated profile document
    fit_before: list[dict]
    fit_after: list[dict]
    holdout_before: list[dict]
    holdout_after: list[dict]
    parameters: dict
    evaluations: int

    def summary(self) -> dict:
        def mean_abs(rows, key):
            return float(np.mean([abs(r[key]["error"]) for r in rows])) if rows else None

        return {f"{part}_{key}_mean_abs_error": mean_abs(getattr(self, part), key)
                for part in ("fit_before", "fit_after", "holdout_before", "holdout_after")
                for key in ("tpot_s", "ttft_s")}


def calibrate_profile(doc: dict, fit: list[Run], holdout: list[Run] = (), *, max_evaluations: int = 200
                      ) -> CalibrationResult:
    """Fit ``doc``'s efficiency parameters to the ``fit`` runs; report errors on both sets."""
    from scipy.optimize import least_squares

    if not fit:
        raise InputError("no runs to fit", key="--runs", fix="pass at least one RUN.json from planner verify --out")
    devices = _devices(doc, fit)
    if not devices:
        raise InputError("the runs' plans use no compute device of this profile", key="--profile",
                         fix="calibrate the profile the bundles were planned for")
    x0 = _start(doc, devices)
    lo, hi = _bounds(devices)
    x0 = np.clip(x0, lo, hi)
    to_u = np.log  # every parameter is positive: fit in log space
    u0 = to_u(x0)
    # every parameter but the per-layer overhead, which profiles rarely state (0: no prior)
    prior = np.array([name != "layer_overhead_s" for _ in devices for name in EFFICIENCY + OVERHEADS] + [True])
    count = 0

    def residuals(u: np.ndarray) -> np.ndarray:
        nonlocal count
        count += 1
        candidate = _apply(doc, devices, np.exp(u))
        res = []
        for run in fit:
            tpot, ttft = predict(candidate, run)
            res += [math.log(tpot / run.tpot_s), math.log(ttft / run.ttft_s)]
        # a weak pull towards the profile's own (probed or stated) values: a few runs cannot
        # pin down every parameter, and those the runs do not constrain should stay put
        return np.concatenate([res, PRIOR_WEIGHT * (u - u0)[prior]])

    sol = least_squares(residuals, to_u(x0), bounds=(to_u(lo), to_u(hi)), method="trf", x_scale=1.0,
                        diff_step=0.05, max_nfev=max_evaluations)
    best = _apply(doc, devices, np.exp(sol.x))
    params = {}
    i = 0
    for ni, di in devices:
        name = doc["nodes"][ni]["devices"][di]["name"]
        params[name] = {k: float(np.exp(sol.x[i + j])) for j, k in enumerate(EFFICIENCY + OVERHEADS)}
        i += len(EFFICIENCY + OVERHEADS)
    params["link_bandwidth_factor"] = float(np.exp(sol.x[i]))
    return CalibrationResult(profile=best, fit_before=errors(doc, fit), fit_after=errors(best, fit),
                             holdout_before=errors(doc, list(holdout)), holdout_after=errors(best, list(holdout)),
                             parameters=params, evaluations=count)


def save_profile(doc: dict, path: str | Path, note: str) -> Path:
    import yaml

    path = Path(path)
    path.write_text(f"# {note}\n" + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path
