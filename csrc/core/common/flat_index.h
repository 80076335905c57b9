// FlatIndex: a map from a 64-bit key to a small value, for hot paths: the allocator's
// live blocks by address and the KV prefix cache's blocks by hash.
//
// Why not std::unordered_map: it allocates a node per insert, and every lookup chases a
// bucket pointer and then a node, cache misses that grow with the table. Here the
// (key, value) slots are one flat array: linear probing at load <= 1/2 (the array doubles
// when needed; reserve() sizes it up front so a table with a known bound never
// reallocates), keys folded and multiplied before taking the slot (addresses have zero
// low bits, block hashes in tests are small integers), and backward-shift deletion
// instead of tombstones, so probe chains stay short under insert/erase churn. kEmpty
// marks a free slot and can never be stored.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace memwarden::core {

template <typename Value, Value kEmpty>
class FlatIndex {
 public:
  using Key = std::uint64_t;

  FlatIndex() = default;  // allocates nothing until the first insert
  explicit FlatIndex(std::size_t expected_entries) { reserve(expected_entries); }

  // Room for `entries` without reallocating.
  void reserve(std::size_t entries) {
    std::size_t capacity = 2;
    while (capacity < 2 * entries) capacity *= 2;
    if (entries > 0 && capacity > slots_.size()) rehash(capacity);
  }

  std::size_t size() const { return size_; }
  std::size_t capacity() const { return slots_.size(); }

  // Adds key -> value. Returns false (and changes nothing) when key is already present.
  bool insert(Key key, Value value) {
    if (value == kEmpty) throw std::invalid_argument("FlatIndex: the empty marker cannot be stored as a value");
    if (2 * (size_ + 1) > slots_.size()) rehash(slots_.empty() ? 64 : 2 * slots_.size());
    Slot& slot = slots_[probe(key)];
    if (slot.value != kEmpty) return false;
    slot = {key, value};
    ++size_;
    return true;
  }

  // The value of key, or kEmpty when absent.
  Value find(Key key) const {
    if (slots_.empty()) return kEmpty;
    return slots_[probe(key)].value;
  }

  // Removes key and returns its value, or kEmpty when absent.
  Value take(Key key) {
    if (slots_.empty()) return kEmpty;
    std::size_t hole = probe(key);
    const Value taken = slots_[hole].value;
    if (taken == kEmpty) return kEmpty;
    // Backward shift: move back every later entry of the chain whose probe passes the
    // hole (its home slot is not in (hole, next]), so a find never stops early.
    for (std::size_t next = (hole + 1) & mask_; slots_[next].value != kEmpty; next = (next + 1) & mask_) {
      const std::size_t home = home_slot(slots_[next].key);
      if (((next - home) & mask_) >= ((next - hole) & mask_)) {
        slots_[hole] = slots_[next];
        hole = next;
      }
    }
    slots_[hole].value = kEmpty;
    --size_;
    return taken;
  }

  // Removes key. Returns false when it was not present.
  bool erase(Key key) { return take(key) != kEmpty; }

  // The slot where the probe for key starts (public so tests can build colliding keys).
  std::size_t home_slot(Key key) const {
    const std::uint64_t folded = key ^ (key >> 32);  // keys differing only in high bits still spread
    return static_cast<std::size_t>((folded * 0x9e3779b97f4a7c15ULL) >> shift_);
  }

 private:
  struct Slot {
    Key key = 0;
    Value value = kEmpty;
  };

  // The slot holding key, or else the empty slot where its probe chain ends.
  std::size_t probe(Key key) const {
    std::size_t i = home_slot(key);
    while (slots_[i].value != kEmpty && slots_[i].key != key) i = (i + 1) & mask_;
    return i;
  }

  void rehash(std::size_t capacity) {  // capacity: a power of two
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    shift_ = 64 - __builtin_ctzll(capacity);
    size_ = 0;
    for (const Slot& s : old)
      if (s.value != kEmpty) slots_[probe(s.key)] = s, ++size_;
  }

  std::vector<Slot> slots_;
  std::size_t mask_ = 0;
  int shift_ = 0;
  std::size_t size_ = 0;
};

}  // namespace memwarden::core
