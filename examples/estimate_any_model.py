"""Price models that memwarden does not ship: a config.json and a GGUF file.

Writes, into a temporary folder, the config.json of allenai/OLMoE-1B-7B (an MoE that no
table in memwarden lists: transformers' own OlmoeForCausalLM, built on the meta device,
is what gets priced) and the header of a Llama-3-8B-shaped GGUF file in Q4_K (the tensor
infos only, a few kilobytes: memwarden reads the header and nothing else), then
estimates both and plans the MoE over two GPUs. No download, no GPU.

    python examples/estimate_any_model.py
    memwarden estimate path/to/model.gguf --gpus 8GiB      # the same from the command line
"""
import json
import os
import tempfile

OLMOE_1B_7B = {  # allenai/OLMoE-1B-7B-0924 config.json (the keys that size it)
    "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
    "vocab_size": 50304, "max_position_embeddings": 4096, "tie_word_embeddings": False,
}


def write_llama3_8b_q4k_header(path: str) -> None:
    """A GGUF header as llama.cpp writes it for Llama-3-8B in Q4_K (embeddings Q4_K too,
    norms F32, output Q6_K), with tensor infos and no tensor data."""
    import gguf
    import numpy as np

    q = gguf.GGMLQuantizationType
    hidden, inter, layers, vocab, kv = 4096, 14336, 32, 128256, 1024

    def info(writer, name, rows, cols, qtype):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = rows * cols // block * size
        writer.add_tensor_info(name, (rows, cols // block * size) if block > 1 else (rows, cols),
                               np.dtype(np.uint8) if block > 1 else np.dtype(np.float32), nbytes, raw_dtype=qtype)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("Llama-3-8B (header only)")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_block_count(layers)
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(32)
    w.add_head_count_kv(8)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    info(w, "token_embd.weight", vocab, hidden, q.Q4_K)
    for i in range(layers):
        w.add_tensor_info(f"blk.{i}.attn_norm.weight", (hidden,), np.dtype(np.float32), hidden * 4)
        for name, rows, cols in (("attn_q", hidden, hidden), ("attn_k", kv, hidden), ("attn_v", kv, hidden),
                                 ("attn_output", hidden, hidden), ("ffn_gate", inter, hidden),
                                 ("ffn_up", inter, hidden), ("ffn_down", hidden, inter)):
            info(w, f"blk.{i}.{name}.weight", rows, cols, q.Q4_K)
        w.add_tensor_info(f"blk.{i}.ffn_norm.weight", (hidden,), np.dtype(np.float32), hidden * 4)
    w.add_tensor_info("output_norm.weight", (hidden,), np.dtype(np.float32), hidden * 4)
    info(w, "output.weight", vocab, hidden, q.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def main() -> None:
    from memwarden import estimate, models, plan

    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "OLMoE-1B-7B", "config.json")
        os.makedirs(os.path.dirname(config))
        with open(config, "w") as f:
            json.dump(OLMOE_1B_7B, f)
        d = models.describe(os.path.dirname(config))
        print(f"OLMoE-1B-7B from its config.json: {d.params / 1e9:.2f}B parameters "
              f"({d.spec.num_experts} experts, top {d.spec.experts_per_token}), priced by {d.source}")
        print(estimate.estimate(d, context=4096, batch=8).report())
        print(plan.plan(d, max_memory={0: "8GiB", 1: "8GiB"}, reserve="auto", context=4096).report())

        gguf_path = os.path.join(tmp, "llama-3-8b.Q4_K_M.gguf")
        write_llama3_8b_q4k_header(gguf_path)
        g = models.describe(gguf_path)
        print(f"\n{os.path.basename(gguf_path)}: a {os.path.getsize(gguf_path) / 1024:.0f} KiB header describing "
              f"{g.params / 1e9:.2f}B parameters in {g.dtype}, {g.bytes / 2**30:.2f} GiB of weights")
        print(estimate.estimate(g, context=8192, max_memory={0: "8GiB"}).report())
        print(estimate.estimate(g, context=8192, max_memory={0: "4GiB", "cpu": "32GiB"}, gpu_layers=16).report())


if __name__ == "__main__":
    main()
