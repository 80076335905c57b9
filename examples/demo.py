"""memwarden demo on embedded defaults: no downloads, no GPU needed.

    python examples/demo.py
"""
from __future__ import annotations

import time

import torch

import memwarden
from memwarden import quant


def timed(fn, repeats=5):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def demo_int8(device: str) -> None:
    print(f"\n== INT8 quantization on {device}: a 2048 x 4096 bf16 activation")
    x = torch.randn(2048, 4096, dtype=torch.bfloat16, device=device)
    print(f"{'granularity':>12} {'sym':>5} {'max |err| / scale':>18} {'rel. error':>11} {'quantize ms':>12}")
    for granularity, group_size in (("tensor", None), ("token", None), ("channel", None), ("group", 128)):
        for symmetric in (True, False):
            q, scale, azp = quant.quantize_int8(x, granularity, group_size, symmetric)
            x_hat = quant.dequantize_int8(q, scale, azp, granularity, group_size, out_dtype=torch.float32)
            err = (x_hat - x.float()).abs()
            worst_steps = (err / quant.broadcast_scale(scale, x.shape, granularity, group_size).clamp_min(1e-30)).max()
            rel = (err.norm() / x.float().norm()).item()
            ms = timed(lambda: quant.quantize_int8(x, granularity, group_size, symmetric)) * 1e3
            print(f"{granularity:>12} {str(symmetric):>5} {worst_steps.item():18.3f} {rel:11.2e} {ms:12.2f}")

    eager = timed(lambda: torch.round(x.float() / (x.abs().amax(-1, keepdim=True).float() / 127)).to(torch.int8))
    ours = timed(lambda: quant.scaled_int8_quant(x))
    print(f"per-token quantization: memwarden {ours * 1e3:.2f} ms vs eager PyTorch {eager * 1e3:.2f} ms "
          f"({eager / ours:.1f}x); memory {x.numel() * 2 / 2**20:.0f} MiB -> {q.numel() / 2**20:.0f} MiB + scales")


def demo_planning() -> None:
    from memwarden import estimate, plan

    print("\n== Will it fit? Embedded model configs, no download")
    print(estimate.estimate("llama-3.1-8b", context=32768, batch=4).report())
    print(f"llama-3.1-8b on one 24 GiB GPU: largest context "
          f"{estimate.max_context('llama-3.1-8b', {0: '24GiB'})} tokens (batch 1)")
    print("\n== Balanced expert placement: Mixtral-8x7B on two 48 GiB GPUs")
    print(plan.plan("mixtral-8x7b", max_memory={0: "48GiB", 1: "48GiB"}, reserve="2GiB").report())
    print("\n== DeepSeek-V3 (int4) on eight 80 GiB GPUs")
    print(plan.plan("deepseek-v3", max_memory={i: "80GiB" for i in range(8)}, dtype="int4").report())


def main() -> None:
    print(f"memwarden {memwarden.__version__} on torch {torch.__version__} "
          f"({'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'})")
    demo_int8("cuda" if torch.cuda.is_available() else "cpu")
    demo_planning()


if __name__ == "__main__":
    main()
