"""Admission decision cost: the median time of ``check_admission`` and of an ``admit`` +
``finish`` pair while 1000 requests run, for each policy. Goal: under 50 us a decision.

    python benchmarks/bench_admission.py [--quick] [--running N] [--json PATH]

The pool holds ``--running`` requests (prompt 100-400 tokens, max_tokens 50-550, 128 KiB a
token) in a budget with room for one more; ``memwarden`` has finished 64 requests first, so
it reserves its output-length estimate. ``admit`` + ``finish`` admits a request that fits and
finishes it (an empty queue: the drain is one check). Each figure is the median over
``--repeats`` of the mean of back-to-back calls. Pure Python: no torch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from memwarden.controller.admission import POLICIES, AdmissionController, Request  # noqa: E402

GOAL_SECONDS = 50e-6
BYTES_PER_TOKEN = 128 * 1024


def median_seconds(fn, repeats: int, inner: int) -> float:
    fn()  # warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def loaded_controller(policy: str, running: int) -> AdmissionController:
    requests = [Request(f"run{i}", 100 + i % 301, 50 + i % 501) for i in range(running)]
    budget = (sum(r.prompt_tokens + r.max_tokens for r in requests) + 2000) * BYTES_PER_TOKEN
    admission = AdmissionController(budget, BYTES_PER_TOKEN, policy=policy, queue_limit=64)
    if policy == "memwarden":
        for i in range(64):
            admission.admit(Request(f"warm{i}", 10, 600))
            _, reserved, _ = admission.reservation(f"warm{i}")
            beyond = 10 + 40 + i - reserved // BYTES_PER_TOKEN  # past the estimate: ask for more
            if beyond > 0 and not admission.extend(f"warm{i}", beyond):
                raise RuntimeError("the warm-up pool is too small")
            admission.on_tokens(f"warm{i}", 40 + i)
            admission.finish(f"warm{i}")
    for request in requests:
        decision = admission.admit(request)
        assert decision.admitted, decision
    return admission


def measure(policy: str, running: int, repeats: int, inner: int) -> dict:
    admission = loaded_controller(policy, running)
    probe = Request("probe", 300, 500)
    check = median_seconds(lambda: admission.check_admission(probe), repeats, inner)

    def admit_and_finish():
        admission.admit(probe)
        admission.finish("probe")

    cycle = median_seconds(admit_and_finish, repeats, inner)
    return {"policy": policy, "running": len(admission.running_ids()),
            "check_admission_us": check * 1e6, "admit_finish_us": cycle * 1e6,
            "within_goal": check < GOAL_SECONDS and cycle < GOAL_SECONDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke: fewer repeats (< 5 s)")
    parser.add_argument("--running", type=int, default=1000, help="requests running during the timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median taken)")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "bench_admission.json"))
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 21)
    inner = 200 if args.quick else 2000

    rows = [measure(policy, args.running, repeats, inner) for policy in POLICIES]
    print(f"{'policy':<12} {'running':>8} {'check_admission':>16} {'admit+finish':>14}")
    for row in rows:
        print(f"{row['policy']:<12} {row['running']:>8} {row['check_admission_us']:>13.2f} us "
              f"{row['admit_finish_us']:>11.2f} us{'' if row['within_goal'] else '  OVER GOAL'}")
    payload = {"benchmark": "bench_admission", "goal_us_per_decision": GOAL_SECONDS * 1e6,
               "repeats": repeats, "inner": inner, "quick": args.quick,
               "python": platform.python_version(), "machine": platform.machine(), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {args.json}")
    if not all(row["within_goal"] for row in rows):
        print("over the goal on this run (a loaded machine? compare medians of repeated runs)")


if __name__ == "__main__":
    main()
