"""Measured expert quality (issue 16 item 2): `planner quality measure` on a tiny random
Mixtral checkpoint, super-expert flags on a planted outlier expert, `optimize --quality`
keeping a planted sensitive expert wider than the constant model does, and bad quality
files as one-line errors.

The measuring tests need the ``[runtime]`` extra and skip without it; the planner tests do not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from planner.costs import QUANT_ERROR
from planner.plan_digest import model_digest
from profiles.formats import get_format
from profiles.models import load_model
from profiles.quality import SCHEMA, file_digest
from profiles.workload.synthetic import SyntheticWorkload, generate
from profiles.workload.trace import save_trace

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "tests" / "data" / "prompts.txt"
SKIP_REASON = "needs the [runtime] extra: pip install torch==2.13.0 && pip install 'moe-planner[runtime]'"
FULL = {"fp32", "bf16", "fp16"}
MEASURED = ("bf16", "int8", "int4", "int3", "int2")  # strictly fewer bits left to right
OUTLIER = (1, 3)  # (MoE layer, expert) whose down_proj is scaled up
SCALE = 200.0


def assert_one_line_error(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


# -- measuring (runtime extra) ------------------------------------------------------------

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A tiny random Mixtral (2 MoE layers x 4 experts, H = 128, I = 64) with expert 3 of
    MoE layer 1 given SCALE x its down_proj weights, measured by the CLI."""
    torch = pytest.importorskip("torch", reason=SKIP_REASON)
    transformers = pytest.importorskip("transformers", reason=SKIP_REASON)
    pytest.importorskip("onnxruntime", reason=SKIP_REASON)
    from click.testing import CliRunner

    from planner.cli import cli
    from test_recorder import FAMILIES, save_tokenizer

    config = transformers.MixtralConfig(**dict(FAMILIES["mixtral"].config, hidden_size=128, intermediate_size=64))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        l, e = OUTLIER
        model.model.layers[l].mlp.gate.weight.normal_(0.0, 0.2)
        model.model.layers[l].mlp.experts.down_proj[e] *= SCALE
    directory = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(directory)
    save_tokenizer(transformers, directory)
    out = directory / "quality.json"
    res = CliRunner().invoke(cli, ["quality", "measure", "--checkpoint", str(directory), "--prompts", str(PROMPTS),
                                   "--generate", "2", "--formats", ",".join(MEASURED), "--tokens-per-expert", "16",
                                   "--out", str(out)], catch_exceptions=True)
    assert res.exit_code == 0, res.output
    return directory, out, json.loads(out.read_text())


def test_measured_errors_grow_as_bits_shrink(measured):
    _, _, doc = measured
    experts = [ex for layer in doc["layers"] for ex in layer["experts"]]
    sampled = [ex for ex in experts if ex["tokens"]]
    assert len(sampled) >= 6 and all(ex["tokens"] <= 16 for ex in experts)
    ordered = [ex for ex in sampled if all(ex["error"][a] < ex["error"][b] for a, b in zip(MEASURED, MEASURED[1:]))]
    assert len(ordered) >= 0.75 * len(sampled), [ex["error"] for ex in sampled]
    for ex in sampled:  # bf16 rounding is ~2^-9 relative; int2 loses most of the signal
        assert ex["error"]["bf16"] < 0.01 and 0.2 < ex["error"]["int2"] < 1.5, ex["error"]


def test_planted_outlier_expert_is_the_only_super_expert(measured):
    _, _, doc = measured
    flagged = [(layer["moe_layer"], ex["expert"]) for layer in doc["layers"] for ex in layer["experts"]
               if ex["super_expert"]]
    assert flagged == [OUTLIER]
    layer = doc["layers"][OUTLIER[0]]["experts"]
    others = [ex["down_out_max_abs"] for ex in layer if ex["expert"] != OUTLIER[1] and ex["tokens"]]
    assert layer[OUTLIER[1]]["down_out_max_abs"] > 10 * max(others)
    # a relative error does not see the scale: the outlier's int4 error is like its neighbours'
    assert layer[OUTLIER[1]]["error"]["int4"] < 3 * max(ex["error"]["int4"] for ex in layer if ex["tokens"])


def test_critical_auto_pins_the_flagged_expert_and_the_plan_records_the_file(measured, run_cli, tmp_path):
    directory, quality, _ = measured
    plan = tmp_path / "plan.json"
    res = run_cli("optimize", "-m", directory, "--quality", quality, "--critical", "auto", "--parallel", "offload",
                  "--formats", "bf16,int8,int4", "--quality-budget", "1", "--out", plan)
    assert res.exit_code == 0, res.output
    data = json.loads(plan.read_text())
    assert data["inputs"]["quality_digest"] == file_digest(quality)
    l, e = OUTLIER
    assert data["layers"][l]["format"][e] in FULL


