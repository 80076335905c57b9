// CPU entry points of the paged KV family: check the arguments and the index values
// (every slot, block id and sequence length, before anything is written), then run the
// widest vectorised kernel variant this CPU supports.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <cstring>
#include <string>
#include <vector>

#include "ops/checks.h"
#include "ops/paged_kv.h"
#include "ops/paged_kv_cpu.h"

namespace memwarden::ops {

const PagedKvCpuKernels& paged_kv_cpu_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx2 = at::get_cpu_capability().rfind("AVX", 0) == 0;
  static const PagedKvCpuKernels& kernels = avx2 ? AVX2::kPagedKvCpuKernels : DEFAULT::kPagedKvCpuKernels;
  return kernels;
#else
  return DEFAULT::kPagedKvCpuKernels;
#endif
}

void reshape_and_cache_flash_cpu(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                                 const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                                 c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                                 const at::Tensor& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                                 const std::optional<at::Tensor>& v_scale_cache) {
  const char* op = "reshape_and_cache_flash";
  const KvCacheDtype dtype = parse_kv_cache_dtype(op, kv_cache_dtype);
  const FlashGeometry g = reshape_and_cache_flash_check(key, value, key_cache, value_cache, slot_mapping, dtype,
                                                        k_scale, v_scale, k_scale_cache, v_scale_cache);
  check_slot_values(op, slot_mapping, g.num_blocks, g.block_size);
  if (g.num_tokens == 0 || g.num_heads == 0 || g.head_size == 0) return;
  paged_kv_cpu_kernels().write_flash(g, dtype, key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale,
                                     defined_or_empty(k_scale_cache), defined_or_empty(v_scale_cache));
}

void reshape_and_cache_cpu(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                           const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                           c10::string_view kv_cache_dtype, const at::Tensor& k_scale, const at::Tensor& v_scale) {
  const char* op = "reshape_and_cache";
  const KvCacheDtype dtype = parse_kv_cache_dtype(op, kv_cache_dtype);
  const LegacyGeometry g =
      reshape_and_cache_check(key, value, key_cache, value_cache, slot_mapping, dtype, k_scale, v_scale);
  check_slot_values(op, slot_mapping, g.num_blocks, g.block_size);
  if (g.num_tokens == 0 || g.num_heads == 0 || g.head_size == 0) return;
  paged_kv_cpu_kernels().write_legacy(g, dtype, key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale);
}

void copy_blocks_cpu(at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping) {
  const char* op = "copy_blocks";
  copy_blocks_check(key_caches, value_caches, block_mapping);
  if (key_caches.empty() || block_mapping.size(0) == 0) return;
  const int64_t num_blocks = key_caches[0].size(0);
  const at::Tensor mapping = block_mapping.to(at::kCPU).contiguous();
  check_block_mapping_values(op, mapping, num_blocks, num_blocks);
  check_block_pairs_independent(op, mapping, num_blocks, /*same_storage=*/true);
  const int64_t* m = mapping.const_data_ptr<int64_t>();
  const int64_t n = mapping.size(0);
  std::vector<at::Tensor> caches(key_caches.begin(), key_caches.end());
  caches.insert(caches.end(), value_caches.begin(), value_caches.end());
  std::vector<BlockBytes> geometry;
  for (const auto& c : caches) geometry.push_back(block_bytes(op, "cache", c));
  const int64_t num_caches = static_cast<int64_t>(caches.size());
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(geometry[0].bytes, 1));
  at::parallel_for(0, num_caches * n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / n, i = item % n;
      char* base = static_cast<char*>(caches[c].data_ptr());
      std::memcpy(base + m[2 * i + 1] * geometry[c].stride, base + m[2 * i] * geometry[c].stride, geometry[c].bytes);
    }
  });
}

void swap_blocks_cpu(const at::Tensor& src, const at::Tensor& dst, int64_t block_size_in_bytes,
                     const at::Tensor& block_mapping) {
  const char* op = "swap_blocks";
  swap_blocks_check(src, dst, block_size_in_bytes, block_mapping);
  const int64_t n = block_mapping.size(0);
  if (n == 0 || block_size_in_bytes == 0) return;
  const at::Tensor mapping = block_mapping.contiguous();
  check_block_mapping_values(op, mapping, src.size(0), dst.size(0));
  check_block_pairs_independent(op, mapping, dst.size(0), src.is_alias_of(dst));
  const int64_t* m = mapping.const_data_ptr<int64_t>();
  const BlockBytes s = block_bytes(op, "src", src), d = block_bytes(op, "dst", dst);
  const char* src_base = static_cast<const char*>(src.const_data_ptr());
  char* dst_base = static_cast<char*>(dst.data_ptr());
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / block_size_in_bytes);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      std::memmove(dst_base + m[2 * i + 1] * d.stride, src_base + m[2 * i] * s.stride, block_size_in_bytes);
  });
}

void gather_cache_cpu(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_table,
                      const at::Tensor& seq_lens, const at::Tensor& key_out, const at::Tensor& value_out,
                      c10::string_view kv_cache_dtype, const std::optional<at::Tensor>& k_scale,
                      const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                      const std::optional<at::Tensor>& v_scale_cache) {
  const KvCacheDtype dtype = parse_kv_cache_dtype("gather_cache", kv_cache_dtype);
  const FlashGeometry g = gather_cache_check(key_cache, value_cache, block_table, seq_lens, key_out, value_out, dtype,
                                             k_scale, v_scale, k_scale_cache, v_scale_cache);
  check_gather_values(block_table, seq_lens, g.num_blocks, g.block_size, g.num_tokens);
  if (g.num_tokens == 0 || g.num_heads == 0 || g.head_size == 0) return;
  const at::Tensor lens = seq_lens.to(at::kLong);
  at::Tensor cu = at::zeros({lens.size(0) + 1}, lens.options());
  cu.narrow(0, 1, lens.size(0)).copy_(lens.cumsum(0));
  paged_kv_cpu_kernels().gather(g, dtype, key_cache, value_cache, block_table.to(at::kLong).contiguous(), cu, key_out,
                                value_out, defined_or_empty(k_scale), defined_or_empty(v_scale),
                                defined_or_empty(k_scale_cache), defined_or_empty(v_scale_cache));
}

}  // namespace memwarden::ops
