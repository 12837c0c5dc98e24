#!/usr/bin/env bash
# Inspect hardware and models before planning: what is in the box, what the model needs,
# and which number formats fit which memory.
# Run from anywhere: bash examples/inspect_hardware_and_models/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# 1. The bundled hardware: desktops, workstations, servers, clusters, edge boards, an FPGA card.
planner profiles list

# 2. One profile in detail: devices, links (per direction) and the route from NVMe and DRAM
#    to the GPU with its bottleneck. On a 4090 desktop NVMe (3 GB/s) and PCIe 4.0 (25 GB/s)
#    bound every expert fetch.
planner profiles show desktop-4090

# 3. Describe your own machine: start from a bundled profile, edit, validate.
planner profiles show desktop-4090 --yaml | sed 's/memory_bytes: 64GiB/memory_bytes: 128GiB/' > "$work/my-desktop.yaml"
planner profiles validate "$work/my-desktop.yaml"

# 4. A mistake in a profile gives one line: file:line, key path, value, what was expected, a fix.
sed 's/memory_bytes: 128GiB/memory_bytes: 128 GiBs/' "$work/my-desktop.yaml" > "$work/broken.yaml"
planner profiles validate "$work/broken.yaml" || echo "(exit code $? for bad input, as documented)"

# 5. The bundled models, and one in detail against the hardware: bytes per format, KV cache
#    per token, and whether the weights fit each memory pool.
planner models list
planner models show mixtral-8x7b --hardware "$work/my-desktop.yaml"

# 6. An HF config.json works the same way as a preset (here: DeepSeek-V3's published shape,
#    MLA KV cache, dense first layers, shared expert, expert groups).
planner models show deepseek-v3 --hardware cpu-server-4090 --context 8192

# 7. Everything prints JSON for scripts: only JSON on stdout.
planner --json models show olmoe-1b-7b | python3 -c "import json,sys; d=json.load(sys.stdin); print('olmoe total params:', d['total_params'])"
