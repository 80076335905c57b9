"""The latency ``memwarden serve --upstream`` adds, and what it does for a real vLLM under overload.

    PYTHONPATH=python python benchmarks/bench_gateway.py [--quick] [--requests N] [--json PATH]
    PYTHONPATH=python python benchmarks/bench_gateway.py --vllm http://127.0.0.1:8000 [--upstream-model DIR]
    PYTHONPATH=python python benchmarks/bench_gateway.py --vllm-managed [--requests N --rate R --seed S]
        [--cases vllm,reserve,lookahead,lookahead-paced,memwarden,optimistic] [--json PATH] [--plot PATH]

**Latency** (the default, ``--quick``, ``--vllm URL``): the median (and p90) of the same
requests sent straight to the upstream and through the gateway, interleaved, for a text
prompt (the gateway asks the upstream's ``/tokenize`` first), a token-id prompt (counted
locally) and a streamed text prompt (time to the last event). Without ``--vllm`` the
upstream is the fake vLLM of the tests (tests/python/fake_vllm.py, answers at once), so
the figures are the gateway's own cost: admission, counting, the extra hop. With ``--vllm
URL`` it is a real vLLM (the gateway prices its KV from ``--upstream-model``, else its
served name as a hub id), and the figures include how the engine's time varies. Upstream
and gateway run in their own processes; the client is one keep-alive HTTP connection to
each, requests one at a time.

**Overload** (``--vllm-managed``): starts a real vLLM itself -- the CPU build in
.venv-vllm (``scripts/setup-vllm.sh``) on the tiny ``llama-gqa`` model (4 layers, 2 KV
heads of 64, bfloat16: 2 KiB of KV a token) with a 10 MiB KV budget (5,120 tokens, 40
blocks of 128), prefix caching off (the same prompts are sent once per case) -- and
replays one overload trace (:mod:`memwarden.serve.trace`: Poisson arrivals, log-normal
prompt and output lengths, Zipf sessions) against each case: ``vllm`` (the engine
directly) and ``memwarden serve --upstream`` in front of it under the ``reserve``,
``lookahead``, ``memwarden`` and ``optimistic`` admission policies, and ``lookahead-paced``
(``lookahead`` with ``server.upstream_pace``: whole answers paced, not streamed)
(degradation off, so every case is asked for the same work). One vLLM serves every case: the figures of its own are the
deltas of its counters over the case (``vllm:num_preemptions_total``, the
``vllm:request_queue_time_seconds`` and ``vllm:e2e_request_latency_seconds``
histograms), and each case starts once vLLM is idle. Prompts are token ids (the server
has no tokenizer) and every request asks for exactly its drawn output length with
``ignore_eos`` (``replay(exact_lengths=True)``), so the engine does identical work in
every case unless a policy shrinks a request (counted: ``trunc``). Each case's client
(and its gateway) runs in its own process. Then the token-id latency check above runs
against the same vLLM.

Per case: completed, truncated, lost (5xx other than 503, timeouts), rejections by
reason, vLLM's preemptions, goodput (completion tokens of completed requests per second
of the replay), p50/p99 latency of completed requests, vLLM's mean queue time, and the
gateway's mean wait (the client's mean latency less vLLM's mean end-to-end latency).
Ratios against ``vllm``. Goals (issue 15), for vLLM behind memwarden under ``lookahead``
(the policy for an engine that batches continuously): preemptions <= 10 % of vLLM alone,
p99 <= 0.7x, goodput >= 0.95x, 0 lost; the gateway adds < 2 ms at the median.
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

VLLM_PYTHON = os.path.join(ROOT, ".venv-vllm", "bin", "python")
VLLM_MODEL = os.path.join(ROOT, "build", "vllm-models", "llama-gqa")
VLLM_KV_BYTES = 10 * 2**20  # 5,120 tokens of llama-gqa
VLLM_MAX_MODEL_LEN = 1024
VLLM_VOCAB = 2048  # scripts/setup-vllm.sh's tiny models
CASES = ("vllm", "reserve", "lookahead", "lookahead-paced", "memwarden", "optimistic")
GOAL_POLICY = "lookahead"  # the admission policy for an engine that batches continuously: vLLM
# prompt + max_tokens stays within the context of 1024
OVERLOAD_TRACE = dict(prompt_median=200, prompt_max=500, output_median=150, max_tokens=(256, 512), sessions=8)
GATEWAY_ENV = {"MEMWARDEN_DEGRADATION_ENABLED": "false", "MEMWARDEN_ADMISSION_QUEUE_TIMEOUT": "120",
               "MEMWARDEN_ADMISSION_QUEUE_LIMIT": "256", "MEMWARDEN_SERVER_UPSTREAM_POLL_INTERVAL": "0.5"}
# vLLM's own figures, read before and after each case
VLLM_COUNTERS = ("vllm:num_preemptions_total", "vllm:request_queue_time_seconds_sum",
                 "vllm:request_queue_time_seconds_count", "vllm:e2e_request_latency_seconds_sum",
                 "vllm:e2e_request_latency_seconds_count")
REPLAY_TIMEOUT_S = 300.0

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


def _spawn(args: list[str], env: dict, stderr=subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """A child process and the first line it prints (its address)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
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


