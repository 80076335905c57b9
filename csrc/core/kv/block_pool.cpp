#include "core/kv/block_pool.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace memwarden::kv {
namespace {

inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

std::string id_string(int64_t id) { return std::to_string(id); }

}  // namespace

BlockHash hash_block(BlockHash parent, const int32_t* tokens, size_t num_tokens, uint64_t extra_key) {
  uint64_t h = mix64(parent ^ 0x9e3779b97f4a7c15ULL);
  for (size_t i = 0; i < num_tokens; ++i) h = mix64(h ^ (static_cast<uint64_t>(static_cast<uint32_t>(tokens[i])) +
                                                        0x9e3779b97f4a7c15ULL * (i + 1)));
  h = mix64(h ^ mix64(extra_key + num_tokens));
  return h;
}

// ---- BlockPool -------------------------------------------------------------------------

BlockPool::BlockPool(int32_t num_blocks, bool enable_caching) : enable_caching_(enable_caching) {
  if (num_blocks < 0 || num_blocks == std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("num_blocks must be in [0, 2^31 - 1), got " + id_string(num_blocks));
  if (enable_caching) cache_.reserve(static_cast<size_t>(num_blocks));  // at most one hash per block: never grows
  nodes_.resize(static_cast<size_t>(num_blocks) + 1);
  const int32_t s = sentinel();
  nodes_[s].prev = nodes_[s].next = s;
  for (int32_t i = 0; i < num_blocks; ++i) insert_after(nodes_[s].prev, i);
  num_free_ = num_blocks;
}

void BlockPool::check_id(BlockId block) const {
  if (block < 0 || block >= num_blocks())
    throw std::out_of_range("block id " + id_string(block) + " is out of range for " + id_string(num_blocks()) +
                            " blocks");
}

void BlockPool::unlink(int32_t i) {
  Node& n = nodes_[i];
  nodes_[n.prev].next = n.next;
  nodes_[n.next].prev = n.prev;
  n.prev = n.next = -1;
  --num_free_;
}

void BlockPool::insert_after(int32_t where, int32_t i) {
  Node& n = nodes_[i];
  n.prev = where;
  n.next = nodes_[where].next;
  nodes_[n.next].prev = i;
  nodes_[where].next = i;
  ++num_free_;
}

void BlockPool::evict_hash(int32_t i) {
  Node& n = nodes_[i];
  if (!n.hashed) return;
  cache_.erase(n.hash);
  n.hashed = false;
  n.hash = 0;
  ++evictions_;
}

std::optional<std::vector<BlockId>> BlockPool::allocate(int32_t n) {
  if (n < 0) throw std::invalid_argument("cannot allocate a negative number of blocks (" + id_string(n) + ")");
  if (n > num_free_) return std::nullopt;
  std::vector<BlockId> out;
  out.reserve(n);
  const int32_t s = sentinel();
  for (int32_t k = 0; k < n; ++k) {
    const int32_t i = nodes_[s].next;
    unlink(i);
    evict_hash(i);
    nodes_[i].ref = 1;
    out.push_back(i);
  }
  return out;
}

void BlockPool::touch(BlockId block) {
  check_id(block);
  Node& n = nodes_[block];
  if (n.ref == 0) unlink(block);
  ++n.ref;
}

void BlockPool::release(const std::vector<BlockId>& blocks) {
  // Validate first (a block listed twice must have enough references).
  std::unordered_map<BlockId, int32_t> drops;
  for (BlockId b : blocks) {
    check_id(b);
    if (++drops[b] > nodes_[b].ref)
      throw std::invalid_argument("block " + id_string(b) + " is released more often than it is referenced (ref " +
                                  id_string(nodes_[b].ref) + ")");
  }
  const int32_t s = sentinel();
  for (BlockId b : blocks) {
    Node& n = nodes_[b];
    if (--n.ref > 0) continue;
    if (n.hashed)
      insert_after(nodes_[s].prev, b);  // back: evicted in the order freed
    else
      insert_after(s, b);  // front: reused first
  }
}

bool BlockPool::cache(BlockId block, BlockHash hash) {
  check_id(block);
  Node& n = nodes_[block];
  if (n.ref == 0) throw std::invalid_argument("block " + id_string(block) + " is free and cannot be cached");
  if (!enable_caching_ || n.hashed || !cache_.insert(hash, block)) return false;
  n.hashed = true;
  n.hash = hash;
  return true;
}

std::optional<BlockId> BlockPool::lookup(BlockHash hash) const {
  const BlockId block = cache_.find(hash);
  if (block < 0) return std::nullopt;
  return block;
}

std::optional<BlockHash> BlockPool::hash_of(BlockId block) const {
  check_id(block);
  if (!nodes_[block].hashed) return std::nullopt;
  return nodes_[block].hash;
}

int32_t BlockPool::ref_count(BlockId block) const {
  check_id(block);
  return nodes_[block].ref;
}

std::vector<BlockId> BlockPool::free_queue() const {
  std::vector<BlockId> out;
  out.reserve(num_free_);
  const int32_t s = sentinel();
  for (int32_t i = nodes_[s].next; i != s; i = nodes_[i].next) out.push_back(i);
  return out;
}

// ---- KVCacheManager ----------------------------------------------------------------------

KVCacheManager::KVCacheManager(int32_t num_blocks, int32_t block_size, int32_t num_host_blocks,
                               bool enable_prefix_caching)
    : block_size_(block_size), device_(num_blocks, enable_prefix_caching), host_(num_host_blocks, false) {
  if (block_size <= 0) throw std::invalid_argument("block_size must be positive, got " + id_string(block_size));
}

KVCacheManager::Sequence& KVCacheManager::get(int64_t seq_id) {
  const auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::out_of_range("unknown sequence " + id_string(seq_id));
  return it->second;
}

const KVCacheManager::Sequence& KVCacheManager::get(int64_t seq_id) const {
  const auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) throw std::out_of_range("unknown sequence " + id_string(seq_id));
  return it->second;
}

