// The caching allocator core against hand-worked layouts, a reference model and threads.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/alloc/backend.h"
#include "core/alloc/caching_allocator.h"
#include "core/alloc/registry.h"

using namespace memwarden::alloc;

namespace {

constexpr std::size_t KiB = 1024, MiB = 1024 * 1024;

// Host memory with a capacity, call counters and manually completed events.
class TestBackend : public Backend {
 public:
  explicit TestBackend(std::size_t capacity = SIZE_MAX, bool events = false) : capacity_(capacity), events_(events) {}
  void* allocate(std::size_t bytes) override {
    std::lock_guard<std::mutex> l(m_);
    if (bytes > capacity_ || used_ > capacity_ - bytes) return nullptr;
    void* p = nullptr;
    if (posix_memalign(&p, 4096, bytes) != 0) return nullptr;
    used_ += bytes;
    ++allocs;
    live_[p] = bytes;
    return p;
  }
  void deallocate(void* ptr, std::size_t bytes) noexcept override {
    std::lock_guard<std::mutex> l(m_);
    EXPECT_EQ(live_.count(ptr), 1u);
    EXPECT_EQ(live_[ptr], bytes);
    live_.erase(ptr);
    used_ -= bytes;
    ++frees;
    std::free(ptr);
  }
  std::size_t free_memory() const override { return capacity_ == SIZE_MAX ? SIZE_MAX : capacity_ - used_; }
  std::string name() const override { return "test"; }
  bool has_events() const override { return events_; }
  EventId record_event(StreamId s) override {
    auto* e = new int(static_cast<int>(s));
    std::lock_guard<std::mutex> l(m_);
    pending_.insert(e);
    return e;
  }
  bool query_event(EventId e) override {
    std::lock_guard<std::mutex> l(m_);
    return !pending_.count(static_cast<int*>(e));
  }
  void destroy_event(EventId e) noexcept override { delete static_cast<int*>(e); }
  void synchronize() override {
    complete_all();
    ++syncs;
  }
  void complete_all() {
    std::lock_guard<std::mutex> l(m_);
    pending_.clear();
  }
  std::size_t used() {
    std::lock_guard<std::mutex> l(m_);
    return used_;
  }
  int allocs = 0, frees = 0, syncs = 0;

 private:
  std::mutex m_;
  std::size_t capacity_, used_ = 0;
  bool events_;
  std::map<void*, std::size_t> live_;
  std::set<int*> pending_;
};

int64_t S(const CachingAllocator& a, const std::string& key) {
  auto m = a.stats().to_map();
  auto it = m.find(key);
  if (it == m.end()) throw std::out_of_range("no stat " + key);
  return it->second;
}

std::uintptr_t U(void* p) { return reinterpret_cast<std::uintptr_t>(p); }

}  // namespace

TEST(AllocRounding, MinBlockAndMultiples) {
  CachingAllocator a(std::make_shared<TestBackend>());
  EXPECT_EQ(a.round_size(1), 512u);
  EXPECT_EQ(a.round_size(512), 512u);
  EXPECT_EQ(a.round_size(513), 1024u);
  EXPECT_EQ(a.round_size(3 * MiB + 1), 3 * MiB + 512);
  EXPECT_EQ(a.segment_size(512), 2 * MiB);
  EXPECT_EQ(a.segment_size(1 * MiB), 2 * MiB);
  EXPECT_EQ(a.segment_size(1 * MiB + 512), 20 * MiB);
  EXPECT_EQ(a.segment_size(10 * MiB), 10 * MiB);
  EXPECT_EQ(a.segment_size(11 * MiB + 512), 12 * MiB);
}

TEST(AllocRounding, PowerOfTwoDivisions) {
  Options o;
  o.roundup_power2_divisions = 4;
  CachingAllocator a(std::make_shared<TestBackend>(), o);
  EXPECT_EQ(a.round_size(4 * MiB), 4 * MiB);       // a power of two stays
  EXPECT_EQ(a.round_size(4 * MiB + 1), 5 * MiB);   // steps of 1 MiB in [4, 8) MiB
  EXPECT_EQ(a.round_size(6 * MiB + 7), 7 * MiB);
  EXPECT_EQ(a.round_size(1000), 1024u);
}

