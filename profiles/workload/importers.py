"""Importers: routing data recorded by others, turned into a :class:`Trace` (per token) or an
:class:`AggregateWorkload` (counts only).

Legend: T = tokens, L = MoE layers, K = experts per token (top-k), E = routed experts per
layer, S = recorded steps.

Sources understood (:func:`detect_format` names them):

- ``trace``: our own trace ``.npz`` (:mod:`profiles.workload.trace`).
- ``esft``: ESFT expert scores repacked to ``.npz``: ``{task}_ids`` uint8 ``[T, L, K]``,
  ``{task}_weights`` float16 ``[T, L, K]``, ``{task}_seqlens`` ``[S]``; DeepSeek-V2-Lite
  (its first layer is dense, so MoE layer l is hidden layer l + 1).
- ``sglang``: SGLang's expert-distribution recorder dump (``stat`` mode), a dict with
  ``logical_count`` ``[S, layers, E]``: ``.pt`` (read without torch, see below), or the same
  dict as ``.json`` / ``.npz``.
- ``olmoe-counts``: ``{model}__{kind}__{domain}`` count arrays (OLMoE repository).
- ``fiddler``: ``{"expert_popularity": [L][E], "total_input_tokens": n}`` JSON.
- ``fractions``: ``{subject}`` float ``[questions, L, E]`` shares of each question's slots.
- ``aggregate``: our own aggregate ``.npz`` (:mod:`profiles.workload.aggregate`) or the same
  keys as a JSON object.

``.pt`` files are zip archives (torch >= 1.6): ``<name>/data.pkl`` is a protocol-2 pickle
whose tensors refer by persistent id ``('storage', type, key, location, numel)`` to raw
little-endian bytes in ``<name>/data/<key>``. They are read with a restricted unpickler that
knows only ``torch._utils._rebuild_tensor_v2``, ``collections.OrderedDict`` and the storage
types, rebuilding each tensor as a numpy array; any other global in the pickle is refused
with one :class:`InputError` line, so a crafted file cannot run code. torch is not imported.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..yamlio import load_json
from .aggregate import AggregateWorkload, load_aggregate
from .trace import PREFILL, Trace, check_npz, load_trace, read_npz

__all__ = [
    "FORMATS",
    "detect_format",
    "list_tasks",
    "load_workload",
    "import_esft",
    "import_sglang",
    "import_olmoe_counts",
    "import_fiddler_popularity",
    "import_fractions",
    "read_torch_archive",
]

FORMATS = ("trace", "esft", "sglang", "olmoe-counts", "fiddler", "fractions", "aggregate")

ESFT_MODEL = "deepseek-ai/ESFT-vanilla-lite (DeepSeek-V2-Lite layout)"
ESFT_EXPERTS = 64
_ESFT_KEY = re.compile(r"^(?P<task>.+)_(?P<part>ids|weights|seqlens)$")
_OLMOE_KEY = re.compile(r"^(?P<model>[^_]+)__(?P<kind>expert_counts(?:_crosslayer)?(?:_top1)?)__(?P<domain>.+)$")
# Layers at which the OLMoE repository recorded counts, and its cross-layer pairs.
_OLMOE_LAYERS = (0, 7, 15)
_OLMOE_PAIRS = ((0, 7), (7, 15))
_MODEL_TOP_K = {"olmoe": 8, "olmoe-sft": 8, "olmoe-dpo": 8, "mixtral": 2}

# Sizes that bound what a .pt archive may make us read (bytes).
_MAX_PICKLE_BYTES = 64 << 20
_MAX_STORAGE_BYTES = 8 << 30


# ----------------------------------------------------------------------------- helpers


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    return read_npz(path)


def _load_json(path: Path) -> Any:
    try:
        return load_json(path)  # bounded: size, nesting, digits
    except InputError as exc:
        if exc.message.startswith("malformed JSON"):
            raise InputError("not valid JSON" + exc.message[len("malformed JSON"):], file=path, line=exc.line,
                             fix="check the JSON syntax") from None
        raise


def _esft_tasks(keys: list[str]) -> list[str]:
    parts: dict[str, set[str]] = collections.defaultdict(set)
    for k in keys:
        m = _ESFT_KEY.match(k)
        if m:
            parts[m["task"]].add(m["part"])
    return sorted(t for t, p in parts.items() if {"ids", "seqlens"} <= p)


def _olmoe_tasks(keys: list[str]) -> list[str]:
    out = set()
    for k in keys:
        m = _OLMOE_KEY.match(k)
        if m and m["kind"] == "expert_counts":
            out.add(f"{m['model']}/{m['domain']}")
    return sorted(out)


def _pick(tasks: list[str], task: str | None, path: Path, allow_all: bool = True) -> list[str]:
    """The tasks to import: the one named, all of them, or the only one there is."""
    choices = ", ".join(tasks) + (", or all" if allow_all else "")
    if task is None:
        if len(tasks) == 1:
            return tasks
        raise InputError("the file holds several tasks; pick one", file=path, key="--task",
                         expected=choices, fix="pass --task NAME" + (" or --task all" if allow_all else ""))
    if allow_all and task == "all":
        return tasks
    if task not in tasks:
        raise InputError("no such task in the file", file=path, key="--task", value=task, expected=choices,
                         fix="pass one of the listed tasks")
    return [task]


# ----------------------------------------------------------------------------- detection


def detect_format(path: str | Path) -> str:
    """Name the format of ``path`` (one of :data:`FORMATS`) from its suffix and keys."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", file=path, fix="check the path")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".bin"):
        return "sglang"
    if suffix == ".json":
        data = _load_json(path)
        if isinstance(data, dict):
            if "logical_count" in data:
                return "sglang"
            if "expert_popularity" in data:
                return "fiddler"
            if "expert_counts" in data:
                return "aggregate"
        raise InputError("unrecognised JSON workload", file=path,
                         expected="an object with logical_count, expert_popularity or expert_counts",
                         fix="see `planner trace import --help` for the formats understood")
    if suffix == ".npz":
        check_npz(path)  # sizes and dtypes from the headers, before anything is unpacked
        try:
            with np.load(path, allow_pickle=False) as npz:
                keys = list(npz.files)
                if "expert_ids" in keys:
                    return "trace"
                if "expert_counts" in keys:
                    return "aggregate"
                if "logical_count" in keys:
                    return "sglang"
                if _esft_tasks(keys):
                    return "esft"
                if _olmoe_tasks(keys):
                    return "olmoe-counts"
                # per-subject share arrays: every entry a float [questions, layers, experts]
                if keys and all(npz[k].dtype.kind == "f" and npz[k].ndim == 3 for k in keys):
                    return "fractions"
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise InputError(f"not a readable .npz file ({exc})", file=path, fix="write it with numpy.savez") from None
        raise InputError("unrecognised .npz workload", file=path, value=sorted(keys)[:6],
                         expected="a trace (expert_ids), ESFT ({task}_ids), SGLang (logical_count) or counts",
                         fix="see `planner trace import --help` for the formats understood")
    raise InputError("unrecognised workload file type", file=path, value=suffix, expected=".npz, .json or .pt",
                     fix="convert the data to one of the formats in `planner trace import --help`")


