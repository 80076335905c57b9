"""Several models in one memory: memwarden's swap policy against an Ollama-like one, plain
LRU and never-unloading, on the live server over loopback, all measured in one run; then
the offloader and the weight parking against the machine's own copy bandwidth.

    python benchmarks/bench_models.py [--quick] [--repeats N] [--json PATH]

Policies. Three embedded models (``memwarden-tiny-random``, ``-small-``, ``-base-``: 0.41,
4.57 and 12.02 MiB of float32 weights) under a 12.5 MiB weights budget (tiny fits beside
either other, small and base do not fit together). On this CPU the device is memwarden's
host allocator limited to 16 MiB (``server.device_limit``: the weights budget and room
for KV and activations), so a policy that never unloads meets a real out-of-memory error.
Requests (4 new greedy tokens each) arrive as a Poisson process; the model a request
names follows a Zipf law (exponent 1.2) whose ranking shifts every phase (small first,
then base, then tiny). The same trace is replayed open-loop against a fresh server per
policy: ``memwarden`` (demand per byte with a half-life, minimum residency), ``ollama``
(first idle by name, at most 3 loaded, keep-alive 300 s as Ollama's default), ``lru`` and
``never``. Per policy: swaps (models brought onto the device after the start), bytes
moved (onto and off the device), p50/p99 latency from each request's arrival, goodput
(requests answered per second of trace), OOMs and other refusals; the ratios are
memwarden's over each baseline's. A short warm-up replay comes first (not counted). With
``--repeats N`` the policies are replayed N times, interleaved, each repeat starting with
the next policy, and each figure is the median of its runs (OOMs and refusals: summed);
``pooled`` is the p99 of all runs' requests together, which the p99 goal compares (a
run's p99 is its third-worst request, and moves by half from run to run).

Offloader. A larger Llama (hidden 512, 8 layers; --quick 4) in memwarden's pool:
``AutomaticOffloader`` moves half its layers to host memory; peak pool bytes and forward
throughput with and without, and the offload/restore bandwidth (median of a few cycles)
against a plain copy of the same bytes between numpy (pageable) memory and the pool (a
CPU has no pinned memory: pageable <-> pool stands in for pageable <-> pinned). Parking:
the latency of a request whose model is loaded, parked in host memory (a copy back) and
unloaded (built again).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # _timing; memwarden is the installed one (its extension built)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _timing import environment, write_json  # noqa: E402
from memwarden import alloc as ma  # noqa: E402
from memwarden.controller.config import MemwardenConfig  # noqa: E402
from memwarden.serve.pool import EMBEDDED_MODELS, ModelPool  # noqa: E402
from memwarden.serve.server import Server  # noqa: E402

POLICIES = ("memwarden", "ollama", "lru", "never")
BASELINES = ("ollama", "lru")
MODELS = tuple(EMBEDDED_MODELS)  # tiny, small, base
PHASE_RANKINGS = ((1, 2, 0), (2, 0, 1), (0, 1, 2))  # model indices, most popular first
ZIPF_EXPONENT = 1.2
WEIGHTS_BUDGET, DEVICE_LIMIT = "12.5MiB", "16MiB"
NEW_TOKENS = 4
RESTORE_GOAL = 0.70  # of the measured copy bandwidth


# ---- the trace ------------------------------------------------------------------------------

def shifting_zipf_trace(phases: int, phase_s: float, rate: float, seed: int = 0) -> list[tuple[float, str]]:
    """(arrival second, model) pairs: Poisson arrivals at ``rate``, models by a Zipf law
    whose ranking moves on every ``phase_s`` seconds."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(MODELS) + 1) ** ZIPF_EXPONENT
    weights /= weights.sum()
    trace, now = [], 0.0
    while True:
        now += rng.exponential(1.0 / rate)
        phase = int(now // phase_s)
        if phase >= phases:
            return trace
        ranking = PHASE_RANKINGS[phase % len(PHASE_RANKINGS)]
        trace.append((now, MODELS[ranking[rng.choice(len(MODELS), p=weights)]]))


# ---- replaying it ---------------------------------------------------------------------------

def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def replay(policy: str, trace: list, clients: int, timing: dict) -> dict:
    """One fresh server under ``policy``, the whole trace, its numbers."""
    overrides = {"server.port": 0, "server.models": list(MODELS), "server.max_memory": WEIGHTS_BUDGET,
                 "server.device_limit": DEVICE_LIMIT, "server.swap_policy": policy, "server.load_timeout": 10.0,
                 "server.min_residency": timing["min_residency"], "server.demand_half_life": timing["half_life"],
                 "server.max_concurrency": 2, "admission.queue_timeout": 60.0}  # two generating: two cores
    server = Server(MemwardenConfig.load(env={}, overrides=overrides))
    thread = server.start()
    url = f"http://127.0.0.1:{server.port}/v1/completions"
    start_stats = server.pool.stats()["models"]
    results = [None] * len(trace)
    started = time.perf_counter()

    def send(index: int, arrival: float, model: str) -> None:
        status, payload = post(url, {"model": model, "prompt": f"request {index}", "max_tokens": NEW_TOKENS,
                                     "temperature": 0})
        code = None if status == 200 else payload.get("error", {}).get("code", str(status))
        results[index] = (time.perf_counter() - started - arrival, code)

    try:
        with ThreadPoolExecutor(clients) as executor:
            for index, (arrival, model) in enumerate(trace):
                delay = started + arrival - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                executor.submit(send, index, arrival, model)
        wall = time.perf_counter() - started
        end_stats = server.pool.stats()
    finally:
        server.stop(thread)
    models = end_stats["models"]
    swaps = sum(models[m]["swaps_in"] - start_stats[m]["swaps_in"] for m in MODELS)
    moved = sum(models[m][k] - start_stats[m][k] for m in MODELS for k in ("bytes_in", "bytes_out"))
    served = sorted(latency for latency, code in results if code is None)
    refusals: dict = {}
    for _, code in results:
        if code is not None:
            refusals[code] = refusals.get(code, 0) + 1
    return {"policy": policy, "requests": len(trace), "served": len(served), "swaps": swaps, "bytes_moved": moved,
            "p50_s": _quantile(served, 0.50), "p99_s": _quantile(served, 0.99), "latencies_s": served,
            "goodput_rps": len(served) / wall,
            "ooms": refusals.get("out_of_memory", 0), "load_ooms": end_stats["out_of_memory"],
            "refusals": refusals, "wall_s": wall}


def _median_row(rows: list) -> dict:
    """One policy's runs as one row: medians of the figures, sums of the counts of failures."""
    summed = ("ooms", "load_ooms")
    row = {"policy": rows[0]["policy"], "requests": rows[0]["requests"], "runs": len(rows)}
    for key in ("served", "swaps", "bytes_moved", "p50_s", "p99_s", "goodput_rps", "wall_s"):
        values = [r[key] for r in rows if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    for key in summed:
        row[key] = sum(r[key] for r in rows)
    row["refusals"] = {}
    for r in rows:
        for code, count in r["refusals"].items():
            row["refusals"][code] = row["refusals"].get(code, 0) + count
    row["each"] = {key: [r[key] for r in rows] for key in ("swaps", "bytes_moved", "p99_s")}
    # a run's p99 is its third-worst request: over all runs' requests the tail has a few times the samples
    row["pooled_p99_s"] = _quantile(sorted(x for r in rows for x in r["latencies_s"]), 0.99)
    return row


def _quantile(values: list, q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


# ---- the offloader and parking ---------------------------------------------------------------

def copy_bandwidth(nbytes: int, repeats: int = 7) -> dict:
    """GB/s (median) of one ``nbytes`` copy, numpy (pageable) memory -> a pool tensor and back."""
    host = torch.from_numpy(np.ones(nbytes, dtype=np.uint8))
    pooled = torch.empty(nbytes, dtype=torch.uint8)
    pooled.copy_(host)

    def best(fn) -> float:
        samples = []
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
        return nbytes / statistics.median(samples) / 1e9

    return {"to_pool_gb_s": best(lambda: torch.empty(nbytes, dtype=torch.uint8).copy_(host)),
            "to_host_gb_s": best(lambda: host.copy_(pooled))}


def _gb_s(action) -> float:
    return action.nbytes / sum(move.seconds for move in action.moves) / 1e9 if action.moves else 0.0


def offloader_section(layers: int, cycles: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from memwarden.controller.offload import AutomaticOffloader

    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2)
    ids = torch.randint(0, 4096, (1, 64), generator=torch.Generator().manual_seed(0))
    with ma.use("cpu"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()

        def forwards(count: int = 5) -> tuple[float, int, torch.Tensor]:
            ma.reset_peak_memory_stats("cpu")
            with torch.no_grad():
                model(ids)  # warm
                begin = time.perf_counter()
                for _ in range(count):
                    logits = model(ids).logits
            return count * ids.shape[1] / (time.perf_counter() - begin), ma.max_memory_allocated("cpu"), logits

        resident_tps, resident_peak, reference = forwards()
        weights = ma.memory_allocated("cpu")
        offloader = AutomaticOffloader(model, device="cpu", memory_limit=weights)
        layer = offloader.unit_bytes(0)
        # step() offloads until its estimate falls under the threshold, a layer's share of
        # the budget at a time: this pressure lands there once half the layers are out
        half_out = offloader.offload_threshold + (layers // 2 - 0.5) * layer / weights
        moved = offloader.step(half_out)
        offloaded_tps, offloaded_peak, logits = forwards()
        identical = bool(torch.equal(logits, reference))
        offload_rates, restore_rates = [_gb_s(moved)], [_gb_s(offloader.step(0.0))]
        for _ in range(cycles - 1):  # the same move again: the median is less at the mercy of neighbours
            offload_rates.append(_gb_s(offloader.step(half_out)))
            restore_rates.append(_gb_s(offloader.step(0.0)))
        offloader.close()
        copy = copy_bandwidth(moved.nbytes)
    offload_gb_s, restore_gb_s = statistics.median(offload_rates), statistics.median(restore_rates)
    return {"layers": layers, "layers_offloaded": len(moved.moves), "layer_bytes": layer,
            "resident_peak_bytes": resident_peak, "offloaded_peak_bytes": offloaded_peak,
            "resident_tokens_per_s": resident_tps, "offloaded_tokens_per_s": offloaded_tps,
            "outputs_identical": identical, "offload_gb_s": offload_gb_s, "restore_gb_s": restore_gb_s,
            "offload_gb_s_each": offload_rates, "restore_gb_s_each": restore_rates,
            **{f"copy_{k}": v for k, v in copy.items()},
            "restore_vs_copy": restore_gb_s / copy["to_pool_gb_s"],
            "offload_vs_copy": offload_gb_s / copy["to_host_gb_s"]}


def parking_section(repeats: int) -> dict:
    """Latency of one request (hold + 4 greedy tokens) to the base model when it is loaded,
    parked in host memory, and unloaded."""
    overrides = {"server.models": list(MODELS), "server.max_memory": WEIGHTS_BUDGET, "server.min_residency": 0.0,
                 "server.demand_half_life": 0.001}
    pool = ModelPool.from_config(MemwardenConfig.load(env={}, overrides=overrides))
    base, small = MODELS[2], MODELS[1]

    def request(name: str) -> float:
        begin = time.perf_counter()
        hold = pool.hold(name)
        try:
            engine = hold.engine
            for _ in engine.generate(engine.encode_prompt("parked?"), NEW_TOKENS, 0.0):
                pass
        finally:
            hold.release()
        return time.perf_counter() - begin

    timings = {"loaded": [], "parked": [], "unloaded": []}
    try:
        for _ in range(repeats):
            request(base)
            timings["loaded"].append(request(base))
            request(small)  # base leaves for host memory
            timings["parked"].append(request(base))
        pool.host_memory = 0  # nothing may be parked now: leaving is unloading
        for _ in range(repeats):
            request(small)
            timings["unloaded"].append(request(base))
    finally:
        pool.close()
    return {f"{state}_ms": statistics.median(values) * 1e3 for state, values in timings.items()}


# ---- the report -----------------------------------------------------------------------------

def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _ratio(mine: float | None, theirs: float | None) -> float | None:
    if mine is None or not theirs:
        return None
    return mine / theirs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 6 s trace and a 4-layer offloader model (CI)")
    parser.add_argument("--json", default="benchmarks/results/bench_models.json")
    parser.add_argument("--rate", type=float, help="requests a second (default 12, --quick 15)")
    parser.add_argument("--phase", type=float, help="seconds a popularity ranking lasts (default 8, --quick 2)")
    parser.add_argument("--clients", type=int, default=16, help="requests in flight at most (client threads)")
    parser.add_argument("--repeats", type=int, default=1, help="replays of each policy, interleaved (medians)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the server's requests run in threads of their own
    rate = args.rate or (15.0 if args.quick else 12.0)  # what two shared cores sustain for 24 s
    phase = args.phase or (2.0 if args.quick else 8.0)
    # memwarden's time constants scaled to the trace: demand halves in an eighth of a phase
    # (a fortieth: a couple of requests to small outweighed base, the phase's favourite, per
    # byte, and base ran from host memory; 46 swaps, not 28), and no minimum residency: a
    # parked model comes back in a copy of a few milliseconds
    timing = {"half_life": phase / 8, "min_residency": 0.0}
    trace = shifting_zipf_trace(len(PHASE_RANKINGS), phase, rate)
    replay("lru", trace[:30], args.clients, timing)  # warm-up, not counted: the process's first builds are slower
    runs: dict = {policy: [] for policy in POLICIES}
    for repeat in range(max(1, args.repeats)):  # each repeat starts with the next policy
        for policy in POLICIES[repeat % len(POLICIES):] + POLICIES[:repeat % len(POLICIES)]:
            runs[policy].append(replay(policy, trace, args.clients, timing))
    rows = [_median_row(runs[policy]) for policy in POLICIES]
    by_policy = {row["policy"]: row for row in rows}
    mine = by_policy["memwarden"]
    ratios = {base: {key: _ratio(mine[key], by_policy[base][key])
                     for key in ("swaps", "bytes_moved", "p99_s", "pooled_p99_s")}
              for base in BASELINES}
    offload = offloader_section(4 if args.quick else 8, 3 if args.quick else 7)
    parking = parking_section(3 if args.quick else 10)

    print(f"shifting Zipf trace: {len(trace)} requests over {len(PHASE_RANKINGS)} phases of {phase:g} s, "
          f"{rate:g}/s; weights budget {WEIGHTS_BUDGET}, stand-in device {DEVICE_LIMIT}")
    print(f"{'policy':>10} {'served':>7} {'swaps':>6} {'MiB moved':>10} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'pooled':>7} {'goodput/s':>10} {'OOMs':>5}  other refusals")
    for row in rows:
        other = {k: v for k, v in row["refusals"].items() if k != "out_of_memory"}
        print(f"{row['policy']:>10} {row['served']:>4}/{row['requests']:<3}{row['swaps']:>5} "
              f"{row['bytes_moved'] / 2**20:10.1f} {_ms(row['p50_s']):>8} {_ms(row['p99_s']):>8} "
              f"{_ms(row['pooled_p99_s']):>7} {row['goodput_rps']:10.2f} {row['ooms']:>5}  {other or '-'}")
    for base, r in ratios.items():
        shown = "  ".join(f"{k} x{v:.2f}" if v is not None else f"{k} -" for k, v in r.items())
        print(f"memwarden / {base}: {shown}")
    print(f"offloader ({offload['layers']} layers of {offload['layer_bytes'] / 2**20:.1f} MiB, "
          f"{offload['layers_offloaded']} offloaded): peak {offload['resident_peak_bytes'] / 2**20:.1f} -> "
          f"{offload['offloaded_peak_bytes'] / 2**20:.1f} MiB, {offload['resident_tokens_per_s']:.0f} -> "
          f"{offload['offloaded_tokens_per_s']:.0f} tokens/s, outputs identical: {offload['outputs_identical']}")
    print(f"  offload {offload['offload_gb_s']:.2f} GB/s ({offload['offload_vs_copy']:.0%} of a pool -> numpy copy, "
          f"{offload['copy_to_host_gb_s']:.2f}), restore {offload['restore_gb_s']:.2f} GB/s "
          f"({offload['restore_vs_copy']:.0%} of numpy -> pool, {offload['copy_to_pool_gb_s']:.2f}; "
          f"goal {RESTORE_GOAL:.0%})")
    print(f"a request to base: loaded {parking['loaded_ms']:.1f} ms, parked in host memory "
          f"{parking['parked_ms']:.1f} ms, unloaded {parking['unloaded_ms']:.1f} ms")
    goals = {"no_ooms": mine["ooms"] == 0 and mine["load_ooms"] == 0,
             "fewer_swaps": all(mine["swaps"] < by_policy[b]["swaps"] for b in BASELINES),
             "fewer_bytes": all(mine["bytes_moved"] < by_policy[b]["bytes_moved"] for b in BASELINES),
             "p99_no_worse": all(r["pooled_p99_s"] is not None and r["pooled_p99_s"] <= 1.0
                                 for r in ratios.values()),
             "restore_bandwidth": offload["restore_vs_copy"] >= RESTORE_GOAL,
             "outputs_identical": offload["outputs_identical"]}
    print("goals: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in goals.items()))
    write_json(args.json, {"environment": environment(), "quick": args.quick, "rate": rate, "phase_s": phase,
                           "timing": timing, "policies": rows, "ratios": ratios, "offloader": offload,
                           "parking": parking, "goals": goals})
    return 0


if __name__ == "__main__":
    sys.exit(main())
