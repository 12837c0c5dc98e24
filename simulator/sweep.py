"""What-if sweeps: a grid of hardware layouts, batch sizes and policies, planned and simulated.

A grid file (YAML) names a base case and the knobs to vary; every combination is a point:

.. code-block:: yaml

    name: desktop-4090-upgrade
    base: {hardware: desktop-4090, model: mixtral-8x7b, objective: latency}
    vary:
      gpu: [desktop-4090, desktop-5090]   # the GPU of that bundled profile replaces ours
      dram: [64GiB, 128GiB]
      pcie_gen: [4, 5]
    costs:                                  # $ per hour each choice adds (when profiles carry no price)
      gpu: {desktop-4090: 0.06, desktop-5090: 0.08}
    simulate: {requests: 8}
    goodput: {slo_ttft: 2s, slo_tpot: 100ms, rates: [0.25, 0.5, 1, 2]}   # optional, see below

Knobs: ``hardware``, ``model``, ``gpu`` (a bundled profile whose first GPU replaces every
GPU), ``gpu_count``, ``nodes`` (copies of the first node), ``dram`` (host memory of every
CPU), ``pcie_gen`` (every PCIe link), ``nvme_count``, ``batch`` (requests running at
once), ``objective``, ``parallel`` (auto, ep, offload), ``eviction``, ``prefetch``, ``miss``,
and the serving knobs of ``planner simulate``: ``scheduler`` (continuous, static, vllm,
sarathi), ``chunk_tokens``, ``kv_memory`` (the KV cache's size, e.g. 2GiB) and
``arrival_rate`` (Poisson requests/s; default: ``simulate.arrival_rate_per_s``), and the
run-time expert-parallel knobs (they matter for EP plans only): ``reroute`` (true: each
call to its expert's least-loaded copy, as LLEP; false: static dispatch) and
``rebalance_every`` (EPLB re-placement every N decode steps, or null for never), and
``dram_contention`` (true: offload plans priced and simulated with host DRAM as one port
that the CPU's expert reads and the copies share, :mod:`planner.dram`; default false), and
``pd_split`` (prefill/decode disaggregation, :mod:`simulator.pd`: that many of the cluster's
nodes form a prefill pool and the rest a decode pool, each planned on its own, the KV cache
sent between them; null: colocated; the pools' profiles go beside the point's).

With a ``goodput:`` block (:class:`simulator.goodput.GoodputSettings`) each point's plan is
also simulated at a ladder of arrival rates, and the point gets its goodput: the highest
rate at which ``share`` (90%) of requests meet the TTFT and TPOT SLOs (``goodput.csv``,
``goodput.json`` and ``goodput.png`` beside the results).

Each point's hardware profile is written under ``OUT/hardware/`` (so any point can be
re-planned by hand), then an ``evaluate`` function plans and simulates it. The function is
passed in by the caller (the CLI wires the planner in; this package never imports PuLP).
Points run serially, on a local process pool or on Ray; each point is seeded and rows come
back in point order, so the table is the same however it was computed.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from profiles.errors import InputError, from_validation_error
from profiles.formats import get_format
from profiles.hardware import HardwareProfile, bundled_profiles
from profiles.limits import (
    MAX_BATCH,
    MAX_CONTEXT_TOKENS,
    MAX_DEVICE_COUNT,
    MAX_NODE_COUNT,
    MAX_SIM_REQUESTS,
    MAX_SWEEP_POINTS,
)
from profiles.units import parse_size
from profiles.yamlio import load_yaml

from .goodput import GoodputSettings
from .pd import pool_profiles
from .policies import EVICTION, MISS, PREFETCH
from .schedulers import SCHEDULER
from .sweep_output import goodput_cell, pareto_front, point_label, write_outputs

__all__ = ["KNOBS", "Grid", "goodput_cell", "grid_points", "load_grid", "pareto_front", "point_label", "run_sweep",
           "with_goodput", "write_outputs"]

HARDWARE_KNOBS = ("hardware", "gpu", "gpu_count", "nodes", "dram", "pcie_gen", "nvme_count")
RUN_KNOBS = ("model", "batch", "objective", "parallel", "eviction", "prefetch", "miss", "scheduler", "chunk_tokens",
             "kv_memory", "arrival_rate", "reroute", "rebalance_every", "dram_contention", "pd_split")
KNOBS = HARDWARE_KNOBS + RUN_KNOBS

_STRICT = ConfigDict(extra="forbid", frozen=True)


OBJECTIVES = ("latency", "throughput", "cost")
PARALLEL = ("auto", "ep", "offload")


class Base(BaseModel):
    model_config = _STRICT

    hardware: str
    model: str
    objective: Literal["latency", "throughput", "cost"] = "latency"
    batch: int = Field(default=1, ge=1, le=MAX_BATCH)
    context: int = Field(default=4096, ge=1, le=MAX_CONTEXT_TOKENS)
    trace: str | None = None
    parallel: Literal["auto", "ep", "offload"] = "auto"
    time_limit_s: float = Field(default=30.0, gt=0, le=86400)
    # storage formats the plans may use (planner optimize --formats); None: the planner's own
    formats: tuple[str, ...] | None = Field(default=None, min_length=1)

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for name in v or ():
            try:
                get_format(name)
            except InputError as exc:
                raise ValueError(f"{exc.message}: expected a format of `planner formats list`") from None
        return v


class SimSettings(BaseModel):
    model_config = _STRICT

    requests: int | None = Field(default=8, ge=1, le=MAX_SIM_REQUESTS)
    arrival_rate_per_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    seed: int = 0


class Grid(BaseModel):
    """A sweep file (see the module docstring)."""

    model_config = _STRICT

    name: str
    description: str = ""
    base: Base
    vary: dict[str, list[Any]] = Field(default_factory=dict)
    costs: dict[str, dict[str, float]] = Field(default_factory=dict)
    simulate: SimSettings = SimSettings()
    goodput: GoodputSettings | None = None


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; errors are one line naming the key."""
    data, lines = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError("a sweep grid must be a YAML mapping", file=path, fix="start with `name:`, `base:` and `vary:`")
    try:
        grid = Grid.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc, file=path, lines=lines) from None
    points = 1
    for knob, values in grid.vary.items():
        if knob not in KNOBS:
            raise InputError("unknown knob", file=path, key=f"vary.{knob}", expected=", ".join(KNOBS),
                             fix="vary one of the listed knobs")
        if not values:
            raise InputError("a knob needs at least one value", file=path, key=f"vary.{knob}",
                             fix="list the values to try")
        points *= len(values)
        if points > MAX_SWEEP_POINTS:  # checked as it grows: 10^12 points never get listed
            raise InputError("the grid has too many points", file=path, key="vary", value=_count(grid.vary),
                             expected=f"at most {MAX_SWEEP_POINTS} combinations",
                             fix="vary fewer knobs or fewer values, or split the grid", line=lines.get(("vary",)))
        for i, value in enumerate(values):
            _check_value(knob, value, path, f"vary.{knob}[{i}]", lines.get(("vary", knob, i)))
    if grid.goodput is not None and ("arrival_rate" in grid.vary or grid.simulate.arrival_rate_per_s is not None):
        raise InputError("the goodput ladder sets the arrival rate", file=path,
                         key="vary.arrival_rate" if "arrival_rate" in grid.vary else "simulate.arrival_rate_per_s",
                         fix="drop the arrival rate, or list the rates under goodput.rates")
    for knob in grid.costs:
        if knob not in grid.vary:
            raise InputError("costs for a knob that is not varied", file=path, key=f"costs.{knob}",
                             expected=", ".join(grid.vary) or "a varied knob", fix="remove it or vary that knob")
    return grid


