"""Given configurations: a published setup or a user's own, priced as it is, and plans with parts fixed.

Two ways to say what is already decided, both priced by the same cost model as every plan:

- :class:`GivenPolicy` (``planner optimize --policy NAME``): a baseline's placement
  (:mod:`planner.baselines`) with the tool's own parameters becomes the plan, no ILP:
  accelerate with a GPU ``max_memory``, llama.cpp ``--n-cpu-moe N``, LRU offloading with C
  slots per layer, all experts on the CPU, popularity placement, everything on the GPU. It
  runs on the policy's own engine profile unless another is named, and goes through
  :func:`planner.plan_assembly.assemble_plan` like the ILP's plans, so one placement has one price.
  A placement that does not fit raises :class:`InfeasibleError` naming the memory and the
  shortfall.
- :class:`Fixes` (``--fix-*``): parts of every layer's option ``(p, q, b_res, c, b_off, home,
  mode)`` are fixed and the ILP decides the rest. They filter the option rows where
  :func:`planner.costs.option_specs` builds them and where the baselines' rows are merged in
  (:func:`planner.costs.layer_options`), so no row that breaks one survives.

    plan = optimize(OptimizeRequest(model="olmoe-1b-7b", policy=GivenPolicy("llama.cpp", n_cpu_moe=3))).plan
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from profiles.engines import Engine
from profiles.errors import InfeasibleError, InputError
from profiles.models import ModelSpec
from profiles.units import format_size

from .baselines import BASELINES, Baseline
from .costs import N_SPEC, Setup, engine_runs
from .ilp import Problem, build_problem
from .optimize import OptimizeRequest, _score_baselines
from .plan_assembly import assemble_plan, option_rows
from .plan import Inputs, Plan, SolverInfo

__all__ = ["Fixes", "GivenPolicy", "HOME_TIERS", "price_given"]

HOME_TIERS = ("dram", "nvme")
# the parameter each policy takes: GivenPolicy field -> (policy, CLI flag)
_PARAMETERS = {"gpu_memory_bytes": ("accelerate", "--gpu-memory"), "n_cpu_moe": ("llama.cpp", "--n-cpu-moe"),
               "cache_slots": ("lru-offload", "--cache-slots")}
# the baselines' keyword for each parameter (planner.baselines)
_KEYWORDS = {"gpu_memory_bytes": "gpu_bytes", "n_cpu_moe": "n_cpu_moe", "cache_slots": "slots"}
# the execution site each policy needs from the engine
_SITE = {"accelerate": "stream", "llama.cpp": "local", "lru-offload": "fetch", "cpu-experts": "local",
         "popularity": "local"}


@dataclass(frozen=True)
class Fixes:
    """Parts of a plan the user fixed; per-layer tuples have one entry per MoE layer (None: free)."""

    cache_slots: tuple[int | None, ...] = ()  # c of each layer
    resident: tuple[int | None, ...] = ()  # p of each layer: its most frequent experts stay resident
    expert_format: str | None = None  # b_res and b_off
    dense_format: str | None = None  # the dense (non-expert) weights
    home: str | None = None  # memory tier (HOME_TIERS) of the offloaded experts' home

    def slots(self, layer: int) -> int | None:
        return self.cache_slots[layer] if self.cache_slots else None

    def pinned(self, layer: int) -> int | None:
        return self.resident[layer] if self.resident else None

    def formats(self) -> tuple[str, ...]:
        """The formats the fixes name (they must be candidates)."""
        return tuple(fm for fm in (self.expert_format, self.dense_format) if fm)

    def through(self, engine: Engine) -> "Fixes":
        """The fixes with formats as ``engine`` stores them (llama.cpp stores int4 as q4_k)."""
        return dataclasses.replace(self, **{k: engine.stored(v) for k in ("expert_format", "dense_format")
                                            if (v := getattr(self, k))})

    def check(self, s: Setup) -> None:
        """Raise InputError for a fix this setup cannot meet at all (lengths, ranges, formats, homes)."""
        L, E = s.stats.num_layers, s.stats.num_experts
        for flag, values in (("--fix-cache-slots", self.cache_slots), ("--fix-resident", self.resident)):
            if values and len(values) != L:
                raise InputError("one entry per MoE layer expected", key=flag, value=len(values),
                                 expected=f"{L} (the model's MoE layers)", fix="give N or MOE_LAYER:N pairs")
            bad = [v for v in values if v is not None and not 0 <= v <= E]
            if bad:
                raise InputError("out of range", key=flag, value=bad[0], expected=f"0..{E} (experts per layer)",
                                 fix=f"give at most {E}")
        for flag, fm in (("--fix-format", self.expert_format), ("--fix-dense-format", self.dense_format)):
            if fm is not None and fm not in s.formats:
                raise InputError(f"engine {s.engine.name if s.engine else 'bundle'} cannot use this format here",
                                 key=flag, value=fm, expected="one of " + ", ".join(s.formats),
                                 fix="pick a format the engine runs (planner engines show NAME)")
        if self.dense_format is not None and not s.runs(s.compute, self.dense_format):
            raise InputError(f"the dense weights run on {s.compute.id}, which the engine cannot run at this format",
                             key="--fix-dense-format", value=self.dense_format,
                             fix="pick a format the engine runs on that device")
        tiers = [s.hardware.memories[h].tier for h in s.homes]
        if self.home is not None and self.home not in tiers:
            raise InputError("no home of this kind for offloaded experts on this machine", key="--fix-home",
                             value=self.home, expected=" or ".join(tiers) or "none (nothing can be offloaded)",
                             fix="add such a memory to the hardware profile, or drop --fix-home")

    def allows(self, s: Setup, layer: int, specs: np.ndarray) -> np.ndarray:
        """``[N]`` whether each option row of ``layer`` (``[N, 7]``, costs.SPEC_COLUMNS) keeps the fixes."""
        specs = np.asarray(specs, dtype=np.int64).reshape(-1, N_SPEC)
        p, _, b_res, c, b_off, home, _ = specs.T
        E = s.stats.num_experts
        ok = np.ones(len(specs), bool)
        if self.slots(layer) is not None:
            ok &= c == self.slots(layer)
        if self.pinned(layer) is not None:
            ok &= p == self.pinned(layer)
        if self.expert_format is not None:
            fi = s.formats.index(self.expert_format)
            ok &= ((p == 0) | (b_res == fi)) & ((p == E) | (b_off == fi))  # p = E: nothing offloaded
        if self.home is not None:
            tier = np.array([s.hardware.memories[h].tier == self.home for h in s.homes] or [False])
            ok &= (p == E) | tier[np.minimum(home, len(tier) - 1)]
        return ok

    def keeps(self, s: Setup, b: Baseline) -> bool:
        """Whether a baseline's placement keeps every fix (its dense format included)."""
        return (all(self.allows(s, l, spec)[0] for l, spec in enumerate(b.specs))
                and self.dense_format in (None, b.dense_format))


