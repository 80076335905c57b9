// CUDA kernels of the paged KV family.
//
// Writes: one thread block per token; "auto" spreads the token's heads over all threads,
// 16 bytes per thread when the rows and both sides are 16-byte aligned; INT8 gives each
// warp a head, quantizes per element with quant::quantize_value, and
// "int8_per_token_head" reduces the head's absmax with warp shuffles first. Gather: one
// thread block per (sequence, page), which sums the lengths of the sequences before it
// (no cumulative-sum tensor to allocate), 16-byte copies or 8-element dequantization per
// thread. copy_blocks: one thread block per (pair) and cache. swap_blocks:
// cudaMemcpyAsync per pair on the current stream.
//
// Index checking: unless switched off (set_cuda_index_checks) or the current stream is
// capturing a CUDA graph, the index tensors and the static INT8 scales are copied to the
// host and checked exactly like on the CPU (small device-to-host copies, which
// synchronise the stream) so bad input raises a Python error before anything is written.
// The kernels also skip every out-of-range slot, block id or row on the device, so even
// unchecked calls never write out of bounds (an unchecked bad scale is used as given).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cfloat>
#include <string>
#include <type_traits>
#include <vector>

#include "core/quant/int8.h"
#include "ops/dispatch.h"
#include "ops/checks.h"
#include "ops/cuda_host_checks.cuh"
#include "ops/paged_kv.h"

