"""Process isolation: @pytest.mark.isolated and run_isolated (spawned processes, ~3 s each)."""
from __future__ import annotations

import os
import re

import pytest

from memwarden.testing import IsolatedProcessError, run_isolated
from memwarden.testing import _sources as src

from plugin_args import plugin_args

pytest_plugins = ["pytester"]




def _child_pid_and_raise(x):
    print("child says", x)
    if x < 0:
        raise KeyError(f"negative {x}")
    return os.getpid(), x * 2


def test_run_isolated_result_output_and_exception(capfd):
    pid, doubled = run_isolated(_child_pid_and_raise, 21)
    assert pid != os.getpid() and doubled == 42
    assert "child says 21" in capfd.readouterr().out


def test_isolated_marker_crash_does_not_take_the_run_down(pytester):
    pytester.makepyfile(test_iso="""
import ctypes, os, pytest

@pytest.mark.isolated
def test_passes(tmp_path):
    print("hello from", os.getpid())
    (tmp_path / "f").write_text("x")
    assert os.environ.get("PYTHONFAULTHANDLER") == "1"

@pytest.mark.isolated
def test_exits():
    os._exit(3)

@pytest.mark.isolated(timeout=60)
def test_segfaults():
    ctypes.string_at(0)

@pytest.mark.isolated
def test_raises():
    raise KeyError("nope")

def test_after():
    assert True
""")
    r = pytester.runpytest_inprocess(*plugin_args(), "-p", "no:cacheprovider", "-rA")
    r.assert_outcomes(passed=2, failed=3)
    r.stdout.fnmatch_lines([
        "*isolated process for test_exits exited with code 3 without reporting a result*",
        "*isolated process for test_segfaults was killed by SIGSEGV*",
        "*Fatal Python error: Segmentation fault*",
        ">       raise KeyError(\"nope\")", "E       KeyError: 'nope'",
        "*hello from*",
    ])


def test_run_isolated_timeout_and_bad_input():
    with pytest.raises(ValueError, match="module-level"):
        run_isolated(lambda: 1)
    with pytest.raises(IsolatedProcessError, match="timed out after 0.5 s"):
        run_isolated(_sleep_forever, timeout=0.5)


def _sleep_forever():
    import threading
    threading.Event().wait()


@pytest.mark.skipif(not src.cuda_available(), reason="needs CUDA")
def test_isolated_cuda_context():
    assert run_isolated(_cuda_alloc) == 2**20


def _cuda_alloc():
    import torch
    return torch.empty(2**20, dtype=torch.uint8, device="cuda").numel()


ISO_FAILURES = """
import os, pytest

pytestmark = [pytest.mark.isolated] if os.environ.get("MEMWARDEN_TEST_ISOLATE") else []

def _check(total):
    assert total == 43, "the total is off"

def test_assert_in_helper():
    x = 41
    _check(x + 1)

def test_bare_assert():
    values = [1, 2]
    assert sum(values) == 4

class TestMethod:
    def test_raises(self):
        raise KeyError("nope")
"""


def _failures(r: pytest.RunResult) -> str:
    """The FAILURES section of a run, without captured output and object addresses."""
    out = re.sub(r"0x[0-9a-f]+", "0x?", r.stdout.str())
    body = out.split("= FAILURES =", 1)[1].split("short test summary info")[0]
    return "\n".join(line for line in body.splitlines() if "Captured" not in line)


def test_isolated_failure_reads_like_the_in_process_one(pytester, monkeypatch):
    pytester.makepyfile(test_isofail=ISO_FAILURES)
    args = (*plugin_args(), "-p", "no:cacheprovider", "-rf")
    monkeypatch.delenv("MEMWARDEN_TEST_ISOLATE", raising=False)
    here = pytester.runpytest_inprocess(*args)
    here.assert_outcomes(failed=3)
    monkeypatch.setenv("MEMWARDEN_TEST_ISOLATE", "1")
    iso = pytester.runpytest_inprocess(*args)
    iso.assert_outcomes(failed=3)
    failures = _failures(iso)
    for name in ("_isolation.py", "plugin.py", "pluggy", "_pytest", "memwarden"):
        assert name not in failures, name
    iso.stdout.fnmatch_lines([
        ">       _check(x + 1)", "test_isofail.py:10: ", "*AssertionError: the total is off",
        "E       assert 42 == 43", "test_isofail.py:6: AssertionError",
        ">       assert sum(values) == 4", "E       assert 3 == 4",
        "E       KeyError: 'nope'", "test_isofail.py:18: KeyError",
    ])
    assert failures == _failures(here)
