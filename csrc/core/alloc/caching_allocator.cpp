#include "core/alloc/caching_allocator.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <limits>
#include <sstream>

namespace memwarden::alloc {

namespace {

bool is_pow2(std::size_t v) { return v != 0 && (v & (v - 1)) == 0; }

std::string format_bytes(std::size_t b) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024.0 && u < 5) {
    v /= 1024.0;
    ++u;
  }
  char buf[64];
  if (u == 0) std::snprintf(buf, sizeof buf, "%zu B", b);
  else std::snprintf(buf, sizeof buf, "%.2f %s", v, units[u]);
  return buf;
}

std::size_t round_up(std::size_t v, std::size_t m) { return (v + m - 1) / m * m; }

int64_t now_us() {
  using namespace std::chrono;
  return duration_cast<microseconds>(system_clock::now().time_since_epoch()).count();
}

}  // namespace

void validate(const Options& o) {
  auto bad = [](const std::string& m) { throw std::invalid_argument("allocator options: " + m); };
  if (!is_pow2(o.min_block) || o.min_block < 16) bad("min_block must be a power of 2 >= 16, got " + std::to_string(o.min_block));
  if (o.small_size == 0 || o.small_size % o.min_block) bad("small_size must be a positive multiple of min_block");
  if (o.small_segment < o.small_size || o.small_segment % o.min_block) bad("small_segment must be >= small_size and a multiple of min_block");
  if (o.large_segment < o.min_large_alloc || o.large_segment % o.min_block) bad("large_segment must be >= min_large_alloc and a multiple of min_block");
  if (o.min_large_alloc <= o.small_size) bad("min_large_alloc must be > small_size");
  if (o.round_large == 0 || o.round_large % o.min_block) bad("round_large must be a positive multiple of min_block");
  if (o.max_split_size != SIZE_MAX && o.max_split_size <= o.small_size) bad("max_split_size must be > small_size");
  if (o.roundup_power2_divisions != 0 && !is_pow2(o.roundup_power2_divisions)) bad("roundup_power2_divisions must be 0 or a power of 2");
  if (!(o.gc_threshold >= 0.0 && o.gc_threshold < 1.0)) bad("gc_threshold must be in [0, 1)");
}

std::map<std::string, int64_t> Stats::to_map() const {
  std::map<std::string, int64_t> m;
  auto put = [&m](const std::string& prefix, const Stat& s) {
    m[prefix + ".current"] = s.current;
    m[prefix + ".peak"] = s.peak;
    m[prefix + ".allocated"] = s.allocated;
    m[prefix + ".freed"] = s.freed;
  };
  static const char* pools[] = {"all", "small_pool", "large_pool"};
  auto put_arr = [&](const std::string& name, const Stat* arr) {
    for (int i = 0; i < kStatTypes; ++i) put(name + "." + pools[i], arr[i]);
  };
  put_arr("allocation", allocation);
  put_arr("segment", segment);
  put_arr("active", active);
  put_arr("inactive_split", inactive_split);
  put_arr("allocated_bytes", allocated_bytes);
  put_arr("reserved_bytes", reserved_bytes);
  put_arr("active_bytes", active_bytes);
  put_arr("inactive_split_bytes", inactive_split_bytes);
  put_arr("requested_bytes", requested_bytes);
  put("oversize_allocations", oversize_allocations);
  put("oversize_segments", oversize_segments);
  m["num_alloc_retries"] = num_alloc_retries;
  m["num_ooms"] = num_ooms;
  m["num_device_alloc"] = num_device_alloc;
  m["num_device_free"] = num_device_free;
  m["num_sync_all_streams"] = num_sync_all_streams;
  m["num_oom_callbacks"] = num_oom_callbacks;
  m["max_split_size"] = max_split_size;
  m["memory_limit"] = memory_limit;
  return m;
}