std::vector<BlockHash> KVCacheManager::full_block_hashes(const std::vector<int32_t>& tokens,
                                                         uint64_t extra_key) const {
  std::vector<BlockHash> out;
  BlockHash parent = kRootHash;
  for (size_t start = 0; start + block_size_ <= tokens.size(); start += block_size_) {
    parent = hash_block(parent, tokens.data() + start, block_size_, extra_key);
    out.push_back(parent);
  }
  return out;
}

void KVCacheManager::cache_full_blocks(Sequence& seq, size_t from) {
  const size_t full = seq.tokens.size() / block_size_;
  for (size_t i = from; i < full; ++i) {
    const BlockHash parent = i == 0 ? kRootHash : seq.hashes[i - 1];
    if (seq.hashes.size() <= i)
      seq.hashes.push_back(hash_block(parent, seq.tokens.data() + i * block_size_, block_size_, seq.extra_key));
    device_.cache(seq.blocks[i], seq.hashes[i]);
  }
}

void KVCacheManager::release_tail_first(BlockPool& pool, const std::vector<BlockId>& blocks) {
  pool.release(std::vector<BlockId>(blocks.rbegin(), blocks.rend()));
}

std::optional<int64_t> KVCacheManager::add_sequence(int64_t seq_id, const std::vector<int32_t>& tokens,
                                                    uint64_t extra_key) {
  if (seqs_.count(seq_id)) throw std::invalid_argument("sequence " + id_string(seq_id) + " already exists");
  std::vector<BlockHash> hashes = full_block_hashes(tokens, extra_key);
  std::vector<BlockId> hits;
  int32_t free_hits = 0;
  if (device_.caching_enabled()) {
    for (BlockHash h : hashes) {
      const auto block = device_.lookup(h);
      if (!block) break;
      hits.push_back(*block);
      if (device_.ref_count(*block) == 0) ++free_hits;
    }
  }
  const int64_t needed = (static_cast<int64_t>(tokens.size()) + block_size_ - 1) / block_size_ -
                         static_cast<int64_t>(hits.size());
  if (needed > device_.num_free() - free_hits) return std::nullopt;
  for (BlockId b : hits) device_.touch(b);
  auto fresh = device_.allocate(static_cast<int32_t>(needed));
  Sequence seq;
  seq.blocks = hits;
  seq.blocks.insert(seq.blocks.end(), fresh->begin(), fresh->end());
  seq.tokens = tokens;
  seq.extra_key = extra_key;
  seq.hashes = std::move(hashes);
  cache_full_blocks(seq, hits.size());
  const int64_t hit_tokens = static_cast<int64_t>(hits.size()) * block_size_;
  query_tokens_ += static_cast<int64_t>(tokens.size());
  hit_tokens_ += hit_tokens;
  seqs_.emplace(seq_id, std::move(seq));
  return hit_tokens;
}