@dataclass(frozen=True)
class GivenPolicy:
    """A baseline's placement with the user's parameters, priced as the plan (no ILP)."""

    name: str  # a key of planner.baselines.BASELINES
    gpu_memory_bytes: float | None = None  # accelerate: its max_memory for the GPU (weights it places there)
    n_cpu_moe: int | None = None  # llama.cpp: the experts of exactly the first N MoE layers on the CPU
    cache_slots: int | None = None  # lru-offload: cache slots per layer

    def check(self, model: ModelSpec) -> None:
        """Raise InputError for an unknown policy, a parameter of another policy or one out of range."""
        if self.name not in BASELINES:
            raise InputError("unknown policy", key="--policy", value=self.name,
                             expected="one of " + ", ".join(BASELINES), fix="pick one of them")
        for field, (policy, flag) in _PARAMETERS.items():
            if getattr(self, field) is not None and self.name != policy:
                raise InputError(f"{flag} is a parameter of --policy {policy}", key=flag, value=getattr(self, field),
                                 fix=f"drop it, or use --policy {policy}")
        L, E = model.num_moe_layers, model.num_experts
        if self.n_cpu_moe is not None and not 0 <= self.n_cpu_moe <= L:
            raise InputError("more CPU layers than the model has" if self.n_cpu_moe > L else "out of range",
                             key="--n-cpu-moe", value=self.n_cpu_moe, expected=f"0..{L} ({model.name}'s MoE layers)",
                             fix=f"give at most {L}")
        if self.cache_slots is not None and not 1 <= self.cache_slots <= E:
            raise InputError("more cache slots than experts" if self.cache_slots > E else "out of range",
                             key="--cache-slots", value=self.cache_slots,
                             expected=f"1..{E} ({model.name}'s experts per layer)", fix=f"give at most {E}")
        if self.gpu_memory_bytes is not None and self.gpu_memory_bytes <= 0:
            raise InputError("out of range", key="--gpu-memory", value=self.gpu_memory_bytes,
                             expected="a positive size, e.g. 10GiB")

    def parameters(self) -> dict[str, float | int]:
        """The baseline function's keyword arguments for the parameters given."""
        return {_KEYWORDS[k]: getattr(self, k) for k in _PARAMETERS if getattr(self, k) is not None}


