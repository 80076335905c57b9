"""memwarden.kv block manager: unit tests and a hypothesis state machine against a plain
Python model (free queue order, ref counts, cached prefixes, block tables)."""
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import memwarden.kv as kv

BLOCK_SIZE = 4
NUM_BLOCKS = 16
NUM_HOST_BLOCKS = 8


class PoolModel:
    """A BlockPool in plain Python: the free queue is a list (front = next allocated)."""

    def __init__(self, n, caching=True):
        self.refs = [0] * n
        self.free = list(range(n))
        self.caching = caching
        self.cache = {}  # key -> block
        self.key_of = {}  # block -> key

    def allocate(self, n):
        if n > len(self.free):
            return None
        out = [self.free.pop(0) for _ in range(n)]
        for b in out:
            if b in self.key_of:
                del self.cache[self.key_of.pop(b)]
            self.refs[b] = 1
        return out

    def touch(self, b):
        if self.refs[b] == 0:
            self.free.remove(b)
        self.refs[b] += 1

    def release(self, blocks):
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.free.append(b)
                else:
                    self.free.insert(0, b)

    def cache_block(self, b, key):
        if not self.caching or b in self.key_of or key in self.cache:
            return
        self.cache[key] = b
        self.key_of[b] = key


class ManagerModel:
    def __init__(self):
        self.dev = PoolModel(NUM_BLOCKS)
        self.host = PoolModel(NUM_HOST_BLOCKS, caching=False)
        self.seqs = {}  # id -> dict(blocks, tokens, extra, swapped)

    @staticmethod
    def keys(tokens, extra):
        return [(extra, tuple(tokens[: (i + 1) * BLOCK_SIZE])) for i in range(len(tokens) // BLOCK_SIZE)]

    def cache_full(self, seq, start):
        for i, key in enumerate(self.keys(seq["tokens"], seq["extra"])):
            if i >= start:
                self.dev.cache_block(seq["blocks"][i], key)

    def lookup(self, tokens, extra):
        hits = 0
        for key in self.keys(tokens, extra):
            if key not in self.dev.cache:
                break
            hits += 1
        return hits * BLOCK_SIZE

    def add(self, sid, tokens, extra):
        hits = []
        for key in self.keys(tokens, extra):
            if key not in self.dev.cache:
                break
            hits.append(self.dev.cache[key])
        free_hits = sum(1 for b in hits if self.dev.refs[b] == 0)
        needed = -(-len(tokens) // BLOCK_SIZE) - len(hits)
        if needed > len(self.dev.free) - free_hits:
            return None
        for b in hits:
            self.dev.touch(b)
        seq = dict(blocks=hits + self.dev.allocate(needed), tokens=list(tokens), extra=extra, swapped=False)
        self.cache_full(seq, len(hits))
        self.seqs[sid] = seq
        return len(hits) * BLOCK_SIZE

    def append(self, sid, tokens):
        seq = self.seqs[sid]
        if not tokens:
            return []
        n = len(seq["tokens"])
        want = -(-(n + len(tokens)) // BLOCK_SIZE)
        have = len(seq["blocks"])
        cow = n % BLOCK_SIZE != 0 and self.dev.refs[seq["blocks"][-1]] > 1
        if want - have + cow > len(self.dev.free):
            return None
        copies = []
        if cow:
            old = seq["blocks"][-1]
            new = self.dev.allocate(1)[0]
            self.dev.release([old])
            seq["blocks"][-1] = new
            copies.append((old, new))
        if want > have:
            seq["blocks"] += self.dev.allocate(want - have)
        seq["tokens"] += tokens
        self.cache_full(seq, n // BLOCK_SIZE)
        return copies

    def fork(self, parent, child):
        p = self.seqs[parent]
        for b in p["blocks"]:
            self.dev.touch(b)
        self.seqs[child] = dict(blocks=list(p["blocks"]), tokens=list(p["tokens"]), extra=p["extra"], swapped=False)

    def free(self, sid):
        seq = self.seqs.pop(sid)
        (self.host if seq["swapped"] else self.dev).release(list(reversed(seq["blocks"])))

    def swap(self, sid, out):
        seq = self.seqs[sid]
        src, dst = (self.dev, self.host) if out else (self.host, self.dev)
        new = dst.allocate(len(seq["blocks"]))
        if new is None:
            return None
        pairs = list(zip(seq["blocks"], new))
        src.release(list(reversed(seq["blocks"])))
        seq["blocks"] = new
        seq["swapped"] = out
        if not out:
            self.cache_full(seq, 0)
        return pairs


tokens_st = st.lists(st.integers(0, 2), min_size=0, max_size=14)


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.real = kv.KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, NUM_HOST_BLOCKS)
        self.model = ManagerModel()
        self.next_id = 0

    def resident(self):
        return sorted(s for s, v in self.model.seqs.items() if not v["swapped"])

    def swapped(self):
        return sorted(s for s, v in self.model.seqs.items() if v["swapped"])

    @rule(tokens=tokens_st, extra=st.sampled_from([0, 0, 0, 7]))
    def add(self, tokens, extra):
        sid = self.next_id
        self.next_id += 1
        assert self.real.add_sequence(sid, tokens, extra) == self.model.add(sid, tokens, extra)

    @precondition(lambda self: self.resident())
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 2), min_size=0, max_size=9))
    def append(self, data, tokens):
        sid = data.draw(st.sampled_from(self.resident()))
        got = self.real.append(sid, tokens)
        assert (None if got is None else [tuple(p) for p in got]) == self.model.append(sid, tokens)

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.resident()))
        child = self.next_id
        self.next_id += 1
        self.real.fork(parent, child)
        self.model.fork(parent, child)

    @precondition(lambda self: self.model.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.model.seqs)))
        self.real.free_sequence(sid)
        self.model.free(sid)

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def swap_out(self, data):
        sid = data.draw(st.sampled_from(self.resident()))
        got = self.real.swap_out(sid)
        assert (None if got is None else [tuple(p) for p in got]) == self.model.swap(sid, True)

    @precondition(lambda self: self.swapped())
    @rule(data=st.data())
    def swap_in(self, data):
        sid = data.draw(st.sampled_from(self.swapped()))
        got = self.real.swap_in(sid)
        assert (None if got is None else [tuple(p) for p in got]) == self.model.swap(sid, False)

    @rule(tokens=tokens_st, extra=st.sampled_from([0, 7]))
    def lookup(self, tokens, extra):
        assert self.real.lookup(tokens, extra) == self.model.lookup(tokens, extra)

    @invariant()
    def same_state(self):
        pool = self.real.device_pool
        assert pool.free_queue() == self.model.dev.free
        assert [pool.ref_count(b) for b in range(NUM_BLOCKS)] == self.model.dev.refs
        assert pool.num_cached == len(self.model.dev.cache)
        assert self.real.host_pool.free_queue() == self.model.host.free
        assert self.real.sequence_ids() == sorted(self.model.seqs)
        for sid, seq in self.model.seqs.items():
            assert self.real.block_table(sid) == seq["blocks"]
            assert self.real.num_tokens(sid) == len(seq["tokens"])
            assert self.real.is_swapped(sid) == seq["swapped"]
            if not seq["swapped"]:
                assert self.real.lookup(seq["tokens"], seq["extra"]) == self.model.lookup(seq["tokens"], seq["extra"])

    @invariant()
    def ownership_matches_ref_counts(self):
        # Every reference is held by exactly one resident sequence's table entry; a block
        # with ref 0 is free, and nothing is both free and owned.
        owners = [0] * NUM_BLOCKS
        host_owners = [0] * NUM_HOST_BLOCKS
        for seq in self.model.seqs.values():
            for b in seq["blocks"]:
                (host_owners if seq["swapped"] else owners)[b] += 1
        pool = self.real.device_pool
        assert owners == [pool.ref_count(b) for b in range(NUM_BLOCKS)]
        assert host_owners == [self.real.host_pool.ref_count(b) for b in range(NUM_HOST_BLOCKS)]
        free = set(pool.free_queue())
        assert free == {b for b in range(NUM_BLOCKS) if owners[b] == 0}
        assert len(free) == len(pool.free_queue())
        for sid, seq in self.model.seqs.items():
            if not seq["swapped"]:
                n = len(seq["tokens"])
                expected = [seq["blocks"][t // BLOCK_SIZE] * BLOCK_SIZE + t % BLOCK_SIZE for t in range(n)]
                assert self.real.slot_mapping(sid, 0, n) == expected


ManagerMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
TestManagerMachine = ManagerMachine.TestCase


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
