"""memwarden.kv block manager: unit tests. The hypothesis state machines against a plain
Python model (free queue order, ref counts, cached prefixes, block tables, statistics, bad
arguments) are in test_fuzz_block_manager.py, the models in kv_block_model.py."""
import pytest

import memwarden.kv as kv

# ---- direct tests -----------------------------------------------------------------------

def test_block_pool_basics():
    pool = kv.BlockPool(4)
    assert pool.allocate(5) is None and pool.num_free == 4
    blocks = pool.allocate(3)
    assert blocks == [0, 1, 2]
    assert pool.cache(0, 11) and not pool.cache(1, 11)
    pool.release([0, 1])
    assert pool.free_queue() == [1, 3, 0]  # unhashed 1 first, hashed 0 last
    assert pool.lookup(11) == 0 and pool.hash_of(0) == 11 and pool.hash_of(1) is None
    pool.touch(0)
    assert pool.ref_count(0) == 1 and pool.free_queue() == [1, 3]
    with pytest.raises(IndexError, match="out of range for 4 blocks"):
        pool.touch(4)
    with pytest.raises(ValueError, match="released more often"):
        pool.release([1])


def test_manager_prefix_fork_cow_and_stats():
    m = kv.KVCacheManager(8, 4, num_host_blocks=4)
    assert m.add_sequence(1, list(range(10))) == 0
    assert m.add_sequence(2, list(range(9))) == 8
    m.fork(2, 3)
    copies = m.append(3, [99])
    assert copies == [(m.block_table(2)[2], m.block_table(3)[2])]
    s = m.stats()
    assert s["num_cow_copies"] == 1 and s["prefix_hit_tokens"] == 8 and s["prefix_query_tokens"] == 19
    assert s["usage"] == 5 / 8  # seq 1: 3 blocks, seq 2: 2 shared + 1, seq 3: the copy of seq 2's last block
    assert m.slot_mapping(1, 3, 5) == [m.block_table(1)[0] * 4 + 3, m.block_table(1)[1] * 4]
    with pytest.raises(IndexError, match="unknown sequence 42"):
        m.free_sequence(42)
    with pytest.raises(ValueError, match="already exists"):
        m.add_sequence(1, [])
    with pytest.raises(ValueError, match="block_size must be an integer in \\[1, "):
        kv.KVCacheManager(4, 0)


def test_hash_block_chains():
    a = kv.hash_block(kv.ROOT_HASH, [1, 2, 3, 4])
    assert a == kv.hash_block(kv.ROOT_HASH, [1, 2, 3, 4])
    assert a != kv.hash_block(kv.ROOT_HASH, [1, 2, 3, 5])
    assert a != kv.hash_block(kv.ROOT_HASH, [1, 2, 3, 4], extra_key=1)
    assert kv.hash_block(a, [5, 6, 7, 8]) != kv.hash_block(kv.ROOT_HASH, [5, 6, 7, 8])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_blocks=4, block_size=16, num_host_blocks=-1), "num_host_blocks"),  # blamed num_blocks
        (dict(num_blocks=-1, block_size=16), "num_blocks"),
        (dict(num_blocks=2**70, block_size=16), "num_blocks"),  # pybind: "incompatible constructor arguments"
        (dict(num_blocks=4, block_size=2**70), "block_size"),
        (dict(num_blocks=4, block_size=16, num_host_blocks=2**70), "num_host_blocks"),
        (dict(num_blocks=2**31 - 1, block_size=16), "num_blocks"),
        (dict(num_blocks=4.0, block_size=16), "num_blocks"),
        (dict(num_blocks=4, block_size=True), "block_size"),
        (dict(num_blocks=4, block_size=16, num_host_blocks="2"), "num_host_blocks"),
    ],
)
def test_manager_constructor_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^KVCacheManager: {name} must be "):
        kv.KVCacheManager(**kwargs)


def test_manager_is_still_the_native_class():
    import memwarden._C as C

    m = kv.KVCacheManager(8, 4, 2, False)
    assert isinstance(m, C.kv.KVCacheManager) and isinstance(m.device_pool, kv.BlockPool)
    assert m.block_size == 4 and m.stats()["num_host_blocks"] == 2 and m.stats()["num_blocks"] == 8
    m2 = kv.KVCacheManager(num_blocks=3, block_size=2, num_host_blocks=0, enable_prefix_caching=True)
    assert m2.stats()["num_free_blocks"] == 3 and type(m2).__module__ == "memwarden.kv"
    with pytest.raises(AttributeError):
        m.not_an_attribute = 1  # no __dict__, like the native class


# ---- displays -----------------------------------------------------------------------------

def _cells(*cells):
    return "".join(f'<td style="text-align:{"left" if i == 0 else "right"}">{c}</td>' for i, c in enumerate(cells))


def test_pool_and_manager_show_their_usage_first():
    m = kv.KVCacheManager(16, 4, num_host_blocks=4)
    m.add_sequence(1, list(range(10)))  # 3 blocks
    m.add_sequence(2, list(range(9)))   # its 2 full blocks are seq 1's (8 of the 19 tokens asked hit), 1 more
    assert repr(m) == ("<KVCacheManager: 25.0% of 16 blocks of 4 tokens in use, 2 sequences, prefix hit rate 42.1%, "
                       "host 0 of 4 blocks in use>")
    html = m._repr_html_()
    assert html.startswith("<div><b>KVCacheManager: 25.0% of 16 blocks in use, 2 sequences") and html.count("<table>") == 1
    assert _cells("device", "25.0%", 4, 12, 16) in html and _cells("host", "0.0%", 0, 4, 0) in html
    assert "prefix hits 8 of 19 tokens (42.1%)" in html and "2 prefix-cached blocks" in html
    pool = m.device_pool
    assert repr(pool) == "BlockPool(num_blocks=16, num_free=12, num_cached=2)"  # the binding's
    html = pool._repr_html_()
    assert "BlockPool: 25.0% in use (4 of 16 blocks)" in html
    assert _cells("in use", 4) in html and _cells("free", 12) in html and _cells("prefix-cached", 2) in html
    assert "BlockPool: n/a in use (0 of 0 blocks)" in kv.BlockPool(0)._repr_html_()
    assert "host" not in repr(kv.KVCacheManager(4, 4)) and "host" not in kv.KVCacheManager(4, 4)._repr_html_()
