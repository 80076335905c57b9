// Paged KV cache block management (torch-free).
//
// BlockPool owns a fixed set of block ids [0, num_blocks), all created once. Blocks
// with ref count 0 sit in an intrusive doubly-linked free queue (prev/next indices in
// the block array), so allocate, free and removal from the middle (a prefix-cache hit
// on a free block) are O(1). Allocation is all-or-nothing.
//
// Prefix caching: a full block may carry a hash (chained from its parent block's hash,
// its token ids and an optional extra key). A freed hashed block keeps its hash and
// stays findable until its memory is reused; freed hashed blocks queue at the back
// (least recently freed evicted first), freed unhashed blocks at the front (reused
// first). Allocation takes blocks from the front and drops the hash of a reused block.
// The hash -> block map is a FlatIndex (core/common/flat_index.h) sized once for num_blocks.
//
// KVCacheManager tracks sequences on top of a device pool (and optionally a host pool
// for swapping): block tables, copy-on-write after fork, swap mappings, statistics.
#pragma once

#include <cstdint>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/common/flat_index.h"

namespace memwarden::kv {

using BlockId = int32_t;
using BlockHash = uint64_t;
using BlockPair = std::pair<BlockId, BlockId>;  // (source, destination)

// The hash of a full block: chained from the parent's hash (kRootHash for the first
// block), over the block's token ids and an extra key (e.g. a LoRA or image id).
constexpr BlockHash kRootHash = 0x6a09e667f3bcc908ULL;
BlockHash hash_block(BlockHash parent, const int32_t* tokens, size_t num_tokens, uint64_t extra_key);

class BlockPool {
 public:
  // Throws std::invalid_argument when num_blocks is negative or too large.
  explicit BlockPool(int32_t num_blocks, bool enable_caching = true);

  int32_t num_blocks() const { return static_cast<int32_t>(nodes_.size()) - 1; }
  // Blocks with ref count 0 (free, possibly still holding a cached hash).
  int32_t num_free() const { return num_free_; }
  int32_t num_cached() const { return static_cast<int32_t>(cache_.size()); }
  bool caching_enabled() const { return enable_caching_; }

  // n blocks with ref count 1, or nothing (and no change) when fewer than n are free.
  std::optional<std::vector<BlockId>> allocate(int32_t n);
  // Adds a reference (a block with ref count 0 leaves the free queue). Throws
  // std::out_of_range for a bad id.
  void touch(BlockId block);
  // Drops one reference from each block, in the given order; a block reaching 0 joins
  // the free queue (at the back when hashed, at the front otherwise). Throws
  // std::out_of_range for a bad id and std::invalid_argument for a free block; all ids
  // are checked before anything changes.
  void release(const std::vector<BlockId>& blocks);

  // Registers the hash of a full, referenced block. Returns false (and changes nothing)
  // when caching is off, the block already has a hash, or another block holds this one.
  bool cache(BlockId block, BlockHash hash);
  std::optional<BlockId> lookup(BlockHash hash) const;
  std::optional<BlockHash> hash_of(BlockId block) const;
  int32_t ref_count(BlockId block) const;
  // The free queue, front (next to be allocated) to back.
  std::vector<BlockId> free_queue() const;

  int64_t num_evictions() const { return evictions_; }

 private:
  struct Node {
    int32_t prev = -1, next = -1;
    int32_t ref = 0;
    bool hashed = false;
    BlockHash hash = 0;
  };
  int32_t sentinel() const { return static_cast<int32_t>(nodes_.size()) - 1; }
  void check_id(BlockId block) const;
  void unlink(int32_t i);
  void insert_after(int32_t where, int32_t i);
  void evict_hash(int32_t i);

