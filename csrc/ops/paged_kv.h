// Paged KV cache op family (vLLM call shapes, plus INT8 cache dtypes): entry points per
// device and the argument checks shared by every device (the Meta kernels are the
// checks alone). Schemas and registrations live in bindings/paged_kv_ops.cpp.
//
// Layouts
//   flash:  key/value cache [num_blocks, block_size, num_heads, head_size], any strides
//           with a contiguous head dimension (HND = a permuted view of a
//           [num_blocks, num_heads, block_size, head_size] tensor).
//   legacy: key cache [num_blocks, num_heads, head_size / x, block_size, x] with
//           x = 16 bytes / element size, value cache [num_blocks, num_heads, head_size,
//           block_size], both contiguous.
//   slot = block * block_size + offset; a negative slot is skipped.
//
// Cache dtypes ("kv_cache_dtype")
//   "auto":                the cache has the dtype of key/value, values stored as is.
//   "int8":                static symmetric INT8, k_scale/v_scale fp32 of shape [1] or
//                          [num_heads]; q = sat(rint(x * (1 / scale))).
//   "int8_per_token_head": dynamic symmetric INT8, one fp32 scale per (token, head) =
//                          absmax / 127, stored in k_scale_cache/v_scale_cache shaped
//                          [num_blocks, block_size, num_heads] (flash layout only).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

namespace memwarden::ops {

enum class KvCacheDtype { kAuto, kInt8, kInt8PerTokenHead };

KvCacheDtype parse_kv_cache_dtype(const char* op, c10::string_view name);

// The checked geometry of a flash-layout write or gather. Strides are in elements.
struct FlashGeometry {
  int64_t num_tokens = 0;  // slot_mapping.size(0) (writes) or key_out.size(0) (gather)
  int64_t num_blocks = 0;
  int64_t block_size = 0;
  int64_t num_heads = 0;
  int64_t head_size = 0;
  int64_t src_token_stride = 0, src_head_stride = 0;  // key/value (or key_out/value_out)
  int64_t src_v_token_stride = 0, src_v_head_stride = 0;
  int64_t k_block_stride = 0, k_slot_stride = 0, k_head_stride = 0;  // key cache
  int64_t v_block_stride = 0, v_slot_stride = 0, v_head_stride = 0;  // value cache
  int64_t ks_block_stride = 0, ks_slot_stride = 0, ks_head_stride = 0;  // scale caches
  int64_t vs_block_stride = 0, vs_slot_stride = 0, vs_head_stride = 0;
  bool per_head_scale = false;  // static int8: k_scale/v_scale have num_heads entries
};

// ---- reshape_and_cache_flash ---------------------------------------------------------
FlashGeometry reshape_and_cache_flash_check(const at::Tensor& key, const at::Tensor& value,
                                            const at::Tensor& key_cache, const at::Tensor& value_cache,
                                            const at::Tensor& slot_mapping, KvCacheDtype dtype,
                                            const at::Tensor& k_scale, const at::Tensor& v_scale,
                                            const std::optional<at::Tensor>& k_scale_cache,
                                            const std::optional<at::Tensor>& v_scale_cache);
void reshape_and_cache_flash_meta(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                                  c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                                  const at::Tensor& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                                  const std::optional<at::Tensor>& v_scale_cache);
void reshape_and_cache_flash_cpu(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                                 const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                                 c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                                 const at::Tensor& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                                 const std::optional<at::Tensor>& v_scale_cache);

// ---- reshape_and_cache (legacy paged-attention layout) ----------------------------------
struct LegacyGeometry {
  int64_t num_tokens = 0, num_blocks = 0, block_size = 0, num_heads = 0, head_size = 0, x = 0;
  int64_t key_token_stride = 0, key_head_stride = 0, value_token_stride = 0, value_head_stride = 0;
  bool per_head_scale = false;
};
LegacyGeometry reshape_and_cache_check(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                                       const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                                       KvCacheDtype dtype, const at::Tensor& k_scale, const at::Tensor& v_scale);
void reshape_and_cache_meta(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                            c10::string_view kv_cache_dtype, const at::Tensor& k_scale, const at::Tensor& v_scale);
void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                           c10::string_view kv_cache_dtype, const at::Tensor& k_scale, const at::Tensor& v_scale);

// ---- copy_blocks / swap_blocks ------------------------------------------------------------
// Bytes of one block of `cache` (dimension 0 indexes blocks; the rest of a block must be
// dense) and the byte stride between blocks.
struct BlockBytes {
  int64_t bytes;
  int64_t stride;
};
BlockBytes block_bytes(const char* op, const char* arg, const at::Tensor& cache);

void copy_blocks_check(const at::TensorList& key_caches, const at::TensorList& value_caches,
                       const at::Tensor& block_mapping);
void copy_blocks_meta(at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping);
void copy_blocks_cpu(at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping);

void swap_blocks_check(const at::Tensor& src, const at::Tensor& dst, int64_t block_size_in_bytes,
                       const at::Tensor& block_mapping);
