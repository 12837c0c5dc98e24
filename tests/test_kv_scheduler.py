"""The KV cache as memory and the scheduler policies (issue 15, items 1 and 2).

A tiny model with every expert resident on the GPU, three requests of a 16-token prompt
and 20 decode tokens each, the vLLM engine's 16-token blocks and a pool of 5 blocks: the
preemption sequence, the steps and the token times are worked out by hand below and held
whole. Then Sarathi's chunks, the figures ``serving`` reports, llama.cpp's slots, SGLang's
victim, and the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from planner.plan import Inputs, Plan, SolverInfo
from planner.plan_layer import LayerPlan
from profiles.engine_kv import KVCacheSpec
from profiles.engines import load_engine
from profiles.errors import InputError
from profiles.hardware import load_profile
from profiles.models import load_model
from profiles.workload.trace import DECODE, PREFILL, Trace
from simulator.engine import SimConfig, Simulation
from simulator.schedulers import SCHEDULER

CONFIG = Path(__file__).parent / "data/configs/mixtral/config.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two MoE layers of four experts, top-2 (the hand-worked model of test_simulator)."""
    config = json.loads(CONFIG.read_text())
    config.update(num_hidden_layers=2, hidden_size=1024, intermediate_size=4096, num_local_experts=4,
                  num_experts_per_tok=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=128)
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(config))
    return load_model(path)


def _trace(shapes: list[tuple[int, int]]) -> Trace:
    """One sequence per ``(prompt tokens, decode tokens)``; expert ids cycle through 0-3."""
    T = sum(p + d for p, d in shapes)
    t = np.arange(T)
    ids = np.stack([np.stack([t % 4, (t + 1) % 4], 1), np.stack([(t + 2) % 4, (t + 3) % 4], 1)], 1)  # [T, L=2, K=2]
    phase = np.concatenate([np.r_[np.full(p, PREFILL), np.full(d, DECODE)] for p, d in shapes]).astype(np.uint8)
    return Trace(expert_ids=ids, seq_lens=np.array([p + d for p, d in shapes]), phase=phase, num_experts=4,
                 layer_map=(0, 1))


def _plan(model, engine: str = "vllm", batch: int = 3) -> Plan:
    inputs = Inputs(hardware="desktop-4090", hardware_digest="-", model=model.name, model_digest="-", workload="-",
                    workload_digest="-", engine=engine)
    layer = {"home": ("node/gpu0",) * 4, "format": ("bf16",) * 4, "site": ("resident",) * 4}
    lps = tuple(LayerPlan(moe_layer=i, hidden_layer=model.moe_layer_indices[i], **layer) for i in range(2))
    return Plan(inputs=inputs, objective="latency", batch_size=batch, context_tokens=64, compute_device="node/gpu0",
                host_device="node/cpu0", layers=lps, memory={}, predicted={}, solver=SolverInfo(method="hand"))


def _run(model, trace, engine="vllm", **cfg):
    _, hw = load_profile("desktop-4090")
    sim = Simulation(_plan(model, engine, cfg.get("batch_size", 3)), load_engine(engine).apply(hw), model, trace,
                     SimConfig(record=True, **cfg))
    return sim, sim.run()


def _scheduler_events(report) -> list[str]:
    return [what for _, actor, what in report.events if actor == "scheduler" and "step of" not in what]


# ----------------------------------------------------------------------------- (a) the golden sequence


