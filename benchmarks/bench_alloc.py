"""Allocation throughput and memory overhead: PyTorch's allocators vs memwarden's.

Two traces, replayed in one process:

* ``random``: RMM random_allocations style: allocations of random sizes (uniform up to
  ``--max-size``) under a cap on live bytes, freed in random order;
* ``llm``: LLM-inference shaped: per decoding step and layer, short-lived activation
  tensors (hidden, qkv, attention scores over the growing context, MLP intermediate) and a
  KV cache grown the Hugging Face way (each step allocates K/V one token longer and frees
  the old ones); sequences restart every ``--seq-len`` steps.

Each trace goes through ``torch.empty`` (a) with PyTorch's default CPU allocator and (b)
with memwarden's host allocator installed, both from Python (what user code sees) and from
C++ (``at::empty`` in a loop, no interpreter overhead), and on raw pointers (the
allocators alone: ``c10::GetDefaultCPUAllocator()->raw_allocate`` vs memwarden's core). On a GPU also (c) PyTorch's CUDA
caching allocator and (d) memwarden's CUDA backend, installed globally
(``CUDAPluggableAllocator``, in a child process since it must precede every CUDA
allocation) and scoped through a ``torch.cuda.MemPool`` (there PyTorch's caching allocator
carves tensors from segments memwarden hands it).
Reported: allocations per second (median of ``--repeats``), peak reserved / peak
allocated, and the ratios between allocators.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import environment, write_json  # noqa: E402

import memwarden.alloc as ma  # noqa: E402
from memwarden import _C  # noqa: E402

KiB, MiB = 1024, 1024 * 1024


def random_trace(n_allocs: int, max_size: int, max_live: int, seed: int = 0):
    """ops: slot >= 0 allocates sizes[slot]; -slot-1 frees it. Every slot is freed at the end."""
    rng = random.Random(seed)
    sizes, ops, live, live_bytes, peak = [], [], [], 0, 0
    while len(sizes) < n_allocs:
        size = rng.randint(1, max_size)
        if live and (rng.random() < 0.5 or live_bytes + size > max_live):
            i = rng.randrange(len(live))
            slot = live[i]
            live[i] = live[-1]
            live.pop()
            live_bytes -= sizes[slot]
            ops.append(-slot - 1)
            continue
        sizes.append(size)
        live.append(len(sizes) - 1)
        live_bytes += size
        peak = max(peak, live_bytes)
        ops.append(len(sizes) - 1)
    rng.shuffle(live)
    ops += [-s - 1 for s in live]
    return ops, sizes, peak


def llm_trace(steps: int, layers: int = 8, hidden: int = 2048, heads: int = 16, kv_heads: int = 4,
              batch: int = 4, seq_len: int = 128, elem: int = 2):
    head_dim = hidden // heads
    sizes, ops, live_bytes, peak = [], [], 0, 0
    kv: list[list[int]] = [[] for _ in range(layers)]
    h = None

    def alloc(n):
        nonlocal live_bytes, peak
        sizes.append(n)
        ops.append(len(sizes) - 1)
        live_bytes += n
        peak = max(peak, live_bytes)
        return len(sizes) - 1

    def free(slot):
        nonlocal live_bytes
        ops.append(-slot - 1)
        live_bytes -= sizes[slot]

    for step in range(steps):
        ctx = step % seq_len + 1
        if ctx == 1:
            for layer in kv:
                for s in layer:
                    free(s)
                layer.clear()
        h_prev = h if step else None
        h = alloc(batch * hidden * elem)                                       # embedding
        if h_prev is not None:
            free(h_prev)
        for layer in range(layers):
            tmp = [alloc(batch * hidden * elem)]                              # norm
            tmp.append(alloc(batch * (hidden + 2 * kv_heads * head_dim) * elem))  # qkv
            new_kv = [alloc(batch * kv_heads * ctx * head_dim * elem) for _ in range(2)]  # cat(K), cat(V)
            for s in kv[layer]:
                free(s)
            kv[layer] = new_kv
            tmp.append(alloc(batch * heads * ctx * 4))                         # scores (fp32)
            tmp.append(alloc(batch * heads * ctx * elem))                      # probs
            tmp.append(alloc(batch * hidden * elem))                           # attn out
            tmp.append(alloc(batch * 4 * hidden * elem))                       # mlp up
            tmp.append(alloc(batch * 4 * hidden * elem))                       # mlp act
            h2 = alloc(batch * hidden * elem)                                  # residual
            for s in tmp:
                free(s)
            free(h)
            h = h2
        logits = alloc(batch * 32000 * 4)
        free(logits)
    free(h)
    for layer in kv:
        for s in layer:
            free(s)
    return ops, sizes, peak


def replay_python(ops, sizes, device: str) -> float:
    slots = [None] * len(sizes)
    empty = torch.empty
    u8 = torch.uint8
    start = time.perf_counter()
    for op in ops:
        if op >= 0:
            slots[op] = empty(sizes[op], dtype=u8, device=device)
        else:
            slots[-op - 1] = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_rate(fn, n_allocs: int, repeats: int) -> float:
    fn()  # warm up (cache filled, pages touched by the allocator's own structures)
    samples = []
    for _ in range(repeats):
        gc.collect()
        samples.append(n_allocs / fn())
    return statistics.median(samples)


def memwarden_peaks(device, fn):
    ma.empty_cache(device)
    ma.reset_peak_memory_stats(device)
    fn()
    st = ma.memory_stats(device)
    return st["reserved_bytes.all.peak"], st["allocated_bytes.all.peak"]


def run_cpu(name, ops, sizes, peak_live, repeats):
    n = sum(1 for op in ops if op >= 0)
    res = {"trace": name, "allocations": n, "peak_live_requested": peak_live}
    assert not ma.is_installed("cpu"), "benchmark expects PyTorch's own CPU allocator at start"
    res["torch_cpu_py"] = median_rate(lambda: replay_python(ops, sizes, "cpu"), n, repeats)
    res["torch_cpu_cxx"] = median_rate(lambda: _C.alloc.replay_trace_seconds(ops, sizes), n, repeats)
    res["torch_cpu_raw"] = median_rate(lambda: _C.alloc.replay_raw_seconds(ops, sizes, False), n, repeats)
    res["memwarden_cpu_raw"] = median_rate(lambda: _C.alloc.replay_raw_seconds(ops, sizes, True), n, repeats)
    with ma.use("cpu"):
        res["memwarden_cpu_py"] = median_rate(lambda: replay_python(ops, sizes, "cpu"), n, repeats)
        res["memwarden_cpu_cxx"] = median_rate(lambda: _C.alloc.replay_trace_seconds(ops, sizes), n, repeats)
        reserved, allocated = memwarden_peaks("cpu", lambda: _C.alloc.replay_trace_seconds(ops, sizes))
    ma.empty_cache("cpu")
    res["memwarden_cpu_peak_reserved"] = reserved
    res["memwarden_cpu_peak_allocated"] = allocated
    res["memwarden_cpu_reserved_over_allocated"] = reserved / allocated
    res["memwarden_cpu_reserved_over_requested"] = reserved / peak_live
    res["speedup_py"] = res["memwarden_cpu_py"] / res["torch_cpu_py"]
    res["speedup_cxx"] = res["memwarden_cpu_cxx"] / res["torch_cpu_cxx"]
    res["speedup_raw"] = res["memwarden_cpu_raw"] / res["torch_cpu_raw"]
    return res


def run_cuda(res, ops, sizes, repeats):
    n = res["allocations"]
    dev = "cuda:0"
    res["torch_cuda_py"] = median_rate(lambda: replay_python(ops, sizes, dev), n, repeats)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    replay_python(ops, sizes, dev)
    st = torch.cuda.memory_stats()
    res["torch_cuda_reserved_over_allocated"] = st["reserved_bytes.all.peak"] / st["allocated_bytes.all.peak"]
    if ma.cuda_built():
        with ma.use(dev):
            res["memwarden_mempool_cuda_py"] = median_rate(lambda: replay_python(ops, sizes, dev), n, repeats)
            torch.cuda.reset_peak_memory_stats()
            reserved, _ = memwarden_peaks(dev, lambda: replay_python(ops, sizes, dev))
        # What memwarden reserved against the tensor bytes PyTorch handed out of the pool.
        res["memwarden_mempool_cuda_reserved_over_allocated"] = \
            reserved / torch.cuda.memory_stats()["allocated_bytes.all.peak"]
        res["speedup_mempool_cuda"] = res["memwarden_mempool_cuda_py"] / res["torch_cuda_py"]
    return res


def cuda_global_worker(traces, repeats):
    """Child process: memwarden as PyTorch's CUDA allocator from the first allocation on."""
    ma.install("cuda")
    out = {}
    for name, ops, sizes, _ in traces:
        n = sum(1 for op in ops if op >= 0)
        rate = median_rate(lambda: replay_python(ops, sizes, "cuda:0"), n, repeats)
        reserved, allocated = memwarden_peaks("cuda:0", lambda: replay_python(ops, sizes, "cuda:0"))
        out[name] = {"memwarden_cuda_py": rate, "memwarden_cuda_reserved_over_allocated": reserved / allocated}
    print(json.dumps(out))


