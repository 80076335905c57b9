"""memwarden.testing's pytest plugin, driven through pytester (CPU; CUDA parts skip)."""
from __future__ import annotations

import os

import pytest

import memwarden.testing  # noqa: F401
from memwarden.testing import _sources as src
from memwarden.testing import format_bytes

from plugin_args import plugin_args

pytest_plugins = ["pytester"]

CUDA = src.cuda_available()




def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess(*plugin_args(), "-p", "no:cacheprovider",
                                        "--memwarden-device=cpu", *args)


LEAKY = """
import pytest, torch
_CACHE = []

def test_leaky():
    _CACHE.append(torch.ones(64 * 2**20 // 4))   # 64 MiB kept alive by a module global

def test_clean():
    x = torch.ones(64 * 2**20 // 4)
    assert float(x[0]) == 1.0

def test_fails_for_another_reason():
    _CACHE.append(torch.ones(64 * 2**20 // 4))
    assert False, "boom"

@pytest.mark.no_leak_check
def test_exempt():
    _CACHE.append(torch.ones(64 * 2**20 // 4))
"""


def test_leak_check_run_mode(pytester):
    pytester.makepyfile(test_leaky=LEAKY)
    r = run(pytester, "--memwarden-leak-check", "--memwarden-leak-fail=48MiB")
    r.assert_outcomes(passed=2, failed=2)
    out = r.stdout.str()
    r.stdout.fnmatch_lines([
        "*memwarden leak check: test_leaky leaked 64.0 MiB on cpu according to torch-tensors*",
        "*64.0 MiB  float32[[]16777216[]] on cpu  held by test_leaky._CACHE[[]0[]]*",
        "*LEAK  test_leaky.py::test_leaky*",
    ])
    assert "boom" in out
    assert "test_fails_for_another_reason leaked" not in out     # not also reported as a leak
    assert "test_clean leaked" not in out and "test_exempt leaked" not in out
    assert "memwarden: leak check on" in out


def test_leak_check_marker_fixture_and_warning(pytester):
    pytester.makepyfile(test_m="""
import pytest, torch
KEEP = {}

@pytest.mark.leak_check(fail="32 MiB")
def test_marked():
    KEEP["a"] = torch.zeros(40 * 2**20, dtype=torch.uint8)

def test_fixture(leak_check):
    leak_check.fail = 16 * 2**20
    KEEP["b"] = torch.zeros(20 * 2**20, dtype=torch.uint8)

@pytest.mark.leak_check(warn="4 MiB")
def test_warns():
    KEEP["c"] = torch.zeros(8 * 2**20, dtype=torch.uint8)

def test_not_checked():
    KEEP["d"] = torch.zeros(40 * 2**20, dtype=torch.uint8)
""")
    r = run(pytester)
    r.assert_outcomes(passed=2, failed=2)
    r.stdout.fnmatch_lines(["*test_marked leaked 40.0 MiB*", "*test_fixture leaked 20.0 MiB*",
                            "*WARN  test_m.py::test_warns: test_warns leaked 8.0 MiB*"])


HOLDERS = """
import pytest, torch
pytestmark = pytest.mark.leak_check(fail="1 MiB")
CACHE = {}

class Holder:
    pass

HOLDER = Holder()

class Model:
    def __init__(self):
        self.buf = torch.ones(2**20, dtype=torch.uint8)

MODELS = []

class Node:
    def __init__(self, parent=None):
        self.parent, self.children = parent, []
        if parent is not None:
            parent.children.append(self)    # parent <-> child: a reference cycle

TREE = Node()

def test_dict():
    CACHE["k"] = torch.ones(2**20, dtype=torch.uint8)

def test_nested_dict():
    CACHE.setdefault("layer0", {})["kv"] = torch.ones(2**20, dtype=torch.uint8)

def test_instance_attribute():
    HOLDER.buf = torch.ones(2**20, dtype=torch.uint8)

def test_self_attribute():
    MODELS.append(Model())

def test_class_attribute():
    Holder.buf = torch.ones(2**20, dtype=torch.uint8)

def test_cycle():
    Node(TREE).buf = torch.ones(2**20, dtype=torch.uint8)

BATCH = []

def test_many_in_one_list():
    BATCH.extend(torch.ones(2**20, dtype=torch.uint8) for _ in range(3))
"""