def list_tasks(path: str | Path) -> list[str]:
    """Tasks (ESFT tasks, OLMoE ``model/domain``, fraction subjects) a file holds; [] if none."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt not in ("esft", "olmoe-counts", "fractions"):
        return []
    with np.load(path, allow_pickle=False) as npz:
        keys = list(npz.files)
    return {"esft": _esft_tasks, "olmoe-counts": _olmoe_tasks, "fractions": sorted}[fmt](keys)


def load_workload(path: str | Path, task: str | None = None, *, top_k: int | None = None) -> Trace | AggregateWorkload:
    """Load any understood workload file: a :class:`Trace` when it has per-token data,
    otherwise an :class:`AggregateWorkload`.

    Args:
        path: the file.
        task: which task / ``model/domain`` / subject of a multi-task file (``all`` for all).
        top_k: experts per token, for aggregate sources that do not record it.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "trace":
        return load_trace(path)
    if fmt == "esft":
        return import_esft(path, task)
    if fmt == "sglang":
        return import_sglang(path, top_k=top_k)
    if fmt == "olmoe-counts":
        return import_olmoe_counts(path, task)
    if fmt == "fiddler":
        return import_fiddler_popularity(path, top_k=2 if top_k is None else top_k)
    if fmt == "fractions":
        return import_fractions(path, task, top_k=top_k)
    if path.suffix.lower() == ".json":
        return _aggregate_from_dict(_load_json(path), path, top_k)
    return load_aggregate(path)


