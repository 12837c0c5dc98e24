"""Load a checkpoint as planned, generate greedily, measure.

    rt = load_planned_model("bundle/plan.json", "ckpt/", kernels_dir="bundle/kernels")
    tokens = rt.generate(prompt_ids, max_new_tokens=32)
    rt.metrics.to_json("metrics.json")
    rt.close()

Legend: T = tokens of a routing, L = MoE layers (plan order), K = top-k, P = prompt tokens.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cache import ExpertCache
from .checkpoint import ExpertSource, find_moe_blocks, load_dense_model, own_mapped_weights, read_config
from .dense import quantise_dense
from .devices import decoder_layers, layer_placement, place_layers, resolve_devices
from .errors import RuntimeInputError
from .formats import UNPACK_FORMATS
from .kernels import Kernels, build_kernels
from .metrics import MetricsRecorder
from .planfile import QUANT_FORMATS, RuntimePlan, parse_plan, read_plan
from .prefetch import Fetcher
from .sessions import CpuLayerKernel, CpuStreamKernel, default_threads
from .store import ExpertHome, Placeholder, PlannedExperts
from .templates import ACTIVATIONS, kernel_format

__all__ = ["DTYPES", "PlannedRuntime", "load_planned_model", "load_routing", "verify_bundle"]

DTYPES = ("auto", "float32", "bfloat16", "float16")


class PlannedRuntime:
    """A transformers model whose experts run as planned, with its metrics.

    Attributes:
        model: the HF causal LM (its MoE blocks' ``experts`` are :class:`PlannedExperts`).
        plan: the :class:`RuntimePlan`.
        stores: the expert stores in plan order.
        metrics: the :class:`MetricsRecorder` every store writes to.
        device: the torch device of the plan's ``compute_device`` (the embedding and the head).
        devices: plan device id -> torch device, for every compute device of the plan.
    """

    def __init__(self, model, plan: RuntimePlan, stores: list[PlannedExperts], metrics: MetricsRecorder, device,
                 fetchers: dict[str, Fetcher], kernels: Kernels, tmpdir: tempfile.TemporaryDirectory | None,
                 devices: dict | None = None) -> None:
        self.model, self.plan, self.stores, self.metrics, self.device = model, plan, stores, metrics, device
        self._fetchers, self.kernels, self._tmpdir = fetchers, kernels, tmpdir
        self.devices = devices or {plan.compute_device: device}

    def generate(self, input_ids: Sequence[int], max_new_tokens: int, *, eos_token_id: int | Sequence[int] | None = None
                 ) -> list[int]:
        """Greedy decoding of one prompt with the KV cache; timings go to the metrics.

        Args:
            input_ids: the prompt's token ids (P >= 1).
            max_new_tokens: tokens to generate.
            eos_token_id: stop after generating one of these (None: never stop early).

        Returns:
            The generated token ids (without the prompt).
        """
        import torch

        if len(input_ids) < 1 or max_new_tokens < 1:
            raise RuntimeInputError("need a non-empty prompt and max_new_tokens >= 1", key="--max-new-tokens",
                                    value=max_new_tokens)
        stop = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or ()))
        m = self.metrics
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)
        out_ids: list[int] = []
        with torch.no_grad():
            m.phase = "prefill"
            start = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True)
            token = int(out.logits[0, -1].argmax())  # .item(): waits for the device
            now = time.perf_counter()
            m.ttft_s.append(now - start)
            out_ids.append(token)
            past = out.past_key_values
            m.phase = "decode"
            while len(out_ids) < max_new_tokens and token not in stop:
                t0 = time.perf_counter()
                out = self.model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=past,
                                 use_cache=True)
                token = int(out.logits[0, -1].argmax())
                m.tpot_s.append(time.perf_counter() - t0)
                past = out.past_key_values
                out_ids.append(token)
            m.generated_tokens += len(out_ids)
            m.generation_s += time.perf_counter() - start
        return out_ids

    def close(self) -> None:
        """Stop the copy workers and remove temporary kernels."""
        for fetcher in self._fetchers.values():
            fetcher.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> PlannedRuntime:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _torch_dtype(dtype: Any):
    import torch

    if dtype in (None, "auto"):
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise RuntimeInputError("unknown dtype", key="--dtype", value=dtype, expected=" | ".join(DTYPES))
    return getattr(torch, dtype)


def load_routing(path: str | Path) -> np.ndarray:
    """``expert_ids [T, L, K]`` from a routing trace ``.npz`` (planner trace format)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            ids = np.asarray(data["expert_ids"])
    except FileNotFoundError:
        raise RuntimeInputError("routing file not found", file=path, fix="pass a trace .npz from planner trace record") from None
    except (KeyError, ValueError, OSError) as exc:
        raise RuntimeInputError(f"not a routing trace ({exc})", file=path, expected="an .npz with expert_ids [T, L, K]",
                                fix="pass a trace .npz from planner trace record") from None
    if ids.ndim != 3:
        raise RuntimeInputError("expert_ids must be [T, L, K]", file=path, value=ids.shape)
    return ids.astype(np.int64)


def load_planned_model(plan: str | Path | Mapping[str, Any] | RuntimePlan, checkpoint_dir: str | Path, *,
                       kernels_dir: str | Path | None = None, device: Any = None, dtype: Any = "auto",
                       threads: int | None = None, routing: np.ndarray | None = None,
                       memory_tiers: Mapping[str, str] | None = None, background: bool = True,
                       device_map: str | Mapping[str, str] | None = None,
                       bundle_devices: Mapping[str, Any] | None = None) -> PlannedRuntime:
    """Load ``checkpoint_dir`` with every MoE layer's experts placed as ``plan`` says.

    Args:
        plan: plan.json path, its parsed JSON, or a :class:`RuntimePlan`.
        checkpoint_dir: the HF safetensors checkpoint the plan was made for.
        kernels_dir: a ``kernels/`` directory from :func:`build_kernels` (a bundle's); None
            builds one in a temporary directory (quantising int8/int4 experts now).
        device: torch device for every compute device of the plan (default: see
            :func:`devices.resolve_devices`: CUDA for a GPU plan when available, else the CPU).
        device_map: ``"gpu0=cpu,gpu1=cuda:1"`` or a dict: torch devices for the plan devices
            it names (default: ``$MOE_DEVICE_MAP``); a multi-GPU plan runs each layer there.
        bundle_devices: the bundle's ``devices.json`` (plan device -> torch device and kind).
        dtype: dtype of the activations, and of the dense weights unless the plan's
            ``dense_format`` is int8/int4 (:mod:`dense`) (``auto``: the checkpoint's).
        threads: ONNX Runtime intra-op threads for CPU experts (default: all cores).
        routing: ``expert_ids [T, L, K]`` known in advance: gives ``belady`` its future,
            ``static`` its frequencies and ``oracle`` prefetch its choices. Without it,
            ``belady`` runs as ``lru`` and ``oracle`` as ``next-layer`` (noted in metrics).
        memory_tiers: memory id -> device | host | disk, overriding planfile's guess.
        background: copy hybrid-miss and prefetched experts on a worker thread / CUDA stream.

    Returns:
        A :class:`PlannedRuntime`; call ``close()`` when done.

    With glibc, this sets the process's ``mallopt(M_MMAP_THRESHOLD)`` to 1 MiB (see
    :func:`_map_large_allocations`) so that the memory held stays what the plan counts.
    """
    from transformers.activations import ACT2FN

    _map_large_allocations()
    if not isinstance(plan, RuntimePlan):
        plan = parse_plan(plan, memory_tiers=memory_tiers) if isinstance(plan, Mapping) else read_plan(
            plan, memory_tiers=memory_tiers)
    config = read_config(checkpoint_dir)
    act_name = config.get("hidden_act", "silu")
    if act_name not in ACTIVATIONS:
        raise RuntimeInputError("expert activation not supported", file=Path(checkpoint_dir) / "config.json",
                                key="hidden_act", value=act_name, expected=" | ".join(ACTIVATIONS))
    notes: list[str] = []
    devs = resolve_devices(plan, device=device, device_map=device_map, bundle_map=bundle_devices, notes=notes)
    dev = devs[plan.compute_device]  # the embedding and the head
    tmpdir = None
    if kernels_dir is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="moe-kernels-")
        kernels_dir = tmpdir.name
        build_kernels(_plan_json(plan), checkpoint_dir, kernels_dir)
    try:
        kernels = Kernels(kernels_dir, plan)
        source = ExpertSource(checkpoint_dir)
        model = load_dense_model(checkpoint_dir, dtype=_torch_dtype(dtype),
                                 make_placeholder=lambda cfg, layer: Placeholder(layer))
        blocks = find_moe_blocks(model)
        by_hidden = plan.layer_by_hidden()
        if set(blocks) != set(by_hidden):
            raise RuntimeInputError("the plan's MoE layers are not the model's", file=plan.source, key="layers",
                                    value=sorted(by_hidden), expected=f"hidden layers {sorted(blocks)}",
                                    fix="use the plan made for this checkpoint")
        for layer in plan.layers:
            num = int(blocks[layer.hidden_layer].gate.weight.shape[0])
            if num != layer.num_experts:
                raise RuntimeInputError("the plan's expert count is not the model's", file=plan.source,
                                        key=f"layers[{layer.moe_layer}].home", value=layer.num_experts,
                                        expected=f"{num} experts", fix="use the plan made for this checkpoint")
        n_threads = threads or default_threads()
        keep = [b.gate for b in blocks.values()]
        if len(set(devs.values())) > 1:  # each decoder layer quantised for the device it runs on
            layers = decoder_layers(model)
            for index, name in layer_placement(plan, layers).items():
                quantise_dense(layers[index], plan.dense_format, keep=keep, device=devs[name], threads=n_threads)
        quantise_dense(model, plan.dense_format, keep=keep, device=dev, threads=n_threads)
        # after quantise_dense: quantised dense weights are copies already, only the rest is copied
        own_mapped_weights(model, sorted(Path(checkpoint_dir).glob("*.safetensors")))
        tiers = {h: t for layer in plan.layers for h, t in zip(layer.home, layer.tier)}
        metrics = MetricsRecorder(len(plan.layers), tiers, layer_devices=[plan.device_of(i) for i in range(len(plan.layers))],
                                  host=plan.host_device, torch_devices={d: str(t) for d, t in devs.items()})
        place_layers(model, plan, devs, metrics)  # every decoder layer to its device, the rest to dev
        # one copy worker per plan device: each fetches over its own link (two GPUs copy at once)
        fetchers = {d: Fetcher(t, background=background) for d, t in devs.items()}
        stream_kernels: dict[str, CpuStreamKernel] = {}
        eviction = plan.eviction
        if eviction == "belady" and routing is None:
            eviction = "lru"
            notes.append("eviction belady needs the routing in advance (--routing); ran lru")
        prefetch = plan.prefetch
        if prefetch == "oracle" and routing is None:
            prefetch = "next-layer"
            notes.append("prefetch oracle needs the routing in advance (--routing); ran next-layer")
        if routing is not None and (routing.ndim != 3 or routing.shape[1] != len(plan.layers)):
            raise RuntimeInputError("routing does not match the plan", key="routing", value=routing.shape,
                                    expected=f"[T, {len(plan.layers)}, K]")
        stores: list[PlannedExperts] = []
        for index, layer in enumerate(plan.layers):
            name = plan.device_of(index)
            layer_dev = devs[name]
            cached = set(layer.cached)
            future = None
            if routing is not None:
                future = [int(e) for e in routing[:, index, :].reshape(-1) if 0 <= e < layer.num_experts
                          and int(e) in cached]
            cache = ExpertCache(layer.cache_slots, eviction, future=future)
            keep_host = {e for e in range(layer.num_experts)
                         if layer.tier[e] == "host" and (layer.site[e] in ("fetch", "hybrid", "stream")
                                                         or layer.format[e] in UNPACK_FORMATS)}
            home = ExpertHome(layer, source, kernels, metrics, pin=layer_dev.type == "cuda", keep_host=keep_host,
                              device_name=name, host_memory=plan.host_device)
            # unpack formats have no ONNX Runtime kernel: the CPU unpacks them in torch (store._run_cpu)
            cpu_host = [e for e in layer.on_cpu if layer.tier[e] == "host" and layer.format[e] not in UNPACK_FORMATS]
            if layer_dev.type == "cpu":
                # no accelerator: resident int8/int4 experts run in the layer's ONNX Runtime
                # session too (MatMulNBits kernels) instead of being dequantised at every call
                # (a nested expert holding its high plane alone is unpacked by torch, expert_home.HIGH_PLANES)
                cpu_host += [e for e in layer.experts_at("resident") if layer.format[e] in QUANT_FORMATS
                             and layer.planes_of(e) in ("", "both")]
            cpu_kernel = None
            if cpu_host:
                arrays = {e: (layer.format[e], (home.host.get(e) or home.read(e)).numpy_inputs()) for e in cpu_host}
                cpu_kernel = CpuLayerKernel(kernels.templates, arrays, threads=n_threads)
            for e in layer.on_cpu:
                kfmt = kernel_format(layer.format[e])
                if layer.tier[e] == "disk" and kfmt not in stream_kernels and kfmt not in UNPACK_FORMATS:
                    stream_kernels[kfmt] = CpuStreamKernel(kernels.templates[kfmt], threads=n_threads)
            block = blocks[layer.hidden_layer]
            store = PlannedExperts(layer, home, layer_dev, ACT2FN[act_name], kernels.hidden, kernels.inter, cache,
                                   fetchers[name],
                                   cpu_kernel, stream_kernels, metrics, index, threads=n_threads)
            store.prefetch_policy = prefetch
            store.oracle = routing
            block.experts = store
            stores.append(store)
        ordered = sorted(zip(plan.layers, stores), key=lambda ls: ls[0].hidden_layer)
        for layer in plan.layers:  # a task-specific plan: the router picks among the kept experts
            if layer.dropped:
                mask_router(blocks[layer.hidden_layer].gate, layer.dropped)
        for (_, store), (nxt_layer, nxt_store) in itertools.pairwise(ordered):
            store.link_next(blocks[nxt_layer.hidden_layer].gate, nxt_store)
        metrics.reset()  # loading moved bytes too: count from the first step
        for note in notes:
            metrics.note(note)
        _trim_heap()
    except BaseException:
        if tmpdir is not None:
            tmpdir.cleanup()
        raise
    return PlannedRuntime(model, plan, stores, metrics, dev, fetchers, kernels, tmpdir, devs)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _glibc_call(name: str, *args: int) -> None:
    """Call a glibc malloc function, or nothing where the C library is not glibc."""
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return
    fn(*args)


