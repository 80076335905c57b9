"""An example suite in which one test leaks the way real suites do: a module-level cache.

Run it (from the repository root, without installing):

    PYTHONPATH=python python -m pytest examples/testing_suite -p memwarden.testing.plugin \
        --memwarden-leak-check --memwarden-device=cpu

Expected: test_generate_with_global_cache FAILS with "leaked 128.0 MiB on cpu", naming the
list `test_inference._KV_CACHE` that holds the tensors; everything else passes (the
requires_memory test may skip on a small machine, the cuda one skips without a GPU).
"""
import os

import pytest
import torch

from memwarden.testing import run_isolated

_KV_CACHE = []          # the bug: a cache that outlives the test


def generate(model, steps, cache=None):
    x = torch.randn(1, 256)
    for _ in range(steps):
        kv = torch.empty(4 * 2**20, dtype=torch.float32)    # 16 MiB of "KV" per step
        if cache is not None:
            cache.append(kv)
        x = model(x)
    return x


def test_generate_with_global_cache(tiny_model):
    out = generate(tiny_model, steps=8, cache=_KV_CACHE)    # 8 x 16 MiB = 128 MiB kept
    assert out.shape == (1, 256)


def test_generate_with_local_cache(tiny_model):
    cache = []
    out = generate(tiny_model, steps=6, cache=cache)        # freed when the test returns
    assert out.shape == (1, 256)


@pytest.mark.limit_memory("256 MiB")
def test_stays_under_its_limit(tiny_model):
    generate(tiny_model, steps=4, cache=[])


@pytest.mark.requires_memory("2 GiB")
def test_needs_two_gib_free():
    x = torch.empty(2**30, dtype=torch.uint8)
    assert x.numel() == 2**30


def test_tracker_spots_the_leaky_loop(memory_tracker):
    keep = []
    for _ in range(8):
        with memory_tracker.phase("decode"):
            keep.append(torch.ones(2 * 2**20))              # 8 MiB per iteration, kept
        memory_tracker.step()
    analysis = memory_tracker.analyze()
    assert analysis.trend.leak_suspected, analysis


def _child_work():
    return os.getpid(), float(torch.ones(4).sum())


@pytest.mark.isolated
def test_in_a_fresh_process():
    pid, s = _child_work()
    assert s == 4.0


def test_run_isolated_helper():
    pid, s = run_isolated(_child_work)
    assert pid != os.getpid() and s == 4.0


def test_budget(gpu_resources):
    with gpu_resources.reserve("64 MiB"):
        torch.empty(64 * 2**20, dtype=torch.uint8)


@pytest.mark.limit_memory("1 GiB", device="cuda")
@pytest.mark.requires_memory("1 GiB", device="cuda")
def test_cuda_only():
    torch.empty(2**28, dtype=torch.uint8, device="cuda")
