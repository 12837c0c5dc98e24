"""Deployment bundles: a directory that serves a model exactly as planned.

Layout::

    manifest.json    format version, tool and library versions, sha256 of every other file
    plan.json        the plan
    hardware.yaml    the hardware profile it was made for
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
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

from planner.plan import Plan
from profiles.errors import InputError
from profiles.hardware import Hardware, HardwareProfile
from profiles.models import ModelSpec

__all__ = ["BUNDLE_FORMAT_VERSION", "Bundle", "check_manifest", "write_bundle"]

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
        commands.update(_engines(plan, model, hardware, work, ckpt, notes))
        (work / "run.py").write_text(_RUN_PY, encoding="utf-8")
        commands["run"] = f"python {out}/run.py --checkpoint {ckpt} --prompt 'the cat sat on the mat'"
        commands["verify"] = f"planner verify {out} --checkpoint {ckpt}"
        (work / "README.md").write_text(_readme(plan, model, hardware, commands, notes), encoding="utf-8")
        files = sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file())
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


def _engines(plan: Plan, model: ModelSpec, hardware: Hardware, work: Path, ckpt: str, notes: list[str]) -> dict:
    """Engine configs under ``work/engines``: SGLang/vLLM/ExFlow for expert-parallel plans, else
    llama.cpp/accelerate/accelerator maps."""
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
                result = writer(plan, work / "engines", **kwargs)
            except InputError as exc:
                notes.append(f"{name}: not written ({exc})")
                continue
            if result.command:
                commands[name] = result.command
        return commands
    from .engines.single import render_engines

    rendered = render_engines(plan, model, hardware, work, checkpoint=ckpt)
    commands.update(rendered.commands)
    notes += [f"{name}: not written ({why})" for name, why in rendered.skipped.items()]
    return commands


def check_manifest(bundle_dir: str | Path) -> dict:
    """Refuse a bundle whose files changed, went missing, were added under its listed
    directories' names, or escape it; returns the manifest."""
    bundle = Path(bundle_dir).resolve()
    path = bundle / "manifest.json"
    if not path.is_file():
        raise InputError("not a bundle (no manifest.json)", file=bundle, fix="pass a directory from planner export")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"manifest is not valid JSON ({exc})", file=path, fix="re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise InputError("unsupported bundle format", file=path, key="format_version",
                         value=manifest.get("format_version") if isinstance(manifest, dict) else None,
                         expected=str(BUNDLE_FORMAT_VERSION), fix="re-export the bundle with this version")
    for rel, digest in sorted(manifest.get("files", {}).items()):
        target = (bundle / rel).resolve()
        if bundle not in target.parents:
            raise InputError("path escapes the bundle", file=path, key=f"files.{rel}", fix="re-export the bundle")
        if not target.is_file():
            raise InputError("file listed in the manifest is missing", file=path, key=f"files.{rel}",
                             fix="re-export the bundle")
        if _sha256(target) != digest:
            raise InputError("file changed since export (sha256 differs)", file=target,
                             fix="re-export the bundle, or restore the file")
    return manifest


_RUN_PY = '''#!/usr/bin/env python3
"""Serve this bundle: python run.py --checkpoint CKPT --prompt "..." [--max-new-tokens N] [--metrics-out F].

Needs torch, transformers, safetensors, onnx and onnxruntime; checks manifest.json first.
"""
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))
from runtime.run import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--bundle" not in args and "--plan" not in args:
        args = ["--bundle", str(here), *args]
    sys.exit(main(args))
'''


def _readme(plan: Plan, model: ModelSpec, hardware: Hardware, commands: dict[str, str], notes: list[str]) -> str:
    lines = [f"# {model.name} on {hardware.name}, as planned", "",
             (f"Plan: objective {plan.objective}, batch {plan.batch_size}, context {plan.context_tokens}; "
             f"predicted {plan.predicted.get('tokens_per_s', float('nan')):.2f} tok/s."), "",
             "## Run", "", "```bash", commands["run"], "```", "",
             "Metrics (tok/s, TTFT, TPOT, per-layer hit rates, bytes moved) go to `--metrics-out FILE`.", "",
             "## Check prediction against measurement", "", "```bash", commands["verify"], "```", "",
             "## The same plan for other engines", ""]
    for name, command in commands.items():
        if name not in ("run", "verify"):
            lines += [f"{name}:", "", "```bash", command, "```", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += [("Every file is listed with its sha256 in `manifest.json`; `run.py` refuses a bundle whose "
              "files changed."), ""]
    return "\n".join(lines)