namespace memwarden::ops {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 128;        // 4 warps per token (writes)
constexpr int kGatherThreads = 512;  // per page: a few hundred pages must fill the GPU

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

struct FlashSideArgs {
  const void* src;
  int64_t src_token_stride, src_head_stride;
  void* cache;
  int64_t block_stride, slot_stride, head_stride;
  float* scale_cache;
  int64_t s_block_stride, s_slot_stride, s_head_stride;
  const float* scale;  // static int8: 1 or num_heads values
  int scale_per_head;
};

// Elements one thread moves at a time: 16 bytes when vectorized.
template <typename T, bool kVec>
constexpr int kCopyChunk = kVec ? 16 / static_cast<int>(sizeof(T)) : 1;

// A 16-byte chunk, or one element.
template <typename T, bool kVec>
using CopyUnit = std::conditional_t<kVec, uint4, T>;

// Eight elements loaded or stored at once.
template <typename T>
struct alignas(8 * sizeof(T)) Pack8 {
  T v[8];
};

// The whole thread block copies every head of one token ("auto").
template <typename T, bool kVec>
__device__ __forceinline__ void copy_token(const FlashSideArgs& a, int64_t token, int64_t block, int64_t offset,
                                           int num_heads, int head_size) {
  using Unit = CopyUnit<T, kVec>;
  const int chunks = head_size / kCopyChunk<T, kVec>;
  const T* src = static_cast<const T*>(a.src) + token * a.src_token_stride;
  T* dst = static_cast<T*>(a.cache) + block * a.block_stride + offset * a.slot_stride;
  for (int i = threadIdx.x; i < num_heads * chunks; i += blockDim.x) {
    const int h = i / chunks, c = i % chunks;
    reinterpret_cast<Unit*>(dst + h * a.head_stride)[c] = reinterpret_cast<const Unit*>(src + h * a.src_head_stride)[c];
  }
}

// The whole thread block quantizes every head of one token with static scales ("int8"),
// eight elements per thread when vectorized.
template <typename T, bool kVec>
__device__ __forceinline__ void quantize_token_static(const FlashSideArgs& a, int64_t token, int64_t block,
                                                      int64_t offset, int num_heads, int head_size) {
  constexpr int kPer = kVec ? 8 : 1;
  const int chunks = head_size / kPer;
  const T* src = static_cast<const T*>(a.src) + token * a.src_token_stride;
  int8_t* dst = static_cast<int8_t*>(a.cache) + block * a.block_stride + offset * a.slot_stride;
  for (int i = threadIdx.x; i < num_heads * chunks; i += blockDim.x) {
    const int h = i / chunks, c = i % chunks;
    const float s = a.scale[a.scale_per_head ? h : 0];
    const quant::Int8Params params{0.0f, s > 0.0f ? 1.0f / s : 0.0f, 0};
    const T* x = src + h * a.src_head_stride + c * kPer;
    int8_t* q = dst + h * a.head_stride + c * kPer;
    if constexpr (kVec) {
      const Pack8<T> in = *reinterpret_cast<const Pack8<T>*>(x);
      Pack8<int8_t> out;
#pragma unroll
      for (int e = 0; e < 8; ++e) out.v[e] = quant::quantize_value(static_cast<float>(in.v[e]), params);
      *reinterpret_cast<Pack8<int8_t>*>(q) = out;
    } else {
      *q = quant::quantize_value(static_cast<float>(*x), params);
    }
  }
}

// One warp quantizes one head of one token with its own scale ("int8_per_token_head").
template <typename T>
__device__ __forceinline__ void quantize_head_dynamic(const FlashSideArgs& a, int64_t token, int64_t block,
                                                      int64_t offset, int64_t h, int64_t head_size, int lane) {
  const T* src = static_cast<const T*>(a.src) + token * a.src_token_stride + h * a.src_head_stride;
  int8_t* dst = static_cast<int8_t*>(a.cache) + block * a.block_stride + offset * a.slot_stride + h * a.head_stride;
  float absmax = 0.0f;
  for (int64_t i = lane; i < head_size; i += kWarp) {
    const float x = fabsf(static_cast<float>(src[i]));
    if (x <= FLT_MAX) absmax = fmaxf(absmax, x);
  }
  const quant::Int8Params params = quant::symmetric_params(warp_max(absmax));
  if (lane == 0) a.scale_cache[block * a.s_block_stride + offset * a.s_slot_stride + h * a.s_head_stride] = params.scale;
  for (int64_t i = lane; i < head_size; i += kWarp) dst[i] = quant::quantize_value(static_cast<float>(src[i]), params);
}

template <typename T, bool kVec>
__global__ void write_flash_kernel(KvCacheDtype dtype, FlashSideArgs k, FlashSideArgs v,
                                   const int64_t* __restrict__ slots, int64_t slot_stride, int64_t num_slots,
                                   int64_t block_size, int64_t num_heads, int64_t head_size) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slots[token * slot_stride];
  if (slot < 0 || slot >= num_slots) return;  // skipped, or out of range (never written)
  const int64_t block = slot / block_size, offset = slot % block_size;
  if (dtype == KvCacheDtype::kAuto) {
    copy_token<T, kVec>(k, token, block, offset, static_cast<int>(num_heads), static_cast<int>(head_size));
    copy_token<T, kVec>(v, token, block, offset, static_cast<int>(num_heads), static_cast<int>(head_size));
    return;
  }
  if (dtype == KvCacheDtype::kInt8) {
    quantize_token_static<T, kVec>(k, token, block, offset, static_cast<int>(num_heads), static_cast<int>(head_size));
    quantize_token_static<T, kVec>(v, token, block, offset, static_cast<int>(num_heads), static_cast<int>(head_size));
    return;
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int64_t h = warp; h < num_heads; h += kThreads / kWarp) {
    quantize_head_dynamic<T>(k, token, block, offset, h, head_size, lane);
    quantize_head_dynamic<T>(v, token, block, offset, h, head_size, lane);
  }
}

