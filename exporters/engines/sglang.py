"""SGLang: an expert-parallel Plan as ``--init-expert-location`` JSON plus the launch flags.

Shape legend: L = decoder layers (``num_hidden_layers``, dense ones included), L_moe = MoE
layers, E = routed experts, R = physical experts (E + redundant), G = EP ranks, S = R / G.

The file holds ``physical_to_logical_map`` ``[L, R]`` (REFERENCE.md, "Engine formats"): EP
rank ``r`` owns physical slots ``[r*S, (r+1)*S)``. Rows of dense layers (DeepSeek-V3's first
three) hold the trivial map ``s % E``; SGLang reads them but routes no tokens there.

A plan maps to ranks by its own rule (planner/cluster/): EP rank r is the r-th GPU in
natural order of its memory id (``node2/gpu1`` before ``node10/gpu0``); a GPU's slots hold
its experts in ascending id order.

    export = write_sglang(plan, "engines/")
    print(export.command)
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from planner.plan import Plan
from profiles.errors import InputError

__all__ = ["FILE_NAME", "EngineExport", "EpLayout", "ep_layout", "main", "physical_to_logical", "shown_path", "write_sglang"]

FILE_NAME = "sglang_expert_location.json"


@dataclass(frozen=True, eq=False)
class EpLayout:
    """The physical expert layout an expert-parallel plan describes.

    Attributes:
        ranks: ``[G]`` GPU memory ids, EP rank order.
        phy2log: ``[L_moe, R]`` logical expert of every physical slot.
        hidden_layers: ``[L_moe]`` decoder-layer index of every MoE layer.
        num_experts: E.
    """

    ranks: tuple[str, ...]
    phy2log: np.ndarray
    hidden_layers: tuple[int, ...]
    num_experts: int

    @property
    def slots_per_rank(self) -> int:
        return self.phy2log.shape[1] // len(self.ranks)

    @property
    def num_redundant(self) -> int:
        return self.phy2log.shape[1] - self.num_experts

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.split("/")[0] for r in self.ranks))


@dataclass(frozen=True)
class EngineExport:
    """What a writer produced: the files and the command line that uses them."""

    engine: str
    files: tuple[Path, ...]
    command: str
    notes: tuple[str, ...] = ()


def _natural_key(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def is_expert_parallel(plan: Plan) -> bool:
    """Whether ``plan`` spreads experts over GPUs: resident experts in several memories, or replicas.
    A pipeline plan (``Plan.layer_devices``: each layer whole on one GPU) is not one."""
    if plan.layer_devices is not None:
        return False
    homes = {h for lp in plan.layers for h, site in zip(lp.home, lp.site) if site == "resident"}
    return any(any(lp.replicas) for lp in plan.layers) or len(homes) > 1


def _shares_text(shares: dict[str, float]) -> str:
    return ", ".join(f"{g} {v:.3f}" for g, v in shares.items())


def ep_layout(plan: Plan) -> EpLayout:
    """Read the EP layout out of ``plan`` (homes and replicas on GPUs, site ``resident``).

    Raises:
        InputError: the plan is not an expert-parallel one (experts off GPU, or GPUs with
            different slot counts, or two copies of one expert on one GPU, or unequal attention
            shares: SGLang, vLLM and ExFlow give every data-parallel rank the same share).
    """
    if plan.attention_shares is not None:
        raise InputError("every GPU must run attention for the same share of the sequences (SGLang and vLLM have "
                         "no per-rank share; a router in front of the DP ranks would have to send them)",
                         key="attention_shares", value=_shares_text(plan.attention_shares), expected="absent (equal)",
                         fix="plan with planner optimize --parallel ep --ranks even")
    if not plan.layers:
        raise InputError("the plan has no MoE layers", key="layers", fix="regenerate it with planner optimize")
    E = len(plan.layers[0].home)
    gpus: set[str] = set()
    for layer in plan.layers:
        if len(layer.home) != E:
            raise InputError("MoE layers list different numbers of experts", key=f"layers[{layer.moe_layer}].home",
                             value=len(layer.home), expected=str(E), fix="regenerate the plan")
        for e, site in enumerate(layer.site):
            if site != "resident":
                raise InputError("an expert-parallel engine needs every expert resident on a GPU",
                                 key=f"layers[{layer.moe_layer}].site[{e}]", value=site, expected="resident",
                                 fix="this config cannot offload experts (an EP plan with offload is "
                                     "simulated, not exported here): plan on more GPUs, or --parallel pipeline")
        gpus.update(layer.home)
        for reps in layer.replicas:
            gpus.update(reps)
    not_gpu = sorted(g for g in gpus if plan.memory.get(g) is None)
    if not_gpu:
        raise InputError("expert homes must be GPU memories listed in the plan's memory table", key="memory",
                         value=not_gpu[0], fix="plan with planner optimize --parallel ep")
    ranks = tuple(sorted(gpus, key=_natural_key))
    rank_of = {g: r for r, g in enumerate(ranks)}
    rows = []
    slots = None
    for layer in plan.layers:
        held: list[list[int]] = [[] for _ in ranks]
        for e, home in enumerate(layer.home):
            reps = layer.replicas[e] if layer.replicas else ()
            for g in (home, *reps):
                held[rank_of[g]].append(e)
        for r, experts in enumerate(held):
            if len(set(experts)) != len(experts):
                raise InputError("a GPU holds two copies of one expert", key=f"layers[{layer.moe_layer}]",
                                 value=ranks[r], fix="regenerate the plan")
        counts = {len(h) for h in held}
        if len(counts) != 1 or (slots is not None and counts != {slots}):
            raise InputError("every GPU must hold the same number of physical experts in every layer",
                             key=f"layers[{layer.moe_layer}]", value=sorted(counts),
                             expected=f"{slots or 'one count'} per GPU",
                             fix="plan with planner optimize --parallel ep --ranks even")
        slots = counts.pop()
        rows.append([e for h in held for e in sorted(h)])
    return EpLayout(ranks=ranks, phy2log=np.array(rows, np.int64),
                    hidden_layers=tuple(layer.hidden_layer for layer in plan.layers), num_experts=E)


def physical_to_logical(layout: EpLayout, num_hidden_layers: int) -> np.ndarray:
    """``[L, R]`` SGLang's map: MoE rows from the plan, dense rows trivial (``s % E``)."""
    _L_moe, R = layout.phy2log.shape
    if num_hidden_layers <= max(layout.hidden_layers):
        raise InputError("num_hidden_layers must cover every MoE layer", key="num_hidden_layers",
                         value=num_hidden_layers, expected=f"> {max(layout.hidden_layers)}",
                         fix="pass the model's config num_hidden_layers")
    out = np.broadcast_to(np.arange(R) % layout.num_experts, (num_hidden_layers, R)).copy()
    out[list(layout.hidden_layers)] = layout.phy2log
    return out


