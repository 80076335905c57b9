// Allocation history (torch-free): the stacks attached to blocks, and a bounded ring of the
// allocator's actions, kept the way torch.cuda.memory._record_memory_history keeps them
// (torch's TraceEntry actions and fields), so a memwarden snapshot renders in torch's viewer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/alloc/backend.h"

namespace memwarden::alloc {

struct Frame {
  std::string filename, name;
  int line = 0;
};
using Context = std::shared_ptr<const std::vector<Frame>>;
// Called (without the allocator's lock) on each allocation while set; may return null.
using ContextRecorder = std::function<Context()>;

enum class TraceAction { kAlloc, kFreeRequested, kFreeCompleted, kSegmentAlloc, kSegmentFree, kOom };

// torch's name of an action: "alloc", "free_requested", "free_completed", "segment_alloc",
// "segment_free", "oom".
const char* action_name(TraceAction action);

struct TraceEntry {
  TraceAction action = TraceAction::kAlloc;
  std::uintptr_t addr = 0;      // the block (alloc, free_*) or the segment (segment_*); 0 for oom
  std::size_t size = 0;         // requested bytes (alloc, free_*, oom) or segment bytes (segment_*)
  StreamId stream = 0;
  int64_t time_us = 0;          // microseconds since the epoch
  std::size_t device_free = 0;  // oom only: what the backend (or the limit) had left, SIZE_MAX if unknown
  Context context;              // the allocating stack, when one was recorded
};

// The newest max_entries entries: the ring grows until it is full, then each entry overwrites
// the oldest (torch's alloc_trace). Not synchronised: its owner holds a lock around it.
class TraceRing {
 public:
  static constexpr std::size_t kUnbounded = SIZE_MAX;  // torch's default (sys.maxsize)

  explicit TraceRing(std::size_t max_entries = kUnbounded);
  void push(TraceEntry entry);
  std::vector<TraceEntry> entries() const;  // oldest first
  std::size_t size() const { return entries_.size(); }
  std::size_t max_entries() const { return max_entries_; }
  // Throws std::invalid_argument for 0; a smaller ring keeps the newest entries.
  void set_max_entries(std::size_t max_entries);
  void clear();

 private:
  std::vector<TraceEntry> entries_;
  std::size_t oldest_ = 0;  // where the oldest entry is once the ring is full (the next to overwrite)
  std::size_t max_entries_;
};

}  // namespace memwarden::alloc
