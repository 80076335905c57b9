"""memwarden.models: sizes against hand-computed values and transformers' own models."""
import json
import re

import pytest
import torch

from memwarden import models as M

transformers = pytest.importorskip("transformers")

PUBLISHED = {  # total parameters published by the model authors
    "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9, "mixtral-8x7b": 46.7e9,
    "qwen3-30b-a3b": 30.5e9, "deepseek-v3": 671e9, "gpt-oss-20b": 20.91e9, "gpt-oss-120b": 116.83e9,
}

TINY = {  # a small Llama: every size below is worked out by hand
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": False,
}

# allenai/OLMoE-1B-7B-0924 config.json (an architecture the old table did not list)
OLMOE = {
    "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
    "vocab_size": 50304, "max_position_embeddings": 4096, "tie_word_embeddings": False,
    "clip_qkv": None, "norm_topk_prob": False,
}

# google/gemma-2-9b config.json: no tie_word_embeddings (Gemma2Config's default ties), no layer_types
GEMMA2_9B = {
    "model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
    "sliding_window": 4096, "max_position_embeddings": 8192, "query_pre_attn_scalar": 256,
    "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
}


def _meta_model(cfg):
    config = cfg if not isinstance(cfg, dict) else transformers.AutoConfig.for_model(
        cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type" and not k.startswith("_")})
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _meta_params(cfg) -> int:
    return sum(p.numel() for p in _meta_model(cfg).parameters())


def test_embedded_list_is_complete():
    assert set(PUBLISHED) <= set(M.EMBEDDED)
    listed = M.list_models()
    assert [m["name"] for m in listed] == sorted(M.EMBEDDED)
    mixtral = next(m for m in listed if m["name"] == "mixtral-8x7b")
    assert (mixtral["layers"], mixtral["experts"], mixtral["experts_per_token"]) == (32, 8, 2)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_embedded_models_match_published_totals_and_transformers(name):
    n = M.param_count(name)
    assert abs(n / PUBLISHED[name] - 1) < 0.01, (name, n)
    assert n == _meta_params(M.load_config(name))


def test_tiny_llama_sizes_by_hand():
    d = M.describe(TINY, "bfloat16")
    by = {p.name: p for p in d.parts}
    assert [p.name for p in d.parts] == ["embed", "layers.0.attn", "layers.0.mlp", "layers.1.attn",
                                         "layers.1.mlp", "head"]
    # attention part: two norms 2*64 + q 64*64 + k 32*64 + v 32*64 + o 64*64 (head_dim 16, 2 kv heads)
    assert by["layers.0.attn"].params == 128 + 4096 + 2048 + 2048 + 4096
    assert by["layers.0.mlp"].params == 3 * 64 * 128
    assert by["embed"].params == 6400 and by["head"].params == 6400 + 64
    assert by["layers.1.mlp"].modules == ("model.layers.1.mlp",)
    assert by["head"].modules == ("model.norm", "lm_head")
    assert d.params == 6400 * 2 + 64 + 2 * (12416 + 24576)
    # buffers (the rotary tables) keep their own dtype
    buffers = sum(b.numel() * b.element_size() for b in _meta_model(TINY).buffers())
    assert d.bytes == 2 * d.params + buffers
    assert M.describe(TINY, "fp32").bytes == 4 * d.params + buffers
    proj = 2 * (12288 + 24576)            # the projection weights of both layers
    out_rows = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    rest = 2 * (d.params - proj) + buffers  # embeddings, norms, head in bf16
    # int8: 1 byte + an fp32 scale per output row
    assert M.describe(TINY, "int8").bytes == proj + 4 * out_rows + rest
    # int4: half a byte + fp16 scale and zero per group of 128 inputs (one group per row here)
    assert M.describe(TINY, "int4").bytes == proj // 2 + 4 * out_rows + rest
    # fp8: 1 byte + an fp32 scale per 128x128 block (one block per projection here: 14 of them)
    assert M.describe(TINY, "fp8").bytes == proj + 4 * 14 + rest
    # mxfp4: half a byte + one E8M0 byte per 32 inputs (64 inputs: 2 per row; down_proj: 4 per row)
    mx_scales = 2 * ((64 + 32 + 32 + 64 + 128 + 128) * 2 + 64 * 4)
    assert M.describe(TINY, "mxfp4").bytes == proj // 2 + mx_scales + rest


def test_unknown_moe_architecture_is_priced_from_its_modules():
    d = M.describe(OLMOE)
    assert d.params == _meta_params(OLMOE)
    assert abs(d.params / 6.92e9 - 1) < 0.01          # published: 6.92B total
    experts = [p for p in d.parts if p.kind == "expert"]
    assert len(experts) == 16 * 64 and d.spec.num_experts == 64 and d.spec.experts_per_token == 8
    assert {p.params for p in experts} == {3 * 2048 * 1024}
    assert {p.modules for p in experts if p.layer == 3} == {("model.layers.3.mlp.experts",)}
    assert [p.modules for p in d.parts if p.name == "layers.3.moe"] == [("model.layers.3.mlp.gate",)]


def test_gemma2_config_json_ties_like_transformers_and_finds_sliding_layers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GEMMA2_9B))
    from_json = M.describe(str(tmp_path))
    from_object = M.describe(transformers.Gemma2Config(**{k: v for k, v in GEMMA2_9B.items() if k != "model_type"}))
    assert from_json.params == from_object.params == _meta_params(GEMMA2_9B)
    assert abs(from_json.params / 9.24e9 - 1) < 0.01  # published: 9.24B
    assert from_json.spec.tie_word_embeddings
    assert "lm_head" in from_json.parts[0].modules    # the tied head runs where its weight lives
    kinds = [layer.kind for layer in from_json.spec.layers]
    assert kinds == ["sliding", "full"] * 21