def _map_large_allocations() -> None:
    """Have glibc serve blocks of 1 MiB and more from memory maps of their own, given back to
    the OS when freed (``mallopt(M_MMAP_THRESHOLD)``; process-wide). By default glibc raises
    that threshold to the size of each mapped block freed (up to 32 MiB) and serves later
    blocks from its heap, which keeps what is freed: the ONNX Runtime sessions built and
    dropped as int8 experts enter and leave the cache left 25-40 MiB there on the benchmark's
    int8 plan, past what the plan counts (254 MiB planned; 293-303 MiB held by default,
    239 MiB with this)."""
    _glibc_call("mallopt", _M_MMAP_THRESHOLD, 1 << 20)


def mask_router(router: Any, dropped: Sequence[int]) -> None:
    """Make ``router`` (a transformers top-k router: ``(logits, weights, indices)``) take its top-k
    among the experts not in ``dropped``: their logits are -inf before the softmax, and the
    kept weights are renormalised where the router renormalises (``norm_topk_prob``, Mixtral
    always). Softmax routers only (Mixtral, Qwen-MoE, OLMoE)."""
    import torch

    if hasattr(router, "e_score_correction_bias") or getattr(router, "n_group", None):  # DeepSeek-V3: sigmoid, groups
        raise RuntimeInputError("dropped experts are masked only in softmax routers", key="dropped_experts",
                                value=type(router).__name__, expected="a Mixtral, Qwen-MoE or OLMoE router",
                                fix="re-plan without --drop-below")
    gone = torch.tensor(sorted(dropped), dtype=torch.long)

    def hook(module, args, out):
        logits, weights, indices = out
        probs = torch.softmax(logits.float().index_fill(-1, gone.to(logits.device), float("-inf")), dim=-1)
        top, chosen = torch.topk(probs, indices.shape[-1], dim=-1)
        if getattr(module, "norm_topk_prob", True):
            top = top / top.sum(dim=-1, keepdim=True)
        return logits, top.to(weights.dtype), chosen.to(indices.dtype)

    router.register_forward_hook(hook)


