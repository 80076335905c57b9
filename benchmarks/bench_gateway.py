"""What does ``memwarden serve --upstream`` add to a request's latency? The median (and p90)
of the same requests sent straight to the upstream and through the gateway, interleaved,
for a text prompt (the gateway asks the upstream's ``/tokenize`` first), a token-id prompt
(counted locally) and a streamed text prompt (time to the last event).

    PYTHONPATH=python python benchmarks/bench_gateway.py [--quick] [--requests N] [--json PATH]
    PYTHONPATH=python python benchmarks/bench_gateway.py --vllm http://127.0.0.1:8000 [--upstream-model DIR]

Without ``--vllm`` the upstream is the fake vLLM of the tests (tests/python/fake_vllm.py,
answers at once), so the figures are the gateway's own cost: admission, counting, the
extra hop. With ``--vllm URL`` it is a real vLLM (the gateway prices its KV from
``--upstream-model``, else its served name as a hub id), and the figures include how
the engine's time varies. Upstream and gateway run in their own processes; the client is
one keep-alive HTTP connection to each, requests one at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(ROOT, "python"))

import httpx2 as httpx  # noqa: E402

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
              "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}
FAKE_UPSTREAM = """
import sys, time
sys.path.insert(0, {tests!r})
from fake_vllm import FakeVLLM
fake = FakeVLLM().start()
print(fake.url, flush=True)
while True:
    time.sleep(3600)
"""


def _spawn(args: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    """A child process and the first line it prints (its address)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise RuntimeError(f"{args[:4]} exited before it listened")
    return proc, line


def _cases(model: str, max_tokens: int) -> dict:
    text = {"model": model, "prompt": "The memory controller admits this request", "max_tokens": max_tokens,
            "temperature": 0}
    return {"text": text, "token_ids": {**text, "prompt": list(range(1, 17))}, "stream_text": {**text, "stream": True}}


def _timed(client: httpx.Client, url: str, body: dict) -> float:
    start = time.perf_counter()
    if body.get("stream"):
        with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            for _ in response.iter_lines():
                pass
    else:
        client.post(url, json=body).raise_for_status()
    return time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(direct: str, gateway: str, model: str, requests: int, max_tokens: int, warmup: int) -> list[dict]:
    rows = []
    with httpx.Client(timeout=120) as to_upstream, httpx.Client(timeout=120) as to_gateway:
        for name, body in _cases(model, max_tokens).items():
            times = {"direct": [], "gateway": []}
            for i in range(warmup + requests):
                pair = ((to_upstream, direct, "direct"), (to_gateway, gateway, "gateway"))
                for client, base, kind in pair if i % 2 else pair[::-1]:  # alternate who goes first
                    elapsed = _timed(client, base + "/v1/completions", body)
                    if i >= warmup:
                        times[kind].append(elapsed)
            d, g = statistics.median(times["direct"]), statistics.median(times["gateway"])
            rows.append({"case": name, "requests": requests, "max_tokens": max_tokens,
                         "direct_median_ms": d * 1e3, "gateway_median_ms": g * 1e3, "overhead_median_ms": (g - d) * 1e3,
                         "direct_p90_ms": _percentile(times["direct"], 0.9) * 1e3,
                         "gateway_p90_ms": _percentile(times["gateway"], 0.9) * 1e3})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: the fake upstream, 200 requests a case")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per case and path (default 1000)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--vllm", default=None, metavar="URL", help="a real vLLM instead of the fake upstream")
    parser.add_argument("--upstream-model", default=None,
                        help="with --vllm: the model's folder, config.json or embedded name (prices its KV)")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "bench_gateway.json"))
    args = parser.parse_args()
    requests = args.requests or (200 if args.quick else 1000)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")])}

    children = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            upstream_model = args.upstream_model
            if args.vllm is None:
                fake, line = _spawn([sys.executable, "-c", FAKE_UPSTREAM.format(tests=os.path.join(ROOT, "tests",
                                                                                                   "python"))], env)
                children.append(fake)
                upstream = line.strip()
                upstream_model = os.path.join(scratch, "config.json")
                with open(upstream_model, "w") as f:
                    json.dump(TINY_LLAMA, f)
            else:
                upstream = args.vllm.rstrip("/")
            command = [sys.executable, "-m", "memwarden.cli", "serve", "--port", "0", "--upstream", upstream]
            if upstream_model is not None:
                command += ["--upstream-model", upstream_model]
            gateway_proc, line = _spawn(command, env)
            children.append(gateway_proc)
            gateway = "http://" + re.search(r"on http://(\S+)", line).group(1)
            model = httpx.get(upstream + "/v1/models", timeout=10).json()["data"][0]["id"]
            rows = measure(upstream, gateway, model, requests, args.max_tokens, warmup=max(10, requests // 20))
    finally:
        for child in children:
            child.kill()
            child.wait()

    print(f"{'case':<12} {'direct':>10} {'gateway':>10} {'overhead':>10} {'gateway p90':>12}   (medians, ms)")
    for row in rows:
        print(f"{row['case']:<12} {row['direct_median_ms']:>10.2f} {row['gateway_median_ms']:>10.2f} "
              f"{row['overhead_median_ms']:>10.2f} {row['gateway_p90_ms']:>12.2f}")
    payload = {"benchmark": "bench_gateway", "upstream": "vllm " + args.vllm if args.vllm else "fake (tests/python)",
               "quick": args.quick, "python": platform.python_version(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