TEST(AllocOptions, Validation) {
  Options o;
  o.min_block = 500;
  EXPECT_THROW(CachingAllocator(std::make_shared<TestBackend>(), o), std::invalid_argument);
  o = Options{};
  o.max_split_size = 1 * MiB;
  EXPECT_THROW(validate(o), std::invalid_argument);
  o = Options{};
  o.gc_threshold = 1.5;
  EXPECT_THROW(validate(o), std::invalid_argument);
  o = Options{};
  o.roundup_power2_divisions = 3;
  EXPECT_THROW(validate(o), std::invalid_argument);
  EXPECT_THROW(CachingAllocator(nullptr), std::invalid_argument);
}

TEST(AllocPools, SmallAndLargeSegments) {
  auto be = std::make_shared<TestBackend>();
  CachingAllocator a(be);
  void* s = a.allocate(1000);
  EXPECT_EQ(S(a, "segment.small_pool.current"), 1);
  EXPECT_EQ(S(a, "reserved_bytes.small_pool.current"), int64_t(2 * MiB));
  void* m = a.allocate(3 * MiB);
  EXPECT_EQ(S(a, "segment.large_pool.current"), 1);
  EXPECT_EQ(S(a, "reserved_bytes.large_pool.current"), int64_t(20 * MiB));
  void* l = a.allocate(21 * MiB);  // its own segment, rounded to 2 MiB
  EXPECT_EQ(S(a, "segment.large_pool.current"), 2);
  EXPECT_EQ(S(a, "reserved_bytes.large_pool.current"), int64_t(42 * MiB));
  // the 1 MiB rest of the 22 MiB segment is not worth a split: the block is 22 MiB
  EXPECT_EQ(S(a, "allocated_bytes.all.current"), int64_t(1024 + 3 * MiB + 22 * MiB));
  EXPECT_EQ(S(a, "requested_bytes.all.current"), int64_t(1000 + 3 * MiB + 21 * MiB));
  EXPECT_EQ(be->allocs, 3);
  // A second mid-sized request is carved from the same 20 MiB segment.
  void* m2 = a.allocate(5 * MiB);
  EXPECT_EQ(be->allocs, 3);
  EXPECT_EQ(U(m2), U(m) + 3 * MiB);
  for (void* p : {s, m, l, m2}) a.deallocate(p);
  EXPECT_EQ(S(a, "allocated_bytes.all.current"), 0);
  EXPECT_EQ(S(a, "reserved_bytes.all.current"), int64_t(44 * MiB));
  a.empty_cache();
  EXPECT_EQ(S(a, "reserved_bytes.all.current"), 0);
  EXPECT_EQ(be->used(), 0u);
  EXPECT_EQ(S(a, "num_device_alloc"), 3);
  EXPECT_EQ(S(a, "num_device_free"), 3);
}

TEST(AllocSplit, SplitAndCoalesce) {
  auto be = std::make_shared<TestBackend>();
  CachingAllocator a(be);
  void* x = a.allocate(4 * KiB);
  void* y = a.allocate(8 * KiB);
  void* z = a.allocate(4 * KiB);
  EXPECT_EQ(U(y), U(x) + 4 * KiB);
  EXPECT_EQ(U(z), U(y) + 8 * KiB);
  // The rest of the segment is one inactive split block.
  EXPECT_EQ(S(a, "inactive_split.all.current"), 1);
  EXPECT_EQ(S(a, "inactive_split_bytes.all.current"), int64_t(2 * MiB - 16 * KiB));
  a.deallocate(y);  // a hole between x and z
  EXPECT_EQ(S(a, "inactive_split.all.current"), 2);
  EXPECT_EQ(a.snapshot().segments.at(0).blocks.size(), 4u);
  a.deallocate(x);  // merges with the hole
  auto snap = a.snapshot();
  ASSERT_EQ(snap.segments.size(), 1u);
  ASSERT_EQ(snap.segments[0].blocks.size(), 3u);
  EXPECT_EQ(snap.segments[0].blocks[0].size, 12 * KiB);
  EXPECT_FALSE(snap.segments[0].blocks[0].allocated);
  EXPECT_EQ(snap.free_bytes, 2 * MiB - 4 * KiB);
  EXPECT_EQ(snap.largest_free, 2 * MiB - 16 * KiB);
  EXPECT_NEAR(snap.fragmentation, 1.0 - double(2 * MiB - 16 * KiB) / double(2 * MiB - 4 * KiB), 1e-12);
  // Best fit: a 12 KiB request takes the 12 KiB hole, not the big tail.
  void* w = a.allocate(12 * KiB);
  EXPECT_EQ(w, x);
  a.deallocate(w);
  a.deallocate(z);  // everything merges back into one block
  snap = a.snapshot();
  ASSERT_EQ(snap.segments[0].blocks.size(), 1u);
  EXPECT_EQ(snap.segments[0].blocks[0].size, 2 * MiB);
  EXPECT_EQ(snap.fragmentation, 0.0);
  EXPECT_EQ(S(a, "inactive_split.all.current"), 0);
  EXPECT_EQ(S(a, "inactive_split_bytes.all.current"), 0);
  EXPECT_EQ(S(a, "active.all.current"), 0);
  a.empty_cache();
  EXPECT_EQ(be->used(), 0u);
}