# ----------------------------------------------------------------------------- ESFT


def import_esft(path: str | Path, task: str | None = None) -> Trace:
    """ESFT DeepSeek-V2-Lite routing (``{task}_ids`` / ``_weights`` / ``_seqlens``) as a Trace.

    Args:
        path: the ``.npz``.
        task: one task, or ``all`` to concatenate every task (sorted by name) back to back;
            may be omitted when the file holds a single task.

    The data was recorded with teacher forcing, so every token is marked prefill; the gate
    weights are the raw softmax scores (not renormalised over the top-K).
    """
    path = Path(path)
    data = _load_npz(path)
    tasks = _esft_tasks(list(data))
    if not tasks:
        raise InputError("no ESFT task arrays", file=path, expected="{task}_ids, {task}_seqlens",
                         fix="point at the ESFT routing .npz")
    chosen = _pick(tasks, task, path)
    ids, weights, lens = [], [], []
    for name in chosen:
        a = data[f"{name}_ids"]
        if a.ndim != 3 or not np.issubdtype(a.dtype, np.integer):
            raise InputError("wrong shape or dtype", file=path, key=f"{name}_ids", value=f"{a.shape} {a.dtype}",
                             expected="integer [tokens, moe_layers, top_k]", fix="re-export the ESFT arrays")
        ids.append(a)
        w = data.get(f"{name}_weights")
        weights.append(w if w is not None and w.shape == a.shape else None)
        lens.append(np.asarray(data[f"{name}_seqlens"]).astype(np.int64).ravel())
    if any(a.shape[1:] != ids[0].shape[1:] for a in ids):
        raise InputError("tasks disagree in layers or top-k", file=path, value=[a.shape[1:] for a in ids],
                         expected="one [layers, top_k] for all tasks", fix="import the tasks one at a time")
    expert_ids = np.concatenate(ids)
    L = expert_ids.shape[1]
    gate = None if any(w is None for w in weights) else np.concatenate(weights)
    num_experts = max(ESFT_EXPERTS, int(expert_ids.max(initial=0)) + 1)
    try:
        return Trace(
            expert_ids=expert_ids, seq_lens=np.concatenate(lens), phase=np.full(len(expert_ids), PREFILL, np.uint8),
            num_experts=num_experts, layer_map=tuple(range(1, L + 1)), gate_weights=gate, model=ESFT_MODEL,
            source=f"{path} (task {'+'.join(chosen)})",
            meta={"tasks": chosen, "task_tokens": [int(a.shape[0]) for a in ids],
                  "gate_weights_normalised": False, "shared_experts": 2,
                  "notes": "ESFT expert scores (github.com/deepseek-ai/ESFT, MIT); teacher-forced sequences"},
        )
    except InputError as exc:
        raise exc.located(file=path) from None


# ----------------------------------------------------------------------------- .pt without torch


class _StorageType:
    """Stand-in for ``torch.<X>Storage`` classes named in a pickle."""

    def __init__(self, name: str, dtype: str) -> None:
        self.name, self.dtype = name, dtype


