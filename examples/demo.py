"""memwarden demo on embedded defaults: no downloads, no GPU needed.

    python examples/demo.py
"""
from __future__ import annotations

import importlib.util
import pathlib
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


def demo_paged_kv(device: str) -> None:
    from memwarden import kv

    heads, head_size, block_size, num_blocks = 8, 128, 16, 64
    print(f"\n== Paged KV cache on {device}: INT8 pages of {block_size} tokens x {heads} heads x {head_size}, "
          "four requests sharing a 48-token system prompt")
    manager = kv.KVCacheManager(num_blocks, block_size)
    key_cache = torch.zeros(num_blocks, block_size, heads, head_size, dtype=torch.int8, device=device)
    value_cache = torch.zeros_like(key_cache)
    scale = torch.tensor([4.0 / 127], device=device)  # static INT8 scale for values within +-4
    system_prompt = list(range(100, 148))
    written = {}  # token position in the prompt -> the K row written for it (the last request's view)
    for request in range(4):
        prompt = system_prompt + [1000 * (request + 1) + t for t in range(20)]
        cached = manager.add_sequence(request, prompt)
        new = len(prompt) - cached
        key = torch.randn(new, heads, head_size, device=device).clamp(-4, 4).half()
        slots = torch.tensor(manager.slot_mapping(request, cached, len(prompt)), device=device)
        kv.reshape_and_cache_flash(key, torch.zeros_like(key), key_cache, value_cache, slots, "int8", scale, scale)
        for i in range(new):
            written[cached + i] = key[i]
        print(f"  request {request}: {len(prompt)} prompt tokens, {cached:2d} found in the prefix cache, "
              f"{new} written")
    table = torch.tensor([manager.block_table(3)], device=device)
    keys, _ = kv.gather_kv(key_cache, value_cache, table, torch.tensor([68], device=device), "int8",
                           out_dtype=torch.float16, k_scale=scale, v_scale=scale)
    expected = torch.stack([written[i] for i in range(68)])
    steps = ((keys.float() - expected.float()).abs().max() / scale).item()
    stats = manager.stats()
    print(f"  blocks in use {stats['num_blocks'] - stats['num_free_blocks']} of {num_blocks} "
          f"(without sharing: {4 * -(-68 // block_size)}); prefix hit rate {stats['prefix_hit_rate']:.0%}; "
          f"request 3 read back through its block table within {steps:.2f} quantization steps")


def demo_allocator() -> None:
    import memwarden.alloc as ma

    MiB = 1 << 20
    print("\n== Caching allocator: a 256 MiB 'device' emulated on host memory, with an out-of-memory callback")
    with ma.use("cpu", memory_limit="256 MiB"):
        pages = [torch.ones(64 * MiB, dtype=torch.uint8) for _ in range(3)]  # e.g. cached KV pages

        def give_back(nbytes: int) -> bool:
            print(f"  out of memory for {nbytes / MiB:.0f} MiB: the callback drops a 64 MiB page")
            return bool(pages) and pages.pop() is not None

        with ma.on_oom(give_back, "cpu"):
            activations = torch.empty(100 * MiB, dtype=torch.uint8)
        stats = ma.memory_stats("cpu")
        print(f"  allocated {stats['allocated_bytes.all.current'] / MiB:.0f} MiB, reserved "
              f"{stats['reserved_bytes.all.current'] / MiB:.0f} MiB, peak {stats['reserved_bytes.all.peak'] / MiB:.0f} "
              f"MiB, {stats['num_alloc_retries']} retries, {stats['num_oom_callbacks']} callback(s); "
              f"{len(pages)} pages kept")
        del activations, pages
    ma.empty_cache("cpu")


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


def demo_generate() -> None:
    """examples/hf_generate_paged_int8.py on a small random Llama, smaller."""
    path = pathlib.Path(__file__).with_name("hf_generate_paged_int8.py")
    spec = importlib.util.spec_from_file_location("hf_generate_paged_int8", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    print("\n== generate inside a KV budget: transformers + memwarden.kv.PagedCache (INT8 pages, host offload; attention reads the pages in place)")
    example.main(["--prompt-tokens", "48", "--new-tokens", "48"])


def demo_serve() -> None:
    """memwarden serve on loopback for a few requests, through the openai-style HTTP API."""
    import json
    import urllib.error
    import urllib.request

    from memwarden.controller.config import MemwardenConfig
    from memwarden.serve.server import Server

    print("\n== memwarden serve: an OpenAI-compatible server under the memory controller (embedded tiny model)")
    config = MemwardenConfig.load(env={}, overrides={"server.port": 0, "server.max_memory": "1MiB",
                                                     "sessions.per_session_limit": "128KiB"})
    server = Server(config)
    thread = server.start()
    base = f"http://127.0.0.1:{server.port}"
    print(server.describe())

    def post(session: str, prompt: str, max_tokens: int):
        request = urllib.request.Request(base + "/v1/completions", headers={"Content-Type": "application/json",
                                                                             "X-Session-ID": session},
                                         data=json.dumps({"prompt": prompt, "max_tokens": max_tokens}).encode())
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        status, body = post("alice", "Hello", 8)
        print(f"POST /v1/completions (session alice): {status}, {body['usage']['completion_tokens']} tokens")
        status, body = post("bob", "x" * 399, 16)  # 400 tokens at 512 B each: over bob's 128 KiB
        print(f"POST /v1/completions (session bob, 400 tokens): {status} {body['error']['code']}: "
              f"{body['error']['message']}")
        with urllib.request.urlopen(base + "/memory_stats", timeout=30) as r:
            stats = json.loads(r.read())
        print(f"/memory_stats: active_sessions {stats['active_sessions']}, rejected_count {stats['rejected_count']}, "
              f"total_kv_mb {stats['total_kv_mb']:.2f}, pressure {stats['pressure_level']}")
    finally:
        server.stop(thread)


def main() -> None:
    print(f"memwarden {memwarden.__version__} on torch {torch.__version__} "
          f"({'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    demo_int8(device)
    demo_paged_kv(device)
    demo_allocator()
    demo_planning()
    demo_generate()
    demo_serve()


if __name__ == "__main__":
    main()
