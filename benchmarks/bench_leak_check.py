"""How much slower does a test run get with memwarden's leak check on?

Runs a synthetic suite (N small torch tests) with pytest in a subprocess, with and
without ``--memwarden-leak-check``, a few times each, and writes JSON.

    PYTHONPATH=python python benchmarks/bench_leak_check.py [--tests 60] [--repeats 3] [--quick] [--json PATH]
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
from pathlib import Path

SUITE = '''
import pytest, torch

@pytest.mark.parametrize("i", range({n}))
def test_small_work(i):
    a = torch.randn(256, 256)
    for _ in range(4):
        a = torch.tanh(a @ a)
    assert a.shape == (256, 256)
'''


def run(suite: Path, extra: list[str], env: dict) -> tuple[float, float]:
    args = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
            "-p", "memwarden.testing.plugin", "--memwarden-device=cpu", *extra]
    t0 = time.perf_counter()
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=suite.parent)
    wall = time.perf_counter() - t0
    m = re.search(r"passed in ([0-9.]+)s", out.stdout)
    if out.returncode != 0 or not m:
        raise SystemExit(f"pytest failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return wall, float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tests", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke run: 10 tests, 1 repeat")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_leak_check.json"))
    a = ap.parse_args()
    if a.quick:
        a.tests, a.repeats = 10, 1
    env = dict(os.environ)
    import memwarden  # run the suite against the same memwarden (source tree or installed)
    root = str(Path(memwarden.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory() as d:
        suite = Path(d) / "test_synthetic.py"
        suite.write_text(SUITE.format(n=a.tests))
        res = {"off": [], "on": [], "on_no_freeze": []}
        for _ in range(a.repeats):
            res["off"].append(run(suite, [], env))
            res["on"].append(run(suite, ["--memwarden-leak-check"], env))
            res["on_no_freeze"].append(run(suite, ["--memwarden-leak-check", "-o", "memwarden_gc_freeze=false"], env))
    s_off = statistics.median(s for _, s in res["off"])
    s_on = statistics.median(s for _, s in res["on"])
    s_nf = statistics.median(s for _, s in res["on_no_freeze"])
    w_off = statistics.median(w for w, _ in res["off"])
    w_on = statistics.median(w for w, _ in res["on"])
    out = {
        "tests": a.tests, "repeats": a.repeats, "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "session_s_off": s_off, "session_s_on": s_on, "session_ratio": s_on / s_off,
        "wall_s_off": w_off, "wall_s_on": w_on, "wall_ratio": w_on / w_off,
        "overhead_ms_per_test": 1000 * (s_on - s_off) / a.tests,
        "session_s_on_no_freeze": s_nf, "session_ratio_no_freeze": s_nf / s_off,
        "overhead_ms_per_test_no_freeze": 1000 * (s_nf - s_off) / a.tests,
        "raw": res,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"{a.tests} tests: session {s_off:.2f}s -> {s_on:.2f}s with --memwarden-leak-check "
          f"(x{out['session_ratio']:.2f}, +{out['overhead_ms_per_test']:.0f} ms/test); "
          f"wall incl. startup {w_off:.2f}s -> {w_on:.2f}s (x{out['wall_ratio']:.2f}); "
          f"without gc.freeze {s_nf:.2f}s (x{out['session_ratio_no_freeze']:.2f}); wrote {a.json}")


if __name__ == "__main__":
    main()