struct CachingAllocator::Block {
  std::uintptr_t ptr = 0;
  std::size_t size = 0;
  std::size_t requested = 0;
  StreamId stream = 0;
  bool small = false;
  bool allocated = false;      // handed out
  bool in_pool = false;        // in a free set
  bool split_counted = false;  // counted in inactive_split
  int event_count = 0;         // outstanding events of other streams
  Block* prev = nullptr;
  Block* next = nullptr;
  std::vector<StreamId> stream_uses;
  Context context;
  Block* free_prev = nullptr;  // neighbours in a size-class list, while in one
  Block* free_next = nullptr;
  FreeSet::iterator pool_it;  // valid while in a pool's above_cap set
  FreeSet::node_type free_node;  // this block's set node while it is out of the set (reused, not reallocated)
  bool is_split() const { return prev != nullptr || next != nullptr; }
};

CachingAllocator::CachingAllocator(std::shared_ptr<Backend> backend, Options options, std::string device)
    : backend_(std::move(backend)), options_(options), device_(std::move(device)) {
  if (!backend_) throw std::invalid_argument("CachingAllocator: backend must not be null");
  validate(options_);
  size_pools();
}

void CachingAllocator::size_pools() {
  // Up to 64Ki lists per pool and stream (512 KiB of heads): with the default 512 B min_block
  // that covers every block of a shared segment; bigger blocks go to the set.
  const std::size_t max_lists = std::size_t{1} << 16;
  const std::size_t list_limit = max_lists * options_.min_block;
  small_pool_.cap = std::min(options_.small_segment, list_limit);
  large_pool_.cap = std::min(options_.large_segment, list_limit);
  small_pool_.lists_by_stream.clear();
  large_pool_.lists_by_stream.clear();
}

CachingAllocator::~CachingAllocator() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!pending_events_.empty()) {
    try {
      backend_->synchronize();
    } catch (...) {
    }
    for (auto& pe : pending_events_) backend_->destroy_event(pe.first);
    pending_events_.clear();
  }
  for (auto& kv : segments_) {
    Block* b = kv.second;
    std::size_t total = 0;
    for (Block* x = b; x != nullptr;) {
      total += x->size;
      Block* n = x->next;
      delete x;
      x = n;
    }
    backend_->deallocate(reinterpret_cast<void*>(kv.first), total);
  }
  segments_.clear();
  for (Block* b : spare_blocks_) delete b;
}

CachingAllocator::Block* CachingAllocator::new_block() {
  if (spare_blocks_.empty()) return new Block;
  Block* b = spare_blocks_.back();
  spare_blocks_.pop_back();
  b->requested = 0;
  b->allocated = b->in_pool = b->split_counted = false;
  b->event_count = 0;
  b->prev = b->next = nullptr;
  return b;
}

void CachingAllocator::recycle_block(Block* b) {
  b->stream_uses.clear();
  b->context.reset();
  spare_blocks_.push_back(b);
}

std::size_t CachingAllocator::round_size(std::size_t bytes) const {
  const std::size_t mb = options_.min_block;
  if (bytes <= mb) return mb;
  std::size_t s = bytes;
  const unsigned divs = options_.roundup_power2_divisions;
  if (divs > 1) {
    std::size_t p = std::size_t{1} << (63 - __builtin_clzll(static_cast<unsigned long long>(bytes)));
    if (p != bytes) {
      std::size_t step = p / divs;
      if (step > 0) s = round_up(bytes, step);
    }
  }
  return round_up(s, mb);
}

std::size_t CachingAllocator::segment_size(std::size_t rounded) const {
  if (rounded <= options_.small_size) return options_.small_segment;
  if (rounded < options_.min_large_alloc) return options_.large_segment;
  return round_up(rounded, options_.round_large);
}

SizeClassLists<CachingAllocator::Block>* CachingAllocator::size_class_lists(Pool& pool, StreamId stream, bool create) {
  for (auto& [s, lists] : pool.lists_by_stream)
    if (s == stream) return lists.get();
  if (!create) return nullptr;
  const std::size_t granule = options_.min_block;
  pool.lists_by_stream.emplace_back(stream, std::make_unique<SizeClassLists<Block>>(granule, pool.cap / granule));
  return pool.lists_by_stream.back().second.get();
}

