"""memwarden.alloc with real torch tensors on the CPU: installation, stats, snapshots,
limits, the OOM chain, history, and workloads giving the same numbers as without it."""
from __future__ import annotations

import gc
import random
import sys
import threading

import pytest
import torch

import memwarden.alloc as ma
from memwarden import _C

KiB, MiB = 1024, 1024 * 1024

# The keys of torch.cuda.memory_stats() that apply to a caching allocator without
# expandable segments (PyTorch 2.x names).
TORCH_KEYS = [f"{stat}.{pool}.{metric}"
              for stat in ("allocation", "segment", "active", "inactive_split", "allocated_bytes",
                           "reserved_bytes", "active_bytes", "inactive_split_bytes", "requested_bytes")
              for pool in ("all", "small_pool", "large_pool")
              for metric in ("current", "peak", "allocated", "freed")] + [
    f"{s}.{m}" for s in ("oversize_allocations", "oversize_segments")
    for m in ("current", "peak", "allocated", "freed")] + [
    "num_alloc_retries", "num_ooms", "num_sync_all_streams", "num_device_alloc", "num_device_free",
    "max_split_size"]


pytestmark = pytest.mark.usefixtures("never_left_installed")


@pytest.fixture
def host():
    """memwarden's allocator installed for the test, then removed, limits cleared."""
    ma.set_memory_limit("cpu", None)
    assert ma.install("cpu")
    try:
        yield "cpu"
    finally:
        ma.uninstall("cpu")
        ma.set_memory_limit("cpu", None)
        gc.collect()
        ma.empty_cache("cpu")


def allocated():
    return ma.memory_stats("cpu")["allocated_bytes.all.current"]


def test_install_uninstall_roundtrip():
    assert not ma.is_installed("cpu")
    base = allocated()
    assert ma.install("cpu") is True
    try:
        assert ma.is_installed("cpu") and ma.is_installed(torch.device("cpu"))
        assert ma.install("cpu") is False
        t = torch.empty(3 * MiB, dtype=torch.uint8)
        assert allocated() - base >= 3 * MiB
        assert _C.alloc.block_size("cpu", t.data_ptr()) >= 3 * MiB
    finally:
        assert ma.uninstall("cpu") is True
    assert not ma.is_installed("cpu")
    assert ma.uninstall("cpu") is False
    u = torch.empty(3 * MiB, dtype=torch.uint8)  # from PyTorch's allocator again
    with pytest.raises(ValueError):
        _C.alloc.block_size("cpu", u.data_ptr())
    held = allocated()
    del t  # allocated while installed, freed after: goes back to memwarden's pool
    assert allocated() == held - 3 * MiB
    assert allocated() == base
    ma.empty_cache("cpu")


def test_tensor_from_before_install_is_freed_by_its_own_allocator(capfd):
    before = torch.randn(1000)
    base = allocated()
    with ma.use("cpu"):
        ptr = before.data_ptr()
        assert not _owned(ptr)
        del before  # must not reach memwarden's free (which would report a failed free)
        assert allocated() == base
    assert "free failed" not in capfd.readouterr().err


def _owned(ptr):
    try:
        _C.alloc.block_size("cpu", ptr)
        return True
    except ValueError:
        return False