// Thousands of live pointers (the address table grows several times), freed in random
// order (deletions shift later entries back): every lookup must stay right throughout.
TEST(AllocSplit, ManyLivePointersFreedInRandomOrder) {
  auto be = std::make_shared<TestBackend>();
  CachingAllocator a(be);
  std::vector<void*> live;
  for (int i = 0; i < 5000; ++i) live.push_back(a.allocate(512 * (1 + i % 3)));
  std::mt19937 rng(7);
  std::shuffle(live.begin(), live.end(), rng);
  for (std::size_t i = 0; i < live.size(); ++i) {
    a.deallocate(live[i]);
    EXPECT_FALSE(a.owns(live[i]));
    if (i + 1 < live.size()) EXPECT_TRUE(a.owns(live[i + 1]));
  }
  EXPECT_THROW(a.deallocate(live[0]), std::invalid_argument);
  EXPECT_EQ(S(a, "allocation.all.current"), 0);
  EXPECT_EQ(S(a, "inactive_split.all.current"), 0);
  for (const auto& seg : a.snapshot().segments) EXPECT_EQ(seg.blocks.size(), 1u);  // all merged back
  a.empty_cache();
  EXPECT_EQ(be->used(), 0u);
}

TEST(AllocSplit, LargeRemainderKeptOnlyWhenAboveSmallSize) {
  CachingAllocator a(std::make_shared<TestBackend>());
  void* p = a.allocate(12 * MiB + 512 * KiB);  // 14 MiB segment (rounded to 2 MiB): 1.5 MiB rest > 1 MiB
  auto snap = a.snapshot();
  ASSERT_EQ(snap.segments.at(0).blocks.size(), 2u);
  void* q = a.allocate(19 * MiB + 512 * KiB);  // 20 MiB segment: 0.5 MiB rest is not split off
  EXPECT_EQ(a.block_size(q), 20 * MiB);
  a.deallocate(p);
  a.deallocate(q);
}

TEST(AllocSplit, MaxSplitSize) {
  Options o;
  o.max_split_size = 4 * MiB;
  auto be = std::make_shared<TestBackend>();
  CachingAllocator a(be, o);
  void* big = a.allocate(12 * MiB);
  EXPECT_EQ(S(a, "oversize_allocations.current"), 1);
  EXPECT_EQ(S(a, "oversize_segments.current"), 1);
  EXPECT_EQ(S(a, "max_split_size"), int64_t(4 * MiB));
  a.deallocate(big);
  void* small = a.allocate(2 * MiB);  // must not be carved from the cached 12 MiB block
  EXPECT_EQ(be->allocs, 2);
  EXPECT_NE(small, big);
  void* again = a.allocate(11 * MiB);  // oversize request reuses the oversize block whole
  EXPECT_EQ(again, big);
  EXPECT_EQ(a.block_size(again), 12 * MiB);
  a.deallocate(small);
  a.deallocate(again);
  a.empty_cache();
  EXPECT_EQ(be->used(), 0u);
}

TEST(AllocErrors, UnknownAndDoubleFree) {
  CachingAllocator a(std::make_shared<TestBackend>());
  int local = 0;
  EXPECT_THROW(a.deallocate(&local), std::invalid_argument);
  void* p = a.allocate(100);
  a.deallocate(p);
  EXPECT_THROW(a.deallocate(p), std::invalid_argument);
  EXPECT_EQ(a.allocate(0), nullptr);
  a.deallocate(nullptr);
  EXPECT_THROW(a.record_stream(p, 3), std::invalid_argument);
}

