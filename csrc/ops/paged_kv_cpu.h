// CPU kernels of the paged KV family, compiled once per CPU capability (paged_kv_vec.cpp)
// and chosen at run time by paged_kv_cpu_kernels(). Arguments are checked by the
// callers (paged_kv.cpp), index values included.
#pragma once

#include <ATen/core/Tensor.h>

#include "ops/paged_kv.h"

namespace memwarden::ops {

struct PagedKvCpuKernels {
  void (*write_flash)(const FlashGeometry& g, KvCacheDtype dtype, const at::Tensor& key, const at::Tensor& value,
                      const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                      const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& k_scale_cache,
                      const at::Tensor& v_scale_cache);
  void (*write_legacy)(const LegacyGeometry& g, KvCacheDtype dtype, const at::Tensor& key, const at::Tensor& value,
                       const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                       const at::Tensor& k_scale, const at::Tensor& v_scale);
  // cu_seq_lens: CPU int64 [num_seqs + 1]; block_table: CPU-accessible, int64 contiguous.
  void (*gather)(const FlashGeometry& g, KvCacheDtype dtype, const at::Tensor& key_cache,
                 const at::Tensor& value_cache, const at::Tensor& block_table, const at::Tensor& cu_seq_lens,
                 const at::Tensor& key_out, const at::Tensor& value_out, const at::Tensor& k_scale,
                 const at::Tensor& v_scale, const at::Tensor& k_scale_cache, const at::Tensor& v_scale_cache);
};

namespace DEFAULT {
extern const PagedKvCpuKernels kPagedKvCpuKernels;
}
#if defined(__x86_64__) || defined(_M_X64)
namespace AVX2 {
extern const PagedKvCpuKernels kPagedKvCpuKernels;
}
#endif

const PagedKvCpuKernels& paged_kv_cpu_kernels();

}  // namespace memwarden::ops
