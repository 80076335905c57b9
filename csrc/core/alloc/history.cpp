#include "core/alloc/history.h"

#include <algorithm>
#include <iterator>
#include <stdexcept>

namespace memwarden::alloc {

const char* action_name(TraceAction action) {
  switch (action) {
    case TraceAction::kAlloc: return "alloc";
    case TraceAction::kFreeRequested: return "free_requested";
    case TraceAction::kFreeCompleted: return "free_completed";
    case TraceAction::kSegmentAlloc: return "segment_alloc";
    case TraceAction::kSegmentFree: return "segment_free";
    case TraceAction::kOom: return "oom";
  }
  return "unknown";
}

namespace {

void check_max_entries(std::size_t max_entries) {
  if (max_entries == 0) throw std::invalid_argument("max_entries must be >= 1, got 0");
}

}  // namespace

TraceRing::TraceRing(std::size_t max_entries) : max_entries_(max_entries) { check_max_entries(max_entries); }

void TraceRing::push(TraceEntry entry) {
  if (entries_.size() < max_entries_) {
    entries_.push_back(std::move(entry));
    return;
  }
  entries_[oldest_] = std::move(entry);
  if (++oldest_ == max_entries_) oldest_ = 0;
}

std::vector<TraceEntry> TraceRing::entries() const {
  std::vector<TraceEntry> ordered;
  ordered.reserve(entries_.size());
  const auto oldest = entries_.begin() + static_cast<std::ptrdiff_t>(oldest_);
  std::rotate_copy(entries_.begin(), oldest, entries_.end(), std::back_inserter(ordered));
  return ordered;
}

void TraceRing::set_max_entries(std::size_t max_entries) {
  check_max_entries(max_entries);
  std::vector<TraceEntry> ordered = entries();
  if (ordered.size() > max_entries)
    ordered.erase(ordered.begin(), ordered.end() - static_cast<std::ptrdiff_t>(max_entries));
  entries_ = std::move(ordered);
  oldest_ = 0;
  max_entries_ = max_entries;
}

void TraceRing::clear() {
  entries_.clear();
  oldest_ = 0;
}

}  // namespace memwarden::alloc
