// Vectorised CPU kernel of the paged attention family. Compiled once per CPU capability
// (CMake defines CPU_CAPABILITY and, for AVX2, CPU_CAPABILITY_AVX2), so each variant
// lives in memwarden::ops::<CPU_CAPABILITY>. Every index was checked by the caller.
//
// A work item is (sequence, kv head, tile of up to kRows query rows, context partition):
// the rows are (query token, query head) pairs of the heads that share the kv head, so
// each K/V element is loaded once for all of them and dequantized in registers (INT8
// scales applied to the dot product and to the softmax weight, not to the values). An
// item walks its keys a page run at a time with an online softmax in fp32. When there
// are too few items to keep every thread busy, long contexts are split into partitions
// whose partial results are merged by log-sum-exp afterwards (flash-decoding).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "ops/dispatch.h"
#include "ops/int8_span_vec.h"
#include "ops/paged_attention_cpu.h"

namespace memwarden::ops::CPU_CAPABILITY {
namespace {

constexpr int64_t kRows = 16;          // query rows of one work item
constexpr int64_t kKeys = 32;          // keys scored per softmax step
constexpr int64_t kMinPartition = 512;  // keys of a context partition, at least
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One work item; part < 0: the tile's whole range in one go, written straight out.
struct Item {
  int64_t seq, kv_head, row0, rows;  // rows row0 .. row0 + rows of the sequence's q_len x group
  int64_t key_begin, key_end;        // keys [key_begin, key_end) of this partition
  int64_t partial;                   // index of its partial result, or -1
};

// A tile's partial result: unnormalised output, running max and denominator per row.
struct Partial {
  float* acc;  // [kRows][head_size]
  float* max;  // [kRows]
  float* sum;  // [kRows]
};

template <typename C>
inline std::pair<Vec, Vec> load_cache_chunk(const C* p) {
  if constexpr (std::is_same_v<C, int8_t>) {
    return {load_int8(p), load_int8(p + Vec::size())};
  } else {
    return load_chunk(p);
  }
}

inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset);
}

// Everything one item needs to know about its sequence and kv head.
struct Context {
  const PagedAttentionGeometry* g;
  KvCacheDtype dtype;
  const int64_t* table;  // this sequence's block ids
  const char* k_base;    // key/value cache at this kv head
  const char* v_base;
  const float* ks_base;  // scale caches at this kv head (int8_per_token_head)
  const float* vs_base;
  float k_static, v_static;  // int8 static scales (1 otherwise)
  int64_t seq_len, q_len, first_key, group;
};

// Position bounds [lo, hi) of the keys row r of a sequence sees.
inline std::pair<int64_t, int64_t> visible_keys(const Context& c, int64_t row) {
  const PagedAttentionGeometry& g = *c.g;
  const int64_t pos = g.causal ? c.seq_len - c.q_len + row / c.group : c.seq_len - 1;
  const int64_t hi = g.causal ? pos + 1 : c.seq_len;
  int64_t lo = c.first_key;
  if (g.sliding_window > 0) lo = std::max(lo, pos - g.sliding_window + 1);
  return {lo, hi};
}

