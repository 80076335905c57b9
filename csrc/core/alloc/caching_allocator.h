// A device-agnostic caching allocator (torch-free, thread-safe).
//
// Learned from PyTorch's CUDACachingAllocator and RAPIDS RMM (no code copied):
//  * two pools: requests <= small_size (1 MiB) are carved from small segments (2 MiB),
//    larger ones from large segments (20 MiB, or the request rounded to 2 MiB);
//  * best fit over free blocks ordered by (stream, size, address), found through per-stream
//    exact-size lists and a bitmap (a set for blocks above the segment size); blocks are split when
//    the rest is worth keeping and coalesced with free neighbours when freed; blocks of
//    max_split_size or more are never split;
//  * a block is reused on the stream it was allocated on at once; a block used on other
//    streams (record_stream) is reused only once the backend's events have completed;
//  * empty_cache() gives whole free segments back; a garbage-collection threshold (a
//    fraction of the memory limit) frees cached segments before the backend is asked for
//    more;
//  * a hard memory limit, and an out-of-memory chain: free the cache and retry, call the
//    registered callbacks one by one (without the lock held) and retry after each, then
//    throw OutOfMemory naming requested, reserved, allocated and free bytes;
//  * statistics under the key names of torch.cuda.memory_stats(), and a snapshot;
//  * while a trace is on, each action (alloc, free_requested, free_completed, segment_alloc,
//    segment_free, oom) is recorded into a bounded ring (history.h), with the allocating stack.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/alloc/backend.h"
#include "core/alloc/history.h"
#include "core/alloc/size_class_lists.h"
#include "core/common/flat_index.h"

namespace memwarden::alloc {

struct Options {
  std::size_t min_block = 512;              // every size is rounded up to a multiple of this
  std::size_t small_size = 1 << 20;         // largest request served from the small pool
  std::size_t small_segment = 2 << 20;      // segment size of the small pool
  std::size_t min_large_alloc = 10 << 20;   // requests below this share large_segment segments
  std::size_t large_segment = 20 << 20;     // segment size for mid-sized requests
  std::size_t round_large = 2 << 20;        // bigger requests get their own segment, rounded to this
  std::size_t max_split_size = SIZE_MAX;    // blocks of this size or more are never split
  unsigned roundup_power2_divisions = 0;    // 0: off; N (power of 2): round up to 1/N steps of the power of 2
  double gc_threshold = 0.0;                // (0, 1): free cached segments above this fraction of the limit
  std::size_t memory_limit = 0;             // 0: unlimited
};

// Validates options; throws std::invalid_argument naming the bad field.
void validate(const Options& options);

struct Stat {
  int64_t current = 0, peak = 0, allocated = 0, freed = 0;
  void update(int64_t delta) {
    current += delta;
    if (delta > 0) {
      allocated += delta;
      if (current > peak) peak = current;
    } else {
      freed -= delta;
    }
  }
};

enum StatType { kAll = 0, kSmall = 1, kLarge = 2, kStatTypes = 3 };

struct Stats {
  Stat allocation[kStatTypes], segment[kStatTypes], active[kStatTypes], inactive_split[kStatTypes];
  Stat allocated_bytes[kStatTypes], reserved_bytes[kStatTypes], active_bytes[kStatTypes],
      inactive_split_bytes[kStatTypes], requested_bytes[kStatTypes];
  Stat oversize_allocations, oversize_segments;
  int64_t num_alloc_retries = 0, num_ooms = 0, num_device_alloc = 0, num_device_free = 0,
          num_sync_all_streams = 0, num_oom_callbacks = 0;
  int64_t max_split_size = 0, memory_limit = 0;

  // Flat map with the key names of torch.cuda.memory_stats() ("allocated_bytes.all.current", ...).
  std::map<std::string, int64_t> to_map() const;
};

struct BlockInfo {
  std::uintptr_t address = 0;
  std::size_t size = 0, requested_size = 0;
  bool allocated = false;  // handed out
  bool active = false;     // allocated, or freed but waiting for other streams
  Context context;
};

struct SegmentInfo {
  std::uintptr_t address = 0;
  std::size_t total_size = 0, allocated_size = 0, active_size = 0, requested_size = 0;
  StreamId stream = 0;
  bool small = false;
  std::vector<BlockInfo> blocks;
};

struct Snapshot {
  std::vector<SegmentInfo> segments;
  std::size_t free_bytes = 0, largest_free = 0;
  double fragmentation = 0.0;  // 1 - largest free block / free bytes (0 when nothing is free)
  std::vector<TraceEntry> trace;  // oldest first, when asked for: taken under the same lock as the segments
};

class OutOfMemory : public std::runtime_error {
 public:
  OutOfMemory(const std::string& what, std::size_t requested, std::size_t reserved, std::size_t allocated,
              std::size_t free)
      : std::runtime_error(what), requested(requested), reserved(reserved), allocated(allocated), free(free) {}
  std::size_t requested, reserved, allocated, free;
};

// An out-of-memory callback gets the request size in bytes; it returns true when it may have
// freed memory (the allocation is retried), false otherwise.
using OomCallback = std::function<bool(std::size_t)>;

class CachingAllocator {
 public:
  explicit CachingAllocator(std::shared_ptr<Backend> backend, Options options = {}, std::string device = "cpu");
  ~CachingAllocator();  // gives every segment back (pointers still out become invalid)
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // Never returns null for bytes > 0 (returns null for 0); throws OutOfMemory.
  void* allocate(std::size_t bytes, StreamId stream = 0);
  // Throws std::invalid_argument for a pointer this allocator did not hand out.
  void deallocate(void* ptr);
  // Marks ptr as used on `stream` too (no-op on backends without events).
  void record_stream(void* ptr, StreamId stream);
  bool owns(const void* ptr) const;
  std::size_t block_size(const void* ptr) const;  // rounded size; throws for unknown pointers

