"""What a cache miss costs the bundle runtime on a CPU (issue 14): a cached int8 expert's own
ONNX Runtime session runs on the calling thread, so a miss starts and an eviction joins no
thread pool (12-20 ms of wall time per miss on the loaded 2-core dev machine, for 2-3 ms of
CPU); the layer session of resident experts keeps the runtime's threads. No timings asserted.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="needs the [runtime] extra")
pytest.importorskip("onnxruntime", reason="needs the [runtime] extra")


def threads_of(kernel) -> int:
    return kernel.session.get_session_options().intra_op_num_threads


def test_cached_expert_sessions_have_no_pool_and_resident_ones_keep_the_threads(tmp_path):
    from exporters.engine_probe import _plan, _tiny_checkpoint
    from exporters.runtime import load_planned_model
    from exporters.runtime.kernels import CACHED_EXPERT_THREADS

    assert CACHED_EXPERT_THREADS == 1
    ckpt, kernels = _tiny_checkpoint(tmp_path, "int8", 1)
    with load_planned_model(_plan(1, "fetch", "int8", "cpu"), ckpt, kernels_dir=kernels, device="cpu",
                            threads=2) as rt:
        rt.generate([3, 4, 5, 6], 3)
        store = rt.stores[0]
        assert rt.metrics.misses[0] >= 1 and store.slots
        assert [threads_of(slot.get().kernel) for slot in store.slots.values()] == [1] * len(store.slots)
    with load_planned_model(_plan(1, "resident", "int8", "cpu"), ckpt, kernels_dir=kernels, device="cpu",
                            threads=2) as rt:
        assert threads_of(rt.stores[0].cpu_kernel) == 2