def test_vllm_recompute_preemption_sequence_by_hand(tiny):
    """16-token blocks, 5 of them; requests 0, 1, 2 of 16 + 20 tokens arrive at t = 0.

    1. All three are admitted (1 block each: 3 used) and prefilled together (48 tokens).
    2. Their first decode writes token 17: each needs a 2nd block. 0 and 1 take the last two;
       2 finds none and, the most recently admitted, preempts itself: recompute, its block
       freed (4 used), back to the head of the queue with its prompt and its first output
       (17 tokens) to prefill again, which needs 2 blocks: 1 is free, so it waits.
    3. 0 and 1 decode 16 times (contexts 17 .. 32); the 17th decode writes token 33: 0 takes
       the last block (3), 1 finds none and preempts itself (the newest running): 2 blocks
       freed, back to the head of the queue (16 + 17 = 33 tokens to prefill, 3 blocks).
    4. 0 decodes alone until its 20th token (4 steps) and frees 3 blocks: 1 (3 blocks) and
       2 (2 blocks) are admitted, prefilled together (33 + 17 = 50 tokens), then decode
       together 3 steps (1's last three tokens), and 2 alone its 16 remaining ones.
    """
    sim, rep = _run(tiny, _trace([(16, 20)] * 3), kv_blocks=5, batching="vllm")
    steps = [(phase, n) for phase, n, _, _ in sim.steps]
    assert steps == [("prefill", 48)] + [("decode", 2)] * 16 + [("decode", 1)] * 4 + [("prefill", 50)] \
        + [("decode", 2)] * 3 + [("decode", 1)] * 16
    end = [e for *_, e in sim.steps]
    kv = rep.serving["kv_cache"]
    assert kv["preempted"] == [[end[0], 2, "recompute"], [end[16], 1, "recompute"]]
    assert _scheduler_events(rep) == ["admit 0,1,2", "preempt 2: recompute", "preempt 1: recompute",
                                      "request 0 done", "admit 1,2", "request 1 done", "request 2 done"]
    r0, r1, r2 = sim.requests
    # every request still gets its 1 + 20 tokens; a recomputed prefill gives the next one
    assert [len(r.token_s) for r in sim.requests] == [21, 21, 21]
    assert r0.token_s == [end[0]] + end[1:21]
    assert r1.token_s == [end[0]] + end[1:17] + [end[21]] + end[22:25]
    assert r2.token_s == [end[0], end[21]] + end[22:41]
    assert r0.token_s[-1] < r1.token_s[17] == r2.token_s[1] < r1.token_s[-1] < r2.token_s[-1]
    assert [r.preemptions for r in sim.requests] == [0, 1, 1]
    assert kv["recomputed_tokens"] == 17 + 33 and kv["preemptions"] == 2
    assert kv["swapped_out_bytes"] == kv["swapped_in_bytes"] == 0.0


def test_vllm_swap_preemption_sequence_by_hand(tiny):
    """The same requests with swap: a victim's blocks go to host memory over PCIe and come back
    (oldest first) in a decode step that preempted nobody, when the blocks for its cache and
    its next token are free; no new request is admitted while one is out.

    2 is swapped out at its first decode (1 block); at 0's and 1's 17th decode 1 is swapped out
    (2 blocks) and 0 decodes alone; that frees 2, so in the next step 2 comes back (its block and
    one for token 17) and decodes with 0 for 0's last three tokens; when 0 finishes (3 blocks
    free) 1 comes back (2 blocks and one for token 33) and decodes its last four with 2, which
    then decodes its last 13 alone.
    """
    sim, rep = _run(tiny, _trace([(16, 20)] * 3), kv_blocks=5, batching="vllm", preemption="swap")
    assert _scheduler_events(rep) == ["admit 0,1,2", "preempt 2: swap out 1 blocks", "preempt 1: swap out 2 blocks",
                                      "swap in 2: 1 blocks", "request 0 done", "swap in 1: 2 blocks",
                                      "request 1 done", "request 2 done"]
    steps = [(phase, n) for phase, n, _, _ in sim.steps]
    assert steps == [("prefill", 48)] + [("decode", 2)] * 16 + [("decode", 1)] + [("decode", 2)] * 3 \
        + [("decode", 2)] * 4 + [("decode", 1)] * 13
    kv = rep.serving["kv_cache"]
    block = 16 * tiny.kv_bytes_per_token()
    assert kv["swapped_out_bytes"] == kv["swapped_in_bytes"] == 3 * block
    assert kv["recomputed_tokens"] == 0 and kv["preemptions"] == 2
    # the copies took the PCIe link's time for their bytes (nothing else moves then)
    net = sim.net
    out = net.transfer_s("node/gpu0", "node/cpu0", block) + net.transfer_s("node/gpu0", "node/cpu0", 2 * block)
    back = net.transfer_s("node/cpu0", "node/gpu0", block) + net.transfer_s("node/cpu0", "node/gpu0", 2 * block)
    assert kv["swap_s"] == pytest.approx(out + back, rel=1e-9)
    assert [len(r.token_s) for r in sim.requests] == [21, 21, 21]


# ----------------------------------------------------------------------------- (b) chunked prefill


def test_sarathi_splits_a_long_prompt_into_chunks_between_decodes(tiny):
    """Budget 16 tokens a step: request 0 (4-token prompt, 10 decodes) and request 1 (40-token
    prompt, 2 decodes). Step 1: 0's prompt and 12 tokens of 1's; then 0 decodes one token
    while 1's prompt goes on 15 tokens at a time (15, then the last 13), each in one mixed
    step; 1's first token comes out with its last chunk, then both decode."""
    sim, rep = _run(tiny, _trace([(4, 10), (40, 2)]), batching="sarathi", chunk_tokens=16, batch_size=2)
    steps = [(phase, n) for phase, n, _, _ in sim.steps]
    assert steps == [("prefill", 16), ("mixed", 16), ("mixed", 14), ("decode", 2), ("decode", 2)] \
        + [("decode", 1)] * 6
    end = [e for *_, e in sim.steps]
    r0, r1 = sim.requests
    assert r0.token_s == end  # a token every step: its decodes never wait for 1's prompt
    assert r1.token_s == [end[2], end[3], end[4]]
    assert rep.serving["steps"] == {"prefill": 1, "decode": 8, "mixed": 2}
    # the whole prompt in one step, as vllm runs it: the first decode of 0 waits for it
    sim_v, _ = _run(tiny, _trace([(4, 10), (40, 2)]), batching="vllm", batch_size=2)
    assert [(p, n) for p, n, _, _ in sim_v.steps][:2] == [("prefill", 44), ("decode", 2)]


