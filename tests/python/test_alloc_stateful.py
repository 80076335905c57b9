"""Hypothesis stateful tests: random allocate/free/limit/empty_cache sequences against a
simple Python model of what must hold (no overlap, bytes inside live segments, stats equal
the model's sums, reserved >= allocated, everything given back at the end)."""
from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

import memwarden.alloc as ma
from memwarden import _C

KiB, MiB = 1024, 1024 * 1024

sizes = st.one_of(st.integers(1, 4 * KiB), st.integers(4 * KiB, 1 * MiB), st.integers(1 * MiB, 24 * MiB))


class PoolMachine(RuleBasedStateMachine):
    """Drives a private HostPool (small segments so splits and coalescing happen often)."""

    blocks = Bundle("blocks")

    def __init__(self):
        super().__init__()
        self.pool = self.make_pool()
        self.live: dict[int, tuple[int, int]] = {}  # address -> (block size, requested)
        self.limit = 0

    def make_pool(self):
        return _C.alloc.HostPool()

    def alloc(self, n):
        return self.pool.allocate(n)

    def free(self, addr):
        self.pool.deallocate(addr)

    def stats(self):
        return self.pool.stats()

    def snap(self):
        return self.pool.snapshot()

    @rule(target=blocks, n=sizes)
    def allocate(self, n):
        before = self.stats()
        try:
            addr = self.alloc(n)
        except MemoryError as e:
            assert self.limit, "out of memory without a limit"
            assert "tried to allocate" in str(e)
            after = self.stats()
            assert after["allocated_bytes.all.current"] == before["allocated_bytes.all.current"]
            assert after["num_ooms"] == before["num_ooms"] + 1
            # it could not have fit: even with the whole cache given back
            rounded = self.pool.round_size(n)
            tight = 2 * MiB if rounded <= 1 * MiB else -(-rounded // (2 * MiB)) * (2 * MiB)
            assert after["reserved_bytes.all.current"] + tight > self.limit
            return None
        size = self.pool.block_size(addr)
        assert size >= self.pool.round_size(n) >= n
        assert addr % 512 == 0
        assert addr not in self.live
        self.live[addr] = (size, n)
        return addr

    @rule(addr=consumes(blocks))
    def deallocate(self, addr):
        if addr is None:
            return
        self.free(addr)
        del self.live[addr]

    @rule()
    def empty_cache(self):
        self.pool.empty_cache()
        # every segment still reserved holds at least one live block
        for seg in self.snap()["segments"]:
            assert any(b["state"] == "active_allocated" for b in seg["blocks"])

    @rule(limit=st.sampled_from([0, 48 * MiB, 96 * MiB, 256 * MiB]))
    def set_limit(self, limit):
        self.pool.set_memory_limit(limit)
        self.limit = limit
        if limit:
            # the cache shrinks to fit when it can
            st_ = self.stats()
            assert st_["reserved_bytes.all.current"] <= max(limit, self._segments_with_live_bytes())

    def _segments_with_live_bytes(self):
        return sum(s["total_size"] for s in self.snap()["segments"]
                   if any(b["state"] == "active_allocated" for b in s["blocks"]))

    @invariant()
    def consistent(self):
        s = self.stats()
        snap = self.snap()
        assert s["allocated_bytes.all.current"] == sum(v[0] for v in self.live.values())
        assert s["requested_bytes.all.current"] == sum(v[1] for v in self.live.values())
        assert s["allocation.all.current"] == len(self.live)
        assert s["reserved_bytes.all.current"] >= s["allocated_bytes.all.current"]
        assert s["reserved_bytes.all.current"] == sum(seg["total_size"] for seg in snap["segments"])
        assert s["segment.all.current"] == len(snap["segments"])
        for k in ("allocated_bytes", "reserved_bytes", "allocation", "segment"):
            assert s[f"{k}.all.current"] == s[f"{k}.small_pool.current"] + s[f"{k}.large_pool.current"]
            assert s[f"{k}.all.peak"] >= s[f"{k}.all.current"]
        # no two live blocks overlap
        spans = sorted((a, a + v[0]) for a, v in self.live.items())
        for (a0, e0), (a1, _) in zip(spans, spans[1:]):
            assert e0 <= a1
        # every live block lies inside a reserved segment, listed as allocated with its request
        allocated_in_snap = {}
        for seg in snap["segments"]:
            lo, hi = seg["address"], seg["address"] + seg["total_size"]
            pos = lo
            for b in seg["blocks"]:
                assert b["address"] == pos  # blocks tile the segment
                pos += b["size"]
                if b["state"] == "active_allocated":
                    assert lo <= b["address"] and b["address"] + b["size"] <= hi
                    allocated_in_snap[b["address"]] = (b["size"], b["requested_size"])
            assert pos == hi
        assert allocated_in_snap == self.live
        assert 0.0 <= snap["fragmentation"] <= 1.0

    def teardown(self):
        for addr in list(self.live):
            self.free(addr)
        self.live.clear()
        self.pool.set_memory_limit(0)
        self.pool.empty_cache()
        s = self.stats()
        assert s["allocated_bytes.all.current"] == 0
        assert s["reserved_bytes.all.current"] == 0
        assert s["inactive_split_bytes.all.current"] == 0


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestPoolMachine = PoolMachine.TestCase


class GlobalHostMachine(PoolMachine):
    """The same model on the process-wide host allocator that serves torch's CPU tensors."""

    def make_pool(self):
        return _GlobalHost()

    def teardown(self):
        super().teardown()


class _GlobalHost:
    """The global 'cpu' allocator behind the HostPool interface."""

    def allocate(self, n):
        return _C.alloc.raw_alloc("cpu", n)

    def deallocate(self, addr):
        _C.alloc.raw_free("cpu", addr)

    def block_size(self, addr):
        return _C.alloc.block_size("cpu", addr)

    def round_size(self, n):
        return _C.alloc.round_size("cpu", n)

    def stats(self):
        return ma.memory_stats("cpu")

    def snapshot(self):
        return ma.snapshot("cpu")

    def empty_cache(self):
        ma.empty_cache("cpu")

    def set_memory_limit(self, n):
        ma.set_memory_limit("cpu", n)


GlobalHostMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=30, deadline=None,
                                               suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def idle_host_allocator():
    # The global allocator must start empty: not installed, nothing live, nothing cached.
    assert not ma.is_installed("cpu")
    ma.empty_cache("cpu")
    if ma.memory_stats("cpu")["allocated_bytes.all.current"] != 0:
        pytest.skip("blocks of the global host allocator are still alive from another test")
    yield
    ma.set_memory_limit("cpu", 0)


def test_global_host_machine(idle_host_allocator):
    GlobalHostMachine.TestCase("runTest").runTest()