@pytest.mark.parametrize("test, holder", [
    ("test_dict", "test_holders.CACHE['k']"),
    ("test_nested_dict", "test_holders.CACHE['layer0']['kv']"),
    ("test_instance_attribute", "test_holders.HOLDER.buf"),
    ("test_self_attribute", "test_holders.MODELS[0].buf"),
    ("test_class_attribute", "test_holders.Holder.buf"),
    ("test_cycle", "test_holders.TREE.children[0].buf"),
    ("test_many_in_one_list", "test_holders.BATCH[*]"),    # one line for the three
])
def test_leak_names_the_holder(holders_run, test, holder):
    section = holders_run.split(f"_ {test} _", 1)[1].split("\n_", 1)[0]
    tensors = "3.0 MiB  3 x uint8[1048576]" if test == "test_many_in_one_list" else "1.0 MiB  uint8[1048576]"
    assert f"{tensors} on cpu  held by {holder}" in section, section


@pytest.fixture(scope="module")
def holders_run(tmp_path_factory) -> str:
    """One run of HOLDERS for all the holder kinds (a subprocess: the module fixture cannot
    use the function-scoped pytester)."""
    import subprocess
    import sys
    import memwarden
    d = tmp_path_factory.mktemp("holders")
    (d / "test_holders.py").write_text(HOLDERS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(os.path.abspath(memwarden.__file__))), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "pytest", *plugin_args(), "-p", "no:cacheprovider",
                        "--memwarden-device=cpu", "test_holders.py"], cwd=d, env=env,
                       capture_output=True, text=True, timeout=300)
    assert "7 failed" in r.stdout, r.stdout + r.stderr
    return r.stdout


def test_leak_checker_api_and_fake_allocator_backend():
    import torch
    from memwarden.testing import LeakChecker, MemoryLeakError

    keep = []
    with pytest.raises(MemoryLeakError, match="leaked 24.0 MiB"):
        with LeakChecker("cpu", fail="16 MiB", retries=1):
            keep.append(torch.ones(24 * 2**20, dtype=torch.uint8))
    with LeakChecker("cpu", fail="16 MiB", retries=1) as lc:
        torch.ones(24 * 2**20, dtype=torch.uint8).sum()
    assert lc.result.ok

    fake = FakeAlloc()
    with src.use_backend(fake):
        lc = LeakChecker("cpu", fail="1 MiB", census=False, noisy="ignore", retries=1).start()
        fake.alloc(3 * 2**20, frames=[{"filename": "model.py", "line": 7, "name": "forward"}])
        res = lc.check()
    assert res.verdict == "fail" and res.leaked == 3 * 2**20
    assert res.readings[0].name == "memwarden-alloc"
    text = res.format()
    assert "allocated at model.py:7 in forward" in text and "3.0 MiB" in text


class FakeAlloc:
    """Stands for memwarden.alloc with its stats and snapshot (for when it is absent)."""

    def __init__(self):
        self.blocks, self.peak, self.next = {}, 0, 0x1000

    def is_installed(self, device_type):
        return device_type == "cpu"

    def alloc(self, n, frames=()):
        self.blocks[self.next] = (n, list(frames))
        self.next += n
        self.peak = max(self.peak, self.current())
        return self.next - n

    def free(self, addr):
        del self.blocks[addr]

    def current(self):
        return sum(n for n, _ in self.blocks.values())

    def memory_stats(self, device):
        return {"allocated_bytes.all.current": self.current(), "allocated_bytes.all.peak": self.peak,
                "reserved_bytes.all.current": self.current()}

    def reset_peak_memory_stats(self, device):
        self.peak = self.current()

    def empty_cache(self, device):
        pass

    def snapshot(self, device):
        return {"segments": [{"device": 0, "address": a, "total_size": n, "allocated_size": n,
                              "blocks": [{"address": a, "size": n, "requested_size": n,
                                          "state": "active_allocated", "frames": f}]}
                             for a, (n, f) in self.blocks.items()]}


