"""The plan's compute devices on this machine, and hidden states hopping between them.

A plan names devices by their hardware-profile ids (``node/gpu0``); a multi-GPU pipeline plan
(``layer_devices``) runs each MoE layer's dense part, resident experts, cache and fetches on
its own GPU, and ``compute_device`` runs the embedding and the head. :func:`resolve_devices`
maps each plan device to a torch device:

1. the bundle's ``devices.json`` (written by ``planner export``: each GPU of the node to
   ``cuda:N`` in the hardware profile's order, a CPU to ``cpu``); without one, a one-device
   plan gets CUDA when there is one and the plan's device is not a CPU, and a multi-device
   plan ``cuda:0``, ``cuda:1``... in the order the plan first names its devices;
2. where no CUDA device exists every plan device falls back to the CPU (noted in the
   metrics), as a one-device plan always did;
3. ``--device D`` maps every plan device to ``D``; ``--device-map gpu0=cpu,gpu1=cuda:0``
   (``MOE_DEVICE_MAP`` when no flag is given) maps the devices it names, by full id or by the
   id's last part when that is unique.

Several plan devices may map to one torch device (the tests run a two-GPU plan on one CPU):
the runtime keeps its accounting per *plan* device whatever the mapping.

:func:`place_layers` moves each decoder layer to its device; hooks move the tensors a layer
is called with to its device and count a hop (hidden states from one plan device to
another) whenever consecutive layers run on different plan devices, and one back to
``compute_device`` for the final norm and the head. With CUDA the hop is a plain
``.to(device)`` on the current stream (the activations are tiny next to the experts).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import RuntimeInputError
from .planfile import RuntimePlan

__all__ = ["DEVICE_MAP_ENV", "DEVICE_MAP_FILE", "RUNS_ON", "decoder_layers", "layer_placement", "parse_device_map",
           "place_layers", "read_device_map", "resolve_devices"]

DEVICE_MAP_FILE = "devices.json"
DEVICE_MAP_ENV = "MOE_DEVICE_MAP"
RUNS_ON = ("gpu", "cpu")  # device kinds the runtime runs layers on (an accelerator's formats it does not)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


def read_device_map(bundle: str | Path) -> dict[str, Any] | None:
    """The bundle's ``devices.json`` (``{"format_version": 1, "devices": {plan device id:
    {"torch": "cuda:1", "kind": "gpu"}}}``), or None for a bundle without one."""
    path = Path(bundle) / DEVICE_MAP_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RuntimeInputError(f"not valid JSON ({exc})", file=path, fix="re-export the bundle") from None
    devices = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(devices, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("torch"), str) and isinstance(v.get("kind"), str)
            for v in devices.values()):
        raise RuntimeInputError("not a device map", file=path, key="devices", value=devices,
                                expected='{"node/gpu0": {"torch": "cuda:0", "kind": "gpu"}, ...}',
                                fix="re-export the bundle")
    return data


def parse_device_map(text: str | None, devices: tuple[str, ...], *, key: str = "--device-map") -> dict[str, str]:
    """``"gpu0=cpu,node/gpu1=cuda:0"`` -> ``{plan device id: torch device text}``."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, target = (part.strip() for part in item.partition("="))
        matches = [d for d in devices if d == name] or [d for d in devices if d.rsplit("/", 1)[-1] == name]
        if not sep or not target or len(matches) != 1:
            raise RuntimeInputError("not a plan device mapped to a torch device", key=key, value=item.strip(),
                                    expected=f"DEVICE=TORCH_DEVICE with DEVICE one of {', '.join(devices)}",
                                    fix=f"e.g. {key}{'=' if key == DEVICE_MAP_ENV else ' '}"
                                        f"{','.join(d.rsplit('/', 1)[-1] + '=cpu' for d in devices)}")
        out[matches[0]] = target
    return out


