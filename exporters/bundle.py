"""Deployment bundles: a directory that serves a model exactly as planned.

Layout::

    manifest.json    format version, tool and library versions, sha256 of every other file
    plan.json        the plan
    hardware.yaml    the hardware profile it was made for
    devices.json     the plan's compute devices as torch devices (node/gpu1 -> cuda:1)
    model.json       the model spec
    runtime/         the runtime package (runs with torch + onnxruntime + transformers alone)
    kernels/         ONNX expert kernels and quantised expert weights (needs --checkpoint)
    engines/         the same plan for llama.cpp / accelerate / accelerators, or SGLang / vLLM
    run.py           python run.py --checkpoint CKPT --prompt "..."
    README.md        the exact commands

A bundle is written to a temporary directory beside its destination and moved into place
at the end, so a failed export never leaves half a bundle or touches an existing one;
``--force`` replaces an earlier bundle (a directory holding a ``manifest.json``), nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

from planner.plan import Plan

from .bundle_readme import readme
from profiles.errors import InputError
from profiles.hardware import Hardware, HardwareProfile
from profiles.models import ModelSpec

__all__ = ["BUNDLE_FORMAT_VERSION", "Bundle", "bundle_problem", "check_manifest", "write_bundle"]

BUNDLE_FORMAT_VERSION = 1
RUNTIME_DIR = Path(__file__).resolve().parent / "runtime"
_LIBRARIES = ("numpy", "torch", "transformers", "safetensors", "onnx", "onnxruntime", "onnx-ir")


@dataclass(frozen=True)
class Bundle:
    """What :func:`write_bundle` wrote."""

    path: Path
    files: tuple[str, ...]
    commands: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str | None]:
    out = {}
    for name in ("moe-planner", *_LIBRARIES):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_bundle(plan: Plan, *, model: ModelSpec, hardware: Hardware, profile: HardwareProfile, out_dir: str | Path,
                 checkpoint: str | Path | None = None, force: bool = False) -> Bundle:
    """Write the bundle of ``plan`` to ``out_dir`` (see the module docstring).

    Args:
        plan: the plan to serve.
        model, hardware, profile: what it was planned for (the profile is copied in as YAML).
        out_dir: the bundle directory; must not exist, unless it is an earlier bundle and
            ``force`` is set.
        checkpoint: the HF safetensors checkpoint; with it the ONNX kernels and quantised
            weights are built now, without it ``run.py`` builds them at start-up.
    """
    out = Path(out_dir)
    if len(plan.layers) != model.num_moe_layers or any(len(lp.home) != model.num_experts for lp in plan.layers):
        raise InputError("the plan does not match the model", key="layers",
                         value=f"{len(plan.layers)} MoE layers x {len(plan.layers[0].home) if plan.layers else 0} experts",
                         expected=f"{model.num_moe_layers} x {model.num_experts} ({model.name})",
                         fix="export with the model (or checkpoint) the plan was made for")
    _refuse_formats_the_runtime_does_not_run(plan)
    devices = _device_map(plan, hardware)
    if out.exists():
        if not (out / "manifest.json").is_file():
            raise InputError("the output exists and is not a bundle", file=out,
                             fix="choose a new --out directory (nothing there is overwritten)")
        if not force:
            raise InputError("a bundle is there already", file=out, fix="pass --force to replace it")
    if checkpoint is not None:
        _check_checkpoint(Path(checkpoint), model)
    out.parent.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    commands: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        work = Path(tmp) / "bundle"
        work.mkdir()
        (work / "plan.json").write_text(plan.to_json(), encoding="utf-8")
        (work / "devices.json").write_text(json.dumps(devices, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        (work / "hardware.yaml").write_text(yaml.safe_dump(profile.model_dump(mode="json", exclude_none=True),
                                                           sort_keys=False), encoding="utf-8")
        (work / "model.json").write_text(json.dumps(dataclasses.asdict(model), indent=1, sort_keys=True,
                                                    default=str) + "\n", encoding="utf-8")
        shutil.copytree(RUNTIME_DIR, work / "runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if checkpoint is not None:
            try:
                from .runtime import build_kernels
            except ImportError as exc:
                raise InputError(f"building kernels needs the runtime extra ({exc.name} is missing)",
                                 fix="pip install torch==2.13.0 && pip install 'moe-planner[runtime]', "
                                     "or export without --checkpoint") from None
            build_kernels(work / "plan.json", checkpoint, work / "kernels")
        else:
            notes.append("no --checkpoint: kernels/ is built by run.py at start-up")
        ckpt = str(checkpoint) if checkpoint is not None else "CHECKPOINT_DIR"
        commands.update(_engines(plan, model, hardware, work, out, ckpt, notes))
        (work / "run.py").write_text(_run_py(), encoding="utf-8")
        commands["run"] = f"python {out}/run.py --checkpoint {ckpt} --prompt 'the cat sat on the mat'"
        commands["verify"] = f"planner verify {out} --checkpoint {ckpt}"
        (work / "README.md").write_text(readme(plan, model, hardware, commands, notes, devices),
                                        encoding="utf-8")
        files = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
        _refuse_staging_paths(Path(tmp), work, files, commands, notes)
        manifest = {"format_version": BUNDLE_FORMAT_VERSION, "versions": _versions(),
                    "plan": {"model": plan.inputs.model, "hardware": plan.inputs.hardware,
                             "workload_digest": plan.inputs.workload_digest},
                    "files": {f: _sha256(work / f) for f in files}}
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():  # an earlier bundle (checked above): swap it out only now
            old = Path(tmp) / "old"
            out.rename(old)
        work.rename(out)
    return Bundle(path=out, files=("manifest.json", *files), commands=commands, notes=tuple(notes))


def _device_map(plan: Plan, hardware: Hardware) -> dict:
    """``devices.json``: each compute device of the plan (``compute_device`` and, for a
    multi-GPU pipeline plan, ``layer_devices``) as a torch device: a GPU as ``cuda:N``, N its
    position among its node's GPUs in the hardware profile, a CPU as ``cpu``. ``run.py
    --device-map`` overrides it at run time. A layer device the runtime does not run layers on
    (an accelerator) is refused here in one line; a one-device plan runs on CUDA or the CPU as
    before (``cpu`` for any device that is not a GPU)."""
    out = {}
    for name in dict.fromkeys((plan.compute_device, *(plan.layer_devices or ()))):
        dev = hardware.devices.get(name)
        kind = dev.kind if dev is not None else "gpu"  # a profile without it: the plan's word for it
        if kind not in ("gpu", "cpu") and plan.layer_devices:
            raise InputError(f"the bundle runtime does not run layers on an {kind}", key="layer_devices", value=name,
                             expected="GPUs (or the CPU of a CPU-only plan)",
                             fix="re-plan with `planner optimize --parallel offload` (the GPU alone) to export a bundle")
        gpus = [d.id for d in hardware.devices_of_kind("gpu") if dev is None or d.node == dev.node]
        torch_device = f"cuda:{gpus.index(name) if name in gpus else 0}" if kind == "gpu" else "cpu"
        out[name] = {"torch": torch_device, "kind": kind}
    return {"format_version": 1, "devices": out}


def _refuse_formats_the_runtime_does_not_run(plan: Plan) -> None:
    """The bundle runtime runs the formats its engine profile lists for a GPU or a CPU
    (profiles/engines/bundle.yaml; a test holds them equal to the runtime's own list): a plan
    made for another engine's formats (a GGUF type, a user format) is refused here, not when
    run.py meets it."""
    from profiles.engines import load_engine

    engine = load_engine("bundle")
    runs = sorted({fm for kind in ("gpu", "cpu") for fm in engine.kind_spec(kind).kernels
                   if engine.supports(kind, fm)})
    wanted = [("dense_format", plan.dense_format)] + [(f"layers[{i}].format[{e}]", fm) for i, lp in
                                                      enumerate(plan.layers) for e, fm in enumerate(lp.format)]
    for key, fm in wanted:
        if fm not in runs:
            raise InputError(f"the bundle runtime does not run format {fm!r}", key=key, value=fm,
                             expected=" | ".join(runs),
                             fix=f"re-plan for the bundle (`planner optimize --engine bundle --formats "
                                 f"{','.join(f for f in runs if f != 'fp32')}` or a subset)")


def _check_checkpoint(path: Path, model: ModelSpec) -> None:
    from profiles.models import load_model

    config = path / "config.json"
    if not config.is_file():
        raise InputError("not an HF checkpoint (no config.json)", file=path,
                         fix="pass the directory save_pretrained wrote")
    ckpt = load_model(config)
    if (ckpt.num_moe_layers, ckpt.num_experts, ckpt.hidden_size, ckpt.expert_intermediate_size) != (
            model.num_moe_layers, model.num_experts, model.hidden_size, model.expert_intermediate_size):
        raise InputError("the checkpoint is not the model the plan was made for", file=config,
                         value=f"{ckpt.num_moe_layers} MoE layers x {ckpt.num_experts} experts, H={ckpt.hidden_size}",
                         expected=f"{model.num_moe_layers} x {model.num_experts}, H={model.hidden_size} ({model.name})",
                         fix="plan with --model CHECKPOINT/config.json, or export with the matching checkpoint")


def _engines(plan: Plan, model: ModelSpec, hardware: Hardware, work: Path, out: Path, ckpt: str,
             notes: list[str]) -> dict:
    """Engine configs under ``work/engines``: SGLang/vLLM/ExFlow for expert-parallel plans, else
    llama.cpp/accelerate/accelerator maps. Files are written under ``work`` (the staging
    directory); every path the commands and files name is under ``out``, where the bundle ends up."""
    commands: dict[str, str] = {}
    from .engines.sglang import is_expert_parallel

    if is_expert_parallel(plan):
        from .engines.exflow import write_exflow
        from .engines.sglang import write_sglang
        from .engines.vllm import write_vllm, write_vllm_ascend

        for name, writer in (("sglang", write_sglang), ("vllm", write_vllm), ("vllm-ascend", write_vllm_ascend),
                             ("exflow", write_exflow)):
            try:
                kwargs = {} if name == "exflow" else {"model_path": ckpt}
                result = writer(plan, work / "engines", refer_dir=out / "engines", **kwargs)
            except InputError as exc:
                notes.append(f"{name}: not written ({exc})")
                continue
            if result.command:
                commands[name] = result.command
            notes += [f"{name}: {note}" for note in result.notes]
        return commands
    from .engines.single import render_engines

    rendered = render_engines(plan, model, hardware, work, checkpoint=ckpt, refer_dir=out)
    commands.update(rendered.commands)
    notes += [f"{name}: not written ({why})" for name, why in rendered.skipped.items()]
    return commands


def _refuse_staging_paths(staging: Path, work: Path, files: list[str], commands: dict[str, str],
                          notes: list[str]) -> None:
    """The staging directory is gone when export returns: no command, note or written text may
    name it (a writer given the staging path instead of the final one is a bug, not bad input)."""
    needle = str(staging)
    texts = {f"command {k}": v for k, v in commands.items()} | {f"note {n}": n for n in notes}
    for rel in files:
        try:
            texts[rel] = (work / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:  # kernels, weights: binary
            continue
    for where, text in texts.items():
        if needle in text:
            raise RuntimeError(f"bundle writer bug: {where} names the staging directory {needle}")


def check_manifest(bundle_dir: str | Path) -> dict:
    """Refuse a bundle whose files changed, went missing, are not listed, are symbolic links
    or escape it (:func:`bundle_problem`); returns the manifest.

    Raises:
        InputError: the first problem, in one line.
    """
    bundle = Path(bundle_dir).resolve()
    problem = bundle_problem(bundle)
    if problem is not None:
        what, where, fix = problem
        raise InputError(what, file=where, fix=fix)
    return json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))


def bundle_problem(bundle: Path) -> tuple[str, str, str] | None:
    """The first thing wrong with the bundle directory ``bundle`` (an absolute path) as
    ``(what, where, fix)``, or None when it is exactly what was exported.

    Exactly: ``manifest.json`` of this format version lists every other file with its sha256;
    each listed file is there, a regular file inside the bundle, unchanged; no file is there
    that the manifest does not list, except ``__pycache__/*.pyc`` (never read: ``run.py``
    moves Python's bytecode cache elsewhere); nothing is a symbolic link. Directories are not
    listed (an empty one, such as ``kernels/weights/`` without quantised weights, is fine).

    Standard library only, with its imports inside: ``run.py`` carries this function's source
    and calls it before it imports anything of the bundle's.
    """
    import hashlib
    import json
    import os

    fix = "re-export the bundle (planner export PLAN.json --out DIR --force)"
    manifest_path = os.path.join(bundle, "manifest.json")
    if os.path.islink(manifest_path) or not os.path.isfile(manifest_path):
        return "not a bundle (no manifest.json)", str(bundle), "pass a directory from planner export"
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError, RecursionError) as exc:
        return f"manifest.json is not valid JSON ({exc})", manifest_path, fix
    if not isinstance(manifest, dict) or manifest.get("format_version") != 1:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        return f"unsupported bundle format {version!r} (expected 1)", manifest_path, fix
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "manifest.json lists no files", manifest_path, fix
    for rel, digest in sorted(files.items(), key=lambda kv: str(kv[0])):
        parts = rel.split("/") if isinstance(rel, str) else [""]
        if not isinstance(digest, str) or rel.startswith("/") or "\\" in rel or any(
                p in ("", ".", "..") for p in parts) or rel == "manifest.json":
            return f"manifest entry {rel!r} is not a path inside the bundle with a sha256", manifest_path, fix
        path = str(bundle)
        for part in parts:
            path = os.path.join(path, part)
            if os.path.islink(path):
                return f"{rel} is a symbolic link (an exported bundle holds none)", path, fix
        if not os.path.isfile(path):
            return f"{rel}, listed in manifest.json, is missing", path, fix
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != digest:
            return f"{rel} changed since export (sha256 differs)", path, "re-export the bundle, or restore the file"
    for root, dirs, names in os.walk(bundle):  # does not follow links: each one is reported below
        rel_root = os.path.relpath(root, bundle).replace(os.sep, "/")
        rel_root = "" if rel_root == "." else rel_root + "/"
        for name in sorted(dirs) + sorted(names):
            path = os.path.join(root, name)
            rel = rel_root + name
            if os.path.islink(path):
                return f"{rel} is a symbolic link (an exported bundle holds none)", path, fix
            if os.path.isdir(path):
                if name == "__pycache__" and all(
                        n.endswith(".pyc") and os.path.isfile(os.path.join(path, n))
                        and not os.path.islink(os.path.join(path, n)) for n in os.listdir(path)):
                    dirs.remove(name)  # Python's bytecode cache: run.py never reads it
                continue  # a directory holds nothing by itself: its files are checked as the walk goes on
            if rel != "manifest.json" and rel not in files:
                return f"{rel} is not listed in manifest.json", path, "remove it, or re-export the bundle"
    return None


_RUN_PY_HEAD = '''#!/usr/bin/env python3
"""Serve this bundle: python run.py --checkpoint CKPT --prompt "..." [--max-new-tokens N] [--metrics-out F]
[--device-map gpu0=cuda:0,gpu1=cpu] (plan devices to torch devices; default: devices.json).

Needs torch, transformers, safetensors, onnx and onnxruntime. Before it imports anything of
the bundle's, it checks the whole bundle against manifest.json with the standard library
alone: every listed file unchanged, nothing missing, nothing unlisted, no symbolic links.
"""
import sys
from pathlib import Path

'''

_RUN_PY_MAIN = '''

def _source_only_finder(root):
    """A path hook for directories inside ``root``: their modules are compiled from source."""
    import importlib.machinery as machinery

    class SourceOnly(machinery.SourceFileLoader):
        def get_code(self, fullname):
            return compile(self.get_data(self.path), self.path, "exec", dont_inherit=True)

    def finder(path):
        if not Path(path).resolve().is_relative_to(root):
            raise ImportError("not the bundle's")
        return machinery.FileFinder(path, (SourceOnly, machinery.SOURCE_SUFFIXES))
    return finder


def _check(here):
    problem = bundle_problem(here)
    if problem is not None:
        what, where, fix = problem
        print(f"error: {where}: {what}. Fix: {fix}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    _check(here)
    # the bundle's own modules compile from their checked sources, never from a bytecode cache
    # (an in-bundle __pycache__ is not in the manifest's hashes); the libraries keep theirs
    sys.dont_write_bytecode = True
    sys.path_hooks.insert(0, _source_only_finder(here))
    sys.path_importer_cache.clear()
    sys.path.insert(0, str(here))
    from runtime.run import main

    args = sys.argv[1:]
    if "--bundle" not in args and "--plan" not in args:
        args = ["--bundle", str(here), *args]
    sys.exit(main(args))
'''


def _run_py() -> str:
    """``run.py``: :func:`bundle_problem`'s own source, then the launcher that calls it."""
    return _RUN_PY_HEAD + "\n" + inspect.getsource(bundle_problem) + _RUN_PY_MAIN