template <typename T>
__global__ void write_legacy_kernel(KvCacheDtype dtype, const T* __restrict__ key, const T* __restrict__ value,
                                    void* key_cache, void* value_cache, const int64_t* __restrict__ slots,
                                    int64_t slot_stride, int64_t num_slots, int64_t key_token_stride,
                                    int64_t key_head_stride, int64_t value_token_stride, int64_t value_head_stride,
                                    const float* k_scale, const float* v_scale, int scale_per_head, int64_t block_size,
                                    int64_t num_heads, int64_t head_size, int64_t x) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slots[token * slot_stride];
  if (slot < 0 || slot >= num_slots) return;
  const int64_t block = slot / block_size, offset = slot % block_size;
  for (int64_t i = threadIdx.x; i < num_heads * head_size; i += blockDim.x) {
    const int64_t h = i / head_size, d = i % head_size;
    const int64_t head_base = (block * num_heads + h) * head_size;
    const int64_t k_index = ((head_base / x + d / x) * block_size + offset) * x + d % x;
    const int64_t v_index = (head_base + d) * block_size + offset;
    const T kx = key[token * key_token_stride + h * key_head_stride + d];
    const T vx = value[token * value_token_stride + h * value_head_stride + d];
    if (dtype == KvCacheDtype::kAuto) {
      static_cast<T*>(key_cache)[k_index] = kx;
      static_cast<T*>(value_cache)[v_index] = vx;
    } else {
      const float ks = k_scale[scale_per_head ? h : 0], vs = v_scale[scale_per_head ? h : 0];
      static_cast<int8_t*>(key_cache)[k_index] =
          quant::quantize_value(static_cast<float>(kx), {0.0f, ks > 0.0f ? 1.0f / ks : 0.0f, 0});
      static_cast<int8_t*>(value_cache)[v_index] =
          quant::quantize_value(static_cast<float>(vx), {0.0f, vs > 0.0f ? 1.0f / vs : 0.0f, 0});
    }
  }
}

struct GatherSideArgs {
  const void* cache;
  int64_t block_stride, slot_stride, head_stride;
  const float* scale_cache;
  int64_t s_block_stride, s_slot_stride, s_head_stride;
  const float* scale;
  int scale_per_head;
  void* out;
  int64_t out_token_stride, out_head_stride;
};

__device__ __forceinline__ int64_t load_index(const void* p, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

// Sum of seq_lens[0, seq) over the thread block (every thread gets it).
__device__ int64_t rows_before(const void* seq_lens, bool is_int64, int64_t seq) {
  __shared__ int64_t warp_sums[kGatherThreads / kWarp];
  int64_t sum = 0;
  for (int64_t i = threadIdx.x; i < seq; i += blockDim.x) sum += load_index(seq_lens, is_int64, i);
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % kWarp == 0) warp_sums[threadIdx.x / kWarp] = sum;
  __syncthreads();
  int64_t total = 0;
#pragma unroll
  for (int w = 0; w < kGatherThreads / kWarp; ++w) total += warp_sums[w];
  return total;
}

// Elements one thread handles at a time: 16 bytes of "auto" cache, or 8 INT8 values.
template <typename T, bool kVec>
__device__ __forceinline__ int gather_chunk(KvCacheDtype dtype) {
  if constexpr (!kVec) return 1;
  return dtype == KvCacheDtype::kAuto ? kCopyChunk<T, true> : 8;
}

// The thread block writes rows [row0, row0 + n) of one side from one page.
template <typename T, bool kVec>
__device__ __forceinline__ void gather_page(KvCacheDtype dtype, const GatherSideArgs& a, int64_t block, int n,
                                            int64_t row0, int64_t out_tokens, int num_heads, int head_size) {
  const int per = gather_chunk<T, kVec>(dtype);
  const int chunks = head_size / per;
  for (int i = threadIdx.x; i < n * num_heads * chunks; i += blockDim.x) {
    const int c = i % chunks, token_head = i / chunks, h = token_head % num_heads, j = token_head / num_heads;
    const int64_t row = row0 + j;
    if (row < 0 || row >= out_tokens) continue;
    T* dst = static_cast<T*>(a.out) + row * a.out_token_stride + h * a.out_head_stride + c * per;
    const int64_t src_index = block * a.block_stride + j * a.slot_stride + h * a.head_stride + c * per;
    if (dtype == KvCacheDtype::kAuto) {
      using Unit = CopyUnit<T, kVec>;
      *reinterpret_cast<Unit*>(dst) = *reinterpret_cast<const Unit*>(static_cast<const T*>(a.cache) + src_index);
      continue;
    }
    const float scale = dtype == KvCacheDtype::kInt8
                            ? a.scale[a.scale_per_head ? h : 0]
                            : a.scale_cache[block * a.s_block_stride + j * a.s_slot_stride + h * a.s_head_stride];
    const int8_t* src = static_cast<const int8_t*>(a.cache) + src_index;
    if constexpr (kVec) {
      const uint2 packed = *reinterpret_cast<const uint2*>(src);
      const int8_t* q = reinterpret_cast<const int8_t*>(&packed);
      Pack8<T> out;
#pragma unroll
      for (int e = 0; e < 8; ++e) out.v[e] = static_cast<T>(static_cast<float>(q[e]) * scale);
      *reinterpret_cast<Pack8<T>*>(dst) = out;
    } else {
      *dst = static_cast<T>(static_cast<float>(*src) * scale);
    }
  }
}

