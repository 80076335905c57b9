"""memwarden.estimate against reality: small real transformers models with random weights run
on the CPU while every tensor comes from memwarden's host allocator, measured in one run.

    python benchmarks/bench_estimate.py [--quick] [--dtype bfloat16|float32] [--attn sdpa|eager]
                                        [--decode N] [--models NAME,...] [--json PATH]

Models (random weights, built with ``AutoModelForCausalLM.from_config``, ``attn_implementation``
"sdpa" by default): llama with full multi-head attention, qwen2 with grouped-query attention and
tied embeddings, mistral with a sliding window shorter than the longest context, gemma2 with
alternating sliding/full ``layer_types``, qwen3_moe (top-k routed experts) and deepseek_v3 (MLA,
a dense first layer then routed + shared experts).

For each model and context length: a prefill of ``context`` tokens (``batch`` sequences) then
``--decode`` single-token steps, each a plain ``model(ids, past_key_values=cache, use_cache=True)``
under ``torch.inference_mode()`` with ``DynamicCache(config=model.config)`` (sliding layers keep
a window), while ``memwarden.alloc.use("cpu")`` serves every CPU tensor. Each case starts from an
emptied pool (``empty_cache``), so cached blocks of an earlier case are not reused. Measured:

* weights: the bytes of the parameters and buffers (each storage once, tied weights once),
  cross-checked with the allocator's delta over building the model (which adds its rounding:
  blocks of >= 10 MiB take whole 2 MiB-rounded segments, e.g. qwen2's 24.6 MB embedding takes 24 MiB);
* KV: the bytes of the storages the cache holds after prefill + decode (a sliding layer's keys
  are a view of the last ``window - 1`` tokens of a ``window``-token tensor, so storage >
  nbytes), cross-checked with the key/value ``nbytes`` and the allocator's delta (which adds
  unsplit block tails: torch.cat in each decode step reallocates every layer);
* activations (act): the peak allocated during the prefill forward minus (weights + KV held at
  its end). A plain forward computes the logits of every position (``[batch, context, vocab]``
  in the compute dtype); act@1 is the same prefill with ``logits_to_keep=1``, as ``generate``
  runs it. Both also in requested bytes (no allocator rounding), which the estimated
  activations (``all_logits=True`` and the default) are compared with;
* total: the allocator's peak over prefill and decode, weights included.

The estimate is ``estimate(config, dtype, context=context + decode, batch=batch,
prefill_chunk=context, cuda_context=0, workspace=0, all_logits=True)`` (scores materialised
for eager attention and for MLA): the cache holds ``context + decode`` tokens and the prefill
processes ``context`` tokens in one chunk. Goals: weights and KV within 0.5 % of the tensor
bytes, total within 10 % of the allocator's peak. A model the estimator cannot handle keeps its
row, with the error.
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

import memwarden
import memwarden.alloc as ma
from _timing import environment, write_json

WEIGHT_TOL = 0.005
KV_TOL = 0.005
TOTAL_TOL = 0.10


def model_configs() -> dict:
    """Small but real configurations, one per architecture family (config dicts with model_type).

    gemma2 runs without logit soft-capping (its final soft-capping adds two more [batch, seq,
    vocab] temporaries to a plain forward; sdpa ignores the attention soft-capping anyway)."""
    return {
        "llama-mha": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, vocab_size=16000,
                          max_position_embeddings=4096, tie_word_embeddings=False),
        "qwen2-gqa": dict(model_type="qwen2", hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=6, num_key_value_heads=2, vocab_size=32000,
                          max_position_embeddings=4096, tie_word_embeddings=True),
        "mistral-swa": dict(model_type="mistral", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=8192,
                            sliding_window=256, max_position_embeddings=4096, tie_word_embeddings=False),
        "gemma2-hybrid": dict(model_type="gemma2", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=16000,
                              sliding_window=256, max_position_embeddings=4096, query_pre_attn_scalar=64,
                              layer_types=["sliding_attention", "full_attention"] * 2,
                              attn_logit_softcapping=None, final_logit_softcapping=None),
        "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
                          vocab_size=8192, max_position_embeddings=4096, tie_word_embeddings=False),
        "deepseek_v3-mla": dict(model_type="deepseek_v3", hidden_size=256, intermediate_size=512,
                                moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
                                qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2,
                                n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                                vocab_size=8192, max_position_embeddings=4096, tie_word_embeddings=False,
                                rope_scaling=None),
    }


def build(cfg_dict: dict, dtype: torch.dtype, attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(cfg_dict)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval(), config


def _storages(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def model_bytes(model) -> tuple[int, int]:
    """(parameter bytes, buffer bytes), each storage counted once (tied weights once)."""
    return (_storages(model.parameters()), _storages(model.buffers()))


def cache_bytes(cache) -> tuple[int, int]:
    """(sum of the layers' key/value nbytes, bytes of the distinct storages behind them)."""
    tensors = []
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                tensors.append(t)
    return sum(t.numel() * t.element_size() for t in tensors), _storages(tensors)


def _requested() -> int:
    return int(ma.memory_stats("cpu")["requested_bytes.all.current"])


def _requested_peak() -> int:
    return int(ma.memory_stats("cpu")["requested_bytes.all.peak"])


def _collect(empty: bool = False):
    gc.collect()
    if empty:  # a fresh pool: no reuse of cached blocks left by an earlier case
        ma.empty_cache("cpu")
    return ma.memory_allocated("cpu")


def run_case(model, config, context: int, batch: int, decode: int) -> dict:
    from transformers import DynamicCache

    vocab = config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(context * 7 + batch)
    ids = torch.randint(0, vocab, (batch, context), generator=g)
    steps = torch.randint(0, vocab, (decode, batch, 1), generator=g)
    r = {"context": context, "batch": batch, "decode": decode}
    t_case = time.perf_counter()
    with torch.inference_mode():
        # generate-shaped prefill: only the last position's logits
        cache = DynamicCache(config=model.config)
        base = _collect(empty=True)
        ma.reset_peak_memory_stats("cpu")
        req_base = _requested()
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        peak1, req_peak1 = ma.max_memory_allocated("cpu"), _requested_peak()
        kv1 = cache_bytes(cache)[1]
        r["activations_last_logits"] = peak1 - base - kv1
        r["activations_last_logits_requested"] = req_peak1 - req_base - kv1
        del out, cache
        # plain prefill: logits of every position
        cache = DynamicCache(config=model.config)
        base = _collect(empty=True)
        ma.reset_peak_memory_stats("cpu")
        req_base = _requested()
        t0 = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True)
        peak_prefill, req_peak = ma.max_memory_allocated("cpu"), _requested_peak()
        r["prefill_s"] = time.perf_counter() - t0
        kv_nbytes, kv_storage = cache_bytes(cache)
        r["logits_bytes"] = out.logits.numel() * out.logits.element_size()
        r["logits_dtype"] = str(out.logits.dtype).replace("torch.", "")
        r["kv_prefill_storage"] = kv_storage
        r["activations"] = peak_prefill - base - kv_storage
        r["activations_requested"] = req_peak - req_base - kv_storage
        del out
        held = _collect() - base
        r["kv_prefill_alloc"] = held
        ma.reset_peak_memory_stats("cpu")
        t0 = time.perf_counter()
        for i in range(decode):
            out = model(steps[i], past_key_values=cache, use_cache=True)
            del out
        r["decode_s"] = time.perf_counter() - t0
        peak_decode = ma.max_memory_allocated("cpu")
        kv_nbytes, kv_storage = cache_bytes(cache)
        r["kv_nbytes"] = kv_nbytes
        r["kv_storage"] = kv_storage
        r["kv_alloc"] = _collect() - base
        r["decode_activations"] = peak_decode - base - r["kv_alloc"]
        r["peak_above_weights"] = max(peak_prefill, peak_decode) - base
        r["_base"] = base
        del cache
    r["case_s"] = time.perf_counter() - t_case
    return r


