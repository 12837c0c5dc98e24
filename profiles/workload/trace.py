"""Routing traces: which experts every token chose, per MoE layer, in one ``.npz`` file.

Legend: T = tokens, L = MoE layers (in model order), K = experts per token (top-k),
E = routed experts per layer, S = sequences.

File format (``numpy.savez_compressed``, loaded with ``allow_pickle=False``):

=================  ==============  ========================================================
key                dtype, shape    meaning
=================  ==============  ========================================================
``expert_ids``     uint/int [T,L,K] expert id chosen by token t at MoE layer l, rank k
``gate_weights``   float [T,L,K]   optional: the router's weight for that choice
``seq_lens``       int [S]         sequence lengths, in order; they sum to T
``phase``          uint8 [T]       0 = prefill (prompt) token, 1 = decode (generated) token
``meta``           str (0-d)       JSON: ``format_version``, ``model``, ``num_experts``,
                                   ``layer_map`` (MoE layer l -> hidden-layer index),
                                   ``source``, optional ``gate_weights_normalised`` and notes
=================  ==============  ========================================================

Tokens are stored in sequence order, sequences back to back. Shared experts are not in the
trace (they run for every token).
"""

from __future__ import annotations

import json
import math
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..limits import MAX_EXPERTS, MAX_LAYERS, MAX_TRACE_ARRAY_BYTES, MAX_TRACE_ENTRIES
from ..units import format_size
from ..yamlio import loads_json

__all__ = ["Trace", "check_npz", "load_trace", "read_npz", "save_trace", "FORMAT_VERSION", "PREFILL", "DECODE"]

FORMAT_VERSION = 1
PREFILL, DECODE = 0, 1


@dataclass(frozen=True, eq=False)
class Trace:
    """A routing trace held in memory. Arrays are read-only views.

    Attributes:
        expert_ids: ``[T, L, K]`` integer expert ids in ``[0, num_experts)``.
        seq_lens: ``[S]`` sequence lengths summing to T.
        phase: ``[T]`` ``PREFILL`` or ``DECODE`` per token.
        num_experts: E, routed experts per MoE layer.
        layer_map: ``[L]`` hidden-layer index of each MoE layer.
        gate_weights: ``[T, L, K]`` router weights, or ``None``.
        model: model name the trace was recorded from.
        source: where the data came from (a path, a URL, "synthetic ...").
        meta: any further metadata (JSON-serialisable).
    """

    expert_ids: np.ndarray
    seq_lens: np.ndarray
    phase: np.ndarray
    num_experts: int
    layer_map: tuple[int, ...]
    gate_weights: np.ndarray | None = None
    model: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self, file=None)
        for arr in (self.expert_ids, self.seq_lens, self.phase, self.gate_weights):
            if arr is not None:
                arr.setflags(write=False)

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    def seq_starts(self) -> np.ndarray:
        """``[S]`` index of each sequence's first token."""
        return (np.cumsum(self.seq_lens) - self.seq_lens).astype(np.int64)  # [] for no sequences

    def subset_sequences(self, indices: list[int] | np.ndarray) -> "Trace":
        """A new trace made of the sequences at ``indices`` (in the given order)."""
        starts = self.seq_starts()
        idx = np.asarray(indices, dtype=np.int64)
        pieces = [np.arange(starts[i], starts[i] + self.seq_lens[i]) for i in idx]
        rows = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        return Trace(
            expert_ids=self.expert_ids[rows].copy(), seq_lens=self.seq_lens[idx].copy(),
            phase=self.phase[rows].copy(), num_experts=self.num_experts, layer_map=self.layer_map,
            gate_weights=None if self.gate_weights is None else self.gate_weights[rows].copy(),
            model=self.model, source=self.source, meta=dict(self.meta),
        )


