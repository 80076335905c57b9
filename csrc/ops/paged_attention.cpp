// CPU entry point of the paged attention family: check the arguments and every index
// value, then run the widest vectorised kernel variant this CPU supports.
#include <ATen/ATen.h>
#include <ATen/Version.h>

#include <vector>

#include "ops/checks.h"
#include "ops/paged_attention.h"
#include "ops/paged_attention_cpu.h"

namespace memwarden::ops {

const PagedAttentionCpuKernels& paged_attention_cpu_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx2 = at::get_cpu_capability().rfind("AVX", 0) == 0;
  static const PagedAttentionCpuKernels& kernels =
      avx2 ? AVX2::kPagedAttentionCpuKernels : DEFAULT::kPagedAttentionCpuKernels;
  return kernels;
#else
  return DEFAULT::kPagedAttentionCpuKernels;
#endif
}

std::tuple<at::Tensor, at::Tensor> paged_attention_cpu(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
    const std::optional<at::Tensor>& query_start_loc, c10::string_view kv_cache_dtype,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    const std::optional<at::Tensor>& k_scale_cache, const std::optional<at::Tensor>& v_scale_cache,
    int64_t sliding_window, double softcap, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& kv_start, bool causal) {
  const KvCacheDtype dtype = parse_kv_cache_dtype("paged_attention", kv_cache_dtype);
  const PagedAttentionGeometry g =
      paged_attention_check(query, key_cache, value_cache, block_tables, seq_lens, scale, query_start_loc, dtype,
                            k_scale, v_scale, k_scale_cache, v_scale_cache, sliding_window, softcap, sinks, kv_start,
                            causal);
  const at::Tensor table = block_tables.to(at::kLong).contiguous();
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  const at::Tensor starts = query_start_loc.has_value() ? query_start_loc->to(at::kLong).contiguous()
                                                        : at::arange(g.num_seqs + 1, lens.options());
  const at::Tensor kv_first = kv_start.has_value() ? kv_start->to(at::kLong).contiguous() : at::Tensor();
  check_paged_attention_values(g, table, lens, query_start_loc.has_value() ? &starts : nullptr,
                               kv_start.has_value() ? &kv_first : nullptr);
  const at::Tensor sink_values = sinks.has_value() ? sinks->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor out = at::empty(query.sizes(), query.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({g.num_tokens, g.num_heads}, query.options().dtype(at::kFloat));
  if (g.num_tokens == 0 || g.num_heads == 0) return {out, lse};
  const PagedAttentionInputs in{table.const_data_ptr<int64_t>(), lens.const_data_ptr<int64_t>(),
                                starts.const_data_ptr<int64_t>(),
                                kv_first.defined() ? kv_first.const_data_ptr<int64_t>() : nullptr,
                                sink_values.defined() ? sink_values.const_data_ptr<float>() : nullptr};
  paged_attention_cpu_kernels().attend(g, dtype, in, query, key_cache, value_cache, defined_or_empty(k_scale),
                                       defined_or_empty(v_scale), defined_or_empty(k_scale_cache),
                                       defined_or_empty(v_scale_cache), out, lse);
  return {out, lse};
}

}  // namespace memwarden::ops