template <typename C>
void attend_range(const Context& c, const float* q, int64_t rows, const int64_t* lo, const int64_t* hi,
                  int64_t key_begin, int64_t key_end, const Partial& out) {
  const PagedAttentionGeometry& g = *c.g;
  const FlashGeometry& cg = g.cache;
  const int64_t D = cg.head_size, bs = cg.block_size, vec_end = D - D % kChunk;
  const bool per_token = c.dtype == KvCacheDtype::kInt8PerTokenHead;
  const float softcap = static_cast<float>(g.softcap);
  float scores[kRows][kKeys];
  float k_scale[kKeys], v_scale[kKeys];
  const C* k_rows[kKeys];
  const C* v_rows[kKeys];
  for (int64_t t = key_begin; t < key_end;) {
    const int64_t block = c.table[t / bs], offset = t % bs;
    const int64_t n = std::min({bs - offset, key_end - t, kKeys});
    for (int64_t j = 0; j < n; ++j) {
      const int64_t slot = offset + j;
      k_rows[j] = reinterpret_cast<const C*>(c.k_base) + block * cg.k_block_stride + slot * cg.k_slot_stride;
      v_rows[j] = reinterpret_cast<const C*>(c.v_base) + block * cg.v_block_stride + slot * cg.v_slot_stride;
      k_scale[j] = per_token ? c.ks_base[block * cg.ks_block_stride + slot * cg.ks_slot_stride] : c.k_static;
      v_scale[j] = per_token ? c.vs_base[block * cg.vs_block_stride + slot * cg.vs_slot_stride] : c.v_static;
    }
    // The rows of one head are strided through the pages (a cache line or a few per row,
    // often one memory page apart), which the hardware prefetcher does not follow: ask for
    // this step's value rows and the next step's key rows while the keys are scored.
    const int64_t row_bytes = D * static_cast<int64_t>(sizeof(C));
    for (int64_t j = 0; j < n; ++j) prefetch_row(v_rows[j], row_bytes);
    if (t + n < key_end) {
      const int64_t next = t + n, next_block = c.table[next / bs];
      const int64_t next_n = std::min({bs - next % bs, key_end - next, kKeys});
      for (int64_t j = 0; j < next_n; ++j)
        prefetch_row(reinterpret_cast<const C*>(c.k_base) + next_block * cg.k_block_stride +
                         (next % bs + j) * cg.k_slot_stride,
                     row_bytes);
    }
    // Scores: four rows at a time share each loaded key chunk.
    for (int64_t j = 0; j < n; ++j) {
      const C* k = k_rows[j];
      for (int64_t r0 = 0; r0 < rows; r0 += 4) {
        const int64_t m = std::min<int64_t>(4, rows - r0);
        Vec acc[4] = {Vec(0.0f), Vec(0.0f), Vec(0.0f), Vec(0.0f)};
        for (int64_t d = 0; d < vec_end; d += kChunk) {
          const auto [k_lo, k_hi] = load_cache_chunk(k + d);
          for (int64_t i = 0; i < m; ++i) {
            const float* qr = q + (r0 + i) * D + d;
            acc[i] = at::vec::fmadd(Vec::loadu(qr), k_lo, acc[i]);
            acc[i] = at::vec::fmadd(Vec::loadu(qr + Vec::size()), k_hi, acc[i]);
          }
        }
        for (int64_t i = 0; i < m; ++i) {
          float dot = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[i]);
          const float* qr = q + (r0 + i) * D;
          for (int64_t d = vec_end; d < D; ++d) dot += qr[d] * static_cast<float>(k[d]);
          float s = dot * k_scale[j];
          if (softcap > 0.0f) s = softcap * std::tanh(s / softcap);
          const int64_t pos = t + j, r = r0 + i;
          scores[r][j] = pos >= lo[r] && pos < hi[r] ? s : kNegInf;
        }
      }
    }
    // Online softmax: rescale what the rows hold to the new maximum, weights in place
    // (0 for a row that sees none of this step's keys, so the value loop needs no mask).
    for (int64_t r = 0; r < rows; ++r) {
      float* row_scores = scores[r];
      float step_max = kNegInf;
      for (int64_t j = 0; j < n; ++j) step_max = std::max(step_max, row_scores[j]);
      if (step_max == kNegInf) {
        std::fill(row_scores, row_scores + n, 0.0f);
        continue;
      }
      const float new_max = std::max(out.max[r], step_max);
      const float alpha = std::exp(out.max[r] - new_max);  // 0 while the row saw nothing
      if (alpha != 1.0f) {
        out.sum[r] *= alpha;
        float* a = out.acc + r * D;
        at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, a, a, D);
      }
      Vec sums(0.0f);
      int64_t j = 0;
      for (; j + Vec::size() <= n; j += Vec::size()) {
        const Vec p = (Vec::loadu(row_scores + j) - Vec(new_max)).exp();  // exp(-inf) = 0: masked keys
        sums = sums + p;
        (p * Vec::loadu(v_scale + j)).store(row_scores + j);
      }
      float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sums);
      for (; j < n; ++j) {
        const float p = std::exp(row_scores[j] - new_max);
        sum += p;
        row_scores[j] = p * v_scale[j];
      }
      out.sum[r] += sum;
      out.max[r] = new_max;
    }
    // Values: four rows at a time keep their accumulator chunk in registers over the
    // step's keys; each loaded value chunk serves all four.
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const int64_t m = std::min<int64_t>(4, rows - r0);
      for (int64_t d = 0; d < vec_end; d += kChunk) {
        Vec lo[4], hi[4];
        for (int64_t i = 0; i < m; ++i) {
          lo[i] = Vec::loadu(out.acc + (r0 + i) * D + d);
          hi[i] = Vec::loadu(out.acc + (r0 + i) * D + d + Vec::size());
        }
        for (int64_t j = 0; j < n; ++j) {
          const auto [v_lo, v_hi] = load_cache_chunk(v_rows[j] + d);
          for (int64_t i = 0; i < m; ++i) {
            const Vec w(scores[r0 + i][j]);
            lo[i] = at::vec::fmadd(w, v_lo, lo[i]);
            hi[i] = at::vec::fmadd(w, v_hi, hi[i]);
          }
        }
        for (int64_t i = 0; i < m; ++i) {
          lo[i].store(out.acc + (r0 + i) * D + d);
          hi[i].store(out.acc + (r0 + i) * D + d + Vec::size());
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        float* a = out.acc + (r0 + i) * D;
        for (int64_t j = 0; j < n; ++j)
          for (int64_t d = vec_end; d < D; ++d) a[d] += scores[r0 + i][j] * static_cast<float>(v_rows[j][d]);
      }
    }
    t += n;
  }
}