def _validate(p2l: np.ndarray, num_experts: int, ep_size: int) -> None:
    """SGLang's shape rules for ``physical_to_logical_map``."""
    L, R = p2l.shape
    if R % ep_size:
        raise InputError("num_physical_experts must divide by ep_size", key="physical_to_logical_map",
                         value=R, expected=f"a multiple of {ep_size}", fix="change the redundant expert count")
    if R < num_experts or p2l.min() < 0 or p2l.max() >= num_experts:
        raise InputError("physical_to_logical_map holds an id outside the routed experts", key="physical_to_logical_map",
                         value=(int(p2l.min()), int(p2l.max())), expected=f"ids in [0, {num_experts})")
    for layer in range(L):
        if len(np.unique(p2l[layer])) != num_experts:
            raise InputError("every logical expert needs at least one physical slot",
                             key=f"physical_to_logical_map[{layer}]", fix="regenerate the plan")


def _hf_repo(model: str) -> str:
    """The bundled preset's Hugging Face repository (``hf_repo``), or ``""``."""
    from profiles.models import bundled_models
    from profiles.yamlio import load_yaml

    path = bundled_models().get(model)
    if path is None:
        return ""
    data, _ = load_yaml(path)
    return str(data.get("hf_repo", "")) if isinstance(data, dict) else ""