def with_goodput(grid: Grid, path: str | Path, **flags: Any) -> Grid:
    """``grid`` with its ``goodput:`` block set or overridden by ``planner sweep``'s flags.

    ``flags``: ``slo_ttft``, ``slo_tpot`` (times such as ``2s``), ``share`` and ``rates``
    (``"0.5,1,2"``); a None flag keeps the grid's value.
    """
    doc = grid.goodput.model_dump() if grid.goodput is not None else {}
    names = {"slo_ttft": "--slo-ttft", "slo_tpot": "--slo-tpot", "share": "--slo-share", "rates": "--rates"}
    for key, value in flags.items():
        if value is None:
            continue
        if key == "rates":
            try:
                value = [float(r) for r in str(value).split(",")]
            except ValueError:
                raise InputError("invalid rate list", key="--rates", value=flags["rates"],
                                 expected="requests/s separated by commas", fix="pass e.g. --rates 0.5,1,2,4") from None
        doc[key] = value
    try:
        goodput = GoodputSettings.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = names.get(str(err["loc"][0]) if err["loc"] else "", "--slo-ttft/--slo-tpot")
        raise InputError(err["msg"].removeprefix("Value error, "), key=key,
                         value=flags.get(str(err["loc"][0])) if err["loc"] else None,
                         fix="e.g. --slo-ttft 2s --slo-tpot 100ms --rates 0.5,1,2,4") from None
    if "arrival_rate" in grid.vary or grid.simulate.arrival_rate_per_s is not None:
        raise InputError("the goodput ladder sets the arrival rate", file=path, key="vary.arrival_rate"
                         if "arrival_rate" in grid.vary else "simulate.arrival_rate_per_s",
                         fix="drop the arrival rate, or list the rates with --rates")
    return grid.model_copy(update={"goodput": goodput})