def _validate(trace: Trace, file: str | Path | None) -> None:
    def bad(key: str, message: str, value: Any, expected: str, fix: str) -> InputError:
        return InputError(message, file=file, key=key, value=value, expected=expected, fix=fix)

    ids = trace.expert_ids
    if not isinstance(ids, np.ndarray) or ids.ndim != 3:
        raise bad("expert_ids", "wrong shape", getattr(ids, "shape", type(ids).__name__),
                  "a 3-D integer array [tokens, moe_layers, top_k]", "save expert ids as [T, L, K]")
    if not np.issubdtype(ids.dtype, np.integer):
        raise bad("expert_ids", "wrong dtype", str(ids.dtype), "an integer dtype", "cast the ids to int32")
    T, L, K = ids.shape
    if trace.num_experts < 1:
        raise bad("meta.num_experts", "must be positive", trace.num_experts, "the routed experts per layer",
                  "set num_experts in meta")
    if ids.size and (ids.min() < 0 or ids.max() >= trace.num_experts):
        raise bad("expert_ids", "expert id out of range", int(ids.max() if ids.max() >= trace.num_experts else ids.min()),
                  f"ids in [0, {trace.num_experts})", "check num_experts in meta, or the ids")
    if K > 1 and T:
        s = np.sort(ids, axis=2)
        if (s[:, :, 1:] == s[:, :, :-1]).any():
            t, l = np.argwhere((s[:, :, 1:] == s[:, :, :-1]).any(axis=2))[0]
            raise bad("expert_ids", f"token {t} picks the same expert twice at MoE layer {l}",
                      ids[t, l].tolist(), "K distinct experts per token and layer", "deduplicate the top-k")
    seq = trace.seq_lens
    if seq.ndim != 1 or not np.issubdtype(seq.dtype, np.integer) or (seq.size and seq.min() < 1):
        raise bad("seq_lens", "invalid sequence lengths", seq.tolist()[:8], "a 1-D array of positive integers",
                  "store one length per sequence")
    if int(seq.sum()) != T:
        raise bad("seq_lens", "sequence lengths do not add up to the tokens", int(seq.sum()),
                  f"a sum of {T} (rows of expert_ids)", "fix seq_lens or expert_ids")
    ph = trace.phase
    if ph.shape != (T,) or (ph.size and not np.isin(ph, (PREFILL, DECODE)).all()):
        raise bad("phase", "invalid phase", getattr(ph, "shape", None), f"a [{T}] array of 0 (prefill) / 1 (decode)",
                  "store one phase per token")
    if len(trace.layer_map) != L:
        raise bad("meta.layer_map", "wrong length", len(trace.layer_map), f"{L} entries (one per MoE layer)",
                  "list the hidden-layer index of every MoE layer")
    gw = trace.gate_weights
    if gw is not None:
        if gw.shape != ids.shape or not np.issubdtype(gw.dtype, np.floating):
            raise bad("gate_weights", "wrong shape or dtype", f"{gw.shape} {gw.dtype}",
                      f"a float array of shape {ids.shape}", "store gate weights as [T, L, K] floats")
        if gw.size and (not np.isfinite(gw).all() or gw.min() < 0):
            finite = np.isfinite(gw)
            shown = float(gw[~finite].flat[0]) if not finite.all() else float(gw.min())
            raise bad("gate_weights", "gate weights must be finite and non-negative", shown,
                      "router probabilities", "store softmax/sigmoid scores, not logits")


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Write ``trace`` to ``path`` (``.npz``). Never overwrites a directory."""
    path = Path(path)
    meta = dict(trace.meta)
    meta.update(format_version=FORMAT_VERSION, model=trace.model, num_experts=int(trace.num_experts),
                layer_map=[int(x) for x in trace.layer_map], source=trace.source)
    ids = trace.expert_ids
    dtype = np.uint8 if trace.num_experts <= 256 else np.uint16 if trace.num_experts <= 65536 else np.int32
    arrays = dict(expert_ids=ids.astype(dtype), seq_lens=trace.seq_lens.astype(np.int32),
                  phase=trace.phase.astype(np.uint8), meta=np.array(json.dumps(meta, sort_keys=True)))
    if trace.gate_weights is not None:
        arrays["gate_weights"] = trace.gate_weights.astype(np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # savez would append .npz to a name without it
        np.savez_compressed(fh, **arrays)
    return path


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, after :func:`check_npz`.

    Raises:
        InputError: not a readable ``.npz``, pickled objects, or arrays too large.
    """
    return _npz(path, load=True)


def check_npz(path: str | Path) -> None:
    """Check the sizes an ``.npz`` file's headers declare, decompressing nothing.

    A few kilobytes of deflated zeros can declare gigabytes: the zip directory and every
    array's ``.npy`` header are read, and a file whose arrays would unpack beyond
    ``MAX_TRACE_ARRAY_BYTES`` is refused. Object arrays (pickles) are refused too.
    """
    _npz(path, load=False)