TEST(AllocLimit, HardLimitAndTightSegments) {
  auto be = std::make_shared<TestBackend>();
  Options o;
  o.memory_limit = 8 * MiB;
  CachingAllocator a(be, o);
  void* p = a.allocate(3 * MiB);  // a 20 MiB segment would not fit: a 4 MiB one does
  EXPECT_EQ(S(a, "reserved_bytes.all.current"), int64_t(4 * MiB));
  void* q = a.allocate(3 * MiB);
  EXPECT_EQ(S(a, "reserved_bytes.all.current"), int64_t(8 * MiB));
  try {
    a.allocate(100);
    FAIL() << "expected OutOfMemory";
  } catch (const OutOfMemory& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("tried to allocate 100 B"), std::string::npos) << msg;
    EXPECT_NE(msg.find("8.00 MiB allocated"), std::string::npos) << msg;
    EXPECT_NE(msg.find("8.00 MiB reserved"), std::string::npos) << msg;
    EXPECT_NE(msg.find("0 B free"), std::string::npos) << msg;
    EXPECT_EQ(e.requested, 100u);
    EXPECT_EQ(e.reserved, 8 * MiB);
    EXPECT_EQ(e.allocated, 8 * MiB);  // 4 MiB blocks: a 1 MiB rest is not split off
    EXPECT_EQ(e.free, 0u);
  }
  EXPECT_EQ(S(a, "num_ooms"), 1);
  a.deallocate(q);
  // Cached but unused memory is released and the request retried.
  void* r = a.allocate(1 * MiB);
  EXPECT_EQ(S(a, "num_alloc_retries"), 1);
  EXPECT_EQ(S(a, "reserved_bytes.all.current"), int64_t(6 * MiB));
  a.deallocate(r);
  a.deallocate(p);
  a.set_memory_limit(1 * MiB);  // below what is reserved: the cache shrinks to fit
  EXPECT_EQ(S(a, "reserved_bytes.all.current"), 0);
  EXPECT_THROW(a.allocate(1 * MiB + 1), OutOfMemory);
  a.set_memory_limit(0);  // unlimited again
  void* big = a.allocate(64 * MiB);
  EXPECT_EQ(S(a, "reserved_bytes.all.current"), int64_t(64 * MiB));
  a.deallocate(big);
}

TEST(AllocLimit, LimitingBackendAdaptor) {
  auto up = std::make_shared<TestBackend>();
  auto lim = std::make_shared<LimitingBackend>(up, 16 * MiB);
  CachingAllocator a(lim);
  void* p = a.allocate(10 * MiB);
  EXPECT_EQ(lim->used(), 10 * MiB);
  EXPECT_THROW(a.allocate(8 * MiB), OutOfMemory);
  a.deallocate(p);
  void* q = a.allocate(8 * MiB);  // carved from the cached 10 MiB segment
  EXPECT_EQ(q, p);
  EXPECT_EQ(lim->used(), 10 * MiB);
  a.deallocate(q);
  a.empty_cache();
  EXPECT_EQ(lim->used(), 0u);
  EXPECT_EQ(lim->free_memory(), 16 * MiB);
}

TEST(AllocOom, CallbackChainOrder) {
  auto be = std::make_shared<TestBackend>(24 * MiB);
  CachingAllocator a(be);
  void* keep = a.allocate(12 * MiB);
  void* victim = a.allocate(10 * MiB);
  std::vector<std::string> calls;
  a.add_oom_callback([&](std::size_t bytes) {
    calls.push_back("first:" + std::to_string(bytes));
    return false;  // freed nothing
  });
  a.add_oom_callback([&](std::size_t) {
    calls.push_back("second");
    if (victim) {
      a.deallocate(victim);  // re-enters the allocator: no lock may be held
      victim = nullptr;
      return true;
    }
    return false;
  });
  int third = a.add_oom_callback([&](std::size_t) {
    calls.push_back("third");
    return false;
  });
  void* p = a.allocate(10 * MiB);  // cache empty, backend full: callbacks run
  EXPECT_EQ(calls, (std::vector<std::string>{"first:" + std::to_string(10 * MiB), "second"}));
  EXPECT_EQ(S(a, "num_oom_callbacks"), 2);
  EXPECT_EQ(S(a, "num_ooms"), 0);
  calls.clear();
  EXPECT_TRUE(a.remove_oom_callback(third));
  EXPECT_FALSE(a.remove_oom_callback(third));
  EXPECT_THROW(a.allocate(10 * MiB), OutOfMemory);
  EXPECT_EQ(calls, (std::vector<std::string>{"first:" + std::to_string(10 * MiB), "second"}));
  EXPECT_EQ(S(a, "num_ooms"), 1);
  a.clear_oom_callbacks();
  a.deallocate(p);
  a.deallocate(keep);
}