def price_given(s: Setup, req: OptimizeRequest, inputs: Inputs, budget: float | None) -> Plan:
    """The plan of ``req.policy`` on setup ``s``: its fastest candidate (one per format the
    quality budget allows, or the fixed format) that fits, priced like any plan.

    Raises:
        InputError: the policy cannot run here (engine, machine or fixes).
        InfeasibleError: no candidate fits; names the memory and the shortfall.
    """
    policy, engine = req.policy, s.engine.name if s.engine else "bundle"
    # a fixed expert format is what the user runs: the quality budget does not choose it
    budget = None if s.fixes is not None and s.fixes.expert_format else budget
    candidates = BASELINES[policy.name](s, budget, fits=False, **policy.parameters()) or []
    if not candidates:
        raise InputError(f"policy {policy.name} cannot run here: {_why_not(s, policy.name)}", key="--policy",
                         value=policy.name, fix="pick another --policy or --engine, or loosen --quality-budget")
    if not all(engine_runs(s, tuple(int(x) for x in spec)) for b in candidates for spec in b.specs):
        raise InputError(f"engine {engine} cannot run the {policy.name} placement (its sites, cache or placement "
                         "granularity)", key="--engine", value=engine, fix=f"drop --engine to use {policy.name}'s own")
    if s.fixes is not None:
        candidates = [b for b in candidates if s.fixes.keeps(s, b)]
        if not candidates:
            raise InputError(f"the {policy.name} placement breaks the --fix-* options", key="--policy",
                             value=policy.name, fix="with --policy only --fix-format and --fix-dense-format apply")
    if req.prefetch is not None:
        candidates = [dataclasses.replace(b, prefetch=req.prefetch != "none") for b in candidates]
    L = s.stats.num_layers
    problem = build_problem(s, budget, [np.array([b.specs[l] for b in candidates]) for l in range(L)], grid=False)
    scored = _score_baselines(problem, candidates)
    if policy.name not in scored:
        raise _shortfall(problem, candidates, policy)
    choice, seconds, dense_fm, prefetch, note = scored[policy.name]
    info = SolverInfo(method=policy.name, status="given", objective=seconds)
    return assemble_plan(problem, choice, dense_fm, prefetch, info, req, inputs, budget,
                         notes=(f"given {policy.name} on engine {engine}: {note}",),
                         prefetch_policy=req.prefetch, eviction=req.eviction)


def _why_not(s: Setup, name: str) -> str:
    """Why a baseline has no placement on this setup (it returned None)."""
    if s.unified:
        return f"{s.compute.id} and the host share one memory, so nothing is offloaded"
    if name in _SITE and not s.engine_can(_SITE[name]):
        return f"engine {s.engine.name} has no {_SITE[name]} site (planner engines show {s.engine.name})"
    if not s.homes:
        return "no memory to offload experts to"
    return "no candidate format is within the quality budget and runs where the policy computes"


def _shortfall(problem: Problem, candidates: list[Baseline], policy: GivenPolicy) -> InfeasibleError:
    """The error for a placement that fits in none of its formats: the candidate closest to
    fitting, each memory it overfills with what it needs, what is usable, and a way out."""
    s = problem.setup
    best = None
    for b in candidates:
        choice = option_rows(problem, b.specs)
        t = problem.tables
        need = {problem.device_mem: sum(float(t[l].dev_bytes[w]) for l, w in enumerate(choice))
                + problem.dense_total_bytes(b.dense_format)}
        for hi, home in enumerate(s.homes):
            need[home] = sum(float(t[l].home_bytes[w]) for l, w in enumerate(choice) if t[l].home[w] == hi)
        short = {m: n - problem.caps[m] for m, n in need.items() if n > problem.caps[m] * (1 + 1e-9)}
        if best is None or sum(short.values()) < sum(best[2].values()):
            best = (b, need, short)
    b, need, short = best
    if not short:  # memory fits: the quality budget does not
        return InfeasibleError(f"{policy.name} ({b.note}) exceeds --quality-budget {problem.quality_budget:g}; "
                               "smallest change: raise it, or name the format you run with --fix-format")
    parts = [f"{m} needs {format_size(need[m])} of {format_size(problem.caps[m])} usable "
             f"({format_size(v)} short)" for m, v in short.items()]
    device = problem.device_mem in short
    hint = {("accelerate", True): "a smaller --gpu-memory" if policy.gpu_memory_bytes else "a shorter --context",
            ("accelerate", False): "more host memory or an NVMe home",
            ("llama.cpp", True): "a larger --n-cpu-moe", ("llama.cpp", False): "a smaller --n-cpu-moe",
            ("lru-offload", True): "fewer --cache-slots", ("all-gpu", True): "an offloading --policy (llama.cpp)",
            }.get((policy.name, device), "more memory")
    engine = s.engine.name if s.engine else "bundle"
    return InfeasibleError(f"{policy.name} on engine {engine} does not fit ({b.note}): "
                           + "; ".join(parts) + f"; smallest change: {hint}, or a lower bitwidth (--fix-format)")