# -- the planner with a quality file (no torch) ------------------------------------------------

L, E = 2, 8
FORMATS = ("bf16", "int8", "int4")
BIG = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
       "intermediate_size": 14336, "num_hidden_layers": L, "num_attention_heads": 32, "num_key_value_heads": 8,
       "num_local_experts": E, "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
       "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "hidden_act": "silu"}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A two-layer Mixtral-8x7B-sized config and a skewed trace: on the 8 GB laptop the plan
    keeps the two hottest experts of each layer at bf16 and the rest at int4."""
    directory = tmp_path_factory.mktemp("big")
    (directory / "config.json").write_text(json.dumps(BIG))
    spec = load_model(directory)
    trace = generate(SyntheticWorkload(num_layers=L, num_experts=E, top_k=2, popularity=[[8, 4, 2, 1, 1, 1, 1, 1]] * L,
                                       num_sequences=4, prompt_tokens=40, output_tokens=32, seed=5, model=spec.name))
    path = save_trace(trace, directory / "trace.npz")
    return directory, path, spec


def quality_doc(spec, errors: dict[str, np.ndarray], super_experts=()) -> dict:
    return {"schema": SCHEMA, "model": spec.name, "model_digest": model_digest(spec), "checkpoint": "x",
            "formats": list(errors), "metric": "test", "tokens_per_expert": 8, "super_expert_rule": "test",
            "outlier_factor": 10.0, "prompts": 1,
            "layers": [{"moe_layer": l, "hidden_layer": l, "experts": [
                {"expert": e, "tokens": 8, "error": {fm: float(errors[fm][l, e]) for fm in errors},
                 "down_in_max_abs": 1.0, "down_out_max_abs": 1.0, "super_expert": (l, e) in super_experts}
                for e in range(E)]} for l in range(L)]}


def _bits(fm: str) -> float:
    return get_format(fm).bits_per_weight


def test_a_ten_times_more_sensitive_expert_is_kept_wider(big, run_cli, tmp_path):
    directory, trace, spec = big
    args = ["optimize", "-H", "laptop-4060", "-m", directory, "-t", trace, "--formats", ",".join(FORMATS),
            "--parallel", "offload"]
    res = run_cli(*args, "--out", tmp_path / "free.json")
    assert res.exit_code == 0, res.output
    free = json.loads((tmp_path / "free.json").read_text())
    budget = free["quality_error"]
    from planner.workload_view import planning_stats
    from profiles.workload.trace import load_trace

    w = planning_stats(load_trace(trace), real_experts=E).importance  # [L, E]
    # the most important expert of layer 0 that the constant model stores at int4
    e = max((x for x in range(E) if free["layers"][0]["format"][x] == "int4"), key=lambda x: w[0, x])
    # 10x its int4 error alone exceeds the budget, whatever the other experts hold: any plan
    # must store it wider than int4
    assert w[0, e] * 10 * QUANT_ERROR["int4"] / w.sum() > budget
    errors = {fm: np.full((L, E), QUANT_ERROR[fm]) for fm in FORMATS}
    errors["int4"][0, e] *= 10
    qfile = tmp_path / "quality.json"
    qfile.write_text(json.dumps(quality_doc(spec, errors)))
    budget_args = ["--quality-budget", repr(budget * (1 + 1e-9))]
    res = run_cli(*args, *budget_args, "--out", tmp_path / "const.json")
    assert res.exit_code == 0, res.output
    const = json.loads((tmp_path / "const.json").read_text())
    assert const["layers"][0]["format"][e] == "int4"
    res = run_cli(*args, *budget_args, "--quality", qfile, "--out", tmp_path / "measured.json")
    assert res.exit_code == 0, res.output
    measured = json.loads((tmp_path / "measured.json").read_text())
    assert _bits(measured["layers"][0]["format"][e]) > _bits("int4")
    # the same rank in layer 1 (same statistics, constant error) stays at int4
    rank = list(np.argsort(-w[0], kind="stable")).index(e)
    e1 = int(np.argsort(-w[1], kind="stable")[rank])
    assert measured["layers"][1]["format"][e1] == "int4"
    assert measured["inputs"]["quality_digest"] == file_digest(qfile)
    assert "quality_digest" not in const["inputs"]


def test_critical_auto_pins_what_the_file_flags(big, run_cli, tmp_path):
    directory, trace, spec = big
    errors = {fm: np.full((L, E), QUANT_ERROR[fm]) for fm in FORMATS}
    qfile = tmp_path / "quality.json"
    qfile.write_text(json.dumps(quality_doc(spec, errors, super_experts={(1, 7)})))  # a cold expert: int4 otherwise
    args = ["optimize", "-H", "laptop-4060", "-m", directory, "-t", trace, "--formats", ",".join(FORMATS),
            "--parallel", "offload", "--quality", qfile]
    formats = {}
    for name, extra in (("free", ()), ("auto", ("--critical", "auto"))):
        res = run_cli(*args, *extra, "--out", tmp_path / f"{name}.json")
        assert res.exit_code == 0, res.output
        formats[name] = json.loads((tmp_path / f"{name}.json").read_text())["layers"][1]["format"]
    assert formats["free"][7] == "int4" and formats["auto"][7] in FULL


def _mutations(doc: dict):
    """(what, mutate(doc) -> text, words the error must name)."""
    def edit(fn):
        def apply(d):
            d = json.loads(json.dumps(d))
            fn(d)
            return json.dumps(d)
        return apply

    yield "not json", lambda d: "{", ("not valid JSON",)
    yield "schema", edit(lambda d: d.update(schema="moe-planner/quality/0")), ("schema",)
    yield "unknown key", edit(lambda d: d.update(extra=1)), ("unknown key", "extra")
    yield "unknown format", edit(lambda d: d.update(formats=["int4", "int5x"])), ("formats[1]",)
    yield "negative error", edit(lambda d: d["layers"][0]["experts"][2]["error"].update(int4=-1.0)), \
        ("layers[0].experts[2].error",)
    yield "missing format", edit(lambda d: d["layers"][1]["experts"][0]["error"].pop("int8")), \
        ("layers[1].experts[0].error",)
    yield "expert count", edit(lambda d: d["layers"][1]["experts"].pop()), ("layers[1].experts",)
    yield "layer count", edit(lambda d: d["layers"].pop()), ("does not match the model",)
    yield "other model", edit(lambda d: d.update(model_digest="0" * 16)), ("another model",)


def test_bad_quality_files_are_one_line_errors(big, run_cli, tmp_path):
    directory, trace, spec = big
    doc = quality_doc(spec, {fm: np.full((L, E), QUANT_ERROR[fm]) for fm in FORMATS})
    base = ["optimize", "-H", "laptop-4060", "-m", directory, "-t", trace, "--parallel", "offload"]
    for what, mutate, words in _mutations(doc):
        path = tmp_path / f"{what.replace(' ', '_')}.json"
        path.write_text(mutate(doc))
        assert_one_line_error(run_cli(*base, "--quality", path), *words)
    assert_one_line_error(run_cli(*base, "--quality", tmp_path / "absent.json"), "not found")
    assert_one_line_error(run_cli(*base, "--critical", "auto"), "--critical", "--quality")
    path = tmp_path / "good.json"
    path.write_text(json.dumps(doc))
    assert_one_line_error(run_cli(*base, "--quality", path, "--formats", "bf16,int4,int3"), "int3", "--formats")


def test_bad_measure_inputs_are_one_line_errors(big, run_cli, tmp_path):
    """Checked before torch is imported or any weight is read."""
    directory, _, _ = big
    out = tmp_path / "q.json"
    base = ["quality", "measure", "--prompts", PROMPTS, "--out", out]
    assert_one_line_error(run_cli(*base, "--checkpoint", directory, "--formats", "int4,q4_k"), "--formats", "q4_k")
    assert_one_line_error(run_cli(*base, "--checkpoint", tmp_path / "absent"), "not found")
    assert_one_line_error(run_cli("quality", "measure", "--checkpoint", directory, "--prompts", tmp_path / "none.txt",
                                  "--out", out), "prompts file")
    out.write_text("{}")
    assert_one_line_error(run_cli(*base, "--checkpoint", directory), "--force")


def test_critical_auto_says_what_it_pinned(big, run_cli, tmp_path):
    """--critical auto names the experts it pins, and says so when the file flags none (it
    planned in silence, so a user could not tell a file without candidates from a pinned plan)."""
    directory, trace, spec = big
    errors = {fm: np.full((L, E), QUANT_ERROR[fm]) for fm in FORMATS}
    args = ["optimize", "-H", "laptop-4060", "-m", directory, "-t", trace, "--formats", ",".join(FORMATS),
            "--parallel", "offload", "--critical", "auto"]
    for flagged, said in (({(1, 7), (0, 2)}, "critical auto: pinned 0:2, 1:7"), (set(), "flags no super experts")):
        qfile = tmp_path / "quality.json"
        qfile.write_text(json.dumps(quality_doc(spec, errors, super_experts=flagged)))
        res = run_cli(*args, "--quality", qfile)
        assert res.exit_code == 0, res.output
        assert said in " ".join(res.output.split()), res.output
