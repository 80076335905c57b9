"""memwarden.footprint against independent references.

* transformers' own ``DynamicCache``, filled by a forward pass of tiny real models with
  random weights on the CPU (float32 unless said otherwise): the bytes its layers hold
  (``keys``/``values`` of attention layers, ``conv_states``/``recurrent_states`` of
  linear-attention layers) against ``kv_layer_bytes`` / ``state_bytes`` /
  ``kv_cache_bytes``;
* numbers computed by hand for the embedded ``llama-3.1-8b`` and tiny specs;
* properties that the activation model must have.

Known differences are asserted as such: transformers' sliding layers keep one token less
than the window memwarden counts.
"""
from __future__ import annotations

import functools
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache  # noqa: E402

from memwarden import footprint as F  # noqa: E402
from memwarden import models  # noqa: E402

T_SHORT = 5      # below every window used here
WINDOW = 8
T_LONG = 13      # past the window

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)

ARCHS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", dict(sliding_window=WINDOW)),                      # every layer sliding
    "gemma2": ("gemma2", dict(sliding_window=WINDOW, head_dim=16)),           # sliding, full
    "gpt_oss": ("gpt_oss", dict(sliding_window=WINDOW, head_dim=16, num_local_experts=4,
                                num_experts_per_tok=2)),                      # sliding, full; sinks
    "deepseek_v3": ("deepseek_v3", dict(kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16,
                                        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=4,
                                        num_experts_per_tok=2, first_k_dense_replace=1,
                                        moe_intermediate_size=32, n_group=1, topk_group=1,
                                        num_key_value_heads=4)),  # MLA: kv heads = heads
    "qwen3_next": ("qwen3_next", dict(num_hidden_layers=4, head_dim=16, linear_num_key_heads=2,
                                      linear_num_value_heads=4, linear_key_head_dim=8,
                                      linear_value_head_dim=8, linear_conv_kernel_dim=4, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=32)),   # 3 linear + 1 full
    "mimo_v2_flash": ("mimo_v2_flash", dict(num_hidden_layers=3, head_dim=24, v_head_dim=16,
                                            sliding_window=WINDOW, n_routed_experts=4,
                                            num_experts_per_tok=2, moe_intermediate_size=32)),
}


def tiny_config(name: str, **extra):
    model_type, kw = ARCHS[name]
    return AutoConfig.for_model(model_type, **{**TINY, **kw, **extra})


@functools.lru_cache(maxsize=None)
def tiny(name: str, dtype: str = "float32"):
    """(config, model, memwarden spec) of a tiny random model, built once."""
    cfg = tiny_config(name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype)).eval()
    return cfg, model, models.describe(cfg).spec


def filled_cache(name: str, tokens: int, batch: int, dtype: str = "float32") -> DynamicCache:
    cfg, model, _ = tiny(name, dtype)
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens))
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    return cache


def _tensors(states) -> list:
    return [t for t in (states or {}).values() if t is not None]


