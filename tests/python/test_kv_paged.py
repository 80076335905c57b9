"""PagedKVCache (memwarden.kv.paged) on its own, against a brute-force reference: a plain
list of dense ``[batch, kv_heads, tokens, head_dim]`` tensors per layer (issue 12, item 3).

Everything here is CPU-sized (a few layers, heads and pages); the whole file runs in a
few seconds.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memwarden._units import format_bytes
from memwarden.kv import KVEvictedError, PagedKVCache

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
L, H, D, P = 3, 2, 8, 4  # layers, kv heads, head dim, page size


# ---------------------------------------------------------------- the reference
class Reference:
    """What the cache should hold: per layer one dense K and V, and the positions."""

    def __init__(self, num_layers, batch, heads, head_dim, dtype):
        empty = torch.empty(batch, heads, 0, head_dim, dtype=dtype)
        self.keys = [empty.clone() for _ in range(num_layers)]
        self.values = [empty.clone() for _ in range(num_layers)]
        self.positions: list[int] = []
        self.next = 0
        self.dtype = dtype

    def add(self, layer, key, value):
        if layer == 0:
            n = key.shape[2]
            self.positions += list(range(self.next, self.next + n))
            self.next += n
        self.keys[layer] = torch.cat([self.keys[layer], key.to(self.dtype)], 2)
        self.values[layer] = torch.cat([self.values[layer], value.to(self.dtype)], 2)

    def remove(self, positions):
        drop = set(positions)
        keep = [i for i, p in enumerate(self.positions) if p not in drop]
        index = torch.tensor(keep, dtype=torch.long)
        self.keys = [k.index_select(2, index) for k in self.keys]
        self.values = [v.index_select(2, index) for v in self.values]
        self.positions = [self.positions[i] for i in keep]

    def crop(self, tokens):
        if tokens:
            cut = self.positions[-tokens:]
            self.remove(cut)
            self.next = cut[0]

    def select(self, indices):
        index = torch.tensor(indices, dtype=torch.long)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


def step(cache, ref, n, gen, layers=None):
    """Add n new tokens to every layer of cache and ref (random normal data)."""
    for layer in range(cache.num_layers if layers is None else layers):
        shape = (cache.batch_size, cache.num_kv_heads, n, cache.head_dim)
        k = torch.randn(shape, generator=gen).to(cache.dtype)
        v = torch.randn(shape, generator=gen).to(cache.dtype)
        cache.add(layer, k, v)
        ref.add(layer, k, v)


def int8_bound(ref_x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest |get() - x| allowed for an INT8 page, per (batch, head, token), broadcast over head_dim.

    Per (token, head) the step is s = absmax / 127 and q = round(x / s), so the rounding
    error is at most s / 2 = absmax / 254. On top of that: x * (127 / absmax) and q * s are
    each one float32 operation (relative error <= 2^-24 of a value <= absmax, so a few
    absmax * 2^-24), and the result is rounded to the output dtype (<= |x| * u, u the
    dtype's unit roundoff eps / 2: 2^-24 fp32, 2^-11 fp16, 2^-8 bf16). Hence
    absmax * (1/254 + u + 4 * 2^-24), plus a tiny absolute term for absmax == 0."""
    absmax = ref_x.float().abs().amax(-1, keepdim=True)
    u = torch.finfo(dtype).eps / 2
    return absmax * (1 / 254 + u + 4 * 2.0 ** -24) + 1e-30


def assert_matches(cache, ref, exact=True, int8_tokens=None):
    """get() of every layer against the reference, bitwise or within the INT8 bound."""
    assert cache.positions == ref.positions
    assert len(cache) == len(ref.positions)
    for layer in range(cache.num_layers):
        k, v = cache.get(layer)
        assert k.dtype == cache.dtype and k.shape == ref.keys[layer].shape
        for got, want in ((k, ref.keys[layer]), (v, ref.values[layer])):
            if exact:
                assert torch.equal(got, want), f"layer {layer} differs"
            else:
                err = (got.float() - want.float()).abs()
                bound = int8_bound(want, cache.dtype)
                assert bool((err <= bound).all()), f"layer {layer}: max excess {(err - bound).max().item()}"


