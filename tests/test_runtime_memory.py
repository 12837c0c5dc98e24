"""The bundle runtime holds what its plan counts (issue 18 item 5), measured in bytes, not time.

- an expert read from the checkpoint is one buffer of exactly its bytes (gate and up rows
  read next to each other, no concatenated copy), equal to what safetensors reads, in the
  hub's per-expert layout and in the fused 3-D one;
- after loading and generating, no checkpoint or kernels file stays memory-mapped (a mapped
  file's pages would count as the process's memory: the whole checkpoint after a few
  tokens), so the dense weights are the process's own memory too;
- the expert weights alive at any moment during a step are the plan's (resident experts and
  cache slots) plus at most two experts being copied and computed, even in a prefill that
  misses most of a layer's experts; int8 experts in ONNX Runtime sessions keep no read buffer
  (the session holds its own copy);
- a deferred copy does not start until its slot is started or read.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="needs the [runtime] extra")
transformers = pytest.importorskip("transformers", reason="needs the [runtime] extra")
pytest.importorskip("onnxruntime", reason="needs the [runtime] extra")
safetensors = pytest.importorskip("safetensors", reason="needs the [runtime] extra")

import exporters.runtime.checkpoint as checkpoint_module
from exporters.runtime import build_kernels, load_planned_model
from exporters.runtime.checkpoint import ExpertSource
from exporters.runtime.prefetch import Fetcher

CPU, NVME = "node/cpu0", "node/nvme0"
E, H, I, LAYERS = 8, 32, 48, 2  # experts, hidden size, expert intermediate size, MoE layers
EXPERT_BYTES = (2 * I * H + H * I) * 4  # fp32; both matrices start at 64-byte offsets (both multiples of 64 here)
PROMPT = list(range(3, 35))  # 32 tokens x top-2: a prefill step routes to (almost) every expert


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    """A tiny random Mixtral checkpoint in the hub layout (per-expert w1/w2/w3)."""
    config = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS,
                                        num_local_experts=E, num_experts_per_tok=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
                                        pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for block in (layer.mlp for layer in model.model.layers):
            block.gate.weight.normal_(0.0, 0.5)  # spread the routing over the experts
    directory = tmp_path_factory.mktemp("mixtral")
    model.save_pretrained(directory)
    return directory


def cpu_plan(site: str, slots: int, resident: tuple[int, ...] = ()) -> dict:
    """Every expert at ``site`` homed on disk (a CPU computes), but ``resident`` ones."""
    sites = ["resident" if e in resident else site for e in range(E)]
    homes = [CPU if e in resident else NVME for e in range(E)]
    return {"format_version": 1, "compute_device": CPU, "host_device": CPU, "prefetch": "none", "eviction": "lru",
            "layers": [{"moe_layer": i, "hidden_layer": i, "home": homes, "format": ["fp32"] * E, "site": sites,
                        "cache_slots": slots, "cache_device": CPU if slots else None} for i in range(LAYERS)]}


def test_an_expert_is_read_into_one_buffer_of_its_bytes(mixtral):
    from safetensors import safe_open

    source = ExpertSource(mixtral)
    (path,) = mixtral.glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        for layer, e in ((0, 0), (1, E - 1)):
            gate_up, down = source.read(layer, e)
            key = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            want = torch.cat([f.get_tensor(f"{key}.w1.weight"), f.get_tensor(f"{key}.w3.weight")])
            assert torch.equal(gate_up, want) and torch.equal(down, f.get_tensor(f"{key}.w2.weight"))
            assert gate_up.shape == (2 * I, H) and down.shape == (H, I)
            assert gate_up.untyped_storage().data_ptr() == down.untyped_storage().data_ptr()
            assert gate_up.untyped_storage().nbytes() == EXPERT_BYTES
    assert source.bytes_read == 2 * EXPERT_BYTES


def test_a_fused_checkpoint_is_read_by_slices(tmp_path):
    from safetensors.torch import save_file

    gate_up = torch.randn(E, 2 * I, H).to(torch.bfloat16)
    down = torch.randn(E, H, I).to(torch.bfloat16)
    save_file({"model.layers.3.mlp.experts.gate_up_proj": gate_up, "model.layers.3.mlp.experts.down_proj": down,
               "model.norm.weight": torch.ones(H)}, str(tmp_path / "model.safetensors"))
    source = ExpertSource(tmp_path)
    assert source.layers() == {3: E}
    for e in (0, 5):
        got_gate_up, got_down = source.read(3, e)
        assert got_gate_up.dtype == torch.bfloat16
        assert torch.equal(got_gate_up, gate_up[e]) and torch.equal(got_down, down[e])


@pytest.mark.parametrize("direct", [True, False])
def test_tensors_at_any_offset_read_alike_with_and_without_direct_io(tmp_path, direct):
    """Odd-sized tensors put the next ones off every block boundary: what O_DIRECT reads in whole
    blocks is moved into place; the page-cache path reads the same bytes."""
    from safetensors.torch import load_file, save_file

    from exporters.runtime.tensorfile import TensorFile, read_tensors

    g = torch.Generator().manual_seed(0)
    stored = {"a": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
              "b": torch.randn(5, 7, generator=g), "c": torch.randn(3, 9, generator=g).to(torch.bfloat16),
              "d": torch.randint(0, 255, (4097,), dtype=torch.uint8, generator=g),
              "e": torch.randn(4, 1100, generator=g), "f": torch.randn(6, 1100, generator=g)}
    save_file(stored, str(tmp_path / "t.safetensors"))
    stored = load_file(str(tmp_path / "t.safetensors"))  # as saved
    tf = TensorFile(tmp_path / "t.safetensors", direct=direct)
    got = read_tensors({"ef": [tf.span("e"), tf.span("f")], "b": [tf.span("b")], "c1": [tf.span("c", 1)],
                        "d": [tf.span("d")]})
    assert torch.equal(got["ef"], torch.cat([stored["e"], stored["f"]]))
    assert torch.equal(got["b"], stored["b"]) and torch.equal(got["c1"], stored["c"][1])
    assert torch.equal(got["d"], stored["d"])
    assert got["ef"].untyped_storage().nbytes() == 44032 + 192 + 64 + 4160  # each part from a 64-byte offset


def mapped_files() -> set[str]:
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return {fields[5].strip() for fields in (line.split(maxsplit=5) for line in maps) if len(fields) == 6}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_no_checkpoint_or_kernels_file_stays_mapped(mixtral, tmp_path):
    plan = cpu_plan("fetch", slots=2, resident=(0, 1))
    plan["layers"][1]["format"] = ["int8"] * E  # one layer's experts from the kernels file
    plan["dense_format"] = "fp32"
    with load_planned_model(plan, mixtral, kernels_dir=None, device="cpu") as rt:
        rt.generate(PROMPT[:8], 4)
        weights = {str(p.resolve()) for p in mixtral.glob("*.safetensors")}
        weights |= {str(p) for p in Path(rt.kernels.directory).rglob("*.safetensors")}
        assert len(weights) == 2 and not weights & mapped_files()


class LiveReads:
    """Bytes of the buffers a module's ``read_tensors`` returned that are still alive, and
    their peak (a buffer lives until the last of its tensors is freed)."""

    def __init__(self, module, monkeypatch) -> None:
        self.live = self.peak = 0
        read = module.read_tensors

        def tracked(parts):
            out = read(parts)
            storage = next(iter(out.values())).untyped_storage()
            self._add(storage.nbytes())
            weakref.finalize(storage, self._add, -storage.nbytes())
            return out

        monkeypatch.setattr(module, "read_tensors", tracked)

    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)


@pytest.mark.parametrize(("slots", "resident"), [(0, ()), (2, ()), (1, (0, 3))])
def test_experts_alive_are_the_plans_plus_two_staged(mixtral, tmp_path, monkeypatch, slots, resident):
    """Live bytes of expert buffers (every read, tracked until its tensors are freed) never pass
    resident + cache slots + 2 experts (one computing, one being read), layer by layer."""
    plan = cpu_plan("fetch", slots, resident)
    build_kernels(plan, mixtral, tmp_path)  # reads an expert for its shapes: before the count
    reads = LiveReads(checkpoint_module, monkeypatch)
    with load_planned_model(plan, mixtral, kernels_dir=tmp_path, device="cpu") as rt:
        assert reads.peak == reads.live == len(resident) * LAYERS * EXPERT_BYTES  # loaded: the resident experts
        rt.generate(PROMPT, 4)
        misses = sum(rt.metrics.summary()["misses"])
    planned = (len(resident) + slots) * LAYERS * EXPERT_BYTES
    assert misses > 2 * LAYERS * 3  # a prefill of 32 tokens missed most experts of each layer
    assert reads.peak <= planned + 2 * EXPERT_BYTES


def test_cpu_sessions_keep_no_read_buffer(mixtral, tmp_path, monkeypatch):
    """int8 experts a CPU runs, resident (the layer's session) or cached (a session each),
    are copied by ONNX Runtime into its session: no buffer read from the kernels file stays."""
    import exporters.runtime.kernels as kernels_module

    plan = cpu_plan("fetch", slots=2, resident=(0, 1))
    for layer in plan["layers"]:
        layer["format"] = ["int8"] * E
    build_kernels(plan, mixtral, tmp_path)
    reads = LiveReads(kernels_module, monkeypatch)
    with load_planned_model(plan, mixtral, kernels_dir=tmp_path, device="cpu") as rt:
        rt.generate(PROMPT, 4)
        cached = [slot.get() for store in rt.stores for slot in store.slots.values()]
        assert len(cached) == 2 * LAYERS and all(w.kernel is not None for w in cached)
        assert reads.peak > 0 and reads.live == 0


def test_a_deferred_copy_starts_when_started_or_read():
    calls = []
    for background in (False, True):
        fetcher = Fetcher("cpu", background=background)
        slot = fetcher.submit(lambda: calls.append(1) or "weights", start=False)
        assert not calls and not slot.ready
        assert slot.get() == "weights" and calls == [1] and slot.ready
        slot.start()  # started already: nothing more
        assert calls == [1]
        fetcher.submit(lambda: calls.append(2)).get()
        assert calls == [1, 2]
        fetcher.close()
        calls.clear()
