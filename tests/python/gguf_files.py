"""Small GGUF files for the tests, written with ``gguf.GGUFWriter``.

The metadata keys follow what llama.cpp's ``convert_hf_to_gguf.py`` writes for the
architecture; the tensors use llama.cpp's names and GGUF's dimension order (``ne``,
innermost first; numpy shapes here are PyTorch order, the writer reverses them).
Quantized tensors are real blocks made by ``gguf.quants.quantize``.

Each ``write_*`` returns a ``GGUFSpec``: the path, the metadata written that the tests
check, and ``tensors`` = [(name, torch shape, ggml type name)] in file order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

__all__ = ["GGUFSpec", "write_llama", "write_moe", "write_tied", "write_split_llama", "write_gguf"]


@dataclass
class GGUFSpec:
    path: str
    arch: str
    facts: dict = field(default_factory=dict)     # what the config must say
    tensors: list = field(default_factory=list)   # [(name, torch shape, ggml type name)]
    paths: list = field(default_factory=list)     # every file written (shards)


def _tokenizer(w: gguf.GGUFWriter, vocab: int) -> None:
    # byte-level BPE as convert_hf_to_gguf writes it for llama-3/qwen tokenizers
    tokens = [f"<tok{i}>" for i in range(vocab)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab)
    w.add_token_merges([f"a{i} b{i}" for i in range(vocab * 2)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}")


def _data(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.02


def _add(w: gguf.GGUFWriter, spec: GGUFSpec, name: str, shape: tuple, qtype: Q, seed: int = 0) -> None:
    x = _data(shape, seed + len(spec.tensors))
    if qtype == Q.F32:
        w.add_tensor(name, x)
    elif qtype == Q.F16:
        w.add_tensor(name, x.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    spec.tensors.append((name, tuple(shape), qtype.name))


def _attention(w: gguf.GGUFWriter, spec: GGUFSpec, i: int, hidden: int, heads: int, kv: int, hd: int,
               qkv: Q, out: Q) -> None:
    """Layer i's attention norm and projections, as llama.cpp names them."""
    _add(w, spec, f"blk.{i}.attn_norm.weight", (hidden,), Q.F32)
    _add(w, spec, f"blk.{i}.attn_q.weight", (heads * hd, hidden), qkv)
    _add(w, spec, f"blk.{i}.attn_k.weight", (kv * hd, hidden), qkv)
    _add(w, spec, f"blk.{i}.attn_v.weight", (kv * hd, hidden), qkv)
    _add(w, spec, f"blk.{i}.attn_output.weight", (hidden, heads * hd), out)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_llama(path: str, *, n_layers: int = 3, writer_kwargs: dict | None = None) -> GGUFSpec:
    """A dense llama: hidden 64, 4 heads of 16, 2 KV heads (GQA), MLP 128, vocab 256.

    Embeddings F16, norms F32, Q/K/V and ffn_down Q8_0, attn_output and gate/up Q4_0,
    the last layer's attention F16, the head Q8_0, plus llama-3's rope_freqs (F32).
    """
    arch, hidden, heads, kv, hd, ff, vocab, ctx = "llama", 64, 4, 2, 16, 128, 256, 2048
    w = gguf.GGUFWriter(path, arch, **(writer_kwargs or {}))
    spec = GGUFSpec(path, arch, paths=[path])
    w.add_type("model")
    w.add_name("Tiny Llama Test")
    w.add_block_count(n_layers)
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hd)
    _tokenizer(w, vocab)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    _add(w, spec, "token_embd.weight", (vocab, hidden), Q.F16)
    _add(w, spec, "rope_freqs.weight", (hd // 2,), Q.F32)
    for i in range(n_layers):
        attn_q = Q.F16 if i == n_layers - 1 else Q.Q8_0
        attn_o = Q.F16 if i == n_layers - 1 else Q.Q4_0
        _attention(w, spec, i, hidden, heads, kv, hd, attn_q, attn_o)
        _add(w, spec, f"blk.{i}.ffn_norm.weight", (hidden,), Q.F32)
        _add(w, spec, f"blk.{i}.ffn_gate.weight", (ff, hidden), Q.Q4_0)
        _add(w, spec, f"blk.{i}.ffn_up.weight", (ff, hidden), Q.Q4_0)
        _add(w, spec, f"blk.{i}.ffn_down.weight", (hidden, ff), Q.Q8_0)
    _add(w, spec, "output_norm.weight", (hidden,), Q.F32)
    _add(w, spec, "output.weight", (vocab, hidden), Q.Q8_0)
    _finish(w)
    spec.facts = dict(model_type="llama", hidden_size=hidden, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                      intermediate_size=ff, vocab_size=vocab, max_position_embeddings=ctx,
                      rope_theta=500000.0, tie_word_embeddings=False, name="Tiny Llama Test",
                      file_type="Q8_0", n_tokens=vocab, n_merges=2 * vocab)
    return spec


def write_moe(path: str, *, shared_expert: bool = False) -> GGUFSpec:
    """A qwen3moe: 2 layers, hidden 64, 4 heads of 32 (head_dim set, not hidden/heads),
    2 KV heads, 4 experts of 32 (top-2) fused into 3-D ``*_exps`` tensors in Q8_0, the
    router ``ffn_gate_inp`` F32, q/k norms. ``shared_expert=True`` writes a qwen2moe
    instead, with a shared expert (``*_shexp`` and its gate ``ffn_gate_inp_shexp``).
    """
    arch = "qwen2moe" if shared_expert else "qwen3moe"
    hidden, heads, kv, hd, moe_ff, n_exp, top_k, vocab, ctx, layers = 64, 4, 2, 32, 32, 4, 2, 128, 4096, 2
    shared_ff = 64
    w = gguf.GGUFWriter(path, arch)
    spec = GGUFSpec(path, arch, paths=[path])
    w.add_type("model")
    w.add_name("Tiny MoE Test")
    w.add_block_count(layers)
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(moe_ff * 3)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_used_count(top_k)
    w.add_expert_count(n_exp)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_expert_feed_forward_length(moe_ff)
    if shared_expert:
        w.add_expert_shared_feed_forward_length(shared_ff)
    w.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    _tokenizer(w, vocab)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    _add(w, spec, "token_embd.weight", (vocab, hidden), Q.F16)
    for i in range(layers):
        _attention(w, spec, i, hidden, heads, kv, hd, Q.Q8_0, Q.Q8_0)
        if not shared_expert:
            _add(w, spec, f"blk.{i}.attn_q_norm.weight", (hd,), Q.F32)
            _add(w, spec, f"blk.{i}.attn_k_norm.weight", (hd,), Q.F32)
        _add(w, spec, f"blk.{i}.ffn_norm.weight", (hidden,), Q.F32)
        _add(w, spec, f"blk.{i}.ffn_gate_inp.weight", (n_exp, hidden), Q.F32)
        _add(w, spec, f"blk.{i}.ffn_gate_exps.weight", (n_exp, moe_ff, hidden), Q.Q8_0)
        _add(w, spec, f"blk.{i}.ffn_up_exps.weight", (n_exp, moe_ff, hidden), Q.Q8_0)
        _add(w, spec, f"blk.{i}.ffn_down_exps.weight", (n_exp, hidden, moe_ff), Q.Q8_0)
        if shared_expert:
            _add(w, spec, f"blk.{i}.ffn_gate_inp_shexp.weight", (1, hidden), Q.F32)
            _add(w, spec, f"blk.{i}.ffn_gate_shexp.weight", (shared_ff, hidden), Q.Q8_0)
            _add(w, spec, f"blk.{i}.ffn_up_shexp.weight", (shared_ff, hidden), Q.Q8_0)
            _add(w, spec, f"blk.{i}.ffn_down_shexp.weight", (hidden, shared_ff), Q.Q8_0)
    _add(w, spec, "output_norm.weight", (hidden,), Q.F32)
    _add(w, spec, "output.weight", (vocab, hidden), Q.Q8_0)
    _finish(w)
    spec.facts = dict(model_type="qwen2_moe" if shared_expert else "qwen3_moe", hidden_size=hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      head_dim=hd, v_head_dim=hd, vocab_size=vocab, max_position_embeddings=ctx,
                      num_experts=n_exp, num_experts_per_tok=top_k, moe_intermediate_size=moe_ff,
                      tie_word_embeddings=False)
    if shared_expert:
        spec.facts["shared_expert_intermediate_size"] = shared_ff
    return spec


def write_tied(path: str) -> GGUFSpec:
    """A qwen3 with tied embeddings (no ``output.weight``), BF16-free: F16 embeddings,
    Q8_0 projections, per-layer KV head counts [2, 1] (an array), a sliding window, and
    no ``vocab_size`` key (vocab comes from token_embd's rows)."""
    arch, hidden, heads, hd, ff, vocab, layers = "qwen3", 64, 4, 16, 96, 160, 2
    kv = [2, 1]
    w = gguf.GGUFWriter(path, arch)
    spec = GGUFSpec(path, arch, paths=[path])
    w.add_type("model")
    # no general.name: the file stem stands in
    w.add_block_count(layers)
    w.add_context_length(32768)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_sliding_window(512)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    _tokenizer(w, vocab)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add(w, spec, "token_embd.weight", (vocab, hidden), Q.F16)
    for i in range(layers):
        _attention(w, spec, i, hidden, heads, kv[i], hd, Q.Q8_0, Q.Q8_0)
        _add(w, spec, f"blk.{i}.attn_q_norm.weight", (hd,), Q.F32)
        _add(w, spec, f"blk.{i}.attn_k_norm.weight", (hd,), Q.F32)
        _add(w, spec, f"blk.{i}.ffn_norm.weight", (hidden,), Q.F32)
        _add(w, spec, f"blk.{i}.ffn_gate.weight", (ff, hidden), Q.Q8_0)
        _add(w, spec, f"blk.{i}.ffn_up.weight", (ff, hidden), Q.Q8_0)
        _add(w, spec, f"blk.{i}.ffn_down.weight", (hidden, ff), Q.Q4_0)
    _add(w, spec, "output_norm.weight", (hidden,), Q.F32)
    _finish(w)
    spec.facts = dict(model_type="qwen3", hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                      intermediate_size=ff, vocab_size=vocab, max_position_embeddings=32768,
                      sliding_window=512, tie_word_embeddings=True)
    return spec


def write_split_llama(folder: str, stem: str = "tiny", n_layers: int = 3) -> GGUFSpec:
    """The dense llama split in shards of 12 tensors (``{stem}-0000N-of-0000M.gguf``)."""
    import os
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, f"{stem}.gguf")
    spec = write_llama(base, n_layers=n_layers, writer_kwargs={"split_max_tensors": 12})
    n = -(-len(spec.tensors) // 12)
    spec.paths = [os.path.join(folder, f"{stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    spec.path = spec.paths[0]
    return spec


def write_gguf(path: str, arch: str, kv: dict, tensors: list) -> None:
    """A free-form file: ``kv`` = {key: value} (ints as uint32), ``tensors`` = [(name, shape, Q)]."""
    w = gguf.GGUFWriter(path, arch)
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    spec = GGUFSpec(path, arch)
    for name, shape, qtype in tensors:
        _add(w, spec, name, shape, qtype)
    _finish(w)