def estimate_case(config, dtype: str, r: dict, attn: str) -> dict:
    from memwarden.estimate import estimate

    # A plain forward computes every position's logits (``generate`` only the last ones:
    # activations_last_logits). Scores are materialised by eager attention, and by the CPU's
    # SDPA when V's head size differs from the query's (its math path), as in MLA.
    mla = getattr(config.get_text_config(), "kv_lora_rank", None) is not None
    kw = dict(context=r["context"] + r["decode"], batch=r["batch"], prefill_chunk=r["context"], cuda_context=0,
              workspace=0, attention_scores=mla or attn == "eager")
    e = estimate(config, dtype, all_logits=True, **kw)
    last = estimate(config, dtype, **kw)
    return {"weights": int(e.weights), "kv_cache": int(e.kv_cache), "activations": int(e.activations),
            "activations_last_logits": int(last.activations), "overhead": int(e.overhead), "total": int(e.total)}


def _ratio(a, b):
    return (a / b) if b else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer contexts (CI smoke run, < 30 s)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--decode", type=int, default=4, help="decode steps after the prefill")
    parser.add_argument("--models", default=None, help="comma-separated subset of the model names")
    parser.add_argument("--json", default="benchmarks/results/bench_estimate.json")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    contexts = (128, 384) if args.quick else (128, 512, 2048)  # 384 > the sliding windows (256)
    batch2_context = 128 if args.quick else 512
    cfgs = model_configs()
    names = args.models.split(",") if args.models else list(cfgs)
    unknown = set(names) - set(cfgs)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {list(cfgs)}")

    rows, t_start = [], time.perf_counter()
    with ma.use("cpu"):
        for name in names:
            a0 = _collect(empty=True)
            model, config = build(cfgs[name], dtype, args.attn)
            weights_alloc = _collect() - a0
            gc.freeze()  # later gc.collect() calls skip the long-lived objects (0.25 s each otherwise)
            params, buffers = model_bytes(model)
            cases = [(c, 1) for c in contexts] + [(batch2_context, 2)]
            for context, batch in cases:
                r = run_case(model, config, context, batch, args.decode)
                r["extra_held"] = r.pop("_base") - a0 - weights_alloc  # anything else left alive: should be 0
                measured = {
                    "weights": params + buffers,             # tensor bytes (tied weights once)
                    "weights_allocated": weights_alloc,      # allocator delta of building the model
                    "kv_cache": r["kv_storage"],             # bytes of the storages the cache pins
                    "kv_cache_nbytes": r["kv_nbytes"],
                    "kv_cache_allocated": r["kv_alloc"],     # allocator delta after prefill + decode
                    "activations": r["activations"],
                    "activations_last_logits": r["activations_last_logits"],
                    # the same peaks counted in requested bytes (no allocator rounding or unsplit tails)
                    "activations_requested": r["activations_requested"],
                    "activations_last_logits_requested": r["activations_last_logits_requested"],
                    "decode_activations": r["decode_activations"],
                    "total": weights_alloc + r["peak_above_weights"],  # allocator peak, weights included
                }
                row = {"model": name, "model_type": cfgs[name]["model_type"], "dtype": args.dtype,
                       "attn_implementation": args.attn, **r, "measured": measured}
                try:
                    est = estimate_case(config, args.dtype, r, args.attn)
                except Exception as exc:  # the estimator is mid-rewrite: keep the row
                    row["estimated"], row["error"] = None, f"{type(exc).__name__}: {exc}"
                else:
                    m = measured
                    ratios = {k: _ratio(est[k], m[k]) for k in ("weights", "kv_cache", "activations", "total")}
                    ratios["weights_allocated"] = _ratio(est["weights"], m["weights_allocated"])
                    ratios["kv_cache_allocated"] = _ratio(est["kv_cache"], m["kv_cache_allocated"])
                    ratios["activations_requested"] = _ratio(est["activations"], m["activations_requested"])
                    ratios["activations_last_logits"] = _ratio(est["activations_last_logits"],
                                                               m["activations_last_logits_requested"])
                    row["estimated"], row["ratios"] = est, ratios
                    row["pass"] = {
                        "weights": abs(ratios["weights"] - 1) <= WEIGHT_TOL,
                        "kv_cache": abs(ratios["kv_cache"] - 1) <= KV_TOL,
                        "total": abs(ratios["total"] - 1) <= TOTAL_TOL,
                    }
                rows.append(row)
            gc.unfreeze()
            del model
            gc.collect()
    elapsed = time.perf_counter() - t_start

    mib = lambda n: f"{n / 2**20:8.2f}" if n is not None else f"{'-':>8}"
    rat = lambda x: f"{x:6.3f}" if x is not None else f"{'-':>6}"
    print(f"memwarden {memwarden.__version__}, {environment()}, {args.dtype}, attn={args.attn}, "
          f"decode={args.decode}, {elapsed:.1f} s")
    print("MiB. measured: weights = parameter + buffer bytes, kv = bytes of the storages the cache holds after "
          "prefill + decode,\n  act = prefill peak - weights - KV (all logits), act@1 = the same with "
          "logits_to_keep=1, total = allocator peak incl. weights.\n"
          "estimate(context=ctx+decode, prefill_chunk=ctx, cuda_context=0, workspace=0); r = estimate / measured "
          "(r w/a, r kv/a: against the allocator's deltas);\n  act/r, act@1/r: estimated activations / measured "
          "peak in requested bytes (no allocator rounding), all logits and the last token's (generate)")
    head = (f"{'model':<16} {'ctx':>5} {'b':>2} | {'weights':>8} {'kv':>8} {'act':>8} {'act@1':>8} {'total':>8} | "
            f"{'est w':>8} {'est kv':>8} {'est act':>8} {'est tot':>8} | {'r w':>6} {'r w/a':>6} {'r kv':>6} "
            f"{'r kv/a':>6} {'r act':>6} {'r tot':>6} | pass w/kv/tot  | {'act/r':>5} {'act@1/r':>7}")
    print(head)
    print("-" * len(head))
    for row in rows:
        m, e = row["measured"], row["estimated"]
        line = (f"{row['model']:<16} {row['context']:>5} {row['batch']:>2} | {mib(m['weights'])} {mib(m['kv_cache'])} "
                f"{mib(m['activations'])} {mib(m['activations_last_logits'])} {mib(m['total'])} | ")
        if e is None:
            line += f"{'ERROR ' + row['error'][:102]:<111}"
        else:
            ra, p = row["ratios"], row["pass"]
            flags = "/".join("PASS" if p[k] else "FAIL" for k in ("weights", "kv_cache", "total"))
            line += (f"{mib(e['weights'])} {mib(e['kv_cache'])} {mib(e['activations'])} {mib(e['total'])} | "
                     f"{rat(ra['weights'])} {rat(ra['weights_allocated'])} {rat(ra['kv_cache'])} "
                     f"{rat(ra['kv_cache_allocated'])} {rat(ra['activations'])} {rat(ra['total'])} | {flags:<14}")
            line += f"| {ra['activations_requested']:5.3f} {ra['activations_last_logits']:7.3f}"
        print(line)
    print("cross-checks (bytes), longest context, batch 1:")
    for r in rows:
        if r["batch"] == 1 and r["context"] == max(contexts):
            m = r["measured"]
            print(f"  {r['model']}: weights {m['weights']} allocated {m['weights_allocated']}; KV nbytes "
                  f"{m['kv_cache_nbytes']} storages {m['kv_cache']} allocated {m['kv_cache_allocated']}; logits "
                  f"{r['logits_bytes']} ({r['logits_dtype']}); decode act {m['decode_activations']}; "
                  f"input ids etc. {r['extra_held']}")
    n_est = [r for r in rows if r["estimated"] is not None]
    summary = {k: sum(r["pass"][k] for r in n_est) for k in ("weights", "kv_cache", "total")}
    worst = max((abs(r["ratios"][k] - 1) for r in n_est for k in ("activations_requested",
                                                                    "activations_last_logits")), default=0.0)
    print(f"pass: weights {summary['weights']}/{len(n_est)}, KV {summary['kv_cache']}/{len(n_est)}, "
          f"total {summary['total']}/{len(n_est)}; estimator errors: {len(rows) - len(n_est)} rows; "
          f"activations (all logits and generate's) worst |ratio - 1| = {worst:.3f}")
    write_json(args.json, {"benchmark": "estimate", "environment": environment(), "dtype": args.dtype,
                           "attn_implementation": args.attn, "decode_steps": args.decode, "elapsed_s": elapsed,
                           "tolerances": {"weights": WEIGHT_TOL, "kv_cache": KV_TOL, "total": TOTAL_TOL},
                           "pass_counts": summary, "results": rows})


if __name__ == "__main__":
    main()