def _count(vary: dict[str, list[Any]]) -> str:
    return " x ".join(str(len(v)) for v in vary.values())


# value checks per knob: (test, what was expected); counts are bounded by the profile limits
_POSITIVE_INT = "a positive integer"
_KNOB_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch": (lambda v: _is_int(v) and 1 <= v <= MAX_BATCH, f"an integer in [1, {MAX_BATCH}]"),
    "gpu_count": (lambda v: _is_int(v) and 1 <= v <= MAX_DEVICE_COUNT, f"an integer in [1, {MAX_DEVICE_COUNT}]"),
    "nvme_count": (lambda v: _is_int(v) and 1 <= v <= MAX_DEVICE_COUNT, f"an integer in [1, {MAX_DEVICE_COUNT}]"),
    "nodes": (lambda v: _is_int(v) and 1 <= v <= MAX_NODE_COUNT, f"an integer in [1, {MAX_NODE_COUNT}]"),
    "pcie_gen": (lambda v: _is_int(v) and 1 <= v <= 6, "a PCIe generation, 1 to 6"),
    "objective": (lambda v: v in OBJECTIVES, "one of " + ", ".join(OBJECTIVES)),
    "parallel": (lambda v: v in PARALLEL, "one of " + ", ".join(PARALLEL)),
    "eviction": (lambda v: v in EVICTION, "one of " + ", ".join(sorted(EVICTION))),
    "prefetch": (lambda v: v in PREFETCH, "one of " + ", ".join(sorted(PREFETCH))),
    "miss": (lambda v: v in MISS, "one of " + ", ".join(sorted(MISS))),
    "scheduler": (lambda v: v in SCHEDULER, "one of " + ", ".join(sorted(SCHEDULER))),
    "chunk_tokens": (lambda v: _is_int(v) and 1 <= v <= MAX_CONTEXT_TOKENS, f"an integer in [1, {MAX_CONTEXT_TOKENS}]"),
    "kv_memory": (lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool), "a size such as 2GiB"),
    "arrival_rate": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf"),
                     "a positive number of requests/s"),
    "reroute": (lambda v: isinstance(v, bool), "true or false"),
    "dram_contention": (lambda v: isinstance(v, bool), "true or false"),
    "pd_split": (lambda v: v is None or (_is_int(v) and 1 <= v < MAX_NODE_COUNT),
                 "the prefill pool's nodes (fewer than the cluster's), or null for colocated"),
    "rebalance_every": (lambda v: v is None or (_is_int(v) and 1 <= v <= 10**9),
                        "a positive number of decode steps, or null for never"),
    "hardware": (lambda v: isinstance(v, str) and bool(v), "a profile name or path"),
    "gpu": (lambda v: isinstance(v, str) and bool(v), "a bundled profile name"),
    "model": (lambda v: isinstance(v, str) and bool(v), "a model name or config path"),
    "dram": (lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool), "a size such as 128GiB"),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_value(knob: str, value: Any, path: str | Path, key: str, line: int | None) -> None:
    """Refuse a knob value before any point runs (a bad one would fail every point it is in)."""
    test, expected = _KNOB_VALUES[knob]
    try:
        ok = test(value)
    except TypeError:  # an unhashable value (a list or mapping) tested against a registry
        ok = False
    if not ok:
        raise InputError("invalid value", file=path, key=key, value=value, expected=expected,
                         fix="use a value of that kind", line=line)
    if knob in ("dram", "kv_memory"):
        try:
            parse_size(value if not isinstance(value, str) else value)
        except InputError as exc:
            raise exc.located(file=path, key_prefix=key, line=line) from None


