"""The bundle runtime (exporters/runtime, issue 7) on tiny random Mixtral, Qwen3-MoE, OLMoE
and DeepSeek-V3 checkpoints built from configs (no downloads).

- full-precision plans reproduce the HF reference logits (max |diff| <= 1e-4, fp32) and
  its greedy generation, whatever the tiers and cache sizes;
- int8 plans keep the logits' cosine similarity >= 0.999, int4 >= 0.99;
- the runtime's per-layer cache hits on the routing it saw equal an exact LRU computed
  independently (profiles/workload/hitrate.py, the simulator's contract) and a naive one;
- plans from planner.optimize run; kernels built once are reused; run.py's CLI works and
  fails in one line on bad input.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [runtime] extra")
transformers = pytest.importorskip("transformers", reason="needs the [runtime] extra")
pytest.importorskip("onnxruntime", reason="needs the [runtime] extra")
pytest.importorskip("onnx", reason="needs the [runtime] extra")
pytest.importorskip("safetensors", reason="needs the [runtime] extra")

from exporters.runtime import build_kernels, load_planned_model
from exporters.runtime.cache import ExpertCache

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128
PROMPT = [1, 17, 5, 99, 42, 7, 64, 3]
NEW_TOKENS = 6

# pad_token_id=None: no padding_idx whose zero embedding would tie every router score
_ATTN = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
         "tie_word_embeddings": False}
# family -> (config class, config, hidden layers that are MoE, routed experts E)
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(_ATTN, intermediate_size=32, num_hidden_layers=2, num_local_experts=4,
                                      num_experts_per_tok=2), (0, 1), 4),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_ATTN, intermediate_size=32, moe_intermediate_size=16, head_dim=8,
                                         num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                                         norm_topk_prob=True, mlp_only_layers=[1]), (0, 2), 8),
    "olmoe": ("OlmoeConfig", dict(_ATTN, intermediate_size=16, num_hidden_layers=2, num_experts=8,
                                  num_experts_per_tok=3, norm_topk_prob=False), (0, 1), 8),
    "deepseek_v3": ("DeepseekV3Config", dict(_ATTN, num_key_value_heads=4, intermediate_size=32,
                                             moe_intermediate_size=16, num_hidden_layers=3, first_k_dense_replace=1,
                                             n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                             n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                             q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                             qk_nope_head_dim=8, v_head_dim=8), (1, 2), 8),
}
GPU, CPU, NVME = "node/gpu0", "node/cpu0", "node/nvme0"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> (directory, reference model); built once per family."""
    built = {}

    def build(name: str):
        if name not in built:
            cls, cfg, moe_layers, _ = FAMILIES[name]
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**cfg))
            with torch.no_grad():
                for layer in moe_layers:
                    block = model.model.layers[layer].mlp
                    block.gate.weight.normal_(0.0, 0.2)  # spread the router logits: no near ties
                    if hasattr(block.gate, "e_score_correction_bias"):
                        block.gate.e_score_correction_bias.normal_(0.0, 0.3)
                    # experts twice the default init, so that quantisation shows in the logits
                    # (int4 cosine 0.998-0.9998 here); much larger weights make these tiny
                    # random models chaotic: one flipped top-k choice moves every logit
                    block.experts.gate_up_proj.normal_(0.0, 0.04)
                    block.experts.down_proj.normal_(0.0, 0.04)
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            ref = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
            built[name] = (directory, ref)
        return built[name]

    return build


def layer(hidden: int, moe: int, sites, homes, formats, slots: int) -> dict:
    return {"moe_layer": moe, "hidden_layer": hidden, "home": list(homes), "format": list(formats),
            "site": list(sites), "cache_slots": slots, "cache_device": GPU if slots else None}


def make_plan(name: str, sites, homes, formats="fp32", slots: int = 0, prefetch: str = "none",
              eviction: str = "lru") -> dict:
    """A hand-written plan: the same per-expert pattern (cycled) in every MoE layer."""
    _, _, moe_layers, E = FAMILIES[name]

    def cycle(x):
        x = [x] if isinstance(x, str) else list(x)
        return [x[e % len(x)] for e in range(E)]

    return {"format_version": 1, "compute_device": GPU, "host_device": CPU, "prefetch": prefetch,
            "eviction": eviction,
            "layers": [layer(h, i, cycle(sites), cycle(homes), cycle(formats), slots)
                       for i, h in enumerate(moe_layers)]}


