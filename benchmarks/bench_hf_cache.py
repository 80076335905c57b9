"""transformers generate with memwarden's PagedCache vs DynamicCache (and QuantizedCache
where a backend installs), measured in one run, each cache in its own process.

    python benchmarks/bench_hf_cache.py [--quick] [--prompt N --new N] [--json PATH] [--plot PATH]

The model is small but not trivial (8 layers, hidden 512, GQA 8:2, bf16 on the CPU,
random weights, a fixed seed): a 1024-token prompt, then 512 greedy new tokens (--quick:
64 + 128, whose half-size INT8 budget still holds the prompt; --prompt/--new set others). Per cache:

* KV bytes at the end: the K/V tensors a DynamicCache holds; for PagedCache the bytes of
  the pages in use (device + host), and the pool it preallocated under a budget.
* peak: memwarden's host allocator is installed as torch's CPU allocator in each child
  process, so the peak is the exact maximum of live tensor bytes during generate (weights
  included, and shown separately).
* tokens/s: new tokens over the whole generate's wall time (prefill included); decode:
  the tokens after the first over the time after the prefill (measured alone, same run).
* ``*_attn``: the same PagedCache with ``attn_implementation="memwarden_paged"``, which
  attends over the pages in place instead of reading them back densely every step.
* max |logit error| and greedy-token agreement against DynamicCache's run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("dynamic", "paged_auto", "paged_int8", "paged_int8_half_budget", "paged_auto_attn", "paged_int8_attn",
            "paged_int8_half_budget_attn", "quantized_quanto_int4", "quantized_hqq_int4", "quantized_hqq_int8")
ATTN_SUFFIX = "_attn"  # the same cache with attn_implementation="memwarden_paged" (pages read in place)


def build_model(prompt: int, new: int):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=max(4096, prompt + new),
                         dtype="bfloat16")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    return model, ids, new


def full_kv_bytes(model, tokens: int) -> int:
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * tokens * 2  # bf16


def make_cache(variant: str, model, tokens: int):
    from transformers import DynamicCache

    if variant == "dynamic":
        return DynamicCache(config=model.config)
    from memwarden.kv import PagedCache

    variant = variant.removesuffix(ATTN_SUFFIX)
    if variant == "paged_auto":
        return PagedCache(model.config)
    if variant == "paged_int8":
        return PagedCache(model.config, kv_dtype="int8")
    if variant == "paged_int8_half_budget":
        return PagedCache(model.config, kv_dtype="int8", compress="always", max_memory=full_kv_bytes(model, tokens) // 2,
                          offload="host")
    from transformers import QuantizedCache  # quanto / hqq must be installed

    _, backend, bits = variant.split("_")
    return QuantizedCache(backend=backend, config=model.config, nbits=int(bits[3:]))


def kv_bytes(cache) -> dict:
    stats = getattr(cache, "stats", None)
    if stats is not None:
        s = stats()
        store = cache.store
        return {"kv_bytes": sum(s.bytes_by_state.values()), "device_kv_bytes": s.bytes_by_state.get("device", 0),
                "pool_bytes": store.nbytes if store is not None else 0, "stats": str(s)}
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            total += _nbytes(t)
    return {"kv_bytes": total, "device_kv_bytes": total, "pool_bytes": 0, "stats": ""}


def _nbytes(t) -> int:
    """Bytes a cached object really holds: a plain tensor's storage; a tensor subclass
    (quanto's packed tensors) through its inner tensors; tuples, lists and dicts (hqq's
    (data, meta) pairs) item by item."""
    import torch

    if isinstance(t, torch.Tensor):
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(_nbytes(getattr(t, name)) for name in names)
        return t.nbytes
    if isinstance(t, dict):
        return sum(_nbytes(v) for v in t.values())
    if isinstance(t, (tuple, list)):
        return sum(_nbytes(v) for v in t)
    return 0


def run_one(variant: str, prompt: int, new: int, out: str) -> None:
    """One cache in this process: memwarden's allocator counts every CPU tensor byte."""
    import torch

    import memwarden.alloc as ma

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ma.install("cpu")
    model, ids, new = build_model(prompt, new)
    if variant.endswith(ATTN_SUFFIX):
        from memwarden.kv.attention import ATTENTION_NAME

        model.set_attn_implementation(ATTENTION_NAME)
    weights = ma.memory_allocated("cpu")
    try:
        cache = make_cache(variant, model, ids.shape[1] + new)
    except Exception as e:  # noqa: BLE001 - a backend that does not install here is reported, not fatal
        json.dump({"variant": variant, "skipped": f"{type(e).__name__}: {e}"}, open(out + ".json", "w"))
        return
    with torch.no_grad():
        model.generate(ids[:, :16], max_new_tokens=2, do_sample=False, past_key_values=make_cache(variant, model, ids.shape[1] + new))
        # the prefill alone (generate of one token), so decode speed can be told apart
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, past_key_values=make_cache(variant, model, ids.shape[1] + new))
        prefill_seconds = time.perf_counter() - start
        ma.reset_peak_memory_stats("cpu")
        before = ma.memory_allocated("cpu")
        start = time.perf_counter()
        result = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, past_key_values=cache,
                                output_logits=True, return_dict_in_generate=True)
        seconds = time.perf_counter() - start
    peak = ma.max_memory_allocated("cpu")
    torch.save({"sequences": result.sequences, "logits": torch.stack(result.logits).float()}, out + ".pt")
    row = {"variant": variant, "seconds": seconds, "tokens_per_s": new / seconds, "prefill_seconds": prefill_seconds,
           "decode_tokens_per_s": (new - 1) / max(seconds - prefill_seconds, 1e-9), "peak_bytes": peak,
           "peak_above_start_bytes": peak - before, "weights_bytes": weights,
           "full_kv_bytes": full_kv_bytes(model, ids.shape[1] + new), **kv_bytes(cache)}
    json.dump(row, open(out + ".json", "w"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 + 128 tokens (CI smoke run)")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default 1024, --quick 128)")
    parser.add_argument("--new", type=int, help="new tokens (default 512, --quick 64)")
    parser.add_argument("--json", default="benchmarks/results/bench_hf_cache.json")
    parser.add_argument("--plot", default="benchmarks/results/bench_hf_cache.png")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.prompt = args.prompt or (64 if args.quick else 1024)
    args.new = args.new or (128 if args.quick else 512)
    if args.one:
        run_one(args.one, args.prompt, args.new, args.out)
        return

    import torch

    from _timing import environment, write_json

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            out = os.path.join(tmp, variant)
            cmd = [sys.executable, os.path.abspath(__file__), "--one", variant, "--out", out, "--prompt", str(args.prompt),
                   "--new", str(args.new)]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)}
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env)
            if proc.returncode != 0 or not os.path.exists(out + ".json"):
                rows.append({"variant": variant, "skipped": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"})
                continue
            row = json.load(open(out + ".json"))
            if os.path.exists(out + ".pt"):
                row["_result"] = torch.load(out + ".pt")
            rows.append(row)
    results = {r["variant"]: r.pop("_result") for r in rows if "_result" in r}
    ref_row = next((r for r in rows if r["variant"] == "dynamic" and "dynamic" in results), None)
    for r in rows:
        if r["variant"] not in results or ref_row is None:
            continue
        got, ref = results[r["variant"]], results["dynamic"]
        r["max_logit_error"] = float((got["logits"] - ref["logits"]).abs().max())
        r["token_agreement"] = (got["sequences"] == ref["sequences"]).float().mean().item()
        r["kv_bytes_vs_dynamic"] = r["kv_bytes"] / ref_row["kv_bytes"]
        r["peak_vs_dynamic"] = r["peak_above_start_bytes"] / ref_row["peak_above_start_bytes"]
        r["tokens_per_s_vs_dynamic"] = r["tokens_per_s"] / ref_row["tokens_per_s"]
        r["decode_tokens_per_s_vs_dynamic"] = r["decode_tokens_per_s"] / ref_row["decode_tokens_per_s"]

    print(f"{'cache':>24} {'KV MiB':>8} {'x dyn':>6} {'peak MiB':>9} {'x dyn':>6} {'tok/s':>7} {'x dyn':>6} "
          f"{'decode':>7} {'x dyn':>6} {'max|dlogit|':>11} {'tokens =':>9}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['variant']:>24}  skipped: {r['skipped'][:90]}")
            continue
        print(f"{r['variant']:>24} {r['kv_bytes'] / 2**20:8.2f} {r.get('kv_bytes_vs_dynamic', 0):6.2f} "
              f"{r['peak_above_start_bytes'] / 2**20:9.2f} {r.get('peak_vs_dynamic', 0):6.2f} {r['tokens_per_s']:7.1f} "
              f"{r.get('tokens_per_s_vs_dynamic', 0):6.2f} {r['decode_tokens_per_s']:7.1f} "
              f"{r.get('decode_tokens_per_s_vs_dynamic', 0):6.2f} {r.get('max_logit_error', float('nan')):11.4f} "
              f"{r.get('token_agreement', float('nan')):9.1%}")
    write_json(args.json, {"benchmark": "hf_cache", "environment": environment(), "quick": args.quick, "prompt_tokens": args.prompt,
                           "new_tokens": args.new, "results": rows})
    _plot(rows, args.plot)


def _plot(rows, path: str) -> None:
    from _timing import new_figure, save_figure

    done = [r for r in rows if "skipped" not in r]
    names = [r["variant"] for r in done]
    fig = new_figure((11, 4))
    if fig is None:
        return
    for i, (key, label) in enumerate((("kv_bytes", "KV at the end (MiB)"), ("peak_above_start_bytes", "peak of generate (MiB)"),
                                      ("tokens_per_s", "tokens/s"))):
        ax = fig.add_subplot(1, 3, i + 1)
        values = [r[key] / (2**20 if key != "tokens_per_s" else 1) for r in done]
        ax.barh(names, values, color=["#888" if n == "dynamic" else "#3b7dd8" for n in names])
        ax.set_title(label)
        if i:
            ax.set_yticklabels([])
    save_figure(fig, path)


if __name__ == "__main__":
    main()