_STORAGE_TYPES = {
    name: _StorageType(name, dtype) for name, dtype in {
        "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "bfloat16",
        "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "|i1",
        "ByteStorage": "|u1", "BoolStorage": "|b1",
    }.items()
}


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: a numpy copy of the tensor's view."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise InputError("tensor without a storage in the .pt pickle", key="data.pkl",
                         fix="save plain tensors with torch.save")
    ok_ints = all(isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride))
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) and ok_ints):
        raise InputError("malformed tensor header in the .pt pickle", key="data.pkl", value=(size, stride),
                         fix="save plain tensors with torch.save")
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise InputError("tensor reaches past its storage in the .pt archive", key="data.pkl", value=last,
                         expected=f"offsets below {storage.size}", fix="re-save the file")
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride), writeable=False)
    return np.array(view)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): st for name, st in _STORAGE_TYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a torch zip archive: tensors and plain containers only."""

    def __init__(self, file: io.BytesIO, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(file)
        self._archive, self._prefix, self._path = archive, prefix, path
        self._storages: dict[str, np.ndarray] = {}
        self._little = True
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist():
            self._little = archive.read(byteorder).strip() != b"big"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise InputError(f"refusing to load {module}.{name} from the pickle: only tensors and plain containers "
                         "are read", file=self._path, key="data.pkl",
                         fix="load it only if you trust it, and re-export the counts as .json or .npz")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise InputError("unexpected persistent id in the .pt pickle", file=self._path, key="data.pkl",
                             value=repr(pid)[:60], fix="save plain tensors with torch.save")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if key not in self._storages:
            record = f"{self._prefix}data/{key}"
            try:
                info = self._archive.getinfo(record)
            except KeyError:
                raise InputError("storage record missing from the .pt archive", file=self._path, key=record,
                                 fix="re-save the file") from None
            itemsize = 2 if storage_type.dtype == "bfloat16" else np.dtype(storage_type.dtype).itemsize
            if info.file_size > _MAX_STORAGE_BYTES or info.file_size < numel * itemsize:
                raise InputError("storage record has the wrong size", file=self._path, key=record,
                                 value=info.file_size, expected=f"{numel * itemsize} bytes", fix="re-save the file")
            raw = self._archive.read(record)[: numel * itemsize]
            if storage_type.dtype == "bfloat16":  # the top half of a float32
                bits = np.frombuffer(raw, "<u2" if self._little else ">u2").astype(np.uint32) << 16
                arr = bits.view(np.float32)
            else:
                dt = np.dtype(storage_type.dtype)
                if not self._little and dt.itemsize > 1:
                    dt = dt.newbyteorder(">")
                arr = np.frombuffer(raw, dt).astype(dt.newbyteorder("="))
            self._storages[key] = arr
        return self._storages[key]


def read_torch_archive(path: str | Path) -> Any:
    """Read a ``torch.save`` zip archive without torch: tensors become numpy arrays.

    Only ``_rebuild_tensor_v2``, ``OrderedDict`` and storage types may appear in the pickle;
    anything else raises :class:`InputError` before it is called.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"not a torch zip archive ({exc})", file=path, expected="a file written by torch.save "
                         "(torch >= 1.6)", fix="re-save it with torch.save, or export the dict as .json/.npz") from None
    with archive:
        pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        pickles = [n for n in pickles if n.count("/") <= 1]
        if len(pickles) != 1:
            raise InputError("no single data.pkl in the archive", file=path, value=pickles[:3],
                             expected="<name>/data.pkl", fix="pass a file written by torch.save")
        prefix = pickles[0][: -len("data.pkl")]
        if archive.getinfo(pickles[0]).file_size > _MAX_PICKLE_BYTES:
            raise InputError("data.pkl is too large", file=path, key=pickles[0],
                             expected=f"at most {_MAX_PICKLE_BYTES >> 20} MiB", fix="export the counts as .npz")
        payload = io.BytesIO(archive.read(pickles[0]))
        try:
            return _RestrictedUnpickler(payload, archive, prefix, path).load()
        except InputError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            raise InputError(f"unreadable pickle in the .pt archive ({type(exc).__name__}: {exc})", file=path,
                             key=pickles[0], fix="re-save it with torch.save, or export as .json/.npz") from None


# ----------------------------------------------------------------------------- SGLang


