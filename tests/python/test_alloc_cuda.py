"""memwarden.alloc on a GPU (skipped without CUDA or without the CUDA build)."""
from __future__ import annotations

import pytest
import torch

import memwarden.alloc as ma
from memwarden import _C

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not ma.cuda_built(),
                                reason="needs a CUDA device and memwarden built with CUDA")
MiB = 1024 * 1024
DEV = "cuda:0"


def test_raw_blocks_stats_and_limit():
    ma.empty_cache(DEV)
    base = ma.memory_stats(DEV)
    p = _C.alloc.raw_alloc(DEV, 3 * MiB)
    st = ma.memory_stats(DEV)
    assert st["allocated_bytes.all.current"] - base["allocated_bytes.all.current"] == 3 * MiB
    assert st["reserved_bytes.all.current"] >= st["allocated_bytes.all.current"]
    _C.alloc.raw_free(DEV, p)
    ma.set_memory_limit(DEV, 64 * MiB)
    try:
        with pytest.raises(MemoryError, match="tried to allocate"):
            _C.alloc.raw_alloc(DEV, 100 * MiB)
    finally:
        ma.set_memory_limit(DEV, None)
    ma.empty_cache(DEV)
    # Our segment is gone; blocks of other tests can only have been freed meanwhile.
    assert ma.memory_stats(DEV)["reserved_bytes.all.current"] <= base["reserved_bytes.all.current"]


def test_mem_pool_scoped_same_numbers():
    torch.manual_seed(0)
    a = torch.randn(256, 256)
    ref = (a @ a).sum().item()
    with ma.use(DEV):
        assert ma.is_installed(DEV)
        before = ma.memory_stats(DEV)["allocation.all.allocated"]
        x = a.to(DEV)
        y = (x @ x).sum().item()
        assert ma.memory_stats(DEV)["allocation.all.allocated"] > before
        assert any(b["address"] == x.data_ptr()
                   for s in ma.snapshot(DEV)["segments"] for b in s["blocks"])
    assert y == pytest.approx(ref, rel=1e-3)
    del x
    torch.cuda.synchronize()


def test_global_install_serves_every_cuda_tensor():
    # Must precede the first CUDA allocation of a process, so it runs in a fresh one.
    script = """
import torch, memwarden.alloc as ma
assert ma.install("cuda")
x = torch.randn(1 << 20, device="cuda")
y = (x * 2).sum().item()
reference = (x.cpu() * 2).sum().item()
assert abs(y - reference) <= 1e-3 * max(1.0, abs(reference)), (y, reference)
st = ma.memory_stats("cuda")
assert st["allocated_bytes.all.current"] >= 4 * (1 << 20), st["allocated_bytes.all.current"]
assert any(b["address"] == x.data_ptr() for s in ma.snapshot("cuda")["segments"] for b in s["blocks"])
del x
torch.cuda.synchronize()
print("ok")
"""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