TEST(AllocOom, CacheIsFreedBeforeCallbacks) {
  auto be = std::make_shared<TestBackend>(24 * MiB);
  CachingAllocator a(be);
  a.deallocate(a.allocate(12 * MiB));  // cached, unused
  int called = 0;
  a.add_oom_callback([&](std::size_t) {
    ++called;
    return false;
  });
  void* p = a.allocate(14 * MiB);  // needs the cached 12 MiB segment given back
  EXPECT_EQ(called, 0);
  EXPECT_EQ(S(a, "num_alloc_retries"), 1);
  EXPECT_EQ(S(a, "reserved_bytes.all.current"), int64_t(14 * MiB));
  a.deallocate(p);
}

TEST(AllocGc, ThresholdFreesCachedSegmentsFirst) {
  auto be = std::make_shared<TestBackend>();
  Options o;
  o.memory_limit = 100 * MiB;
  o.gc_threshold = 0.5;
  CachingAllocator a(be, o);
  a.deallocate(a.allocate(30 * MiB));
  EXPECT_EQ(S(a, "reserved_bytes.all.current"), int64_t(30 * MiB));
  void* p = a.allocate(40 * MiB);  // 30 + 40 > 50: the cached 30 MiB go first
  EXPECT_EQ(S(a, "reserved_bytes.all.current"), int64_t(40 * MiB));
  EXPECT_EQ(S(a, "num_alloc_retries"), 0);
  EXPECT_EQ(be->frees, 1);
  a.deallocate(p);
}

TEST(AllocStreams, PerStreamReuseAndRecordStream) {
  auto be = std::make_shared<TestBackend>(SIZE_MAX, /*events=*/true);
  CachingAllocator a(be);
  void* p = a.allocate(4 * KiB, 1);
  a.deallocate(p);
  EXPECT_EQ(a.allocate(4 * KiB, 1), p);  // same stream: at once
  void* other = a.allocate(4 * KiB, 2);  // other stream: its own segment
  EXPECT_NE(other, p);
  EXPECT_EQ(be->allocs, 2);
  a.record_stream(p, 3);
  a.record_stream(p, 1);  // its own stream: ignored
  a.deallocate(p);
  EXPECT_EQ(S(a, "active.all.current"), 2);  // waits for stream 3
  EXPECT_EQ(S(a, "allocated_bytes.all.current"), int64_t(4 * KiB));
  void* q = a.allocate(4 * KiB, 1);
  EXPECT_NE(q, p);  // not reused while stream 3 may still use it
  be->complete_all();
  a.deallocate(q);
  void* r = a.allocate(4 * KiB, 1);
  EXPECT_EQ(r, p);  // event done: p merged back and is the lowest best fit
  a.record_stream(r, 5);
  a.deallocate(r);
  a.deallocate(other);
  a.empty_cache();  // synchronizes and drains pending events
  EXPECT_EQ(S(a, "num_sync_all_streams"), 1);
  EXPECT_EQ(S(a, "reserved_bytes.all.current"), 0);
  EXPECT_EQ(be->used(), 0u);
}

// Every allocation takes the smallest free block of at least its rounded size in its pool
// and on its stream, the lowest address among equal sizes, or else a new segment; checked
// against the snapshot before each request, for free blocks both in the size-class lists
// and above their cap (a 16 B min_block caps the lists at 1 MiB).
void check_best_fit_lowest_address(const Options& options) {
  auto be = std::make_shared<TestBackend>();
  CachingAllocator a(be, options);
  std::mt19937_64 rng(7);
  const std::size_t common_sizes[] = {4 * KiB, 8 * KiB, 64 * KiB, 1536 * KiB, 3 * MiB, 12 * MiB, 24 * MiB};
  std::vector<void*> live;
  for (int op = 0; op < 3000; ++op) {
    if (!live.empty() && (rng() % 2 == 0 || live.size() > 64)) {
      const std::size_t i = rng() % live.size();
      a.deallocate(live[i]);
      live[i] = live.back();
      live.pop_back();
      continue;
    }
    const std::size_t bytes = rng() % 2 == 0 ? common_sizes[rng() % std::size(common_sizes)] : 1 + rng() % (30 * MiB);
    const StreamId stream = rng() % 4 == 0 ? 2 : 1;
    const std::size_t rounded = a.round_size(bytes);
    const bool small = rounded <= options.small_size;
    const BlockInfo* best = nullptr;
    const Snapshot before = a.snapshot();
    for (const SegmentInfo& seg : before.segments) {
      if (seg.stream != stream || seg.small != small) continue;
      for (const BlockInfo& b : seg.blocks)
        if (!b.active && b.size >= rounded &&
            (best == nullptr || b.size < best->size || (b.size == best->size && b.address < best->address)))
          best = &b;
    }
    const int device_allocs = be->allocs;
    void* p = a.allocate(bytes, stream);
    if (best != nullptr) {
      ASSERT_EQ(U(p), best->address) << "request of " << rounded << " B, op " << op;
    } else {
      ASSERT_EQ(be->allocs, device_allocs + 1) << "request of " << rounded << " B, op " << op;
    }
    live.push_back(p);
  }
  for (void* p : live) a.deallocate(p);
  a.empty_cache();
  EXPECT_EQ(be->used(), 0u);
}