template <typename T, bool kVec>
__global__ void gather_kernel(KvCacheDtype dtype, GatherSideArgs k, GatherSideArgs v, const void* block_table,
                              bool table_int64, int64_t max_blocks, const void* seq_lens, bool lens_int64,
                              int64_t num_blocks, int64_t out_tokens, int64_t block_size, int64_t num_heads,
                              int64_t head_size) {
  const int64_t seq = blockIdx.x, page = blockIdx.y;
  const int64_t len = load_index(seq_lens, lens_int64, seq);
  const int64_t first = page * block_size;
  if (first >= len) return;  // the same for the whole thread block
  const int64_t row0 = rows_before(seq_lens, lens_int64, seq) + first;
  const int64_t block = load_index(block_table, table_int64, seq * max_blocks + page);
  if (block < 0 || block >= num_blocks) return;  // never read out of bounds
  const int n = static_cast<int>(block_size < len - first ? block_size : len - first);
  gather_page<T, kVec>(dtype, k, block, n, row0, out_tokens, static_cast<int>(num_heads), static_cast<int>(head_size));
  gather_page<T, kVec>(dtype, v, block, n, row0, out_tokens, static_cast<int>(num_heads), static_cast<int>(head_size));
}

template <bool kVec>
__global__ void copy_blocks_kernel(char* base, const int64_t* __restrict__ mapping, int64_t num_blocks,
                                   int64_t block_bytes, int64_t block_stride) {
  const int64_t src = mapping[2 * blockIdx.x], dst = mapping[2 * blockIdx.x + 1];
  if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) return;
  const char* from = base + src * block_stride;
  char* to = base + dst * block_stride;
  if constexpr (kVec) {
    for (int64_t i = threadIdx.x; i < block_bytes / 16; i += blockDim.x)
      reinterpret_cast<uint4*>(to)[i] = reinterpret_cast<const uint4*>(from)[i];
  } else {
    for (int64_t i = threadIdx.x; i < block_bytes; i += blockDim.x) to[i] = from[i];
  }
}

FlashSideArgs flash_side(const at::Tensor& src, int64_t ts, int64_t hs, const at::Tensor& cache, int64_t bst,
                         int64_t sst, int64_t hst, const std::optional<at::Tensor>& scale_cache, int64_t sbs,
                         int64_t sss, int64_t shs, const at::Tensor& scale, bool int8_static, int64_t num_heads) {
  return {src.const_data_ptr(),
          ts,
          hs,
          cache.data_ptr(),
          bst,
          sst,
          hst,
          scale_cache && scale_cache->defined() ? scale_cache->data_ptr<float>() : nullptr,
          sbs,
          sss,
          shs,
          int8_static ? scale.const_data_ptr<float>() : nullptr,
          int8_static && scale.numel() == num_heads && num_heads > 1};
}

}  // namespace