void CachingAllocator::insert_free(Block* b) {
  Pool& pool = b->small ? small_pool_ : large_pool_;
  if (b->size <= pool.cap) {
    size_class_lists(pool, b->stream, true)->insert(b);
  } else {
    const FreeEntry entry{b->stream, b->size, b->ptr, b};
    if (b->free_node.empty()) {
      b->pool_it = pool.above_cap.insert(entry).first;
    } else {
      b->free_node.value() = entry;
      b->pool_it = pool.above_cap.insert(std::move(b->free_node)).position;
    }
  }
  b->in_pool = true;
  if (b->is_split()) {
    b->split_counted = true;
    update_stat(stats_.inactive_split, b->small, 1);
    update_stat(stats_.inactive_split_bytes, b->small, static_cast<int64_t>(b->size));
  }
}

void CachingAllocator::erase_free(Block* b) {
  Pool& pool = b->small ? small_pool_ : large_pool_;
  if (b->size <= pool.cap) size_class_lists(pool, b->stream, false)->erase(b);
  else b->free_node = pool.above_cap.extract(b->pool_it);  // by iterator: no second search; the node is kept for reuse
  b->in_pool = false;
  if (b->split_counted) {
    b->split_counted = false;
    update_stat(stats_.inactive_split, b->small, -1);
    update_stat(stats_.inactive_split_bytes, b->small, -static_cast<int64_t>(b->size));
  }
}

CachingAllocator::Block* CachingAllocator::find_free_block(Pool& pool, std::size_t size, StreamId stream) {
  // Every listed block is smaller than every block in the set, so the lists answer first.
  Block* b = nullptr;
  if (SizeClassLists<Block>* lists = size_class_lists(pool, stream, false)) b = lists->smallest_at_least(size);
  if (b == nullptr) {
    auto it = pool.above_cap.lower_bound(FreeEntry{stream, size, 0, nullptr});
    if (it == pool.above_cap.end() || it->stream != stream) return nullptr;
    b = it->block;
  }
  const std::size_t msplit = options_.max_split_size;
  if (msplit != SIZE_MAX) {
    // Do not carve small requests out of oversize blocks, nor waste much of one.
    if (size < msplit && b->size >= msplit) return nullptr;
    if (size >= msplit && b->size >= size + options_.large_segment) return nullptr;
  }
  erase_free(b);
  return b;
}

CachingAllocator::Block* CachingAllocator::new_segment_locked(std::size_t size, bool small, StreamId stream,
                                                              const Context& context) {
  const std::size_t limit = options_.memory_limit;
  if (limit != 0 && (size > limit || reserved_locked() > limit - size)) return nullptr;
  void* p = backend_->allocate(size);
  if (p == nullptr) return nullptr;
  Block* b = new_block();
  b->ptr = reinterpret_cast<std::uintptr_t>(p);
  b->size = size;
  b->stream = stream;
  b->small = small;
  segments_[b->ptr] = b;
  update_stat(stats_.segment, small, 1);
  update_stat(stats_.reserved_bytes, small, static_cast<int64_t>(size));
  if (size >= options_.max_split_size) stats_.oversize_segments.update(1);
  ++stats_.num_device_alloc;
  record_locked(TraceAction::kSegmentAlloc, b->ptr, size, stream, context);
  return b;
}

void CachingAllocator::release_segment_locked(Block* b) {
  erase_free(b);
  segments_.erase(b->ptr);
  backend_->deallocate(reinterpret_cast<void*>(b->ptr), b->size);
  update_stat(stats_.segment, b->small, -1);
  update_stat(stats_.reserved_bytes, b->small, -static_cast<int64_t>(b->size));
  if (b->size >= options_.max_split_size) stats_.oversize_segments.update(-1);
  ++stats_.num_device_free;
  record_locked(TraceAction::kSegmentFree, b->ptr, b->size, b->stream, nullptr);
  recycle_block(b);
}