def test_prefill_chunks_are_priced_by_their_own_tokens(tiny):
    """A mixed step of 16 tokens costs what a prefill step of those 16 tokens does, less than
    the 44-token prompt step; a decode step of 2 tokens costs less than either."""
    sim, _ = _run(tiny, _trace([(4, 10), (40, 2)]), batching="sarathi", chunk_tokens=16, batch_size=2)
    sim_v, _ = _run(tiny, _trace([(4, 10), (40, 2)]), batching="vllm", batch_size=2)
    dur = [e - s for _, _, s, e in sim.steps]
    dur_v = [e - s for _, _, s, e in sim_v.steps]
    assert dur[3] < dur[1] < dur_v[0]


# ----------------------------------------------------------------------------- (c) what is reported


def test_serving_figures_are_consistent(tiny):
    """KV utilisation by hand from the golden run: blocks held in each step (3 in the first
    prefill; 4 while 0 and 1 decode; 3 while 0 decodes alone; 5 from the second prefill until
    1 finishes; 2 then 3 while 2 decodes alone), weighted by the steps' times."""
    sim, rep = _run(tiny, _trace([(16, 20)] * 3), kv_blocks=5, batching="vllm")
    held = [3] + [4] * 16 + [3] * 4 + [5] * 4 + [2] * 12 + [3] * 4
    area = sum(h * (e - s) for h, (_, _, s, e) in zip(held, sim.steps))
    kv = rep.serving["kv_cache"]
    assert kv["blocks"] == 5 and kv["peak_blocks"] == 5 and kv["peak_utilisation"] == 1.0
    assert kv["mean_utilisation"] == pytest.approx(area / (5 * rep.metrics["makespan_s"]), rel=1e-12)
    assert kv["block_tokens"] == 16 and kv["block_bytes"] == 16 * tiny.kv_bytes_per_token()
    assert kv["preemptions"] == len(kv["preempted"]) == rep.serving["preempted_requests"]
    assert rep.serving["scheduler"] == "vllm" and rep.metrics["policies"]["batching"] == "vllm"
    assert rep.serving["steps"]["prefill"] == rep.metrics["prefill_steps"] == 2
    assert rep.serving["steps"]["decode"] == rep.metrics["decode_steps"] == 39
    ttft = rep.serving["ttft"]
    assert ttft["closed_loop"] and ttft["mean_queue_s"] == 0.0 and not ttft["queueing"]
    assert json.loads(rep.to_json())["serving"]["kv_cache"]["preemptions"] == 2


def test_memory_that_never_binds_changes_nothing(tiny):
    """With blocks for everything, every scheduler's times equal the pool-less run's (the
    default run: the plan records no memory, so the pool is unbounded)."""
    trace = _trace([(16, 20)] * 3)
    for name in ("continuous", "vllm", "static"):
        _, free = _run(tiny, trace, batching=name)
        _, roomy = _run(tiny, trace, batching=name, kv_blocks=9)
        assert roomy.metrics == free.metrics and roomy.events == free.events
        assert roomy.serving["kv_cache"]["preemptions"] == 0 and roomy.serving["kv_cache"]["peak_blocks"] == 9
        assert free.serving["kv_cache"]["blocks"] is None


def test_queueing_is_stated_when_requests_wait(tiny):
    """All at t = 0 with room for one at a time: the later requests' TTFT is mostly waiting."""
    _, rep = _run(tiny, _trace([(16, 20)] * 3), batch_size=1)
    ttft = rep.serving["ttft"]
    assert ttft["queueing"] and 0.5 < ttft["queue_share"] < 1.0


# ----------------------------------------------------------------------------- engines' rules


def test_llama_cpp_slots_limit_concurrency(tiny):
    """A slot holds the plan's context (64 tokens); memory for 2.5 slots runs 2 requests at once
    whatever the batch, and none is ever preempted."""
    slot = tiny.kv_cache_bytes(64)
    sim, rep = _run(tiny, _trace([(8, 4)] * 4), engine="llama.cpp", batch_size=4, kv_bytes=2.5 * slot)
    assert _scheduler_events(rep)[:3] == ["admit 0,1", "request 0 done", "request 1 done"]
    kv = rep.serving["kv_cache"]
    assert kv["allocation"] == "slot" and kv["blocks"] == 2 and kv["preemptions"] == 0


