"""Paged KV cache ops vs plain PyTorch, and block-manager cost vs pool size.

Writes 4096 tokens x 8 heads x 128 (fp16) into a 16-token-block cache ("auto" and
"int8") with memwarden.kv.ops.reshape_and_cache_flash, and gathers them back with
gather_cache, against the plain-PyTorch reference (index_put / advanced indexing) and a
plain copy of the same bytes in the same run. Prints speedups and the fraction of copy
bandwidth reached (copy time / op time), medians of repeated runs; times block-manager
operations per call at 1k and 100k blocks.

    python benchmarks/bench_paged_kv.py [--quick] [--json PATH] [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import environment, median_seconds, write_json  # noqa: E402

import memwarden.kv as kv  # noqa: E402
from memwarden.kv import ops  # noqa: E402

HEADS, HEAD_SIZE, BLOCK_SIZE = 8, 128, 16


def make_problem(tokens, device, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    num_blocks = 2 * tokens // BLOCK_SIZE
    key = torch.randn(tokens, HEADS, HEAD_SIZE, generator=g).to(dtype).to(device)
    value = torch.randn(tokens, HEADS, HEAD_SIZE, generator=g).to(dtype).to(device)
    # Blocks handed out in random order, tokens in order within a block (as a block manager would).
    blocks = torch.randperm(num_blocks, generator=g)[: tokens // BLOCK_SIZE]
    slots = (blocks.view(-1, 1) * BLOCK_SIZE + torch.arange(BLOCK_SIZE)).reshape(-1).to(device)
    return key, value, slots, num_blocks, blocks


def bench_ops(tokens, device, repeats):
    key, value, slots, num_blocks, blocks = make_problem(tokens, device)
    results = {}
    shape = (num_blocks, BLOCK_SIZE, HEADS, HEAD_SIZE)
    k_scale = (key.float().abs().amax() / 127).view(1)
    v_scale = (value.float().abs().amax() / 127).view(1)
    block_table = blocks.view(1, -1).to(device)
    seq_lens = torch.tensor([tokens], device=device)
    for kv_dtype in ("auto", "int8"):
        cache_dtype = key.dtype if kv_dtype == "auto" else torch.int8
        kc = torch.zeros(shape, dtype=cache_dtype, device=device)
        vc = torch.zeros(shape, dtype=cache_dtype, device=device)
        flat_k, flat_v = kc.view(-1, HEADS, HEAD_SIZE), vc.view(-1, HEADS, HEAD_SIZE)

        def op_write():
            ops.reshape_and_cache_flash(key, value, kc, vc, slots, kv_dtype, k_scale, v_scale)

        if kv_dtype == "auto":
            def ref_write():
                flat_k[slots] = key
                flat_v[slots] = value
        else:
            def ref_write():
                flat_k[slots] = torch.round(key.float() / k_scale).clamp(-128, 127).to(torch.int8)
                flat_v[slots] = torch.round(value.float() / v_scale).clamp(-128, 127).to(torch.int8)

        # Plain copy of the bytes the op must move: read key+value, write the cache rows.
        src_bytes = torch.cat([key.view(-1), value.view(-1)])
        dst_bytes = torch.empty_like(src_bytes)

        def plain_copy():
            dst_bytes.copy_(src_bytes)

        out_k = torch.empty_like(key)
        out_v = torch.empty_like(value)
        sk = k_scale if kv_dtype == "int8" else None
        sv = v_scale if kv_dtype == "int8" else None

        def op_gather():
            ops.gather_cache(kc, vc, block_table, seq_lens, out_k, out_v, kv_dtype, sk, sv)

        if kv_dtype == "auto":
            def ref_gather():
                out_k.copy_(flat_k[slots])
                out_v.copy_(flat_v[slots])
        else:
            def ref_gather():
                out_k.copy_((flat_k[slots].float() * k_scale).to(key.dtype))
                out_v.copy_((flat_v[slots].float() * v_scale).to(key.dtype))

        op_write()  # check the op against the reference once before timing
        got_k = kc.clone()
        ref_write()
        if kv_dtype == "auto":
            assert torch.equal(got_k, kc)
        else:
            assert int((got_k.int() - kc.int()).abs().max()) <= 1

        t = {name: median_seconds(fn, device, repeats=repeats) for name, fn in
             [("copy", plain_copy), ("write", op_write), ("write_ref", ref_write), ("gather", op_gather),
              ("gather_ref", ref_gather)]}
        if device.startswith("cuda"):  # without the host-side index checks (and their stream sync)
            with ops.cuda_index_checks(False):
                t["write_unchecked"] = median_seconds(op_write, device, repeats=repeats)
                t["gather_unchecked"] = median_seconds(op_gather, device, repeats=repeats)
        nbytes = src_bytes.numel() * src_bytes.element_size()
        results[kv_dtype] = {
            "seconds": t,
            "bytes_moved_fp16": nbytes,
            "write_speedup_vs_ref": t["write_ref"] / t["write"],
            "gather_speedup_vs_ref": t["gather_ref"] / t["gather"],
            "write_fraction_of_copy": t["copy"] / t["write"],
            "gather_fraction_of_copy": t["copy"] / t["gather"],
            "copy_GBps": 2 * nbytes / t["copy"] / 1e9,
            "write_GBps": (nbytes + nbytes // (2 if kv_dtype == "int8" else 1)) / t["write"] / 1e9,
        }
        if "write_unchecked" in t:
            cache_bytes = nbytes // (2 if kv_dtype == "int8" else 1)
            results[kv_dtype].update({
                "unchecked_write_speedup_vs_ref": t["write_ref"] / t["write_unchecked"],
                "unchecked_gather_speedup_vs_ref": t["gather_ref"] / t["gather_unchecked"],
                "unchecked_write_GBps": (nbytes + cache_bytes) / t["write_unchecked"] / 1e9,
                "unchecked_gather_GBps": (nbytes + cache_bytes) / t["gather_unchecked"] / 1e9,
            })
    return results


def bench_block_manager(num_blocks, ops_count):
    pool = kv.BlockPool(num_blocks)
    blocks = pool.allocate(num_blocks)
    for b in blocks:
        pool.cache(b, b * 7919 + 1)
    pool.release(blocks)
    hashes = [((i * 104729) % num_blocks) * 7919 + 1 for i in range(ops_count)]
    ids = [(i * 104729) % num_blocks for i in range(ops_count)]

    def timed(fn):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - start) / ops_count)
        return best

    def alloc_free():
        for _ in range(ops_count):
            pool.release(pool.allocate(1))

    def touch_release():  # remove from the middle of the free queue, then put back
        for b in ids:
            pool.touch(b)
            pool.release([b])

    def lookup():
        for h in hashes:
            pool.lookup(h)

    m = kv.KVCacheManager(num_blocks, BLOCK_SIZE)
    prompt = list(range(64))

    def add_free_sequence():
        for i in range(ops_count // 10):
            m.add_sequence(i, prompt)
            m.free_sequence(i)

    per_seq = timed(add_free_sequence) * 10
    return {"allocate_release_s": timed(alloc_free), "touch_release_s": timed(touch_release),
            "lookup_s": timed(lookup), "add_free_sequence_64_tokens_s": per_seq}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run (< 20 s)")
    parser.add_argument("--json", default="benchmarks/results/bench_paged_kv.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 9
    tokens = 1024 if args.quick else args.tokens

    print(f"paged KV ops: {tokens} tokens x {HEADS} heads x {HEAD_SIZE}, fp16, block size {BLOCK_SIZE}, "
          f"{args.device}, {torch.get_num_threads()} threads, medians of {repeats}")
    results = {"environment": environment(), "tokens": tokens, "device": args.device}
    results["ops"] = bench_ops(tokens, args.device, repeats)
    for kv_dtype, r in results["ops"].items():
        t = r["seconds"]
        print(f"  [{kv_dtype:4}] copy {t['copy'] * 1e6:8.1f} us ({r['copy_GBps']:.1f} GB/s r+w)")
        print(f"  [{kv_dtype:4}] write  {t['write'] * 1e6:8.1f} us  ref {t['write_ref'] * 1e6:8.1f} us  "
              f"speedup {r['write_speedup_vs_ref']:5.2f}x  {100 * r['write_fraction_of_copy']:5.1f}% of copy")
        print(f"  [{kv_dtype:4}] gather {t['gather'] * 1e6:8.1f} us  ref {t['gather_ref'] * 1e6:8.1f} us  "
              f"speedup {r['gather_speedup_vs_ref']:5.2f}x  {100 * r['gather_fraction_of_copy']:5.1f}% of copy")
        if "write_unchecked" in t:
            print(f"  [{kv_dtype:4}] unchecked: write {t['write_unchecked'] * 1e6:.1f} us "
                  f"({r['unchecked_write_GBps']:.0f} GB/s, {r['unchecked_write_speedup_vs_ref']:.2f}x ref), "
                  f"gather {t['gather_unchecked'] * 1e6:.1f} us ({r['unchecked_gather_GBps']:.0f} GB/s, "
                  f"{r['unchecked_gather_speedup_vs_ref']:.2f}x ref)")
    if args.device.startswith("cuda"):
        decode = bench_ops(64, args.device, repeats)
        results["ops_decode_64_tokens"] = decode
        for kv_dtype, r in decode.items():
            t = r["seconds"]
            print(f"  decode 64 tokens [{kv_dtype}] write {t['write'] * 1e6:.1f} us (unchecked "
                  f"{t['write_unchecked'] * 1e6:.1f}), gather {t['gather'] * 1e6:.1f} us (unchecked "
                  f"{t['gather_unchecked'] * 1e6:.1f}); reference write {t['write_ref'] * 1e6:.1f}, "
                  f"gather {t['gather_ref'] * 1e6:.1f} us")

    ops_count = 2000 if args.quick else 20000
    bm = {n: bench_block_manager(n, ops_count) for n in (1000, 100000)}
    results["block_manager"] = {str(n): v for n, v in bm.items()}
    print("block manager, seconds per call (through pybind), best of 5:")
    for name in bm[1000]:
        small, large = bm[1000][name], bm[100000][name]
        print(f"  {name:32} 1k blocks {small * 1e9:8.0f} ns   100k blocks {large * 1e9:8.0f} ns   "
              f"ratio {large / small:4.2f}")
        results["block_manager"].setdefault("ratio_100k_vs_1k", {})[name] = large / small
    write_json(args.json, results)


if __name__ == "__main__":
    main()
