"""The one energy model the planner and the simulator share.

A device draws its idle power for the whole elapsed time and its active power
(``power_w``, the board power / TDP of its profile) while it is busy:

    E = sum_d [ busy_d (P_d - I_d) + I_d T ]            joules over an elapsed time T

with ``busy_d`` the seconds device d computes (its stream's busy time in the simulator, the
expected busy seconds of the plan's options in the planner), ``P_d`` its ``power_w`` and
``I_d`` its ``idle_power_w`` (0 when unstated: then E is busy x active power alone, the
simulator's figure before idle power was stated). A device with no ``power_w`` counts 0 W.
Data movement over PCIe and DRAM costs some 10-100 pJ per byte, at most ~0.1 J per GB moved;
against hundreds of watts of busy or idle devices it is below the model's precision and not
counted.

E is linear in the busy times and in T, so a plan's energy per step is linear in its option
choices (planner.energy), and ``E <= W T`` (average power at most W watts) is a linear
constraint where ``E / T <= W`` is not.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .hardware import Hardware

__all__ = ["active_w", "idle_w", "energy_j"]


def active_w(hw: Hardware, device_id: str) -> float:
    """Watts a busy second of ``device_id`` adds to its idle draw (``power_w - idle_power_w``)."""
    d = hw.devices[device_id]
    return (d.power_w or 0.0) - (d.idle_power_w or 0.0)


def idle_w(hw: Hardware, device_ids: Iterable[str]) -> float:
    """Watts ``device_ids`` (each counted once) draw while idle."""
    return sum(hw.devices[d].idle_power_w or 0.0 for d in set(device_ids))


def energy_j(hw: Hardware, busy_s: Mapping[str, float], elapsed_s: float, devices: Iterable[str] = ()) -> float:
    """Joules ``hw`` spends over ``elapsed_s`` seconds in which device ``d`` is busy ``busy_s[d]``
    seconds; idle power is drawn by every device of ``busy_s`` and ``devices`` for all of it."""
    busy = sum(b * active_w(hw, d) for d, b in busy_s.items() if d in hw.devices)
    return busy + idle_w(hw, [d for d in (*busy_s, *devices) if d in hw.devices]) * elapsed_s