def test_limit_memory(pytester, monkeypatch):
    pytester.makepyfile(test_lim="""
import pytest, time, torch

@pytest.mark.limit_memory("64 MiB")
def test_over():
    x = torch.ones(200 * 2**20, dtype=torch.uint8); time.sleep(0.3)  # 200 MiB, held on this line for samples
    del x

@pytest.mark.limit_memory("512 MiB")
def test_under():
    x = torch.ones(16 * 2**20, dtype=torch.uint8)
    del x

@pytest.mark.limit_memory("1 GiB", device="cuda")
def test_cuda():
    pass
""")
    # A fresh process: host memory cached by earlier tests (malloc's free lists, a host
    # caching allocator) could otherwise serve the 200 MiB without moving peak RSS.
    import memwarden
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(memwarden.__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    r = pytester.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider", "--memwarden-device=cpu", "-rs")
    has_cuda = int(CUDA)  # test_cuda runs (and passes) where there is a GPU
    r.assert_outcomes(passed=1 + has_cuda, failed=1, skipped=1 - has_cuda)
    r.stdout.fnmatch_lines(["*test_over used more memory than its limit: peak * MiB above the start on cpu*limit 64.0 MiB*"])
    import re
    peak = float(re.search(r"test_over used more memory than its limit: peak ([0-9.]+) MiB", r.stdout.str()).group(1))
    assert 150 <= peak <= 260, peak     # 200 MiB allocated (RSS: heap pages already mapped may absorb a little)
    r.stdout.fnmatch_lines(["*test_lim.py:5 in test_over*"])


def test_limit_memory_with_allocator_peak():
    from memwarden.testing import PeakMonitor
    fake = FakeAlloc()
    with src.use_backend(fake):
        mon = PeakMonitor("cpu").start()
        a = fake.alloc(5 * 2**20)
        fake.free(a)
        res = mon.stop()
    assert res.source == "memwarden-alloc" and res.exact and res.peak == 5 * 2**20


ALLOC_BLOCK = 512     # docs/alloc.md: sizes are rounded up to multiples of 512 bytes


def test_checks_count_memwarden_host_allocator_bytes(pytester, monkeypatch):
    """With memwarden's host allocator installed (it replaces torch's CPU allocator for the
    whole process: a subprocess), the leak check and limit_memory count its exact bytes."""
    pytest.importorskip("memwarden.alloc")
    n = 700_003                                             # a small-pool request: one block
    block = -(-n // ALLOC_BLOCK) * ALLOC_BLOCK
    pytester.makeconftest("import memwarden.alloc\nmemwarden.alloc.install('cpu')\n")
    pytester.makepyfile(test_exact=f"""
import pytest, torch
KEEP = []

@pytest.mark.leak_check(fail="64 KiB")
def test_leaks():
    KEEP.append(torch.empty({n}, dtype=torch.uint8))

@pytest.mark.limit_memory("{block} B")
def test_at_limit():
    x = torch.empty({n}, dtype=torch.uint8)
    del x

@pytest.mark.limit_memory("{block - 1} B")
def test_one_byte_over():
    x = torch.empty({n}, dtype=torch.uint8)
    del x
""")
    _subprocess_env(monkeypatch)
    r = pytester.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider", "--memwarden-device=cpu")
    r.assert_outcomes(passed=1, failed=2)
    out = r.stdout.str()
    r.stdout.fnmatch_lines([
        f"*test_leaks leaked * on cpu according to memwarden-alloc ({block} bytes; fail threshold 64.0 KiB)*",
        f"*test_one_byte_over used more memory than its limit: peak * (source: memwarden-alloc) = {block} bytes*",
    ])
    leak = out.split("_ test_leaks _", 1)[1].split("\n_", 1)[0]
    assert "host-rss" not in leak                          # the allocator's bytes, not RSS


def test_requires_memory(pytester):
    pytester.makepyfile(test_req="""
import pytest

@pytest.mark.requires_memory("1 PiB")
def test_huge():
    pass

@pytest.mark.requires_memory("1 MiB")
def test_small():
    pass

@pytest.mark.requires_memory("1 MiB", device="cuda")
def test_cuda():
    pass
""")
    r = run(pytester, "-rs")
    r.assert_outcomes(passed=2 if CUDA else 1, skipped=1 if CUDA else 2)
    r.stdout.fnmatch_lines(["*requires 1024.0 TiB free on cpu, only * free*"])
    if not CUDA:
        r.stdout.fnmatch_lines(["*requires 1.0 MiB free on cuda:0: CUDA is not available*"])


def test_gpu_resources_budget(pytester):
    pytester.makeini("[pytest]\nmemwarden_gpu_budget = 100 MiB\n")
    pytester.makepyfile(test_res="""
def test_a(gpu_resources):
    r = gpu_resources.reserve("60 MiB")
    assert gpu_resources.reserved() == 60 * 2**20
    gpu_resources.reserve("60 MiB")          # does not fit: skipped

def test_b(gpu_resources):
    assert gpu_resources.reserved() == 0      # test_a's reservation was released
    with gpu_resources.reserve("90 MiB"):
        assert gpu_resources.available() == 10 * 2**20
    assert gpu_resources.available() == 100 * 2**20
""")
    r = run(pytester, "-rs")
    r.assert_outcomes(passed=1, skipped=1)
    r.stdout.fnmatch_lines(["*cannot reserve 60.0 MiB on cpu: 60.0 MiB of the 100.0 MiB budget is already reserved*"])


def test_memory_reset_fixture(pytester):
    pytester.makepyfile(test_reset="""
from memwarden.testing import ResetReport, reset_memory

def test_it(memory_reset):
    assert isinstance(memory_reset, ResetReport)
    assert "gc" in memory_reset.steps and memory_reset.after["host_rss"] > 0
    rep = reset_memory("cpu")
    assert "reset_memory(cpu)" in str(rep)
""")
    run(pytester, "--memwarden-reset-each").assert_outcomes(passed=1)


def test_tracker_fixture_plot_on_failure(pytester, tmp_path):
    pytester.makepyfile(test_tr="""
import torch

def test_fails(memory_tracker):
    keep = []
    for i in range(5):
        with memory_tracker.phase("work"):
            keep.append(torch.ones(2 * 2**20))
        memory_tracker.step()
    assert False

def test_passes(memory_tracker):
    memory_tracker.step()
""")
    r = run(pytester, f"--memwarden-plot-dir={tmp_path}")
    r.assert_outcomes(passed=1, failed=1)
    r.stdout.fnmatch_lines(["*memwarden memory_tracker*", "timeline plot: *test_tr.py_test_fails.png",
                            "*PLOT  test_tr.py::test_fails*"])
    assert (tmp_path / "test_tr.py_test_fails.png").stat().st_size > 1000
    assert (tmp_path / "test_tr.py_test_fails.json").exists()
    assert not (tmp_path / "test_tr.py_test_passes.png").exists()


def test_tracker_report_json_and_plot_show_one_peak(pytester, tmp_path):
    import json
    import re
    from memwarden.testing._tracker import plot_series
    pytester.makepyfile(test_one="""
def test_fails(memory_tracker):
    memory_tracker.step()
    assert False
""")
    r = run(pytester, f"--memwarden-plot-dir={tmp_path}")
    r.assert_outcomes(failed=1)
    data = json.loads((tmp_path / "test_one.py_test_fails.json").read_text())
    an = data["analysis"]
    printed = re.search(rf"^{an['metric']}: peak (.+?) at ", r.stdout.str(), re.M).group(1)
    assert printed == format_bytes(an["peak"], digits=1)        # the report line
    ts, values = plot_series(data)[an["metric"]]                  # what the PNG draws
    assert max(values) == an["peak"] and ts[values.index(an["peak"])] == an["peak_t"]
    assert max(s[an["metric"]] for s in data["samples"]) == an["peak"]


def test_entry_point_loads_plugin_and_tolerates_explicit_p(pytester, monkeypatch):
    """What ``pip install`` gives: a pytest11 entry point. Also loading the plugin by
    module name (-p / pytest_plugins) must not register it twice."""
    import memwarden
    site = pytester.mkdir("site")
    dist = site / "memwarden_entry_check-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: memwarden-entry-check\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("[pytest11]\nmemwarden = memwarden.testing.pytest_entry\n")
    pytester.makeconftest('pytest_plugins = ["memwarden.testing.plugin"]')
    pytester.makepyfile(test_ep="def test_x(leak_check, memory_tracker, gpu_resources):\n    pass\n")
    pkg_root = os.path.dirname(os.path.dirname(memwarden.__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), pkg_root]))
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    r = pytester.runpytest_subprocess("-p", "memwarden.testing.plugin", "-p", "no:cacheprovider",
                                      "--memwarden-device=cpu")
    r.assert_outcomes(passed=1)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_leak_check_and_limit_cuda(pytester):
    pytester.makepyfile(test_cu="""
import pytest, torch
KEEP = []

def test_leak():
    KEEP.append(torch.empty(128 * 2**20, dtype=torch.uint8, device="cuda"))

def test_clean():
    x = torch.empty(128 * 2**20, dtype=torch.uint8, device="cuda")
    del x

@pytest.mark.no_leak_check
@pytest.mark.limit_memory("64 MiB", device="cuda")
def test_over_limit():
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    del x
""")
    r = run(pytester, "--memwarden-leak-check", "--memwarden-device=cuda")
    r.assert_outcomes(passed=1, failed=2)
    r.stdout.fnmatch_lines(["*test_leak leaked 128.0 MiB on cuda:* according to torch-*",
                            "*peak 256.0 MiB above the start on cuda:* (source: torch-alloc)*"])