  std::vector<Node> nodes_;  // nodes_[num_blocks] is the sentinel of the circular queue
  core::FlatIndex<BlockId, -1> cache_;  // allocates nothing when caching is disabled
  int32_t num_free_ = 0;
  bool enable_caching_;
  int64_t evictions_ = 0;
};

struct KVCacheStats {
  int32_t num_blocks = 0, num_free_blocks = 0, num_cached_blocks = 0;
  int32_t num_host_blocks = 0, num_free_host_blocks = 0;
  double usage = 0.0;  // 1 - free / total (device)
  int64_t prefix_query_tokens = 0, prefix_hit_tokens = 0;
  double prefix_hit_rate = 0.0;
  int64_t num_evictions = 0, num_cow_copies = 0, num_swapped_out = 0, num_swapped_in = 0;
};

class KVCacheManager {
 public:
  // num_host_blocks > 0 enables swapping.
  KVCacheManager(int32_t num_blocks, int32_t block_size, int32_t num_host_blocks = 0,
                 bool enable_prefix_caching = true);

  int32_t block_size() const { return block_size_; }
  const BlockPool& device_pool() const { return device_; }
  const BlockPool& host_pool() const { return host_; }

  // Starts sequence seq_id with its prompt, reusing the longest cached prefix of full
  // blocks. Returns the number of prompt tokens found cached, or nothing (and no change)
  // when there are not enough free blocks. Throws std::invalid_argument when seq_id
  // exists.
  std::optional<int64_t> add_sequence(int64_t seq_id, const std::vector<int32_t>& tokens, uint64_t extra_key = 0);
  // Appends tokens. Returns the copy-on-write pairs (src, dst) to apply with copy_blocks
  // before writing (when the last, partly filled block is shared), or nothing (and no
  // change) when there are not enough free blocks.
  std::optional<std::vector<BlockPair>> append(int64_t seq_id, const std::vector<int32_t>& tokens);
  // child shares every block of parent (ref counts + 1).
  void fork(int64_t parent, int64_t child);
  // Releases the sequence's blocks, tail first (so its tail is evicted before its head).
  void free_sequence(int64_t seq_id);

  // Moves a sequence to host blocks: returns the (device, host) pairs for swap_blocks,
  // or nothing (no change) when the host pool lacks blocks.
  std::optional<std::vector<BlockPair>> swap_out(int64_t seq_id);
  // Moves it back: (host, device) pairs, or nothing when the device pool lacks blocks.
  std::optional<std::vector<BlockPair>> swap_in(int64_t seq_id);

  // Number of leading tokens of `tokens` held by cached full blocks (no state change).
  int64_t lookup(const std::vector<int32_t>& tokens, uint64_t extra_key = 0) const;

  bool has_sequence(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  bool is_swapped(int64_t seq_id) const;
  const std::vector<BlockId>& block_table(int64_t seq_id) const;
  int64_t num_tokens(int64_t seq_id) const;
  std::vector<int64_t> sequence_ids() const;
  // Slots (block * block_size + offset) of tokens [start, end) of a resident sequence.
  std::vector<int64_t> slot_mapping(int64_t seq_id, int64_t start, int64_t end) const;
  KVCacheStats stats() const;

 private:
  struct Sequence {
    std::vector<BlockId> blocks;
    std::vector<int32_t> tokens;
    std::vector<BlockHash> hashes;  // one per full block
    uint64_t extra_key = 0;
    bool swapped = false;
  };
  Sequence& get(int64_t seq_id);
  const Sequence& get(int64_t seq_id) const;
  std::vector<BlockHash> full_block_hashes(const std::vector<int32_t>& tokens, uint64_t extra_key) const;
  // Hashes (and caches) the full blocks of seq from index `from` on.
  void cache_full_blocks(Sequence& seq, size_t from);
  static void release_tail_first(BlockPool& pool, const std::vector<BlockId>& blocks);

  int32_t block_size_;
  BlockPool device_;
  BlockPool host_;
  std::unordered_map<int64_t, Sequence> seqs_;
  int64_t query_tokens_ = 0, hit_tokens_ = 0, cow_copies_ = 0, swapped_out_ = 0, swapped_in_ = 0;
};

}  // namespace memwarden::kv