def import_sglang(path: str | Path, *, top_k: int | None = None) -> AggregateWorkload:
    """SGLang expert-distribution dump (``logical_count`` ``[S, layers, E]``) as an aggregate.

    Rows are SGLang's layer indices (hidden layers); layers with no selection at all (dense
    layers) are dropped. ``.pt`` is read with the restricted unpickler; ``.json`` and
    ``.npz`` hold the same dict.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = _load_json(path)
    elif suffix == ".npz":
        data = _load_npz(path)
    else:
        data = read_torch_archive(path)
    if not isinstance(data, dict) or "logical_count" not in data:
        raise InputError("no logical_count in the dump", file=path, key="logical_count",
                         expected="SGLang's dump dict {logical_count: [steps, layers, experts], ...}",
                         fix="dump with --expert-distribution-recorder-mode stat")
    try:
        counts = np.asarray(data["logical_count"])
    except (ValueError, TypeError):
        counts = np.zeros(0)
    if counts.ndim == 2:
        counts = counts[None]
    if counts.ndim != 3 or counts.size == 0 or not np.issubdtype(counts.dtype, np.number):
        raise InputError("logical_count has the wrong shape", file=path, key="logical_count",
                         value=getattr(counts, "shape", None), expected="numbers [steps, layers, experts]",
                         fix="dump with --expert-distribution-recorder-mode stat")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise InputError("logical_count holds negative or non-finite counts", file=path, key="logical_count",
                         fix="check the dump")
    counts = counts.astype(np.int64) if np.issubdtype(counts.dtype, np.integer) else counts.astype(np.float64)
    keep = counts.sum(axis=(0, 2)) > 0
    if not keep.any():
        raise InputError("logical_count is all zeros", file=path, key="logical_count",
                         fix="record while requests are being served")
    layers = tuple(int(i) for i in np.nonzero(keep)[0])
    total = counts[:, keep].sum(axis=0)
    meta = {"rank": data.get("rank"), "layers_numbering": "SGLang layer index (hidden layers)",
            "dropped_empty_layers": [int(i) for i in np.nonzero(~keep)[0]]}
    util = data.get("average_utilization_rate_over_window")
    if isinstance(util, (int, float)):
        meta["average_utilization_rate_over_window"] = float(util)
    tokens = None
    if top_k:
        tokens = int(round(float(total[0].sum()) / top_k))
    try:
        return AggregateWorkload(expert_counts=total, layer_ids=layers, step_counts=counts[:, keep], top_k=top_k,
                                 num_tokens=tokens, model=str(data.get("model", "")), source=str(path),
                                 meta=json.loads(json.dumps(meta, default=str)))
    except InputError as exc:
        raise exc.located(file=path) from None


# ----------------------------------------------------------------------------- published counts


def import_olmoe_counts(path: str | Path, task: str | None = None) -> AggregateWorkload:
    """OLMoE repository counts for one ``model/domain`` (e.g. ``olmoe/arxiv``).

    ``expert_counts`` rows are layers 0, 7 and 15 (all top-k ranks); the cross-layer table
    kept is the exact top-1 pairing for layers (0, 7) and (7, 15). The rank-by-rank
    ``expert_counts_crosslayer`` is not a co-occurrence and is left out.
    """
    path = Path(path)
    data = _load_npz(path)
    chosen = _pick(_olmoe_tasks(list(data)), task, path, allow_all=False)[0]
    model, domain = chosen.split("/", 1)
    counts = data[f"{model}__expert_counts__{domain}"]
    top1 = data.get(f"{model}__expert_counts_top1__{domain}")
    cross = data.get(f"{model}__expert_counts_crosslayer_top1__{domain}")
    top_k = _MODEL_TOP_K.get(model)
    tokens = int(top1[0].sum()) if top1 is not None else None
    if top1 is not None and top1[0].sum() > 0:
        top_k = int(round(counts[0].sum() / top1[0].sum()))  # all-rank picks / top-1 picks
    layers = _OLMOE_LAYERS if counts.shape[0] == len(_OLMOE_LAYERS) else tuple(range(counts.shape[0]))
    pairs = _OLMOE_PAIRS if cross is not None and cross.shape[0] == len(_OLMOE_PAIRS) else ()
    try:
        return AggregateWorkload(
            expert_counts=counts.astype(np.int64), layer_ids=layers,
            transition_counts=cross.astype(np.int64) if pairs else None, transition_layers=pairs,
            top_k=top_k, num_tokens=tokens, model=model, source=f"{path} ({chosen})",
            meta={"domain": domain, "transition_counts": "top-1 expert at layer a vs top-1 at layer b",
                  "notes": "github.com/allenai/OLMoE scripts/routing_output (Apache-2.0)"},
        )
    except InputError as exc:
        raise exc.located(file=path) from None


def import_fiddler_popularity(path: str | Path, *, top_k: int = 2) -> AggregateWorkload:
    """Fiddler's ``expert_popularity`` JSON (``[L][E]`` counts, Mixtral-8x7B: top-2)."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or "expert_popularity" not in data:
        raise InputError("no expert_popularity in the JSON", file=path, key="expert_popularity",
                         expected="[layers][experts] counts", fix="point at a Fiddler popularity file")
    try:
        counts = np.asarray(data["expert_popularity"], dtype=np.float64)
    except (ValueError, TypeError):
        raise InputError("expert_popularity is not a rectangular table of numbers", file=path,
                         key="expert_popularity", expected="[layers][experts] counts", fix="check the file") from None
    if counts.ndim != 2:
        raise InputError("expert_popularity has the wrong shape", file=path, key="expert_popularity",
                         value=counts.shape, expected="[layers][experts]", fix="check the file")
    if np.all(counts == np.round(counts)):
        counts = counts.astype(np.int64)
    tokens = int(round(float(counts[0].sum()) / top_k)) if top_k else None
    try:
        return AggregateWorkload(
            expert_counts=counts, layer_ids=tuple(range(counts.shape[0])), top_k=top_k, num_tokens=tokens,
            model="mistralai/Mixtral-8x7B", source=str(path),
            meta={"total_input_tokens": data.get("total_input_tokens"),
                  "notes": "github.com/efeslab/fiddler benchmarks/results/popularity (Apache-2.0)"},
        )
    except InputError as exc:
        raise exc.located(file=path) from None