# --- bad settings and marker arguments: usage errors, not INTERNALERROR tracebacks ----------
def _subprocess_env(monkeypatch):
    import memwarden
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(memwarden.__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))


def _assert_usage_error(r: pytest.RunResult, *expected: str) -> None:
    out, err = r.stdout.str(), r.stderr.str()
    assert r.ret == pytest.ExitCode.USAGE_ERROR, (r.ret, out, err)
    assert "INTERNALERROR" not in out + err
    assert "Traceback" not in out + err
    for e in expected:
        assert e in err, (e, err)


@pytest.mark.parametrize("args, expected", [
    (["--memwarden-device=gpu"], ["--memwarden-device=gpu", "expected auto, cpu, cuda or cuda:N"]),
    (["--memwarden-leak-fail=-5"], ["--memwarden-leak-fail=-5", "expected a size with a unit"]),
])
def test_bad_option_is_usage_error_subprocess(pytester, monkeypatch, args, expected):
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    _subprocess_env(monkeypatch)
    r = pytester.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider", *args)
    _assert_usage_error(r, *expected)


@pytest.mark.parametrize("args, expected", [
    (["--memwarden-leak-warn=lots"], ["--memwarden-leak-warn=lots", "expected a size with a unit"]),
    (["--memwarden-leak-fail=48"], ["--memwarden-leak-fail=48", "expected a size with a unit"]),
    (["--memwarden-leak-retries=x"], ["--memwarden-leak-retries=x", "expected an integer >= 0"]),
    (["--memwarden-leak-retries=-1"], ["--memwarden-leak-retries=-1", "expected an integer >= 0"]),
    (["--memwarden-top=two"], ["--memwarden-top=two", "expected an integer >= 0"]),
    (["-o", "memwarden_device=tpu"], ["ini option memwarden_device = tpu", "expected auto, cpu"]),
    (["-o", "memwarden_leak_fail=big"], ["ini option memwarden_leak_fail = big", "expected a size"]),
    (["-o", "memwarden_leak_retries=3.5"], ["ini option memwarden_leak_retries = 3.5", "integer >= 0"]),
    (["-o", "memwarden_leak_noisy=loud"], ["ini option memwarden_leak_noisy = loud",
                                          "expected one of warn, fail, ignore"]),
    (["-o", "memwarden_tracker_interval=0"], ["ini option memwarden_tracker_interval = 0", "seconds > 0"]),
    (["-o", "memwarden_plots=sometimes"], ["ini option memwarden_plots = sometimes",
                                          "expected one of failed, always, never"]),
    (["-o", "memwarden_gpu_budget=lots"], ["ini option memwarden_gpu_budget = lots", "expected a size"]),
    (["-o", "memwarden_top=-3"], ["ini option memwarden_top = -3", "integer >= 0"]),
    (["-o", "memwarden_gc_freeze=maybe"], ["ini option memwarden_gc_freeze", "expected true or false"]),
])
def test_bad_option_or_ini_value_is_usage_error(pytester, args, expected):
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    r = pytester.runpytest_inprocess(*plugin_args(), "-p", "no:cacheprovider", *args)
    _assert_usage_error(r, *expected)


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_device_cuda_without_cuda_is_usage_error(pytester, monkeypatch):
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    _subprocess_env(monkeypatch)
    r = pytester.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider", "--memwarden-device=cuda")
    _assert_usage_error(r, "--memwarden-device=cuda: CUDA is not available")
    r = pytester.runpytest_inprocess(*plugin_args(), "-p", "no:cacheprovider", "-o", "memwarden_device=cuda:1")
    _assert_usage_error(r, "ini option memwarden_device = cuda:1: CUDA is not available")


