// Free blocks of one size range, one intrusive list per exact size, with a two-level bitmap of
// the non-empty lists: finding the smallest size >= a request costs a few bit scans instead of
// a red-black-tree descent, and inserting or erasing a block touches no allocator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace memwarden::alloc {

// Node needs `std::uintptr_t ptr`, `std::size_t size` (a positive multiple of the granule, at
// most max_size()) and `Node* free_prev, *free_next` for this structure's own use.
template <class Node>
class SizeClassLists {
 public:
  // granule: a power of 2; class i holds the blocks of size (i + 1) * granule.
  SizeClassLists(std::size_t granule, std::size_t num_classes)
      : granule_shift_(static_cast<unsigned>(__builtin_ctzll(granule))),
        heads_(num_classes, nullptr),
        words_((num_classes + 63) / 64, 0),
        summary_((words_.size() + 63) / 64, 0) {}

  std::size_t max_size() const { return heads_.size() << granule_shift_; }

  // Each list stays in address order, so that equal sizes go lowest address first. That costs
  // a walk over the blocks of n's size at a lower address, which are few in practice: free
  // neighbours coalesce, and a request takes from the front.
  void insert(Node* n) {
    const std::size_t c = class_of(n->size);
    Node* head = heads_[c];
    if (head == nullptr || n->ptr < head->ptr) {
      n->free_prev = nullptr;
      n->free_next = head;
      if (head != nullptr) head->free_prev = n;
      else mark(c);
      heads_[c] = n;
      return;
    }
    Node* before = head;
    while (before->free_next != nullptr && before->free_next->ptr < n->ptr) before = before->free_next;
    n->free_prev = before;
    n->free_next = before->free_next;
    if (n->free_next != nullptr) n->free_next->free_prev = n;
    before->free_next = n;
  }

  void erase(Node* n) {
    if (n->free_next != nullptr) n->free_next->free_prev = n->free_prev;
    if (n->free_prev != nullptr) {
      n->free_prev->free_next = n->free_next;
    } else {
      const std::size_t c = class_of(n->size);
      heads_[c] = n->free_next;
      if (n->free_next == nullptr) unmark(c);
    }
  }

  // The lowest-addressed block of the smallest size >= size; null when there is none.
  Node* smallest_at_least(std::size_t size) const {
    if (size > max_size()) return nullptr;
    std::size_t word = class_of(size) >> 6;
    std::uint64_t bits = words_[word] & (~std::uint64_t{0} << (class_of(size) & 63));
    if (bits == 0) {
      const std::size_t next_word = word + 1;
      if (next_word >= words_.size()) return nullptr;
      std::size_t s = next_word >> 6;
      std::uint64_t summary_bits = summary_[s] & (~std::uint64_t{0} << (next_word & 63));
      while (summary_bits == 0) {
        if (++s >= summary_.size()) return nullptr;
        summary_bits = summary_[s];
      }
      word = (s << 6) | static_cast<std::size_t>(__builtin_ctzll(summary_bits));
      bits = words_[word];
    }
    return heads_[(word << 6) | static_cast<std::size_t>(__builtin_ctzll(bits))];
  }

 private:
  std::size_t class_of(std::size_t size) const { return (size >> granule_shift_) - 1; }
  void mark(std::size_t c) {
    words_[c >> 6] |= std::uint64_t{1} << (c & 63);
    summary_[c >> 12] |= std::uint64_t{1} << ((c >> 6) & 63);
  }
  void unmark(std::size_t c) {
    std::uint64_t& word = words_[c >> 6];
    word &= ~(std::uint64_t{1} << (c & 63));
    if (word == 0) summary_[c >> 12] &= ~(std::uint64_t{1} << ((c >> 6) & 63));
  }

  unsigned granule_shift_;
  std::vector<Node*> heads_;
  std::vector<std::uint64_t> words_;    // bit c: list c is non-empty
  std::vector<std::uint64_t> summary_;  // bit w: words_[w] is non-zero
};

}  // namespace memwarden::alloc