TEST(AllocBestFit, SmallestSizeThenLowestAddress) { check_best_fit_lowest_address(Options{}); }

TEST(AllocBestFit, SmallestSizeThenLowestAddressAboveListCap) {
  Options options;
  options.min_block = 16;
  check_best_fit_lowest_address(options);
}

TEST(AllocStats, AgreeWithModelAndPeaks) {
  auto be = std::make_shared<TestBackend>();
  CachingAllocator a(be);
  std::mt19937_64 rng(7);
  std::map<std::uintptr_t, std::pair<std::size_t, std::size_t>> live;  // addr -> (rounded, requested)
  int64_t peak = 0, total_alloc = 0, total_freed = 0;
  for (int i = 0; i < 4000; ++i) {
    if (live.empty() || rng() % 2 != 0) {
      std::size_t req = 1 + rng() % (rng() % 8 == 0 ? 24 * MiB : 64 * KiB);
      void* p = a.allocate(req);
      std::size_t r = a.round_size(req);
      std::size_t bs = a.block_size(p);
      ASSERT_GE(bs, r);
      // no overlap with any live block
      auto it = live.lower_bound(U(p));
      if (it != live.end()) ASSERT_GE(it->first, U(p) + bs);
      if (it != live.begin()) {
        --it;
        ASSERT_LE(it->first + it->second.first, U(p));
      }
      live[U(p)] = {bs, req};
      total_alloc += int64_t(bs);
    } else {
      auto it = live.begin();
      std::advance(it, rng() % live.size());
      a.deallocate(reinterpret_cast<void*>(it->first));
      total_freed += int64_t(it->second.first);
      live.erase(it);
    }
    int64_t cur = 0, req = 0;
    for (auto& kv : live) cur += int64_t(kv.second.first), req += int64_t(kv.second.second);
    peak = std::max(peak, cur);
    auto m = a.stats().to_map();
    ASSERT_EQ(m["allocated_bytes.all.current"], cur);
    ASSERT_EQ(m["requested_bytes.all.current"], req);
    ASSERT_EQ(m["allocation.all.current"], int64_t(live.size()));
    ASSERT_EQ(m["allocated_bytes.all.peak"], peak);
    ASSERT_EQ(m["allocated_bytes.all.allocated"], total_alloc);
    ASSERT_EQ(m["allocated_bytes.all.freed"], total_freed);
    ASSERT_EQ(m["allocated_bytes.all.current"],
              m["allocated_bytes.small_pool.current"] + m["allocated_bytes.large_pool.current"]);
    ASSERT_GE(m["reserved_bytes.all.current"], m["allocated_bytes.all.current"]);
    ASSERT_EQ(m["reserved_bytes.all.current"], int64_t(be->used()));
    ASSERT_EQ(m["active_bytes.all.current"], cur);
    auto snap = a.snapshot();
    int64_t seg_total = 0, free_b = 0;
    for (auto& s : snap.segments) {
      seg_total += int64_t(s.total_size);
      for (auto& b : s.blocks)
        if (!b.allocated) free_b += int64_t(b.size);
    }
    ASSERT_EQ(seg_total, m["reserved_bytes.all.current"]);
    ASSERT_EQ(free_b, seg_total - cur);
  }
  a.reset_peak_stats();
  EXPECT_EQ(S(a, "allocated_bytes.all.peak"), S(a, "allocated_bytes.all.current"));
  for (auto& kv : live) a.deallocate(reinterpret_cast<void*>(kv.first));
  a.empty_cache();
  EXPECT_EQ(S(a, "reserved_bytes.all.current"), 0);
  EXPECT_EQ(S(a, "segment.all.current"), 0);
  EXPECT_EQ(S(a, "inactive_split_bytes.all.current"), 0);
  a.reset_accumulated_stats();
  EXPECT_EQ(S(a, "allocated_bytes.all.allocated"), 0);
  EXPECT_EQ(S(a, "num_device_alloc"), 0);
}