def test_bad_marker_arguments_fail_the_test_without_plugin_traceback(pytester):
    pytester.makepyfile(test_marks="""
import pytest

@pytest.mark.limit_memory("2 GiBs")
def test_bad_limit():
    pass

@pytest.mark.limit_memory()
def test_no_limit():
    pass

@pytest.mark.limit_memory("1 GiB", device="gpu")
def test_bad_device():
    pass

@pytest.mark.requires_memory(size="1 MiB", devce="cpu")
def test_bad_keyword():
    pass

@pytest.mark.leak_check(fail="lots")
def test_bad_leak_fail():
    pass

@pytest.mark.leak_check(retries=-1)
def test_bad_retries():
    pass

@pytest.mark.isolated(timeout="soon")
def test_bad_timeout():
    pass

@pytest.mark.limit_memory("1 GiB")
def test_good():
    pass
""")
    r = run(pytester, "--tb=long")
    r.assert_outcomes(passed=1, errors=7)
    r.stdout.fnmatch_lines_random([
        "*@pytest.mark.limit_memory('2 GiBs'): cannot parse limit '2 GiBs': expected a number with a unit*",
        "*@pytest.mark.limit_memory(): needs a limit, e.g. limit_memory('2 GiB')*",
        "*@pytest.mark.limit_memory('1 GiB', device='gpu'): bad device 'gpu'*",
        "*@pytest.mark.requires_memory(size='1 MiB', devce='cpu'): unexpected keyword argument 'devce'*",
        "*@pytest.mark.leak_check(fail='lots'): cannot parse fail 'lots'*",
        "*@pytest.mark.leak_check(retries=-1): retries must be an int >= 0, got -1*",
        "*@pytest.mark.isolated(timeout='soon'): timeout must be a number of seconds > 0 or None*",
    ])
    out = r.stdout.str() + r.stderr.str()
    assert "plugin.py" not in out and "Traceback" not in out and "INTERNALERROR" not in out


def test_top_tests_by_peak(pytester, monkeypatch):
    pytester.makepyfile(test_top="""
import torch

def test_small():
    x = torch.ones(24 * 2**20, dtype=torch.uint8); del x

def test_large():
    x = torch.ones(240 * 2**20, dtype=torch.uint8); del x

def test_medium():
    x = torch.ones(120 * 2**20, dtype=torch.uint8); del x
""")
    _subprocess_env(monkeypatch)   # fresh process: peak RSS is not absorbed by earlier tests' heap
    r = pytester.runpytest_subprocess(*plugin_args(), "-p", "no:cacheprovider", "--memwarden-device=cpu",
                                      "--memwarden-top=2")
    r.assert_outcomes(passed=3)
    r.stdout.fnmatch_lines([
        "*= memwarden: top 2 of 3 tests by memory peak =*",
        "*peak  device  source*test",
        "* MiB  cpu     *test_top.py::test_large",
        "* MiB  cpu     *test_top.py::test_medium",
    ])
    table = r.stdout.str().split("tests by memory peak")[1]
    assert "test_small" not in table
    r = run(pytester)                  # no table unless asked for
    r.assert_outcomes(passed=3)
    assert "by memory peak" not in r.stdout.str()
