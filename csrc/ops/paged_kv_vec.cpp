// Vectorised CPU kernels of the paged KV family. Compiled once per CPU capability
// (CMake defines CPU_CAPABILITY and, for AVX2, CPU_CAPABILITY_AVX2), so each variant
// lives in memwarden::ops::<CPU_CAPABILITY>. Every index was checked by the caller.
//
// Work is split over tokens (writes) or over (sequence, page) pairs (gather) with
// at::parallel_for; a token's heads are copied with one memcpy when both sides hold
// them back to back, and INT8 is (de)quantized 16 elements per step.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/quant/int8.h"
#include "ops/dispatch.h"
#include "ops/int8_span_vec.h"
#include "ops/paged_kv_cpu.h"


namespace memwarden::ops::CPU_CAPABILITY {
namespace {

constexpr int64_t kMinGrainElements = 1 << 14;  // elements per parallel task

int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kMinGrainElements / std::max<int64_t>(elements_per_item, 1));
}

std::vector<float> inverse_scales(const at::Tensor& scale, int64_t num_heads) {
  std::vector<float> inv(num_heads);
  const float* s = scale.const_data_ptr<float>();
  const bool per_head = scale.numel() == num_heads;
  for (int64_t h = 0; h < num_heads; ++h) {
    const float v = s[per_head ? h : 0];
    inv[h] = v > 0.0f ? 1.0f / v : 0.0f;
  }
  return inv;
}

std::vector<float> head_scales(const at::Tensor& scale, int64_t num_heads) {
  std::vector<float> out(num_heads);
  const float* s = scale.const_data_ptr<float>();
  const bool per_head = scale.numel() == num_heads;
  for (int64_t h = 0; h < num_heads; ++h) out[h] = s[per_head ? h : 0];
  return out;
}

// One side (key or value) of a flash write.
struct FlashSide {
  const char* src;
  int64_t src_token_stride, src_head_stride;  // elements
  char* cache;
  int64_t block_stride, slot_stride, head_stride;  // elements
  float* scale_cache;
  int64_t s_block_stride, s_slot_stride, s_head_stride;
  std::vector<float> inv_scale;
};

template <typename T>
void write_token(const FlashGeometry& g, KvCacheDtype dtype, const FlashSide& s, int64_t token, int64_t block,
                 int64_t offset) {
  const T* src = reinterpret_cast<const T*>(s.src) + token * s.src_token_stride;
  const int64_t H = g.num_heads, D = g.head_size;
  if (dtype == KvCacheDtype::kAuto) {
    T* dst = reinterpret_cast<T*>(s.cache) + block * s.block_stride + offset * s.slot_stride;
    if (s.src_head_stride == D && s.head_stride == D) {
      std::memcpy(dst, src, sizeof(T) * H * D);
    } else {
      for (int64_t h = 0; h < H; ++h) std::memcpy(dst + h * s.head_stride, src + h * s.src_head_stride, sizeof(T) * D);
    }
    return;
  }
  int8_t* dst = reinterpret_cast<int8_t*>(s.cache) + block * s.block_stride + offset * s.slot_stride;
  for (int64_t h = 0; h < H; ++h) {
    const T* head = src + h * s.src_head_stride;
    if (dtype == KvCacheDtype::kInt8) {
      quantize_span(head, dst + h * s.head_stride, D, quant::Int8Params{0.0f, s.inv_scale[h], 0});
    } else {
      const quant::Int8Params p = quant::symmetric_params(finite_range(head, D, /*symmetric=*/true).absmax);
      quantize_span(head, dst + h * s.head_stride, D, p);
      s.scale_cache[block * s.s_block_stride + offset * s.s_slot_stride + h * s.s_head_stride] = p.scale;
    }
  }
}