void swap_blocks_meta(const at::Tensor& src, const at::Tensor& dst, int64_t block_size_in_bytes,
                      const at::Tensor& block_mapping);
void swap_blocks_cpu(const at::Tensor& src, const at::Tensor& dst, int64_t block_size_in_bytes,
                     const at::Tensor& block_mapping);
// Checks the values of a CPU block mapping against the block counts.
void check_block_mapping_values(const char* op, const at::Tensor& block_mapping, int64_t src_blocks,
                                int64_t dst_blocks);
// The pairs of a block mapping run in parallel (CPU) or in any order: a destination may
// appear once, and when source and destination share storage no block may be both.
// block_mapping is a CPU tensor whose values were checked.
void check_block_pairs_independent(const char* op, const at::Tensor& block_mapping, int64_t dst_blocks,
                                   bool same_storage);

// ---- gather_cache -------------------------------------------------------------------------
// Writes the first seq_lens[i] tokens of sequence i (pages block_table[i, :]) into rows
// cu_seq_lens[i] .. cu_seq_lens[i+1] of key_out/value_out ([total_tokens, num_heads,
// head_size]), dequantizing INT8 caches to the dtype of key_out.
FlashGeometry gather_cache_check(const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& key_out,
                                 const at::Tensor& value_out, KvCacheDtype dtype,
                                 const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                                 const std::optional<at::Tensor>& k_scale_cache,
                                 const std::optional<at::Tensor>& v_scale_cache);
void gather_cache_meta(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_table,
                       const at::Tensor& seq_lens, const at::Tensor& key_out, const at::Tensor& value_out,
                       c10::string_view kv_cache_dtype, const std::optional<at::Tensor>& k_scale,
                       const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                       const std::optional<at::Tensor>& v_scale_cache);
void gather_cache_cpu(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_table,
                      const at::Tensor& seq_lens, const at::Tensor& key_out, const at::Tensor& value_out,
                      c10::string_view kv_cache_dtype, const std::optional<at::Tensor>& k_scale,
                      const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                      const std::optional<at::Tensor>& v_scale_cache);
// Checks (on CPU copies) seq_lens against the block table and the output rows, and the
// block ids of the pages in use against num_blocks.
void check_gather_values(const at::Tensor& block_table_cpu, const at::Tensor& seq_lens_cpu, int64_t num_blocks,
                         int64_t block_size, int64_t out_tokens);
// Shared by the ops that read a flash-layout cache (gather_cache, paged_attention):
// the caches' shapes, dtypes and devices and the scales their cache dtype needs, into a
// geometry whose token counts and source strides are left to the caller; the block table
// and sequence lengths' shapes, dtypes and devices; and their values (CPU copies):
// every length within the table and every block id of a page in use within num_blocks.
// Returns sum(seq_lens). table_arg names the block table in messages.
FlashGeometry check_read_caches(const char* op, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                KvCacheDtype dtype, const std::optional<at::Tensor>& k_scale,
                                const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                                const std::optional<at::Tensor>& v_scale_cache);
void check_block_table(const char* op, const char* table_arg, const at::Tensor& block_table,
                       const at::Tensor& seq_lens, const at::Tensor& key_cache);
int64_t check_block_table_values(const char* op, const char* table_arg, const at::Tensor& block_table_cpu,
                                 const at::Tensor& seq_lens_cpu, int64_t num_blocks, int64_t block_size);
// Checks slot values (CPU tensor) against num_blocks * block_size.
void check_slot_values(const char* op, const at::Tensor& slot_mapping_cpu, int64_t num_blocks, int64_t block_size);

// Whether the CUDA kernels check index values (slots, block ids, sequence lengths) and
// static INT8 scales on a host copy before writing, so bad input raises a Python error.
// The copy synchronises the stream; callers whose block tables come from a trusted block
// manager switch it off (the kernels still skip out-of-range indices, so nothing is
// written out of bounds; an unchecked bad scale is used as given).
bool cuda_index_checks();
// Returns the previous setting.
bool set_cuda_index_checks(bool enabled);

#ifdef MEMWARDEN_WITH_CUDA
void reshape_and_cache_flash_cuda(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                                  c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                                  const at::Tensor& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                                  const std::optional<at::Tensor>& v_scale_cache);
void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                            c10::string_view kv_cache_dtype, const at::Tensor& k_scale, const at::Tensor& v_scale);
void copy_blocks_cuda(at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping);
void swap_blocks_cuda(const at::Tensor& src, const at::Tensor& dst, int64_t block_size_in_bytes,
                      const at::Tensor& block_mapping);
void gather_cache_cuda(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_table,
                       const at::Tensor& seq_lens, const at::Tensor& key_out, const at::Tensor& value_out,
                       c10::string_view kv_cache_dtype, const std::optional<at::Tensor>& k_scale,
                       const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                       const std::optional<at::Tensor>& v_scale_cache);
#endif

}  // namespace memwarden::ops