# tier configurations a full-precision plan must reproduce the reference under
TIER_CASES = {
    "resident": {"sites": "resident", "homes": GPU},
    "fetch-host-1-slot": {"sites": "fetch", "homes": CPU, "slots": 1},
    "local-ort": {"sites": "local", "homes": CPU},
    "disk": {"sites": ["fetch", "local", "hybrid"], "homes": NVME, "slots": 2, "prefetch": "next-layer"},
    "mixed": {"sites": ["resident", "fetch", "local", "hybrid", "stream", "hybrid", "fetch", "local"],
              "homes": [GPU, CPU, CPU, NVME, CPU, CPU, NVME, NVME], "slots": 2, "prefetch": "next-layer",
              "eviction": "lfu"},
}


_REFERENCE: dict = {}


def reference(ref, ids=PROMPT, new_tokens=NEW_TOKENS):
    """(logits [P, V], greedy tokens) of the HF model: its own generate(), no early stop."""
    key = (id(ref), tuple(ids), new_tokens)
    if key not in _REFERENCE:
        _REFERENCE[key] = _reference(ref, ids, new_tokens)
    return _REFERENCE[key]


def _reference(ref, ids, new_tokens):
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0]
        config = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=None,
                                               pad_token_id=0)
        out = ref.generate(torch.tensor([ids]), generation_config=config)[0, len(ids):].tolist()
    return logits, out


def planned_logits(rt, ids=PROMPT):
    with torch.no_grad():
        return rt.model(torch.tensor([ids], device=rt.device)).logits[0].cpu()


@pytest.mark.parametrize("case", list(TIER_CASES))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_precision_plan_reproduces_reference(checkpoint, name, case):
    directory, ref = checkpoint(name)
    want_logits, want_tokens = reference(ref)
    plan = make_plan(name, **TIER_CASES[case])
    with load_planned_model(plan, directory, dtype="float32", device="cpu") as rt:
        got = planned_logits(rt)
        assert (got - want_logits).abs().max().item() <= 1e-4
        assert rt.generate(PROMPT, NEW_TOKENS) == want_tokens
        summary = rt.metrics.summary()
        # the dense weights are the reference's; the experts live in the stores, not in the state dict
        assert not any(".experts." in k for k in rt.model.state_dict())
    if case == "resident":
        assert summary["bytes_moved"] == {} and summary["hit_rate"] == [None, None]
    if case == "fetch-host-1-slot":
        assert summary["bytes_moved"][CPU] > 0 and all(0 <= h < 1 for h in summary["hit_rate"])
    if case == "local-ort":
        assert summary["cpu_expert_calls"] > 0 and summary["bytes_moved"] == {}
    if case == "disk":
        assert summary["bytes_moved"][NVME] > 0 and summary["prefetches"] > 0


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("fmt, floor", [("int8", 0.999), ("int4", 0.99)])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_quantised_plan_keeps_logits_close(checkpoint, name, fmt, floor):
    directory, ref = checkpoint(name)
    want, _ = reference(ref, new_tokens=1)
    plan = make_plan(name, sites=["resident", "fetch", "local", "hybrid"], homes=[GPU, CPU, CPU, NVME],
                     formats=fmt, slots=1, prefetch="next-layer")
    with load_planned_model(plan, directory, dtype="float32", device="cpu") as rt:
        got = planned_logits(rt)
    c = cosine(got, want)
    assert floor <= c < 1.0 - 1e-9, c  # close, and really quantised