bool CachingAllocator::release_cached_locked(std::size_t until_reserved) {
  bool released = false;
  for (auto it = segments_.begin(); it != segments_.end() && reserved_locked() > until_reserved;) {
    Block* b = it->second;
    ++it;
    if (b->in_pool && b->next == nullptr) {
      release_segment_locked(b);
      released = true;
    }
  }
  return released;
}

void CachingAllocator::free_block_locked(Block* b) {
  record_locked(TraceAction::kFreeCompleted, b->ptr, b->requested, b->stream, b->context);
  update_stat(stats_.active, b->small, -1);
  update_stat(stats_.active_bytes, b->small, -static_cast<int64_t>(b->size));
  b->stream_uses.clear();
  b->context.reset();
  if (b->prev != nullptr && b->prev->in_pool) {
    // The free block in front grows over b: it keeps its address, so segments_ stays valid.
    Block* p = b->prev;
    erase_free(p);
    p->size += b->size;
    p->next = b->next;
    if (p->next != nullptr) p->next->prev = p;
    recycle_block(b);
    b = p;
  }
  if (b->next != nullptr && b->next->in_pool) {
    Block* n = b->next;
    erase_free(n);
    b->size += n->size;
    b->next = n->next;
    if (b->next != nullptr) b->next->prev = b;
    recycle_block(n);
  }
  insert_free(b);
}

void CachingAllocator::process_events_locked() {
  std::size_t keep = 0;
  for (std::size_t i = 0; i < pending_events_.size(); ++i) {
    auto pe = pending_events_[i];
    if (backend_->query_event(pe.first)) {
      backend_->destroy_event(pe.first);
      if (--pe.second->event_count == 0) free_block_locked(pe.second);
    } else {
      pending_events_[keep++] = pe;
    }
  }
  pending_events_.resize(keep);
}

void CachingAllocator::synchronize_and_drain_events_locked() {
  if (pending_events_.empty()) return;
  backend_->synchronize();
  ++stats_.num_sync_all_streams;
  for (auto& pe : pending_events_) {
    backend_->destroy_event(pe.first);
    if (--pe.second->event_count == 0) free_block_locked(pe.second);
  }
  pending_events_.clear();
}

CachingAllocator::Block* CachingAllocator::try_allocate_locked(std::size_t size, std::size_t requested,
                                                               StreamId stream, const Context& context,
                                                               bool& released) {
  if (!pending_events_.empty()) process_events_locked();
  const bool small = size <= options_.small_size;
  Pool& pool = small ? small_pool_ : large_pool_;
  Block* b = find_free_block(pool, size, stream);
  if (b == nullptr) {
    const std::size_t seg = segment_size(size);
    const std::size_t limit = options_.memory_limit;
    if (options_.gc_threshold > 0.0 && limit != 0) {
      const auto threshold = static_cast<std::size_t>(options_.gc_threshold * static_cast<double>(limit));
      if (reserved_locked() + seg > threshold) release_cached_locked(threshold > seg ? threshold - seg : 0);
    }
    b = new_segment_locked(seg, small, stream, context);
    if (b == nullptr) {
      // Free everything cached (including blocks other streams were waiting on) and retry.
      synchronize_and_drain_events_locked();
      b = find_free_block(pool, size, stream);
      if (b == nullptr && release_cached_locked(0)) {
        released = true;
        ++stats_.num_alloc_retries;
        b = new_segment_locked(seg, small, stream, context);
      }
      // Under a tight limit, a segment just big enough for this request may still fit.
      const std::size_t tight = small ? options_.small_segment : round_up(size, options_.round_large);
      if (b == nullptr && tight < seg) b = new_segment_locked(tight, small, stream, context);
      if (b == nullptr) return nullptr;
    }
  }
  const std::size_t remaining = b->size - size;
  const bool split = b->small ? remaining >= options_.min_block
                              : (size < options_.max_split_size && remaining > options_.small_size);
  if (split) {
    Block* rest = new_block();
    rest->ptr = b->ptr + size;
    rest->size = remaining;
    rest->stream = b->stream;
    rest->small = b->small;
    rest->prev = b;
    rest->next = b->next;
    if (rest->next != nullptr) rest->next->prev = rest;
    b->next = rest;
    b->size = size;
    insert_free(rest);
  }
  b->allocated = true;
  b->requested = requested;
  b->context = context;
  allocated_.insert(b->ptr, b);
  update_stat(stats_.allocation, b->small, 1);
  update_stat(stats_.allocated_bytes, b->small, static_cast<int64_t>(b->size));
  update_stat(stats_.requested_bytes, b->small, static_cast<int64_t>(requested));
  update_stat(stats_.active, b->small, 1);
  update_stat(stats_.active_bytes, b->small, static_cast<int64_t>(b->size));
  if (b->size >= options_.max_split_size) stats_.oversize_allocations.update(1);
  record_locked(TraceAction::kAlloc, b->ptr, requested, stream, context);
  return b;
}