def _model_facts(plan: Plan, num_hidden_layers: int | None, model_path: str | None) -> tuple[int, str]:
    spec = None
    if num_hidden_layers is None:
        from profiles.models import load_model

        try:
            spec = load_model(plan.inputs.model)
        except InputError:
            spec = None
    if num_hidden_layers is None:
        if spec is None:
            raise InputError("the plan's model is not a bundled preset, so its layer count is unknown",
                             value=plan.inputs.model, fix="pass num_hidden_layers (config.json num_hidden_layers)")
        num_hidden_layers = spec.num_hidden_layers
    if model_path is None:
        model_path = _hf_repo(plan.inputs.model) or "MODEL_DIR"
    return num_hidden_layers, model_path


def shown_path(file: Path, out_dir: str | Path, refer_dir: str | Path | None) -> str:
    """``file`` (written under ``out_dir``) as the command names it: under ``refer_dir`` when
    given (a bundle is written in a staging directory and moved to ``refer_dir``'s parent)."""
    return str(file if refer_dir is None else Path(refer_dir) / file.relative_to(out_dir))


def write_sglang(plan: Plan, out_dir: str | Path, *, num_hidden_layers: int | None = None,
                 model_path: str | None = None, refer_dir: str | Path | None = None) -> EngineExport:
    """Write ``sglang_expert_location.json`` and return the launch command.

    Args:
        plan: an expert-parallel plan (``planner optimize --parallel ep``).
        out_dir: directory to write into (created).
        num_hidden_layers: the model's decoder layers; default: from the plan's model preset.
        model_path: ``--model-path``; default: the preset's Hugging Face repository.
        refer_dir: where ``out_dir`` will be when the command runs (default: ``out_dir``);
            the command names the file there.
    """
    layout = ep_layout(plan)
    L, path = _model_facts(plan, num_hidden_layers, model_path)
    p2l = physical_to_logical(layout, L)
    G = len(layout.ranks)
    _validate(p2l, layout.num_experts, G)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    file = out / FILE_NAME
    file.write_text(json.dumps({"physical_to_logical_map": p2l.tolist()}, separators=(",", ":")) + "\n")
    nodes = layout.nodes
    args = ["python", "-m", "sglang.launch_server", "--model-path", path, "--trust-remote-code",
            "--tp", str(G), "--ep-size", str(G), "--ep-num-redundant-experts", str(layout.num_redundant),
            "--init-expert-location", shown_path(file, out, refer_dir), "--ep-dispatch-algorithm", "static"]
    if len(nodes) > 1:
        args += ["--nnodes", str(len(nodes)), "--node-rank", "NODE_RANK", "--dist-init-addr", "HEAD_IP:5000"]
    command = shlex.join(args).replace("NODE_RANK", "$NODE_RANK").replace("HEAD_IP", "$HEAD_IP")
    notes = (f"{G} EP ranks x {layout.slots_per_rank} slots; rank order: {layout.ranks[0]} .. {layout.ranks[-1]}",
             "SGLang releases before --ep-size took --enable-ep-moe (EP size = --tp) instead")
    if len(nodes) > 1:
        notes += (f"run once per node with NODE_RANK = 0..{len(nodes) - 1} in the order {', '.join(nodes)}",)
    return EngineExport(engine="sglang", files=(file,), command=command, notes=notes)


def main(writer, argv: list[str]) -> int:
    """``python -m exporters.engines.<engine> PLAN_JSON OUT_DIR``: write, print the files and
    the command; a bad plan is one line on stderr and exit status 1."""
    import sys

    from planner.plan import load_plan
    from profiles.errors import UserError

    if len(argv) != 2:
        print("usage: python -m exporters.engines.<engine> PLAN_JSON OUT_DIR", file=sys.stderr)
        return 2
    try:
        result = writer(load_plan(argv[0]), argv[1])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for file in result.files:
        print(f"wrote {file}")
    print(result.command)
    for note in result.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(write_sglang, sys.argv[1:]))
