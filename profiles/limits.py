"""Bounds on what a user file may ask of us, checked where it enters.

A bad input must end in one line, never a hang or an out-of-memory kill: every parser
bounds the size of what it reads (bytes, nesting, YAML aliases, digits, counts, array
elements) before the work grows with it. The bounds sit far above any real model, cluster
or trace (DeepSeek-V3: 61 layers x 256 experts; the ESFT trace: 16 MB of arrays) and far
below what would take minutes or gigabytes.
"""

from __future__ import annotations

__all__ = [
    "MAX_TEXT_FILE_BYTES", "MAX_NESTING", "MAX_YAML_ALIASES", "MAX_YAML_NODES", "MAX_INT_DIGITS",
    "MAX_NODE_COUNT", "MAX_DEVICE_COUNT", "MAX_CLUSTER_DEVICES", "MAX_LAYERS", "MAX_EXPERTS", "MAX_TOP_K",
    "MAX_MODEL_DIM", "MAX_TRACE_ARRAY_BYTES", "MAX_TRACE_ENTRIES", "MAX_BATCH", "MAX_CONTEXT_TOKENS",
    "MAX_SWEEP_POINTS", "MAX_SIM_REQUESTS",
]

# profile, config.json, preset, plan, engine and grid files (the largest plan, DeepSeek-V3 on
# 64 GPUs, is ~2 MB of JSON)
MAX_TEXT_FILE_BYTES = 16 << 20
# lists/mappings inside one another (a real config nests 3 deep, a plan 4)
MAX_NESTING = 64
# YAML aliases (`*name`) per file, and the nodes of the document once aliases are expanded:
# a 1 KB "billion laughs" file expands to 10^9 nodes
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 1_000_000
# digits of one integer literal (Python refuses > 4300 with a ValueError deep in the parser)
MAX_INT_DIGITS = 30

# hardware profile `count:` expansion
MAX_NODE_COUNT = 256  # nodes from one `count:`
MAX_DEVICE_COUNT = 256  # devices from one `count:`
MAX_CLUSTER_DEVICES = 4096  # devices in the whole resolved cluster (routes grow with its square)

# model shapes (config.json / presets)
MAX_LAYERS = 1024  # decoder layers
MAX_EXPERTS = 4096  # routed experts per layer
MAX_TOP_K = 256  # experts per token
MAX_MODEL_DIM = 1 << 24  # hidden, intermediate, vocab, heads, ranks: any other width

# routing traces: bytes of the arrays once unpacked, and expert ids (tokens x layers x top-k)
MAX_TRACE_ARRAY_BYTES = 320 << 20  # 64M expert ids as uint16 plus their gate weights as float16
MAX_TRACE_ENTRIES = 64 << 20

# command-line and grid values
MAX_BATCH = 1 << 20  # sequences at once
MAX_CONTEXT_TOKENS = 1 << 24  # tokens per sequence (16M)
MAX_SWEEP_POINTS = 4096  # points of one what-if grid
MAX_SIM_REQUESTS = 1 << 20  # requests one simulation replays
