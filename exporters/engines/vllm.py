"""vLLM and vLLM-Ascend: an expert-parallel Plan as the files and flags those engines take.

Shape legend: L_moe = MoE layers, E = routed experts, R = physical experts, G = EP ranks.

* Upstream vLLM cannot load a static expert map (REFERENCE.md, "Engine formats"). With
  redundant experts it needs its own balancer: ``--enable-expert-parallel --enable-eplb
  --eplb-config JSON`` (the plan's redundant expert count), and then it starts from the
  ``linear`` placement whatever ``--expert-placement-strategy`` says (vLLM falls back to
  linear whenever EPLB is on or redundant experts exist), so the writer names ``linear``.
  Without redundant experts the writer leaves EPLB off and picks the static strategy the
  planner scored better (the plan's ``predicted["linear.max_mean_load"]`` /
  ``["round-robin.max_mean_load"]``, else linear), which vLLM then keeps.
* vLLM-Ascend reads the placement itself from ``expert_map_path`` JSON:
  ``{"moe_layer_count": L_moe, "layer_list": [{"layer_id": l, "device_count": G,
  "device_list": [{"device_id": g, "device_expert": [logical ids]}]}]}`` with ``layer_id``
  the MoE layer index; the path goes under ``--additional-config``'s
  ``eplb_config.expert_map_path`` (recent versions reject unknown top-level keys).

    export = write_vllm(plan, "engines/")
    ascend = write_vllm_ascend(plan, "engines/")
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from planner.plan import Plan
from profiles.errors import InputError

from .sglang import EngineExport, _model_facts, ep_layout, main, shown_path

__all__ = ["EPLB_CONFIG_FILE", "EXPERT_MAP_FILE", "ascend_additional_config", "expert_map", "validate_expert_map",
           "write_vllm", "write_vllm_ascend"]

EPLB_CONFIG_FILE = "vllm_eplb_config.json"
EXPERT_MAP_FILE = "vllm_ascend_expert_map.json"
# vLLM's EPLB defaults: steps of load statistics kept, and steps between rebalances.
DEFAULT_WINDOW_SIZE = 1000
DEFAULT_STEP_INTERVAL = 3000


def _strategy(plan: Plan) -> str:
    lin = plan.predicted.get("linear.max_mean_load")
    rr = plan.predicted.get("round-robin.max_mean_load")
    if lin is not None and rr is not None and rr < lin:
        return "round_robin"
    return "linear"


def write_vllm(plan: Plan, out_dir: str | Path, *, model_path: str | None = None,
               window_size: int = DEFAULT_WINDOW_SIZE, step_interval: int = DEFAULT_STEP_INTERVAL,
               refer_dir: str | Path | None = None) -> EngineExport:
    """Write ``vllm_eplb_config.json`` (plans with redundant experts) and return the
    ``vllm serve`` command.

    Args:
        plan: an expert-parallel plan.
        out_dir: directory to write into (created).
        model_path: the model to serve; default: the preset's Hugging Face repository.
        window_size, step_interval: vLLM EPLB's statistics window and rebalance interval, steps.
        refer_dir: where ``out_dir`` will be when the command runs (unused: the command
            carries the EPLB config inline); accepted for a uniform writer signature.
    """
    layout = ep_layout(plan)
    _, path = _model_facts(plan, 0, model_path)
    G = len(layout.ranks)
    R = layout.phy2log.shape[1]
    if R % G:
        raise InputError("vLLM needs the physical experts to divide over the EP ranks", key="replicas",
                         value=R, expected=f"a multiple of {G}", fix="change the redundant expert count")
    for key, value in (("window_size", window_size), ("step_interval", step_interval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError("must be a positive integer", key=key, value=value)
    nodes = layout.nodes
    per_node = G // len(nodes)
    args = ["vllm", "serve", path, "--trust-remote-code", "--data-parallel-size", str(G), "--enable-expert-parallel"]
    files: tuple[Path, ...] = ()
    if layout.num_redundant:
        # redundant experts need vLLM's EPLB, and with EPLB vLLM always starts from linear
        config = {"window_size": window_size, "step_interval": step_interval,
                  "num_redundant_experts": layout.num_redundant}
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        file = out / EPLB_CONFIG_FILE
        file.write_text(json.dumps(config, sort_keys=True) + "\n")
        files = (file,)
        args += ["--enable-eplb", "--eplb-config", json.dumps(config, sort_keys=True),
                 "--expert-placement-strategy", "linear"]
        notes = ((f"vLLM starts from its linear placement (it ignores round_robin when EPLB is on or experts are "
                  f"redundant) and then rebalances with its own EPLB every {step_interval} steps, with the plan's "
                  f"{layout.num_redundant} redundant experts but not its layout; the plan's exact layout needs "
                  "SGLang or vLLM-Ascend"),)
    else:
        strategy = _strategy(plan)
        args += ["--expert-placement-strategy", strategy]
        notes = ((f"vLLM keeps its static {strategy} placement (the better of linear and round_robin by the "
                  "planner's max/mean load), not the plan's layout, which needs SGLang or vLLM-Ascend; adding "
                  "--enable-eplb makes vLLM rebalance, starting from linear"),)
    if len(nodes) > 1:
        args += ["--data-parallel-size-local", str(per_node), "--data-parallel-address", "HEAD_IP",
                 "--data-parallel-rpc-port", "13345"]
    command = shlex.join(args).replace("HEAD_IP", "$HEAD_IP")
    if len(nodes) > 1:
        notes += ((f"on the other {len(nodes) - 1} node(s) add --headless --data-parallel-start-rank "
                  f"{per_node}*NODE_INDEX"),)
    return EngineExport(engine="vllm", files=files, command=command, notes=notes)


def expert_map(plan: Plan) -> dict[str, Any]:
    """The vLLM-Ascend ``expert_map_path`` document of ``plan``."""
    layout = ep_layout(plan)
    G = len(layout.ranks)
    S = layout.slots_per_rank
    layers = []
    for l, row in enumerate(layout.phy2log.tolist()):
        devices = [{"device_id": g, "device_expert": row[g * S:(g + 1) * S]} for g in range(G)]
        layers.append({"layer_id": l, "device_count": G, "device_list": devices})
    return {"moe_layer_count": len(layers), "layer_list": layers}


def validate_expert_map(doc: dict[str, Any], num_experts: int) -> None:
    """vLLM-Ascend's shape rules: one entry per MoE layer, every device listed once with the
    same number of experts, no expert twice on a device, every expert somewhere."""
    layers = doc.get("layer_list")
    if not isinstance(layers, list) or doc.get("moe_layer_count") != len(layers):
        raise InputError("moe_layer_count must equal the number of layer_list entries", key="moe_layer_count",
                         value=doc.get("moe_layer_count"), expected=str(len(layers) if isinstance(layers, list) else 0))
    width = None
    for i, layer in enumerate(layers):
        devices = layer["device_list"]
        if layer["layer_id"] != i or layer["device_count"] != len(devices):
            raise InputError("layer_id must count up from 0 and device_count match device_list",
                             key=f"layer_list[{i}]", value=(layer["layer_id"], layer["device_count"], len(devices)))
        if [d["device_id"] for d in devices] != list(range(len(devices))):
            raise InputError("device ids must be 0..device_count-1 in order", key=f"layer_list[{i}].device_list")
        seen: set[int] = set()
        for d in devices:
            experts = d["device_expert"]
            width = len(experts) if width is None else width
            if len(experts) != width:
                raise InputError("every device must hold the same number of experts",
                                 key=f"layer_list[{i}].device_list[{d['device_id']}].device_expert",
                                 value=len(experts), expected=str(width))
            if len(set(experts)) != len(experts) or any(not 0 <= e < num_experts for e in experts):
                raise InputError("a device lists an expert twice or an id outside the routed experts",
                                 key=f"layer_list[{i}].device_list[{d['device_id']}].device_expert",
                                 expected=f"distinct ids in [0, {num_experts})")
            seen.update(experts)
        if len(seen) != num_experts:
            raise InputError("every logical expert needs a device", key=f"layer_list[{i}]",
                             value=sorted(set(range(num_experts)) - seen)[:5])


def ascend_additional_config(expert_map_path: str) -> dict[str, Any]:
    """vLLM-Ascend's ``--additional-config`` that loads an expert map: the path sits under
    ``eplb_config`` (recent versions reject unknown top-level keys)."""
    return {"eplb_config": {"expert_map_path": expert_map_path}}


def write_vllm_ascend(plan: Plan, out_dir: str | Path, *, model_path: str | None = None,
                      refer_dir: str | Path | None = None) -> EngineExport:
    """Write ``vllm_ascend_expert_map.json`` and return the ``vllm serve`` command that loads it.

    Args:
        plan: an expert-parallel plan.
        out_dir: directory to write into (created).
        model_path: the model to serve; default: the preset's Hugging Face repository.
        refer_dir: where ``out_dir`` will be when the command runs (default: ``out_dir``);
            the command names the map there.
    """
    doc = expert_map(plan)
    validate_expert_map(doc, len(plan.layers[0].home))
    _, path = _model_facts(plan, 0, model_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    file = out / EXPERT_MAP_FILE
    file.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    G = doc["layer_list"][0]["device_count"]
    extra = ascend_additional_config(shown_path(file, out, refer_dir))
    args = ["vllm", "serve", path, "--trust-remote-code", "--data-parallel-size", str(G), "--enable-expert-parallel",
            "--additional-config", json.dumps(extra, sort_keys=True)]
    return EngineExport(engine="vllm-ascend", files=(file,), command=shlex.join(args),
                        notes=("layer_id is the MoE layer index (dense layers are not listed)",))


if __name__ == "__main__":
    import sys

    sys.exit(main(write_vllm_ascend if "--ascend" in sys.argv else write_vllm,
                  [a for a in sys.argv[1:] if a != "--ascend"]))
