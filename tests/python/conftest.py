import os
import sys

# Test helpers (reference implementations) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="run the hypothesis fuzz suites (test_fuzz_*.py) with 20x the examples")


def pytest_configure(config):
    # the fuzz suites size their @settings when imported, after this hook
    if config.getoption("--fuzz-long"):
        os.environ["MEMWARDEN_FUZZ_LONG"] = "1"