def _npz(path: str | Path, load: bool) -> dict[str, np.ndarray]:
    path = Path(path)
    unreadable = dict(file=path, fix="write it with numpy.savez")
    try:
        with zipfile.ZipFile(path) as zf:
            declared = 0
            for info in zf.infolist():
                declared += info.file_size
                if declared > MAX_TRACE_ARRAY_BYTES:
                    raise _too_large(path, declared)
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(fh)
                if dtype.hasobject:
                    raise InputError("the .npz holds pickled objects, which are never loaded", file=path,
                                     key=info.filename[:-4], fix="store plain numeric arrays and the metadata "
                                     "as a JSON string")
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > MAX_TRACE_ARRAY_BYTES:
                    raise _too_large(path, nbytes, info.filename[:-4])
        if not load:
            return {}
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except InputError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InputError("the .npz holds pickled objects, which are never loaded", file=path,
                             fix="store plain numeric arrays and the metadata as a JSON string") from None
        raise InputError(f"not a readable .npz file ({str(exc).splitlines()[0][:120]})", **unreadable) from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise InputError(f"not a readable .npz file ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})",
                         **unreadable) from None


def _too_large(path: Path, nbytes: int, key: str | None = None) -> InputError:
    return InputError("arrays too large", file=path, key=key, value=format_size(nbytes),
                      expected=f"at most {format_size(MAX_TRACE_ARRAY_BYTES)} unpacked",
                      fix="split the trace into smaller files (planner trace synth --like reproduces its statistics)")


def _meta_int(path: Path, meta: dict, key: str, default: Any, maximum: int) -> int:
    value = meta.pop(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise InputError("must be a non-negative integer" if not isinstance(value, int) or isinstance(value, bool)
                         else "out of range", file=path, key=f"meta.{key}", value=value,
                         expected=f"an integer in [0, {maximum}]", fix="store it as a JSON number")
    return value


def load_trace(path: str | Path) -> Trace:
    """Load and validate a trace file; every problem is one :class:`InputError` line."""
    path = Path(path)
    if not path.is_file():
        raise InputError("trace file not found", file=path, fix="check the path")
    data = read_npz(path)
    for key in ("expert_ids", "seq_lens", "meta"):
        if key not in data:
            raise InputError("required array missing", file=path, key=key, expected="expert_ids, seq_lens, meta",
                             fix="see the trace format in `planner trace --help`")
    try:
        meta = loads_json(str(data["meta"]), file=path)
        if not isinstance(meta, dict):
            raise ValueError
    except (ValueError, InputError):
        raise InputError("meta is not a JSON object", file=path, key="meta",
                         fix='store np.array(json.dumps({...}))') from None
    ids = data["expert_ids"]
    if ids.ndim != 3:
        raise InputError("wrong shape", file=path, key="expert_ids", value=ids.shape,
                         expected="[tokens, moe_layers, top_k]", fix="save expert ids as a 3-D array")
    if 0 in ids.shape:
        raise InputError("the trace is empty", file=path, key="expert_ids", value=ids.shape,
                         expected="at least one token, one MoE layer and one expert per token",
                         fix="record or synthesise a trace with tokens in it")
    if ids.size > MAX_TRACE_ENTRIES:
        raise InputError("too many expert ids", file=path, key="expert_ids", value=ids.shape,
                         expected=f"at most {MAX_TRACE_ENTRIES:,} (tokens x layers x top-k)",
                         fix="split the trace into smaller files")
    if "num_experts" not in meta:
        raise InputError("required key missing", file=path, key="meta.num_experts",
                         fix="store the number of routed experts per layer")
    version = meta.pop("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise InputError("unsupported trace format version", file=path, key="meta.format_version", value=version,
                         expected=str(FORMAT_VERSION), fix="re-export the trace with this version of moe-planner")
    T, L = ids.shape[:2]
    num_experts = _meta_int(path, meta, "num_experts", None, MAX_EXPERTS)
    layer_map = meta.pop("layer_map", list(range(L)))
    if not isinstance(layer_map, list) or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_LAYERS
                                              for x in layer_map):
        raise InputError("invalid layer_map", file=path, key="meta.layer_map", value=layer_map,
                         expected=f"a list of hidden-layer indices in [0, {MAX_LAYERS}]",
                         fix="list the hidden-layer index of every MoE layer")
    try:
        return Trace(
            expert_ids=ids, seq_lens=np.asarray(data["seq_lens"]),
            phase=np.asarray(data["phase"]) if "phase" in data else np.zeros(T, np.uint8),
            num_experts=num_experts, layer_map=tuple(layer_map),
            gate_weights=data.get("gate_weights"), model=str(meta.pop("model", "")),
            source=str(meta.pop("source", path)), meta=meta,
        )
    except InputError as exc:
        raise exc.located(file=path) from None
