// BlockHashIndex: the prefix cache's map from a full block's hash to its block id.
//
// Why not std::unordered_map: every lookup there chases a bucket pointer and then a
// node, and those cache misses grow with the pool. This is one flat array of
// (hash, id) slots sized once for the most entries it will ever hold (a pool caches at
// most one hash per block), so a lookup usually touches a single cache line.
//
// Open addressing with linear probing; capacity is a power of two >= 2 * max_entries
// (load <= 1/2), and the table never rehashes. Keys are mixed multiplicatively before
// taking the slot, since block hashes may be small sequential integers (in tests).
// Empty slots hold block id -1. Erase shifts the rest of the probe chain back instead
// of leaving tombstones, so probe lengths stay short under insert/erase churn.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace memwarden::kv {

class BlockHashIndex {
 public:
  using Key = uint64_t;
  using Value = int32_t;  // a block id, >= 0

  // An empty index that holds nothing and allocates nothing (caching disabled).
  BlockHashIndex() = default;

  explicit BlockHashIndex(int32_t max_entries) : max_entries_(max_entries) {
    if (max_entries < 0)
      throw std::invalid_argument("max_entries must be non-negative, got " + std::to_string(max_entries));
    if (max_entries == 0) return;
    size_t capacity = 2;
    int log2_capacity = 1;
    while (capacity < 2 * static_cast<size_t>(max_entries)) {
      capacity *= 2;
      ++log2_capacity;
    }
    slots_.resize(capacity);
    mask_ = capacity - 1;
    shift_ = 64 - log2_capacity;
  }

  int32_t size() const { return size_; }
  size_t capacity() const { return slots_.size(); }

  // Adds key -> value. Returns false (and changes nothing) when key is already present.
  // Throws std::length_error when a new key would exceed max_entries.
  bool insert(Key key, Value value) {
    if (value < 0) throw std::invalid_argument("value must be a block id >= 0, got " + std::to_string(value));
    if (size_ == max_entries_) {  // full, or allocated nothing: only a key already present is fine
      if (find(key)) return false;
      throw std::length_error("hash index is full (" + std::to_string(max_entries_) + " entries)");
    }
    Slot& slot = slots_[probe(key)];
    if (slot.value != kEmpty) return false;
    slot = {key, value};
    ++size_;
    return true;
  }

  std::optional<Value> find(Key key) const {
    if (slots_.empty()) return std::nullopt;
    const Slot& slot = slots_[probe(key)];
    if (slot.value == kEmpty) return std::nullopt;
    return slot.value;
  }

  // Removes key. Returns false when it was not present.
  bool erase(Key key) {
    if (slots_.empty()) return false;
    size_t hole = probe(key);
    if (slots_[hole].value == kEmpty) return false;
    // Backward shift: walk the rest of the chain and move back every entry whose probe
    // passes the hole (its home slot is not in (hole, next]), so a find never stops early.
    for (size_t next = (hole + 1) & mask_; slots_[next].value != kEmpty; next = (next + 1) & mask_) {
      const size_t home = home_slot(slots_[next].key);
      if (((next - home) & mask_) >= ((next - hole) & mask_)) {
        slots_[hole] = slots_[next];
        hole = next;
      }
    }
    slots_[hole].value = kEmpty;
    --size_;
    return true;
  }

  // The slot where the probe for key starts (public so tests can build colliding keys).
  size_t home_slot(Key key) const {
    const uint64_t folded = key ^ (key >> 32);  // keys differing only in high bits still spread
    return static_cast<size_t>((folded * 0x9e3779b97f4a7c15ULL) >> shift_);
  }

 private:
  static constexpr Value kEmpty = -1;
  struct Slot {
    Key key = 0;
    Value value = kEmpty;
  };

  // The slot holding key, or else the empty slot where its probe chain ends.
  size_t probe(Key key) const {
    size_t i = home_slot(key);
    while (slots_[i].value != kEmpty && slots_[i].key != key) i = (i + 1) & mask_;
    return i;
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  int shift_ = 0;
  int32_t size_ = 0;
  int32_t max_entries_ = 0;
};

}  // namespace memwarden::kv