# int4 dense: every matrix of these tiny models (K = 32, so 32-wide groups) in 4 bits, embedding
# and head included, gives 0.984-0.988 (0.994-0.998 with the embedding and head left in fp32);
# the int4 floor (0.99) is for int4 experts, held by the test above
@pytest.mark.parametrize("fmt, floor", [("int8", 0.999), ("int4", 0.98)])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_dense_weights_are_held_and_run_at_the_plans_dense_format(checkpoint, name, fmt, floor):
    """dense_format int8/int4: every dense Linear and Embedding (attention, shared experts,
    dense MLPs, embeddings, output head) holds only its quantised bytes and runs through
    MatMulNBits on a CPU; the routers stay as they were."""
    from torch import nn

    from exporters.runtime.checkpoint import find_moe_blocks
    from exporters.runtime.dense import QuantEmbedding, QuantLinear

    directory, ref = checkpoint(name)
    want, want_tokens = reference(ref)
    plan = make_plan(name, "resident", GPU) | {"dense_format": fmt}
    with load_planned_model(plan, directory, dtype="float32", device="cpu") as rt:
        got = planned_logits(rt)
        routers = {id(b.gate) for b in find_moe_blocks(rt.model).values()}
        left = [n for n, m in rt.model.named_modules()
                if type(m) in (nn.Linear, nn.Embedding) and id(m) not in routers]
        quantised = [m for m in rt.model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
        tokens = rt.generate(PROMPT, NEW_TOKENS)
    assert not left, left
    assert all(m.kernel is not None for m in quantised if isinstance(m, QuantLinear))
    from exporters.runtime.quant import block_size_for

    bits = 8 if fmt == "int8" else 4
    want_bytes = 0  # per [N, K] matrix: packed weights, one fp32 scale a group (+ 4-bit zero points)
    for n, p in ref.named_parameters():
        if p.dim() == 2 and ".experts." not in n and not n.endswith("mlp.gate.weight"):
            rows, k = p.shape
            groups = -(-k // block_size_for(k))
            want_bytes += rows * (groups * block_size_for(k) * bits // 8 + groups * 4 + (-(-groups // 2)) * (bits == 4))
    assert sum(m.nbytes for m in quantised) == want_bytes
    c = cosine(got, want)
    assert floor <= c < 1.0 - 1e-9, c
    assert len(tokens) == NEW_TOKENS  # decoding with the KV cache runs through them too
    if fmt == "int8":
        assert tokens[0] == want_tokens[0]


def test_dense_int4_computes_alike_in_ort_and_torch(checkpoint):
    """The CPU's MatMulNBits sessions and the GPU path (unpacked in torch) agree."""
    from exporters.runtime.dense import QuantLinear

    directory, _ = checkpoint("qwen3_moe")
    plan = make_plan("qwen3_moe", "resident", GPU) | {"dense_format": "int4"}
    with load_planned_model(plan, directory, dtype="float32", device="cpu") as rt:
        ort_logits = planned_logits(rt)
        for m in rt.model.modules():
            if isinstance(m, QuantLinear):
                m.kernel = None
        torch_logits = planned_logits(rt)
    assert cosine(ort_logits, torch_logits) >= 0.9999


def test_quantised_experts_compute_alike_on_device_and_cpu(checkpoint):
    """An int4 expert gives the same logits resident, local (MatMulNBits) or through a CPU
    device's cache (a pre-packed MatMulNBits session built as the expert is loaded)."""
    directory, _ = checkpoint("olmoe")
    outs = []
    for site, home in (("resident", GPU), ("local", CPU), ("fetch", CPU)):
        with load_planned_model(make_plan("olmoe", site, home, "int4", slots=2), directory, dtype="float32",
                                device="cpu") as rt:
            outs.append(planned_logits(rt))
            if site == "fetch":
                slots = [slot.get() for store in rt.stores for slot in store.slots.values()]
                assert slots and all(w.kernel is not None for w in slots)
    assert cosine(outs[0], outs[1]) >= 0.9999 and cosine(outs[0], outs[2]) >= 0.9999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["fp32", "int4"])
def test_cuda_matches_cpu(checkpoint, fmt):
    """On a GPU: pinned host copies, copies on a side stream, dense int4 weights unpacked in
    torch (MatMulNBits on the CPU), the same logits as on the CPU."""
    directory, ref = checkpoint("deepseek_v3")
    plan = make_plan("deepseek_v3", formats=fmt, **TIER_CASES["mixed"]) | {"dense_format": fmt}
    outs = {}
    for device in ("cpu", "cuda"):
        with load_planned_model(plan, directory, dtype="float32", device=device) as rt:
            outs[device] = planned_logits(rt)
            tokens = rt.generate(PROMPT, NEW_TOKENS)
            assert rt.metrics.summary()["bytes_moved"]
    if fmt == "fp32":
        assert (outs["cuda"] - outs["cpu"]).abs().max().item() <= 1e-3
        assert tokens == reference(ref)[1]
    else:  # MatMulNBits computes with int8 activations (accuracy_level 4): 4e-3 apart on the CPU alone
        assert cosine(outs["cuda"], outs["cpu"]) >= 0.9995  # 0.99997 for the dense part alone


# -- cache accounting ----------------------------------------------------------------------


def naive_lru_hits(reference_string, slots: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for e in reference_string:
        if e in cache:
            hits += 1
            cache.move_to_end(e)
        elif slots > 0:
            if len(cache) >= slots:
                cache.popitem(last=False)
            cache[e] = None
    return hits


def test_cache_hits_equal_exact_lru_and_the_shared_contract():
    from profiles.workload import hitrate

    rng = np.random.default_rng(7)
    T, L, K, E = 300, 2, 3, 10
    ids = np.stack([np.stack([rng.choice(E, K, replace=False, p=np.arange(1, E + 1) / (E * (E + 1) / 2))
                              for _ in range(L)]) for _ in range(T)])  # [T, L, K], skewed
    pinned = [{0, 4}, set()]  # resident/local experts: not cache accesses
    for slots in (0, 1, 3, 5, E):
        for policy in ("lru", "lfu", "belady"):
            dist = (hitrate.lru_stack_distances(ids, E, pinned=pinned) if policy == "lru" else
                    hitrate.priority_stack_distances(ids, E, (policy,), pinned=pinned)[policy])
            for l in range(L):
                string = [int(e) for e in ids[:, l, :].reshape(-1) if e not in pinned[l]]
                cache = ExpertCache(slots, policy, future=string if policy == "belady" else None)
                for e in string:
                    cache.access(e)
                contract_hits = int(((dist[:, l, :] >= 0) & (dist[:, l, :] < slots)).sum())
                assert cache.hits == contract_hits, (policy, slots, l)
                assert cache.hits + cache.misses == len(string)
                if policy == "lru":
                    assert cache.hits == naive_lru_hits(string, slots)


def test_runtime_hit_counts_equal_exact_lru_on_its_routing(checkpoint):
    """Record the routing the runtime saw; an independent LRU over it predicts its hits."""
    from profiles.workload import hitrate

    name = "qwen3_moe"
    directory, _ = checkpoint(name)
    _, _, moe_layers, E = FAMILIES[name]
    sites = ["resident", "fetch", "hybrid", "local", "fetch", "hybrid", "fetch", "fetch"]
    plan = make_plan(name, sites=sites, homes=[GPU, CPU, CPU, CPU, NVME, NVME, CPU, NVME], slots=2)
    calls = {l: [] for l in range(len(moe_layers))}
    with load_planned_model(plan, directory, dtype="float32", device="cpu") as rt:
        for index, store in enumerate(rt.stores):
            store.register_forward_pre_hook(lambda mod, args, i=index: calls[i].append(args[1].clone()))
        rt.generate(PROMPT, NEW_TOKENS)
        rt.generate(PROMPT[:3], 3)  # the cache is not reset between sequences
        summary = rt.metrics.summary()
    routing = np.stack([torch.cat(calls[l]).numpy() for l in range(len(moe_layers))], axis=1)  # [T, L, K]
    pinned = [{e for e, s in enumerate(sites) if s not in ("fetch", "hybrid")}] * len(moe_layers)
    dist = hitrate.lru_stack_distances(routing, E, pinned=pinned)
    counted = dist >= 0
    expected_hits = ((dist >= 0) & (dist < 2)).sum(axis=(0, 2)).tolist()
    assert summary["hits"] == expected_hits
    assert [h + m for h, m in zip(summary["hits"], summary["misses"])] == counted.sum(axis=(0, 2)).tolist()
    for l in range(len(moe_layers)):
        string = [int(e) for e in routing[:, l, :].reshape(-1) if e not in pinned[l]]
        assert summary["hits"][l] == naive_lru_hits(string, 2)


def test_static_and_belady_follow_a_given_routing(checkpoint):
    directory, _ = checkpoint("olmoe")
    plan = make_plan("olmoe", sites="fetch", homes=CPU, slots=3, eviction="belady")
    with load_planned_model(plan, directory, dtype="float32", device="cpu") as rt:
        calls = []
        rt.stores[0].register_forward_pre_hook(lambda mod, args: calls.append(args[1].clone()))
        rt.generate(PROMPT, NEW_TOKENS)
        assert "belady" in " ".join(rt.metrics.notes)  # no routing: ran as lru, said so
    first = torch.cat(calls).numpy()
    routing = np.stack([first, first], axis=1)  # the run is deterministic: the same routing again
    for policy in ("belady", "static"):
        plan["eviction"] = policy
        with load_planned_model(plan, directory, dtype="float32", device="cpu", routing=routing) as rt:
            rt.generate(PROMPT, NEW_TOKENS)
            hits = rt.metrics.summary()["hits"][0]
        from profiles.workload import hitrate

        if policy == "belady":
            dist = hitrate.priority_stack_distances(first[:, None, :], 8, ("belady",))["belady"]
            assert hits == int((dist < 3).sum())
        else:
            curve = hitrate.static_curve(np.bincount(first.reshape(-1), minlength=8)[None, :].astype(float))
            assert hits == round(curve[0, 3] * first.size)


# -- real plans, kernels, CLI --------------------------------------------------------------


def test_plans_from_the_optimizer_run(checkpoint):
    from planner.given import GivenPolicy
    from planner.optimize import OptimizeRequest, optimize
    from planner.plan import Plan

    directory, ref = checkpoint("mixtral")
    want, want_tokens = reference(ref)
    for formats, exact in ((("bf16",), True), (("bf16", "int8", "int4"), False)):
        result = optimize(OptimizeRequest(hardware="desktop-4090", model=str(directory / "config.json"),
                                          formats=formats, time_limit_s=5))
        # the baselines' placements as given configurations on this runtime (--compare prices
        # them on their own engines, whose formats this runtime need not run)
        plans = {"ilp": result.plan, **{k: optimize(OptimizeRequest(
            hardware="desktop-4090", model=str(directory / "config.json"), formats=formats, engine="bundle",
            policy=GivenPolicy(k, cache_slots=2 if k == "lru-offload" else None))).plan
            for k in ("lru-offload", "cpu-experts")}}
        for label, plan in plans.items():
            data = json.loads(plan.to_json())
            Plan.model_validate(data)
            with load_planned_model(data, directory, dtype="float32", device="cpu") as rt:
                got = planned_logits(rt)
                if exact:
                    assert (got - want).abs().max().item() <= 1e-4, label
                    assert rt.generate(PROMPT, NEW_TOKENS) == want_tokens, label
                else:  # int4 dense weights too: see test_dense_weights_are_held_and_run_at_the_plans_dense_format
                    assert cosine(got, want) >= (0.98 if plan.dense_format == "int4" else 0.99), label


def test_kernels_built_at_export_are_reused(checkpoint, tmp_path):
    directory, _ = checkpoint("deepseek_v3")
    plan = make_plan("deepseek_v3", sites=["resident", "local", "hybrid", "fetch"], homes=[GPU, CPU, NVME, NVME],
                     formats=["int4", "int8", "bf16", "int4"], slots=1)
    manifest = build_kernels(plan, directory, tmp_path / "kernels")
    data = json.loads(manifest.read_text())
    assert sorted(data["templates"]) == ["float", "int4", "int8"]
    assert data["layers"]["0"]["experts"] == {"0": "int4", "1": "int8", "3": "int4", "4": "int4", "5": "int8",
                                              "7": "int4"}
    again = build_kernels(plan, directory, tmp_path / "again")
    assert again.read_bytes() == manifest.read_bytes()  # deterministic
    with load_planned_model(plan, directory, kernels_dir=tmp_path / "kernels", dtype="float32", device="cpu") as rt:
        a = planned_logits(rt)
    with load_planned_model(plan, directory, dtype="float32", device="cpu") as rt:
        b = planned_logits(rt)
    assert torch.equal(a, b)
    other = make_plan("deepseek_v3", sites="fetch", homes=CPU, formats="int8", slots=1)
    with pytest.raises(ValueError, match="kernels were built for another plan"):
        load_planned_model(other, directory, kernels_dir=tmp_path / "kernels")


def save_tokenizer(directory: Path) -> None:
    """The word-level tokenizer the example checkpoints use (no download), BOS prepended."""
    from exporters.checkpoints import save_tokenizer as save

    save(directory, VOCAB)


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "exporters" / "runtime" / "run.py"), *map(str, args)],
                          check=False, cwd=cwd, capture_output=True, text=True)