std::optional<std::vector<BlockPair>> KVCacheManager::append(int64_t seq_id, const std::vector<int32_t>& tokens) {
  Sequence& seq = get(seq_id);
  if (seq.swapped) throw std::invalid_argument("sequence " + id_string(seq_id) + " is swapped out");
  std::vector<BlockPair> copies;
  if (tokens.empty()) return copies;
  const int64_t len = static_cast<int64_t>(seq.tokens.size());
  const int64_t new_len = len + static_cast<int64_t>(tokens.size());
  const int64_t have = static_cast<int64_t>(seq.blocks.size());
  const int64_t want = (new_len + block_size_ - 1) / block_size_;
  const bool cow = len % block_size_ != 0 && device_.ref_count(seq.blocks.back()) > 1;
  const int64_t needed = want - have + (cow ? 1 : 0);
  if (needed > device_.num_free()) return std::nullopt;
  if (cow) {
    const BlockId old = seq.blocks.back();
    const BlockId copy = device_.allocate(1)->front();
    device_.release({old});
    seq.blocks.back() = copy;
    copies.emplace_back(old, copy);
    ++cow_copies_;
  }
  if (want > have) {
    auto fresh = device_.allocate(static_cast<int32_t>(want - have));
    seq.blocks.insert(seq.blocks.end(), fresh->begin(), fresh->end());
  }
  const size_t full_before = static_cast<size_t>(len / block_size_);
  seq.tokens.insert(seq.tokens.end(), tokens.begin(), tokens.end());
  cache_full_blocks(seq, full_before);
  return copies;
}

void KVCacheManager::fork(int64_t parent, int64_t child) {
  if (seqs_.count(child)) throw std::invalid_argument("sequence " + id_string(child) + " already exists");
  const Sequence& p = get(parent);
  if (p.swapped) throw std::invalid_argument("sequence " + id_string(parent) + " is swapped out");
  for (BlockId b : p.blocks) device_.touch(b);
  Sequence copy = p;
  seqs_.emplace(child, std::move(copy));
}

void KVCacheManager::free_sequence(int64_t seq_id) {
  Sequence& seq = get(seq_id);
  release_tail_first(seq.swapped ? host_ : device_, seq.blocks);
  seqs_.erase(seq_id);
}

std::optional<std::vector<BlockPair>> KVCacheManager::swap_out(int64_t seq_id) {
  Sequence& seq = get(seq_id);
  if (seq.swapped) throw std::invalid_argument("sequence " + id_string(seq_id) + " is already swapped out");
  if (host_.num_blocks() == 0) throw std::invalid_argument("swapping needs host blocks (num_host_blocks = 0)");
  auto host_blocks = host_.allocate(static_cast<int32_t>(seq.blocks.size()));
  if (!host_blocks) return std::nullopt;
  std::vector<BlockPair> pairs;
  for (size_t i = 0; i < seq.blocks.size(); ++i) pairs.emplace_back(seq.blocks[i], (*host_blocks)[i]);
  release_tail_first(device_, seq.blocks);
  seq.blocks = std::move(*host_blocks);
  seq.swapped = true;
  ++swapped_out_;
  return pairs;
}