def grid_points(grid: Grid) -> list[dict[str, Any]]:
    """Every combination of the varied values, in file order (the last knob varies fastest)."""
    knobs = list(grid.vary)
    return [dict(zip(knobs, combo)) for combo in itertools.product(*(grid.vary[k] for k in knobs))]


def _profile_doc(name: str) -> dict:
    path = bundled_profiles().get(name, Path(name))
    data, _ = load_yaml(path)
    if not isinstance(data, dict):
        raise InputError("not a hardware profile", file=path, fix="name a bundled profile or a profile YAML")
    return data


def point_profile(grid: Grid, point: dict[str, Any], key: str) -> dict:
    """The hardware profile document of one point: the base (or ``hardware`` knob) with the knobs applied."""
    doc = copy.deepcopy(_profile_doc(point.get("hardware", grid.base.hardware)))
    doc["name"] = f"{doc['name']}-{key}"
    devices = [d for node in doc["nodes"] for d in node["devices"]]
    if "gpu" in point:
        donor = next((d for n in _profile_doc(point["gpu"])["nodes"] for d in n["devices"] if d["kind"] == "gpu"), None)
        if donor is None:
            raise InputError("that profile has no GPU", key="vary.gpu", value=point["gpu"],
                             fix="name a bundled profile with a GPU")
        for d in devices:
            if d["kind"] == "gpu":
                for field in ("model", "memory_bytes", "memory_bytes_per_s", "peak_ops_per_s", "launch_overhead_s",
                              "efficiency", "power_w", "price_per_hour_usd"):
                    d.pop(field, None)
                    if field in donor:
                        d[field] = copy.deepcopy(donor[field])
    if "gpu_count" in point:
        _set_count(devices, "gpu", int(point["gpu_count"]), "vary.gpu_count")
    if "nvme_count" in point:
        _set_count(devices, "nvme", int(point["nvme_count"]), "vary.nvme_count")
    if "nodes" in point:
        doc["nodes"][0]["count"] = int(point["nodes"])
    if "dram" in point:
        parse_size(str(point["dram"]))  # one clear error for a bad size
        for d in devices:
            if d["kind"] == "cpu":
                d["memory_bytes"] = str(point["dram"])
    if "pcie_gen" in point:
        for d in devices:
            for link in d.get("links", []):
                if link.get("kind") == "pcie":
                    link["gen"] = int(point["pcie_gen"])
                    link.pop("bytes_per_s", None)
                    link.setdefault("lanes", 16)
    try:
        HardwareProfile.model_validate(doc).resolve()
    except ValidationError as exc:
        raise from_validation_error(exc, file=f"sweep point {key}") from None
    return doc