def run_cuda_global(argv, results):
    child = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--cuda-global-worker"],
                           capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"the CUDA worker failed:\n{child.stderr[-3000:]}")
    for res, (name, values) in zip(results, json.loads(child.stdout.strip().splitlines()[-1]).items()):
        assert res["trace"] == name
        res.update(values)
        res["speedup_cuda"] = res["memwarden_cuda_py"] / res["torch_cuda_py"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small traces, few repeats (CI smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--allocations", type=int, default=None, help="allocations in the random trace")
    ap.add_argument("--max-size", type=int, default=4 * MiB, help="largest random allocation (bytes)")
    ap.add_argument("--max-live", type=int, default=512 * MiB, help="cap on live bytes of the random trace")
    ap.add_argument("--steps", type=int, default=None, help="decoding steps of the LLM trace")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_alloc.json"))
    ap.add_argument("--cuda-global-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    n_allocs = args.allocations or (5_000 if args.quick else 50_000)
    steps = args.steps or (16 if args.quick else 256)

    traces = [("random", *random_trace(n_allocs, args.max_size, args.max_live)),
              ("llm", *llm_trace(steps))]
    if args.cuda_global_worker:
        return cuda_global_worker(traces, repeats)
    cuda = torch.cuda.is_available()
    results = []
    for name, ops, sizes, peak in traces:
        res = run_cpu(name, ops, sizes, peak, repeats)
        if cuda:
            run_cuda(res, ops, sizes, repeats)
        results.append(res)
    if cuda and ma.cuda_built():
        run_cuda_global(sys.argv[1:] if argv is None else argv, results)
    for res, (name, _, _, peak) in zip(results, traces):
        print(f"\n== {name} trace: {res['allocations']} allocations, peak live {peak / MiB:.1f} MiB")
        print(f"  allocations/s via torch.empty (Python): PyTorch CPU {res['torch_cpu_py']:>12,.0f}   "
              f"memwarden {res['memwarden_cpu_py']:>12,.0f}   x{res['speedup_py']:.2f}")
        print(f"  allocations/s via at::empty (C++):      PyTorch CPU {res['torch_cpu_cxx']:>12,.0f}   "
              f"memwarden {res['memwarden_cpu_cxx']:>12,.0f}   x{res['speedup_cxx']:.2f}")
        print(f"  allocations/s, raw allocator (C++):     PyTorch CPU {res['torch_cpu_raw']:>12,.0f}   "
              f"memwarden {res['memwarden_cpu_raw']:>12,.0f}   x{res['speedup_raw']:.2f}")
        print(f"  memwarden peak reserved / peak allocated: {res['memwarden_cpu_reserved_over_allocated']:.3f}"
              f"   / peak requested: {res['memwarden_cpu_reserved_over_requested']:.3f}"
              "   (PyTorch's CPU allocator keeps no stats: malloc)")
        if "torch_cuda_py" in res:
            print(f"  CUDA allocations/s via torch.empty: PyTorch {res['torch_cuda_py']:,.0f}"
                  + (f"   memwarden {res['memwarden_cuda_py']:,.0f}   x{res['speedup_cuda']:.2f}"
                     if "memwarden_cuda_py" in res else "")
                  + (f"   (MemPool {res['memwarden_mempool_cuda_py']:,.0f}   x{res['speedup_mempool_cuda']:.2f})"
                     if "memwarden_mempool_cuda_py" in res else ""))
            print(f"  CUDA peak reserved / peak allocated: PyTorch {res['torch_cuda_reserved_over_allocated']:.3f}"
                  + (f"   memwarden {res['memwarden_cuda_reserved_over_allocated']:.3f}"
                     if "memwarden_cuda_reserved_over_allocated" in res else "")
                  + (f"   (MemPool {res['memwarden_mempool_cuda_reserved_over_allocated']:.3f})"
                     if "memwarden_mempool_cuda_reserved_over_allocated" in res else ""))
    write_json(args.json, {"benchmark": "alloc", "quick": args.quick, "repeats": repeats,
                           "environment": environment(), "results": results})


if __name__ == "__main__":
    main()
