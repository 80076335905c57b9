// Device-generic parts of the paged attention family: the argument checks (which are
// also the Meta kernel) and the checks of index values on CPU copies. The cache checks
// are the paged KV family's own (check_read_caches), so both families accept and reject
// the same caches with the same words.
#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "ops/checks.h"
#include "ops/paged_attention.h"

namespace memwarden::ops {
namespace {

using std::to_string;

constexpr const char* kOp = "paged_attention";

// An optional per-sequence index tensor: int32/int64, one dimension of `length`, on the
// cache's device.
void check_sequence_index(const char* arg, const at::Tensor& t, int64_t length, const char* shape,
                          const at::Tensor& cache) {
  check_dim(kOp, arg, t, 1, shape);
  check_index_dtype(kOp, arg, t, /*allow_int32=*/true);
  TORCH_CHECK_VALUE(dim_of(t, 0) == length, std::string(kOp) + ": " + arg + " must have " + to_string(length) +
                                                " elements " + shape + ", got shape " + shape_string(t));
  check_device(kOp, arg, t, cache);
}

}  // namespace

PagedAttentionGeometry paged_attention_check(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
    const std::optional<at::Tensor>& query_start_loc, KvCacheDtype dtype, const std::optional<at::Tensor>& k_scale,
    const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& k_scale_cache,
    const std::optional<at::Tensor>& v_scale_cache, int64_t sliding_window, double softcap,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& kv_start, bool causal) {
  PagedAttentionGeometry g;
  g.cache = check_read_caches(kOp, key_cache, value_cache, dtype, k_scale, v_scale, k_scale_cache, v_scale_cache);
  check_block_table(kOp, "block_tables", block_tables, seq_lens, key_cache);
  check_dim(kOp, "query", query, 3, "[num_tokens, num_heads, head_size]");
  check_float(kOp, "query", query);
  check_inner_contiguous(kOp, "query", query);
  check_device(kOp, "query", query, key_cache);
  if (dtype == KvCacheDtype::kAuto)
    TORCH_CHECK_TYPE(key_cache.scalar_type() == query.scalar_type(),
                     std::string(kOp) + ": key_cache must have the dtype of query (" +
                         dtype_name(query.scalar_type()) + ") with kv_cache_dtype \"auto\", got " +
                         dtype_name(key_cache.scalar_type()));
  g.num_tokens = dim_of(query, 0);
  g.num_heads = dim_of(query, 1);
  g.num_seqs = dim_of(block_tables, 0);
  g.max_blocks = dim_of(block_tables, 1);
  g.q_token_stride = stride_of(query, 0);
  g.q_head_stride = stride_of(query, 1);
  TORCH_CHECK_VALUE(dim_of(query, 2) == g.cache.head_size,
                    std::string(kOp) + ": query has heads of size " + to_string(dim_of(query, 2)) +
                        " but the cache holds heads of size " + to_string(g.cache.head_size) + " (query " +
                        shape_string(query) + ", key_cache " + shape_string(key_cache) + ")");
  TORCH_CHECK_VALUE(g.cache.num_heads > 0 && g.num_heads % g.cache.num_heads == 0,
                    std::string(kOp) + ": query's " + to_string(g.num_heads) +
                        " heads must be a multiple of the cache's " + to_string(g.cache.num_heads) +
                        " kv heads (grouped-query attention)");
  if (query_start_loc.has_value()) {
    check_sequence_index("query_start_loc", *query_start_loc, g.num_seqs + 1, "[num_seqs + 1]", key_cache);
  } else {
    TORCH_CHECK_VALUE(g.num_tokens == g.num_seqs,
                      std::string(kOp) + ": without query_start_loc each sequence has one query token, but query "
                                         "has " + to_string(g.num_tokens) + " tokens for " + to_string(g.num_seqs) +
                          " sequences (block_tables " + shape_string(block_tables) + ")");
  }
  if (kv_start.has_value()) check_sequence_index("kv_start", *kv_start, g.num_seqs, "[num_seqs]", key_cache);
  if (sinks.has_value()) {
    check_dim(kOp, "sinks", *sinks, 1, "[num_heads]");
    check_float(kOp, "sinks", *sinks);
    TORCH_CHECK_VALUE(dim_of(*sinks, 0) == g.num_heads, std::string(kOp) + ": sinks must have num_heads = " +
                                                             to_string(g.num_heads) + " elements, got shape " +
                                                             shape_string(*sinks));
    check_device(kOp, "sinks", *sinks, key_cache);
  }
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale != 0.0,
                    std::string(kOp) + ": scale must be a finite non-zero number, got " + to_string(scale));
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0,
                    std::string(kOp) + ": softcap must be 0 (off) or a positive number, got " + to_string(softcap));
  TORCH_CHECK_VALUE(sliding_window == -1 || sliding_window > 0,
                    std::string(kOp) + ": sliding_window must be -1 (off) or positive, got " +
                        to_string(sliding_window));
  g.scale = scale;
  g.softcap = softcap;
  g.sliding_window = sliding_window;
  g.causal = causal;
  return g;
}

