"""`planner trace record` (issue 3): tiny random Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V3
checkpoints built from configs (no downloads), recorded, and the recorded expert ids and
gate weights checked against each model's own router.

Tests that need torch and transformers skip without the ``[runtime]`` extra; the input
checks that run before torch is imported do not.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from planner.cli import PlannerGroup
from planner.commands.trace_record import record
from profiles.errors import InputError
from profiles.workload import recorder
from profiles.workload.trace import DECODE, PREFILL, load_trace

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "tests" / "data" / "prompts.txt"
GENERATE = 3  # N, greedy tokens per prompt
VOCAB = 128
SKIP_REASON = "needs the [runtime] extra: pip install torch==2.13.0 && pip install 'moe-planner[runtime]'"


@dataclass(frozen=True)
class Family:
    """A tiny config and what its trace must say. E = experts, K = top-k."""

    config_class: str
    config: dict
    layer_map: tuple[int, ...]  # hidden layer of each MoE layer
    num_experts: int
    top_k: int
    normalised: bool
    scale: float = 1.0
    scoring: str = "softmax"


# pad_token_id=None: no padding_idx, whose zero embedding would tie every router score of BOS
_ATTN = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
FAMILIES = {
    "mixtral": Family("MixtralConfig", dict(
        _ATTN, intermediate_size=32, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
        layer_map=(0, 1), num_experts=4, top_k=2, normalised=True),
    # layer 1 is dense (mlp_only_layers): MoE layer 1 is hidden layer 2
    "qwen3_moe": Family("Qwen3MoeConfig", dict(
        _ATTN, intermediate_size=32, moe_intermediate_size=16, head_dim=8, num_hidden_layers=3, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1]),
        layer_map=(0, 2), num_experts=8, top_k=2, normalised=True),
    "olmoe": Family("OlmoeConfig", dict(
        _ATTN, intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=False),
        layer_map=(0, 1), num_experts=8, top_k=3, normalised=False),
    # first_k_dense_replace=1: hidden layer 0 is dense; 4 groups of 2 experts, 2 groups kept
    "deepseek_v3": Family("DeepseekV3Config", dict(
        _ATTN, num_key_value_heads=4, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3,
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=None, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
        layer_map=(1, 2), num_experts=8, top_k=2, normalised=True, scale=2.5, scoring="sigmoid-group-limited"),
}


# -- checks that run without torch -------------------------------------------------------

def test_core_modules_import_without_torch():
    code = ("import sys, profiles.workload.recorder, planner.commands.trace_record; "
            "sys.exit(sorted({'torch', 'transformers'} & set(sys.modules)) != [])")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_read_prompts_skips_blank_lines():
    assert recorder.read_prompts(PROMPTS) == [
        "the cat sat on the mat", "experts route every token to a few of many", "where does the dog sleep"]


def invoke(*args) -> "click.testing.Result":  # noqa: F821
    group = PlannerGroup(name="trace", commands=[record])
    return CliRunner().invoke(group, ["record", *map(str, args)], catch_exceptions=True)


def assert_one_line_error(result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def model_stub(tmp_path) -> Path:
    """A directory with a config.json (enough for the checks that precede loading)."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    return stub


def test_bad_inputs_are_one_line_exit_1(tmp_path, model_stub):
    out = tmp_path / "t.npz"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    cases = [
        (("--model", tmp_path / "missing", "--prompts", PROMPTS, "--out", out), ("missing", "not found")),
        (("--model", no_config, "--prompts", PROMPTS, "--out", out), ("config.json",)),
        (("--model", model_stub, "--prompts", empty, "--out", out), ("no prompt",)),
        (("--model", model_stub, "--prompts", tmp_path / "nope.txt", "--out", out), ("prompts file not found",)),
        (("--model", model_stub, "--prompts", PROMPTS, "--generate", -1, "--out", out), ("--generate", "-1")),
        (("--model", model_stub, "--prompts", PROMPTS, "--out", tmp_path), ("is a directory",)),
    ]
    for args, words in cases:
        assert_one_line_error(invoke(*args), *words)
    assert not out.exists()


def test_existing_output_needs_force(tmp_path, model_stub):
    out = tmp_path / "t.npz"
    out.write_bytes(b"keep me")
    assert_one_line_error(invoke("--model", model_stub, "--prompts", PROMPTS, "--out", out), "exists", "--force")
    assert out.read_bytes() == b"keep me"


# -- tiny random checkpoints (runtime extra) -----------------------------------------------

@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch", reason=SKIP_REASON)
    transformers = pytest.importorskip("transformers", reason=SKIP_REASON)
    pytest.importorskip("tokenizers", reason=SKIP_REASON)
    return torch, transformers


