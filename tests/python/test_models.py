"""memwarden.models: sizes against hand-computed values and real transformers models."""
import json
import math

import pytest
import torch

from memwarden import models as M

PUBLISHED = {  # total parameters published by the model authors
    "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9, "mixtral-8x7b": 46.7e9,
    "qwen3-30b-a3b": 30.5e9, "deepseek-v3": 671e9, "gpt-oss-20b": 20.91e9, "gpt-oss-120b": 116.83e9,
}

TINY = {  # a small Llama: every size below is worked out by hand
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": False,
}


def test_embedded_list_is_complete():
    assert set(PUBLISHED) <= set(M.EMBEDDED)
    names = [m["name"] for m in M.list_models()]
    assert names == sorted(names)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_published_total(name):
    n = M.param_count(name)
    assert abs(n / PUBLISHED[name] - 1) < 0.01, (name, n)


def _meta_model(cfg: dict):
    transformers = pytest.importorskip("transformers")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    conf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(conf)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_transformers_meta_model(name):
    model = _meta_model(M.load_config(name))
    ref = {n: p.numel() for n, p in model.named_parameters()}
    desc = M.describe(name)
    assert desc.params == sum(ref.values())
    # every transformers module we name in a part exists and holds those parameters
    covered = {}
    for p in desc.parts:
        for t in p.tensors:
            base = t.name.split("[")[0]
            covered[base] = covered.get(base, 0) + t.numel
    assert covered == ref


def test_tiny_llama_sizes_by_hand():
    d = M.describe(TINY, "bfloat16")
    by = {p.name: p for p in d.parts}
    assert [p.name for p in d.parts] == ["embed", "layers.0.attn", "layers.0.mlp", "layers.1.attn",
                                         "layers.1.mlp", "head"]
    # attention: norm 64 + q 64*64 + k 32*64 + v 32*64 + o 64*64 (head_dim 16, 2 kv heads)
    assert by["layers.0.attn"].params == 64 + 4096 + 2048 + 2048 + 4096
    assert by["layers.0.mlp"].params == 64 + 3 * 64 * 128
    assert by["embed"].params == 6400 and by["head"].params == 6400 + 64
    assert d.params == 6400 * 2 + 64 + 2 * (12352 + 24640)
    assert d.bytes == 2 * d.params
    assert M.describe(TINY, "fp32").bytes == 4 * d.params
    # int8: projections 1 byte + fp32 scale per output row; the rest stays bf16
    proj = 2 * (12288 + 24576)
    rows = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert M.describe(TINY, "int8").bytes == proj + 4 * rows + 2 * (d.params - proj)
    # int4: half a byte + fp16 scale and zero per group of 128 inputs
    groups = 2 * (64 * 1 + 32 * 1 + 32 * 1 + 64 * 1 + 128 * 1 + 128 * 1 + 64 * 1)
    assert M.describe(TINY, "int4").bytes == proj // 2 + 4 * groups + 2 * (d.params - proj)


def test_tied_embeddings_have_no_head_weight():
    d = M.describe(dict(TINY, tie_word_embeddings=True))
    assert d.parts[-1].params == 64


def test_moe_parts_and_expert_sizes():
    d = M.describe("mixtral-8x7b")
    experts = [p for p in d.parts if p.kind == "expert"]
    assert len(experts) == 32 * 8
    assert {p.bytes for p in experts} == {3 * 4096 * 14336 * 2}
    assert {p.modules for p in experts if p.layer == 3} == {("model.layers.3.mlp.experts",)}
    ds = M.describe("deepseek-v3")
    assert sum(p.kind == "mlp" for p in ds.parts) == 3  # first_k_dense_replace
    assert sum(p.kind == "expert" for p in ds.parts) == 58 * 256


def test_config_sources(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    assert M.param_count(str(path)) == M.param_count(TINY)
    assert M.param_count(str(tmp_path)) == M.param_count(TINY)
    transformers = pytest.importorskip("transformers")
    conf = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    assert M.param_count(conf) == M.param_count(TINY)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'nope'.*mixtral-8x7b"):
        M.describe("nope")
    bad = dict(TINY)
    del bad["hidden_size"]
    with pytest.raises(ValueError, match="missing required key 'hidden_size'"):
        M.describe(bad)
    with pytest.raises(ValueError, match="num_local_experts"):
        M.describe({k: v for k, v in M.load_config("mixtral-8x7b").items() if k != "num_local_experts"})
    with pytest.raises(ValueError, match="dtype"):
        M.describe(TINY, "int3")
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        M.describe(str(p))


def test_kv_per_token_rules():
    s = M.model_spec("llama-3.1-8b")
    assert s.kv_bytes_per_token(2) == 32 * 8 * 128 * 2 * 2
    ds = M.model_spec("deepseek-v3")
    assert ds.kv_bytes_per_token(2) == 61 * (512 + 64) * 2
    g = M.model_spec("gpt-oss-20b")  # 12 sliding (window 128) + 12 full layers
    per_layer = 8 * 64 * 2 * 2
    assert g.kv_bytes_per_token(2, 1024) == pytest.approx(12 * per_layer + 12 * per_layer * 128 / 1024)
