"""Goodput: the request rate a deployment serves while its latency SLOs hold.

A request *meets the SLOs* when its TTFT (arrival to first token) is at most ``ttft_s`` and
its TPOT (mean time between its output tokens) is at most ``tpot_s``; a request with one
output token has no TPOT and is judged on TTFT alone. The *SLO attainment* of a run is the
share of its requests that meet both. The *goodput* of a deployment is the highest Poisson
arrival rate (requests/s) at which the attainment is at least ``share`` (0.9 by default:
the SLOs hold for 90% of requests), found on a ladder of simulated rates:

- a fixed ladder (``rates``): every rate is simulated; the goodput is the highest rate
  below the first one that misses (the load the deployment sustains before it first fails);
- no ladder: bracket from ``start_rps`` (double while the target is met, halve while it is
  not), then bisect between the highest rate that met it and the lowest that did not for
  ``bisect_steps`` steps; the goodput is the highest rate that met it, every rate below it
  having met it too.

Every rate replays the same requests with the same seed, so arrivals at rate r are the
arrivals at rate 1 scaled by 1/r (:func:`simulator.scheduler.requests_of`): a rate ladder
compresses one arrival pattern, it does not draw a new one per rate.

``bounded`` says whether a rate that missed was seen above the goodput; when every rate
met the target the goodput is only a lower bound (extend the ladder).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from profiles.errors import InputError
from profiles.units import TIME_HELP, parse_time

__all__ = ["GoodputSettings", "goodput_ladder", "rate_row", "slo_attainment", "slo_text", "write_goodput"]

# the bracket stops after this many doublings or halvings: 1 req/s x 2^+-12 spans 0.00024-4096 req/s
MAX_BRACKET_STEPS = 12


class GoodputSettings(BaseModel):
    """The ``goodput:`` block of a sweep grid (and ``planner sweep --slo-ttft/--slo-tpot/--rates``).

    Attributes:
        slo_ttft: largest acceptable TTFT, a time such as ``2s`` (None: not judged).
        slo_tpot: largest acceptable mean time per output token, e.g. ``100ms`` (None: not judged).
        share: share of requests that must meet both for a rate to count (0.9).
        rates: the arrival rates to simulate, requests/s (None: bracket then bisect).
        start_rps: the bracket's first rate, requests/s.
        bisect_steps: bisection steps after the bracket.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    slo_ttft: float | None = None
    slo_tpot: float | None = None
    share: float = Field(default=0.9, gt=0, le=1, allow_inf_nan=False)
    rates: list[float] | None = None
    start_rps: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    bisect_steps: int = Field(default=4, ge=0, le=20)

    @field_validator("slo_ttft", "slo_tpot", mode="before")
    @classmethod
    def _time(cls, value):
        if value is None:
            return None
        try:
            seconds = parse_time(value)
        except InputError as exc:  # one pydantic error, so the grid's file and key are named
            raise ValueError(f"{exc.message}: expected {TIME_HELP}") from None
        if seconds <= 0:
            raise ValueError("an SLO must be a positive time such as 2s or 100ms")
        return seconds

    @field_validator("rates")
    @classmethod
    def _rates(cls, value):
        if value is None:
            return None
        if not value or any(not (r > 0 and r < float("inf")) for r in value):
            raise ValueError("rates must be a non-empty list of positive requests/s, e.g. [0.5, 1, 2, 4]")
        return sorted(set(value))

    @model_validator(mode="after")
    def _some_slo(self):
        if self.slo_ttft is None and self.slo_tpot is None:
            raise ValueError("give slo_ttft, slo_tpot or both (e.g. slo_tpot: 100ms)")
        return self


def slo_attainment(per_request: list[dict], slo: GoodputSettings) -> dict[str, float]:
    """Shares of requests meeting the TTFT SLO, the TPOT SLO and both.

    ``per_request`` is a SimReport's ``metrics["per_request"]`` (``ttft_s``, and ``tpot_s``:
    the gaps between a request's output tokens). A request that produced no token fails both.
    """
    n = len(per_request)
    if n == 0:
        return {"ttft": 0.0, "tpot": 0.0, "both": 0.0}
    ttft_ok = tpot_ok = both = 0
    for r in per_request:
        if r["ttft_s"] is None:
            continue
        gaps = r["tpot_s"]
        a = slo.slo_ttft is None or r["ttft_s"] <= slo.slo_ttft
        b = slo.slo_tpot is None or not gaps or sum(gaps) / len(gaps) <= slo.slo_tpot
        ttft_ok += a
        tpot_ok += b
        both += a and b
    return {"ttft": ttft_ok / n, "tpot": tpot_ok / n, "both": both / n}


def rate_row(rate_rps: float, metrics: dict, serving: dict | None, slo: GoodputSettings) -> dict:
    """One rung of the ladder: the rate, its SLO attainment and what the run measured."""
    att = slo_attainment(metrics["per_request"], slo)
    kv = (serving or {}).get("kv_cache") or {}
    return {"rate_rps": rate_rps, "slo_share": att["both"], "ttft_share": att["ttft"], "tpot_share": att["tpot"],
            "meets": att["both"] >= slo.share, "served_rps": rate_rps * att["both"],
            "ttft_p90_s": (metrics["ttft_s"] or {}).get("p90"), "tpot_p90_s": (metrics["tpot_s"] or {}).get("p90"),
            "tokens_per_s": metrics["tokens_per_s"], "preemptions": kv.get("preemptions", 0)}