void write_flash_kernel(const FlashGeometry& g, KvCacheDtype dtype, const at::Tensor& key, const at::Tensor& value,
                        const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                        const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& k_scale_cache,
                        const at::Tensor& v_scale_cache) {
  const bool per_token_head = dtype == KvCacheDtype::kInt8PerTokenHead;
  FlashSide sides[2] = {
      {static_cast<const char*>(key.const_data_ptr()), g.src_token_stride, g.src_head_stride,
       static_cast<char*>(key_cache.data_ptr()), g.k_block_stride, g.k_slot_stride, g.k_head_stride,
       per_token_head ? k_scale_cache.data_ptr<float>() : nullptr, g.ks_block_stride, g.ks_slot_stride,
       g.ks_head_stride, {}},
      {static_cast<const char*>(value.const_data_ptr()), g.src_v_token_stride, g.src_v_head_stride,
       static_cast<char*>(value_cache.data_ptr()), g.v_block_stride, g.v_slot_stride, g.v_head_stride,
       per_token_head ? v_scale_cache.data_ptr<float>() : nullptr, g.vs_block_stride, g.vs_slot_stride,
       g.vs_head_stride, {}}};
  if (dtype == KvCacheDtype::kInt8) {
    sides[0].inv_scale = inverse_scales(k_scale, g.num_heads);
    sides[1].inv_scale = inverse_scales(v_scale, g.num_heads);
  }
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  const int64_t slot_stride = slot_mapping.stride(0);
  MW_DISPATCH_FLOAT_HALF_BF16(key.scalar_type(), "reshape_and_cache_flash", [&] {
    at::parallel_for(0, g.num_tokens, grain_for(2 * g.num_heads * g.head_size), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t slot = slots[t * slot_stride];
        if (slot < 0) continue;
        const int64_t block = slot / g.block_size, offset = slot % g.block_size;
        write_token<scalar_t>(g, dtype, sides[0], t, block, offset);
        write_token<scalar_t>(g, dtype, sides[1], t, block, offset);
      }
    });
  });
}

void write_legacy_kernel(const LegacyGeometry& g, KvCacheDtype dtype, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                         const at::Tensor& k_scale, const at::Tensor& v_scale) {
  const int64_t H = g.num_heads, D = g.head_size, x = g.x, bs = g.block_size;
  std::vector<float> k_inv, v_inv;
  if (dtype == KvCacheDtype::kInt8) {
    k_inv = inverse_scales(k_scale, H);
    v_inv = inverse_scales(v_scale, H);
  }
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  const int64_t slot_stride = slot_mapping.stride(0);
  MW_DISPATCH_FLOAT_HALF_BF16(key.scalar_type(), "reshape_and_cache", [&] {
    const scalar_t* k = key.const_data_ptr<scalar_t>();
    const scalar_t* v = value.const_data_ptr<scalar_t>();
    void* kc = key_cache.data_ptr();
    void* vc = value_cache.data_ptr();
    at::parallel_for(0, g.num_tokens, grain_for(2 * H * D), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t slot = slots[t * slot_stride];
        if (slot < 0) continue;
        const int64_t block = slot / bs, offset = slot % bs;
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* ks = k + t * g.key_token_stride + h * g.key_head_stride;
          const scalar_t* vs = v + t * g.value_token_stride + h * g.value_head_stride;
          const int64_t head_base = (block * H + h) * D;  // in both caches: D elements per (block, head) row
          for (int64_t d = 0; d < D; ++d) {
            const int64_t k_index = ((head_base / x + d / x) * bs + offset) * x + d % x;
            const int64_t v_index = (head_base + d) * bs + offset;
            if (dtype == KvCacheDtype::kAuto) {
              static_cast<scalar_t*>(kc)[k_index] = ks[d];
              static_cast<scalar_t*>(vc)[v_index] = vs[d];
            } else {
              static_cast<int8_t*>(kc)[k_index] =
                  quant::quantize_value(static_cast<float>(ks[d]), {0.0f, k_inv[h], 0});
              static_cast<int8_t*>(vc)[v_index] =
                  quant::quantize_value(static_cast<float>(vs[d]), {0.0f, v_inv[h], 0});
            }
          }
        }
      }
    });
  });
}

// One side (key or value) of a gather.
struct GatherSide {
  const char* cache;
  int64_t block_stride, slot_stride, head_stride;
  const float* scale_cache;
  int64_t s_block_stride, s_slot_stride, s_head_stride;
  std::vector<float> scale;
  char* out;
  int64_t out_token_stride, out_head_stride;
};