std::optional<std::vector<BlockPair>> KVCacheManager::swap_in(int64_t seq_id) {
  Sequence& seq = get(seq_id);
  if (!seq.swapped) throw std::invalid_argument("sequence " + id_string(seq_id) + " is not swapped out");
  auto device_blocks = device_.allocate(static_cast<int32_t>(seq.blocks.size()));
  if (!device_blocks) return std::nullopt;
  std::vector<BlockPair> pairs;
  for (size_t i = 0; i < seq.blocks.size(); ++i) pairs.emplace_back(seq.blocks[i], (*device_blocks)[i]);
  release_tail_first(host_, seq.blocks);
  seq.blocks = std::move(*device_blocks);
  seq.swapped = false;
  cache_full_blocks(seq, 0);
  ++swapped_in_;
  return pairs;
}

int64_t KVCacheManager::lookup(const std::vector<int32_t>& tokens, uint64_t extra_key) const {
  if (!device_.caching_enabled()) return 0;
  int64_t hits = 0;
  for (BlockHash h : full_block_hashes(tokens, extra_key)) {
    if (!device_.lookup(h)) break;
    ++hits;
  }
  return hits * block_size_;
}

bool KVCacheManager::is_swapped(int64_t seq_id) const { return get(seq_id).swapped; }

const std::vector<BlockId>& KVCacheManager::block_table(int64_t seq_id) const { return get(seq_id).blocks; }

int64_t KVCacheManager::num_tokens(int64_t seq_id) const {
  return static_cast<int64_t>(get(seq_id).tokens.size());
}

std::vector<int64_t> KVCacheManager::sequence_ids() const {
  std::vector<int64_t> ids;
  for (const auto& [id, seq] : seqs_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

std::vector<int64_t> KVCacheManager::slot_mapping(int64_t seq_id, int64_t start, int64_t end) const {
  const Sequence& seq = get(seq_id);
  if (seq.swapped) throw std::invalid_argument("sequence " + id_string(seq_id) + " is swapped out");
  const int64_t len = static_cast<int64_t>(seq.tokens.size());
  if (start < 0 || end < start || end > len)
    throw std::out_of_range("token range [" + id_string(start) + ", " + id_string(end) +
                            ") is out of range for a sequence of " + id_string(len) + " tokens");
  std::vector<int64_t> slots;
  slots.reserve(end - start);
  for (int64_t t = start; t < end; ++t)
    slots.push_back(static_cast<int64_t>(seq.blocks[t / block_size_]) * block_size_ + t % block_size_);
  return slots;
}

KVCacheStats KVCacheManager::stats() const {
  KVCacheStats s;
  s.num_blocks = device_.num_blocks();
  s.num_free_blocks = device_.num_free();
  s.num_cached_blocks = device_.num_cached();
  s.num_host_blocks = host_.num_blocks();
  s.num_free_host_blocks = host_.num_free();
  s.usage = s.num_blocks ? 1.0 - static_cast<double>(s.num_free_blocks) / s.num_blocks : 0.0;
  s.prefix_query_tokens = query_tokens_;
  s.prefix_hit_tokens = hit_tokens_;
  s.prefix_hit_rate = query_tokens_ ? static_cast<double>(hit_tokens_) / query_tokens_ : 0.0;
  s.num_evictions = device_.num_evictions();
  s.num_cow_copies = cow_copies_;
  s.num_swapped_out = swapped_out_;
  s.num_swapped_in = swapped_in_;
  return s;
}

}  // namespace memwarden::kv