def goodput_ladder(run: Callable[[float], dict], slo: GoodputSettings) -> dict:
    """Simulate a ladder of arrival rates; the goodput and every rung (see the module docstring).

    Args:
        run: ``run(rate_rps)`` simulates at that Poisson rate and returns :func:`rate_row`'s row.
        slo: the SLOs, the share and the ladder.

    Returns:
        ``{"goodput_rps", "bounded", "rates": [rows by rate]}``; ``goodput_rps`` is 0.0 when
        even the lowest rate misses.
    """
    rows: dict[float, dict] = {}

    def at(rate: float) -> bool:
        rate = float(f"{rate:.6g}")  # readable rates; the same rate is simulated once
        if rate not in rows:
            rows[rate] = run(rate)
        return rows[rate]["meets"]

    if slo.rates is not None:
        for rate in slo.rates:
            at(rate)
    else:
        lo = hi = None
        rate = slo.start_rps
        for _ in range(MAX_BRACKET_STEPS + 1):
            if at(rate):
                lo = rate
                if hi is not None:
                    break
                rate *= 2
            else:
                hi = rate
                if lo is not None:
                    break
                rate /= 2
        if lo is not None and hi is not None:
            for _ in range(slo.bisect_steps):
                mid = float(f"{(lo + hi) / 2:.6g}")
                if mid in (lo, hi):
                    break
                if at(mid):
                    lo = mid
                else:
                    hi = mid
    ladder = [rows[r] for r in sorted(rows)]
    goodput, bounded = 0.0, False
    for row in ladder:  # the highest rate below the first that misses
        if not row["meets"]:
            bounded = True
            break
        goodput = row["rate_rps"]
    return {"goodput_rps": goodput, "bounded": bounded, "share": slo.share, "slo_ttft_s": slo.slo_ttft,
            "slo_tpot_s": slo.slo_tpot, "rates": ladder}


GOODPUT_COLUMNS = ("rate_rps", "slo_share", "ttft_share", "tpot_share", "meets", "served_rps", "ttft_p90_s",
                   "tpot_p90_s", "tokens_per_s", "preemptions")


def write_goodput(curves: list[tuple[str, dict]], slo: GoodputSettings, out_dir: Path, title: str) -> list[Path]:
    """``goodput.csv`` (one row per point and rate), ``goodput.json`` and ``goodput.png``.

    ``curves`` holds ``(label, ladder)`` per point, ``ladder`` as :func:`goodput_ladder` returns it.
    """
    out_dir = Path(out_dir)
    csv_path = out_dir / "goodput.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["point", *GOODPUT_COLUMNS, "point_goodput_rps"])
        for label, ladder in curves:
            for row in ladder["rates"]:
                w.writerow([label, *(_cell(row[c]) for c in GOODPUT_COLUMNS), _cell(ladder["goodput_rps"])])
    json_path = out_dir / "goodput.json"
    json_path.write_text(json.dumps({"slo": slo.model_dump(mode="json"),
                                     "points": [{"point": label, **ladder} for label, ladder in curves]},
                                    indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return [csv_path, json_path, _plot(curves, slo, out_dir / "goodput.png", title)]


def _cell(v):
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else v)


def slo_text(slo: GoodputSettings) -> str:
    """``TTFT <= 2 s and TPOT <= 100 ms for 90% of requests``."""
    from profiles.units import format_time

    parts = [f"{name} <= {format_time(v)}" for name, v in (("TTFT", slo.slo_ttft), ("TPOT", slo.slo_tpot))
             if v is not None]
    return " and ".join(parts) + f" for {slo.share:.0%} of requests"


def _plot(curves: list[tuple[str, dict]], slo: GoodputSettings, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    for i, (label, ladder) in enumerate(curves):
        rates = [r["rate_rps"] for r in ladder["rates"]]
        color = f"C{i % 10}"
        ax1.plot(rates, [r["slo_share"] for r in ladder["rates"]], "o-", color=color, label=label)
        ax2.plot(rates, [r["served_rps"] for r in ladder["rates"]], "o-", color=color, label=label)
        if ladder["goodput_rps"] > 0:
            ax1.axvline(ladder["goodput_rps"], color=color, ls=":", lw=1)
    ax1.axhline(slo.share, color="0.4", ls="--", lw=1, label=f"target {slo.share:.0%}")
    for ax in (ax1, ax2):  # rates as plain numbers; no labels on the minor ticks (they overlap)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_xlabel("offered load, requests/s (Poisson)")
    ax1.set_ylabel("share of requests meeting the SLOs")
    ax1.set_title("SLO attainment (dotted: goodput)")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("offered load, requests/s (Poisson)")
    ax2.set_ylabel("requests/s served within the SLOs")
    ax2.set_title("served within SLO vs load")
    fig.suptitle(f"{title}: {slo_text(slo)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
