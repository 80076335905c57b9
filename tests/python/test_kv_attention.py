"""The "memwarden_paged" attention backend (memwarden.kv.attention) on tiny random models:
against transformers' own SDPA/eager attention over DynamicCache (exact up to float
reassociation) and over the same PagedCache read densely (INT8, runs of pages of several
kinds, offloaded and evicted pages), and with the pages really read in place (a dense
read after the prefill fails the test)."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402

import test_kv_paged_cache as C  # noqa: E402  (tiny models, prompts, greedy generate)
from memwarden.kv import PagedCache, PagedKVCache, attention  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")]


@contextlib.contextmanager
def attn(model, name):
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def no_dense_reads(monkeypatch, allowed=0):
    """Fail on the (allowed + 1)-th dense read of the pages."""
    reads = []
    original = PagedKVCache.get

    def get(self, layer):
        reads.append(layer)
        if len(reads) > allowed:
            raise AssertionError("the paged backend read the pages densely")
        return original(self, layer)

    monkeypatch.setattr(PagedKVCache, "get", get)
    yield reads
    monkeypatch.setattr(PagedKVCache, "get", original)


def max_logit_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("arch", list(C.ARCHS))
def test_matches_sdpa_over_dynamic_cache_without_dense_reads(arch, monkeypatch):
    model = C.tiny_model(arch)
    ids = C.prompt(1, 12)
    ref = C.generate(model, DynamicCache(config=model.config), ids, new=30)
    with attn(model, attention.ATTENTION_NAME), no_dense_reads(monkeypatch):
        out = C.generate(model, PagedCache(model.config, page_size=8), ids, new=30)
    assert torch.equal(ref.sequences, out.sequences)
    assert max_logit_diff(ref, out) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_left_padded_batch_matches_dynamic_cache(arch, monkeypatch):
    model = C.tiny_model(arch)
    ids = C.prompt(3, 14, seed=3)
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0
    ids[2, :2], mask[2, :2] = 0, 0
    ref = C.generate(model, DynamicCache(config=model.config), ids, new=20, attention_mask=mask)
    with attn(model, attention.ATTENTION_NAME), no_dense_reads(monkeypatch):
        out = C.generate(model, PagedCache(model.config, page_size=4), ids, new=20, attention_mask=mask)
    assert torch.equal(ref.sequences, out.sequences)
    assert max_logit_diff(ref, out) < 1e-5


# Configurations whose pages come in several runs (INT8 behind a full-precision residual
# window, pages offloaded to host memory or evicted): the backend attends over each run
# and merges them; the reference is the same cache read densely under SDPA.
RUNS = {
    "int8": dict(kv_dtype="int8"),
    "int8_residual": dict(kv_dtype="int8", residual_length=10),
    "pressure": dict(compress="pressure", max_memory=None),
    "host_offload": dict(offload="host", compress="never"),
    "evict": dict(offload="evict", compress="never"),
    "streaming": dict(prune="streaming", sinks=2, window=12),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_runs_of_pages_match_the_dense_read(name, monkeypatch):
    model = C.tiny_model("llama")
    ids = C.prompt(2, 20, seed=7)
    options = dict(RUNS[name])
    if name in ("host_offload", "evict", "pressure"):
        slot = C.slot_bytes(model, 4, compress="never" if name != "pressure" else "pressure")
        options["max_memory"] = 12 * slot  # 24 tokens of 2 sequences, 44 to hold: pages must move
        if name == "pressure":
            options.pop("compress")
    ref_cache = PagedCache(model.config, page_size=4, **options)
    ref = C.generate(model, ref_cache, ids, new=24)
    cache = PagedCache(model.config, page_size=4, **options)
    with attn(model, attention.ATTENTION_NAME), no_dense_reads(monkeypatch):
        out = C.generate(model, cache, ids, new=24)
    assert torch.equal(ref.sequences, out.sequences)
    assert max_logit_diff(ref, out) < 1e-4
    # The same pages went through the same states (only the reads differ: no dense prefill read).
    assert dataclasses.replace(cache.stats(), reads=0, offloaded_reads=0) == \
        dataclasses.replace(ref_cache.stats(), reads=0, offloaded_reads=0)
    moved = {"host_offload": "pages_offloaded", "evict": "pages_evicted", "pressure": "pages_compressed",
             "int8_residual": "pages_compressed", "streaming": "tokens_removed"}
    if name in moved:
        assert getattr(cache.stats(), moved[name]) > 0


def test_int8_within_quantization_error_of_full_precision():
    model = C.tiny_model("qwen3")
    ids = C.prompt(1, 40, seed=5)
    full = C.forced_logits(model, DynamicCache(config=model.config), ids, 16)
    dense_int8 = C.forced_logits(model, PagedCache(model.config, page_size=8, kv_dtype="int8"), ids, 16)
    with attn(model, attention.ATTENTION_NAME):
        paged_int8 = C.forced_logits(model, PagedCache(model.config, page_size=8, kv_dtype="int8"), ids, 16)
    # Same INT8 values either way: dequantize-then-SDPA and dequantize-in-registers agree.
    torch.testing.assert_close(paged_int8, dense_int8, rtol=0, atol=2e-5)
    assert 0 < (paged_int8 - full).abs().max() < 0.05


def test_other_caches_are_unchanged():
    model = C.tiny_model("llama")
    ids = C.prompt(1, 10)
    ref = C.generate(model, DynamicCache(config=model.config), ids, new=12)
    with attn(model, attention.ATTENTION_NAME):
        out = C.generate(model, DynamicCache(config=model.config), ids, new=12)
    assert torch.equal(ref.sequences, out.sequences)
    assert max_logit_diff(ref, out) == 0


def tiny_gpt_oss():
    cfg = AutoConfig.for_model("gpt_oss", **{**C.BASE, "num_local_experts": 4, "num_experts_per_tok": 2,
                                              "sliding_window": 6, "layer_types": ["sliding_attention",
                                                                                   "full_attention"]})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_()  # zero-initialised: make them matter
    return model


def test_attention_sinks_match_gpt_oss_eager(monkeypatch):
    model = tiny_gpt_oss()
    ids = C.prompt(1, 12, seed=2)
    ref = C.generate(model, DynamicCache(config=model.config), ids, new=20)
    with attn(model, attention.ATTENTION_NAME), no_dense_reads(monkeypatch):
        out = C.generate(model, PagedCache(model.config, page_size=4), ids, new=20)
    assert torch.equal(ref.sequences, out.sequences)
    assert max_logit_diff(ref, out) < 1e-5


def test_stand_ins_materialise_for_other_code():
    store = PagedKVCache(1, 2, 16, batch_size=1, page_size=4, dtype=torch.float32)
    k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    store.add(0, k, v)
    keys, values = attention.paged_states(store, 0)
    assert isinstance(keys, attention.PagedStates) and keys.shape == (1, 2, 9, 16)
    # any torch operation sees the dense K/V
    torch.testing.assert_close(keys * 1, k, rtol=0, atol=0)
    torch.testing.assert_close(torch.matmul(torch.ones(1, 2, 1, 9), values), v.sum(2, keepdim=True))


def test_attend_matches_sdpa_on_the_store():
    # PagedKVCache.attend against SDPA over the dense read, with INT8 pages behind a
    # full-precision residual window (two runs), GQA and several query tokens.
    store = PagedKVCache(2, 2, 32, batch_size=2, page_size=4, dtype=torch.float32, kv_dtype="int8",
                         residual_length=6)
    for step in (11, 3, 1, 5):
        for layer in range(2):
            store.add(layer, torch.randn(2, 2, step, 32), torch.randn(2, 2, step, 32))
        store.enforce_budget()
    q = torch.randn(2, 8, 5, 32)
    k, v = store.get(1)
    mask = torch.ones(5, k.shape[2], dtype=torch.bool).tril(k.shape[2] - 5)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = store.attend(1, q)
    assert len({(p.kind, p.tier) for p in store._pages}) == 2  # really two runs
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-5)
    # queries reaching past the newest run: None (the caller reads densely)
    assert store.attend(1, torch.randn(2, 8, 40, 32)) is None


def test_threads_attend_at_once():
    # A server runs requests in several threads: generations with different masks (left
    # padding) running at once give what each gives alone (no state shared between them).
    import threading

    model = C.tiny_model("llama")
    jobs = []
    for seed, pad in ((1, 0), (2, 3), (3, 5)):
        ids = C.prompt(2, 12, seed=seed)
        mask = torch.ones_like(ids)
        ids[1, :pad], mask[1, :pad] = 0, 0
        jobs.append((ids, mask))
    with attn(model, attention.ATTENTION_NAME):
        alone = [C.generate(model, PagedCache(model.config, page_size=4), ids, new=16, attention_mask=mask).sequences
                 for ids, mask in jobs]
        together = [None] * len(jobs)

        def run(i):
            ids, mask = jobs[i]
            together[i] = C.generate(model, PagedCache(model.config, page_size=4), ids, new=16,
                                     attention_mask=mask).sequences

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for a, b in zip(alone, together):
        assert torch.equal(a, b)


def test_the_mask_memo_keeps_no_mask_alive():
    # a server's idle threads would otherwise each hold their last prompt's mask
    import weakref

    from memwarden.kv import attention

    mask = attention._causal_mask(6, 6, "cpu")
    assert attention._kv_start(mask, 6, 6) is not False
    assert attention._kv_start(mask, 6, 6) is attention._mask_memo.kv_start  # memoised while alive
    ref = weakref.ref(mask)
    del mask
    assert ref() is None
