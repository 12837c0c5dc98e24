"""Pricing for the engine renderers: the planner's own cost model for one plan's model,
hardware and workload, applied to one option per layer (a plan, a rounded plan, a
baseline), so the rounding cost is measured with the model that chose the plan.

Legend: L = MoE layers, B = batch (tokens per decode step).

:class:`Pricing` builds the planner's ``Setup`` for the plan's hardware, model and workload
and calls :func:`planner.costs.option_costs` / :func:`planner.costs.step_time` on one option
per layer: exactly how ``planner optimize`` predicts a plan's time per decode step. A
pipeline placement (each layer on its GPU) is priced by
:func:`planner.pipeline_costs.pipeline_step_s`, as the multi-GPU planner and baselines are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from planner.costs import (
    MODES,
    QUANT_ERROR,
    SPEC_COLUMNS,
    Setup,
    capacity,
    fixed_costs,
    option_costs,
    option_time,
    step_time,
)
from planner.pipeline_costs import hop_matrix, node_gpus, pipeline_step_s
from planner.plan import Plan
from planner.plan_digest import workload_digest
from profiles.engines import load_engine
from profiles.errors import InputError
from profiles.formats import all_formats, default_quant_error
from profiles.hardware import Hardware
from profiles.models import ModelSpec
from profiles.workload.trace import Trace

from .rounding import RoundedLayer, dense_format

__all__ = ["Prediction", "Pricing", "rounding_report"]


@dataclass(frozen=True)
class Prediction:
    """Predicted decode metrics of one plan (or rounded plan) under the planner's cost model."""

    tokens_per_s: float
    tpot_s: float
    quality_error: float

    def as_dict(self) -> dict[str, float]:
        return {"tokens_per_s": self.tokens_per_s, "tpot_s": self.tpot_s, "quality_error": self.quality_error}


