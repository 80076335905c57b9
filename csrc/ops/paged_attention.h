// Paged attention op family: attention of queries over a flash-layout paged KV cache read
// in place through a block table, INT8 pages dequantized in registers. Entry points per
// device and the checks shared by every device (the Meta kernel is the checks alone).
// The schema and registrations live in bindings/paged_attention_ops.cpp.
//
// Shapes (vLLM's varlen convention)
//   query            [num_tokens, num_heads, head_size]; the tokens of sequence s are rows
//                    query_start_loc[s] .. query_start_loc[s + 1] (without query_start_loc:
//                    one token per sequence, num_tokens == num_seqs).
//   key/value_cache  [num_blocks, block_size, num_kv_heads, head_size] (NHD, or HND as a
//                    permuted view), the caches of paged_kv.h with their cache dtypes.
//   block_tables     [num_seqs, max_blocks]; seq_lens [num_seqs]: the context of sequence
//                    s is its first seq_lens[s] cache tokens, new queries' tokens included.
//   out              [num_tokens, num_heads, head_size] in query's dtype; lse
//                    [num_tokens, num_heads] float32, log of the softmax denominator
//                    (-inf for a row that sees no key, whose output is 0), so attention
//                    over several caches can be merged exactly.
//
// Masking: query token i of a sequence with q_len queries sits at position
// seq_len - q_len + i and, when causal, sees keys at positions <= its own; with
// sliding_window > 0 only the sliding_window newest of those (transformers' and vLLM's
// window); keys before kv_start[s] (left padding) are never seen. Without causal every
// query sees the whole context (the queries' own tokens lie in another cache).
// Logits: scale * q.k, then softcap * tanh(logit / softcap) when softcap > 0; sinks
// (one logit per head, gpt-oss) join the softmax denominator with no value.
// Query head h reads kv head h / (num_heads / num_kv_heads) (grouped-query attention).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "ops/paged_kv.h"

namespace memwarden::ops {

struct PagedAttentionGeometry {
  FlashGeometry cache;  // num_blocks, block_size, num_heads (= kv heads), head_size, strides
  int64_t num_tokens = 0, num_seqs = 0, num_heads = 0, max_blocks = 0;
  int64_t q_token_stride = 0, q_head_stride = 0;
  double scale = 1.0, softcap = 0.0;
  int64_t sliding_window = -1;
  bool causal = true;
};

PagedAttentionGeometry paged_attention_check(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
    const std::optional<at::Tensor>& query_start_loc, KvCacheDtype dtype,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    const std::optional<at::Tensor>& k_scale_cache, const std::optional<at::Tensor>& v_scale_cache,
    int64_t sliding_window, double softcap, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& kv_start, bool causal);

// Checks the index values (CPU tensors): seq_lens against the block table (the block ids
// of every page in use), query_start_loc (starts at 0, non-decreasing, ends at
// num_tokens; a sequence's queries fit its context when causal) and kv_start.
void check_paged_attention_values(const PagedAttentionGeometry& g, const at::Tensor& block_tables_cpu,
                                  const at::Tensor& seq_lens_cpu, const at::Tensor* query_start_loc_cpu,
                                  const at::Tensor* kv_start_cpu);

std::tuple<at::Tensor, at::Tensor> paged_attention_meta(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
    const std::optional<at::Tensor>& query_start_loc, c10::string_view kv_cache_dtype,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    const std::optional<at::Tensor>& k_scale_cache, const std::optional<at::Tensor>& v_scale_cache,
    int64_t sliding_window, double softcap, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& kv_start, bool causal);
std::tuple<at::Tensor, at::Tensor> paged_attention_cpu(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
    const std::optional<at::Tensor>& query_start_loc, c10::string_view kv_cache_dtype,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    const std::optional<at::Tensor>& k_scale_cache, const std::optional<at::Tensor>& v_scale_cache,
    int64_t sliding_window, double softcap, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& kv_start, bool causal);
#ifdef MEMWARDEN_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> paged_attention_cuda(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
    const std::optional<at::Tensor>& query_start_loc, c10::string_view kv_cache_dtype,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    const std::optional<at::Tensor>& k_scale_cache, const std::optional<at::Tensor>& v_scale_cache,
    int64_t sliding_window, double softcap, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& kv_start, bool causal);
#endif

}  // namespace memwarden::ops
