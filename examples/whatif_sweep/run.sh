#!/usr/bin/env bash
# What-if sweeps: plan and simulate every point of a grid, then read the table and the
# cost-per-hour vs tokens/s Pareto plot. Two questions:
#   1. desktop-4090-upgrade.yaml: Mixtral-8x7B on a 4090 desktop: is a 5090, more DRAM or
#      a PCIe 5.0 platform the better upgrade? (8 points; parts amortised to $/h in the grid)
#   2. h100-cluster-sizing.yaml: DeepSeek-V3 on one 8-GPU H100 node or two, at batch 64 and
#      256 (expert-parallel plans, all-to-all simulated on NVLink/InfiniBand; on-demand $/h)
# The committed tables and plots from these grids are in results/.
# Run from anywhere: bash examples/whatif_sweep/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# --jobs 2 runs two points at once on local processes; `--ray local` (pip install
# 'moe-planner[ray]') runs them on a Ray cluster instead, with the same results.
upgrade="$here/desktop-4090-upgrade.yaml" sizing="$here/h100-cluster-sizing.yaml" again=p004
if [ -n "${MOE_PLANNER_EXAMPLE_SMALL:-}" ]; then
  # the test suite's reduced grids (same commands, fewer points): GPU and PCIe; batch 64
  sed -e '/^  dram: /d' "$upgrade" > "$work/upgrade.yaml"
  sed -e 's/^  batch: \[64, 256\]/  batch: [64]/' -e 's/^  requests: 256/  requests: 64/' "$sizing" > "$work/sizing.yaml"
  upgrade="$work/upgrade.yaml" sizing="$work/sizing.yaml" again=p003
fi

planner sweep "$upgrade" --out "$work/upgrade" --jobs 2
cat "$work/upgrade/results.md"

planner sweep "$sizing" --out "$work/sizing" --jobs 2
ls "$work/sizing" "$work/sizing/hardware"

# Every point's hardware profile is written out, so one can be planned again by hand:
planner optimize --hardware "$work/upgrade/hardware/$again.yaml" --model mixtral-8x7b
