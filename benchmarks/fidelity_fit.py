"""The fit of per-engine scales on the fit half of the fidelity set: the fixed split into fit
and held-out halves, the robust least squares over the fit half's log errors, and the engine
profile values the fitted scales suggest (printed, never written)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from fidelity_cases import engine_name  # noqa: E402
from fidelity_pricing import KINDS, MAX_FRACTION, PER_ENGINE, _efficiency, log_err, price_case  # noqa: E402
from profiles.engines import load_engine  # noqa: E402

SCALE_BOUNDS = (0.05, 20.0)
PRIOR = 0.05  # weight of the prior towards the profile's values, per log-scale
MAX_NFEV = 15  # function evaluations of the fit (each prices the fit half once; the Jacobian's are extra)
# robust loss: a case off by far more than the model's spread (a suspected disk-paging run that
# the planner says fits, a machine with a cost no profile states) must not drag an engine's
# overheads for every other case. soft_l1's pull stays constant however far off a case is, so
# three such llama.cpp CPU runs (off by 70-250%) pulled its CPU memory share from 0.85 to 0.69
# and put every desktop CPU decode case 15-20% off; cauchy's pull falls beyond ~f_scale
# (a residual of ln 2 pulls a fifth as hard as one of 0.3), so an outlier barely moves the fit
LOSS, F_SCALE = "cauchy", 0.3


def split(cases: list[dict]) -> tuple[list[dict], list[dict]]:
    """Sort by (engine, source, id) and alternate: fit, held out, fit, ..."""
    order = sorted(cases, key=lambda c: (engine_name(c), c["source"], c["id"]))
    return order[0::2], order[1::2]


def fitted_keys(engine: str) -> tuple[str, ...]:
    """The ``PER_ENGINE`` scales fitted for ``engine``: an engine that runs a layer's experts
    as one fused kernel per projection has no per-expert dispatch to fit (its profile's small
    per-call cost stays), or the fit would turn that cost into a sink for whatever else a
    machine loses (a CPU reaching a quarter of its DRAM peak became 190us per call)."""
    p = load_engine(engine).profile

    def kept(key: str) -> bool:
        kind, _, what = key.partition(".")
        if what == "expert_call":
            return not (p.fused_experts and p.fused_experts.value)
        if what == "attention":  # only a share the profile states (None: attention is its KV read)
            return getattr(p, kind) is not None and getattr(p, kind).attention_fraction is not None
        return True
    return tuple(k for k in PER_ENGINE if kept(k))


def _keys(engine: str, only: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """:func:`fitted_keys` of ``engine``, just ``only``'s where given."""
    return tuple(k for k in fitted_keys(engine) if only is None or k in only)


def _unpack(x: np.ndarray, engines: list[str], only: tuple[str, ...] | None = None) -> dict[str, dict[str, float]]:
    out, i = {}, 0
    for e in engines:
        keys = _keys(e, only)
        out[e] = {k: float(math.exp(x[i + j])) for j, k in enumerate(keys)}
        i += len(keys)
    return out


def fit(fit_cases: list[dict], only: tuple[str, ...] | None = None) -> dict:
    """Fit the scales of every engine of ``fit_cases`` (``only``: just these ``PER_ENGINE``
    keys, the others staying at the profile's values: a new term's share fitted on its own,
    the shipped profile's other values being an earlier fit's)."""
    from scipy.optimize import least_squares

    engines = sorted({engine_name(c) for c in fit_cases})
    first = np.cumsum([0] + [len(_keys(e, only)) for e in engines])  # each engine's first column
    n = int(first[-1])
    lo, hi = [math.log(SCALE_BOUNDS[0])] * n, [math.log(SCALE_BOUNDS[1])] * n

    def residuals(x):
        scales = _unpack(x, engines, only)
        r = []
        for c in fit_cases:
            try:
                pred = price_case(c, scales[engine_name(c)])["predicted"]
                r.append(log_err(pred, float(c["value"])))
            except Exception:  # noqa: BLE001 -- a failing evaluation is a large residual
                r.append(5.0)
        # weak prior towards the profile's values (keeps unidentifiable scales at 1)
        r.extend(PRIOR * x)
        return np.array(r)

    t0 = time.perf_counter()
    # an engine's scales move only its own cases' residuals: finite differences perturb the
    # engines' columns together (scipy groups the columns of a sparse Jacobian)
    sparsity = np.zeros((len(fit_cases) + n, n), dtype=int)
    for i, c in enumerate(fit_cases):
        e = engines.index(engine_name(c))
        sparsity[i, first[e]:first[e + 1]] = 1
    sparsity[len(fit_cases):, :] = np.eye(n, dtype=int)
    # one column: trf's bounded two-dimensional trust-region step fails on it (scipy indexes a
    # second column), dogbox solves it (without the sparsity, which one column does not need)
    one = {"method": "dogbox"} if n == 1 else {"jac_sparsity": sparsity, "method": "trf"}
    res = least_squares(residuals, np.zeros(n), bounds=(lo, hi), diff_step=1e-3, max_nfev=MAX_NFEV, x_scale=1.0,
                        loss=LOSS, f_scale=F_SCALE, **one)
    return {"engines": engines, "per_engine_scales": _unpack(res.x, engines, only), "only": only,
            "cost": float(res.cost), "nfev": int(res.nfev), "status": int(res.status), "message": res.message,
            "seconds": time.perf_counter() - t0,
            "method": "scipy.optimize.least_squares on ln(pred/published) over the fit half; per engine, log-scales "
                      f"of {', '.join(PER_ENGINE)} (no expert_call on a fused-experts engine) in [{SCALE_BOUNDS[0]}, {SCALE_BOUNDS[1]}] (fractions capped at "
                      f"{MAX_FRACTION}), weak prior {PRIOR} x log-scale, loss {LOSS} with f_scale {F_SCALE}"}


def suggested_profile(scales: dict[str, dict[str, float]]) -> dict[str, dict[str, str]]:
    """The engine YAML values the fit suggests (NOT written: the lead decides)."""
    out = {}
    for e, sc in scales.items():
        p = load_engine(e).profile
        rows = {}
        for kind in ("gpu", "cpu", "accelerator"):
            spec = getattr(p, kind)
            if spec is None:
                continue
            for what, key in (("layer_overhead_s", "layer"), ("expert_call_overhead_s", "expert_call")):
                v, f = getattr(spec, what), sc.get(f"{kind}.{key}")
                if v is not None and f is not None:
                    rows[f"{kind}.{what}"] = f"{v.value * f * 1e6:.4g}us (now {v.value * 1e6:.4g}us)"
            af, f = spec.attention_fraction, sc.get(f"{kind}.attention")
            if af is not None and f is not None:
                rows[f"{kind}.attention_fraction"] = f"{min(af.value * f, 1.0):.3g} (now {af.value:.3g})"
            eff = _efficiency(spec, kind, sc) if kind in KINDS else None
            now = spec.efficiency.model_dump() if spec.efficiency is not None else {}
            for what in ("memory_fraction", "compute_max_fraction"):
                if eff is not None and eff.get(what) is not None:
                    rows[f"{kind}.efficiency.{what}"] = f"{eff[what]:.3g} (now {now.get(what) or 'device default'})"
        for ph in ("decode", "prefill") if "step" in sc else ():
            v = getattr(p.step_overhead_s, ph).value
            rows[f"step_overhead_s.{ph}"] = f"{v * sc['step'] * 1e3:.4g}ms (now {v * 1e3:.4g}ms)"
        out[e] = rows
    return out
