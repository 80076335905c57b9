"""Hypothesis state machines of the paged-KV block manager (issue 11, item 2):
memwarden.kv.KVCacheManager and BlockPool against the brute-force models of
kv_block_model.py.

The manager machine (moved here from test_kv_block_pool.py and extended) draws its
configuration (device blocks, block size, host blocks, prefix caching on or off), then
random sequences of add / append / fork / free / swap_out / swap_in / lookup /
slot_mapping and queries, on existing, swapped and unknown sequence ids (int64 extremes
included). After every step the free queues (LRU eviction order), ref counts, cached
prefixes, block tables, slot mappings and every statistic equal the model's; allocation is
all-or-nothing (a refused call changes nothing). Misuse raises what the model raises
(IndexError for an unknown id, ValueError otherwise) and bad arguments (ints beyond
int64/int32/uint64, negative sizes, floats, strings, None) are a TypeError/ValueError
naming the argument, with nothing changed. ``--fuzz-long`` runs 20x the examples.
"""
import pytest
from hypothesis import given, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import fuzz_runner as fr
import memwarden.kv as kv
from kv_block_model import ManagerModel, PoolModel

examples, fuzz_settings = fr.examples, fr.fuzz_settings

INT64 = (-(2**63), 2**63 - 1)
# Argument values that are not what the binding takes (the bound type is in the comment).
BAD_INT64 = (2**63, -(2**63) - 1, 1.5, "1", None)          # seq_id, parent, child, start, end
BAD_TOKENS = ([2**31], [-(2**31) - 1], [1.5], "abc", None, 5)  # list of int32
BAD_UINT64 = (-1, 2**64, 1.5, None)                         # extra_key, hash
BAD_INT32 = (2**31, -(2**31) - 1, 1.5, "2", None)           # n, block