template <typename T, typename Cache>
void gather_token(const FlashGeometry& g, KvCacheDtype dtype, const GatherSide& s, int64_t block, int64_t offset,
                  int64_t row) {
  const int64_t H = g.num_heads, D = g.head_size;
  const Cache* src = reinterpret_cast<const Cache*>(s.cache) + block * s.block_stride + offset * s.slot_stride;
  T* dst = reinterpret_cast<T*>(s.out) + row * s.out_token_stride;
  if constexpr (std::is_same_v<Cache, T>) {
    if (s.head_stride == D && s.out_head_stride == D) {
      std::memcpy(dst, src, sizeof(T) * H * D);
    } else {
      for (int64_t h = 0; h < H; ++h) std::memcpy(dst + h * s.out_head_stride, src + h * s.head_stride, sizeof(T) * D);
    }
  } else {
    for (int64_t h = 0; h < H; ++h) {
      const float scale = dtype == KvCacheDtype::kInt8
                              ? s.scale[h]
                              : s.scale_cache[block * s.s_block_stride + offset * s.s_slot_stride + h * s.s_head_stride];
      dequantize_span(src + h * s.head_stride, dst + h * s.out_head_stride, D, scale, 0);
    }
  }
}

void gather_kernel(const FlashGeometry& g, KvCacheDtype dtype, const at::Tensor& key_cache,
                   const at::Tensor& value_cache, const at::Tensor& block_table, const at::Tensor& cu_seq_lens,
                   const at::Tensor& key_out, const at::Tensor& value_out, const at::Tensor& k_scale,
                   const at::Tensor& v_scale, const at::Tensor& k_scale_cache, const at::Tensor& v_scale_cache) {
  const bool per_token_head = dtype == KvCacheDtype::kInt8PerTokenHead;
  GatherSide sides[2] = {
      {static_cast<const char*>(key_cache.const_data_ptr()), g.k_block_stride, g.k_slot_stride, g.k_head_stride,
       per_token_head ? k_scale_cache.const_data_ptr<float>() : nullptr, g.ks_block_stride, g.ks_slot_stride,
       g.ks_head_stride, {}, static_cast<char*>(key_out.data_ptr()), g.src_token_stride, g.src_head_stride},
      {static_cast<const char*>(value_cache.const_data_ptr()), g.v_block_stride, g.v_slot_stride, g.v_head_stride,
       per_token_head ? v_scale_cache.const_data_ptr<float>() : nullptr, g.vs_block_stride, g.vs_slot_stride,
       g.vs_head_stride, {}, static_cast<char*>(value_out.data_ptr()), g.src_v_token_stride, g.src_v_head_stride}};
  if (dtype == KvCacheDtype::kInt8) {
    sides[0].scale = head_scales(k_scale, g.num_heads);
    sides[1].scale = head_scales(v_scale, g.num_heads);
  }
  const int64_t* cu = cu_seq_lens.const_data_ptr<int64_t>();
  const int64_t* table = block_table.const_data_ptr<int64_t>();
  const int64_t num_seqs = cu_seq_lens.size(0) - 1, max_blocks = block_table.size(1), bs = g.block_size;
  // Work items are (sequence, page) pairs; pages_before[s] = pages of sequences < s.
  std::vector<int64_t> pages_before(num_seqs + 1, 0);
  for (int64_t s = 0; s < num_seqs; ++s) pages_before[s + 1] = pages_before[s] + (cu[s + 1] - cu[s] + bs - 1) / bs;
  MW_DISPATCH_FLOAT_HALF_BF16(key_out.scalar_type(), "gather_cache", [&] {
    at::parallel_for(0, pages_before[num_seqs], grain_for(2 * bs * g.num_heads * g.head_size), [&](int64_t begin,
                                                                                                     int64_t end) {
      int64_t seq = std::upper_bound(pages_before.begin(), pages_before.end(), begin) - pages_before.begin() - 1;
      for (int64_t item = begin; item < end; ++item) {
        while (pages_before[seq + 1] <= item) ++seq;
        const int64_t page = item - pages_before[seq];
        const int64_t block = table[seq * max_blocks + page];
        const int64_t first = page * bs, n = std::min(bs, cu[seq + 1] - cu[seq] - first);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t row = cu[seq] + first + j;
          for (const GatherSide& side : sides) {
            if (dtype == KvCacheDtype::kAuto)
              gather_token<scalar_t, scalar_t>(g, dtype, side, block, j, row);
            else
              gather_token<scalar_t, int8_t>(g, dtype, side, block, j, row);
          }
        }
      }
    });
  });
}

}  // namespace

extern const PagedKvCpuKernels kPagedKvCpuKernels{write_flash_kernel, write_legacy_kernel, gather_kernel};

}  // namespace memwarden::ops::CPU_CAPABILITY