def kv_nbytes(layer) -> int:
    """Bytes of the K and V tensors a transformers cache layer holds (0 for none)."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or values is None:
        return 0
    return keys.nbytes + values.nbytes


def state_nbytes(layer) -> int:
    """Bytes of the conv and recurrent states a linear-attention cache layer holds."""
    return sum(t.nbytes for t in _tensors(getattr(layer, "conv_states", None)) +
               _tensors(getattr(layer, "recurrent_states", None)))


def kv_tokens(layer) -> int:
    return layer.keys.shape[-2]


# --------------------------------------------------------------------------- KV vs DynamicCache


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("tokens", [1, T_SHORT, T_LONG])
def test_llama_gqa_equals_dynamic_cache(tokens, batch):
    _, _, spec = tiny("llama")
    cache = filled_cache("llama", tokens, batch)
    got = [kv_nbytes(layer) for layer in cache.layers]
    assert got == [batch * 2 * tokens * (16 + 16) * 4] * 2  # the cache's own shapes, by hand
    assert F.kv_layer_bytes(spec, tokens, batch, kv_dtype="float32", mla_cache="per_head") == got
    assert F.kv_cache_bytes(spec, tokens, batch, kv_dtype="float32", mla_cache="per_head",
                            state_element_bytes=4) == sum(got)


def test_llama_bfloat16_auto_follows_weights():
    _, _, spec = tiny("llama", "bfloat16")
    cache = filled_cache("llama", T_SHORT, 2, "bfloat16")
    assert all(layer.keys.dtype == torch.bfloat16 for layer in cache.layers)
    got = [kv_nbytes(layer) for layer in cache.layers]
    assert F.kv_layer_bytes(spec, T_SHORT, 2, kv_dtype="auto", weights_dtype="bfloat16") == got
    assert F.kv_layer_bytes(spec, T_SHORT, 2, kv_dtype="auto", weights_dtype="float32") == [2 * g for g in got]


SLIDING = ["mistral", "gemma2", "gpt_oss"]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", SLIDING)
def test_sliding_inside_window_equals_dynamic_cache(name, batch):
    _, _, spec = tiny(name)
    for tokens in (1, T_SHORT, WINDOW - 1):
        cache = filled_cache(name, tokens, batch)
        got = [kv_nbytes(layer) for layer in cache.layers]
        assert F.kv_layer_bytes(spec, tokens, batch, kv_dtype="float32", mla_cache="per_head") == got
        assert F.kv_cache_bytes(spec, tokens, batch, kv_dtype="float32", state_element_bytes=4) == sum(got)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", SLIDING)
@pytest.mark.parametrize("tokens", [WINDOW, T_LONG])
def test_sliding_past_window_counts_one_token_more(name, tokens, batch):
    """transformers' DynamicSlidingWindowLayer keeps the last ``sliding_window - 1`` tokens
    after the update (the window's last slot is the next query's own token); memwarden
    counts ``min(T, window)``: exactly one token per sliding layer more, full layers exact."""
    _, _, spec = tiny(name)
    cache = filled_cache(name, tokens, batch)
    mine = F.kv_layer_bytes(spec, tokens, batch, kv_dtype="float32", mla_cache="per_head")
    extra = 0
    assert len(cache.layers) == len(spec.layers)
    for layer_spec, layer, m in zip(spec.layers, cache.layers, mine):
        got = kv_nbytes(layer)
        if layer_spec.kind == "sliding":
            assert getattr(layer, "is_sliding", False)
            kept = kv_tokens(layer)
            assert kept == WINDOW - 1
            one_token = got // kept
            assert m - got == one_token
            extra += one_token
        else:
            assert layer_spec.kind == "full" and kv_tokens(layer) == tokens
            assert m == got
    assert extra > 0
    total = sum(kv_nbytes(layer) for layer in cache.layers)
    assert F.kv_cache_bytes(spec, tokens, batch, kv_dtype="float32", state_element_bytes=4) == total + extra


def test_gpt_oss_alternates_sliding_and_full():
    _, _, spec = tiny("gpt_oss")
    assert [layer.kind for layer in spec.layers] == ["sliding", "full"]
    assert spec.layers[0].window == WINDOW
    cache = filled_cache("gpt_oss", T_LONG, 1)
    assert [kv_tokens(layer) for layer in cache.layers] == [WINDOW - 1, T_LONG]


# MLA (DeepSeek-V3): kv_lora_rank 16, qk_rope 8, qk_nope 16, v_head_dim 12, 4 heads.

@pytest.mark.parametrize("batch", [1, 2])
def test_mla_latent_by_hand(batch):
    _, _, spec = tiny("deepseek_v3")
    for tokens in (1, T_LONG):
        want = (16 + 8) * tokens * 4 * batch
        assert F.kv_layer_bytes(spec, tokens, batch, kv_dtype="float32", mla_cache="latent") == [want] * 2
        # per head: 4 heads x (K 16 + 8, V 12)
        assert F.kv_layer_bytes(spec, tokens, batch, kv_dtype="float32", mla_cache="per_head") == \
            [4 * (16 + 8 + 12) * tokens * 4 * batch] * 2


@pytest.mark.parametrize("batch", [1, 2])
def test_mla_dynamic_cache_holds_the_latent(batch):
    """transformers 5.18 caches MLA layers compressed: keys = kv_nope [B, 1, T, kv_lora_rank],
    values = k_rot [B, 1, T, qk_rope_head_dim]; that is memwarden's ``mla_cache="latent"``."""
    _, _, spec = tiny("deepseek_v3")
    cache = filled_cache("deepseek_v3", T_LONG, batch)
    for layer in cache.layers:
        assert tuple(layer.keys.shape) == (batch, 1, T_LONG, 16)
        assert tuple(layer.values.shape) == (batch, 1, T_LONG, 8)
    got = [kv_nbytes(layer) for layer in cache.layers]
    assert F.kv_layer_bytes(spec, T_LONG, batch, kv_dtype="float32", mla_cache="latent") == got