def test_qwen3_moe_config_written_by_transformers_5(tmp_path):
    config = transformers.AutoConfig.for_model("qwen3_moe", hidden_size=64, intermediate_size=128,
                                               moe_intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                               num_experts_per_tok=2, vocab_size=128)
    config.save_pretrained(tmp_path)
    d = M.describe(str(tmp_path))
    assert d.params == _meta_params(config)
    assert d.spec.num_experts == 4 and d.spec.experts_per_token == 2


@pytest.mark.parametrize("key,value", [
    ("num_key_value_heads", -1), ("hidden_size", "4096"), ("head_dim", -1), ("head_dim", 4.5),
    ("num_attention_heads", True), ("sliding_window", -5), ("intermediate_size", 0), ("vocab_size", 32000.0),
])
def test_bad_numbers_are_rejected_naming_the_key(key, value):
    with pytest.raises(ValueError, match=re.escape(f"'{key}' must be a") + ".*" + re.escape(repr(value))):
        M.describe(dict(TINY, **{key: value}))


def test_layer_lists_are_checked():
    with pytest.raises(ValueError, match="'layer_types' has 3 entries, expected one per layer"):
        M.describe(dict(TINY, layer_types=["full_attention"] * 3))
    moe = dict(TINY, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    with pytest.raises(ValueError, match="'mlp_only_layers' holds 5"):
        M.describe(dict(moe, mlp_only_layers=[5]))


def test_unknown_and_missing_are_errors_or_warnings(tmp_path):
    with pytest.raises(ValueError, match="model_type 'nonexistent_arch' is not an architecture transformers"):
        M.describe(dict(TINY, model_type="nonexistent_arch"))
    with pytest.raises(ValueError, match="model_type 'vit' has no causal-LM class"):
        M.describe({"model_type": "vit"})
    with pytest.raises(ValueError, match="missing required key 'model_type'"):
        M.describe({"hidden_size": 64})
    with pytest.raises(ValueError, match="unknown model 'nope'.*mixtral-8x7b"):
        M.describe("nope")
    bad = dict(TINY)
    del bad["hidden_size"]
    d = M.describe(bad)  # transformers' default fills it, as from_pretrained would, and says so
    assert any("'hidden_size'" in w and "4096" in w for w in d.warnings)
    with pytest.raises(ValueError, match="dtype"):
        M.describe(TINY, "int3")
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        M.describe(str(p))


def test_hub_id_reads_only_config_json_from_the_offline_cache(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--tiny-llama"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(TINY))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert M.param_count("acme/tiny-llama") == M.param_count(TINY)
    with pytest.raises(ValueError, match="no config.json for 'acme/other'.*local cache"):
        M.describe("acme/other")


def test_config_sources_agree(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    assert M.param_count(str(path)) == M.param_count(str(tmp_path)) == M.param_count(TINY)
    conf = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    assert M.param_count(conf) == M.param_count(TINY)


def test_layer_facts_for_the_cache():
    gpt = M.model_spec("gpt-oss-20b")
    assert [layer.kind for layer in gpt.layers[:4]] == ["sliding", "full", "sliding", "full"]
    assert gpt.layers[0].window == 128 and gpt.layers[0].kv_heads == 8 and gpt.layers[0].k_dim == 64
    ds = M.model_spec("deepseek-v3")
    assert ds.mla and ds.layers[0].latent == 512 + 64
    assert (ds.layers[0].kv_heads, ds.layers[0].k_dim, ds.layers[0].v_dim) == (128, 192, 128)
    assert ds.num_experts == 256 and ds.moe_layers == tuple(range(3, 61))


def test_a_gguf_file_is_described_estimated_and_planned_from_its_header(tmp_path):
    pytest.importorskip("gguf")
    from gguf_files import write_llama, write_moe
    from memwarden import estimate, plan

    dense = write_llama(str(tmp_path / "tiny.gguf"))
    d = M.describe(dense.path)
    assert d.source == "GGUF header" and d.dtype == "Q8_0" and d.spec.name == "Tiny Llama Test"
    # per tensor by hand: Q8_0 34 B per 32 weights, Q4_0 18 B per 32, F16 2 B, F32 4 B
    sizes = {"F32": lambda n: 4 * n, "F16": lambda n: 2 * n, "Q8_0": lambda n: n // 32 * 34,
             "Q4_0": lambda n: n // 32 * 18}
    assert d.bytes == sum(sizes[t](int(torch.Size(shape).numel())) for _, shape, t in dense.tensors)
    assert [p.name for p in d.parts][:3] == ["embed", "layers.0.attn", "layers.0.mlp"]
    assert (d.spec.num_layers, d.spec.num_kv_heads, d.spec.head_dim) == (3, 2, 16)
    # KV by hand: 3 layers x 2 kv heads x 16 x (K, V) x bf16 per token
    assert estimate.estimate(dense.path, context=1000).kv_cache == 1000 * 3 * 2 * 16 * 2 * 2
    with pytest.raises(ValueError, match="GGUF file fixes its weight format"):
        M.describe(dense.path, "int4")
    moe = M.describe(write_moe(str(tmp_path / "moe.gguf")).path)
    assert moe.spec.num_experts == 4 and moe.spec.experts_per_token == 2
    p = plan.plan(moe, {0: "1GiB", 1: "1GiB"})
    assert p.feasible and set(p.placement().values()) == {0, 1}


def test_default_format_is_the_checkpoints_own():
    # gpt-oss ships MXFP4 experts; attention, router, embeddings and head stay bf16
    d = M.describe("gpt-oss-20b")
    assert d.dtype == "mxfp4" and "mxfp4 quantization_config" in d.notes[0]
    by_hand = 0
    for part in M.describe("gpt-oss-20b", "bf16").parts:
        for t in part.tensors:
            if part.kind == "expert" and t.quantizable:   # 4 bits + one E8M0 byte per 32 inputs
                out, inp = t.shape
                by_hand += out * inp // 2 + out * -(-inp // 32)
            else:
                by_hand += t.nbytes("bfloat16", 2)
    assert d.bytes == by_hand
    assert abs(d.bytes / 2**30 - 12.82) < 0.01             # the published checkpoint: 13.8 GB
    assert M.describe(dict(TINY, torch_dtype="float32")).dtype == "float32"
    assert M.describe(TINY).dtype == "bfloat16"
    gptq = M.describe(dict(TINY, quantization_config={"quant_method": "gptq", "bits": 4}))
    assert gptq.dtype == "int4" and gptq.bytes == M.describe(TINY, "int4").bytes
    odd = M.describe(dict(TINY, quantization_config={"quant_method": "weird"}))
    assert odd.dtype == "bfloat16" and "'weird', which memwarden does not price" in odd.warnings[0]


def test_description_displays_a_summary_by_kind_not_every_tensor():
    from memwarden import models

    d = models.describe("llama-3.1-8b")
    assert repr(d) == (f"<ModelDescription llama-3.1-8b (llama): 8.03B parameters, 14.96 GiB in bfloat16, "
                       f"{len(d.parts)} parts>")
    title, header, rows, _ = d.table()
    assert [r[0] for r in rows] == sorted(d.by_kind(), key=lambda k: -d.by_kind()[k]["bytes"])
    assert sum(r[1] for r in rows) == len(d.parts)
    html = d._repr_html_()
    assert html.count("<tr>") == 1 + len(d.by_kind()) and "8.03B parameters" in html
