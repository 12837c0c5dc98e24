"""ExFlow: an expert-parallel Plan as ExFlow's placement CSV.

ExFlow (inter-layer expert affinity) places every expert of every layer on exactly one GPU,
``E / G`` experts per GPU per layer, no replicas. Its solution file is a CSV with a header
``Expert,Node`` and one row per expert: the global id ``l * E + e`` (l = MoE layer) and the
GPU (EP rank) that holds it. ExFlow turns it into ``placement/exp{E}_gpu{G}.json``
(``[layer][gpu] -> expert ids``); the writer writes that file too.

    export = write_exflow(plan, "engines/")
"""

from __future__ import annotations

import json
from pathlib import Path

from planner.plan import Plan
from profiles.errors import InputError

from .sglang import EngineExport, ep_layout, main, shown_path

__all__ = ["FILE_NAME", "exflow_rows", "write_exflow"]

FILE_NAME = "exflow_placement.csv"


def exflow_rows(plan: Plan) -> list[tuple[int, int]]:
    """``(global expert id, GPU rank)`` rows; validates ExFlow's shape rules.

    Raises:
        InputError: the plan has replicas, or a GPU does not own exactly ``E / G`` experts per layer.
    """
    layout = ep_layout(plan)
    E, G = layout.num_experts, len(layout.ranks)
    if layout.num_redundant:
        raise InputError("ExFlow places each expert exactly once; the plan has redundant experts", key="replicas",
                         value=layout.num_redundant, expected="0",
                         fix="plan with planner optimize --parallel ep --redundant-experts 0")
    if E % G:
        raise InputError("ExFlow gives every GPU the same number of experts", key="experts", value=E,
                         expected=f"a multiple of {G} GPUs", fix="use a GPU count that divides the expert count")
    S = layout.slots_per_rank
    rows = []
    for l, row in enumerate(layout.phy2log.tolist()):
        for s, e in enumerate(row):
            rows.append((l * E + e, s // S))
    return sorted(rows)


def write_exflow(plan: Plan, out_dir: str | Path, *, refer_dir: str | Path | None = None) -> EngineExport:
    """Write ``exflow_placement.csv`` and ``placement/exp{E}_gpu{G}.json``.

    Args:
        plan: an expert-parallel plan without redundant experts.
        out_dir: directory to write into (created).
        refer_dir: where ``out_dir`` will be when the command runs (default: ``out_dir``).
    """
    rows = exflow_rows(plan)
    layout = ep_layout(plan)
    E, G = layout.num_experts, len(layout.ranks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / FILE_NAME
    csv.write_text("Expert,Node\n" + "".join(f"{x},{g}\n" for x, g in rows))
    per_layer = [[[] for _ in range(G)] for _ in range(len(plan.layers))]
    for x, g in rows:
        per_layer[x // E][g].append(x % E)
    placement = out / "placement" / f"exp{E}_gpu{G}.json"
    placement.parent.mkdir(exist_ok=True)
    placement.write_text(json.dumps(per_layer, separators=(",", ":")) + "\n")
    command = (f"# ExFlow: run from {shown_path(out, out, refer_dir)} with placement "
               f"{shown_path(placement, out, refer_dir)} made from {shown_path(csv, out, refer_dir)}")
    return EngineExport(engine="exflow", files=(csv, placement), command=command,
                        notes=("ExFlow's GPU ids are EP ranks: the plan's GPUs in natural id order",))


if __name__ == "__main__":
    import sys

    sys.exit(main(write_exflow, sys.argv[1:]))
