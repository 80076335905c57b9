import pytest

from memwarden import estimate as E
from memwarden import footprint as F
from memwarden import models as M

GIB = 2**30
LLAMA_KV_TOKEN = 32 * 8 * 128 * 2 * 2    # layers x kv heads x head_dim x (K, V) x bf16


def test_kv_and_totals_by_hand():
    e = E.estimate("llama-3.1-8b", context=8192, batch=2, cuda_context=0, workspace=0)
    assert e.kv_cache == 8192 * 2 * LLAMA_KV_TOKEN
    assert e.weights == M.describe("llama-3.1-8b").bytes
    assert e.total == e.weights + e.kv_cache + e.activations
    assert E.estimate("llama-3.1-8b", context=8192, kv_dtype="int8").kv_cache == 8192 * LLAMA_KV_TOKEN // 2
    # memwarden's dynamic INT8 pages: a 4-byte scale per token and head, for K and for V
    per_token_head = E.estimate("llama-3.1-8b", context=100, kv_dtype="int8_per_token_head").kv_cache
    assert per_token_head == 100 * 32 * (8 * 128 * 2 + 2 * 8 * 4)
    assert E.estimate("llama-3.1-8b", context=100, kv_dtype="fp8").kv_cache == 100 * LLAMA_KV_TOKEN // 2


def test_mla_and_sliding_window():
    assert E.estimate("deepseek-v3", context=1000).kv_cache == 1000 * 61 * 576 * 2
    # decompressed per head (engines without weight absorption): K 128 heads x 192, V 128 x 128
    assert E.estimate("deepseek-v3", context=1000, mla_cache="per_head").kv_cache == \
        1000 * 61 * 128 * (192 + 128) * 2
    g = E.estimate("gpt-oss-20b", context=4096).kv_cache
    per = 8 * 64 * 2 * 2
    assert g == 12 * per * 4096 + 12 * per * 128


def test_activation_peak_grows_with_chunk_not_context():
    a = E.estimate("mixtral-8x7b", context=100_000, prefill_chunk=1024).activations
    b = E.estimate("mixtral-8x7b", context=200_000, prefill_chunk=1024).activations
    c = E.estimate("mixtral-8x7b", context=200_000, prefill_chunk=2048).activations
    assert a == b < c


def test_context_beyond_the_model_warns():
    e = E.estimate("llama-3.1-8b", context=200_000)
    assert any("above the model's max_position_embeddings 131072" in w for w in e.warnings)
    assert "warning: context 200000" in e.report()
    assert not E.estimate("llama-3.1-8b", context=8192).warnings


def test_per_device_breakdown_adds_up():
    e = E.estimate("mixtral-8x7b", "int4", context=32768, max_memory={0: "24GiB", 1: "24GiB"})
    assert e.fits
    assert sum(d.model for d in e.devices) == e.weights
    assert sum(d.context for d in e.devices) == e.kv_cache
    assert all(d.free == d.memory - d.model - d.context - d.compute - d.overhead for d in e.devices)
    assert "fits" in e.report()
    assert E.estimate("mixtral-8x7b", max_memory={0: "24GiB"}).fits is False


def test_vllm_style_block_sizing():
    e = E.estimate("llama-3.1-8b", context=4096, max_memory={0: "24GiB"}, block_size=16)
    gpu = e.devices[0]
    room = gpu.memory - gpu.model - gpu.compute - gpu.overhead
    assert e.kv_budget == room
    assert e.kv_blocks == room // (16 * LLAMA_KV_TOKEN)
    assert e.max_sequences == room // (4096 * LLAMA_KV_TOKEN)   # 4096 is 256 whole blocks
    assert e.max_sequences == F.max_concurrent_sequences(M.model_spec("llama-3.1-8b"), room, 4096)
    assert e.kv_tokens == int(e.kv_blocks / 256 * 4096)          # vLLM's "KV cache size"
    assert f"(KV cache size {e.kv_tokens} tokens)" in e.report()


def test_vllm_style_block_sizing_of_sliding_and_full_layers():
    # gpt-oss-20b: 12 sliding (window 128) and 12 full layers of 8 kv heads x 64, bf16: two
    # groups of 12 layers, a block is 16 tokens in 12 layers
    e = E.estimate("gpt-oss-20b", context=8192, max_memory={0: "80GiB"}, prefill_chunk=2048)
    block = 12 * 16 * 8 * 64 * 2 * 2
    assert e.kv_blocks == e.kv_budget // block
    # per sequence: the full layers' 512 blocks, the sliding layers' window less one plus
    # the 2048 tokens of a prefill chunk (137 blocks with the one a window straddles)
    assert e.max_sequences == e.kv_blocks // (8192 // 16 + (127 + 2048 + 15) // 16 + 1)