def test_stats_keys_and_movement(host):
    st0 = ma.memory_stats("cpu")
    assert set(TORCH_KEYS) <= set(st0)
    x = torch.empty(100, dtype=torch.float32)          # small pool
    y = torch.empty(4 * MiB, dtype=torch.uint8)        # large pool
    st1 = ma.memory_stats("cpu")
    assert st1["allocation.all.current"] == st0["allocation.all.current"] + 2
    assert st1["allocated_bytes.small_pool.current"] - st0["allocated_bytes.small_pool.current"] == 512
    assert st1["allocated_bytes.large_pool.current"] - st0["allocated_bytes.large_pool.current"] == 4 * MiB
    assert st1["requested_bytes.all.current"] - st0["requested_bytes.all.current"] == 400 + 4 * MiB
    assert st1["reserved_bytes.all.current"] >= st1["allocated_bytes.all.current"]
    assert st1["active_bytes.all.current"] >= st1["allocated_bytes.all.current"]
    del x, y
    st2 = ma.memory_stats("cpu")
    assert st2["allocated_bytes.all.current"] == st0["allocated_bytes.all.current"]
    assert st2["allocated_bytes.all.peak"] >= st0["allocated_bytes.all.current"] + 4 * MiB + 512
    assert st2["allocated_bytes.all.freed"] - st0["allocated_bytes.all.freed"] == 4 * MiB + 512
    ma.reset_peak_memory_stats("cpu")
    assert ma.max_memory_allocated("cpu") == ma.memory_allocated("cpu")
    ma.empty_cache("cpu")
    segments = ma.snapshot("cpu")["segments"]
    assert all(s["allocated_size"] > 0 for s in segments)  # no wholly free segment stays cached
    assert ma.memory_reserved("cpu") == sum(s["total_size"] for s in segments)


def test_snapshot_lists_live_tensor(host):
    t = torch.empty(5000, dtype=torch.uint8)
    snap = ma.snapshot("cpu")
    assert 0.0 <= snap["fragmentation"] <= 1.0
    found = [b for s in snap["segments"] for b in s["blocks"] if b["address"] == t.data_ptr()]
    assert len(found) == 1
    b = found[0]
    assert b["state"] == "active_allocated" and b["size"] == 5120 and b["requested_size"] == 5000
    seg = next(s for s in snap["segments"] if any(x is b for x in s["blocks"]))
    assert seg["segment_type"] == "small" and seg["total_size"] == 2 * MiB and seg["device"] == -1
    assert {"device", "address", "total_size", "allocated_size", "stream", "segment_type", "blocks"} <= set(seg)
    del t
    snap = ma.snapshot("cpu")
    assert not [b for s in snap["segments"] for b in s["blocks"]
                if b["address"] == found[0]["address"] and b["state"] == "active_allocated"]


def test_memory_limit_raises_torch_oom(host):
    ma.set_memory_limit("cpu", "64 MiB")
    assert ma.get_memory_limit("cpu") == 64 * MiB
    ooms = ma.memory_stats("cpu")["num_ooms"]
    with pytest.raises(torch.OutOfMemoryError) as info:
        torch.empty(100 * MiB, dtype=torch.uint8)
    msg = str(info.value)
    for part in ("tried to allocate 100.00 MiB", "allocated", "reserved by memwarden", "free",
                 "memory limit 64.00 MiB"):
        assert part in msg, msg
    assert ma.memory_stats("cpu")["num_ooms"] == ooms + 1
    ok = torch.ones(10 * MiB, dtype=torch.uint8)  # below the limit still works
    assert int(ok.min()) == 1 and int(ok.max()) == 1


def test_oom_callback_frees_application_memory(host):
    ma.set_memory_limit("cpu", "64 MiB")
    cache = [torch.empty(40 * MiB, dtype=torch.uint8)]
    calls = []

    def give_back(nbytes):
        calls.append(nbytes)
        had = bool(cache)
        cache.clear()  # frees the tensor through memwarden (re-entrant, no lock held)
        return had

    callbacks_before = ma.memory_stats("cpu")["num_oom_callbacks"]
    with ma.on_oom(give_back, "cpu"):
        t = torch.empty(40 * MiB, dtype=torch.uint8)
        assert calls == [40 * MiB]
        assert t.numel() == 40 * MiB
        del t
        # nothing left to give back: the callback says so and the error comes
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(80 * MiB, dtype=torch.uint8)
        assert calls == [40 * MiB, 80 * MiB]
    assert ma.memory_stats("cpu")["num_oom_callbacks"] == callbacks_before + 2


def test_oom_callback_truthy_result_allows_retry(host):
    ma.set_memory_limit("cpu", "64 MiB")
    cache = [torch.empty(40 * MiB, dtype=torch.uint8)]

    def give_back(nbytes):
        cache.clear()
        return "freed 40 MiB"  # truthy, not a bool

    with ma.on_oom(give_back, "cpu"):
        t = torch.empty(40 * MiB, dtype=torch.uint8)
    assert t.numel() == 40 * MiB and not cache