void CachingAllocator::throw_oom_locked(std::size_t requested, std::size_t rounded, StreamId stream) {
  ++stats_.num_ooms;
  const std::size_t reserved = reserved_locked();
  const auto allocated = static_cast<std::size_t>(stats_.allocated_bytes[kAll].current);
  const std::size_t limit = options_.memory_limit;
  std::size_t free = backend_->free_memory();
  if (limit != 0) free = std::min(free, reserved >= limit ? 0 : limit - reserved);
  record_locked(TraceAction::kOom, 0, requested, stream, nullptr, free);
  std::ostringstream os;
  os << "memwarden: out of memory on " << device_ << ": tried to allocate " << format_bytes(requested);
  if (rounded != requested) os << " (" << format_bytes(rounded) << " rounded)";
  os << "; " << format_bytes(allocated) << " allocated, " << format_bytes(reserved) << " reserved by memwarden, ";
  if (free == SIZE_MAX) os << "free memory unknown";
  else os << format_bytes(free) << " free";
  if (limit != 0) os << " (memory limit " << format_bytes(limit) << ")";
  os << " [" << backend_->name() << " backend]";
  throw OutOfMemory(os.str(), requested, reserved, allocated, free);
}

void* CachingAllocator::allocate(std::size_t bytes, StreamId stream) {
  if (bytes == 0) return nullptr;
  if (bytes > std::numeric_limits<std::size_t>::max() / 4) {
    std::lock_guard<std::mutex> lock(mutex_);
    throw_oom_locked(bytes, bytes, stream);
  }
  const std::size_t size = round_size(bytes);
  Context ctx;
  if (recording_.load(std::memory_order_relaxed)) {
    std::shared_ptr<ContextRecorder> rec;
    {
      std::lock_guard<std::mutex> lock(callbacks_mutex_);
      rec = recorder_;
    }
    if (rec) ctx = (*rec)();
  }
  bool released = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (Block* b = try_allocate_locked(size, bytes, stream, ctx, released)) return reinterpret_cast<void*>(b->ptr);
  }
  // The cache did not help: ask the application, one callback at a time, lock released
  // (a callback may free memory through this allocator).
  std::vector<std::shared_ptr<OomCallback>> cbs;
  {
    std::lock_guard<std::mutex> lock(callbacks_mutex_);
    for (auto& c : callbacks_) cbs.push_back(c.second);
  }
  for (auto& cb : cbs) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++stats_.num_oom_callbacks;
    }
    if (!(*cb)(size)) continue;
    std::lock_guard<std::mutex> lock(mutex_);
    ++stats_.num_alloc_retries;
    if (Block* b = try_allocate_locked(size, bytes, stream, ctx, released)) return reinterpret_cast<void*>(b->ptr);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  throw_oom_locked(bytes, size, stream);
}