def _trim_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc's ``malloc_trim``): what loading
    allocated and freed (the quantiser's and the loader's temporaries) otherwise stays counted
    as the process's memory."""
    _glibc_call("malloc_trim", 0)


def _plan_json(plan: RuntimePlan) -> dict[str, Any]:
    """A RuntimePlan back as plan JSON (enough for build_kernels)."""
    return {"format_version": 1, "compute_device": plan.compute_device, "host_device": plan.host_device,
            "prefetch": plan.prefetch, "eviction": plan.eviction, "dense_format": plan.dense_format,
            "layers": [{"moe_layer": layer.moe_layer, "hidden_layer": layer.hidden_layer, "home": list(layer.home),
                        "format": list(layer.format), "site": list(layer.site), "cache_slots": layer.cache_slots,
                        **({"planes": list(layer.planes)} if layer.planes else {}),
                        **({"miss_copy": dict(zip(("format", "gate_below"), layer.miss_copy))}
                           if layer.miss_copy else {})}
                       for layer in plan.layers]}


def verify_bundle(bundle_dir: str | Path) -> None:
    """Refuse a bundle whose files changed: ``manifest.json`` lists ``files`` as
    ``{relative path: sha256}``; every listed file must exist inside the bundle and match."""
    bundle = Path(bundle_dir).resolve()
    path = bundle / "manifest.json"
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RuntimeInputError(f"not valid JSON ({exc})", file=path, fix="re-export the bundle") from None
    files = manifest.get("files", {}) if isinstance(manifest, dict) else {}
    if isinstance(files, list):
        files = {f.get("path"): f.get("sha256") for f in files if isinstance(f, dict)}
    for rel, digest in sorted(files.items()):
        target = (bundle / str(rel)).resolve()
        if bundle not in target.parents:
            raise RuntimeInputError("path escapes the bundle", file=path, key=f"files.{rel}",
                                    fix="re-export the bundle")
        if not target.is_file():
            raise RuntimeInputError("file listed in the manifest is missing", file=path, key=f"files.{rel}",
                                    fix="re-export the bundle")
        h = hashlib.sha256(target.read_bytes()).hexdigest()
        if h != digest:
            raise RuntimeInputError("file changed since export (sha256 differs)", file=target,
                                    fix="re-export the bundle, or restore the file")
