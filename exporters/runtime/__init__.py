"""The moe-planner runtime: run an HF MoE checkpoint exactly as a plan places its experts.

Copied into every deployment bundle (``runtime/``), so it imports only the standard library,
numpy, torch, transformers, safetensors, onnx and onnxruntime, never the planner.

    from runtime import load_planned_model, build_kernels
    build_kernels("plan.json", "ckpt/", "kernels/")            # export time (planner export)
    rt = load_planned_model("plan.json", "ckpt/", kernels_dir="kernels/")
    ids = rt.generate(prompt_ids, max_new_tokens=32)
    rt.metrics.to_json("metrics.json")

``python run.py --bundle DIR --checkpoint CKPT --prompt "..."`` does the same from the shell.
A multi-GPU pipeline plan runs each MoE layer on its own GPU (devices.py: the bundle's
``devices.json``, ``device_map=`` / ``--device-map`` to remap, e.g. every GPU to the CPU).

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set) before torch loads: on a
CPU, torch's OpenMP workers otherwise spin after every op while ONNX Runtime's pools and the
next op want the same cores (up to 30x slower decode steps on a busy 2-core machine; threads
that sleep cost a few microseconds to wake). It only takes effect if torch was not imported
before this package.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cache import POLICIES, ExpertCache, register_policy
from .checkpoint import read_config
from .devices import read_device_map, resolve_devices
from .errors import RuntimeInputError
from .kernels import build_kernels
from .metrics import MetricsRecorder
from .planfile import LayerSpec, RuntimePlan, parse_plan, read_plan
from .runtime import PlannedRuntime, load_planned_model, load_routing, verify_bundle
from .store import PlannedExperts
from .templates import expert_template

__all__ = [
           "POLICIES",
           "ExpertCache",
           "LayerSpec",
           "MetricsRecorder",
           "PlannedExperts",
           "PlannedRuntime",
           "RuntimeInputError",
           "RuntimePlan",
           "build_kernels",
           "expert_template",
           "load_planned_model",
           "load_routing",
           "parse_plan",
           "read_config",
           "read_device_map",
           "read_plan",
           "register_policy",
           "resolve_devices",
           "verify_bundle",
]
