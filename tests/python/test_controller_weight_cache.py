"""ModelWeightCache (memwarden.controller.weight_cache): LRU order and byte budget against a
brute-force model, exact restores, INT8-compressed restores within the quantization step,
and a model that answers the same after its weights come back from the cache."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings, strategies as st

from memwarden.controller.weight_cache import ModelWeightCache


def state(n_floats: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n_floats, generator=g)}  # a vector: stored as is, 4 bytes a float


def test_lru_eviction_by_bytes_hand_computed():
    cache = ModelWeightCache(1000)  # bytes
    assert cache.put("a", state(100)) == 400
    assert cache.put("b", state(100)) == 400
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", state(60))          # 400 + 400 + 240 > 1000: evict b (least recent)
    s = cache.stats()
    assert s.keys == ("a", "c") and s.bytes_cached == 640 and s.evictions == 1
    assert cache.get("b") is None
    s = cache.stats()
    assert (s.hits, s.misses) == (1, 1) and s.hit_rate == 0.5
    with pytest.raises(ValueError, match="more than the whole budget"):
        cache.put("huge", state(300))  # 1200 bytes
    cache.put("a", state(10))          # replacing a key frees its old bytes first
    assert cache.stats().bytes_cached == 240 + 40 and len(cache) == 2


def test_restore_is_exact_and_a_copy():
    original = {"w": torch.randn(4, 8), "b": torch.randn(8).half(), "step": torch.tensor(3)}
    cache = ModelWeightCache("1MiB")
    cache.put("m", original)
    back = cache.get("m")
    for name, t in original.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    back["w"].zero_()  # changing what get() returned changes nothing cached
    assert torch.equal(cache.get("m")["w"], original["w"])


def test_compressed_matrices_within_half_a_step_per_row():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g).bfloat16()
    cache = ModelWeightCache("1MiB", compress=True)
    held = cache.put("layer", {"weight": w, "bias": torch.ones(16)})
    assert held == 16 * 64 + 16 * 4 + 16 * 4  # int8 matrix + a float32 scale per row + the bias as is
    back = cache.get("layer")["weight"]
    assert back.dtype == torch.bfloat16
    step = w.float().abs().amax(dim=1, keepdim=True) / 127  # per output row
    # half a quantization step, plus the bf16 rounding of the restored value
    assert ((back.float() - w.float()).abs() <= step / 2 + w.float().abs() * 2**-8 + 1e-6).all()
    assert 0 < cache.stats().compression_error <= 1 / 254 + 1e-6


def test_model_answers_the_same_after_a_round_trip():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        want = model(ids).logits
    cache = ModelWeightCache("64MiB")
    for i, layer in enumerate(model.model.layers):  # per decoder layer, as a swap would
        cache.put(("tiny", i), layer)
        for p in layer.parameters():
            p.data.normal_()  # clobbered: only the cache still has the weights
    for i, layer in enumerate(model.model.layers):
        assert cache.load_into(("tiny", i), layer)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    assert cache.stats().bytes_out == cache.stats().bytes_in


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget"):
        ModelWeightCache(0)
    with pytest.raises(ValueError, match="budget"):
        ModelWeightCache("lots")
    with pytest.raises(TypeError, match="compress must be a bool"):
        ModelWeightCache(100, compress="yes")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("pgk"), st.integers(0, 5), st.integers(1, 60)), max_size=40))
def test_matches_an_lru_model(operations):
    # A brute-force LRU over byte sizes: the cache's keys, order and bytes always agree,
    # and never exceed the budget.
    budget = 800
    cache, model = ModelWeightCache(budget), OrderedDict()
    for op, key, floats in operations:
        if op == "p":
            size = floats * 4
            if size > budget:
                with pytest.raises(ValueError):
                    cache.put(key, state(floats))
                continue
            cache.put(key, state(floats))
            model.pop(key, None)
            while sum(model.values()) + size > budget:
                model.popitem(last=False)
            model[key] = size
        elif op == "g":
            got = cache.get(key)
            assert (got is not None) == (key in model)
            if key in model:
                model.move_to_end(key)
        else:
            assert cache.discard(key) == (model.pop(key, None) is not None)
        s = cache.stats()
        assert s.keys == tuple(model) and s.bytes_cached == sum(model.values()) <= budget