void CachingAllocator::deallocate(void* ptr) {
  if (ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mutex_);
  Block* b = allocated_.take(reinterpret_cast<std::uintptr_t>(ptr));
  if (b == nullptr)
    throw std::invalid_argument("memwarden allocator (" + device_ + "): pointer was not allocated here or was already freed");
  b->allocated = false;
  record_locked(TraceAction::kFreeRequested, b->ptr, b->requested, b->stream, b->context);
  update_stat(stats_.allocation, b->small, -1);
  update_stat(stats_.allocated_bytes, b->small, -static_cast<int64_t>(b->size));
  update_stat(stats_.requested_bytes, b->small, -static_cast<int64_t>(b->requested));
  if (b->size >= options_.max_split_size) stats_.oversize_allocations.update(-1);
  if (!b->stream_uses.empty() && backend_->has_events()) {
    for (StreamId s : b->stream_uses) {
      EventId e = backend_->record_event(s);
      ++b->event_count;
      pending_events_.emplace_back(e, b);
    }
    b->stream_uses.clear();
  } else {
    free_block_locked(b);
  }
}

void CachingAllocator::record_stream(void* ptr, StreamId stream) {
  std::lock_guard<std::mutex> lock(mutex_);
  Block* b = allocated_.find(reinterpret_cast<std::uintptr_t>(ptr));
  if (b == nullptr) throw std::invalid_argument("record_stream: pointer is not a live allocation of this allocator");
  if (stream == b->stream) return;
  if (std::find(b->stream_uses.begin(), b->stream_uses.end(), stream) == b->stream_uses.end())
    b->stream_uses.push_back(stream);
}

bool CachingAllocator::owns(const void* ptr) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return allocated_.find(reinterpret_cast<std::uintptr_t>(ptr)) != nullptr;
}

std::size_t CachingAllocator::block_size(const void* ptr) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const Block* b = allocated_.find(reinterpret_cast<std::uintptr_t>(ptr));
  if (b == nullptr) throw std::invalid_argument("block_size: pointer is not a live allocation");
  return b->size;
}

void CachingAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(mutex_);
  synchronize_and_drain_events_locked();
  release_cached_locked(0);
}

Stats CachingAllocator::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  Stats s = stats_;
  s.max_split_size = options_.max_split_size == SIZE_MAX ? -1 : static_cast<int64_t>(options_.max_split_size);
  s.memory_limit = static_cast<int64_t>(options_.memory_limit);
  return s;
}

void CachingAllocator::reset_peak_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  auto reset = [](Stat* arr, int n) {
    for (int i = 0; i < n; ++i) arr[i].peak = arr[i].current;
  };
  for (Stat* arr : {stats_.allocation, stats_.segment, stats_.active, stats_.inactive_split, stats_.allocated_bytes,
                    stats_.reserved_bytes, stats_.active_bytes, stats_.inactive_split_bytes, stats_.requested_bytes})
    reset(arr, kStatTypes);
  reset(&stats_.oversize_allocations, 1);
  reset(&stats_.oversize_segments, 1);
}

void CachingAllocator::reset_accumulated_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  auto reset = [](Stat* arr, int n) {
    for (int i = 0; i < n; ++i) arr[i].allocated = arr[i].freed = 0;
  };
  for (Stat* arr : {stats_.allocation, stats_.segment, stats_.active, stats_.inactive_split, stats_.allocated_bytes,
                    stats_.reserved_bytes, stats_.active_bytes, stats_.inactive_split_bytes, stats_.requested_bytes})
    reset(arr, kStatTypes);
  reset(&stats_.oversize_allocations, 1);
  reset(&stats_.oversize_segments, 1);
  stats_.num_alloc_retries = stats_.num_ooms = stats_.num_device_alloc = stats_.num_device_free = 0;
  stats_.num_sync_all_streams = stats_.num_oom_callbacks = 0;
}