def test_accelerate_offload_keeps_the_kv_on_the_gpu():
    mem = {0: "8GiB", "cpu": "64GiB"}
    e = E.estimate("llama-3.1-8b", context=8192, max_memory=mem)
    gpu, cpu = e.devices
    assert cpu.model > 0 and cpu.context == 0 and gpu.context == e.kv_cache
    assert any("execute on GPU 0" in n for n in e.notes)
    # the GPU also holds the largest offloaded piece while it runs: here the head (norm and
    # lm_head, 1002 MiB, bigger than any decoder layer), which does not fit beside the rest
    groups = {}
    for part in M.describe("llama-3.1-8b").parts:
        groups[part.layer] = groups.get(part.layer, 0) + part.bytes
    assert max(groups, key=groups.get) == 32
    assert gpu.compute - e.activations == groups[32]
    ctx = E.max_context("llama-3.1-8b", mem)
    assert 0 < ctx < 131072                    # not the whole context with the KV in host RAM
    assert E.estimate("llama-3.1-8b", context=ctx, max_memory=mem).fits
    assert not E.estimate("llama-3.1-8b", context=ctx + 1, max_memory=mem).fits


def test_llama_cpp_gpu_layers():
    mem = {0: "8GiB", "cpu": "64GiB"}
    e = E.estimate("llama-3.1-8b", context=8192, max_memory=mem, gpu_layers=16)
    desc = M.describe("llama-3.1-8b")
    on_gpu = sum(p.bytes for p in desc.parts if 0 <= p.layer < 16)
    gpu, cpu = e.devices
    assert gpu.model == on_gpu and cpu.model == desc.bytes - on_gpu   # embeddings and head stay on the host
    assert gpu.context == cpu.context == e.kv_cache // 2
    assert e.placement == "llama.cpp gpu_layers=16"
    every = E.estimate("llama-3.1-8b", context=8192, max_memory={0: "24GiB", "cpu": "8GiB"}, gpu_layers=32)
    assert every.devices[0].model == desc.bytes - desc.parts[0].bytes   # the output layer joins the GPU
    with pytest.raises(ValueError, match="add 'cpu' to max_memory"):
        E.estimate("llama-3.1-8b", max_memory={0: "8GiB"}, gpu_layers=8)
    with pytest.raises(ValueError, match="at most the model's 32 layers"):
        E.estimate("llama-3.1-8b", max_memory=mem, gpu_layers=40)


def test_max_context_is_the_boundary_or_the_model_maximum():
    mem = {0: "24GiB"}
    c = E.max_context("llama-3.1-8b", mem)
    assert 0 < c < 131072
    assert E.estimate("llama-3.1-8b", context=c, max_memory=mem).fits
    assert not E.estimate("llama-3.1-8b", context=c + 1, max_memory=mem).fits
    assert E.max_context("llama-3.1-8b", {0: "8GiB"}) == 0
    assert E.max_context("llama-3.1-8b", {0: "80GiB"}) == 131072   # stops at max_position_embeddings


@pytest.mark.parametrize("kw,match", [({"context": 0}, "context"), ({"batch": -1}, "batch"),
                                      ({"dtype": "int3"}, "dtype"), ({"kv_dtype": "int3"}, "kv_dtype"),
                                      ({"mla_cache": "x"}, "mla_cache"), ({"offload": "x"}, "offload"),
                                      ({"block_size": 0}, "block_size")])
def test_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        E.estimate("llama-3.1-8b", **kw)


def test_plan_auto_reserve_leaves_room_for_kv_and_says_what_it_assumed():
    from memwarden.plan import plan
    p = plan("mixtral-8x7b", {0: "48GiB", 1: "48GiB"}, reserve="auto", context=32768)
    kv = F.kv_cache_bytes(M.model_spec("mixtral-8x7b"), 32768)
    assert all(p.reserve[d] > kv // 2 for d in (0, 1))
    assert p.notes and "context 32768 x batch 1" in p.notes[0] and "split over 2 device(s)" in p.notes[0]