def test_run_cli_generates_and_writes_metrics(checkpoint, tmp_path, capsys):
    pytest.importorskip("tokenizers")
    directory, _ = checkpoint("mixtral")
    save_tokenizer(directory)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    plan = make_plan("mixtral", sites=["resident", "fetch", "local", "hybrid"], homes=[GPU, CPU, CPU, NVME],
                     formats=["bf16", "int4"], slots=1, prefetch="next-layer")
    (bundle / "plan.json").write_text(json.dumps(plan))
    build_kernels(bundle / "plan.json", directory, bundle / "kernels")
    metrics = tmp_path / "m.json"
    result = run_cli("--bundle", bundle, "--checkpoint", directory, "--prompt", "the cat sat", "--max-new-tokens", 4,
                     "--ignore-eos", "--metrics-out", metrics, "--device", "cpu", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    m = json.loads(metrics.read_text())
    assert m["generated_tokens"] == 4 and m["tokens_per_s"] > 0 and m["ttft_s"] > 0
    assert len(m["hit_rate"]) == 2 and set(m["bytes_moved"]) <= {CPU, NVME}
    for key in ("tpot_s", "tpot_s_p50", "tpot_s_p90", "tpot_s_p99", "ttft_s_p50", "expert_hit_rate"):
        assert key in m
    # the same in-process through --plan (kernels built on the fly) and --json
    from exporters.runtime.run import main

    assert main(["--plan", str(bundle / "plan.json"), "--checkpoint", str(directory), "--prompt", "the cat",
                 "--max-new-tokens", "2", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["generated_tokens"] >= 1


def test_run_cli_bad_input_is_one_line_exit_1(checkpoint, tmp_path, capsys):
    from exporters.runtime.run import main

    pytest.importorskip("tokenizers")
    directory, _ = checkpoint("mixtral")
    save_tokenizer(directory)  # the errors below come after the tokenizer loads
    capsys.readouterr()  # building the checkpoint (when this test runs first) prints progress
    good = tmp_path / "plan.json"
    good.write_text(json.dumps(make_plan("mixtral", "resident", GPU)))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(make_plan("olmoe", "resident", GPU)))  # 8 experts, not 4
    # a GGUF type: planned for llama.cpp, not run by the bundle (fp8 and the other built-in formats are)
    bad_fmt = tmp_path / "q4_k.json"
    bad_fmt.write_text(json.dumps(make_plan("mixtral", "resident", GPU, formats="q4_k")))
    bad_dense = tmp_path / "dense-q4_k.json"
    bad_dense.write_text(json.dumps(make_plan("mixtral", "resident", GPU) | {"dense_format": "q4_k"}))
    (tmp_path / "empty").mkdir()
    cases = [
        (("--plan", tmp_path / "missing.json", "--checkpoint", directory, "--prompt", "x"), "plan file not found"),
        (("--plan", good, "--checkpoint", tmp_path / "nope", "--prompt", "x"), "checkpoint directory not found"),
        (("--plan", wrong, "--checkpoint", directory, "--prompt", "x"), "expert count"),
        (("--plan", bad_fmt, "--checkpoint", directory, "--prompt", "x"), "q4_k"),
        (("--plan", bad_dense, "--checkpoint", directory, "--prompt", "x"), "dense_format"),
        (("--plan", good, "--checkpoint", directory), "no prompt"),
        (("--plan", good, "--checkpoint", directory, "--prompt", "x", "--max-new-tokens", "0"), "--max-new-tokens"),
        (("--bundle", tmp_path / "empty", "--checkpoint", directory, "--prompt", "x"), "no plan.json"),
    ]
    for args, words in cases:
        assert main([str(a) for a in args]) == 1, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(directory)])  # usage: --plan or --bundle is required
    assert exc.value.code == 2