Snapshot CachingAllocator::snapshot(bool include_trace) const {
  std::lock_guard<std::mutex> lock(mutex_);
  Snapshot snap;
  if (include_trace) snap.trace = trace_.entries();
  for (const auto& kv : segments_) {
    SegmentInfo seg;
    seg.address = kv.first;
    seg.stream = kv.second->stream;
    seg.small = kv.second->small;
    for (const Block* b = kv.second; b != nullptr; b = b->next) {
      BlockInfo bi;
      bi.address = b->ptr;
      bi.size = b->size;
      bi.requested_size = b->allocated ? b->requested : 0;
      bi.allocated = b->allocated;
      bi.active = b->allocated || b->event_count > 0;
      bi.context = b->context;
      seg.total_size += b->size;
      if (b->allocated) {
        seg.allocated_size += b->size;
        seg.requested_size += b->requested;
      }
      if (bi.active) seg.active_size += b->size;
      if (b->in_pool) {
        snap.free_bytes += b->size;
        snap.largest_free = std::max(snap.largest_free, b->size);
      }
      seg.blocks.push_back(std::move(bi));
    }
    snap.segments.push_back(std::move(seg));
  }
  snap.fragmentation =
      snap.free_bytes == 0 ? 0.0 : 1.0 - static_cast<double>(snap.largest_free) / static_cast<double>(snap.free_bytes);
  return snap;
}

void CachingAllocator::set_memory_limit(std::size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  options_.memory_limit = bytes;
  if (bytes != 0 && reserved_locked() > bytes) release_cached_locked(bytes);
}

std::size_t CachingAllocator::memory_limit() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return options_.memory_limit;
}

void CachingAllocator::set_gc_threshold(double fraction) {
  if (!(fraction >= 0.0 && fraction < 1.0))
    throw std::invalid_argument("gc_threshold must be in [0, 1), got " + std::to_string(fraction));
  std::lock_guard<std::mutex> lock(mutex_);
  options_.gc_threshold = fraction;
}

void CachingAllocator::set_options(const Options& options) {
  validate(options);
  std::lock_guard<std::mutex> lock(mutex_);
  if (!segments_.empty())
    throw std::invalid_argument("allocator options can only change while nothing is reserved (call empty_cache() "
                                "after freeing every block)");
  options_ = options;
  size_pools();
}

int CachingAllocator::add_oom_callback(OomCallback cb) {
  if (!cb) throw std::invalid_argument("add_oom_callback: callback must not be empty");
  std::lock_guard<std::mutex> lock(callbacks_mutex_);
  int id = next_callback_id_++;
  callbacks_.emplace_back(id, std::make_shared<OomCallback>(std::move(cb)));
  return id;
}

bool CachingAllocator::remove_oom_callback(int id) {
  std::lock_guard<std::mutex> lock(callbacks_mutex_);
  auto it = std::find_if(callbacks_.begin(), callbacks_.end(), [id](const auto& c) { return c.first == id; });
  if (it == callbacks_.end()) return false;
  callbacks_.erase(it);
  return true;
}

void CachingAllocator::clear_oom_callbacks() {
  std::lock_guard<std::mutex> lock(callbacks_mutex_);
  callbacks_.clear();
}

void CachingAllocator::record_locked(TraceAction action, std::uintptr_t addr, std::size_t size, StreamId stream,
                                     const Context& context, std::size_t device_free) {
  if (tracing_) trace_.push(TraceEntry{action, addr, size, stream, now_us(), device_free, context});
}

void CachingAllocator::record_trace(bool enabled, std::size_t max_entries, bool clear) {
  std::lock_guard<std::mutex> lock(mutex_);
  trace_.set_max_entries(max_entries);
  if (clear) trace_.clear();
  tracing_ = enabled;
}

std::vector<TraceEntry> CachingAllocator::trace() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return trace_.entries();
}

void CachingAllocator::set_context_recorder(ContextRecorder recorder) {
  std::lock_guard<std::mutex> lock(callbacks_mutex_);
  recorder_ = recorder ? std::make_shared<ContextRecorder>(std::move(recorder)) : nullptr;
  recording_.store(recorder_ != nullptr);
}

}  // namespace memwarden::alloc