def test_sglang_retracts_the_request_with_fewest_outputs(tiny):
    """SGLang's victim: fewest outputs, then the longest prompt (not the newest)."""
    sim = Simulation(_plan(tiny, "sglang"), load_engine("sglang").apply(load_profile("desktop-4090")[1]), tiny,
                     _trace([(16, 20)] * 3), SimConfig())
    sim.kv = sim._kv_pool()
    a, b, c = (type("R", (), {})() for _ in range(3))
    for r, outs, prompt in ((a, 3, np.zeros(8)), (b, 1, np.zeros(4)), (c, 1, np.zeros(2))):
        r.next_decode, r.prompt_rows = outs, prompt
    assert sim.kv.victim == "fewest-outputs" and sim.victim([a, b, c]) is b
    sim.kv.victim = "newest"
    assert sim.victim([a, b, c]) is c


def test_a_request_larger_than_the_pool_is_one_clear_error(tiny):
    with pytest.raises(InputError, match="KV cache cannot hold one request"):
        _run(tiny, _trace([(40, 2)]), kv_blocks=2, batching="vllm")


def test_engine_kv_block_is_validated(tmp_path):
    with pytest.raises(ValidationError, match="slot never grows"):
        KVCacheSpec(allocation={"value": "slot", "source": "doc"}, preemption={"value": "recompute", "source": "doc"})
    with pytest.raises(ValidationError, match="block size"):
        KVCacheSpec(allocation={"value": "paged", "source": "doc"}, preemption={"value": "swap", "source": "doc"})
    # in a profile: one line naming the file and the key
    text = load_engine("vllm").path.read_text().replace("block_tokens: {value: 16,", "block_tokens: {value: 0,")
    (tmp_path / "mine.yaml").write_text(text)
    with pytest.raises(InputError, match="kv_cache.block_tokens.value") as err:
        load_engine(tmp_path / "mine.yaml")
    assert "mine.yaml" in str(err.value) and "\n" not in str(err.value)
    assert load_engine("vllm").profile.kv_cache.tokens_per_block == 16
    assert load_engine("sglang").profile.kv_cache.tokens_per_block == 1


def test_schedulers_are_registered():
    assert {"continuous", "static", "vllm", "sarathi"} <= set(SCHEDULER)


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def tiny_plan(tmp_path, tiny):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(json.loads(CONFIG.read_text()), num_hidden_layers=2, hidden_size=1024,
                                      intermediate_size=4096, num_local_experts=4, num_experts_per_tok=2,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=128)))
    return _plan(tiny).save(tmp_path / "plan.json"), config


def test_simulate_cli_scheduler_and_kv_options(tiny_plan, run_cli):
    plan, config = tiny_plan
    r = run_cli("--json", "simulate", "-p", plan, "-m", config, "--requests", "4", "--scheduler", "sarathi",
                "--chunk-tokens", "8", "--kv-blocks", "6", "--preemption", "swap")
    assert r.exit_code == 0, r.output
    serving = json.loads(r.stdout)["metrics"]["serving"]
    assert serving["scheduler"] == "sarathi" and serving["chunk_tokens"] == 8
    assert serving["kv_cache"]["blocks"] == 6 and serving["kv_cache"]["preemption"] == "swap"
    assert serving["steps"]["mixed"] > 0  # prompt chunks beside decodes
    table = run_cli("simulate", "-p", plan, "-m", config, "--requests", "4", "--kv-blocks", "6", "--batch", "4",
                    "--scheduler", "vllm")
    assert table.exit_code == 0, table.output
    text = " ".join(table.output.split())
    assert "KV cache peak / mean use │ 100% /" in text and "tokens recomputed" in text
    assert "TTFT includes queueing: all 4 requests arrive at t = 0 and the KV cache admits fewer at once" in text
    assert "of the mean TTFT" in text


def test_simulate_cli_bad_kv_options_are_one_line(tiny_plan, run_cli):
    plan, config = tiny_plan
    for args, says in ((["--kv-memory", "lots"], "--kv-memory"), (["--kv-blocks", "1"], "KV cache cannot hold"),
                       (["--kv-blocks", "4", "--kv-memory", "1GiB"], "once")):
        r = run_cli("simulate", "-p", plan, "-m", config, "--requests", "2", *args)
        assert r.exit_code == 1 and says in r.stderr, r.output
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and says in errors[0] and "Traceback" not in r.output
