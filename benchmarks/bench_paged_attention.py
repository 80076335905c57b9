"""Decode attention over a paged KV cache: memwarden's paged_attention reading the pages in
place (bf16 pages, INT8 pages) against SDPA over dense K/V, in one run.

    python benchmarks/bench_paged_attention.py [--quick] [--device cpu|cuda] [--json PATH] [--plot PATH]

Shapes of a Llama-3-8B layer: 32 query heads on 8 KV heads of 128, one query token per
sequence, pages of 16 tokens in shuffled blocks, head-major (HND, as PagedKVCache
stores them; --layout NHD for vLLM's default). Contexts 1k/4k/16k/32k for batch 1 and
1k/4k/16k for batch 16 (--quick: 512 and 2048, batch 1 and 4). Variants:

* ``sdpa_dense``: ``F.scaled_dot_product_attention`` over contiguous dense K/V (GQA), what
  a dense cache costs per step (its ``torch.cat`` growth not counted): the baseline.
* ``gather_sdpa``/``gather_sdpa_int8``: gather the pages into dense K/V (dequantizing INT8),
  then SDPA: what a paged cache that hands dense K/V to the model costs.
* ``paged``/``paged_int8``: ``memwarden.kv.ops.paged_attention`` over the pages.

Times are medians of repeated runs (benchmarks/_timing.py); the table prints each
variant's time, its ratio to ``sdpa_dense`` (< 1: faster), the bandwidth of the K/V bytes
it must read and that as a fraction of a large tensor copy's (measured first, same run).
Also checks every variant's output against ``sdpa_dense``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import environment, median_seconds, new_figure, save_figure, write_json  # noqa: E402

from memwarden.kv import ops  # noqa: E402

HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 32, 8, 128, 16
VARIANTS = ("sdpa_dense", "gather_sdpa", "gather_sdpa_int8", "paged", "paged_int8")


def make_case(batch: int, context: int, dtype: torch.dtype, device: str, layout: str = "HND"):
    g = torch.Generator().manual_seed(batch * 100003 + context)
    pages = (context + BLOCK - 1) // BLOCK
    blocks = batch * pages

    def pages_of(dtype_):
        shape = (blocks, KV_HEADS, BLOCK, HEAD_SIZE) if layout == "HND" else (blocks, BLOCK, KV_HEADS, HEAD_SIZE)
        t = torch.empty(shape, dtype=dtype_, device=device)
        return t.permute(0, 2, 1, 3) if layout == "HND" else t

    key, value = pages_of(dtype), pages_of(dtype)
    key.copy_(torch.randn(key.shape, generator=g).to(dtype))
    value.copy_(torch.randn(value.shape, generator=g).to(dtype))
    table = torch.randperm(blocks, generator=g).view(batch, pages).int().to(device)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    # INT8 pages of the same values (per token and head scales), written by memwarden's op
    k8, v8 = pages_of(torch.int8), pages_of(torch.int8)
    ks, vs = (torch.empty(key.shape[:3], dtype=torch.float32, device=device) for _ in range(2))
    slots = torch.arange(blocks * BLOCK, device=device)
    ops.reshape_and_cache_flash(key.reshape(-1, KV_HEADS, HEAD_SIZE), value.reshape(-1, KV_HEADS, HEAD_SIZE), k8, v8, slots,
                                "int8_per_token_head", k_scale_cache=ks, v_scale_cache=vs)
    dense_k, dense_v = ops.gather_kv(key, value, table, lens)
    dense_k = dense_k.view(batch, context, KV_HEADS, HEAD_SIZE).transpose(1, 2).contiguous()
    dense_v = dense_v.view(batch, context, KV_HEADS, HEAD_SIZE).transpose(1, 2).contiguous()
    query = torch.randn(batch, HEADS, HEAD_SIZE, generator=g).to(dtype).to(device)
    return dict(key=key, value=value, k8=k8, v8=v8, ks=ks, vs=vs, table=table, lens=lens, dense_k=dense_k,
                dense_v=dense_v, query=query, batch=batch, context=context)


def sdpa(query, k, v):
    """[batch, heads, head] queries over [batch, kv_heads, ctx, head] K/V -> [batch, heads, head]."""
    out = torch.nn.functional.scaled_dot_product_attention(query.unsqueeze(2), k, v, enable_gqa=True)
    return out.squeeze(2)


def runners(c):
    b, n = c["batch"], c["context"]
    out_k = torch.empty(b * n, KV_HEADS, HEAD_SIZE, dtype=c["query"].dtype, device=c["query"].device)
    out_v = torch.empty_like(out_k)

    def dense_of(k_flat, v_flat):
        return (k_flat.view(b, n, KV_HEADS, HEAD_SIZE).transpose(1, 2),
                v_flat.view(b, n, KV_HEADS, HEAD_SIZE).transpose(1, 2))

    def gather_sdpa():
        ops.gather_cache(c["key"], c["value"], c["table"], c["lens"], out_k, out_v)
        return sdpa(c["query"], *dense_of(out_k, out_v))

    def gather_sdpa_int8():
        ops.gather_cache(c["k8"], c["v8"], c["table"], c["lens"], out_k, out_v, "int8_per_token_head",
                         k_scale_cache=c["ks"], v_scale_cache=c["vs"])
        return sdpa(c["query"], *dense_of(out_k, out_v))

    return {
        "sdpa_dense": lambda: sdpa(c["query"], c["dense_k"], c["dense_v"]),
        "gather_sdpa": gather_sdpa,
        "gather_sdpa_int8": gather_sdpa_int8,
        "paged": lambda: ops.paged_attention(c["query"], c["key"], c["value"], c["table"], c["lens"]),
        "paged_int8": lambda: ops.paged_attention(c["query"], c["k8"], c["v8"], c["table"], c["lens"],
                                                  kv_cache_dtype="int8_per_token_head", k_scale_cache=c["ks"],
                                                  v_scale_cache=c["vs"]),
    }


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes a large tensor copy reads per second here: the yardstick for the bytes each
    variant must read."""
    src = torch.empty(64 << 20, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return src.nbytes / median_seconds(lambda: dst.copy_(src), device, repeats=repeats)


def kv_bytes(c, variant: str) -> int:
    """Bytes of K/V (and scales) the variant must read at least."""
    values = 2 * c["batch"] * c["context"] * KV_HEADS
    if variant.endswith("int8"):
        return values * (HEAD_SIZE + 4)
    return values * HEAD_SIZE * c["query"].element_size()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small contexts (CI smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layout", default="HND", choices=["HND", "NHD"],
                        help="page layout (PagedKVCache's is HND: a head's tokens of a page together)")
    parser.add_argument("--json", default="benchmarks/results/bench_paged_attention.json")
    parser.add_argument("--plot", default="benchmarks/results/bench_paged_attention.png")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.quick:
        cases = [(1, 512), (1, 2048), (4, 512), (4, 2048)]
    else:
        cases = [(1, n) for n in (1024, 4096, 16384, 32768)] + [(16, n) for n in (1024, 4096, 16384)]
    rows = []
    copy = copy_bandwidth(args.device, args.repeats)
    print(f"copy bandwidth on {args.device}: {copy / 1e9:.1f} GB/s ({torch.get_num_threads()} threads)")
    print(f"{'batch':>5} {'context':>7} {'variant':>17} {'ms':>9} {'x sdpa':>7} {'GB/s':>6} {'x copy':>6} "
          f"{'max|diff|':>9}")
    for batch, context in cases:
        c = make_case(batch, context, dtype, args.device, args.layout)
        run = runners(c)
        ref = run["sdpa_dense"]().float()
        base = None
        for variant in VARIANTS:
            seconds = median_seconds(run[variant], args.device, repeats=args.repeats if not args.quick else 3)
            base = seconds if variant == "sdpa_dense" else base
            diff = (run[variant]().float() - ref).abs().max().item()
            bandwidth = kv_bytes(c, variant) / seconds
            row = dict(batch=batch, context=context, variant=variant, seconds=seconds, vs_sdpa_dense=seconds / base,
                       gb_per_s=bandwidth / 1e9, of_copy_bandwidth=bandwidth / copy, max_abs_diff=diff)
            rows.append(row)
            print(f"{batch:5d} {context:7d} {variant:>17} {seconds * 1e3:9.3f} {row['vs_sdpa_dense']:7.2f} "
                  f"{row['gb_per_s']:6.1f} {row['of_copy_bandwidth']:6.2f} {diff:9.4f}")
        del c
    write_json(args.json, {"benchmark": "paged_attention", "environment": environment(), "device": args.device,
                           "dtype": args.dtype, "layout": args.layout, "quick": args.quick, "heads": HEADS, "kv_heads": KV_HEADS,
                           "head_size": HEAD_SIZE, "block_size": BLOCK, "copy_bytes_per_s": copy,
                           "results": rows})
    _plot(rows, args.plot)


def _plot(rows, path: str) -> None:
    batches = sorted({r["batch"] for r in rows})
    fig = new_figure((5 * len(batches), 4))
    if fig is None:
        return
    for i, batch in enumerate(batches):
        ax = fig.add_subplot(1, len(batches), i + 1)
        for variant in VARIANTS:
            pts = [(r["context"], r["seconds"] * 1e3) for r in rows if r["batch"] == batch and r["variant"] == variant]
            ax.plot(*zip(*pts), marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decode step (one layer)")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