def test_runtime_imports_only_allowed_packages():
    """The runtime is copied into bundles: it must not import the planner's packages."""
    import ast

    allowed = {"numpy", "torch", "transformers", "safetensors", "onnx", "onnxruntime"}
    for path in (REPO / "exporters" / "runtime").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, (path.name, name)


@pytest.mark.parametrize("name", ["mixtral", "olmoe"])
def test_dropped_experts_are_masked_in_the_router(checkpoint, name):
    """A task-specific plan's dropped experts (planner.task): the router picks its top-k among
    the kept ones (the store is never asked for a dropped one), with the weights renormalised
    where the router renormalises (Mixtral) and not where it does not (OLMoE)."""
    directory, ref = checkpoint(name)
    _, cfg, moe_layers, E = FAMILIES[name]
    with load_planned_model(make_plan(name, "resident", GPU), directory, dtype="float32", device="cpu") as rt:
        full = planned_logits(rt)
    plan = make_plan(name, "resident", GPU)
    plan["dropped_experts"] = [[0, 1]] * len(moe_layers)
    seen, sums = [], []
    with load_planned_model(plan, directory, dtype="float32", device="cpu") as rt:
        for store in rt.stores:
            forward = store.forward

            def spy(hidden, index, weights, forward=forward):
                seen.extend(index.reshape(-1).tolist())
                sums.extend(weights.sum(dim=-1).reshape(-1).tolist())
                return forward(hidden, index, weights)
            store.forward = spy
        dropped = planned_logits(rt)
    assert seen and not {0, 1} & set(seen)
    if name == "mixtral":
        assert sums == pytest.approx([1.0] * len(sums))
    else:
        assert all(s < 1.0 for s in sums)
    assert (dropped - full).abs().max().item() > 1e-3  # the routing changed the output