// Normalises one row (sinks join the denominator) into out and lse.
template <typename T>
void finish_row(const float* acc, float max, float sum, const float* sink, int64_t D, T* out, float* lse) {
  if (sink != nullptr) {
    const float new_max = std::max(max, *sink);
    const float alpha = std::exp(max - new_max);
    sum = sum * alpha + std::exp(*sink - new_max);
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d] * alpha * inv);
    *lse = new_max + std::log(sum);
    return;
  }
  if (sum == 0.0f) {
    std::fill(out, out + D, static_cast<T>(0.0f));
    *lse = kNegInf;
    return;
  }
  const float inv = 1.0f / sum;
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d] * inv);
  *lse = max + std::log(sum);
}

template <typename T, typename C>
void attend_kernel_typed(const PagedAttentionGeometry& g, KvCacheDtype dtype, const PagedAttentionInputs& in,
                         const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                         const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& k_scale_cache,
                         const at::Tensor& v_scale_cache, const at::Tensor& out, const at::Tensor& lse) {
  const FlashGeometry& cg = g.cache;
  const int64_t D = cg.head_size, KVH = cg.num_heads, group = g.num_heads / KVH;
  // Items: tiles of each (sequence, kv head), split into partitions when the tiles alone
  // are too few for the threads.
  int64_t tiles = 0;
  for (int64_t s = 0; s < g.num_seqs; ++s) {
    const int64_t q_len = in.query_start[s + 1] - in.query_start[s];
    tiles += KVH * ((q_len * group + kRows - 1) / kRows);
  }
  const int64_t threads = at::get_num_threads();
  const int64_t wanted_parts = tiles >= 2 * threads ? 1 : (2 * threads + tiles - 1) / std::max<int64_t>(tiles, 1);
  std::vector<Item> items;
  std::vector<int64_t> tile_first_item;  // per tile: its first item (partials of a tile are consecutive)
  int64_t partials = 0;
  for (int64_t s = 0; s < g.num_seqs; ++s) {
    const int64_t q_len = in.query_start[s + 1] - in.query_start[s], seq_len = in.seq_lens[s];
    const int64_t first_key = in.kv_start ? in.kv_start[s] : 0;
    for (int64_t h = 0; h < KVH; ++h) {
      for (int64_t row0 = 0; row0 < q_len * group; row0 += kRows) {
        const int64_t rows = std::min(kRows, q_len * group - row0);
        // The tile's keys: from the first row's lowest visible key to the last row's end.
        Context c{&g, dtype, nullptr, nullptr, nullptr, nullptr, nullptr, 1.0f, 1.0f, seq_len, q_len, first_key,
                  group};
        const int64_t begin = visible_keys(c, row0).first;
        const int64_t end = std::max(begin, visible_keys(c, row0 + rows - 1).second);
        const int64_t parts = std::max<int64_t>(1, std::min(wanted_parts, (end - begin) / kMinPartition));
        tile_first_item.push_back(static_cast<int64_t>(items.size()));
        const int64_t step = (end - begin + parts - 1) / parts;
        for (int64_t p = 0; p < parts; ++p)
          items.push_back({s, h, row0, rows, begin + p * step, std::min(end, begin + (p + 1) * step),
                           parts == 1 ? -1 : partials++});
      }
    }
  }
  tile_first_item.push_back(static_cast<int64_t>(items.size()));
  std::vector<float> partial_acc(partials * kRows * D), partial_max(partials * kRows), partial_sum(partials * kRows);

  const T* q_data = query.const_data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  float* lse_data = lse.data_ptr<float>();
  const bool per_token = dtype == KvCacheDtype::kInt8PerTokenHead;
  const float* k_static = dtype == KvCacheDtype::kInt8 ? k_scale.const_data_ptr<float>() : nullptr;
  const float* v_static = dtype == KvCacheDtype::kInt8 ? v_scale.const_data_ptr<float>() : nullptr;
  const float q_scale = static_cast<float>(g.scale);
  auto context = [&](const Item& it) {
    const int64_t h = it.kv_head;
    const int64_t si = cg.per_head_scale ? h : 0;
    return Context{&g,
                   dtype,
                   in.block_table + it.seq * g.max_blocks,
                   static_cast<const char*>(key_cache.const_data_ptr()) + h * cg.k_head_stride * sizeof(C),
                   static_cast<const char*>(value_cache.const_data_ptr()) + h * cg.v_head_stride * sizeof(C),
                   per_token ? k_scale_cache.const_data_ptr<float>() + h * cg.ks_head_stride : nullptr,
                   per_token ? v_scale_cache.const_data_ptr<float>() + h * cg.vs_head_stride : nullptr,
                   k_static ? k_static[si] : 1.0f,
                   v_static ? v_static[si] : 1.0f,
                   in.seq_lens[it.seq],
                   in.query_start[it.seq + 1] - in.query_start[it.seq],
                   in.kv_start ? in.kv_start[it.seq] : 0,
                   group};
  };
  // (token, head) of row r of an item.
  auto row_token = [&](const Item& it, int64_t r) { return in.query_start[it.seq] + (it.row0 + r) / group; };
  auto row_head = [&](const Item& it, int64_t r) { return it.kv_head * group + (it.row0 + r) % group; };

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(kRows * D), acc(kRows * D);
    float max[kRows], sum[kRows];
    int64_t lo[kRows], hi[kRows];
    for (int64_t i = begin; i < end; ++i) {
      const Item& it = items[i];
      const Context c = context(it);
      for (int64_t r = 0; r < it.rows; ++r) {
        const T* src = q_data + row_token(it, r) * g.q_token_stride + row_head(it, r) * g.q_head_stride;
        for (int64_t d = 0; d < D; ++d) q[r * D + d] = static_cast<float>(src[d]) * q_scale;
        std::tie(lo[r], hi[r]) = visible_keys(c, it.row0 + r);
      }
      Partial part = it.partial < 0 ? Partial{acc.data(), max, sum}
                                    : Partial{partial_acc.data() + it.partial * kRows * D,
                                              partial_max.data() + it.partial * kRows,
                                              partial_sum.data() + it.partial * kRows};
      std::fill(part.acc, part.acc + it.rows * D, 0.0f);
      std::fill(part.max, part.max + it.rows, kNegInf);
      std::fill(part.sum, part.sum + it.rows, 0.0f);
      attend_range<C>(c, q.data(), it.rows, lo, hi, it.key_begin, it.key_end, part);
      if (it.partial >= 0) continue;
      for (int64_t r = 0; r < it.rows; ++r) {
        const int64_t token = row_token(it, r), head = row_head(it, r);
        finish_row(part.acc + r * D, part.max[r], part.sum[r], in.sinks ? in.sinks + head : nullptr, D,
                   out_data + (token * g.num_heads + head) * D, lse_data + token * g.num_heads + head);
      }
    }
  });
  if (partials == 0) return;
  // Merge each split tile's partitions: rescale every partial to the largest maximum.
  const int64_t num_tiles = static_cast<int64_t>(tile_first_item.size()) - 1;
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t tile = begin; tile < end; ++tile) {
      const Item& first = items[tile_first_item[tile]];
      if (first.partial < 0) continue;
      const int64_t n = tile_first_item[tile + 1] - tile_first_item[tile];
      for (int64_t r = 0; r < first.rows; ++r) {
        float max = kNegInf;
        for (int64_t p = 0; p < n; ++p) max = std::max(max, partial_max[(first.partial + p) * kRows + r]);
        float sum = 0.0f;
        std::fill(acc.begin(), acc.end(), 0.0f);
        if (max != kNegInf) {
          for (int64_t p = 0; p < n; ++p) {
            const int64_t k = (first.partial + p) * kRows + r;
            if (partial_max[k] == kNegInf) continue;
            const float w = std::exp(partial_max[k] - max);
            sum += partial_sum[k] * w;
            const float* a = partial_acc.data() + k * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += a[d] * w;
          }
        }
        const int64_t token = row_token(first, r), head = row_head(first, r);
        finish_row(acc.data(), max, sum, in.sinks ? in.sinks + head : nullptr, D,
                   out_data + (token * g.num_heads + head) * D, lse_data + token * g.num_heads + head);
      }
    }
  });
}

void attend_kernel(const PagedAttentionGeometry& g, KvCacheDtype dtype, const PagedAttentionInputs& in,
                   const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                   const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& k_scale_cache,
                   const at::Tensor& v_scale_cache, const at::Tensor& out, const at::Tensor& lse) {
  MW_DISPATCH_FLOAT_HALF_BF16(query.scalar_type(), "paged_attention", [&] {
    if (dtype == KvCacheDtype::kAuto)
      attend_kernel_typed<scalar_t, scalar_t>(g, dtype, in, query, key_cache, value_cache, k_scale, v_scale,
                                              k_scale_cache, v_scale_cache, out, lse);
    else
      attend_kernel_typed<scalar_t, int8_t>(g, dtype, in, query, key_cache, value_cache, k_scale, v_scale,
                                            k_scale_cache, v_scale_cache, out, lse);
  });
}

}  // namespace

extern const PagedAttentionCpuKernels kPagedAttentionCpuKernels{attend_kernel};

}  // namespace memwarden::ops::CPU_CAPABILITY
