"""INT8 quantization: memwarden's kernels vs the eager PyTorch reference and a plain copy
of the same bytes, measured in one run (medians of repeats).

The first table is per-token quantization. The second compares the granularities on one
input: per tensor and per channel need a reduction across rows, and their goal is 1.5x
the per-token time (they were ATen reductions, ~16x slower); the decode-size row
(1 x 8192 per token) has the goal of 3x a clone of the input (the op chain's dispatch
dominates there).

    python benchmarks/bench_quant.py [--quick] [--device cpu|cuda] [--json PATH]

Bandwidth counts the bytes an ideal kernel moves: the input read once, the int8
output and the scales written once. Two copy baselines move the input's bytes
(read + write, 2 x input): `clone()`, which like every op compared here allocates its
output (so fresh pages are faulted in on the CPU), and `copy_()` into a preallocated
tensor (pure bandwidth). "of copy" is the fraction of the clone's bandwidth reached;
"of copy_" the fraction of the preallocated copy's; "into" runs the kernel into
preallocated outputs (quantize_int8_into), compared with copy_.
"""
from __future__ import annotations

import argparse

import torch

import memwarden
from memwarden import quant
from _timing import environment, median_seconds, write_json


def reference_per_token(x: torch.Tensor):
    """Eager plain-PyTorch symmetric per-token quantization."""
    scale = x.abs().amax(dim=-1, keepdim=True).float() / 127.0
    q = torch.round(x.float() / scale).clamp(-128, 127).to(torch.int8)
    return q, scale


def bench_case(shape, dtype, device, repeats):
    x = torch.randn(shape, dtype=dtype, device=device)
    copy_dst = torch.empty_like(x)
    t_ours = median_seconds(lambda: quant.scaled_int8_quant(x), device, repeats)
    q_buf = torch.empty(shape, dtype=torch.int8, device=device)
    scale_buf = torch.empty(shape[0], 1, device=device)
    t_into = median_seconds(lambda: quant.quantize_int8_into(x, q_buf, scale_buf), device, repeats)
    t_ref = median_seconds(lambda: reference_per_token(x), device, repeats)
    t_clone = median_seconds(lambda: x.clone(), device, repeats)
    t_copy = median_seconds(lambda: copy_dst.copy_(x), device, repeats)
    in_bytes = x.numel() * x.element_size()
    moved = in_bytes + x.numel() + shape[0] * 4  # read input, write int8 and scales
    return {
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "device": device,
        "memwarden_us": t_ours * 1e6,
        "memwarden_into_us": t_into * 1e6,
        "reference_us": t_ref * 1e6,
        "clone_us": t_clone * 1e6,
        "copy_into_us": t_copy * 1e6,
        "speedup_vs_reference": t_ref / t_ours,
        "memwarden_GBps": moved / t_ours / 1e9,
        "clone_GBps": 2 * in_bytes / t_clone / 1e9,
        "copy_into_GBps": 2 * in_bytes / t_copy / 1e9,
        "fraction_of_copy_bandwidth": (moved / t_ours) / (2 * in_bytes / t_clone),
        "fraction_of_copy_into_bandwidth": (moved / t_ours) / (2 * in_bytes / t_copy),
        # Both into preallocated outputs: the kernel against pure copy bandwidth.
        "into_fraction_of_copy_into_bandwidth": (moved / t_into) / (2 * in_bytes / t_copy),
    }


TENSOR_CHANNEL_GOAL = 1.5  # x per-token time
DECODE_GOAL = 3.0  # x clone time


def bench_granularities(shape, dtype, device, repeats):
    """quantize_int8 per token / tensor / channel / group of 128 on one input."""
    x = torch.randn(shape, dtype=dtype, device=device)
    times = {g: median_seconds(lambda g=g: quant.quantize_int8(x, g, 128 if g == "group" else None), device, repeats)
             for g in quant.GRANULARITIES}
    row = {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "device": device,
           **{f"{g}_us": t * 1e6 for g, t in times.items()}}
    for g in ("tensor", "channel"):
        row[f"{g}_over_token"] = times[g] / times["token"]
    row["goal_over_token"] = TENSOR_CHANNEL_GOAL
    row["goal_met"] = all(row[f"{g}_over_token"] <= TENSOR_CHANNEL_GOAL for g in ("tensor", "channel"))
    return row


