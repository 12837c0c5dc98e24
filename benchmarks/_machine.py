"""This machine as a hardware profile, with its host memory cut to a budget."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from profiles.hardware import load_profile
from profiles.probe import QUICK, probe, render_profile_yaml


def probed_profile(work: Path, host_memory: str, file_name: str = "probed.yaml"):
    """Probe this machine (``--quick``), set the CPU's memory to ``host_memory`` ("640MiB"),
    write the profile to ``work / file_name``; returns ``(path, profile, hardware, probe_s)``."""
    t = time.perf_counter()
    doc = yaml.safe_load(render_profile_yaml(probe(work, QUICK), "this-machine"))
    probe_s = time.perf_counter() - t
    for node in doc["nodes"]:
        for dev in node["devices"]:
            if dev["kind"] == "cpu":
                dev["memory_bytes"] = host_memory
    path = work / file_name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    profile, hw = load_profile(path)
    return path, profile, hw, probe_s