def test_prefill_offload_runs_a_prompts_cpu_experts_on_the_device(checkpoint):
    """plan.json prefill_offload (planner.prefill_sites): the prompt's pass copies the host-held
    local experts it uses to the compute device and runs them there, decode runs them on the
    CPU; the logits and tokens are the reference's either way."""
    name = next(iter(FAMILIES))
    directory, ref = checkpoint(name)
    want_logits, want_tokens = reference(ref)
    plan = make_plan(name, sites="local", homes=CPU)
    plan["prefill_offload"] = [True] * len(plan["layers"])
    with load_planned_model(plan, directory, dtype="float32", device="cpu") as rt:
        assert (planned_logits(rt) - want_logits).abs().max().item() <= 1e-4
        before = rt.metrics.summary()
        assert before["bytes_moved"][CPU] > 0 and before["cpu_expert_calls"] == 0  # the prompt: copied, not on the CPU
        assert rt.generate(PROMPT, NEW_TOKENS) == want_tokens
        after = rt.metrics.summary()
    assert after["cpu_expert_calls"] > 0  # decode: on the CPU


def test_prefill_copies_copy_only_the_named_experts(checkpoint):
    """plan.json prefill_copies (planner.prefill_sites, a split prefill site): the prompt's pass
    copies only the named local experts to the device, the host CPU runs the others in the same
    pass, and the logits are the reference's."""
    name = next(iter(FAMILIES))
    directory, ref = checkpoint(name)
    want_logits, _ = reference(ref)
    plan = make_plan(name, sites="local", homes=CPU)
    plan["prefill_offload"] = [True] * len(plan["layers"])
    plan["prefill_copies"] = [[0] for _ in plan["layers"]]
    with load_planned_model(plan, directory, dtype="float32", device="cpu") as rt:
        assert (planned_logits(rt) - want_logits).abs().max().item() <= 1e-4
        split = rt.metrics.summary()
    assert split["bytes_moved"][CPU] > 0 and split["cpu_expert_calls"] > 0  # both sites in the prompt's pass
    plan["prefill_copies"] = [[0], "x"] + [[0]] * (len(plan["layers"]) - 2)
    from exporters.runtime.errors import RuntimeInputError
    from exporters.runtime.planfile import parse_plan

    with pytest.raises(RuntimeInputError, match="prefill_copies"):
        parse_plan(plan)