def _set_count(devices: list[dict], kind: str, count: int, key: str) -> None:
    found = [d for d in devices if d["kind"] == kind]
    if not found:
        raise InputError(f"the profile has no {kind} to count", key=key, fix=f"vary {key} on a profile with a {kind}")
    found[0]["count"] = count


def _point_cost(grid: Grid, point: dict[str, Any]) -> float | None:
    if not grid.costs:
        return None
    return sum(grid.costs.get(k, {}).get(str(v), 0.0) for k, v in point.items())


def point_specs(grid: Grid, out_dir: Path) -> list[dict[str, Any]]:
    """One self-contained, picklable spec per point; hardware profiles written under ``out_dir/hardware``."""
    hw_dir = out_dir / "hardware"
    hw_dir.mkdir(parents=True, exist_ok=True)
    specs = []
    for i, point in enumerate(grid_points(grid)):
        key = f"p{i:03d}"
        path = hw_dir / f"{key}.yaml"
        doc = point_profile(grid, point, key)
        path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        pools = {}
        if point.get("pd_split") is not None:  # the prefill and decode pools' profiles beside it
            for role, pool in zip(("prefill", "decode"), pool_profiles(doc, int(point["pd_split"]), "vary.pd_split")):
                pools[f"{role}_hardware"] = str(hw_dir / f"{key}-{role}.yaml")
                Path(pools[f"{role}_hardware"]).write_text(yaml.safe_dump(pool, sort_keys=False), encoding="utf-8")
        b = grid.base
        specs.append({
            "id": key, "point": point, "hardware": str(path), "model": point.get("model", b.model),
            "objective": point.get("objective", b.objective), "batch": int(point.get("batch", b.batch)),
            "context": b.context, "trace": b.trace, "parallel": point.get("parallel", b.parallel),
            "time_limit_s": b.time_limit_s, "formats": b.formats, "eviction": point.get("eviction"),
            "prefetch": point.get("prefetch"), "miss": point.get("miss", "plan"),
            "requests": grid.simulate.requests,
            "arrival_rate_per_s": point.get("arrival_rate", grid.simulate.arrival_rate_per_s),
            "seed": grid.simulate.seed, "grid_cost_per_hour_usd": _point_cost(grid, point),
            "scheduler": point.get("scheduler", "continuous"), "chunk_tokens": point.get("chunk_tokens"),
            "kv_bytes": parse_size(point["kv_memory"]) if "kv_memory" in point else None,
            "reroute": point.get("reroute", False), "rebalance_every": point.get("rebalance_every"),
            "dram_contention": point.get("dram_contention", False),
            "pd_split": point.get("pd_split"), **pools,
            "goodput": grid.goodput.model_dump() if grid.goodput is not None else None,
        })
    return specs


def run_sweep(specs: list[dict[str, Any]], evaluate: Callable[[dict], dict], *, jobs: int = 1,
              ray_address: str | None = None, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Evaluate every spec (serially, on ``jobs`` local processes, or on Ray); rows in spec order."""
    if ray_address is not None:
        try:
            import ray
        except ImportError:
            raise InputError("Ray is not installed", key="--ray", value=ray_address,
                             fix="pip install 'moe-planner[ray]', or use --jobs N for local processes") from None
        started = not ray.is_initialized()
        if started:
            ray.init(address=None if ray_address == "local" else ray_address, num_cpus=jobs if ray_address == "local"
                     else None, include_dashboard=False, log_to_driver=False)
        try:
            remote = ray.remote(evaluate)
            refs = [remote.remote(s) for s in specs]
            rows = []
            for i, ref in enumerate(refs):
                rows.append(ray.get(ref))
                if progress:
                    progress(i + 1, len(specs))
            return rows
        finally:
            if started:
                ray.shutdown()
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = []
            for i, row in enumerate(pool.map(evaluate, specs)):
                rows.append(row)
                if progress:
                    progress(i + 1, len(specs))
            return rows
    rows = []
    for i, spec in enumerate(specs):
        rows.append(evaluate(spec))
        if progress:
            progress(i + 1, len(specs))
    return rows
