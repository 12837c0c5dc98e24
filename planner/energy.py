"""Energy-aware planning: ``--objective energy`` and ``--max-watts`` as linear ILP terms.

The energy model is :mod:`profiles.energy`'s (the simulator's): over one decode step of T
seconds the compute device c is busy ``G + dense_s`` seconds and the host CPU h ``U``
seconds (planner.costs: expected busy seconds of each option), and every device idles along:

    E_step = sum_l [G_lw dP_c + U_lw dP_h + I tau_lw] + dense_s (dP_c + I)
    dP_d = power_w(d) - idle_power_w(d),   I = idle_power_w(c) + idle_power_w(h),   T = sum_l tau_lw + dense_s

Each term is one option's or one dense format's, so ``E_step = sum_lw x_lw e_lw + sum_d y_d
e_d`` is linear in the ILP's variables: ``--objective energy`` minimises it in place of
seconds (:func:`energy_problem`). Average power ``E_step / T`` is a ratio of two linear
functions, not linear; but ``E_step / T <= W`` is ``E_step - W T <= 0`` for T > 0, which is
linear: ``sum_lw x_lw (e_lw - W tau_lw) + sum_d y_d (e_d - W dense_s_d) <= 0``
(:func:`with_power_cap`). That row rides in the slot a TTFT SLO uses (one extra coupling
row with a per-dense-format limit), shifted per layer so that its coefficients are >= 0.
Joules per token are ``E_step / B``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from profiles.energy import active_w, idle_w
from profiles.errors import InputError

from .ilp_model import Problem
from .setup import OptionTable, Setup
from .step_costs import FixedCosts, option_time

__all__ = ["option_energy_j", "dense_energy_j", "step_energy_j", "energy_problem", "with_power_cap", "check_power"]


def _watts(s: Setup) -> tuple[float, float, float]:
    """``(dP_c, dP_h, I)``: the compute device's and the host CPU's active watts over idle, and
    the idle watts of both."""
    hw = s.hardware
    return active_w(hw, s.compute.id), active_w(hw, s.host.id), idle_w(hw, (s.compute.id, s.host.id))


def check_power(s: Setup, what: str) -> None:
    """Refuse an energy objective or cap on hardware whose compute device or host CPU states no
    power (a device without one would count as free, and the plan would move work onto it)."""
    for d in (s.compute, s.host):
        if d.power_w is None:
            raise InputError(f"{what} needs the power of every device the plan runs on", key=f"{d.id}.power_w",
                             value=s.hardware.name, expected="power_w (and idle_power_w) in the hardware profile",
                             fix=f"add power_w (board power / TDP, e.g. 170W) and idle_power_w to {d.id}")


def option_energy_j(s: Setup, t: OptionTable, prefetch: bool) -> np.ndarray:
    """``[N]`` joules each option of a layer adds to one decode step (module docstring)."""
    dp_c, dp_h, idle = _watts(s)
    if s.host.id == s.compute.id:  # a CPU-only plan: G and U are the one CPU's
        dp_h = dp_c
    return t.G * dp_c + t.U * dp_h + idle * option_time(t, prefetch)


def dense_energy_j(s: Setup, fc: FixedCosts) -> float:
    """Joules of one step's dense work (compute device busy, every device idling along)."""
    dp_c, _, idle = _watts(s)
    return fc.dense_s * (dp_c + idle)


def step_energy_j(problem: Problem, choice: tuple[int, ...], dense_fm: str, prefetch: bool) -> float:
    """Joules of one decode step of a plan (``choice``: option row per layer)."""
    s = problem.setup
    return float(sum(option_energy_j(s, t, prefetch)[w] for t, w in zip(problem.tables, choice))
                 + dense_energy_j(s, problem.fixed[dense_fm]))


def energy_problem(problem: Problem) -> Problem:
    """``problem`` with joules in place of seconds: each option's ``tau``/``tau_prefetch`` and each
    dense format's ``dense_s`` (the solver minimises what ``Problem.times`` gives). Rows, bytes,
    errors and the option tables' order are kept, so a solution indexes ``problem`` itself."""
    s = problem.setup
    tables = tuple(dataclasses.replace(t, tau=option_energy_j(s, t, False), tau_prefetch=option_energy_j(s, t, True))
                   for t in problem.tables)
    fixed = {fm: dataclasses.replace(fc, dense_s=dense_energy_j(s, fc)) for fm, fc in problem.fixed.items()}
    return dataclasses.replace(problem, tables=tables, fixed=fixed)


def with_power_cap(problem: Problem, max_w: float) -> Problem:
    """``problem`` with ``E_step <= max_w T`` as its extra coupling row (module docstring).

    Per layer the row's coefficients ``e_lw - W tau_lw`` are shifted by ``k_l = max_w (W tau_lw
    - e_lw)`` (over both prefetch settings) so that they are >= 0, and the limit by ``sum_l k_l``."""
    if problem.ttft_options is not None:
        raise InputError("--max-watts and --slo-ttft cannot both bind one plan yet", key="--max-watts", value=max_w,
                         fix="drop one of them")
    s = problem.setup
    raw = {pf: [option_energy_j(s, t, pf) - max_w * option_time(t, pf) for t in problem.tables] for pf in (False, True)}
    shift = [max(0.0, -float(min(raw[False][l].min(), raw[True][l].min()))) if len(raw[False][l]) else 0.0
             for l in range(len(problem.tables))]
    rows = {pf: tuple(r + k for r, k in zip(raw[pf], shift)) for pf in raw}
    room = {fm: max_w * fc.dense_s - dense_energy_j(s, fc) + sum(shift) for fm, fc in problem.fixed.items()}
    return dataclasses.replace(problem, ttft_options=rows, ttft_room=room)