def test_mla_per_head_is_the_decompressed_layout_by_hand():
    """Engines without weight absorption keep K (heads x (nope + rope)) and V (heads x v) per head."""
    _, _, spec = tiny("deepseek_v3")
    layer = spec.layers[0]
    per_token = layer.kv_heads * (layer.k_dim + layer.v_dim) * 4
    assert (layer.kv_heads, layer.k_dim, layer.v_dim) == (4, 16 + 8, 12)
    assert F.kv_layer_bytes(spec, T_LONG, 2, kv_dtype="float32", mla_cache="per_head") == \
        [per_token * T_LONG * 2] * len(spec.layers)


# Hybrid linear attention (Qwen3-Next): 3 gated-delta-net layers + 1 full attention.
# Per sequence and linear layer: conv (2*2*8 + 4*8) channels x kernel 4 = 256 elements,
# recurrent 4 value heads x 8 x 8 = 256 elements.

def test_qwen3_next_spec_by_hand():
    _, _, spec = tiny("qwen3_next")
    assert [layer.kind for layer in spec.layers] == ["state", "state", "state", "full"]
    # conv state in the compute dtype, recurrent state in float32
    assert [(layer.state_elements, layer.state_fp32_elements) for layer in spec.layers[:3]] == [(256, 256)] * 3


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("tokens", [2, T_LONG])
def test_qwen3_next_float32_equals_dynamic_cache(tokens, batch):
    _, _, spec = tiny("qwen3_next")
    cache = filled_cache("qwen3_next", tokens, batch)
    kv = [kv_nbytes(layer) for layer in cache.layers]
    state = [state_nbytes(layer) for layer in cache.layers]
    assert state == [512 * 4 * batch] * 3 + [0]
    assert F.kv_layer_bytes(spec, tokens, batch, kv_dtype="float32") == kv
    assert F.state_bytes(spec, batch, state_element_bytes=4) == state
    assert F.kv_cache_bytes(spec, tokens, batch, kv_dtype="float32", state_element_bytes=4) == sum(kv) + sum(state)


def test_qwen3_next_bfloat16_recurrent_state_is_float32():
    """transformers keeps the conv state in the model dtype but the recurrent state in float32
    (the torch gated-delta-rule casts to float32 and returns its state so)."""
    cache = filled_cache("qwen3_next", T_SHORT, 2, "bfloat16")
    linear = [layer for layer in cache.layers if _tensors(getattr(layer, "recurrent_states", None))]
    assert len(linear) == 3
    for layer in linear:
        assert {t.dtype for t in _tensors(layer.conv_states)} == {torch.bfloat16}
        assert {t.dtype for t in _tensors(layer.recurrent_states)} == {torch.float32}


def test_qwen3_next_bfloat16_state_equals_dynamic_cache():
    _, _, spec = tiny("qwen3_next", "bfloat16")
    cache = filled_cache("qwen3_next", T_SHORT, 2, "bfloat16")
    assert F.state_bytes(spec, 2, state_element_bytes=2) == [state_nbytes(layer) for layer in cache.layers]


# Different K and V head sizes outside MLA: MiMo-V2-Flash (head_dim 24, v_head_dim 16;
# layer 0 full, layers 1-2 sliding).