def import_fractions(path: str | Path, task: str | None = None, *, top_k: int | None = None) -> AggregateWorkload:
    """Per-question routing shares ``[questions, L, E]`` (one key per subject) as an aggregate.

    ``expert_counts`` is the sum of the shares over questions (every question weighs one);
    ``all`` sums every subject.
    """
    path = Path(path)
    data = _load_npz(path)
    chosen = _pick(sorted(data), task, path)
    arrays = [data[name] for name in chosen]
    if any(a.ndim != 3 or a.shape[1:] != arrays[0].shape[1:] for a in arrays):
        raise InputError("share arrays disagree in shape", file=path, value=[a.shape for a in arrays[:3]],
                         expected="[questions, layers, experts] for every subject", fix="import one subject")
    shares = np.concatenate(arrays).astype(np.float64)
    try:
        return AggregateWorkload(
            expert_counts=shares.sum(axis=0), layer_ids=tuple(range(shares.shape[1])), top_k=top_k,
            num_tokens=None, model="mistralai/Mixtral-8x7B", source=f"{path} ({'+'.join(chosen)})",
            meta={"subjects": chosen, "questions": int(shares.shape[0]),
                  "units": "sum over questions of each question's share of routing slots",
                  "notes": "github.com/ajtejankar/mixtral-vis-moe (Apache-2.0)"},
        )
    except InputError as exc:
        raise exc.located(file=path) from None


def _aggregate_from_dict(data: Any, path: Path, top_k: int | None) -> AggregateWorkload:
    """An aggregate given as a JSON object with the keys of the aggregate ``.npz``."""
    if not isinstance(data, dict) or "expert_counts" not in data:
        raise InputError("no expert_counts in the JSON", file=path, key="expert_counts",
                         expected="[layers][experts] counts", fix="add the per-layer counts")
    try:
        counts = np.asarray(data["expert_counts"], np.float64)
        cross = data.get("transition_counts")
        cross = None if cross is None else np.asarray(cross, np.float64)
        pairs = tuple((int(a), int(b)) for a, b in data.get("transition_layers", []))
    except (ValueError, TypeError):
        raise InputError("counts are not rectangular tables of numbers", file=path, key="expert_counts",
                         fix="check the JSON arrays") from None
    if cross is not None and not pairs and cross.ndim == 3:
        pairs = tuple((i, i + 1) for i in range(cross.shape[0]))  # [L-1, E, E]: adjacent layers
    if counts.ndim != 2:
        raise InputError("expert_counts has the wrong shape", file=path, key="expert_counts", value=counts.shape,
                         expected="[layers][experts]", fix="store one list of counts per layer")
    try:
        return AggregateWorkload(
            expert_counts=counts, layer_ids=tuple(int(x) for x in data.get("layer_ids", range(counts.shape[0]))),
            transition_counts=cross, transition_layers=pairs, top_k=data.get("top_k", top_k),
            num_tokens=data.get("num_tokens"), model=str(data.get("model", "")), source=str(data.get("source", path)),
        )
    except InputError as exc:
        raise exc.located(file=path) from None