def bench_decode(dtype, device, repeats):
    """One decode step's activation (1 x 8192) per token, against a clone of it."""
    x = torch.randn(1, 8192, dtype=dtype, device=device)
    t_ours = median_seconds(lambda: quant.quantize_int8(x, "token"), device, repeats)
    t_clone = median_seconds(lambda: x.clone(), device, repeats)
    return {"shape": [1, 8192], "dtype": str(dtype).replace("torch.", ""), "device": device,
            "memwarden_us": t_ours * 1e6, "clone_us": t_clone * 1e6, "over_clone": t_ours / t_clone,
            "goal_over_clone": DECODE_GOAL, "goal_met": t_ours / t_clone <= DECODE_GOAL}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller tensors and fewer repeats (CI smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="benchmarks/results/bench_quant.json")
    args = parser.parse_args(argv)

    big = (512, 8192) if args.quick else (4096, 8192)
    repeats = 3 if args.quick else 9
    rows = []
    for shape in (big, (1, 8192)):
        for dtype in (torch.bfloat16, torch.float32):
            rows.append(bench_case(shape, dtype, args.device, repeats))

    print(f"memwarden {memwarden.__version__}, {environment()}")
    print(f"{'shape':>12} {'dtype':>8} {'memwarden us':>13} {'eager us':>10} {'clone us':>9} {'copy_ us':>9} "
          f"{'speedup':>8} {'GB/s':>7} {'of copy':>8} {'of copy_':>8} {'into us':>9} {'into/copy_':>10}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>12} {r['dtype']:>8} {r['memwarden_us']:13.1f} {r['reference_us']:10.1f} "
              f"{r['clone_us']:9.1f} {r['copy_into_us']:9.1f} {r['speedup_vs_reference']:7.1f}x "
              f"{r['memwarden_GBps']:7.1f} {r['fraction_of_copy_bandwidth']:8.0%} "
              f"{r['fraction_of_copy_into_bandwidth']:8.0%} {r['memwarden_into_us']:9.1f} "
              f"{r['into_fraction_of_copy_into_bandwidth']:10.0%}")

    grid = (512, 4096) if args.quick else (2048, 4096)
    granularities = [bench_granularities(grid, dtype, args.device, repeats) for dtype in (torch.bfloat16, torch.float32)]
    decode = [bench_decode(dtype, args.device, repeats * 3) for dtype in (torch.bfloat16, torch.float32)]
    print(f"\n{'shape':>12} {'dtype':>8} {'token us':>9} {'tensor us':>10} {'channel us':>11} {'group us':>9} "
          f"{'tensor/token':>13} {'channel/token':>14}  goal <= {TENSOR_CHANNEL_GOAL}x")
    for r in granularities:
        print(f"{'x'.join(map(str, r['shape'])):>12} {r['dtype']:>8} {r['token_us']:9.0f} {r['tensor_us']:10.0f} "
              f"{r['channel_us']:11.0f} {r['group_us']:9.0f} {r['tensor_over_token']:12.2f}x "
              f"{r['channel_over_token']:13.2f}x  {'met' if r['goal_met'] else 'MISSED'}")
    print(f"\n{'shape':>12} {'dtype':>8} {'memwarden us':>13} {'clone us':>9} {'of clone':>9}  goal <= {DECODE_GOAL}x")
    for r in decode:
        print(f"{'x'.join(map(str, r['shape'])):>12} {r['dtype']:>8} {r['memwarden_us']:13.1f} {r['clone_us']:9.1f} "
              f"{r['over_clone']:8.2f}x  {'met' if r['goal_met'] else 'MISSED'}")
    write_json(args.json, {"benchmark": "quant", "environment": environment(), "results": rows,
                           "granularities": granularities, "decode": decode})


if __name__ == "__main__":
    main()