def test_mimo_full_layer_k_and_v_sizes_differ():
    _, _, spec = tiny("mimo_v2_flash")
    assert (spec.layers[0].k_dim, spec.layers[0].v_dim) == (24, 16)
    cache = filled_cache("mimo_v2_flash", T_SHORT, 2)
    layer = cache.layers[0]
    assert (layer.keys.shape[-1], layer.values.shape[-1]) == (24, 16)
    assert F.kv_layer_bytes(spec, T_SHORT, 2, kv_dtype="float32")[0] == kv_nbytes(layer) == 2 * 2 * T_SHORT * 40 * 4


def test_mimo_sliding_layers_equal_dynamic_cache():
    """MiMo-V2-Flash's sliding layers have twice the KV heads (MiMoV2FlashAttention hard-codes
    it): read from each layer's own k_proj, not from the config."""
    _, _, spec = tiny("mimo_v2_flash")
    cache = filled_cache("mimo_v2_flash", T_SHORT, 2)
    assert F.kv_layer_bytes(spec, T_SHORT, 2, kv_dtype="float32") == [kv_nbytes(layer) for layer in cache.layers]


# --------------------------------------------------------------------------- by hand


@pytest.fixture(scope="module")
def llama8b():
    return models.model_spec("llama-3.1-8b")


LLAMA8B_ELEMENTS = 8 * 128 * 2  # per layer and token: 8 kv heads x 128 x (K, V)