TEST(AllocThreads, StressManyThreads) {
  auto be = std::make_shared<TestBackend>();
  CachingAllocator a(be);
  constexpr int kThreads = 8, kOps = 6000;
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t + 1);
      std::vector<std::pair<unsigned char*, std::size_t>> mine;
      for (int i = 0; i < kOps; ++i) {
        if (mine.empty() || rng() % 2) {
          std::size_t n = 1 + rng() % (rng() % 16 == 0 ? 3 * MiB : 8 * KiB);
          auto* p = static_cast<unsigned char*>(a.allocate(n));
          std::memset(p, t + 1, n);  // another thread owning these bytes would see them change
          mine.emplace_back(p, n);
        } else {
          std::size_t k = rng() % mine.size();
          auto [p, n] = mine[k];
          for (std::size_t j = 0; j < n; j += 61)
            if (p[j] != static_cast<unsigned char>(t + 1)) ++bad;
          if (p[n - 1] != static_cast<unsigned char>(t + 1)) ++bad;
          a.deallocate(p);
          mine[k] = mine.back();
          mine.pop_back();
        }
        if (i % 1000 == 0 && t == 0) (void)a.snapshot(), a.empty_cache();
      }
      for (auto& pn : mine) a.deallocate(pn.first);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(S(a, "allocated_bytes.all.current"), 0);
  EXPECT_EQ(S(a, "allocation.all.current"), 0);
  a.empty_cache();
  EXPECT_EQ(S(a, "reserved_bytes.all.current"), 0);
  EXPECT_EQ(be->used(), 0u);
}

TEST(AllocContext, RecorderAttachesToLiveBlocks) {
  CachingAllocator a(std::make_shared<TestBackend>());
  int n = 0;
  a.set_context_recorder([&n] {
    auto v = std::make_shared<std::vector<Frame>>();
    v->push_back(Frame{"f.py", "fn", ++n});
    return Context(v);
  });
  void* p = a.allocate(100);
  a.set_context_recorder(nullptr);
  void* q = a.allocate(100);
  auto snap = a.snapshot();
  ASSERT_EQ(snap.segments.size(), 1u);
  const auto& blocks = snap.segments[0].blocks;
  ASSERT_GE(blocks.size(), 2u);
  ASSERT_TRUE(blocks[0].context);
  EXPECT_EQ(blocks[0].context->at(0).line, 1);
  EXPECT_FALSE(blocks[1].context);
  a.deallocate(p);
  a.deallocate(q);
}

TEST(AllocTraceRing, GrowsThenOverwritesTheOldest) {
  auto entry = [](std::uintptr_t addr) {
    TraceEntry e;
    e.addr = addr;
    return e;
  };
  TraceRing ring(3);
  for (std::uintptr_t addr = 1; addr <= 5; ++addr) ring.push(entry(addr));
  ASSERT_EQ(ring.size(), 3u);
  std::vector<std::uintptr_t> kept;
  for (const auto& e : ring.entries()) kept.push_back(e.addr);
  EXPECT_EQ(kept, (std::vector<std::uintptr_t>{3, 4, 5}));  // the newest, oldest first
  ring.set_max_entries(2);                                    // shrinking keeps the newest
  kept.clear();
  for (const auto& e : ring.entries()) kept.push_back(e.addr);
  EXPECT_EQ(kept, (std::vector<std::uintptr_t>{4, 5}));
  ring.push(entry(6));
  EXPECT_EQ(ring.entries().front().addr, 5u);
  EXPECT_EQ(ring.entries().back().addr, 6u);
  EXPECT_THROW(ring.set_max_entries(0), std::invalid_argument);
  EXPECT_THROW(TraceRing{0}, std::invalid_argument);
  ring.clear();
  EXPECT_TRUE(ring.entries().empty());
  EXPECT_EQ(std::string(action_name(TraceAction::kFreeRequested)), "free_requested");
  EXPECT_EQ(std::string(action_name(TraceAction::kSegmentFree)), "segment_free");
}

// "action addr size" of each trace entry, addresses as offsets from base.
std::vector<std::string> trace_lines(const CachingAllocator& a, void* base) {
  std::vector<std::string> lines;
  for (const auto& e : a.trace()) {
    const std::string addr = e.action == TraceAction::kOom ? "-" : std::to_string(e.addr - U(base));
    lines.push_back(std::string(action_name(e.action)) + " " + addr + " " + std::to_string(e.size));
  }
  return lines;
}

TEST(AllocTrace, NothingRecordedWhileDisabled) {
  CachingAllocator a(std::make_shared<TestBackend>());
  a.deallocate(a.allocate(100));
  a.empty_cache();
  EXPECT_TRUE(a.trace().empty());
  a.record_trace(true);
  a.record_trace(false);  // disabled again before anything happened
  a.deallocate(a.allocate(100));
  EXPECT_TRUE(a.trace().empty());
}

