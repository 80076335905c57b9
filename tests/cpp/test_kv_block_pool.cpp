#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <vector>

#include "core/kv/block_pool.h"

using memwarden::kv::BlockPair;
using memwarden::kv::BlockPool;
using memwarden::kv::KVCacheManager;

namespace {
std::vector<int32_t> iota(int32_t n, int32_t start = 0) {
  std::vector<int32_t> v(n);
  for (int32_t i = 0; i < n; ++i) v[i] = start + i;
  return v;
}
}  // namespace

TEST(KvBlockPool, AllocateIsAllOrNothing) {
  BlockPool pool(4);
  auto a = pool.allocate(3);
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(*a, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(pool.num_free(), 1);
  EXPECT_FALSE(pool.allocate(2).has_value());
  EXPECT_EQ(pool.num_free(), 1);  // nothing taken
  EXPECT_THROW(pool.allocate(-1), std::invalid_argument);
  for (int b : *a) EXPECT_EQ(pool.ref_count(b), 1);
}

TEST(KvBlockPool, FreeOrderUnhashedFrontHashedBack) {
  BlockPool pool(4);
  auto a = *pool.allocate(4);
  EXPECT_TRUE(pool.cache(0, 100));
  EXPECT_TRUE(pool.cache(1, 101));
  EXPECT_FALSE(pool.cache(2, 100));  // hash held by block 0
  pool.release({0, 1, 2, 3});
  // hashed 0,1 at the back in release order; unhashed 2 then 3 pushed to the front
  EXPECT_EQ(pool.free_queue(), (std::vector<int32_t>{3, 2, 0, 1}));
  EXPECT_EQ(pool.lookup(100), std::optional<int32_t>(0));
  auto b = *pool.allocate(3);  // 3, 2 and then 0 (evicting hash 100)
  EXPECT_EQ(b, (std::vector<int32_t>{3, 2, 0}));
  EXPECT_FALSE(pool.lookup(100).has_value());
  EXPECT_EQ(pool.lookup(101), std::optional<int32_t>(1));
  EXPECT_EQ(pool.num_evictions(), 1);
}

TEST(KvBlockPool, TouchRemovesFromMiddleOfFreeQueue) {
  BlockPool pool(5);
  auto a = *pool.allocate(5);
  for (int b : a) pool.cache(b, 1000 + b);
  pool.release(a);
  EXPECT_EQ(pool.num_free(), 5);
  pool.touch(2);
  EXPECT_EQ(pool.num_free(), 4);
  EXPECT_EQ(pool.free_queue(), (std::vector<int32_t>{0, 1, 3, 4}));
  pool.touch(2);
  EXPECT_EQ(pool.ref_count(2), 2);
  pool.release({2, 2});
  EXPECT_EQ(pool.free_queue(), (std::vector<int32_t>{0, 1, 3, 4, 2}));
}

TEST(KvBlockPool, ReleaseValidatesFirst) {
  BlockPool pool(3);
  auto a = *pool.allocate(2);
  EXPECT_THROW(pool.release({0, 7}), std::out_of_range);
  EXPECT_EQ(pool.ref_count(0), 1);  // unchanged
  EXPECT_THROW(pool.release({0, 0}), std::invalid_argument);
  EXPECT_EQ(pool.ref_count(0), 1);
  EXPECT_THROW(pool.release({2}), std::invalid_argument);  // free block
  EXPECT_THROW(pool.touch(-1), std::out_of_range);
  EXPECT_THROW(BlockPool(-1), std::invalid_argument);
}

TEST(KvCacheManager, PrefixReuseAndHitRate) {
  KVCacheManager m(8, 4);
  auto hit = m.add_sequence(1, iota(10));
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(*hit, 0);
  EXPECT_EQ(m.block_table(1).size(), 3u);
  EXPECT_EQ(m.lookup(iota(10)), 8);  // two full blocks cached
  EXPECT_EQ(m.lookup(iota(3)), 0);
  auto other = iota(9);
  other[5] = 99;  // differs in block 1
  EXPECT_EQ(m.lookup(other), 4);
  auto hit2 = m.add_sequence(2, iota(9));
  EXPECT_EQ(*hit2, 8);
  EXPECT_EQ(m.block_table(2)[0], m.block_table(1)[0]);
  EXPECT_EQ(m.block_table(2)[1], m.block_table(1)[1]);
  EXPECT_NE(m.block_table(2)[2], m.block_table(1)[2]);
  EXPECT_EQ(m.device_pool().ref_count(m.block_table(1)[0]), 2);
  EXPECT_DOUBLE_EQ(m.stats().prefix_hit_rate, 8.0 / 19.0);
  EXPECT_EQ(m.lookup(iota(8), /*extra_key=*/7), 0);  // a different extra key misses
}

TEST(KvCacheManager, FreedPrefixStaysCachedUntilNeededTailEvictedFirst) {
  KVCacheManager m(4, 2);
  ASSERT_TRUE(m.add_sequence(1, iota(6)));  // 3 full blocks
  const auto table = m.block_table(1);
  m.free_sequence(1);
  EXPECT_EQ(m.stats().num_free_blocks, 4);
  EXPECT_EQ(m.lookup(iota(6)), 6);
  // Needs 2 blocks: the never-used block 3 first, then the tail block of seq 1.
  ASSERT_TRUE(m.add_sequence(2, iota(4, 100)));
  EXPECT_EQ(m.lookup(iota(6)), 4);
  EXPECT_EQ(m.block_table(2)[0], 3);
  EXPECT_EQ(m.block_table(2)[1], table[2]);
  EXPECT_FALSE(m.add_sequence(3, iota(5)).has_value());  // 2 free cached hits + 1 new > 2 free
  auto hit = m.add_sequence(3, iota(4));
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(*hit, 4);
  EXPECT_EQ(m.block_table(3)[0], table[0]);
}

TEST(KvCacheManager, AddSequenceAllOrNothingCountsFreeHits) {
  KVCacheManager m(3, 2);
  ASSERT_TRUE(m.add_sequence(1, iota(4)));
  m.free_sequence(1);  // both blocks cached and free
  // 6 tokens: 2 cached hits (which are free) + 1 new: needs the 3 blocks -> fits.
  auto hit = m.add_sequence(2, iota(6));
  ASSERT_TRUE(hit.has_value());
  EXPECT_EQ(*hit, 4);
  m.free_sequence(2);
  // 8 tokens: 3 cached hits + 1 new block -> 4 > 3 blocks: refused, nothing changes.
  const auto before = m.device_pool().free_queue();
  EXPECT_FALSE(m.add_sequence(3, iota(8)).has_value());
  EXPECT_EQ(m.device_pool().free_queue(), before);
  EXPECT_FALSE(m.has_sequence(3));
  ASSERT_TRUE(m.add_sequence(4, {}).has_value());
  EXPECT_THROW(m.add_sequence(4, {}), std::invalid_argument);
}

TEST(KvCacheManager, ForkThenAppendCopiesOnWrite) {
  KVCacheManager m(6, 4);
  ASSERT_TRUE(m.add_sequence(1, iota(6)));
  m.fork(1, 2);
  const auto shared_tail = m.block_table(1)[1];
  EXPECT_EQ(m.device_pool().ref_count(shared_tail), 2);
  auto copies = m.append(2, {42});
  ASSERT_TRUE(copies.has_value());
  ASSERT_EQ(copies->size(), 1u);
  EXPECT_EQ((*copies)[0].first, shared_tail);
  EXPECT_EQ((*copies)[0].second, m.block_table(2)[1]);
  EXPECT_EQ(m.device_pool().ref_count(shared_tail), 1);
  // The parent now owns its tail alone: appending needs no copy.
  auto none = m.append(1, {7, 8, 9});
  ASSERT_TRUE(none.has_value());
  EXPECT_TRUE(none->empty());
  EXPECT_EQ(m.block_table(1).size(), 3u);
  EXPECT_EQ(m.num_tokens(1), 9);
  EXPECT_EQ(m.stats().num_cow_copies, 1);
  EXPECT_EQ(m.slot_mapping(2, 5, 7), (std::vector<int64_t>{m.block_table(2)[1] * 4 + 1, m.block_table(2)[1] * 4 + 2}));
}

TEST(KvCacheManager, AppendAllOrNothing) {
  KVCacheManager m(2, 2);
  ASSERT_TRUE(m.add_sequence(1, iota(3)));
  EXPECT_FALSE(m.append(1, iota(3)).has_value());  // needs 3 blocks
  EXPECT_EQ(m.num_tokens(1), 3);
  EXPECT_TRUE(m.append(1, {5}).has_value());
  EXPECT_EQ(m.num_tokens(1), 4);
}

TEST(KvCacheManager, SwapRoundTrip) {
  KVCacheManager m(4, 2, 4);
  ASSERT_TRUE(m.add_sequence(1, iota(5)));
  const auto table = m.block_table(1);
  auto out = m.swap_out(1);
  ASSERT_TRUE(out.has_value());
  ASSERT_EQ(out->size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ((*out)[i].first, table[i]);
  EXPECT_TRUE(m.is_swapped(1));
  EXPECT_EQ(m.stats().num_free_blocks, 4);
  EXPECT_EQ(m.stats().num_free_host_blocks, 1);
  EXPECT_THROW(m.append(1, {1}), std::invalid_argument);
  auto in = m.swap_in(1);
  ASSERT_TRUE(in.has_value());
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ((*in)[i].first, (*out)[i].second);
  EXPECT_FALSE(m.is_swapped(1));
  EXPECT_EQ(m.stats().num_free_host_blocks, 4);
  KVCacheManager no_host(2, 2);
  ASSERT_TRUE(no_host.add_sequence(1, iota(2)));
  EXPECT_THROW(no_host.swap_out(1), std::invalid_argument);
}

TEST(KvCacheManager, UnknownSequence) {
  KVCacheManager m(2, 2);
  EXPECT_THROW(m.free_sequence(3), std::out_of_range);
  EXPECT_THROW(m.block_table(3), std::out_of_range);
  EXPECT_THROW(KVCacheManager(2, 0), std::invalid_argument);
}

// O(1): per-operation time at 100k blocks stays close to 1k blocks.
TEST(KvBlockPool, OperationsDoNotGrowWithPoolSize) {
  auto time_ops = [](int32_t num_blocks) {
    BlockPool pool(num_blocks);
    auto all = *pool.allocate(num_blocks);
    for (int32_t b : all) pool.cache(b, static_cast<uint64_t>(b) * 7919 + 1);
    pool.release(all);
    const int iters = 20000;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) {
      auto got = pool.allocate(1);
      pool.release(*got);
      pool.touch(static_cast<int32_t>(i % num_blocks));
      pool.release({static_cast<int32_t>(i % num_blocks)});
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
  };
  double small = 1e9, large = 1e9;
  for (int r = 0; r < 3; ++r) {
    small = std::min(small, time_ops(1000));
    large = std::min(large, time_ops(100000));
  }
  // Generous (sanitizer builds, shared machine): a linear scan would be ~100x.
  EXPECT_LT(large, small * 5.0) << "small " << small << " large " << large;
}

TEST(KvBlockPool, CachingDisabledCachesNothing) {
  BlockPool pool(4, /*enable_caching=*/false);
  auto a = *pool.allocate(2);
  EXPECT_FALSE(pool.cache(a[0], 100));
  EXPECT_EQ(pool.num_cached(), 0);
  EXPECT_FALSE(pool.lookup(100).has_value());
  EXPECT_FALSE(pool.hash_of(a[0]).has_value());
}

TEST(KvBlockPool, CacheChurnKeepsEveryLiveHashFindable) {
  // Every block cached with a hash sharing its low bits, then reused in rounds: each
  // allocation evicts the hash its block held, each new cache() inserts one. A model
  // (block -> hash it holds) says what must be findable and what must be gone.
  const int32_t num_blocks = 64;
  BlockPool pool(num_blocks);
  std::vector<std::optional<uint64_t>> held(num_blocks);
  std::vector<uint64_t> evicted;
  uint64_t next_hash = 0;
  for (int round = 0; round < 200; ++round) {
    auto blocks = *pool.allocate(num_blocks / 2 + round % 7);
    for (int32_t b : blocks) {
      if (held[b]) evicted.push_back(*held[b]);
      held[b] = (next_hash++ << 32) | 0x55;
      ASSERT_TRUE(pool.cache(b, *held[b]));
    }
    pool.release(blocks);
    int32_t cached = 0;
    for (int32_t b = 0; b < num_blocks; ++b) {
      if (!held[b]) continue;
      ++cached;
      ASSERT_EQ(pool.lookup(*held[b]), std::optional<int32_t>(b)) << "round " << round;
    }
    ASSERT_EQ(pool.num_cached(), cached);
    for (uint64_t h : evicted) ASSERT_FALSE(pool.lookup(h).has_value()) << "round " << round;
  }
  EXPECT_GT(evicted.size(), 0u);
}
