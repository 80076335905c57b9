"""Process isolation: @pytest.mark.isolated and run_isolated (spawned processes, ~3 s each)."""
from __future__ import annotations

import os

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
        "*KeyError: 'nope'*", "*traceback in the isolated process*",
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