def measure(direct: str, gateway: str, model: str, requests: int, max_tokens: int, warmup: int,
            cases=("text", "token_ids", "stream_text")) -> list[dict]:
    rows = []
    with httpx.Client(timeout=120) as to_upstream, httpx.Client(timeout=120) as to_gateway:
        for name, body in _cases(model, max_tokens).items():
            if name not in cases:
                continue
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


# ---- overload against a real vLLM (--vllm-managed) -------------------------------------------

def _gateway_command(upstream: str, upstream_model: str, policy: str) -> list[str]:
    return [sys.executable, "-m", "memwarden.cli", "serve", "--port", "0", "--upstream", upstream,
            "--upstream-model", upstream_model, "--policy", policy]


def _start_gateway(upstream: str, upstream_model: str, case: str, env: dict,
                   stderr=subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """The gateway of ``case``: a policy, or ``lookahead-paced`` (``server.upstream_pace``)."""
    policy, _, variant = case.partition("-")
    paced = {"MEMWARDEN_SERVER_UPSTREAM_PACE": "true"} if variant == "paced" else {}
    proc, line = _spawn(_gateway_command(upstream, upstream_model, policy), {**env, **GATEWAY_ENV, **paced}, stderr)
    return proc, "http://" + re.search(r"on http://(\S+)", line).group(1)


def run_case(case: str, upstream: str, upstream_model: str, trace_path: str) -> dict:
    """In this process: the trace replayed against vLLM (``case == "vllm"``) or a gateway
    under the policy ``case`` that this process starts in its own process."""
    from memwarden.serve.trace import TraceRequest, exact_output, replay, summarize

    with open(trace_path) as f:
        trace = [TraceRequest(**r) for r in json.load(f)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")])}
    gateway_proc, base, stats = None, upstream, {}
    log = tempfile.TemporaryFile("w+")  # the gateway's: kept beside the results when a request is lost
    if case != "vllm":
        gateway_proc, base = _start_gateway(upstream, upstream_model, case, env, stderr=log)
    try:
        model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
        outcomes, wall = replay(base, model, trace, vocab_size=VLLM_VOCAB, timeout=REPLAY_TIMEOUT_S,
                                prompt_ids=True, exact_lengths=True)
        if gateway_proc is not None:
            stats = httpx.get(base + "/memory_stats", timeout=10).json()
    finally:
        if gateway_proc is not None:
            gateway_proc.kill()
            gateway_proc.wait()
    summary = summarize(outcomes, wall)
    if summary["lost"] and gateway_proc is not None:
        log.seek(0)
        summary["gateway_log_tail"] = log.read()[-20000:]
    log.close()
    asked = {r.index: exact_output(r) for r in trace}
    summary["truncated"] = sum(o.status == "completed" and o.completion_tokens < asked[o.index] for o in outcomes)
    summary["asked_tokens"] = sum(asked.values())
    summary.update(case=case, gateway_rejections=stats.get("rejections_by_reason", {}),
                   gateway_budget=stats.get("kv_budget_source"), outcomes=[o.to_dict() for o in outcomes])
    return summary


def _wait_idle(server, timeout: float = 120) -> None:
    """Until vLLM runs and queues nothing (what a timed-out client left behind has finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = server.metric_values("vllm:num_requests_running", "vllm:num_requests_waiting")
        if not any(busy.values()):
            return
        time.sleep(0.5)
    raise TimeoutError("vLLM did not become idle between cases")


def _run_measured(server, case: str, trace_path: str, tmp: str, count: int) -> dict:
    """One case in its own process, with vLLM's counters read before and after (vLLM idle at both)."""
    _wait_idle(server)
    before = server.metric_values(*VLLM_COUNTERS)
    out = os.path.join(tmp, f"{case}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--upstream", server.url,
           "--upstream-model", VLLM_MODEL, "--trace", trace_path, "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=REPLAY_TIMEOUT_S + 600)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"bench_gateway: the {case} case failed")
    _wait_idle(server)
    delta = {k: v - before[k] for k, v in server.metric_values(*VLLM_COUNTERS).items()}
    with open(out) as f:
        r = json.load(f)
    r["preemptions"] = int(delta["vllm:num_preemptions_total"])
    queued = delta["vllm:request_queue_time_seconds_count"]
    r["vllm_queue_mean_s"] = delta["vllm:request_queue_time_seconds_sum"] / queued if queued else None
    e2e = delta["vllm:e2e_request_latency_seconds_count"]
    r["vllm_e2e_mean_s"] = delta["vllm:e2e_request_latency_seconds_sum"] / e2e if e2e else None
    done = [o["latency"] for o in r["outcomes"] if o["status"] == "completed"]
    r["gateway_wait_mean_s"] = (statistics.mean(done) - r["vllm_e2e_mean_s"]
                                if case != "vllm" and done and r["vllm_e2e_mean_s"] is not None else None)
    print(f"  {case}: {r['completed']}/{count} completed, {r['preemptions']} preemptions, "
          f"{r['wall_s']:.1f} s", flush=True)
    return r


def _overhead(server, requests: int, max_tokens: int) -> list[dict]:
    """The latency check's token-id case against ``server``, through a memwarden gateway."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")])}
    gateway_proc, gateway = _start_gateway(server.url, VLLM_MODEL, "memwarden", env)
    try:
        return measure(server.url, gateway, server.model, requests, max_tokens, warmup=10, cases=("token_ids",))
    finally:
        gateway_proc.kill()
        gateway_proc.wait()


def _keep_log(server, json_path: str) -> None:
    """vLLM's log beside the JSON, for a failed case or lost requests."""
    saved = os.path.splitext(os.path.abspath(json_path))[0] + ".vllm.log"
    os.makedirs(os.path.dirname(saved), exist_ok=True)
    with open(saved, "w") as f:
        f.write(server.log())
    print(f"bench_gateway: vLLM's log is in {saved}", file=sys.stderr)


def managed(args) -> int:
    from memwarden.serve.trace import make_trace
    from memwarden.serve.vllm_process import vllm_server

    if not os.path.isfile(VLLM_PYTHON) or not os.path.isdir(VLLM_MODEL):
        raise SystemExit(f"bench_gateway: --vllm-managed needs {VLLM_PYTHON} and {VLLM_MODEL}: "
                         f"run scripts/setup-vllm.sh")
    count = args.requests or 160
    trace = make_trace(count, args.rate, args.seed, **OVERLOAD_TRACE)
    results, started = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, \
            vllm_server(VLLM_PYTHON, VLLM_MODEL, VLLM_KV_BYTES, max_model_len=VLLM_MAX_MODEL_LEN,
                        extra_args=("--no-enable-prefix-caching",), cwd=ROOT) as server:
        print(f"vLLM healthy at {server.url} after {time.perf_counter() - started:.0f} s", flush=True)
        cache = server.metric_labels("vllm:cache_config_info")
        for _ in range(3):  # warm-up: the first requests compile and allocate
            server.complete(list(range(3, 203)), max_tokens=16)
        trace_path = os.path.join(tmp, "trace.json")
        with open(trace_path, "w") as f:
            json.dump([r.to_dict() for r in trace], f)
        try:
            for case in args.cases.split(","):
                results[case] = _run_measured(server, case, trace_path, tmp, count)
            latency = _overhead(server, args.latency_requests, args.max_tokens)
        except (OSError, SystemExit):
            _keep_log(server, args.json)
            raise
        if any(r["lost"] for r in results.values()):
            _keep_log(server, args.json)
    elapsed = time.perf_counter() - started
    print(f"trace: {count} requests at {args.rate}/s (seed {args.seed}); vLLM {os.path.basename(VLLM_MODEL)}, "
          f"KV {cache['kv_cache_size_tokens']} tokens ({cache['num_gpu_blocks']} blocks of {cache['block_size']}); "
          f"{elapsed:.0f} s in all")
    print(overload_table(results))
    row = latency[0]
    print(f"gateway overhead, token-id prompt, {row['max_tokens']} tokens: median {row['overhead_median_ms']:.2f} ms "
          f"(direct {row['direct_median_ms']:.2f}, gateway {row['gateway_median_ms']:.2f}; {row['requests']} requests)")
    reached = overload_goals(results, row)
    for goal, ok in reached.items():
        print(f"  {'met ' if ok else 'MISS'} {goal}")
    payload = {"benchmark": "bench_gateway", "mode": "vllm-managed", "python": platform.python_version(),
               "machine": platform.machine(), "cpus": os.cpu_count(), "elapsed_s": elapsed,
               "vllm": {"model": VLLM_MODEL, "kv_cache_memory_bytes": VLLM_KV_BYTES, "cache_config": cache},
               "trace": {"requests": count, "rate": args.rate, "seed": args.seed, **OVERLOAD_TRACE},
               "gateway_env": GATEWAY_ENV, "results": results, "latency": latency, "goals": reached}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {args.json}")
    if args.plot:
        try:
            overload_plot(results, args.plot)
            print(f"plot: {args.plot}")
        except ImportError as e:
            print(f"no plot: {e}")
    return 0


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def overload_table(results: dict) -> str:
    base = results.get("vllm")
    head = (f"{'case':<15} {'done':>5} {'trunc':>5} {'lost':>4} {'rej':>4} {'preempt':>7} {'x vllm':>6} "
            f"{'goodput':>8} {'x vllm':>6} {'p50 s':>6} {'p99 s':>6} {'x vllm':>6} {'vq s':>5} {'gw s':>5}  rejections")
    lines = [head, "-" * len(head)]
    for case, r in results.items():
        def ratio(key):
            return _fmt(r[key] / base[key]) if base and base.get(key) and r.get(key) is not None else "-"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["rejected_by_reason"].items())) or "-"
        lines.append(f"{case:<15} {r['completed']:>5} {r['truncated']:>5} {r['lost']:>4} {r['rejected']:>4} "
                     f"{r['preemptions']:>7} {ratio('preemptions'):>6} {r['goodput_tok_s']:>8.1f} "
                     f"{ratio('goodput_tok_s'):>6} {_fmt(r['latency_p50_s']):>6} {_fmt(r['latency_p99_s']):>6} "
                     f"{ratio('latency_p99_s'):>6} {_fmt(r['vllm_queue_mean_s']):>5} "
                     f"{_fmt(r['gateway_wait_mean_s']):>5}  {reasons}")
    lines.append("vq: vLLM's mean queue time; gw: the gateway's mean wait (client latency less vLLM's end-to-end)")
    return "\n".join(lines)


def overload_goals(results: dict, latency_row: dict) -> dict:
    """Issue 15's goals for vLLM behind memwarden under :data:`GOAL_POLICY`."""
    base, mw = results.get("vllm"), results.get(GOAL_POLICY)
    if base is None or mw is None:
        return {}
    p99, base_p99 = mw["latency_p99_s"], base["latency_p99_s"]
    return {
        f"{GOAL_POLICY}_preemptions_at_most_10pct_of_vllm": mw["preemptions"] <= 0.1 * base["preemptions"],
        f"{GOAL_POLICY}_p99_at_most_0.7x_vllm": p99 is not None and base_p99 is not None and p99 <= 0.7 * base_p99,
        f"{GOAL_POLICY}_goodput_at_least_0.95x_vllm": mw["goodput_tok_s"] >= 0.95 * base["goodput_tok_s"],
        f"{GOAL_POLICY}_none_lost": mw["lost"] == 0,
        "gateway_adds_under_2ms_median": latency_row["overhead_median_ms"] < 2.0,
    }


def overload_plot(results: dict, path: str) -> None:
    from memwarden.serve.trace import replay_figure

    fig = replay_figure(results)
    outcome = fig.axes[1]
    for i, case in enumerate(results):
        outcome.text(i, results[case]["requests"], f"{results[case]['preemptions']} preempted", ha="center",
                     va="bottom")
    outcome.set(ylim=(0, 1.25 * max(r["requests"] for r in results.values())),
                title="outcomes, and vLLM's preemptions")
    outcome.legend(loc="upper right", ncols=3, fontsize="small")
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: the fake upstream, 200 requests a case")
    parser.add_argument("--requests", type=int, default=None,
                        help="timed requests per case and path (default 1000); --vllm-managed: the trace's (160)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--vllm", default=None, metavar="URL", help="a real vLLM instead of the fake upstream")
    parser.add_argument("--upstream-model", default=None,
                        help="with --vllm: the model's folder, config.json or embedded name (prices its KV)")
    parser.add_argument("--json", default=None, help="default benchmarks/results/bench_gateway[_vllm].json")
    parser.add_argument("--vllm-managed", action="store_true",
                        help="start a real vLLM (.venv-vllm) and replay the overload trace against each case")
    parser.add_argument("--rate", type=float, default=6.0, help="--vllm-managed: arrivals a second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", default=",".join(CASES), help="--vllm-managed: vllm and gateway policies")
    parser.add_argument("--latency-requests", type=int, default=100,
                        help="--vllm-managed: timed requests of the overhead check")
    parser.add_argument("--plot", default=os.path.join(HERE, "results", "bench_gateway_vllm.png"),
                        help="--vllm-managed: the plot ('' for none)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child: replay one case
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        with open(args.out, "w") as f:
            json.dump(run_case(args.case, args.upstream, args.upstream_model, args.trace), f)
        return
    if args.vllm_managed:
        args.json = args.json or os.path.join(HERE, "results", "bench_gateway_vllm.json")
        managed(args)
        return
    args.json = args.json or os.path.join(HERE, "results", "bench_gateway.json")
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