class Pricing:
    """The planner's cost model for one plan's model, hardware and workload.

    Args:
        plan: the plan (batch size, context, dense format and prefetch come from it).
        model: its model.
        hardware: its hardware.
        trace: the workload to price with; ``None``: the model's default workload (what
            ``planner optimize`` uses when given no trace). ``matches_plan`` says whether it is
            the workload the plan was made with (same routing digest).
    """

    def __init__(self, plan: Plan, model: ModelSpec, hardware: Hardware, trace: Trace | None = None,
                 engine: str | None = None) -> None:
        from planner.workload_view import planning_stats
        from profiles.workload.defaults import default_workload

        self.engine = load_engine(engine or plan.inputs.engine)
        self.plan, self.model, self.bare_hardware = plan, model, hardware
        self.hardware = self.engine.apply(hardware)
        self._trace = trace
        trace = default_workload(model) if trace is None else trace
        if trace.num_layers != model.num_moe_layers:
            raise InputError("the workload does not match the model", key="trace", value=trace.num_layers,
                             expected=f"{model.num_moe_layers} MoE layers ({model.name})",
                             fix="pass the trace the plan was made with")
        self.workload = trace.source or "trace"
        self.matches_plan = workload_digest(trace) == plan.inputs.workload_digest
        self.stats = planning_stats(trace, real_experts=model.num_experts)
        self.dense_format = dense_format(plan, model)
        used = {f for layer in plan.layers for f in layer.format} | {self.dense_format, "bf16"}
        used |= {layer.cache_format for layer in plan.layers if layer.cache_format}
        self.formats = tuple(f for f in all_formats() if f in used)
        self._setups: dict[str, Setup] = {}
        self._repriced: tuple[Prediction | None, str] | None = None

    def setup(self, compute_id: str) -> Setup:
        """The planner's Setup with ``compute_id`` as the compute device (homes as
        ``planner optimize`` picks them: host DRAM, then the node's first NVMe)."""
        if compute_id not in self._setups:
            hw = self.hardware
            compute = hw.devices[compute_id]
            host = hw.devices[self.plan.host_device]
            homes = [hw.memory_of(host.id).id]
            homes += [m.id for m in hw.memories.values()
                      if m.tier == "nvme" and m.devices[0].split("/")[0] == compute.node][:1]
            if compute.kind == "cpu":
                homes = [m for m in homes if m != hw.memory_of(compute.id).id]
            # the plan's compute devices (one, or a pipeline plan's GPUs) hold resident experts, not offloaded ones
            planned = {hw.memory_of(d).id for d in (self.plan.compute_device, *(self.plan.layer_devices or ()))}
            for layer in self.plan.layers:  # a home the plan uses that the defaults lack
                homes += [h for h in dict.fromkeys(layer.home)
                          if h not in homes and h not in planned | {hw.memory_of(compute.id).id}]
            self._setups[compute_id] = Setup(
                # at batch > 1 the per-call hit rates and the workload's steps, as planner.setup prices them
                hardware=hw, model=self.model, stats=self.stats.at_batch(self.plan.batch_size),
                batch_size=self.plan.batch_size,
                context_tokens=self.plan.context_tokens, formats=self.formats, compute=compute, host=host,
                homes=tuple(homes), quant_error={f: QUANT_ERROR.get(f, default_quant_error(f)) for f in self.formats},
                engine=self.engine, dram_contention=self.plan.inputs.dram_contention)  # priced as the plan was
        return self._setups[compute_id]

    def price_rows(self, compute_id: str, rows: Sequence[dict[str, Any]], dense_fmt: str,
                   prefetch: bool, layer_devices: Sequence[str] | None = None) -> Prediction:
        """Price one option per layer (rows of named option columns, formats and homes by name);
        ``layer_devices``: each layer's GPU (a pipeline plan, priced by
        :func:`planner.pipeline_costs.pipeline_step_s`); ``None``: every layer on ``compute_id``."""
        if layer_devices is not None and len(set(layer_devices)) > 1:
            return self._price_pipeline(rows, dense_fmt, prefetch, layer_devices)
        s = self.setup(compute_id)
        tables = self._tables(rows, [compute_id] * len(rows))
        step_s, _ = step_time(s, tables, [0] * len(tables), self.fixed(s, dense_fmt), prefetch)
        return self._prediction(s, tables, step_s)

    def _price_pipeline(self, rows: Sequence[dict[str, Any]], dense_fmt: str, prefetch: bool,
                        layer_devices: Sequence[str]) -> Prediction:
        s0 = self.setup(self.plan.compute_device)
        gpus = node_gpus(s0)
        tables = self._tables(rows, layer_devices)
        devices = [gpus.index(d) for d in layer_devices]
        layer_s = [option_time(t, prefetch)[0] for t in tables]
        dense_s = [fixed_costs(self.setup(g), dense_fmt).dense_s for g in gpus]
        step_s = pipeline_step_s(layer_s, dense_s, devices, hop_matrix(s0, gpus, s0.batch_size))
        return self._prediction(s0, tables, step_s)

    def _prediction(self, s: Setup, tables: Sequence[Any], step_s: float) -> Prediction:
        total = float(self.stats.importance.sum())
        quality = float(sum(t.error[0] for t in tables)) / max(total, 1e-300)
        return Prediction(tokens_per_s=s.batch_size / step_s, tpot_s=step_s, quality_error=quality)

    def _tables(self, rows: Sequence[dict[str, Any]], compute_ids: Sequence[str]) -> list[Any]:
        """One option table of one row per layer, priced on that layer's compute device."""
        tables = []
        for l, (row, compute_id) in enumerate(zip(rows, compute_ids)):
            s = self.setup(compute_id)
            values = dict(row, b_res=s.formats.index(row["b_res"]), b_off=s.formats.index(row["b_off"]),
                          home=s.homes.index(row["home"]) if row["home"] is not None else 0,
                          mode=MODES.index(row["mode"]))
            missing = [c for c in SPEC_COLUMNS if c not in values]
            if missing:  # a cost-model change this module has not been taught
                raise RuntimeError(f"planner.costs option columns {missing} unknown to exporters/engines/rounding.py")
            tables.append(option_costs(s, l, np.array([[values[c] for c in SPEC_COLUMNS]], dtype=np.int64)))
        return tables

    def price_rounded(self, compute_id: str, layers: Sequence[RoundedLayer], dense_fmt: str,
                      layer_devices: Sequence[str] | None = None) -> Prediction:
        """Price a rounded plan (no engine here prefetches or caches); ``layer_devices``: each
        layer's GPU (a pipeline placement), ``None``: every layer on ``compute_id``."""
        s = self.setup(compute_id)
        E = self.model.num_experts
        host_mem = self.hardware.memory_of(self.plan.host_device).id
        nvme = [h for h in s.homes if self.hardware.memories[h].tier == "nvme"]
        rows = []
        for layer in layers:
            row = {"p": E, "q": E, "b_res": layer.format, "c": 0, "b_off": layer.format, "home": None, "mode": "fetch"}
            if layer.mode == "local":  # every rank computed by the host CPU where it lives
                row.update(p=0, q=0, home=host_mem, mode="local")
            elif layer.mode == "stream":  # every rank crosses the link each step
                row.update(p=0, home=host_mem if layer.place == "host" or not nvme else nvme[0], mode="stream")
            rows.append(row)
        return self.price_rows(compute_id, rows, dense_fmt, prefetch=False, layer_devices=layer_devices)

    def price_plan(self) -> tuple[Prediction | None, str]:
        """Re-price the plan itself on its own engine (once; later calls reuse it); ``(None, why)``
        when a layer is not one option of the planner's grid under this workload.

        A layer is read as the planner writes it, by frequency rank: ranks ``[0, p)``
        resident, ``[p, q)`` offloaded and run by one mode (fetch, hybrid, stream), ``[q, E)``
        offloaded and computed where they live (``local``).
        """
        if self._repriced is None:
            if self.engine.name != self.plan.inputs.engine:
                own = Pricing(self.plan, self.model, self.bare_hardware, self._trace, engine=self.plan.inputs.engine)
                self._repriced = own.price_plan()
            else:
                self._repriced = self._price_plan()
        return self._repriced

    def _price_plan(self) -> tuple[Prediction | None, str]:
        s = self.setup(self.plan.compute_device)
        rows = []
        for l, layer in enumerate(self.plan.layers):
            dev_mem = self.hardware.memory_of(self.plan.device_of(l)).id  # a pipeline plan: the layer's GPU
            by_rank = [int(e) for e in self.stats.order[l]]
            sites = ["resident" if layer.home[e] == dev_mem else layer.site[e] for e in by_rank]
            p = sites.count("resident")
            band = {sites[r] for r in range(p, len(sites)) if sites[r] != "local"}
            q = p + sum(1 for x in sites if x not in ("resident", "local"))
            if sites != ["resident"] * p + [next(iter(band), "")] * (q - p) + ["local"] * (len(sites) - q):
                return None, f"layer {l}: its sites are not resident, one band mode, local by frequency rank"
            if "q" not in SPEC_COLUMNS and p < q < len(sites):
                return None, f"layer {l}: a split band needs a cost model with the q column"
            res = {layer.format[e] for e in by_rank[:p]}
            off = {(layer.format[e], layer.home[e]) for e in by_rank[p:]}
            if len(res) > 1 or len(off) > 1:
                return None, f"layer {l}: more than one format or home among its resident or offloaded experts"
            b_off, home = next(iter(off), (None, None))
            b_res = next(iter(res), b_off)
            rows.append({"p": p, "q": q, "b_res": b_res, "c": layer.cache_slots, "b_off": b_off or b_res,
                         "home": home if home in s.homes else None,
                         "mode": next(iter(band)) if band else ("local" if p < len(sites) else "fetch")})
        pred = self.price_rows(self.plan.compute_device, rows, self.dense_format, self.plan.prefetch != "none",
                               layer_devices=self.plan.layer_devices)
        return pred, ""

    @property
    def kv_on_host(self) -> bool:
        """Whether this engine runs the plan's KV cache in host memory (the plan's ``kv_cache:
        host`` and the engine's ``kv_offload``; an engine without it keeps the cache on the device)."""
        return self.plan.kv_cache == "host" and self.engine.kv_offload is not None

    def fixed(self, s: Setup, dense_fmt: str):
        """The planner's fixed costs at ``dense_fmt``, the KV cache where this engine keeps it."""
        return fixed_costs(s, dense_fmt, kv_on_host=self.kv_on_host and s.kv_host() is not None)

    def device_budget(self, compute_id: str, dense_bytes: float) -> float:
        """Bytes left for experts on ``compute_id``'s memory: usable capacity (the planner's
        reserve kept free) minus dense weights, the KV cache (unless in host memory) and the
        activation workspace."""
        s = self.setup(compute_id)
        fc = self.fixed(s, self.dense_format)
        mem = self.hardware.memory_of(compute_id).id
        return capacity(s, mem) - dense_bytes - fc.kv_bytes - fc.workspace_bytes

    def usable_bytes(self, memory_id: str) -> float:
        """Usable bytes of a memory pool after the planner's runtime reserve."""
        return capacity(self.setup(self.plan.compute_device), memory_id)


def rounding_report(plan: Plan, pricing: Pricing, rounded: Prediction) -> dict[str, Any]:
    """The rounding cost: the plan's predicted tok/s (as planned and re-priced here) against
    the rounded plan's, under one cost model and one workload."""
    repriced, why = pricing.price_plan()
    ref = repriced.tokens_per_s if repriced is not None else plan.predicted.get("tokens_per_s")
    out: dict[str, Any] = {
        "workload": pricing.workload,
        "workload_matches_plan": pricing.matches_plan,
        "plan_tokens_per_s": plan.predicted.get("tokens_per_s"),
        "plan_repriced": repriced.as_dict() if repriced is not None else None,
        "rounded": rounded.as_dict(),
    }
    if why:
        out["plan_repriced_note"] = why
    if ref:
        out["tokens_per_s_change"] = rounded.tokens_per_s - ref
        out["relative_change"] = rounded.tokens_per_s / ref - 1.0
    return out