  void empty_cache();
  Stats stats() const;
  void reset_peak_stats();
  void reset_accumulated_stats();
  Snapshot snapshot(bool include_trace = false) const;

  void set_memory_limit(std::size_t bytes);  // 0: unlimited
  std::size_t memory_limit() const;
  void set_gc_threshold(double fraction);
  const Options& options() const { return options_; }
  void set_options(const Options& options);  // only while nothing is reserved
  std::size_t round_size(std::size_t bytes) const;
  std::size_t segment_size(std::size_t rounded) const;

  int add_oom_callback(OomCallback cb);
  bool remove_oom_callback(int id);
  void clear_oom_callbacks();
  void set_context_recorder(ContextRecorder recorder);
  // Records each action into a ring of the newest max_entries while enabled. Disabling stops
  // recording and keeps what was recorded; clear drops it. Throws for max_entries 0.
  void record_trace(bool enabled, std::size_t max_entries = TraceRing::kUnbounded, bool clear = false);
  std::vector<TraceEntry> trace() const;  // oldest first

  const std::string& device() const { return device_; }
  Backend& backend() { return *backend_; }

 private:
  struct Block;
  // Free blocks above the size-class lists' cap. A block's ordering fields are copied into
  // its set entry, so a search compares without loading the Block itself.
  struct FreeEntry {
    StreamId stream;
    std::size_t size;
    std::uintptr_t address;
    Block* block;
    bool operator<(const FreeEntry& o) const {
      if (stream != o.stream) return stream < o.stream;
      if (size != o.size) return size < o.size;
      return address < o.address;
    }
  };
  using FreeSet = std::set<FreeEntry>;
  // The free blocks of one pool: per stream, exact-size lists up to the cap (most blocks), and
  // one set ordered by (stream, size, address) for the bigger ones.
  struct Pool {
    std::vector<std::pair<StreamId, std::unique_ptr<SizeClassLists<Block>>>> lists_by_stream;
    FreeSet above_cap;
    std::size_t cap = 0;  // largest size kept in the lists; set from the options
  };

  Block* try_allocate_locked(std::size_t size, std::size_t requested, StreamId stream, const Context& context,
                             bool& released);
  Block* find_free_block(Pool& pool, std::size_t size, StreamId stream);
  SizeClassLists<Block>* size_class_lists(Pool& pool, StreamId stream, bool create);
  void size_pools();  // sets each pool's cap from options_ (while both pools are empty)
  Block* new_segment_locked(std::size_t size, bool small, StreamId stream, const Context& context);
  void insert_free(Block* b);
  void erase_free(Block* b);
  void free_block_locked(Block* b);
  void release_segment_locked(Block* b);
  bool release_cached_locked(std::size_t until_reserved);  // releases whole free segments
  void process_events_locked();
  void synchronize_and_drain_events_locked();
  [[noreturn]] void throw_oom_locked(std::size_t requested, std::size_t rounded, StreamId stream);
  void record_locked(TraceAction action, std::uintptr_t addr, std::size_t size, StreamId stream,
                     const Context& context, std::size_t device_free = 0);
  std::size_t reserved_locked() const { return static_cast<std::size_t>(stats_.reserved_bytes[kAll].current); }
  static void update_stat(Stat* arr, bool small, int64_t delta) {
    arr[kAll].update(delta);
    arr[small ? kSmall : kLarge].update(delta);
  }
  Block* new_block();
  void recycle_block(Block* b);

  std::shared_ptr<Backend> backend_;
  Options options_;
  std::string device_;
  mutable std::mutex mutex_;
  Pool small_pool_, large_pool_;
  core::FlatIndex<Block*, nullptr> allocated_;  // handed-out blocks by address
  std::vector<Block*> spare_blocks_;  // Block objects kept for reuse: splits and merges allocate nothing
  std::map<std::uintptr_t, Block*> segments_;             // first block of each segment
  std::vector<std::pair<EventId, Block*>> pending_events_;
  Stats stats_;
  TraceRing trace_;
  bool tracing_ = false;

  std::mutex callbacks_mutex_;
  std::vector<std::pair<int, std::shared_ptr<OomCallback>>> callbacks_;
  int next_callback_id_ = 1;
  std::shared_ptr<ContextRecorder> recorder_;  // read and written under callbacks_mutex_
  std::atomic<bool> recording_{false};
};

}  // namespace memwarden::alloc