def make(batch=2, dtype=torch.float32, **kw):
    kw.setdefault("page_size", P)
    cache = PagedKVCache(kw.pop("layers", L), H, D, batch_size=batch, dtype=dtype, **kw)
    return cache, Reference(cache.num_layers, batch, H, D, dtype)


# ---------------------------------------------------------------- round trips
CHUNKS = {"one_at_a_time": [1] * 11, "many": [7, 9], "page_boundaries": [4, 4, 3, 1, 5, 8], "mixed": [1, 6, 1, 1, 4]}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunks", list(CHUNKS.values()), ids=list(CHUNKS))
@pytest.mark.parametrize("batch", [1, 3])
def test_round_trip_auto_is_bitwise(dtype, chunks, batch):
    cache, ref = make(batch, dtype)
    gen = torch.Generator().manual_seed(0)
    for n in chunks:
        step(cache, ref, n, gen)
        assert_matches(cache, ref)
    assert cache.seq_length == sum(chunks)
    s = cache.stats()
    assert s.tokens == sum(chunks)
    assert s.pages_resident == math.ceil(sum(chunks) / P) and s.pages_compressed == s.pages_offloaded == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kv_dtype", ["int8", "int8_per_token_head"])
@pytest.mark.parametrize("chunks", [[1] * 9, [5, 6], [4, 4, 1]], ids=["one", "many", "boundary"])
def test_round_trip_int8_within_step(dtype, kv_dtype, chunks):
    cache, ref = make(2, dtype, kv_dtype=kv_dtype)
    gen = torch.Generator().manual_seed(1)
    for n in chunks:
        step(cache, ref, n, gen)
        assert_matches(cache, ref, exact=False)
    s = cache.stats()
    assert s.pages_compressed == math.ceil(sum(chunks) / P) and s.pages_resident == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_stats_report_the_error_of_pages_written_as_int8(dtype):
    # kv_dtype="int8" writes INT8 pages from the start (nothing is ever compressed): the
    # stats' INT8 error must still be the error of those pages, not 0
    cache, ref = make(1, dtype, kv_dtype="int8")
    gen = torch.Generator().manual_seed(1)
    for n in [5, 1, 1, 6]:
        step(cache, ref, n, gen)
    error = cache.stats().compression_error
    keys = ref.keys[0][0].transpose(0, 1).float()  # layer 0, first sequence: [tokens, heads, dim]
    seen = (cache.get(0)[0][0].transpose(0, 1).float() - keys).abs().amax() / keys.abs().amax()
    assert 0 < error <= 1 / 254 + 1e-6
    assert error >= 0.5 * seen.item()  # the same order as what get() gives back


def test_int8_residual_window_stays_exact():
    # residual_length: the newest tokens are kept in full precision (KIVI)
    cache, ref = make(1, torch.float16, kv_dtype="int8", residual_length=2 * P)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        step(cache, ref, P, gen)
    assert_matches(cache, ref, exact=False)
    k, _ = cache.get(0)
    assert torch.equal(k[:, :, -2 * P:], ref.keys[0][:, :, -2 * P:])
    assert cache.stats().pages_compressed >= 1


def test_int8_scale_is_per_token_and_head():
    # one huge entry in one (token, head) must not hurt the precision of the others
    cache, ref = make(1, torch.float32, kv_dtype="int8", layers=1)
    k = torch.randn(1, H, P, D, generator=torch.Generator().manual_seed(3))
    k[0, 0, 0, 0] = 1e4
    cache.add(0, k, k.clone())
    ref.add(0, k, k.clone())
    assert_matches(cache, ref, exact=False)
    got = cache.get(0)[0]
    assert (got[0, 1] - k[0, 1]).abs().max() <= k[0, 1].abs().amax() / 254 + 1e-6