def _torch_device(text: Any, key: str):
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError):
        raise RuntimeInputError("not a torch device", key=key, value=text, expected="cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise RuntimeInputError("the runtime runs on the CPU or CUDA only", key=key, value=text,
                                expected="cpu or cuda[:N]")
    return dev


def resolve_devices(plan: RuntimePlan, *, device: Any = None, device_map: str | Mapping[str, str] | None = None,
                    bundle_map: Mapping[str, Any] | None = None, notes: list[str] | None = None) -> dict:
    """Plan device id -> torch device for every compute device of ``plan`` (see the module
    docstring); refuses, in one line, a map that misses a plan device, names a device kind the
    runtime does not run, or a CUDA device this machine does not have."""
    import torch

    devices = plan.devices
    notes = notes if notes is not None else []
    entries = dict((bundle_map or {}).get("devices", {}))
    for d in devices if plan.layer_devices else ():
        kind = entries.get(d, {}).get("kind", "gpu") if isinstance(entries.get(d), dict) else "gpu"
        if kind not in RUNS_ON:
            raise RuntimeInputError(f"the bundle runtime does not run layers on a {kind}", file=DEVICE_MAP_FILE,
                                    key=f"devices[{d!r}].kind", value=kind, expected=" | ".join(RUNS_ON),
                                    fix="re-plan for the GPUs (`planner optimize --engine bundle`)")
    if device not in (None, "auto"):
        chosen = {d: _torch_device(device, "--device") for d in devices}
    elif entries:
        missing = [d for d in devices if not isinstance(entries.get(d), dict) or "torch" not in entries[d]]
        if missing:
            raise RuntimeInputError("the bundle's device map does not name every device of its plan",
                                    file=DEVICE_MAP_FILE, key="devices", value=missing,
                                    fix="re-export the bundle, or pass --device-map")
        chosen = {d: _torch_device(entries[d]["torch"], f"{DEVICE_MAP_FILE}: devices[{d!r}]") for d in devices}
    elif len(devices) == 1:
        cpu_plan = devices[0].rsplit("/", 1)[-1].startswith("cpu")
        chosen = {devices[0]: torch.device("cuda" if torch.cuda.is_available() and not cpu_plan else "cpu")}
    else:
        chosen = {d: torch.device(f"cuda:{i}") for i, d in enumerate(devices)}
    text = device_map if device_map is not None else os.environ.get(DEVICE_MAP_ENV)
    overrides = dict(text) if isinstance(text, Mapping) else parse_device_map(
        text, devices, key="--device-map" if device_map is not None else DEVICE_MAP_ENV)
    explicit = device not in (None, "auto")
    if not explicit and not torch.cuda.is_available() and any(
            dev.type == "cuda" for d, dev in chosen.items() if d not in overrides):
        if len(devices) > 1:
            notes.append("no CUDA device: every plan device ran on the CPU")
        chosen = {d: torch.device("cpu") for d in chosen}
    for d, target in overrides.items():
        chosen[d] = _torch_device(target, f"--device-map {d}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for d, dev in chosen.items():
        if dev.type == "cuda" and (count == 0 or (dev.index or 0) >= count):
            raise RuntimeInputError(f"plan device {d} maps to {dev}, which this machine does not have",
                                    key="--device-map", value=str(dev), expected=f"cpu or one of {count} CUDA devices",
                                    fix=f"pass --device-map {d.rsplit('/', 1)[-1]}=cpu (or a CUDA device it has)")
    return chosen


def decoder_layers(model) -> dict[int, Any]:
    """hidden layer index -> decoder layer module (``model.layers.N``)."""
    found = {}
    for name, module in model.named_modules():
        m = _LAYER.search(name)
        if m is not None:
            found.setdefault(int(m.group(1)), module)
    return found


def _to(obj, device):
    import torch

    if isinstance(obj, torch.Tensor):
        # non_blocking from pinned memory or between GPUs; a copy to the CPU must be complete
        return obj.to(device, non_blocking=device.type == "cuda") if obj.device != device else obj
    if isinstance(obj, tuple):
        return tuple(_to(x, device) for x in obj)
    if isinstance(obj, list):
        return [_to(x, device) for x in obj]
    return obj


def _nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class _Hops:
    """Which plan device holds the hidden states; counts each move to another one."""

    def __init__(self, plan: RuntimePlan, torch_devices: dict, metrics) -> None:
        self.plan, self.torch_devices, self.metrics = plan, torch_devices, metrics
        self.at = plan.compute_device

    def hook(self, name: str):
        """A forward pre-hook that brings a module's tensor arguments to device ``name``."""
        device = self.torch_devices[name]

        def pre(module, args, kwargs):
            if name != self.at:
                hidden = args[0] if args else kwargs.get("hidden_states")
                nbytes = hidden.numel() * hidden.element_size() if hidden is not None else 0
                self.metrics.hop(self.at, name, nbytes)
                self.at = name
            return _to(args, device), {k: _to(v, device) for k, v in kwargs.items()}
        return pre

    def start(self, module, args, kwargs):
        self.at = self.plan.compute_device  # the embedding runs there
        return None


def layer_placement(plan: RuntimePlan, hidden_layers) -> dict[int, str]:
    """hidden layer index -> the plan device that runs that decoder layer: an MoE layer's own;
    a decoder layer without routed experts (DeepSeek's first dense layers) runs on the device
    of the MoE layer before it, or on ``compute_device`` before the first."""
    by_hidden = {layer.hidden_layer: plan.device_of(i) for i, layer in enumerate(plan.layers)}
    placed, current = {}, plan.compute_device
    for index in sorted(hidden_layers):
        current = by_hidden.get(index, current)
        placed[index] = current
    return placed


def _move_rest(model, layers: dict[int, Any], device) -> None:
    """Move what is outside the decoder layers (embedding, final norm, head, rotary tables) to
    ``device``, leaving the layers where they are (``model.to`` would move them too, and hold
    every layer's dense weights on one GPU on the way)."""
    inside = {id(t) for m in layers.values() for t in (*m.parameters(), *m.buffers())}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in inside and p.device != device:
                p.data = p.data.to(device)  # a tied parameter is one object: moved once
        for key, b in list(module._buffers.items()):
            if b is not None and id(b) not in inside and b.device != device:
                module._buffers[key] = b.to(device)


def place_layers(model, plan: RuntimePlan, torch_devices: dict, metrics) -> dict[int, str]:
    """Move ``model`` (on the CPU) to the plan's devices: every decoder layer to its plan
    device (:func:`layer_placement`), the rest to ``compute_device``'s; hook the hops and
    record each plan device's dense bytes. Returns hidden layer index -> plan device."""
    layers = decoder_layers(model)
    placed = layer_placement(plan, layers)
    total = _nbytes(model)
    on_layers = {d: 0 for d in plan.devices}
    multi = len(plan.devices) > 1
    hops = _Hops(plan, torch_devices, metrics)
    for index, module in layers.items():
        name = placed[index]
        on_layers[name] += _nbytes(module)
        if multi:
            module.to(torch_devices[name])
            module.register_forward_pre_hook(hops.hook(name), with_kwargs=True)
    if not multi:
        model.to(torch_devices[plan.compute_device])
    else:
        _move_rest(model, layers, torch_devices[plan.compute_device])
        model.register_forward_pre_hook(hops.start, with_kwargs=True)
        head = model.get_output_embeddings()
        inner = getattr(model, "model", None)
        for module in (getattr(inner, "norm", None), head):
            if module is not None:
                module.register_forward_pre_hook(hops.hook(plan.compute_device), with_kwargs=True)
    for name, nbytes in on_layers.items():
        # the embedding, final norm and head (everything outside the decoder layers) on compute_device
        metrics.dense(name, nbytes + (total - sum(on_layers.values()) if name == plan.compute_device else 0))
    return placed