def test_oom_chain_order_raw(monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_value))
    ma.empty_cache("cpu")
    ma.set_memory_limit("cpu", 32 * MiB)
    order, live = [], []
    try:
        live.append(_C.alloc.raw_alloc("cpu", 12 * MiB))
        cached = _C.alloc.raw_alloc("cpu", 12 * MiB)
        _C.alloc.raw_free("cpu", cached)  # cached: the chain frees it before any callback
        h1 = ma.on_oom(lambda n: order.append("a") or False, "cpu")

        def raises(n):
            order.append("b")
            raise RuntimeError("callback failed")

        h2 = ma.on_oom(raises, "cpu")

        def frees(n):
            order.append("c")
            _C.alloc.raw_free("cpu", live.pop())
            return True

        h3 = ma.on_oom(frees, "cpu")
        retries = ma.memory_stats("cpu")["num_alloc_retries"]
        live.append(_C.alloc.raw_alloc("cpu", 18 * MiB))  # fits once the cache is freed
        assert order == []
        assert ma.memory_stats("cpu")["num_alloc_retries"] == retries + 1
        live.append(_C.alloc.raw_alloc("cpu", 12 * MiB))  # needs the callbacks
        assert order == ["a", "b", "c"]
        assert [str(e) for e in unraisable] == ["callback failed"]
        for h in (h1, h2, h3):
            assert h.remove()
        assert not h1.remove()
        with pytest.raises(MemoryError, match="tried to allocate"):
            _C.alloc.raw_alloc("cpu", 31 * MiB)
    finally:
        for p in live:
            _C.alloc.raw_free("cpu", p)
        ma.set_memory_limit("cpu", None)
        ma.empty_cache("cpu")


def test_argument_errors():
    with pytest.raises(ValueError):
        ma.memory_stats("tpu")
    with pytest.raises(ValueError):
        ma.set_memory_limit("cpu", -1)
    with pytest.raises(TypeError, match="callback must be callable"):
        ma.on_oom(42)
    with pytest.raises(ValueError):
        _C.alloc.raw_free("cpu", 12345)
    with pytest.raises(ValueError):
        ma.set_gc_threshold("cpu", 2.0)
    if not ma.cuda_built():
        with pytest.raises(ValueError):
            ma.memory_stats("cuda:0")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            with ma.use("cuda:0"):
                pass
        with pytest.raises(RuntimeError):
            ma.install("cuda")
        assert not ma.is_installed("cuda")


def _allocate_here(n):
    return _C.alloc.raw_alloc("cpu", n)


def test_record_history_with_gil():
    ma.record_history("cpu", True)
    try:
        p = _allocate_here(1000)
    finally:
        ma.record_history("cpu", False)
    q = _allocate_here(1000)
    try:
        blocks = {b["address"]: b for s in ma.snapshot("cpu")["segments"] for b in s["blocks"]}
        names = [f["name"] for f in blocks[p]["frames"]]
        assert names[0] == "_allocate_here" and "test_record_history_with_gil" in names
        assert blocks[p]["frames"][0]["filename"].endswith("test_alloc.py")
        assert blocks[q]["frames"] == []
    finally:
        _C.alloc.raw_free("cpu", p)
        _C.alloc.raw_free("cpu", q)


def test_record_history_of_tensors(host):
    ma.record_history("cpu", True, acquire_gil=True)
    try:
        t = torch.empty(7777, dtype=torch.uint8)
    finally:
        ma.record_history("cpu", False)
    blocks = {b["address"]: b for s in ma.snapshot("cpu")["segments"] for b in s["blocks"]}
    names = [f["name"] for f in blocks[t.data_ptr()]["frames"]]
    assert "test_record_history_of_tensors" in names


def test_use_context_restores_state():
    assert not ma.is_installed("cpu")
    with ma.use("cpu", memory_limit="1 GiB") as dev:
        assert dev == "cpu" and ma.is_installed("cpu")
        assert ma.get_memory_limit("cpu") == 1 << 30
        x = torch.zeros(1000)
        assert _owned(x.data_ptr())
    assert not ma.is_installed("cpu")
    assert ma.get_memory_limit("cpu") is None
    del x
    ma.empty_cache("cpu")