# ---------------------------------------------------------------- budgets
@pytest.mark.parametrize("as_string", [False, True], ids=["bytes", "KiB"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_budget_forces_compression(as_string, dtype):
    slot = PagedKVCache(L, H, D, dtype=dtype, page_size=P).slot_bytes
    budget = 8 * slot
    if as_string:
        budget_arg = f"{budget / 1024}KiB"
    else:
        budget_arg = budget
    cache, ref = make(1, dtype, max_memory=budget_arg)
    assert cache.max_memory == budget
    gen = torch.Generator().manual_seed(4)
    for n in [3] + [1] * 40:  # 43 tokens = 11 pages > 8 slots: only compression makes room
        step(cache, ref, n, gen)
    s = cache.stats()
    assert s.pages_compressed > 0 and s.pages_offloaded == 0 and s.pages_evicted == 0
    assert s.budget_bytes == budget and 0 < s.budget_used <= 1
    assert 0 < s.compression_error <= 1 / 254 + 1e-6
    assert cache.nbytes <= budget
    assert_matches(cache, ref, exact=False)
    check_stats(cache)


def check_stats(cache):
    s = cache.stats()
    assert s.tokens == len(cache)
    live = [p for p in cache._pages if not p.evicted]
    assert s.pages_resident + s.pages_compressed + s.pages_offloaded == len(live)
    device = s.bytes_by_state["device"]
    assert device == cache.batch_size * (s.pages_resident * cache.page_bytes("fp")
                                         + s.pages_compressed * cache.page_bytes("q"))
    assert sum(s.bytes_by_state.values()) >= device
    if s.budget_used is not None:
        assert 0 <= s.budget_used <= 1
    assert 0 <= s.offload_hit_rate <= 1 and s.offloaded_reads <= s.reads
    assert s.compression_error <= 1 / 254 + 1e-6
    str(s)


@pytest.mark.parametrize("compress", ["never", "pressure"])
def test_offload_host(compress):
    slot = PagedKVCache(L, H, D, dtype=torch.float16, page_size=P, compress=compress).slot_bytes
    cache, ref = make(2, torch.float16, max_memory=4 * slot, offload="host", compress=compress)
    gen = torch.Generator().manual_seed(5)
    for n in [5] + [1] * 30:
        step(cache, ref, n, gen)
    s = cache.stats()
    assert s.pages_offloaded > 0 and "host" in s.bytes_by_state and s.pages_evicted == 0
    assert_matches(cache, ref, exact=compress == "never")
    s = cache.stats()
    assert s.offloaded_reads > 0 and 0 < s.offload_hit_rate <= 1
    check_stats(cache)


def test_offload_host_and_disk(tmp_path):
    slot = PagedKVCache(L, H, D, dtype=torch.float16, page_size=P, compress="never").slot_bytes
    cache, ref = make(1, torch.float16, max_memory=3 * slot, offload="host+disk", host_memory=2 * slot,
                      compress="never", disk_dir=str(tmp_path))
    gen = torch.Generator().manual_seed(6)
    for n in [2] + [1] * 30:
        step(cache, ref, n, gen)
    s = cache.stats()
    assert s.bytes_by_state.get("disk", 0) > 0 and s.bytes_by_state.get("host", 0) > 0
    assert_matches(cache, ref)
    assert list(tmp_path.iterdir()) == []  # the mapping is unlinked at once
    check_stats(cache)


def test_evict_raise():
    slot = PagedKVCache(L, H, D, dtype=torch.float16, page_size=P, compress="never").slot_bytes
    cache, ref = make(1, torch.float16, max_memory=3 * slot, offload="evict", compress="never")
    gen = torch.Generator().manual_seed(7)
    for n in [1] * 20:
        step(cache, ref, n, gen)
    assert cache.stats().pages_evicted > 0
    with pytest.raises(KVEvictedError, match="evicted"):
        cache.get(0)
    assert issubclass(KVEvictedError, LookupError)


def test_evict_skip_returns_live_tokens():
    slot = PagedKVCache(L, H, D, dtype=torch.float16, page_size=P, compress="never").slot_bytes
    cache, ref = make(2, torch.float16, max_memory=4 * slot, offload="evict", compress="never", missing="skip")
    gen = torch.Generator().manual_seed(8)
    for n in [3] + [1] * 25:
        step(cache, ref, n, gen)
    s = cache.stats()
    assert s.pages_evicted > 0
    live = cache.positions
    assert live == sorted(live) and len(live) < 28 and live[-1] == 27
    ref.remove([p for p in ref.positions if p not in set(live)])
    assert_matches(cache, ref)
    assert cache.seq_length == 28
    check_stats(cache)


# ---------------------------------------------------------------- pruning, crop, select
def filled(batch=2, dtype=torch.float32, seed=9, **kw):
    """22 tokens in chunks that cross page boundaries."""
    cache, ref = make(batch, dtype, **kw)
    gen = torch.Generator().manual_seed(seed)
    for k in [5, 1, 1, 7, 1, 3, 4]:
        step(cache, ref, k, gen)
    return cache, ref, gen


def test_remove_tokens_against_reference():
    cache, ref, gen = filled()
    drop = [0, 3, 4, 5, 6, 7, 13, 21]  # a whole page (4..7), parts of others, the newest
    assert cache.remove_tokens(drop) == len(drop)
    ref.remove(drop)
    assert_matches(cache, ref)
    assert cache.stats().tokens_removed == len(drop)
    assert cache.remove_tokens([0, 999]) == 0  # already gone / never there
    step(cache, ref, 6, gen)  # new tokens after a removal keep counting positions
    assert_matches(cache, ref)
    check_stats(cache)


def test_prune_streaming_keeps_sinks_and_window():
    cache, ref, gen = filled()  # 22 tokens, pages [0..3] [4..7] ... [20, 21]
    removed = cache.prune_streaming(sinks=2, window=5)
    live = cache.positions
    # whole pages only: every page that holds a sink or a window token stays
    protected = set(range(2)) | set(range(17, 22))
    expect = [p for p in range(22) if any(q // P == p // P for q in protected)]
    assert live == expect and removed == 22 - len(expect)
    ref.remove([p for p in range(22) if p not in expect])
    assert_matches(cache, ref)
    assert cache.prune_streaming(sinks=2, window=50) == 0
    step(cache, ref, 3, gen)
    assert_matches(cache, ref)


def test_prune_scores_keeps_top_and_recent():
    cache, ref, _ = filled()
    scores = torch.randperm(22, generator=torch.Generator().manual_seed(10)).float()
    kept = set(scores.argsort(descending=True)[:6].tolist()) | set(range(19, 22))
    removed = cache.prune_scores(scores, keep=6, protect_recent=3)
    assert removed == 22 - len(kept)
    ref.remove([p for p in range(22) if p not in kept])
    assert_matches(cache, ref)
    with pytest.raises(ValueError, match="scores"):
        cache.prune_scores(torch.zeros(3), keep=1)


@pytest.mark.parametrize("tokens", [0, 1, 2, 4, 9, 22])
def test_crop_against_reference(tokens):
    cache, ref, gen = filled()
    cache.crop(tokens)
    ref.crop(tokens)
    assert_matches(cache, ref)
    assert cache.seq_length == ref.next == 22 - tokens
    assert cache.stats().tokens_removed == 0  # a rollback, not pruning
    step(cache, ref, 5, gen)
    assert_matches(cache, ref)
    with pytest.raises(ValueError, match="tokens"):
        cache.crop(len(cache) + 1)


@pytest.mark.parametrize("indices", [[1, 0], [0, 0], [1, 1, 0, 0], [1]], ids=str)
def test_select_beam_style(indices):
    cache, ref, gen = filled()
    cache.select(indices)
    ref.select(indices)
    assert cache.batch_size == len(indices)
    assert_matches(cache, ref)
    step(cache, ref, 6, gen)
    assert_matches(cache, ref)
    check_stats(cache)


def test_select_int8_and_offloaded():
    slot = PagedKVCache(L, H, D, dtype=torch.float16, page_size=P).slot_bytes
    cache, ref = make(2, torch.float16, max_memory=8 * slot, offload="host")
    gen = torch.Generator().manual_seed(11)
    for n in [4] * 6:
        step(cache, ref, n, gen)
    cache.select([1, 1, 0])
    ref.select([1, 1, 0])
    step(cache, ref, 3, gen)
    assert_matches(cache, ref, exact=False)


def test_select_repeats_under_budget_with_disk():
    kw = dict(page_size=1, dtype=torch.float32, compress="never")
    slot = PagedKVCache(2, H, D, **kw).slot_bytes
    cache = PagedKVCache(2, H, D, max_memory=4 * slot, offload="host+disk", host_memory=3 * slot, **kw)
    ref = Reference(2, 1, H, D, torch.float32)
    step(cache, ref, 3, torch.Generator().manual_seed(13))
    cache.select([0, 0, 0])
    ref.select([0, 0, 0])
    assert_matches(cache, ref)


def test_reset():
    cache, ref, gen = filled()
    cache.reset()
    assert len(cache) == 0 and cache.seq_length == 0 and cache.positions == []
    assert cache.stats().pages_resident == 0
    for layer in range(L):
        assert cache.get(layer)[0].shape == (2, H, 0, D)
    ref2 = Reference(L, 2, H, D, torch.float32)
    step(cache, ref2, 9, torch.Generator().manual_seed(12))
    assert_matches(cache, ref2)


def test_positions_argument():
    cache, _ = make(1, layers=1)
    k = torch.zeros(1, H, 3, D)
    cache.add(0, k, k, positions=[10, 20, 30])
    assert cache.positions == [10, 20, 30] and cache.seq_length == 31
    with pytest.raises(ValueError, match="positions"):
        cache.add(0, k, k, positions=[31, 31, 32])
    with pytest.raises(ValueError, match="positions"):
        cache.add(0, k, k, positions=[5, 40, 41])  # not after the last one
    with pytest.raises(ValueError, match="positions"):
        cache.add(0, k, k, positions=[40, 41])  # wrong count


# ---------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(kv_dtype="fp8"), ValueError, "kv_dtype"),
    (dict(offload="gpu"), ValueError, "offload"),
    (dict(compress="sometimes"), ValueError, "compress"),
    (dict(missing="ignore"), ValueError, "missing"),
    (dict(threshold=0), ValueError, "threshold"),
    (dict(threshold=2), ValueError, "threshold"),
    (dict(threshold=True), ValueError, "threshold"),
    (dict(dtype=torch.int8), TypeError, "dtype"),
    (dict(page_size=0), ValueError, "page_size"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(residual_length=-1), ValueError, "residual_length"),
    (dict(max_memory="lots"), ValueError, "max_memory"),
    (dict(max_memory=-5), ValueError, "max_memory"),
], ids=lambda x: str(x) if not isinstance(x, dict) else "-".join(f"{k}={v}" for k, v in x.items()))
def test_bad_constructor_arguments(kwargs, exc, name):
    base = dict(batch_size=2, page_size=P, dtype=torch.float16)
    base.update(kwargs)
    with pytest.raises(exc, match=name):
        PagedKVCache(L, H, D, **base)


@pytest.mark.parametrize("batch", [1, 3])
def test_budget_below_two_pages_per_sequence(batch):
    slot = PagedKVCache(L, H, D, dtype=torch.float16, page_size=P).slot_bytes
    with pytest.raises(ValueError, match="max_memory"):
        PagedKVCache(L, H, D, batch_size=batch, page_size=P, dtype=torch.float16, max_memory=2 * batch * slot - 1)
    PagedKVCache(L, H, D, batch_size=batch, page_size=P, dtype=torch.float16, max_memory=2 * batch * slot)


def test_bad_call_arguments():
    cache, _ = make(2, layers=2)
    k = torch.zeros(2, H, 1, D)
    for layer in (2, -1, "0", 1.0):
        with pytest.raises(ValueError, match="layer"):
            cache.add(layer, k, k)
        with pytest.raises(ValueError, match="layer"):
            cache.get(layer)
    with pytest.raises(ValueError, match="key"):
        cache.add(0, torch.zeros(1, H, 1, D), torch.zeros(1, H, 1, D))  # batch
    with pytest.raises(ValueError, match="key"):
        cache.add(0, torch.zeros(2, H + 1, 1, D), torch.zeros(2, H + 1, 1, D))  # heads
    with pytest.raises(ValueError, match="key"):
        cache.add(0, torch.zeros(2, H, D), torch.zeros(2, H, D))  # 3-D
    with pytest.raises(ValueError, match="value"):
        cache.add(0, k, torch.zeros(2, H, 1, D + 1))
    with pytest.raises(ValueError, match="value"):
        cache.add(0, k, torch.zeros(2, H, 2, D))  # key and value disagree on tokens
    with pytest.raises(TypeError, match="key"):
        cache.add(0, k.numpy(), k)
    with pytest.raises(ValueError, match="key"):
        cache.add(0, k.to("meta"), k.to("meta"))  # wrong device
    with pytest.raises(ValueError, match="layer 1"):
        cache.add(1, k, k)  # layer 1 before layer 0 has the step
    with pytest.raises(ValueError, match="indices"):
        cache.select([2])
    with pytest.raises(ValueError, match="indices"):
        cache.select([])
    with pytest.raises(ValueError, match="sinks"):
        cache.prune_streaming(-1, 4)
    with pytest.raises(ValueError, match="tokens"):
        cache.crop(-1)
    assert len(cache) == 0 and cache.seq_length == 0  # nothing changed


# ---------------------------------------------------------------- a state machine
class PagedMachine(RuleBasedStateMachine):
    """add / get / remove_tokens / crop / select / prune against the reference."""

    @initialize(batch=st.integers(1, 3), page_size=st.sampled_from([1, 2, 3, 4]), dtype=st.sampled_from(DTYPES),
                mode=st.sampled_from([None, "int8", "compress", "host", "disk", "evict"]))
    def setup(self, batch, page_size, dtype, mode):
        def slot(**kw):
            return PagedKVCache(2, H, D, dtype=dtype, page_size=page_size, **kw).slot_bytes

        kw = {}  # every budget holds one step (<= 9 tokens: 9 pages of 1 per sequence) and more
        if mode == "int8":
            kw.update(kv_dtype="int8", residual_length=page_size)
        elif mode == "compress":
            kw.update(max_memory=16 * batch * slot())
        elif mode == "host":
            kw.update(max_memory=12 * batch * slot(), offload="host")  # one step (<= 9 pages) always fits
        elif mode == "disk":
            kw.update(max_memory=12 * batch * slot(compress="never"), offload="host+disk", compress="never",
                      host_memory=3 * batch * slot(compress="never"))
        elif mode == "evict":
            kw.update(max_memory=12 * batch * slot(compress="never"), offload="evict", missing="skip",
                      compress="never")
        self.budget = "max_memory" in kw
        self.exact = mode in (None, "disk", "evict")
        self.cache = PagedKVCache(2, H, D, batch_size=batch, page_size=page_size, dtype=dtype, **kw)
        self.ref = Reference(2, batch, H, D, dtype)
        self.gen = torch.Generator().manual_seed(batch * 100 + page_size)

    def sync_evicted(self):
        live = set(self.cache.positions)
        gone = [p for p in self.ref.positions if p not in live]
        if gone:
            self.ref.remove(gone)

    @rule(n=st.integers(1, 9))
    def add(self, n):
        step(self.cache, self.ref, n, self.gen)
        self.sync_evicted()

    @rule()
    def get(self):
        assert_matches(self.cache, self.ref, exact=self.exact)

    @precondition(lambda self: len(self.ref.positions) > 0)
    @rule(data=st.data())
    def remove(self, data):
        drop = data.draw(st.lists(st.sampled_from(self.ref.positions), max_size=6))
        assert self.cache.remove_tokens(drop) == len(set(drop))
        self.ref.remove(drop)

    @rule(data=st.data())
    def crop(self, data):
        tokens = data.draw(st.integers(0, len(self.ref.positions)))
        self.cache.crop(tokens)
        self.ref.crop(tokens)
        if tokens:
            assert self.cache.seq_length == self.ref.next

    @rule(data=st.data())
    def select(self, data):
        b = self.cache.batch_size
        indices = data.draw(st.lists(st.integers(0, b - 1), min_size=1, max_size=3))
        try:
            self.cache.select(indices)
        except MemoryError:  # no room for the copies under the budget: nothing may have changed
            assert self.cache.batch_size == b
            return
        self.ref.select(indices)
        self.sync_evicted()

    @rule(sinks=st.integers(0, 3), window=st.integers(1, 6))
    def prune_streaming(self, sinks, window):
        before = list(self.cache.positions)
        removed = self.cache.prune_streaming(sinks, window)
        after = self.cache.positions
        assert len(before) - len(after) == removed
        if len(before) > sinks + window:
            assert set(before[:sinks]) | set(before[-window:]) <= set(after)
        self.ref.remove([p for p in before if p not in set(after)])

    @precondition(lambda self: len(self.ref.positions) > 0)
    @rule(data=st.data(), keep=st.integers(0, 5), recent=st.integers(0, 3))
    def prune_scores(self, data, keep, recent):
        n = len(self.ref.positions)
        scores = torch.tensor(data.draw(st.permutations(range(n))), dtype=torch.float32)
        kept = set(scores.argsort(descending=True)[:keep].tolist()) | set(range(max(0, n - recent), n))
        assert self.cache.prune_scores(scores, keep, recent) == n - len(kept)
        self.ref.remove([p for i, p in enumerate(self.ref.positions) if i not in kept])

    @invariant()
    def consistent(self):
        if hasattr(self, "cache"):
            assert self.cache.positions == self.ref.positions
            check_stats(self.cache)


PagedMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=15, derandomize=True, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_paged_state_machine = PagedMachine.TestCase


def test_every_layer_of_a_step_reads_the_same_tokens():
    slot = PagedKVCache(2, 1, 4, dtype=torch.float32, page_size=8, compress="never").slot_bytes
    cache = PagedKVCache(2, 1, 4, page_size=8, dtype=torch.float32, max_memory=2 * slot, offload="evict",
                         compress="never", missing="skip")
    x = torch.randn(1, 1, 16, 4)
    cache.add(0, x, x)
    first = cache.get(0)[0].shape[2]
    cache.add(1, x, x)
    assert cache.get(1)[0].shape[2] == first == 16


def test_the_budget_pool_is_allocated_at_the_first_page():
    """PagedCache checks its options by building a store: that must cost no memory."""
    cache = PagedKVCache(2, 2, 8, dtype=torch.float32, page_size=4, max_memory="64KiB")
    assert cache.nbytes == 0
    x = torch.randn(1, 2, 1, 8)
    cache.add(0, x, x)
    slots = 64 * 1024 // cache.slot_bytes
    assert cache.nbytes == slots * cache.slot_bytes  # the whole budget's pool, scales included


def test_repr_and_html_show_the_tokens_and_the_budget_first():
    store = PagedKVCache(L, H, D, page_size=P, dtype=torch.float32, max_memory="64KiB")
    slots = 65536 // store.slot_bytes
    assert repr(store) == (f"<PagedKVCache 0 tokens: 0 pages resident, 0 compressed, 0 offloaded, 0 evicted; "
                           f"device 0 B; budget 64.00 KiB (0% used); {L} layers, pages of {P} tokens, float32 on cpu>")
    for layer in range(L):
        store.add(layer, torch.randn(1, H, 9, D), torch.randn(1, H, 9, D))
    page = 2 * L * P * H * D * 4  # one page of every layer, K and V, float32
    text = repr(store)
    assert text.startswith("<PagedKVCache 9 tokens: 3 pages resident") and len(text) < 250
    assert f"device {format_bytes(3 * page)}" in text and f"budget 64.00 KiB ({3 / slots:.0%} used)" in text
    html = store._repr_html_()
    assert html.startswith(f"<div><b>KV cache: 9 tokens, {3 / slots:.0%} of the 64.00 KiB budget used</b>")
    assert f"device: {format_bytes(3 * page)}" in html and html.count("<table>") == 1