@pytest.mark.parametrize("kv_dtype,per_layer", [
    ("auto", LLAMA8B_ELEMENTS * 2),
    ("bfloat16", LLAMA8B_ELEMENTS * 2),
    ("bf16", LLAMA8B_ELEMENTS * 2),
    ("float16", LLAMA8B_ELEMENTS * 2),
    ("float32", LLAMA8B_ELEMENTS * 4),
    ("int8", LLAMA8B_ELEMENTS),
    ("int8_per_token_head", LLAMA8B_ELEMENTS + 2 * 8 * 4),
    ("int4", LLAMA8B_ELEMENTS // 2 + LLAMA8B_ELEMENTS // 64 * 4),
    ("fp8", LLAMA8B_ELEMENTS),
    ("fp8_e5m2", LLAMA8B_ELEMENTS),
])
def test_llama8b_bytes_per_token(llama8b, kv_dtype, per_layer):
    assert llama8b.num_layers == 32
    assert F.kv_bytes_per_token(llama8b, kv_dtype) == 32 * per_layer


def test_llama8b_numbers(llama8b):
    assert F.kv_bytes_per_token(llama8b) == 131072
    assert F.kv_bytes_per_token(llama8b, "int8") == 65536
    assert F.kv_bytes_per_token(llama8b, "int8_per_token_head") == 67584
    assert F.kv_bytes_per_token(llama8b, "int4") == 36864
    assert F.kv_bytes_per_token(llama8b, "fp8") == 65536
    assert F.kv_cache_bytes(llama8b, 8192, 4) == 8192 * 4 * 131072


@pytest.mark.parametrize("budget", [0, 16 * 131072 - 1, 16 * 131072, 10**9, 80 * 2**30])
def test_kv_blocks_by_hand(llama8b, budget):
    assert F.kv_blocks(llama8b, budget, block_size=16) == budget // (16 * 131072)
    assert F.kv_blocks(llama8b, budget, block_size=16, kv_dtype="int8") == budget // (16 * 65536)
    assert F.kv_blocks(llama8b, 10**9) == 476


def test_max_concurrent_rounds_up_to_whole_blocks(llama8b):
    per_seq = math.ceil(1000 / 16) * 16 * 131072  # 63 blocks = 1008 tokens
    assert per_seq == 1008 * 131072
    budget = 66 * 1000 * 131072  # 66 sequences if tokens were not rounded to blocks
    assert F.max_concurrent_sequences(llama8b, budget, 1000, block_size=16) == budget // per_seq == 65
    assert F.max_concurrent_sequences(llama8b, per_seq - 1, 1000) == 0
    assert F.max_concurrent_sequences(llama8b, per_seq, 1000) == 1
    assert F.max_concurrent_sequences(llama8b, budget, 1024) == budget // (1024 * 131072)


SLIDING, FULL = "sliding_attention", "full_attention"
TINY_PAGE = 16 * 2 * (16 + 16) * 4   # a block of 16 tokens in one layer: 2 kv heads x (K 16 + V 16), fp32


def test_max_concurrent_sliding_layers_hold_the_window_and_the_tokens_in_flight():
    cfg = tiny_config("gemma2", sliding_window=40)  # sliding, full; 2 kv heads x (16 + 16)
    spec = models.describe(cfg).spec
    assert [layer.kind for layer in spec.layers] == ["sliding", "full"]
    # one group per kind, a block is one layer's page; per sequence of 100 tokens, as vLLM
    # reserves them: full 7 blocks, sliding the window less one plus 8 tokens in flight
    # (47 tokens, 3 blocks) and one block more for a window that straddles block edges
    full, sliding = math.ceil(100 / 16), math.ceil((40 - 1 + 8) / 16) + 1
    assert (full, sliding) == (7, 4)
    pool = F.kv_pool(spec, 10 * 11 * TINY_PAGE + 5, 100, block_size=16, kv_dtype="float32", in_flight_tokens=8)
    assert (pool.block_bytes, pool.num_blocks, pool.blocks_per_sequence) == (TINY_PAGE, 110, 11)
    assert pool.max_sequences == 10 and pool.max_concurrency == 10.0 and pool.tokens == 1000
    for budget in (11 * TINY_PAGE - 1, 11 * TINY_PAGE, 1000 * 11 * TINY_PAGE - 1):
        assert F.max_concurrent_sequences(spec, budget, 100, block_size=16, kv_dtype="float32",
                                          in_flight_tokens=8) == budget // TINY_PAGE // 11
    # the default 2048 tokens in flight reach past the context: the sliding layer holds all
    # 100 tokens, and still the extra block
    assert F.kv_pool(spec, 10**6, 100, block_size=16, kv_dtype="float32").blocks_per_sequence == 7 + 8
    assert F.kv_bytes_per_token(spec, "float32") == 2 * TINY_PAGE // 16


@pytest.mark.parametrize("types,block_layers,groups", [
    # 3 sliding, 2 full: groups of the fewest (2); the sliding layers fill 2 groups, one short
    ([SLIDING] * 3 + [FULL] * 2, 2, ("sliding", "sliding", "full")),
    # 3 sliding, 4 full: 4 is under 1.5 x 3, so groups of the most (4), the sliding one short
    ([SLIDING] * 3 + [FULL] * 4, 4, ("sliding", "full")),
    # one kind: one group of every layer, however many
    ([FULL] * 5, 5, ("full",)),
])
def test_hybrid_layers_grouped_and_padded_as_vllm(types, block_layers, groups):
    cfg = tiny_config("gemma2", sliding_window=40, num_hidden_layers=len(types), layer_types=types)
    spec = models.describe(cfg).spec
    pool = F.kv_pool(spec, 10**6, 100, block_size=16, kv_dtype="float32", in_flight_tokens=8)
    # a block holds 16 tokens of every layer of a group, padding slots included
    assert pool.block_bytes == block_layers * TINY_PAGE
    assert pool.num_blocks == 10**6 // (block_layers * TINY_PAGE)
    assert F.kv_blocks(spec, 10**6, 16, "float32") == pool.num_blocks
    assert pool.blocks_per_sequence == sum(7 if kind == "full" else 4 for kind in groups)


def test_linear_attention_states_take_a_padded_page_each_two_with_prefix_caching():
    _, _, spec = tiny("qwen3_next")   # 3 linear-attention layers, then a full one
    state = spec.layers[0].state_bytes(4)
    assert state == (256 + 256) * 4 < TINY_PAGE   # conv and recurrent state, fp32: padded to a KV page
    # four groups of one page each (3 states, 1 full), so a block is one KV page
    pool = F.kv_pool(spec, 100 * TINY_PAGE, 100, block_size=16, kv_dtype="float32", state_element_bytes=4)
    assert (pool.block_bytes, pool.num_blocks) == (TINY_PAGE, 100)
    assert pool.blocks_per_sequence == 7 + 3 * 2 and pool.max_sequences == 100 // 13
    assert F.max_concurrent_sequences(spec, 100 * TINY_PAGE, 100, 16, "float32", state_element_bytes=4,
                                      prefix_caching=False) == 100 // (7 + 3)
    assert F.kv_blocks(spec, 100 * TINY_PAGE, 16, "float32", state_element_bytes=4) == 100


def test_kv_pool_of_a_model_of_one_kind_is_budget_over_bytes_per_token(llama8b):
    budget = 5 * 2**30 + 12345
    pool = F.kv_pool(llama8b, budget, 1000, block_size=16)
    assert pool.block_bytes == 16 * 131072 and pool.num_blocks == budget // (16 * 131072) == 2560
    assert pool.blocks_per_sequence == 63                       # 1000 tokens in 63 blocks
    assert pool.max_concurrency == 2560 / 63 and pool.tokens == int(2560 / 63 * 1000) == 40634


def test_errors(llama8b):
    with pytest.raises(ValueError, match="kv_dtype"):
        F.kv_format("int3")
    with pytest.raises(ValueError, match="kv_dtype"):
        F.kv_bytes_per_token(llama8b, "int3")
    with pytest.raises(ValueError, match="context"):
        F.kv_layer_bytes(llama8b, -1)
    with pytest.raises(ValueError, match="context"):
        F.kv_cache_bytes(llama8b, -1)
    with pytest.raises(ValueError, match="mla_cache"):
        F.kv_layer_bytes(llama8b, 8, mla_cache="x")
    with pytest.raises(ValueError, match="mla_cache"):
        F.kv_bytes_per_token(llama8b, mla_cache="x")
    with pytest.raises(ValueError, match="mla_cache"):
        F.max_concurrent_sequences(llama8b, 2**30, 8, mla_cache="x")
    assert F.kv_layer_bytes(llama8b, 0) == [0] * 32


# --------------------------------------------------------------------------- activations


@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("flags", [{}, {"all_logits": True}, {"attention_scores": True},
                                   {"attention_scores": True, "context": 300}])
def test_activations_monotone_in_tokens(llama8b, batch, flags):
    values = [F.activation_bytes(llama8b, t, batch, **flags) for t in range(batch, 400, 7)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] > values[0]


# llama-3.1-8b by hand, bf16: H 4096; attention outputs A = q 4096 + k 1024 + v 1024 + o 4096
# = 10240 and rotary copies 2 Q = 8192 -> 2 * 18432 = 36864 B per token; MLP: act(gate), up
# and their product, 3 * 14336 elements -> 2 * 43008 = 86016 B per token; the norm's fp32
# upcast 8 * 4096 = 32768 B. Per token in a layer: 4 * 4096 * 2 + 86016 = 118784 B.
LLAMA8B_LAYER_PER_TOKEN = 118784


@pytest.mark.parametrize("tokens,batch", [(1, 1), (64, 1), (64, 2), (2048, 4)])
def test_activation_peak_of_llama_8b_by_hand(llama8b, tokens, batch):
    layer = LLAMA8B_LAYER_PER_TOKEN * tokens
    last = tokens * 4096 * 2 + batch * 128256 * 4          # final hidden + fp32 logits of the last tokens
    every = tokens * 4096 * 2 + tokens * 128256 * 2        # + bf16 logits of every position
    assert F.activation_bytes(llama8b, tokens, batch) == max(layer, last)
    assert F.activation_bytes(llama8b, tokens, batch, all_logits=True) == max(layer, every)


def test_attention_scores_by_hand(llama8b):
    # 10 bytes per (batch, head, query, key) and a 1-byte mask per (batch, query, key)
    base = F.activation_bytes(llama8b, 2048, 1)
    assert base == LLAMA8B_LAYER_PER_TOKEN * 2048
    assert F.activation_bytes(llama8b, 2048, 1, attention_scores=True) - base == (32 * 10 + 1) * 2048 * 2048
    assert F.activation_bytes(llama8b, 2048, 2, context=4096, attention_scores=True) - \
        F.activation_bytes(llama8b, 2048, 2, context=4096) == 2 * (32 * 10 + 1) * 1024 * 4096
