// CPU kernel of the paged attention family, compiled once per CPU capability
// (paged_attention_vec.cpp) and chosen at run time by paged_attention_cpu_kernels().
// Arguments and index values are checked by the caller (paged_attention.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "ops/paged_attention.h"

namespace memwarden::ops {

// Index arrays the caller made contiguous int64 (CPU): block_table [num_seqs, max_blocks],
// seq_lens [num_seqs], query_start [num_seqs + 1], kv_start [num_seqs] or null; sinks is
// float32 [num_heads] or null. out is contiguous [num_tokens, num_heads, head_size], lse
// contiguous float32 [num_tokens, num_heads].
struct PagedAttentionInputs {
  const int64_t* block_table;
  const int64_t* seq_lens;
  const int64_t* query_start;
  const int64_t* kv_start;
  const float* sinks;
};

struct PagedAttentionCpuKernels {
  void (*attend)(const PagedAttentionGeometry& g, KvCacheDtype dtype, const PagedAttentionInputs& in,
                 const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                 const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& k_scale_cache,
                 const at::Tensor& v_scale_cache, const at::Tensor& out, const at::Tensor& lse);
};

namespace DEFAULT {
extern const PagedAttentionCpuKernels kPagedAttentionCpuKernels;
}
#if defined(__x86_64__) || defined(_M_X64)
namespace AVX2 {
extern const PagedAttentionCpuKernels kPagedAttentionCpuKernels;
}
#endif

const PagedAttentionCpuKernels& paged_attention_cpu_kernels();

}  // namespace memwarden::ops