void reshape_and_cache_flash_cuda(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                                  c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                                  const at::Tensor& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                                  const std::optional<at::Tensor>& v_scale_cache) {
  const char* op = "reshape_and_cache_flash";
  const KvCacheDtype dtype = parse_kv_cache_dtype(op, kv_cache_dtype);
  const FlashGeometry g = reshape_and_cache_flash_check(key, value, key_cache, value_cache, slot_mapping, dtype,
                                                        k_scale, v_scale, k_scale_cache, v_scale_cache);
  const bool int8_static = dtype == KvCacheDtype::kInt8;
  if (check_on_host()) {
    if (int8_static) check_static_scales_on_host(op, k_scale, v_scale);
    check_slot_values(op, slot_mapping.cpu(), g.num_blocks, g.block_size);
  }
  if (g.num_tokens == 0 || g.num_heads == 0 || g.head_size == 0) return;
  const c10::cuda::CUDAGuard guard(key_cache.device());
  const FlashSideArgs k = flash_side(key, g.src_token_stride, g.src_head_stride, key_cache, g.k_block_stride,
                                     g.k_slot_stride, g.k_head_stride, k_scale_cache, g.ks_block_stride,
                                     g.ks_slot_stride, g.ks_head_stride, k_scale, int8_static, g.num_heads);
  const FlashSideArgs v = flash_side(value, g.src_v_token_stride, g.src_v_head_stride, value_cache, g.v_block_stride,
                                     g.v_slot_stride, g.v_head_stride, v_scale_cache, g.vs_block_stride,
                                     g.vs_slot_stride, g.vs_head_stride, v_scale, int8_static, g.num_heads);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MW_DISPATCH_FLOAT_HALF_BF16(key.scalar_type(), "reshape_and_cache_flash", [&] {
    // Vector width: 16 bytes of "auto" rows, or 8 elements quantized to 8 bytes ("int8").
    const int64_t es = sizeof(scalar_t), cache_es = dtype == KvCacheDtype::kAuto ? es : 1;
    const int64_t per = dtype == KvCacheDtype::kAuto ? 16 / es : 8;
    bool vec = dtype != KvCacheDtype::kInt8PerTokenHead && g.head_size % per == 0;
    for (const FlashSideArgs* a : {&k, &v}) {
      vec = vec && reinterpret_cast<uintptr_t>(a->src) % (per * es) == 0 &&
            reinterpret_cast<uintptr_t>(a->cache) % (per * cache_es) == 0 && a->src_token_stride % per == 0 &&
            a->src_head_stride % per == 0 && a->block_stride % per == 0 && a->slot_stride % per == 0 &&
            a->head_stride % per == 0;
    }
    const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
    const int64_t num_slots = g.num_blocks * g.block_size;
    if (vec) {
      write_flash_kernel<scalar_t, true><<<g.num_tokens, kThreads, 0, stream>>>(
          dtype, k, v, slots, slot_mapping.stride(0), num_slots, g.block_size, g.num_heads, g.head_size);
    } else {
      write_flash_kernel<scalar_t, false><<<g.num_tokens, kThreads, 0, stream>>>(
          dtype, k, v, slots, slot_mapping.stride(0), num_slots, g.block_size, g.num_heads, g.head_size);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void reshape_and_cache_cuda(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                            c10::string_view kv_cache_dtype, const at::Tensor& k_scale, const at::Tensor& v_scale) {
  const char* op = "reshape_and_cache";
  const KvCacheDtype dtype = parse_kv_cache_dtype(op, kv_cache_dtype);
  const LegacyGeometry g =
      reshape_and_cache_check(key, value, key_cache, value_cache, slot_mapping, dtype, k_scale, v_scale);
  const bool int8 = dtype == KvCacheDtype::kInt8;
  if (check_on_host()) {
    if (int8) check_static_scales_on_host(op, k_scale, v_scale);
    check_slot_values(op, slot_mapping.cpu(), g.num_blocks, g.block_size);
  }
  if (g.num_tokens == 0 || g.num_heads == 0 || g.head_size == 0) return;
  const c10::cuda::CUDAGuard guard(key_cache.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MW_DISPATCH_FLOAT_HALF_BF16(key.scalar_type(), "reshape_and_cache", [&] {
    const int threads = static_cast<int>(std::min<int64_t>(512, ((g.num_heads * g.head_size + 31) / 32) * 32));
    write_legacy_kernel<scalar_t><<<g.num_tokens, threads, 0, stream>>>(
        dtype, key.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(), key_cache.data_ptr(),
        value_cache.data_ptr(), slot_mapping.const_data_ptr<int64_t>(), slot_mapping.stride(0),
        g.num_blocks * g.block_size, g.key_token_stride, g.key_head_stride, g.value_token_stride,
        g.value_head_stride, int8 ? k_scale.const_data_ptr<float>() : nullptr,
        int8 ? v_scale.const_data_ptr<float>() : nullptr, int8 && g.per_head_scale, g.block_size, g.num_heads,
        g.head_size, g.x);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void copy_blocks_cuda(at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping) {
  const char* op = "copy_blocks";
  copy_blocks_check(key_caches, value_caches, block_mapping);
  if (key_caches.empty() || block_mapping.size(0) == 0) return;
  const at::Tensor& first = key_caches[0];
  TORCH_CHECK_VALUE(first.is_cuda(), std::string(op) + ": the caches must be CUDA tensors");
  const int64_t num_blocks = first.size(0);
  if (block_mapping.is_cpu() || check_on_host()) {
    const at::Tensor host = block_mapping.cpu().contiguous();
    check_block_mapping_values(op, host, num_blocks, num_blocks);
    check_block_pairs_independent(op, host, num_blocks, /*same_storage=*/true);
  }
  const c10::cuda::CUDAGuard guard(first.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor mapping = block_mapping.to(first.device(), /*non_blocking=*/true).contiguous();
  const int64_t n = mapping.size(0);
  for (const at::TensorList& list : {key_caches, value_caches}) {
    for (const at::Tensor& cache : list) {
      const BlockBytes b = block_bytes(op, "cache", cache);
      char* base = static_cast<char*>(cache.data_ptr());
      const bool vec = b.bytes % 16 == 0 && b.stride % 16 == 0 && aligned16(base);
      if (vec)
        copy_blocks_kernel<true><<<n, 256, 0, stream>>>(base, mapping.const_data_ptr<int64_t>(), num_blocks, b.bytes,
                                                       b.stride);
      else
        copy_blocks_kernel<false><<<n, 256, 0, stream>>>(base, mapping.const_data_ptr<int64_t>(), num_blocks,
                                                        b.bytes, b.stride);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

void swap_blocks_cuda(const at::Tensor& src, const at::Tensor& dst, int64_t block_size_in_bytes,
                      const at::Tensor& block_mapping) {
  const char* op = "swap_blocks";
  swap_blocks_check(src, dst, block_size_in_bytes, block_mapping);
  const int64_t n = block_mapping.size(0);
  if (n == 0 || block_size_in_bytes == 0) return;
  const at::Tensor mapping = block_mapping.contiguous();
  check_block_mapping_values(op, mapping, src.size(0), dst.size(0));
  check_block_pairs_independent(op, mapping, dst.size(0), src.is_alias_of(dst));
  const BlockBytes s = block_bytes(op, "src", src), d = block_bytes(op, "dst", dst);
  const at::Device device = src.is_cuda() ? src.device() : dst.device();
  const c10::cuda::CUDAGuard guard(device);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const char* src_base = static_cast<const char*>(src.const_data_ptr());
  char* dst_base = static_cast<char*>(dst.data_ptr());
  const int64_t* m = mapping.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    C10_CUDA_CHECK(cudaMemcpyAsync(dst_base + m[2 * i + 1] * d.stride, src_base + m[2 * i] * s.stride,
                                   block_size_in_bytes, cudaMemcpyDefault, stream));
  }
}

void gather_cache_cuda(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_table,
                       const at::Tensor& seq_lens, const at::Tensor& key_out, const at::Tensor& value_out,
                       c10::string_view kv_cache_dtype, const std::optional<at::Tensor>& k_scale,
                       const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                       const std::optional<at::Tensor>& v_scale_cache) {
  const char* op = "gather_cache";
  const KvCacheDtype dtype = parse_kv_cache_dtype(op, kv_cache_dtype);
  const FlashGeometry g = gather_cache_check(key_cache, value_cache, block_table, seq_lens, key_out, value_out, dtype,
                                             k_scale, v_scale, k_scale_cache, v_scale_cache);
  const bool int8_static = dtype == KvCacheDtype::kInt8;
  if (check_on_host()) {
    if (int8_static) check_static_scales_on_host(op, *k_scale, *v_scale);
    check_gather_values(block_table.cpu(), seq_lens.cpu(), g.num_blocks, g.block_size, g.num_tokens);
  }
  const int64_t num_seqs = block_table.size(0), max_blocks = block_table.size(1);
  if (g.num_tokens == 0 || num_seqs == 0 || max_blocks == 0 || g.num_heads == 0 || g.head_size == 0) return;
  const c10::cuda::CUDAGuard guard(key_cache.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor table = block_table.contiguous();
  const at::Tensor lens = seq_lens.contiguous();
  const bool per_token = dtype == KvCacheDtype::kInt8PerTokenHead;
  const auto side = [&](const at::Tensor& cache, int64_t bst, int64_t sst, int64_t hst,
                        const std::optional<at::Tensor>& scale_cache, int64_t sbs, int64_t sss, int64_t shs,
                        const std::optional<at::Tensor>& scale, const at::Tensor& out, int64_t ots, int64_t ohs) {
    return GatherSideArgs{cache.const_data_ptr(),
                          bst,
                          sst,
                          hst,
                          per_token ? scale_cache->const_data_ptr<float>() : nullptr,
                          sbs,
                          sss,
                          shs,
                          int8_static ? scale->const_data_ptr<float>() : nullptr,
                          int8_static && g.per_head_scale,
                          out.data_ptr(),
                          ots,
                          ohs};
  };
  const GatherSideArgs k = side(key_cache, g.k_block_stride, g.k_slot_stride, g.k_head_stride, k_scale_cache,
                                g.ks_block_stride, g.ks_slot_stride, g.ks_head_stride, k_scale, key_out,
                                g.src_token_stride, g.src_head_stride);
  const GatherSideArgs v = side(value_cache, g.v_block_stride, g.v_slot_stride, g.v_head_stride, v_scale_cache,
                                g.vs_block_stride, g.vs_slot_stride, g.vs_head_stride, v_scale, value_out,
                                g.src_v_token_stride, g.src_v_head_stride);
  TORCH_CHECK_VALUE(max_blocks <= 65535, std::string(op) + ": block_table may have at most 65535 columns on CUDA");
  const dim3 grid(static_cast<unsigned>(num_seqs), static_cast<unsigned>(max_blocks));
  MW_DISPATCH_FLOAT_HALF_BF16(key_out.scalar_type(), "gather_cache", [&] {
    // Vector width: 16 bytes of the cache ("auto") or 8 INT8 values per thread.
    const int64_t es = sizeof(scalar_t), cache_es = dtype == KvCacheDtype::kAuto ? es : 1;
    const int64_t cache_align = dtype == KvCacheDtype::kAuto ? 16 : 8, out_align = dtype == KvCacheDtype::kAuto ? 16 : 8 * es;
    bool vec = (g.head_size * cache_es) % cache_align == 0;
    for (const GatherSideArgs* a : {&k, &v}) {
      vec = vec && reinterpret_cast<uintptr_t>(a->cache) % cache_align == 0 &&
            reinterpret_cast<uintptr_t>(a->out) % out_align == 0;
      for (int64_t stride : {a->block_stride, a->slot_stride, a->head_stride})
        vec = vec && (stride * cache_es) % cache_align == 0;
      for (int64_t stride : {a->out_token_stride, a->out_head_stride}) vec = vec && (stride * es) % out_align == 0;
    }
    const auto kernel = vec ? gather_kernel<scalar_t, true> : gather_kernel<scalar_t, false>;
    kernel<<<grid, kGatherThreads, 0, stream>>>(dtype, k, v, table.const_data_ptr(), table.scalar_type() == at::kLong,
                                          max_blocks, lens.const_data_ptr(), lens.scalar_type() == at::kLong,
                                          g.num_blocks, g.num_tokens, g.block_size, g.num_heads, g.head_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace memwarden::ops
