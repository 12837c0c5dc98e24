"""Unpack rate of every format the bundle runtime stores: weights/s of formats.dequantize.

The bundle engine profile (profiles/engines/bundle.yaml) prices an unpack-then-matmul
format by this rate (profiles/perf.py: ``weights / unpack_weights_per_s`` before the
matmul). One ``[N, K] = [1024, 4096]`` matrix (4M weights, a quarter of a Mixtral expert's
projection; larger than the caches) is quantised once and unpacked ``--reps`` times on
``--threads`` torch threads (1 by default: one core, as the shared 2-core dev machine gives
it), in the runtime's environment (OMP_WAIT_POLICY=PASSIVE); the fastest run is kept
(other processes on the cores only slow a run down). int8/int4 are timed too: a GPU
unpacks them the same way (the CPU runs them in ONNX Runtime without unpacking).

    python benchmarks/bench_unpack.py --out benchmarks/results/unpack.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from _provenance import provenance

N, K = 1024, 4096


def main(argv: list[str] | None = None) -> dict:
    from exporters.runtime.formats import ORT_FORMATS, UNPACK_FORMATS, dequantize, quantize  # before torch

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "unpack.json")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((N, K)).astype(np.float32) * 0.02
    rates = {}
    for fmt in UNPACK_FORMATS + ORT_FORMATS:
        tensors = {name: torch.from_numpy(a) for name, a in quantize(weight, fmt, "w").items()}
        dequantize(tensors, "w", fmt, K)  # warm: lookup tables, allocator
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            dequantize(tensors, "w", fmt, K)
            times.append(time.perf_counter() - t)
        rates[fmt] = N * K / min(times)
        print(f"{fmt:8s} {rates[fmt] / 1e9:6.3f} G weights/s", flush=True)
    result = {"benchmark": "unpack", "shape": [N, K], "reps": args.reps, "device": "cpu",
              "torch_threads": torch.get_num_threads(), "unpack_weights_per_s": rates,
              "provenance": provenance(("numpy", "torch"))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