def expect_clear_error(where, arg, fn):
    """``fn`` raises a TypeError/ValueError naming ``arg``."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - classified
        fr.classify_error(where, exc, [("bad argument", arg)])
        return
    raise AssertionError(f"{where}: a bad {arg} was accepted")


def same_outcome(real, model):
    """Both calls return the same value or raise the same exception type."""
    try:
        want = model()
    except (IndexError, ValueError) as exc:
        with pytest.raises(type(exc)):
            real()
        return None
    got = real()
    if isinstance(got, list) and got and isinstance(got[0], tuple):
        got = [tuple(p) for p in got]
    assert got == want, (got, want)
    return got


ids = st.one_of(st.integers(0, 12), st.sampled_from(INT64 + (-1,)))
tokens_st = st.one_of(st.lists(st.integers(0, 2), max_size=14),
                      st.lists(st.sampled_from([0, 2**31 - 1, -(2**31)]), max_size=6))


class ManagerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.sampled_from([0, 1, 3, 8, 16]), block_size=st.sampled_from([1, 2, 4]),
                num_host_blocks=st.sampled_from([0, 2, 8]), caching=st.booleans())
    def setup(self, num_blocks, block_size, num_host_blocks, caching):
        self.real = kv.KVCacheManager(num_blocks, block_size, num_host_blocks, caching)
        self.model = ManagerModel(num_blocks, block_size, num_host_blocks, caching)

    def resident(self):
        return sorted(s for s, v in self.model.seqs.items() if not v["swapped"])

    def swapped(self):
        return sorted(s for s, v in self.model.seqs.items() if v["swapped"])

    def any_id(self, data):
        """An existing id (when there is one) or any id."""
        if self.model.seqs and data.draw(st.booleans()):
            return data.draw(st.sampled_from(sorted(self.model.seqs)))
        return data.draw(ids)

    @rule(data=st.data(), tokens=tokens_st, extra=st.sampled_from([0, 0, 7, 2**64 - 1]))
    def add(self, data, tokens, extra):
        sid = self.any_id(data)
        same_outcome(lambda: self.real.add_sequence(sid, tokens, extra), lambda: self.model.add(sid, tokens, extra))

    @rule(data=st.data(), tokens=st.lists(st.integers(0, 2), max_size=9))
    def append(self, data, tokens):
        sid = self.any_id(data)
        same_outcome(lambda: self.real.append(sid, tokens), lambda: self.model.append(sid, tokens))

    @rule(data=st.data())
    def fork(self, data):
        parent, child = self.any_id(data), self.any_id(data)
        same_outcome(lambda: self.real.fork(parent, child), lambda: self.model.fork(parent, child))

    @rule(data=st.data())
    def free(self, data):
        sid = self.any_id(data)
        same_outcome(lambda: self.real.free_sequence(sid), lambda: self.model.free(sid))

    @rule(data=st.data())
    def swap_out(self, data):
        sid = self.any_id(data)
        same_outcome(lambda: self.real.swap_out(sid), lambda: self.model.swap(sid, True))

    @rule(data=st.data())
    def swap_in(self, data):
        sid = self.any_id(data)
        same_outcome(lambda: self.real.swap_in(sid), lambda: self.model.swap(sid, False))

    @rule(tokens=tokens_st, extra=st.sampled_from([0, 7]))
    def lookup(self, tokens, extra):
        assert self.real.lookup(tokens, extra) == self.model.lookup(tokens, extra)

    @rule(data=st.data(), start=st.integers(-2, 20), length=st.integers(-2, 20))
    def slot_mapping(self, data, start, length):
        sid = self.any_id(data)
        same_outcome(lambda: self.real.slot_mapping(sid, start, start + length),
                     lambda: self.model.slot_mapping(sid, start, start + length))

    @rule(data=st.data())
    def queries(self, data):
        sid = self.any_id(data)
        assert self.real.has_sequence(sid) == (sid in self.model.seqs)
        same_outcome(lambda: self.real.block_table(sid), lambda: self.model.get(sid)["blocks"])
        same_outcome(lambda: self.real.num_tokens(sid), lambda: len(self.model.get(sid)["tokens"]))
        same_outcome(lambda: self.real.is_swapped(sid), lambda: self.model.get(sid)["swapped"])

    @rule(data=st.data(), method=st.sampled_from(
        ["add_sequence.seq_id", "add_sequence.tokens", "add_sequence.extra_key", "append.seq_id", "append.tokens",
         "fork.parent", "fork.child", "free_sequence.seq_id", "swap_out.seq_id", "swap_in.seq_id",
         "lookup.tokens", "lookup.extra_key", "slot_mapping.start", "slot_mapping.end", "block_table.seq_id",
         "num_tokens.seq_id", "is_swapped.seq_id", "has_sequence.seq_id"]))
    def bad_argument(self, data, method):
        """A bad argument: a clear error naming it, and nothing changes."""
        name, arg = method.split(".")
        pool = {"tokens": BAD_TOKENS, "extra_key": BAD_UINT64}.get(arg, BAD_INT64)
        bad = data.draw(st.sampled_from(pool))
        sid = self.any_id(data)
        good = dict(seq_id=sid, tokens=[1, 2, 3], extra_key=0, parent=sid, child=99, start=0, end=0)
        good[arg] = bad
        params = {"add_sequence": ("seq_id", "tokens", "extra_key"), "append": ("seq_id", "tokens"),
                  "fork": ("parent", "child"), "lookup": ("tokens", "extra_key"),
                  "slot_mapping": ("seq_id", "start", "end")}.get(name, ("seq_id",))
        before = self.snapshot()
        expect_clear_error(f"KVCacheManager.{name}", arg, lambda: getattr(self.real, name)(*(good[p] for p in params)))
        assert self.snapshot() == before, "a refused call changed the manager"

    def snapshot(self):
        r = self.real
        return (r.device_pool.free_queue(), r.host_pool.free_queue(), r.stats(),
                [(s, r.block_table(s), r.num_tokens(s), r.is_swapped(s)) for s in r.sequence_ids()])

    @invariant()
    def same_state(self):
        if not hasattr(self, "real"):
            return
        m = self.model
        pool = self.real.device_pool
        n = len(m.dev.refs)
        assert pool.free_queue() == m.dev.free  # LRU order: the front is reused (evicted) first
        assert pool.num_free == len(m.dev.free) and pool.num_blocks == n
        assert [pool.ref_count(b) for b in range(n)] == m.dev.refs
        assert pool.num_cached == len(m.dev.cache)
        assert self.real.host_pool.free_queue() == m.host.free
        assert self.real.sequence_ids() == sorted(m.seqs)
        assert self.real.stats() == m.stats()
        for sid, seq in m.seqs.items():
            assert self.real.block_table(sid) == seq["blocks"]
            assert self.real.num_tokens(sid) == len(seq["tokens"])
            assert self.real.is_swapped(sid) == seq["swapped"]
            if not seq["swapped"]:
                assert self.real.lookup(seq["tokens"], seq["extra"]) == m.lookup(seq["tokens"], seq["extra"])

    @invariant()
    def ownership_matches_ref_counts(self):
        # Every reference is held by exactly one sequence's table entry; a block with ref
        # 0 is free, and nothing is both free and owned.
        if not hasattr(self, "real"):
            return
        m = self.model
        owners, host_owners = [0] * len(m.dev.refs), [0] * len(m.host.refs)
        for seq in m.seqs.values():
            for b in seq["blocks"]:
                (host_owners if seq["swapped"] else owners)[b] += 1
        pool = self.real.device_pool
        assert owners == [pool.ref_count(b) for b in range(len(owners))]
        assert host_owners == [self.real.host_pool.ref_count(b) for b in range(len(host_owners))]
        assert set(pool.free_queue()) == {b for b in range(len(owners)) if owners[b] == 0}
        for sid, seq in m.seqs.items():
            if not seq["swapped"]:
                n = len(seq["tokens"])
                assert self.real.slot_mapping(sid, 0, n) == m.slot_mapping(sid, 0, n)


ManagerMachine.TestCase.settings = fuzz_settings(50, stateful_step_count=40)
TestManagerMachine = ManagerMachine.TestCase


class PoolMachine(RuleBasedStateMachine):
    """BlockPool on its own: allocate / touch / release / cache / lookup against PoolModel."""

    @initialize(n=st.sampled_from([0, 1, 4, 8]), caching=st.booleans())
    def setup(self, n, caching):
        self.real = kv.BlockPool(n, caching)
        self.model = PoolModel(n, caching)
        self.n = n

    def block(self, data):
        return data.draw(st.integers(-2, self.n + 1))

    @rule(data=st.data())
    def allocate(self, data):
        k = data.draw(st.integers(-1, self.n + 2))
        same_outcome(lambda: self.real.allocate(k), lambda: self.model.allocate(k))

    @rule(data=st.data())
    def touch(self, data):
        b = self.block(data)
        same_outcome(lambda: self.real.touch(b), lambda: self.model.touch(b))

    @rule(data=st.data())
    def release(self, data):
        owned = [b for b in range(self.n) if self.model.refs[b]]
        blocks = data.draw(st.lists(st.sampled_from(owned) if owned and data.draw(st.booleans())
                                    else st.integers(-1, self.n), max_size=4))
        same_outcome(lambda: self.real.release(blocks), lambda: self.model.release(blocks))

    @rule(data=st.data(), key=st.sampled_from([0, 5, 2**64 - 1]))
    def cache(self, data, key):
        b = self.block(data)
        same_outcome(lambda: self.real.cache(b, key), lambda: self.model.cache_block(b, key))

    @rule(key=st.sampled_from([0, 5, 2**64 - 1]))
    def lookup(self, key):
        assert self.real.lookup(key) == self.model.cache.get(key)

    @rule(data=st.data())
    def hash_of(self, data):
        b = self.block(data)
        same_outcome(lambda: self.real.hash_of(b), lambda: (self.model.check(b), self.model.key_of.get(b))[1])

    @rule(data=st.data(), method=st.sampled_from(["allocate.n", "touch.block", "release.blocks", "cache.block",
                                                  "cache.hash", "lookup.hash", "hash_of.block", "ref_count.block"]))
    def bad_argument(self, data, method):
        name, arg = method.split(".")
        pool = {"hash": BAD_UINT64, "blocks": ([2**31], [1.5], "0", None, 3)}.get(arg, BAD_INT32)
        bad = data.draw(st.sampled_from(pool))
        before = (self.real.free_queue(), self.real.num_cached, self.real.num_evictions)
        args = {"allocate": (bad,), "touch": (bad,), "release": (bad,), "lookup": (bad,), "hash_of": (bad,),
                "ref_count": (bad,), "cache": (bad, 0) if arg == "block" else (0, bad)}[name]
        expect_clear_error(f"BlockPool.{name}", arg, lambda: getattr(self.real, name)(*args))
        assert (self.real.free_queue(), self.real.num_cached, self.real.num_evictions) == before

    @invariant()
    def same_state(self):
        if not hasattr(self, "real"):
            return
        assert self.real.free_queue() == self.model.free
        assert self.real.num_free == len(self.model.free)
        assert [self.real.ref_count(b) for b in range(self.n)] == self.model.refs
        assert self.real.num_cached == len(self.model.cache)
        assert self.real.num_evictions == self.model.evictions
        for b in range(self.n):
            assert self.real.hash_of(b) == self.model.key_of.get(b)


PoolMachine.TestCase.settings = fuzz_settings(40, stateful_step_count=30)
TestPoolMachine = PoolMachine.TestCase


@fuzz_settings(60)
@given(st.sampled_from(["num_blocks", "block_size", "num_host_blocks", "enable_prefix_caching"]), st.data())
def test_fuzz_manager_constructor_bad_arguments(arg, data):
    """KVCacheManager(...) with one bad argument: a clear error naming it."""
    bad = data.draw(st.sampled_from({"enable_prefix_caching": ("yes", [True])}.get(
        arg, (2**63, 2**31, 2**31 - 1, -1, -(2**63) - 1, 1.5, "4", None, True))))
    good = dict(num_blocks=4, block_size=2, num_host_blocks=1, enable_prefix_caching=True)
    good[arg] = bad
    expect_clear_error("KVCacheManager", arg, lambda: kv.KVCacheManager(**good))


# ----------------------------------------------------------------------------- crashes

def run_sample(seed: int, n: int) -> int:
    """``n`` derandomized runs of each machine (longer ones than the in-process tests) in
    this process; returns the number of failures. ``seed`` is unused: hypothesis draws."""
    from hypothesis.stateful import run_state_machine_as_test

    failures = 0
    for machine in (ManagerMachine, PoolMachine):
        try:
            run_state_machine_as_test(machine, settings=fr.fuzz_settings(n, stateful_step_count=50))
        except Exception as exc:  # noqa: BLE001 - counted
            failures += 1
            print(f"FAIL {machine.__name__}: {type(exc).__name__}: {exc}", flush=True)
    print(f"DONE {2 * n} runs, {failures} failures", flush=True)
    return failures


def test_fuzz_sample_in_subprocess():
    """Both machines in a fresh interpreter: a signal (segfault, abort) is a failure."""
    proc = fr.run_in_subprocess(seed=11, n=examples(3), timeout=600 if fr.FUZZ_LONG else 120,
                                module="test_fuzz_block_manager")
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DONE" in proc.stdout


# ----------------------------------------------------------------------------- defects found by this suite (fixed)

@pytest.mark.parametrize("call,name", [
    (lambda m, p: m.add_sequence(2**63, [1]), "seq_id"),
    (lambda m, p: m.add_sequence(1, [2**31]), "tokens"),
    (lambda m, p: m.add_sequence(1, [1], -1), "extra_key"),
    (lambda m, p: m.fork(0, 1.5), "child"),
    (lambda m, p: m.slot_mapping(0, "0", 1), "start"),
    (lambda m, p: m.lookup(None), "tokens"),
    (lambda m, p: p.allocate(2**31), "n"),
    (lambda m, p: p.touch(None), "block"),
    (lambda m, p: p.cache(0, 2**64), "hash"),
    (lambda m, p: kv.BlockPool(2**31), "num_blocks"),
    (lambda m, p: kv.KVCacheManager(4, 2, 0, "yes"), "enable_prefix_caching"),
], ids=["seq_id_2**63", "token_2**31", "extra_key_-1", "child_float", "start_str", "tokens_None", "n_2**31",
        "block_None", "hash_2**64", "pool_num_blocks_2**31", "caching_str"])
def test_bad_int_arguments_name_the_argument(call, name):
    m, p = kv.KVCacheManager(4, 2), kv.BlockPool(4)
    m.add_sequence(0, [1, 2, 3])
    p.allocate(1)
    with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b") as info:
        call(m, p)
    assert "incompatible" not in str(info.value), str(info.value)


@pytest.mark.parametrize("call", [
    lambda m: m.add_sequence(True, [1]),
    lambda m: m.slot_mapping(0, True, 1),
    lambda m: kv.KVCacheManager(4, 2, 0, None),
    lambda m: kv.KVCacheManager(4, 2, 0, 2),
    lambda m: kv.KVCacheManager(4, 2, 0, 1.0),
    lambda m: kv.BlockPool(4, 1),
    lambda m: m.device_pool.ref_count(True),  # the pools a manager hands out are checked too
], ids=["seq_id_True", "start_True", "caching_None", "caching_2", "caching_1.0", "pool_caching_1", "device_pool_True"])
def test_bools_and_non_bools_are_refused(call):
    m = kv.KVCacheManager(4, 2)
    m.add_sequence(0, [1, 2, 3])
    with pytest.raises((TypeError, ValueError)):
        call(m)
