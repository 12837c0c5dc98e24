"""Importers: ESFT traces, SGLang dumps (.pt read without torch, .json, .npz), published counts.

Legend: T = tokens, L = layers, K = top-k, E = experts, S = recorded steps.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from profiles.errors import InputError
from profiles.workload.aggregate import AggregateWorkload
from profiles.workload.importers import (
    detect_format,
    import_esft,
    import_olmoe_counts,
    import_sglang,
    list_tasks,
    load_workload,
    read_torch_archive,
)
from profiles.workload.trace import Trace, load_trace, save_trace

SHARED = Path(__file__).parents[1] / ".." / "shared" / "traces"
ESFT = SHARED / "esft-deepseek-v2-lite" / "routing_top6.npz"
OLMOE = SHARED / "olmoe-mixtral-counts" / "routing_counts.npz"
FIDDLER = SHARED / "fiddler-mixtral-popularity" / "mixtral_8x7b_original" / "expert_popularity_machine_learning.json"
FRACTIONS = SHARED / "mixtral-mmlu-fractions" / "mmlu_fractions.npz"
needs_shared = pytest.mark.skipif(not ESFT.is_file(), reason=f"shared traces not found at {SHARED} (../shared absent)")


# ----------------------------------------------------------------------------- .pt by hand


class _Storage:
    """A typed storage as torch pickles it: by persistent id, bytes in data/<key>."""

    def __init__(self, key: str, storage_type: type, data: np.ndarray) -> None:
        self.key, self.storage_type, self.data = key, storage_type, data


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride)

    def __reduce_ex__(self, protocol):
        storage, offset, size, stride = self.args
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, (storage, offset, size, stride, False, collections.OrderedDict())


def write_torch_zip(path: Path, obj, storages: list[_Storage], monkeypatch, name: str = "archive") -> Path:
    """Write ``obj`` the way ``torch.save`` does (zip format), without torch.

    ``<name>/data.pkl``: protocol-2 pickle; tensors reduce to
    ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
    and storages to the persistent id ``('storage', torch.<T>Storage, key, location, numel)``;
    ``<name>/data/<key>``: the storage's raw little-endian bytes.
    """
    # stand-ins so that the pickler can name torch's globals (they are never called here)
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("not called when writing")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    for st in {s.storage_type for s in storages}:
        st.__module__ = "torch"
        setattr(torch_mod, st.__name__, st)

    class _Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _Storage):
                return ("storage", o.storage_type, o.key, "cpu", int(o.data.size))
            return None

    buf = io.BytesIO()
    with monkeypatch.context() as m:  # the stand-ins exist only while pickling
        m.setitem(sys.modules, "torch", torch_mod)
        m.setitem(sys.modules, "torch._utils", utils_mod)
        _Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/data.pkl", buf.getvalue())
        zf.writestr(f"{name}/byteorder", "little")
        for s in storages:
            zf.writestr(f"{name}/data/{s.key}", s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())
        zf.writestr(f"{name}/version", "3\n")
    return path


def IntStorage():  # noqa: N802 - a fresh class per test, named like torch's
    return type("IntStorage", (), {})


def LongStorage():  # noqa: N802
    return type("LongStorage", (), {})


COUNTS = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4)  # [S=2, layers=3, E=4]


def test_pt_dump_read_without_torch(tmp_path, monkeypatch):
    storage = _Storage("0", IntStorage(), COUNTS.ravel())
    obj = {"rank": 0, "logical_count": _Tensor(storage, 0, (2, 3, 4), (12, 4, 1)),
           "average_utilization_rate_over_window": None}
    path = write_torch_zip(tmp_path / "expert_distribution_recorder_1.pt", obj, [storage], monkeypatch,
                           name="expert_distribution_recorder_1")
    data = read_torch_archive(path)
    assert data["rank"] == 0 and data["average_utilization_rate_over_window"] is None
    assert data["logical_count"].dtype == np.int32
    np.testing.assert_array_equal(data["logical_count"], COUNTS)
    agg = load_workload(path)
    assert isinstance(agg, AggregateWorkload) and detect_format(path) == "sglang"
    np.testing.assert_array_equal(agg.expert_counts, COUNTS.sum(axis=0))
    assert agg.step_counts.shape == (2, 3, 4) and agg.layer_ids == (0, 1, 2)


def test_pt_strided_tensor_with_offset(tmp_path, monkeypatch):
    # the storage holds the counts transposed ([E, layers, S] order) after 5 leading values;
    # the tensor views them as [S, layers, E] through its strides, as torch would
    S, Ly, E = COUNTS.shape
    raw = np.concatenate([np.full(5, -1, np.int64), COUNTS.transpose(2, 1, 0).ravel().astype(np.int64)])
    storage = _Storage("7", LongStorage(), raw)
    obj = collections.OrderedDict(logical_count=_Tensor(storage, 5, (S, Ly, E), (1, S, Ly * S)))
    data = read_torch_archive(write_torch_zip(tmp_path / "dump.pt", obj, [storage], monkeypatch))
    np.testing.assert_array_equal(data["logical_count"], COUNTS)


def test_pt_drops_dense_layers_and_records_steps(tmp_path, monkeypatch):
    counts = COUNTS.copy()
    counts[:, 0] = 0  # a dense layer records nothing
    storage = _Storage("0", IntStorage(), counts.ravel())
    path = write_torch_zip(tmp_path / "d.pt", {"logical_count": _Tensor(storage, 0, (2, 3, 4), (12, 4, 1))},
                           [storage], monkeypatch)
    agg = import_sglang(path, top_k=2)
    assert agg.layer_ids == (1, 2) and agg.meta["dropped_empty_layers"] == [0]
    assert agg.num_tokens == int(counts[:, 1].sum()) // 2 and agg.top_k == 2


class _Evil:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_pt_malicious_pickle_is_refused(tmp_path, protocol):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"logical_count": _Evil(target)}, protocol=protocol))
    with pytest.raises(InputError) as info:
        read_torch_archive(path)
    message = str(info.value)
    assert "refusing to load" in message and "system" in message and "\n" not in message
    assert str(path) in message
    assert not target.exists()


def test_pt_other_globals_and_broken_archives_are_refused(tmp_path):
    path = tmp_path / "eval.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a/data.pkl", pickle.dumps(collections.Counter("ab"), protocol=2))
    with pytest.raises(InputError, match="refusing to load collections.Counter"):
        read_torch_archive(path)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"logical_count": [1]}, protocol=2))  # pre-1.6 torch: not a zip
    with pytest.raises(InputError, match="not a torch zip archive"):
        read_torch_archive(legacy)
    missing = tmp_path / "missing.pt"
    with zipfile.ZipFile(missing, "w") as zf:
        zf.writestr("a/version", "3")
    with pytest.raises(InputError, match="no single data.pkl"):
        read_torch_archive(missing)


def test_pt_storage_size_is_checked(tmp_path, monkeypatch):
    storage = _Storage("0", IntStorage(), COUNTS.ravel())
    path = write_torch_zip(tmp_path / "d.pt", {"logical_count": _Tensor(storage, 0, (2, 3, 5), (15, 5, 1))},
                           [storage], monkeypatch)
    with pytest.raises(InputError, match="past its storage"):
        read_torch_archive(path)


def test_sglang_json_and_npz(tmp_path):
    js = tmp_path / "dump.json"
    js.write_text(json.dumps({"rank": 0, "logical_count": COUNTS.tolist()}))
    npz = tmp_path / "dump.npz"
    np.savez(npz, logical_count=COUNTS)
    for path in (js, npz):
        assert detect_format(path) == "sglang"
        agg = load_workload(path)
        np.testing.assert_array_equal(agg.expert_counts, COUNTS.sum(axis=0))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"logical_count": [[1, -2]]}))
    with pytest.raises(InputError, match="negative"):
        import_sglang(bad)


# ----------------------------------------------------------------------------- small synthetic sources


def _esft_npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for task, T in (("alpha", 5), ("beta", 3)):
        ids = np.stack([np.stack([rng.choice(64, 6, replace=False) for _ in range(26)]) for _ in range(T)])
        arrays[f"{task}_ids"] = ids.astype(np.uint8)
        arrays[f"{task}_weights"] = rng.random((T, 26, 6)).astype(np.float16)
        arrays[f"{task}_seqlens"] = np.array([T - 1, 1], np.int32)
    np.savez(path, **arrays)
    return path


def test_esft_import_tasks(tmp_path):
    path = _esft_npz(tmp_path / "esft.npz")
    assert detect_format(path) == "esft" and list_tasks(path) == ["alpha", "beta"]
    trace = import_esft(path, "alpha")
    assert trace.expert_ids.shape == (5, 26, 6) and trace.layer_map == tuple(range(1, 27))
    assert trace.num_experts == 64 and trace.gate_weights.dtype == np.float16
    assert trace.meta["gate_weights_normalised"] is False and (trace.phase == 0).all()
    both = import_esft(path, "all")
    assert both.num_tokens == 8 and both.seq_lens.tolist() == [4, 1, 2, 1]
    assert both.meta["tasks"] == ["alpha", "beta"] and both.meta["task_tokens"] == [5, 3]
    with pytest.raises(InputError, match="several tasks") as info:
        import_esft(path)
    assert "alpha, beta, or all" in str(info.value)
    with pytest.raises(InputError, match="no such task"):
        import_esft(path, "gamma")


def test_esft_roundtrip_through_trace_file(tmp_path):
    trace = import_esft(_esft_npz(tmp_path / "esft.npz"), "beta")
    back = load_trace(save_trace(trace, tmp_path / "t.npz"))
    assert isinstance(back, Trace) and detect_format(tmp_path / "t.npz") == "trace"
    np.testing.assert_array_equal(back.expert_ids, trace.expert_ids)
    np.testing.assert_array_equal(back.gate_weights, trace.gate_weights)
    assert back.layer_map == trace.layer_map and back.meta["tasks"] == ["beta"]


def test_olmoe_style_counts(tmp_path):
    rng = np.random.default_rng(1)
    top1 = rng.integers(1, 50, (3, 8))
    top1[:, 0] += top1.sum(axis=1).max() - top1.sum(axis=1)  # one token count for every layer
    path = tmp_path / "counts.npz"
    np.savez(path, **{"mix__expert_counts__web": top1 * 2, "mix__expert_counts_top1__web": top1,
                      "mix__expert_counts_crosslayer_top1__web": rng.integers(0, 9, (2, 8, 8)),
                      "mix__expert_counts_crosslayer__web": rng.integers(0, 9, (2, 8, 8))})
    assert detect_format(path) == "olmoe-counts" and list_tasks(path) == ["mix/web"]
    agg = import_olmoe_counts(path)
    assert agg.layer_ids == (0, 7, 15) and agg.transition_layers == ((0, 7), (7, 15))
    assert agg.top_k == 2 and agg.num_tokens == int(top1[0].sum())
    assert agg.transition_counts.shape == (2, 8, 8)


def test_fiddler_and_generic_aggregate_json(tmp_path):
    fid = tmp_path / "pop.json"
    fid.write_text(json.dumps({"total_input_tokens": 3, "expert_popularity": [[2, 4, 0, 0], [1, 1, 3, 1]]}))
    agg = load_workload(fid)
    assert detect_format(fid) == "fiddler" and agg.top_k == 2 and agg.num_tokens == 3
    assert agg.expert_counts.tolist() == [[2, 4, 0, 0], [1, 1, 3, 1]]
    gen = tmp_path / "agg.json"
    gen.write_text(json.dumps({"expert_counts": [[1, 2], [3, 4], [5, 6]],
                               "transition_counts": [[[1, 0], [0, 1]], [[2, 0], [0, 2]]]}))
    agg = load_workload(gen)
    assert detect_format(gen) == "aggregate" and agg.transition_layers == ((0, 1), (1, 2))


def test_fractions(tmp_path):
    path = tmp_path / "fr.npz"
    shares = np.full((2, 3, 4), 0.25, np.float32)
    np.savez(path, physics=shares, law=shares[:1])
    assert detect_format(path) == "fractions" and list_tasks(path) == ["law", "physics"]
    agg = load_workload(path, "all")
    np.testing.assert_allclose(agg.expert_counts, np.full((3, 4), 0.75))
    assert agg.meta["questions"] == 3


def test_unrecognised_inputs(tmp_path):
    weird = tmp_path / "weird.npz"
    np.savez(weird, something=np.arange(3))
    with pytest.raises(InputError, match="unrecognised .npz workload"):
        detect_format(weird)
    txt = tmp_path / "x.csv"
    txt.write_text("1,2")
    with pytest.raises(InputError, match="unrecognised workload file type"):
        detect_format(txt)
    with pytest.raises(InputError, match="file not found"):
        detect_format(tmp_path / "nope.npz")
    broken = tmp_path / "b.json"
    broken.write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        detect_format(broken)
    pickled = tmp_path / "p.npz"
    np.savez(pickled, logical_count=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="pickled objects"):
        load_workload(pickled)


# ----------------------------------------------------------------------------- the real files


@needs_shared
def test_real_esft():
    assert list_tasks(ESFT) == ["intent", "law", "summary", "translation"]
    trace = import_esft(ESFT, "summary")
    assert trace.expert_ids.shape == (8479, 26, 6) and trace.layer_map[0] == 1 and trace.layer_map[-1] == 26
    assert trace.num_experts == 64 and len(trace.seq_lens) == 13
    assert import_esft(ESFT, "all").num_tokens == 33279


@needs_shared
def test_real_aggregates():
    agg = load_workload(OLMOE, "olmoe/arxiv")
    assert agg.top_k == 8 and agg.num_tokens == 208896 and agg.expert_counts.shape == (3, 64)
    assert agg.transition_counts.sum(axis=(1, 2)).tolist() == [208896, 208896]
    mixtral = load_workload(OLMOE, "mixtral/github")
    assert mixtral.top_k == 2 and mixtral.num_experts == 8
    fid = load_workload(FIDDLER)
    assert fid.expert_counts.shape == (32, 8) and fid.top_k == 2
    fr = load_workload(FRACTIONS, "machine_learning")
    assert fr.expert_counts.shape == (32, 8) and fr.meta["questions"] == 112
    np.testing.assert_allclose(fr.expert_counts.sum(axis=1), 112, rtol=1e-4)
