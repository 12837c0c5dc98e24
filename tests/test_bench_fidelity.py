"""The fidelity set (benchmarks/fidelity/cases.yaml) and its harness (benchmarks/bench_fidelity.py):
every case is well formed and resolves, and the harness prices cases end to end (no network,
no wall-clock assertions)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_fidelity as bf  # noqa: E402

from profiles.formats import get_format  # noqa: E402
from profiles.models import load_model  # noqa: E402


@pytest.fixture(scope="module")
def cases():
    kept, dropped = bf.load_cases()
    assert not dropped, "cases.yaml cites a reserved source"
    return kept


def test_schema(cases):
    assert len(cases) == 67
    ids = [c["id"] for c in cases]
    assert len(set(ids)) == len(ids)
    for c in cases:
        for key in bf.REQUIRED:
            assert key in c, (c["id"], key)
        assert set(bf.CONFIG_KEYS) <= set(c["config"]), c["id"]
        assert c["config"]["policy"] in bf.POLICIES, c["id"]
        assert c["metric"] in bf.METRICS, c["id"]
        assert isinstance(c["value"], (int, float)) and c["value"] > 0, c["id"]
        assert isinstance(c["batch"], int) and c["batch"] >= 1, c["id"]
        if c["metric"] in ("ttft_s", "prefill_tok_s"):
            assert (c["prompt_tokens"] or 0) > 0, c["id"]
        if c["config"]["policy"] == "n-cpu-moe":
            assert isinstance(c["config"]["n"], int), c["id"]


def test_every_case_resolves(cases):
    for c in cases:
        hw = bf.hardware_of(c)
        assert hw.devices, c["id"]
        assert bf._engine(bf.engine_name(c)).name == bf.engine_name(c)
        load_model(c["model"])
        get_format(c["format"])
        get_format(bf.dense_format(c))
        if c["config"]["policy"] not in ("cpu-only",):
            gpus = [d for d in hw.devices.values() if d.kind == "gpu"]
            assert len(gpus) >= max(int(c["config"]["gpus"] or 0), 1), c["id"]


def test_split_is_deterministic_and_stratified(cases):
    priced = [c for c in cases if bf.skip_reason(c) is None]
    fit, held = bf.split(priced)
    assert bf.split(list(reversed(priced))) == (fit, held)
    assert abs(len(fit) - len(held)) <= 1
    assert not {c["id"] for c in fit} & {c["id"] for c in held}
    # every engine with two or more cases has cases on both sides
    for e in {bf.engine_name(c) for c in priced}:
        n = sum(bf.engine_name(c) == e for c in priced)
        if n >= 2:
            assert any(bf.engine_name(c) == e for c in fit) and any(bf.engine_name(c) == e for c in held), e


@pytest.mark.parametrize("case_id", [
    "llamacpp-gpt-oss-20b-mxfp4-4090-tg128",  # all on the GPU, decode
    "llamacpp-qwen3-30b-a3b-q4km-2080-ncpumoe36-decode",  # --n-cpu-moe
    "ikllama-gpt-oss-20b-mxfp4-7950x-cpu-prefill",  # CPU only, prefill
])
def test_prices_end_to_end(cases, case_id):
    c = next(c for c in cases if c["id"] == case_id)
    out = bf.price_case(c)
    assert math.isfinite(out["predicted"]) and out["predicted"] > 0
    if c["config"]["policy"] == "cpu-only":
        assert out["compute"].split("/")[1].startswith("cpu")
    # a faster engine (all overheads at a tenth) never predicts a slower rate
    faster = bf.price_case(c, {k: 0.1 for k in bf.PER_ENGINE if k.endswith(("layer", "expert_call")) or k == "step"})
    assert faster["predicted"] >= out["predicted"] * (1 - 1e-9)


def test_fit_leaves_a_fused_engines_per_call_cost_alone():
    assert not any(k.endswith("expert_call") for k in bf.fitted_keys("llama.cpp"))
    assert "cpu.expert_call" in bf.fitted_keys("accelerate")  # an eager per-expert loop
    x = [0.1 * i for i in range(len(bf.fitted_keys("accelerate")) + len(bf.fitted_keys("llama.cpp")))]
    scales = bf._unpack(__import__("numpy").array(x), ["accelerate", "llama.cpp"])
    assert list(scales["llama.cpp"]) == list(bf.fitted_keys("llama.cpp"))
    assert scales["llama.cpp"][bf.fitted_keys("llama.cpp")[0]] == math.exp(0.1 * len(bf.fitted_keys("accelerate")))


def test_a_version_profile_prices_the_case_but_keeps_its_half(cases):
    """A case that names an older build is priced on that build's profile
    (benchmarks/fidelity/engines/), while the split and the fit still key it by its engine,
    so naming a version moves no case between halves."""
    c = next(c for c in cases if c["id"] == "llamacpp-deepseek-r1-iq1s-2xh100-decode")
    assert bf.profile_name(c) == "llama.cpp-2025-01" and bf.engine_name(c) == "llama.cpp"
    assert not bf._engine(bf.profile_name(c)).profile.fused_experts.value
    priced = [x for x in cases if bf.skip_reason(x) is None]
    plain = [dict(x, engine_profile=None) for x in priced]
    assert [x["id"] for x in bf.split(priced)[1]] == [x["id"] for x in bf.split(plain)[1]]
    # the host-synchronised per-expert loop of that build is slower than today's fused kernels
    old, new = bf.price_case(c)["predicted"], bf.price_case(dict(c, engine_profile=None))["predicted"]
    assert old < 0.5 * new


def test_mxfp4_gguf_dense_format_matches_the_file_sizes_the_sources_quote(cases):
    """The MXFP4 GGUF cases price their non-expert tensors as q8_0 because the file sizes in
    their sources' llama-bench tables match q8_0, not bf16 (see the cases' assumptions)."""
    quoted = {"gpt-oss-20b": 11.27, "gpt-oss-120b": 59.02}  # GiB: ikllama-pr683, reddit-eloquentemu-epyc9b14
    for name, gib in quoted.items():
        m = load_model(name)
        size = {f: (m.dense_bytes(f) + m.experts_bytes("mxfp4")) / 2**30 for f in ("q8_0", "bf16")}
        assert abs(size["q8_0"] / gib - 1) < 0.01 < abs(size["bf16"] / gib - 1), (name, size)
    marked = [c for c in cases if "ftype 'MXFP4 MoE'" in c["assumptions"]]
    assert len(marked) >= 10
    assert all(c["dense_format"] == "q8_0" and c["format"] == "mxfp4" for c in marked)


def test_attention_share_is_fitted_where_stated_and_dropped_without_flash_attention(cases):
    """llama.cpp states its CPU FlashAttention share (fitted); a run without FlashAttention
    (the source says so, or its build predates the auto default) is priced without it."""
    assert "cpu.attention" in bf.fitted_keys("llama.cpp")
    assert "gpu.attention" not in bf.fitted_keys("llama.cpp")
    assert not any(k.endswith(".attention") for k in bf.fitted_keys("vllm"))
    case = next(c for c in cases if c["id"] == "llamacpp-qwen3-30b-a3b-iq4xs-7950x-cpu-pp512")
    assert case["config"]["flash_attn"] is False
    with_fa = dict(case, config=dict(case["config"], flash_attn=True))
    assert bf.price_case(with_fa)["predicted"] < bf.price_case(case)["predicted"]  # prompt tok/s


def test_ncpumoe27_cases_fit_host_ram_so_their_slow_decode_is_not_mmap_paging(cases):
    """The hwcorner RTX 3090 + EPYC 7343 decode rows (1.4-1.8 t/s, ~10x below the model) were
    suspected of paging mmap'd weights from disk. llama.cpp keeps mapped only the range of the
    tensors in host buffers (load_all_data unmaps the rest), so what the CPU reads per token is
    the 27 CPU layers' experts: they fit the 64 GiB with room to spare, and the planner's memory
    check with its host reserve passes (the cases are scored, not listed as does_not_fit)."""
    rows = [c for c in cases if c["source"] == "hwcorner-gptoss120b-ncpumoe" and c["metric"] == "decode_tok_s"
            and c["config"]["policy"] == "n-cpu-moe"]
    assert len(rows) == 2
    m = load_model("gpt-oss-120b")
    hw = bf.hardware_of(rows[0])
    ram = next(d for d in hw.devices.values() if d.kind == "cpu").memory_bytes
    for c in rows:
        n = int(c["config"]["n"])
        cpu_read = n / m.num_moe_layers * m.experts_bytes(c["format"]) + m.embedding_params * get_format(
            c["dense_format"]).bits_per_weight / 8
        assert cpu_read < 0.75 * ram, (c["id"], cpu_read / 2**30, ram / 2**30)
        assert bf.price_case(c, check_fit=True)["does_not_fit"] is None
        assert "not mmap paging" in c["assumptions"] or "Not explained by mmap paging" in c["assumptions"]
