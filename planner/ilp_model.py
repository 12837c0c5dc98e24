"""The placement ILP's model: a problem's option tables and coupling rows, the options worth
keeping (:func:`pareto_front`), feasibility and the objective of a plan, and what to say when
nothing fits. The formulation is in :mod:`planner.ilp`'s docstring."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from profiles.errors import InfeasibleError
from profiles.units import format_size

from .costs import (FixedCosts, OptionTable, Setup, capacity, fixed_costs, layer_options, option_costs, option_time,
                    with_tiers)
from .format_tiers import offers_tiers
from .miss_copy_options import copy_specs
from .prefill_costs import prefill_dense_s, prefill_options_s
from .nested_options import nested_specs, offers_nested

__all__ = ["Problem", "build_problem", "pareto_front", "explain_infeasible"]


@dataclass(frozen=True, eq=False)
class Problem:
    """Option tables, fixed costs and capacities of one planning problem."""

    setup: Setup
    tables: tuple[OptionTable, ...]  # all options per layer (unpruned: baselines index these)
    fixed: dict[str, FixedCosts]
    caps: dict[str, float]  # memory id -> usable bytes
    device_mem: str
    quality_budget: float | None
    importance_total: float
    # a TTFT SLO (planner.batch_search, --slo-ttft): ttft_options[prefetch][l] = [N_l] seconds each
    # option adds to one prompt's prefill (prefill_costs.prefill_options_s), ttft_room[fm] = the SLO less
    # the dense part's prefill at dense format fm; ttft = the rows of the prefetch setting solved
    ttft_options: dict[bool, tuple[np.ndarray, ...]] | None = None
    ttft_room: dict[str, float] | None = None
    ttft: tuple[np.ndarray, ...] | None = None

    def for_prefetch(self, prefetch: bool) -> Problem:
        """This problem with the TTFT rows of ``prefetch`` (itself when there is no TTFT SLO)."""
        if self.ttft_options is None:
            return self
        return dataclasses.replace(self, ttft=self.ttft_options[prefetch])

    def times(self, prefetch: bool) -> list[np.ndarray]:
        """``[L][N_l]`` seconds per step of every option."""
        return [option_time(t, prefetch) for t in self.tables]

    def dense_total_bytes(self, fm: str) -> float:
        fc = self.fixed[fm]
        return fc.dense_bytes + fc.kv_bytes + fc.workspace_bytes


def pareto_front(tau: np.ndarray, t: OptionTable, ttft: np.ndarray | None = None) -> np.ndarray:
    """Rows of options that no other option (same home) beats or ties in every column
    (with ``ttft``, each option's prefill seconds too)."""
    if ttft is not None:  # one more column: the fast paths below compare four
        return _front_by_rows(np.stack([tau, t.dev_bytes, t.home_bytes, t.error, ttft], axis=1), t.home)
    cols = np.stack([tau, t.dev_bytes, t.home_bytes, t.error], axis=1)  # [N, 4]
    # 1. options with the same memory and error (they differ in split and mode): the fastest
    #    (then the first row) stands for them all, found by one sort instead of the loop below
    by_use = np.lexsort((np.arange(len(tau)), tau, t.error, t.home_bytes, t.dev_bytes, t.home))
    use = np.stack([t.home, t.dev_bytes, t.home_bytes, t.error], axis=1)[by_use]
    first = np.concatenate([[True], (use[1:] != use[:-1]).any(axis=1)]) if len(tau) else np.zeros(0, bool)
    fastest = by_use[first]
    # 2. within options of equal device bytes and error (they differ in the home bytes a split
    #    or mode holds), a row that an earlier one beats or ties exactly in time and home bytes
    #    goes by one sort and a running minimum; whatever it dominates, its dominator does too,
    #    so step 3 finds the same front among far fewer rows
    g = fastest[np.lexsort((fastest, tau[fastest], t.home_bytes[fastest], t.error[fastest], t.dev_bytes[fastest],
                            t.home[fastest]))]  # by group, then home bytes, then time
    if len(g):
        key = np.stack([t.home[g], t.dev_bytes[g], t.error[g]], axis=1)
        seg = np.concatenate([[0], np.cumsum((key[1:] != key[:-1]).any(axis=1))])  # [n] group of each row
        rank = np.unique(tau[g], return_inverse=True)[1].ravel().astype(np.int64)  # [n] time rank, ties equal
        # one running minimum serves every group: ranks lifted so that each group lies below
        # the one before (integers, so exact), and the first row of a group compares with nothing
        lifted = rank - seg * (len(g) + 1)
        before = np.concatenate([[np.iinfo(np.int64).max], np.minimum.accumulate(lifted)[:-1]])
        first_of_group = np.concatenate([[True], seg[1:] != seg[:-1]])
        fastest = g[first_of_group | (before > lifted)]
    # 3. the pareto front of those, per home
    return _front_by_rows(cols, t.home, fastest)


def _front_by_rows(cols: np.ndarray, home: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """The pareto front of ``rows`` (default: all) over ``cols`` ``[N, C]``, per home: sorted,
    a dominator comes before what it dominates, so a row stays iff no earlier row beats or ties
    it in every column."""
    rows_all = np.arange(len(cols)) if rows is None else rows
    keep: list[np.ndarray] = []
    for h in np.unique(home):
        rows = rows_all[home[rows_all] == h]
        rows = rows[np.lexsort(cols[rows].T[::-1])]
        c = cols[rows]  # [n, C]
        tolerated = c * (1 + 1e-12) + 1e-15  # [n, C] what may cover each row, column by column
        by_col = np.ascontiguousarray(c.T)  # [C, n]
        dominated = np.zeros(len(rows), bool)
        for i0 in range(0, len(rows), 256):  # rows i0..i1 against the rows before i1, one column at a time
            i1 = min(i0 + 256, len(rows))
            covers = by_col[0][None, :i1] <= tolerated[i0:i1, 0][:, None]  # [i, j]: j covers i
            for k in range(1, c.shape[1]):
                covers &= by_col[k][None, :i1] <= tolerated[i0:i1, k][:, None]
            covers &= np.arange(i1)[None, :] < np.arange(i0, i1)[:, None]  # only an earlier row may
            dominated[i0:i1] = covers.any(axis=1)
        keep.append(rows[~dominated])
    return np.sort(np.concatenate(keep)).astype(int) if keep else np.zeros(0, int)


def _with_rows(table: OptionTable, more: OptionTable) -> OptionTable:
    """``table`` with ``more``'s rows appended."""
    return OptionTable(**{k: np.concatenate([getattr(table, k), getattr(more, k)]) for k in table.__dataclass_fields__})


def build_problem(s: Setup, quality_budget: float | None, extra: list[np.ndarray] | None = None,
                  grid: bool = True, ttft: tuple[float, int] | None = None) -> Problem:
    """Option tables for every layer; ``extra[l]`` adds specs (baselines' choices) to layer l;
    ``grid=False`` keeps only those (pricing given placements, no search); ``ttft`` =
    ``(slo_s, prompt_tokens)`` adds the TTFT SLO as a constraint (each option's share of one
    prompt's prefill, :func:`planner.prefill_costs.prefill_options_s`)."""
    if grid:
        tables = tuple(layer_options(s, l, None if extra is None else extra[l]) for l in range(s.stats.num_layers))
        # per-expert formats (planner.format_tiers): tiers on the options on their layer's front
        # without them, with and without prefetch
        tables = tuple(with_tiers(s, l, t, np.union1d(*(pareto_front(option_time(t, pf), t) for pf in (False, True))))
                       if offers_tiers(s, l) else t for l, t in enumerate(tables))
        # nested int8 experts as bit-planes (planner.nested_options), when asked for
        tables = tuple(_with_rows(t, option_costs(s, l, nested_specs(s, l))) if offers_nested(s, l) else t
                       for l, t in enumerate(tables))
        # low-bit copies for low-gate misses of the fetch options (planner.miss_copy_options), when asked for
        copies = [copy_specs(s, l, t) for l, t in enumerate(tables)]
        tables = tuple(_with_rows(t, option_costs(s, l, rows)) if len(rows) else t
                       for l, (t, rows) in enumerate(zip(tables, copies)))
    else:
        tables = tuple(option_costs(s, l, np.unique(extra[l], axis=0)) for l in range(s.stats.num_layers))
    # dense weights run on the compute device: only formats the engine runs there
    fixed = {fm: fixed_costs(s, fm) for fm in s.formats if s.runs(s.compute, fm)}
    device_mem = s.hardware.memory_of(s.compute.id).id
    caps = {device_mem: capacity(s, device_mem)}
    for h in s.homes:
        caps[h] = capacity(s, h)
    problem = Problem(setup=s, tables=tables, fixed=fixed, caps=caps, device_mem=device_mem,
                      quality_budget=quality_budget,
                      # dropped experts' importance (planner.task) counts: the stats no longer hold it
                      importance_total=float(s.stats.importance.sum()) + float(sum(s.dropped_importance)))
    if ttft is None:
        return problem
    slo_s, prompt = ttft
    options = {pf: tuple(prefill_options_s(s, l, t.specs(np.arange(len(t))), prompt, pf, t.tiers(np.arange(len(t))))
                         for l, t in enumerate(tables)) for pf in (False, True)}
    room = {fm: slo_s - prefill_dense_s(s, fm, prompt) for fm in fixed}
    return dataclasses.replace(problem, ttft_options=options, ttft_room=room)


def _time_unit(problem: Problem, times: list[np.ndarray], fronts: list[np.ndarray]) -> float:
    """Seconds of the fastest conceivable step (every layer at its fastest option): the unit
    the solvers see times in."""
    fastest = sum(float(times[l][f].min()) for l, f in enumerate(fronts) if len(f))
    return max(fastest + min(fc.dense_s for fc in problem.fixed.values()), 1e-12)


def _objective(problem: Problem, times: list[np.ndarray], choice: tuple[int, ...], dense_fm: str) -> float:
    return float(sum(times[l][w] for l, w in enumerate(choice)) + problem.fixed[dense_fm].dense_s)


def _best_of(best: tuple | None, plans: list[tuple], problem: Problem | None = None,
             times: list[np.ndarray] | None = None) -> tuple | None:
    """The fastest of ``best`` and ``plans``: ``(choice, dense, seconds)`` triples, or pairs that
    get their seconds from ``times`` (those must be feasible)."""
    for plan in plans:
        if len(plan) == 2:
            plan = (tuple(int(w) for w in plan[0]), plan[1], _objective(problem, times, *plan))
        if best is None or plan[2] < best[2]:
            best = plan
    return best


def _spills(t: OptionTable, w: int) -> bool:
    """Whether option w keeps offloaded experts in a home past the first (NVMe past host DRAM)."""
    return bool(t.home[w] > 0 and t.home_bytes[w] > 0)


def _spilled(problem: Problem, choice: tuple[int, ...]) -> int:
    """How many layers of a plan keep offloaded experts past the first home."""
    return sum(_spills(t, w) for t, w in zip(problem.tables, choice))


def _feasible(problem: Problem, choice: tuple[int, ...], dense_fm: str) -> bool:
    s, t = problem.setup, problem.tables
    dev = sum(float(t[l].dev_bytes[w]) for l, w in enumerate(choice)) + problem.dense_total_bytes(dense_fm)
    if dev > problem.caps[problem.device_mem] * (1 + 1e-9):
        return False
    for hi, home in enumerate(s.homes):
        used = sum(float(t[l].home_bytes[w]) for l, w in enumerate(choice) if t[l].home[w] == hi)
        if used > problem.caps[home] * (1 + 1e-9):
            return False
    if problem.quality_budget is not None:
        err = sum(float(t[l].error[w]) for l, w in enumerate(choice))
        if err > problem.quality_budget * problem.importance_total * (1 + 1e-9) + 1e-15:
            return False
        if problem.fixed[dense_fm].error > problem.quality_budget + 1e-12:
            return False
    if problem.ttft is not None:
        prefill = sum(float(problem.ttft[l][w]) for l, w in enumerate(choice))
        if prefill > problem.ttft_room[dense_fm] * (1 + 1e-9):
            return False
    return True


def _usage(problem: Problem, l: int, options: np.ndarray) -> np.ndarray:
    """``[N, R]`` what options of layer l put in each coupling row (device, homes..., quality)."""
    t = problem.tables[l]
    cols = [t.dev_bytes[options]]
    cols += [np.where(t.home[options] == hi, t.home_bytes[options], 0.0) for hi in range(len(problem.setup.homes))]
    cols.append(t.error[options] if problem.quality_budget is not None else np.zeros(len(options)))
    if problem.ttft is not None:
        cols.append(problem.ttft[l][options])
    return np.stack(cols, axis=1)


def _limits(problem: Problem, dense_fm: str) -> np.ndarray:
    """``[R]`` what the layers may put in each coupling row next to dense weights at ``dense_fm``."""
    return np.array([problem.caps[problem.device_mem] - problem.dense_total_bytes(dense_fm)]
                    + [problem.caps[h] for h in problem.setup.homes]
                    + [problem.quality_budget * problem.importance_total if problem.quality_budget is not None
                       else np.inf]
                    + ([problem.ttft_room[dense_fm]] if problem.ttft is not None else []))


def explain_infeasible(problem: Problem) -> InfeasibleError:
    """Name the binding resource, the shortfall in bytes and the smallest change that fits."""
    s = problem.setup
    dense_fm = min(problem.fixed, key=problem.dense_total_bytes)
    device_min = sum(float(t.dev_bytes.min()) for t in problem.tables) + problem.dense_total_bytes(dense_fm)
    cap_dev = problem.caps[problem.device_mem]
    if device_min > cap_dev:
        # the usable bytes are the capacity less the runtime reserve (CUDA context, allocator
        # slack): a bigger device gains only (1 - fraction) of each added byte
        frac, fixed = s.device_reserve
        total = s.hardware.memories[problem.device_mem].capacity_bytes
        needed_total = (device_min + fixed) / (1 - frac)
        short = device_min - cap_dev
        kv = problem.fixed[dense_fm].kv_bytes
        hint = (f"a shorter --context or smaller --batch (the KV cache alone takes {format_size(kv)})" if kv >= short
                else f"a device with at least {format_size(needed_total)} ({format_size(needed_total - total)} more), "
                     f"or a lower bitwidth for the dense weights")
        return InfeasibleError(
            f"{problem.device_mem} needs {format_size(device_min)} even with the fewest bytes on it (dense weights at "
            f"{dense_fm}, KV cache, no resident experts) but has {format_size(cap_dev)} usable of "
            f"{format_size(total)} (the runtime keeps {frac:.0%} + {format_size(fixed)} free); {format_size(short)} "
            f"short; smallest change: {hint}")
    homes_cap = sum(problem.caps[h] for h in s.homes)
    need = sum(float(t.home_bytes.min()) for t in problem.tables) - (cap_dev - device_min)
    if need > homes_cap:
        short = need - homes_cap
        lowest = min(s.formats, key=s.expert_bytes)
        nvme = "" if len(s.homes) > 1 else ", an NVMe drive in the profile"
        return InfeasibleError(
            f"the experts do not fit: at {lowest} the offloaded experts need {format_size(need)} beyond the GPU and "
            f"host memory{' and NVMe' if len(s.homes) > 1 else ''} offer {format_size(homes_cap)} "
            f"({format_size(short)} short); smallest change: {format_size(short)} more DRAM{nvme}, "
            f"or a lower bitwidth (--formats bf16,int8,int4,int3)")
    if problem.ttft_options is not None:
        fastest = sum(float(min(o.min() for o in (opts[l] for opts in problem.ttft_options.values())))
                      for l in range(len(problem.tables)))
        room = max(problem.ttft_room.values())
        if room <= 0:
            return InfeasibleError(
                f"no placement prefills a prompt within the TTFT SLO: the dense part alone takes {-room * 1e3:.4g} ms "
                "more than the SLO; smallest change: raise --slo-ttft or shorten --prompt-tokens")
        if fastest > room:
            return InfeasibleError(
                f"no placement prefills a prompt within the TTFT SLO: the MoE layers alone take at least "
                f"{fastest * 1e3:.4g} ms of the {room * 1e3:.4g} ms the dense part leaves; smallest change: raise "
                "--slo-ttft or shorten --prompt-tokens")
        return InfeasibleError(
            "no placement prefills a prompt within the TTFT SLO and fits memory"
            + (" and the quality budget" if problem.quality_budget is not None else "")
            + f" (the fastest options alone would take {fastest * 1e3:.4g} ms of {room * 1e3:.4g} ms); smallest "
            "change: raise --slo-ttft, shorten --prompt-tokens, or add GPU memory")
    if problem.quality_budget is not None:
        return InfeasibleError(
            f"no placement meets --quality-budget {problem.quality_budget:g} within memory; smallest change: raise "
            f"the budget (uniform int4 costs {s.uniform_error('int4') if 'int4' in s.quant_error else 0:g}) or add "
            "memory for wider formats")
    return InfeasibleError("no placement satisfies every constraint; run with --debug to see the model")
