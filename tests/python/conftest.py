import os
import sys

import pytest

# Test helpers (reference implementations) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="run the hypothesis fuzz suites (test_fuzz_*.py) with 20x the examples")


def pytest_configure(config):
    # the fuzz suites size their @settings when imported, after this hook
    if config.getoption("--fuzz-long"):
        os.environ["MEMWARDEN_FUZZ_LONG"] = "1"


@pytest.fixture
def one_thread():
    """Tiny models on shared CPU cores: one intra-op thread is ~10x faster than two that
    contend with other processes (and keeps the float reduction order fixed). Modules
    take it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def never_left_installed():
    """Fails a test that leaves memwarden's CPU allocator installed (uninstalling it)."""
    import memwarden.alloc as ma

    was = ma.is_installed("cpu")
    yield
    if not was and ma.is_installed("cpu"):
        ma.uninstall("cpu")
        pytest.fail("test left memwarden's CPU allocator installed")