def save_tokenizer(transformers, directory: Path) -> None:
    """A word-level tokenizer over the test prompts' words, with a BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for line in PROMPTS.read_text().split("\n") for w in line.split()})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[BOS]", "[EOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]",
                                         eos_token="[EOS]").save_pretrained(directory)


@pytest.fixture(scope="module")
def checkpoint(hf, tmp_path_factory):
    """checkpoint(name) -> directory of a tiny random model of that family (built once)."""
    torch, transformers = hf
    built: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in built:
            family = FAMILIES[name]
            config = getattr(transformers, family.config_class)(**family.config)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config)
            with torch.no_grad():
                for layer in family.layer_map:
                    gate = model.model.layers[layer].mlp.gate
                    gate.weight.normal_(0.0, 0.2)  # spread the router logits: no near ties
                    if hasattr(gate, "e_score_correction_bias"):
                        gate.e_score_correction_bias.normal_(0.0, 0.3)  # large enough to change choices
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            save_tokenizer(transformers, directory)
            built[name] = directory
        return built[name]

    return build


def expected_routing(family: Family, gate, x):
    """Recompute routing from the router's input ``x [rows, H]`` without the model's code.

    Returns ``(ids [rows, K], weights [rows, K])`` as float64 numpy; for DeepSeek-V3 the ids
    are sorted per row (the model's top-k is unsorted).
    """
    logits = x.double().numpy() @ gate.weight.detach().double().numpy().T  # [rows, E]
    K = family.top_k
    if family.scoring == "softmax":
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        ids = np.argsort(-probs, axis=1, kind="stable")[:, :K]
        weights = np.take_along_axis(probs, ids, axis=1)
    else:  # DeepSeek-V3: sigmoid; choose with the correction bias inside the best groups
        scores = 1.0 / (1.0 + np.exp(-logits))
        choice = scores + gate.e_score_correction_bias.detach().double().numpy()
        rows, E = choice.shape
        G, keep = family.config["n_group"], family.config["topk_group"]
        grouped = choice.reshape(rows, G, E // G)
        group_score = np.sort(grouped, axis=2)[:, :, -2:].sum(axis=2)  # [rows, G]: sum of the best two
        best_groups = np.argsort(-group_score, axis=1)[:, :keep]
        allowed = np.zeros((rows, G), bool)
        np.put_along_axis(allowed, best_groups, True, axis=1)
        choice = np.where(np.repeat(allowed, E // G, axis=1), choice, -np.inf)
        ids = np.sort(np.argsort(-choice, axis=1)[:, :K], axis=1)
        weights = np.take_along_axis(scores, ids, axis=1)
    if family.normalised:
        weights = weights / weights.sum(axis=1, keepdims=True)
    return ids, weights * family.scale


@pytest.mark.parametrize("name", list(FAMILIES))
def test_recorded_routing_is_what_the_router_chose(hf, checkpoint, name):
    torch, _ = hf
    family = FAMILIES[name]
    model, tokenizer = recorder.load_model(checkpoint(name))
    sequences = [tokenizer(p)["input_ids"] for p in recorder.read_prompts(PROMPTS)]
    blocks = [model.model.layers[layer].mlp for layer in family.layer_map]
    assert [e for _, e in recorder.find_moe_experts(model)] == [b.experts for b in blocks]

    # spies: every router's input, and what every experts module was called with
    router_inputs = [[] for _ in blocks]  # per MoE layer, per forward: [rows, H]
    experts_calls = [[] for _ in blocks]  # per MoE layer, per forward: (ids, weights)
    handles = []
    for l, block in enumerate(blocks):
        handles.append(block.gate.register_forward_hook(
            lambda m, args, out, l=l: router_inputs[l].append(args[0].detach().reshape(-1, m.weight.shape[1]))))
        handles.append(block.experts.register_forward_pre_hook(
            lambda m, args, l=l: experts_calls[l].append((args[1].clone(), args[2].clone()))))
    try:
        trace = recorder.record_routing(model, sequences, generate_tokens=GENERATE, model_name=name)
    finally:
        for h in handles:
            h.remove()

    # shapes, sequences, phases, layer map, metadata
    S, L, K = len(sequences), len(family.layer_map), family.top_k
    T = sum(len(s) for s in sequences) + S * GENERATE
    assert trace.expert_ids.shape == trace.gate_weights.shape == (T, L, K)
    assert trace.seq_lens.tolist() == [len(s) + GENERATE for s in sequences]
    assert trace.phase.tolist() == sum(([PREFILL] * len(s) + [DECODE] * GENERATE for s in sequences), [])
    assert trace.layer_map == family.layer_map and trace.num_experts == family.num_experts
    assert trace.meta["gate_weights_normalised"] is family.normalised
    assert trace.meta["gate_weights_scale"] == family.scale and trace.meta["model_type"] == name
    assert trace.meta["hidden_layers"] == family.config["num_hidden_layers"]

    # one prefill forward per prompt, then one token per decode forward (KV cache in use)
    rows_per_call = [x.shape[0] for x in router_inputs[0]]
    assert rows_per_call == sum(([len(s)] + [1] * GENERATE for s in sequences), [])
    assert all([x.shape[0] for x in calls] == rows_per_call for calls in router_inputs)

    for l, block in enumerate(blocks):
        x = torch.cat(router_inputs[l])  # [T, H]
        used_ids = torch.cat([i for i, _ in experts_calls[l]]).numpy()
        used_weights = torch.cat([w for _, w in experts_calls[l]]).float().numpy()
        # 1. exactly what the experts ran with and multiplied their outputs by
        np.testing.assert_array_equal(trace.expert_ids[:, l], used_ids)
        np.testing.assert_array_equal(trace.gate_weights[:, l], used_weights)
        # 2. the router module itself, called again on the captured inputs
        with torch.no_grad():
            _, again_weights, again_ids = block.gate(x)
        np.testing.assert_array_equal(trace.expert_ids[:, l], again_ids.numpy())
        np.testing.assert_allclose(trace.gate_weights[:, l], again_weights.float().numpy(), rtol=1e-6)
        # 3. an independent re-implementation of the family's routing
        ids, weights = expected_routing(family, block.gate, x)
        got_ids, got_weights = trace.expert_ids[:, l], trace.gate_weights[:, l]
        if family.scoring != "softmax":
            order = np.argsort(got_ids, axis=1)
            got_ids, got_weights = (np.take_along_axis(a, order, axis=1) for a in (got_ids, got_weights))
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(got_weights, weights, rtol=1e-4)
    if family.normalised:
        np.testing.assert_allclose(trace.gate_weights.sum(axis=2), family.scale, rtol=1e-5)
    else:
        assert (trace.gate_weights.sum(axis=2) < 1.0).all()
    if family.scoring != "softmax":
        # the bias and the group limit matter: plain top-k of the sigmoid scores differs somewhere
        block = blocks[0]
        x = torch.cat(router_inputs[0])
        plain = np.sort(torch.topk(torch.sigmoid(x @ block.gate.weight.T), K, dim=1).indices.numpy(), axis=1)
        assert (plain != np.sort(trace.expert_ids[:, 0], axis=1)).any()


def test_generate_zero_records_prompts_only(hf, checkpoint):
    model, tokenizer = recorder.load_model(checkpoint("mixtral"))
    sequences = [tokenizer(p)["input_ids"] for p in recorder.read_prompts(PROMPTS)]
    trace = recorder.record_routing(model, sequences, generate_tokens=0)
    assert (trace.phase == PREFILL).all() and trace.seq_lens.tolist() == [len(s) for s in sequences]


def test_cli_writes_a_trace_the_loader_reads(hf, checkpoint, tmp_path):
    directory = checkpoint("deepseek_v3")
    out = tmp_path / "traces" / "ds.npz"
    args = ("--model", directory, "--prompts", PROMPTS, "--generate", GENERATE, "--out", out)
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # nothing but JSON on stdout
    prompts = recorder.read_prompts(PROMPTS)
    assert summary["sequences"] == len(prompts) and summary["decode_tokens"] == len(prompts) * GENERATE
    assert summary["layer_map"] == [1, 2] and summary["top_k"] == 2 and summary["num_experts"] == 8

    saved = load_trace(out)
    direct = recorder.record_trace(directory, prompts, generate_tokens=GENERATE)  # deterministic: same again
    np.testing.assert_array_equal(saved.expert_ids, direct.expert_ids)
    np.testing.assert_allclose(saved.gate_weights, direct.gate_weights, rtol=1e-3)  # stored as float16
    np.testing.assert_array_equal(saved.phase, direct.phase)
    assert saved.seq_lens.tolist() == direct.seq_lens.tolist() and saved.layer_map == (1, 2)
    assert saved.meta["gate_weights_normalised"] is True and saved.model == directory.name

    assert_one_line_error(invoke(*args), "exists", "--force")
    assert invoke(*args, "--force").exit_code == 0


def test_non_moe_model_is_rejected_before_loading_weights(hf, tmp_path):
    _, transformers = hf
    dense = tmp_path / "llama"
    transformers.LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                             vocab_size=VOCAB).save_pretrained(dense)
    with pytest.raises(InputError, match="not a Mixture-of-Experts model"):
        recorder.load_model(dense)
    assert_one_line_error(invoke("--model", dense, "--prompts", PROMPTS, "--out", tmp_path / "t.npz"),
                          "not a Mixture-of-Experts", "llama")