TEST(AllocTrace, ActionsInOrderWithSizesAndStacks) {
  CachingAllocator a(std::make_shared<TestBackend>());
  a.set_context_recorder([] { return Context(std::make_shared<std::vector<Frame>>(1, Frame{"f.py", "fn", 7})); });
  a.record_trace(true);
  void* p = a.allocate(100);   // a new small segment, then the block at its start
  void* q = a.allocate(5000);  // right after p's 512 B
  a.deallocate(p);
  a.deallocate(q);
  a.empty_cache();
  a.record_trace(false);
  a.allocate(100);  // not recorded
  EXPECT_EQ(trace_lines(a, p),
            (std::vector<std::string>{"segment_alloc 0 " + std::to_string(2 * MiB), "alloc 0 100", "alloc 512 5000",
                                      "free_requested 0 100", "free_completed 0 100", "free_requested 512 5000",
                                      "free_completed 512 5000", "segment_free 0 " + std::to_string(2 * MiB)}));
  const auto entries = a.trace();
  for (std::size_t i = 0; i < entries.size(); ++i) {
    if (i > 0) {
      EXPECT_GE(entries[i].time_us, entries[i - 1].time_us);
    }
    const bool has_stack = entries[i].action != TraceAction::kSegmentFree;  // frees carry the allocating stack
    ASSERT_EQ(bool(entries[i].context), has_stack) << i;
    if (has_stack) {
      EXPECT_EQ(entries[i].context->at(0).line, 7);
    }
  }
  a.record_trace(true, TraceRing::kUnbounded, /*clear=*/true);
  EXPECT_TRUE(a.trace().empty());
  a.record_trace(false);
}

TEST(AllocTrace, RingKeepsTheNewestEntries) {
  CachingAllocator a(std::make_shared<TestBackend>());
  void* warm = a.allocate(100);  // the segment exists before the trace starts
  a.record_trace(true, 4);
  std::vector<void*> blocks;
  for (int i = 0; i < 5; ++i) blocks.push_back(a.allocate(100));
  EXPECT_EQ(trace_lines(a, warm), (std::vector<std::string>{"alloc 1024 100", "alloc 1536 100", "alloc 2048 100",
                                                            "alloc 2560 100"}));
  for (void* b : blocks) a.deallocate(b);
  a.deallocate(warm);
  const auto entries = a.trace();
  ASSERT_EQ(entries.size(), 4u);
  EXPECT_EQ(entries.back().action, TraceAction::kFreeCompleted);
  EXPECT_EQ(entries.back().addr, U(warm));
  EXPECT_THROW(a.record_trace(true, 0), std::invalid_argument);
  a.record_trace(false);
}

TEST(AllocTrace, PendingFreeCompletesAfterTheEventAndOomIsRecorded) {
  auto be = std::make_shared<TestBackend>(SIZE_MAX, /*events=*/true);
  Options o;
  o.memory_limit = 4 * MiB;
  CachingAllocator a(be, o);
  a.record_trace(true);
  void* p = a.allocate(4 * KiB, 1);
  a.record_stream(p, 2);
  a.deallocate(p);  // free requested; completes once stream 2's event has
  be->complete_all();
  void* q = a.allocate(4 * KiB, 1);  // processes the completed event first
  EXPECT_THROW(a.allocate(8 * MiB, 1), OutOfMemory);
  a.deallocate(q);
  a.record_trace(false);
  const auto lines = trace_lines(a, p);
  EXPECT_EQ(lines, (std::vector<std::string>{"segment_alloc 0 " + std::to_string(2 * MiB), "alloc 0 4096",
                                             "free_requested 0 4096", "free_completed 0 4096", "alloc 0 4096",
                                             "oom - " + std::to_string(8 * MiB), "free_requested 0 4096",
                                             "free_completed 0 4096"}));
  const auto entries = a.trace();
  EXPECT_EQ(entries[5].device_free, 2 * MiB);  // the limit less the reserved small segment
  EXPECT_EQ(entries[5].stream, 1u);
}

TEST(AllocHost, RegistryInstanceIsUsable) {
  CachingAllocator& h = host_allocator();
  EXPECT_EQ(&h, &host_allocator());
  EXPECT_EQ(h.device(), "cpu");
  void* p = h.allocate(3000);
  std::memset(p, 1, 3000);
  EXPECT_EQ(U(p) % 512, 0u);
  h.deallocate(p);
  h.empty_cache();
}