std::tuple<at::Tensor, at::Tensor> paged_attention_meta(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
    const std::optional<at::Tensor>& query_start_loc, c10::string_view kv_cache_dtype,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    const std::optional<at::Tensor>& k_scale_cache, const std::optional<at::Tensor>& v_scale_cache,
    int64_t sliding_window, double softcap, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& kv_start, bool causal) {
  paged_attention_check(query, key_cache, value_cache, block_tables, seq_lens, scale, query_start_loc,
                        parse_kv_cache_dtype(kOp, kv_cache_dtype), k_scale, v_scale, k_scale_cache, v_scale_cache,
                        sliding_window, softcap, sinks, kv_start, causal);
  return {at::empty_symint(query.sym_sizes(), query.options().memory_format(at::MemoryFormat::Contiguous)),
          at::empty_symint({query.sym_size(0), query.sym_size(1)}, query.options().dtype(at::kFloat))};
}

void check_paged_attention_values(const PagedAttentionGeometry& g, const at::Tensor& block_tables_cpu,
                                  const at::Tensor& seq_lens_cpu, const at::Tensor* query_start_loc_cpu,
                                  const at::Tensor* kv_start_cpu) {
  check_block_table_values(kOp, "block_tables", block_tables_cpu, seq_lens_cpu, g.cache.num_blocks,
                           g.cache.block_size);
  const at::Tensor lens = seq_lens_cpu.contiguous();
  if (query_start_loc_cpu) {
    const at::Tensor loc = query_start_loc_cpu->contiguous();
    TORCH_CHECK_VALUE(index_at(loc, 0) == 0,
                      std::string(kOp) + ": query_start_loc[0] must be 0, got " + to_string(index_at(loc, 0)));
    for (int64_t s = 0; s < g.num_seqs; ++s) {
      const int64_t q_len = index_at(loc, s + 1) - index_at(loc, s);
      TORCH_CHECK_VALUE(q_len >= 0, std::string(kOp) + ": query_start_loc must not decrease, but query_start_loc[" +
                                        to_string(s + 1) + "] < query_start_loc[" + to_string(s) + "]");
      TORCH_CHECK_VALUE(!g.causal || q_len <= index_at(lens, s),
                        std::string(kOp) + ": sequence " + to_string(s) + " has " + to_string(q_len) +
                            " query tokens but seq_lens[" + to_string(s) + "] = " + to_string(index_at(lens, s)) +
                            "; with causal masking the queries are the last tokens of the context");
    }
    TORCH_CHECK_VALUE(index_at(loc, g.num_seqs) == g.num_tokens,
                      std::string(kOp) + ": query_start_loc[-1] = " + to_string(index_at(loc, g.num_seqs)) +
                          " must be query.size(0) = " + to_string(g.num_tokens));
  }
  if (kv_start_cpu) {
    const at::Tensor start = kv_start_cpu->contiguous();
    for (int64_t s = 0; s < g.num_seqs; ++s) {
      const int64_t v = index_at(start, s);
      TORCH_CHECK_VALUE(v >= 0 && v <= index_at(lens, s), std::string(kOp) + ": kv_start[" + to_string(s) + "] = " +
                                                              to_string(v) + " must be within 0 and seq_lens[" +
                                                              to_string(s) + "] = " + to_string(index_at(lens, s)));
    }
  }
}

}  // namespace memwarden::ops
