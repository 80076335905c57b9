"""Overload: one trace replayed against the live ``memwarden serve`` on loopback under each
admission policy -- admit-all, ``reserve`` (TGI-style), ``optimistic`` (vLLM-style, with
preemption by recompute) and memwarden's default -- in one run, each policy in its own
process, the memory budget enforced for real.

    python benchmarks/bench_serve.py [--quick] [--requests N --rate R --seed S] [--json PATH] [--plot PATH]

The trace (:mod:`memwarden.serve.trace`): Poisson arrivals, log-normal prompt (median 120
tokens, up to 900) and output lengths (median 40; clients ask for 128 or 256), 8 sessions
of Zipf popularity; the embedded tiny model (512 KV bytes a token) at temperature 1,
output lengths steered by a logit bias on EOS. The server's KV budget is ``--budget``
(default 1 MiB = 2048 tokens), and memwarden's host allocator is torch's CPU allocator in
the server process with a memory limit of what is reserved at start + 1.25 x the KV budget
(a request's pages grow by a quarter at a time) + the activations of the longest prompt's
prefill (the engine runs one prefill at a time) + ``max_concurrency`` (32) x (a page and
a decode step's activations), measured there, in whole 2 MiB segments plus one (the
allocator's small-tensor segments, and their fragmentation) -- so running out is a real
OutOfMemoryError.

Degradation is off unless ``--degradation``: it changes what is generated (shorter, less
random answers under pressure), so with it the policies would not serve the same work.

Per policy: completed, truncated (an answer stopped before the model ended it and before
the ``max_tokens`` asked: shrunk or cut short), lost (5xx other than 503, timeouts), rejected by reason, OOMs
(memwarden's allocator), preemptions, goodput (completion tokens of completed requests
per second of the replay), p50/p99 latency of completed requests, peak memory. Ratios:
goodput against the better of reserve/optimistic, p99 against optimistic. Goals (issue):
admit-all OOMs; memwarden 0 OOMs and 0 lost, goodput >= the better of reserve and
optimistic, p99 below optimistic's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


POLICIES = ("admit_all", "reserve", "optimistic", "memwarden")
MAX_CONCURRENCY = 32
GROWTH = 1.25  # a request's pages grow by a quarter at a time
SEGMENT = 2 << 20  # the allocator reserves small tensors in segments of 2 MiB
TRACE = dict(prompt_median=150, prompt_max=600, output_median=100, max_tokens=(256, 512))


def serve_one(policy: str, trace_path: str, budget: str, queue_timeout: float, degrade: bool) -> dict:
    """In this process: the server under ``policy`` with the allocator limit, the trace replayed."""
    import torch

    import memwarden.alloc as alloc
    from memwarden._units import parse_bytes
    from memwarden.controller.config import MemwardenConfig
    from memwarden.kv import PagedCache
    from memwarden.serve.server import Server
    from memwarden.serve.trace import TraceRequest, replay, summarize

    torch.set_num_threads(1)  # requests run in threads; intra-op threads would oversubscribe
    with open(trace_path) as f:
        trace = [TraceRequest(**r) for r in json.load(f)]
    config = MemwardenConfig.load(env={}, overrides={
        "server.port": 0, "server.max_memory": budget, "server.max_concurrency": MAX_CONCURRENCY,
        "admission.policy": policy, "admission.queue_timeout": queue_timeout,
        "degradation.enabled": degrade})
    server = Server(config)
    engine = server.engine
    alloc.install("cpu")
    start_bytes = alloc.memory_allocated("cpu")
    longest = max(r.prompt_tokens for r in trace)
    with torch.no_grad():  # the activations of the longest prefill (one runs at a time) and of a decode step
        cache = PagedCache(engine.model.config, compress="never")
        alloc.reset_peak_memory_stats("cpu")
        engine.model(torch.zeros(1, longest, dtype=torch.long), past_key_values=cache, use_cache=True,
                     logits_to_keep=1)
        prefill = alloc.max_memory_allocated("cpu") - start_bytes - cache.store.nbytes
        before = alloc.memory_allocated("cpu")
        alloc.reset_peak_memory_stats("cpu")
        engine.model(torch.zeros(1, 1, dtype=torch.long), past_key_values=cache, use_cache=True)
        decode = alloc.max_memory_allocated("cpu") - before
        del cache
    alloc.empty_cache("cpu")  # the measurement's cached segments are not the server's
    page = 16 * engine.bytes_per_token  # a request's last page may be partly filled
    need = (alloc.memory_reserved("cpu") + int(GROWTH * parse_bytes(budget)) + MAX_CONCURRENCY * (page + decode)
            + prefill)
    limit = (-(-need // SEGMENT) + 1) * SEGMENT  # whole segments, and one for fragmentation
    alloc.set_memory_limit("cpu", limit)
    alloc.reset_peak_memory_stats("cpu")
    ooms_before = alloc.memory_stats("cpu")["num_ooms"]
    thread = server.start()
    try:
        outcomes, wall = replay(f"http://127.0.0.1:{server.port}", engine.name, trace, eos_token=engine.eos,
                                vocab_size=engine.vocab_size, timeout=120.0)
        stats = server.controller.memory_stats()
    finally:
        server.stop(thread)
    summary = summarize(outcomes, wall)
    asked = {r.index: r.max_tokens for r in trace}
    summary["truncated"] = sum(o.status == "completed" and o.finish_reason == "length"
                               and o.completion_tokens < asked[o.index] for o in outcomes)
    summary.update(policy=policy, ooms=alloc.memory_stats("cpu")["num_ooms"] - ooms_before,
                   preemptions=stats["preempted_count"], cut_short=stats["cut_short_count"],
                   server_rejections=stats["rejections_by_reason"],
                   peak_bytes=alloc.max_memory_allocated("cpu") - start_bytes, limit_bytes=limit,
                   peak_reserved_bytes=alloc.max_memory_reserved("cpu"),
                   outcomes=[o.to_dict() for o in outcomes])
    return summary


def median_run(runs: list[dict]) -> dict:
    """The median of every figure over repeated runs (the plot draws the outcomes of the run
    of median goodput); OOMs and lost requests summed, since one is already too many."""
    middle = sorted(runs, key=lambda r: r["goodput_tok_s"])[len(runs) // 2]
    merged = dict(middle, repeats=len(runs))
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs if r[key] is not None]
            merged[key] = (sum(values) if key in ("ooms", "lost") else statistics.median(values)) if values else None
    return merged


def table(results: dict) -> str:
    best_other = max((results[p]["goodput_tok_s"] for p in ("reserve", "optimistic") if p in results), default=None)
    optimistic_p99 = results.get("optimistic", {}).get("latency_p99_s")
    head = (f"{'policy':<11} {'done':>5} {'trunc':>5} {'lost':>5} {'rej':>4} {'OOMs':>5} {'preempt':>7} {'goodput':>8} "
            f"{'x best':>6} {'p50 s':>6} {'p99 s':>6} {'x opt':>6} {'peak MiB':>8}  rejections")
    lines = [head, "-" * len(head)]
    for policy, r in results.items():
        ratio = f"{r['goodput_tok_s'] / best_other:.2f}" if best_other else "-"
        p99 = r["latency_p99_s"]
        p99_ratio = f"{p99 / optimistic_p99:.2f}" if p99 is not None and optimistic_p99 else "-"
        fmt = (lambda v: f"{v:.2f}" if v is not None else "-")
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["rejected_by_reason"].items())) or "-"
        lines.append(f"{policy:<11} {r['completed']:>5g} {r['truncated']:>5g} {r['lost']:>5g} {r['rejected']:>4g} "
                     f"{r['ooms']:>5g} {r['preemptions']:>7g} {r['goodput_tok_s']:>8.1f} {ratio:>6} {fmt(r['latency_p50_s']):>6} "
                     f"{fmt(p99):>6} {p99_ratio:>6} {r['peak_bytes'] / 2**20:>8.2f}  {reasons}")
    return "\n".join(lines)


def goals(results: dict) -> dict:
    mw = results.get("memwarden")
    if mw is None or not {"reserve", "optimistic", "admit_all"} <= results.keys():
        return {}
    best = max(results["reserve"]["goodput_tok_s"], results["optimistic"]["goodput_tok_s"])
    opt_p99 = results["optimistic"]["latency_p99_s"]
    return {
        "admit_all_runs_out": results["admit_all"]["ooms"] > 0,
        "memwarden_no_ooms": mw["ooms"] == 0,
        "memwarden_none_lost": mw["lost"] == 0,
        "memwarden_goodput_at_least_the_best": mw["goodput_tok_s"] >= best,
        "memwarden_p99_below_optimistic": opt_p99 is not None and mw["latency_p99_s"] is not None
        and mw["latency_p99_s"] < opt_p99,
    }


def plot(results: dict, path: str) -> None:
    from memwarden.serve.trace import replay_figure

    fig = replay_figure(results)
    outcome = fig.axes[1]
    outcome.set(title="outcomes; OOMs " + " / ".join(f"{results[p]['ooms']:g}" for p in results))
    outcome.legend()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short trace (CI smoke run)")
    parser.add_argument("--requests", type=int, help="requests in the trace (default 120, --quick 12)")
    parser.add_argument("--rate", type=float, default=4.0, help="arrivals a second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", default="1MiB", help="the server's KV budget")
    parser.add_argument("--queue-timeout", type=float, default=60.0)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--repeats", type=int, default=1, help="runs of each policy; the table shows medians")
    parser.add_argument("--degradation", action="store_true",
                        help="degrade under pressure too (off: every policy serves the same requests as asked)")
    parser.add_argument("--json", default="benchmarks/results/bench_serve.json")
    parser.add_argument("--plot", default="benchmarks/results/bench_serve.png")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: serve one policy
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        with open(args.out, "w") as f:
            json.dump(serve_one(args.one, args.trace, args.budget, args.queue_timeout, args.degradation), f)
        return 0

    from memwarden.serve.trace import make_trace

    count = args.requests or (12 if args.quick else 120)
    trace = make_trace(count, args.rate, args.seed, **TRACE)
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = os.path.join(tmp, "trace.json")
        with open(trace_path, "w") as f:
            json.dump([r.to_dict() for r in trace], f)
        runs: dict[str, list[dict]] = {policy: [] for policy in args.policies.split(",")}
        for repeat in range(args.repeats):  # policies interleaved, so a slow spell hits them alike
            for policy in runs:
                out = os.path.join(tmp, f"{policy}-{repeat}.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--one", policy, "--trace", trace_path, "--out",
                       out, "--budget", args.budget, "--queue-timeout", str(args.queue_timeout)] + \
                    (["--degradation"] if args.degradation else [])
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
                if proc.returncode != 0:
                    print(proc.stdout, proc.stderr, file=sys.stderr)
                    raise SystemExit(f"bench_serve: the {policy} run failed")
                with open(out) as f:
                    runs[policy].append(json.load(f))
                run = runs[policy][-1]
                print(f"  {policy} #{repeat + 1}: {run['completed']}/{count} completed in {run['wall_s']:.1f} s, "
                      f"goodput {run['goodput_tok_s']:.1f} tok/s, p99 {run['latency_p99_s'] or 0:.2f} s", flush=True)
    results = {policy: median_run(policy_runs) for policy, policy_runs in runs.items()}
    print(f"trace: {count} requests at {args.rate}/s (seed {args.seed}), KV budget {args.budget}, "
          f"max_concurrency {MAX_CONCURRENCY}")
    print(table(results))
    reached = goals(results)
    for goal, ok in reached.items():
        print(f"  {'met ' if ok else 'MISS'} {goal}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"trace": {"requests": count, "rate": args.rate, "seed": args.seed, "budget": args.budget,
                             "repeats": args.repeats, "max_concurrency": MAX_CONCURRENCY},
                   "results": results, "goals": reached}, f, indent=1)
    if args.plot:
        try:
            plot(results, args.plot)
            print(f"plot: {args.plot}")
        except ImportError as e:
            print(f"no plot: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
