"""generate with memwarden's paged INT8 KV cache inside a memory budget.

    python examples/hf_generate_paged_int8.py                      # a small random Llama, no download
    python examples/hf_generate_paged_int8.py --model PATH_OR_ID   # a real model (local folder or Hub id)

The same prompt is generated twice, with transformers' DynamicCache and with
``memwarden.kv.PagedCache(model.config, kv_dtype="int8", max_memory=..., offload="host", page_size=8)``
under a budget of a quarter of the K/V the generation needs; the cache's stats show what
was compressed and offloaded to stay inside it. The paged run attends with
``attn_implementation="memwarden_paged"`` (the pages, INT8 ones included, are read in
place; ``--attn sdpa`` reads them back densely each step instead).
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from memwarden._units import format_bytes
from memwarden.kv import PagedCache
from memwarden.kv.attention import ATTENTION_NAME


def small_random_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(config).eval()


def kv_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """K and V of every layer for ``tokens`` tokens in ``dtype``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * dtype.itemsize


def run(model, prompt: torch.Tensor, new_tokens: int, budget_fraction: float = 0.25, attn: str = ATTENTION_NAME) -> dict:
    """DynamicCache's greedy continuation, then the same tokens fed step by step through a
    PagedCache under the budget: the next-token choices compared at every step (a random
    model's near-flat logits would make a free-running comparison diverge at the first
    near-tie, which says nothing about the cache)."""
    config = model.config
    dtype = next(model.parameters()).dtype
    budget = int(kv_bytes(config, prompt.shape[1] + new_tokens, dtype) * budget_fraction)
    with torch.no_grad():
        reference = model.generate(prompt, past_key_values=DynamicCache(config=config), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
        cache = PagedCache(config, kv_dtype="int8", max_memory=budget, offload="host", page_size=8)
        tokens = reference.sequences[:, prompt.shape[1]:]
        previous = config._attn_implementation
        model.set_attn_implementation(attn)
        try:
            logits = [model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]]
            for step in range(new_tokens - 1):
                logits.append(model(tokens[:, step:step + 1], past_key_values=cache, use_cache=True).logits[:, -1])
        finally:
            model.set_attn_implementation(previous)
    logits = torch.stack(logits, 1)
    ref_logits = torch.stack(reference.logits, 1)
    agreement = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    return {"budget": budget, "stats": cache.stats(), "agreement": agreement,
            "max_logit_error": (logits - ref_logits).abs().max().item(),
            "full_kv": kv_bytes(config, prompt.shape[1] + new_tokens, dtype)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local model folder or Hub id (default: a small random Llama)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--attn", default=ATTENTION_NAME, choices=[ATTENTION_NAME, "sdpa", "eager"],
                        help="attention of the paged run (default: attend over the pages in place)")
    args = parser.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval() if args.model else small_random_llama()
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    result = run(model, prompt, args.new_tokens, attn=args.attn)
    print(f"K/V of {args.prompt_tokens + args.new_tokens} tokens in full precision: {format_bytes(result['full_kv'])}; "
          f"budget {format_bytes(result['budget'])}")
    print(f"PagedCache(kv_dtype='int8', offload='host'), attn_implementation={args.attn!r}: {result['stats']}")
    print(f"next-token choices equal to DynamicCache's: {result['agreement']:.0%} of {args.new_tokens} steps; "
          f"max |logit difference| {result['max_logit_error']:.4f}")
    return result


if __name__ == "__main__":
    main()