def test_use_record_leaves_recording_as_it_found_it():
    ma.record_history("cpu", True)
    try:
        with ma.use("cpu", record=True):
            pass
        p = _allocate_here(1000)  # still recording after the block
        try:
            blocks = {b["address"]: b for s in ma.snapshot("cpu")["segments"] for b in s["blocks"]}
            assert blocks[p]["frames"] and blocks[p]["frames"][0]["name"] == "_allocate_here"
        finally:
            _C.alloc.raw_free("cpu", p)
    finally:
        ma.record_history("cpu", False)
    with ma.use("cpu", record=True):
        pass
    q = _allocate_here(1000)  # recording was off before the block: off again after it
    try:
        blocks = {b["address"]: b for s in ma.snapshot("cpu")["segments"] for b in s["blocks"]}
        assert blocks[q]["frames"] == []
    finally:
        _C.alloc.raw_free("cpu", q)


def test_memory_summary(host):
    t = torch.empty(MiB, dtype=torch.uint8)
    text = ma.memory_summary("cpu")
    assert "Allocated memory" in text and "Reserved memory" in text and "from small pool" in text
    assert "Fragmentation" in text and "installed: True" in text
    assert len(ma.memory_summary("cpu", abbreviated=True)) < len(text)
    del t


def _transformer_step(seed):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0,
                                             batch_first=True)
    x = torch.randn(4, 16, 64, requires_grad=True)
    out = layer(x)
    loss = out.square().mean()
    loss.backward()
    return out.detach().clone(), x.grad.clone(), [p.grad.clone() for p in layer.parameters()]


def test_transformer_forward_backward_same_numbers(host):
    ma.uninstall("cpu")
    ref_out, ref_gx, ref_gp = _transformer_step(0)
    base = ma.memory_stats("cpu")
    ma.install("cpu")
    ma.reset_peak_memory_stats("cpu")
    out, gx, gp = _transformer_step(0)
    st = ma.memory_stats("cpu")
    assert torch.equal(out, ref_out) and torch.equal(gx, ref_gx)
    assert all(torch.equal(a, b) for a, b in zip(gp, ref_gp))
    # the pass went through memwarden's pool
    assert st["allocation.all.allocated"] - base["allocation.all.allocated"] > 50
    assert st["allocated_bytes.all.peak"] > st["allocated_bytes.all.current"] > base["allocated_bytes.all.current"]
    assert all(_owned(t.data_ptr()) for t in [out, gx, *gp])
    held = st["allocated_bytes.all.current"]
    kept = sum(_C.alloc.block_size("cpu", t.data_ptr()) for t in [out, gx, *gp])
    del out, gx, gp
    gc.collect()
    assert ma.memory_stats("cpu")["allocated_bytes.all.current"] == held - kept


def test_many_random_tensors_keep_their_contents(host):
    rng = random.Random(3)
    live = []
    for i in range(400):
        if live and rng.random() < 0.45:
            t, v = live.pop(rng.randrange(len(live)))
            assert bool((t == v).all())
        else:
            n = rng.choice([rng.randint(1, 4096), rng.randint(4096, 1 << 20), rng.randint(1 << 20, 6 << 20)])
            t = torch.full((n,), i % 251, dtype=torch.uint8)
            live.append((t, i % 251))
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel()) for t, _ in live)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    for t, v in live:
        assert bool((t == v).all())
        assert _owned(t.data_ptr())
    live.clear()


def test_threads_allocating_tensors(host):
    errors = []

    def work(seed):
        try:
            rng = random.Random(seed)
            mine = []
            for _ in range(300):
                if mine and rng.random() < 0.5:
                    t, v = mine.pop()
                    if not bool((t == v).all()):
                        errors.append("corrupted")
                else:
                    v = rng.randrange(256)
                    mine.append((torch.full((rng.randint(1, 300_000),), v, dtype=torch.uint8), v))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    base = allocated()
    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert allocated() == base
