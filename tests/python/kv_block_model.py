"""Brute-force Python models of memwarden.kv.BlockPool and KVCacheManager (csrc/core/kv),
for the state machines of test_fuzz_block_manager.py.

The free queue is a list (front = next allocated); a cached block is keyed by its whole
token prefix and extra key instead of a chained 64-bit hash (a perfect hash). Every
operation raises what the real one raises (IndexError for an unknown id, ValueError for a
misuse) before it changes anything.
"""
from __future__ import annotations


class PoolModel:
    """A BlockPool in plain Python."""

    def __init__(self, n, caching=True):
        self.refs = [0] * n
        self.free = list(range(n))
        self.caching = caching
        self.cache = {}  # key -> block
        self.key_of = {}  # block -> key
        self.evictions = 0

    def check(self, b):
        if not 0 <= b < len(self.refs):
            raise IndexError(f"block id {b} is out of range for {len(self.refs)} blocks")

    def allocate(self, n):
        if n < 0:
            raise ValueError("cannot allocate a negative number of blocks")
        if n > len(self.free):
            return None
        out = [self.free.pop(0) for _ in range(n)]
        for b in out:
            if b in self.key_of:
                del self.cache[self.key_of.pop(b)]
                self.evictions += 1
            self.refs[b] = 1
        return out

    def touch(self, b):
        self.check(b)
        if self.refs[b] == 0:
            self.free.remove(b)
        self.refs[b] += 1

    def release(self, blocks):
        drops = {}
        for b in blocks:
            self.check(b)
            drops[b] = drops.get(b, 0) + 1
            if drops[b] > self.refs[b]:
                raise ValueError(f"block {b} is released more often than it is referenced")
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.free.append(b)
                else:
                    self.free.insert(0, b)

    def cache_block(self, b, key):
        """BlockPool.cache: False (no change) when caching is off, b is hashed or key is taken."""
        self.check(b)
        if self.refs[b] == 0:
            raise ValueError(f"block {b} is free and cannot be cached")
        if not self.caching or b in self.key_of or key in self.cache:
            return False
        self.cache[key] = b
        self.key_of[b] = key
        return True


class ManagerModel:
    """A KVCacheManager in plain Python (with its statistics)."""

    def __init__(self, num_blocks, block_size, num_host_blocks=0, caching=True):
        self.bs = block_size
        self.dev = PoolModel(num_blocks, caching)
        self.host = PoolModel(num_host_blocks, caching=False)
        self.seqs = {}  # id -> dict(blocks, tokens, extra, swapped)
        self.query_tokens = self.hit_tokens = self.cow = self.swapped_out = self.swapped_in = 0

    def keys(self, tokens, extra):
        bs = self.bs
        return [(extra, tuple(tokens[: (i + 1) * bs])) for i in range(len(tokens) // bs)]

    def get(self, sid):
        if sid not in self.seqs:
            raise IndexError(f"unknown sequence {sid}")
        return self.seqs[sid]

    def resident(self, sid):
        seq = self.get(sid)
        if seq["swapped"]:
            raise ValueError(f"sequence {sid} is swapped out")
        return seq

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
        return hits * self.bs

    def add(self, sid, tokens, extra):
        if sid in self.seqs:
            raise ValueError(f"sequence {sid} already exists")
        hits = []
        for key in self.keys(tokens, extra):
            if key not in self.dev.cache:
                break
            hits.append(self.dev.cache[key])
        free_hits = sum(1 for b in hits if self.dev.refs[b] == 0)
        needed = -(-len(tokens) // self.bs) - len(hits)
        if needed > len(self.dev.free) - free_hits:
            return None
        for b in hits:
            self.dev.touch(b)
        seq = dict(blocks=hits + self.dev.allocate(needed), tokens=list(tokens), extra=extra, swapped=False)
        self.cache_full(seq, len(hits))
        self.seqs[sid] = seq
        self.query_tokens += len(tokens)
        self.hit_tokens += len(hits) * self.bs
        return len(hits) * self.bs

    def append(self, sid, tokens):
        seq = self.resident(sid)
        if not tokens:
            return []
        bs = self.bs
        n = len(seq["tokens"])
        want = -(-(n + len(tokens)) // bs)
        have = len(seq["blocks"])
        cow = n % bs != 0 and self.dev.refs[seq["blocks"][-1]] > 1
        if want - have + cow > len(self.dev.free):
            return None
        copies = []
        if cow:
            old = seq["blocks"][-1]
            new = self.dev.allocate(1)[0]
            self.dev.release([old])
            seq["blocks"][-1] = new
            copies.append((old, new))
            self.cow += 1
        if want > have:
            seq["blocks"] += self.dev.allocate(want - have)
        seq["tokens"] += tokens
        self.cache_full(seq, n // bs)
        return copies

    def fork(self, parent, child):
        if child in self.seqs:
            raise ValueError(f"sequence {child} already exists")
        p = self.resident(parent)
        for b in p["blocks"]:
            self.dev.touch(b)
        self.seqs[child] = dict(blocks=list(p["blocks"]), tokens=list(p["tokens"]), extra=p["extra"], swapped=False)

    def free(self, sid):
        seq = self.get(sid)
        (self.host if seq["swapped"] else self.dev).release(list(reversed(seq["blocks"])))
        del self.seqs[sid]

    def swap(self, sid, out):
        seq = self.get(sid)
        if out and seq["swapped"]:
            raise ValueError(f"sequence {sid} is already swapped out")
        if not out and not seq["swapped"]:
            raise ValueError(f"sequence {sid} is not swapped out")
        if out and not self.host.refs:
            raise ValueError("swapping needs host blocks (num_host_blocks = 0)")
        src, dst = (self.dev, self.host) if out else (self.host, self.dev)
        new = dst.allocate(len(seq["blocks"]))
        if new is None:
            return None
        pairs = list(zip(seq["blocks"], new))
        src.release(list(reversed(seq["blocks"])))
        seq["blocks"] = new
        seq["swapped"] = out
        if out:
            self.swapped_out += 1
        else:
            self.cache_full(seq, 0)
            self.swapped_in += 1
        return pairs

    def slot_mapping(self, sid, start, end):
        seq = self.resident(sid)
        n = len(seq["tokens"])
        if start < 0 or end < start or end > n:
            raise IndexError(f"token range [{start}, {end}) is out of range for a sequence of {n} tokens")
        return [seq["blocks"][t // self.bs] * self.bs + t % self.bs for t in range(start, end)]

    def stats(self):
        total = len(self.dev.refs)
        return dict(
            num_blocks=total, num_free_blocks=len(self.dev.free), num_cached_blocks=len(self.dev.cache),
            num_host_blocks=len(self.host.refs), num_free_host_blocks=len(self.host.free),
            usage=1.0 - len(self.dev.free) / total if total else 0.0,
            prefix_query_tokens=self.query_tokens, prefix_hit_tokens=self.hit_tokens,
            prefix_hit_rate=self.hit_tokens / self.query_tokens if self.query_tokens else 0.0,
            num_evictions=self.dev.evictions, num_cow_copies=self.cow, num_swapped_out=self.swapped_out,
            num_swapped_in=self.swapped_in)
