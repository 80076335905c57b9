// CUDA kernels of the paged attention family (semantics: paged_attention.h; reference:
// the CPU kernel in paged_attention_vec.cpp).
//
// Split-K ("flash-decoding"): one thread block per (query token, kv head, partition of
// kPartition keys), partitions = ceil(max_blocks * block_size / kPartition) from the
// shapes alone, so the launch never depends on index values (CUDA-graph capturable).
// A thread block serves every query head of its kv head's group: the group's heads are
// split into passes of at most kMaxRowWarps heads, one warp per head, and each tile of
// kTile keys is staged once per pass into shared memory as fp32 (INT8 dequantized on the
// way, 16-byte loads when the cache allows), so every K/V element is read from global
// memory once per group of up to kMaxRowWarps heads. Within a warp lane j scores key j
// of the tile (conflict-free float4 reads of a padded row) and each lane owns the output
// dims lane + 32 i, kept in registers, for the value accumulation; the softmax is online
// in fp32. The partial results (max, denominator, unnormalised output) go to a float32
// workspace merged by log-sum-exp per (token, head) in a second kernel, which also adds
// the sinks; with a single partition the first kernel finishes the rows itself.
// Head sizes above kMaxRegisterDims (or tiles that would not fit in shared memory) take a
// slow but general path: keys and queries read straight from global memory, the
// accumulator kept in the workspace.
//
// Index checking: as for the paged KV family (cuda_host_checks.cuh). The kernels treat
// block ids outside [0, num_blocks) as masked keys and clamp every key range to the block
// table, so unchecked calls never read out of bounds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>

#include "ops/cuda_host_checks.cuh"
#include "ops/dispatch.h"
#include "ops/paged_attention.h"

namespace memwarden::ops {
namespace {

constexpr int kWarp = 32;
constexpr int64_t kPartition = 512;  // keys of one split-K partition
constexpr int kTile = kWarp;         // keys staged at a time: one per lane when scoring
constexpr int kMaxRowWarps = 8;      // query heads served at once by one thread block
constexpr int kMinWarps = 4;         // warps staging the tiles, even for small groups
constexpr int kMaxRegisterDims = 512;
constexpr int kMergeWarps = 4;  // (token, head) rows per merge thread block
constexpr int kDefaultSharedBytes = 48 * 1024;

// Everything the attention kernel reads; passed by value.
struct AttentionArgs {
  const void* query;
  int64_t q_token_stride, q_head_stride;
  const void* k_cache;
  const void* v_cache;
  int64_t k_block_stride, k_slot_stride, k_head_stride;
  int64_t v_block_stride, v_slot_stride, v_head_stride;
  const float* k_scale_cache;  // int8_per_token_head
  const float* v_scale_cache;
  int64_t ks_block_stride, ks_slot_stride, ks_head_stride;
  int64_t vs_block_stride, vs_slot_stride, vs_head_stride;
  const float* k_scale;  // static int8: 1 or num_kv_heads values
  const float* v_scale;
  bool scale_per_head, per_token_scale;
  const void* block_table;  // contiguous [num_seqs, max_blocks]
  const void* seq_lens;
  const void* query_start;  // null: one query token per sequence
  const void* kv_start;     // null: every context starts at 0
  bool table_long, lens_long, starts_long, kv_start_long;
  const float* sinks;  // float32 [num_heads] or null
  int64_t num_seqs, max_blocks, num_blocks, block_size, num_heads, group, head_size;
  float scale, softcap;
  int64_t sliding_window;
  bool causal;
  bool vec;  // 16-byte cache loads
  int row_warps, passes;
  int64_t partitions;
  bool direct;  // one partition: write out and lse here, no workspace
  void* out;
  float* lse;
  float* ws_max;  // [num_tokens, num_heads, partitions]
  float* ws_sum;
  float* ws_acc;  // [num_tokens, num_heads, partitions, head_size]
};

__device__ __forceinline__ int64_t load_index(const void* p, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Row stride of a staged tile in floats: a multiple of 4 (float4 reads) whose float4
// count is odd, so the 8 lanes of a quarter warp reading 8 rows hit distinct banks.
__host__ __device__ __forceinline__ int64_t tile_row_stride(int64_t head_size) {
  const int64_t d4 = (head_size + 3) / 4 * 4;
  return (d4 / 4) % 2 == 0 ? d4 + 4 : d4 + 8;
}

__host__ __device__ __forceinline__ int64_t padded_dims(int64_t head_size) { return (head_size + 3) / 4 * 4; }

// The cache block holding key position t of the sequence, or -1 (masked) when the block
// table names a block outside the cache.
__device__ __forceinline__ int64_t key_block(const AttentionArgs& a, int64_t seq, int64_t t) {
  const int64_t block = load_index(a.block_table, a.table_long, seq * a.max_blocks + t / a.block_size);
  return block >= 0 && block < a.num_blocks ? block : -1;
}

// Dequantization scale of one cached row (1 for "auto").
template <typename C>
__device__ __forceinline__ float row_scale(const AttentionArgs& a, bool key, int64_t kv_head, int64_t block,
                                           int64_t slot) {
  if constexpr (!std::is_same_v<C, int8_t>) {
    return 1.0f;
  } else if (a.per_token_scale) {
    return key ? a.k_scale_cache[block * a.ks_block_stride + slot * a.ks_slot_stride + kv_head * a.ks_head_stride]
               : a.v_scale_cache[block * a.vs_block_stride + slot * a.vs_slot_stride + kv_head * a.vs_head_stride];
  } else {
    const int64_t i = a.scale_per_head ? kv_head : 0;
    return key ? a.k_scale[i] : a.v_scale[i];
  }
}

// Normalisation of one finished row, sinks joining the denominator with no value:
// returns the factor for the accumulator and writes the row's lse.
__device__ __forceinline__ float finish_row(float max, float sum, const float* sink, float* lse) {
  if (sink != nullptr) {
    const float new_max = fmaxf(max, *sink);
    const float alpha = expf(max - new_max);
    sum = sum * alpha + expf(*sink - new_max);
    *lse = new_max + logf(sum);
    return alpha / sum;
  }
  if (sum == 0.0f) {
    *lse = -INFINITY;
    return 0.0f;
  }
  *lse = max + logf(sum);
  return 1.0f / sum;
}

// 16 bytes of cache elements, loaded at once (and kept in registers, unlike a reinterpreted
// uint4 whose address is taken).
template <typename C>
struct alignas(16) Chunk16 {
  C v[16 / sizeof(C)];
};

// Stages the K or V rows of keys tile_begin .. tile_begin + n into shared memory as fp32
// (dequantized); rows of masked keys and the tile's tail become zeros, so their zero
// softmax weights never meet garbage (0 * NaN).
template <typename C>
__device__ __forceinline__ void stage_tile(const AttentionArgs& a, bool key, int64_t seq, int64_t kv_head,
                                           int64_t tile_begin, int n, float* dst, int64_t row_stride) {
  const C* cache = static_cast<const C*>(key ? a.k_cache : a.v_cache);
  const int64_t block_stride = key ? a.k_block_stride : a.v_block_stride;
  const int64_t slot_stride = key ? a.k_slot_stride : a.v_slot_stride;
  const int64_t head_stride = key ? a.k_head_stride : a.v_head_stride;
  const int D = static_cast<int>(a.head_size);
  constexpr int kPer = 16 / static_cast<int>(sizeof(C));
  const int per = a.vec ? kPer : 1;
  const int chunks = (D + per - 1) / per;
  for (int i = threadIdx.x; i < kTile * chunks; i += blockDim.x) {
    const int j = i / chunks, c = i % chunks;
    float* row = dst + j * row_stride + c * per;
    const int64_t block = j < n ? key_block(a, seq, tile_begin + j) : -1;
    if (block < 0) {
      for (int e = 0; e < per && c * per + e < D; ++e) row[e] = 0.0f;
      continue;
    }
    const int64_t slot = (tile_begin + j) % a.block_size;
    const float s = row_scale<C>(a, key, kv_head, block, slot);
    const C* src = cache + block * block_stride + slot * slot_stride + kv_head * head_stride + c * per;
    if (a.vec) {
      const Chunk16<C> chunk = *reinterpret_cast<const Chunk16<C>*>(src);
#pragma unroll
      for (int e = 0; e < kPer; ++e) row[e] = static_cast<float>(chunk.v[e]) * s;
    } else {
      row[0] = static_cast<float>(src[0]) * s;
    }
  }
}

// Main kernel: kDims > 0 keeps each lane's kDims output dims in registers and stages the
// tiles in shared memory; kDims == 0 is the general path (global memory throughout).
// At least two thread blocks per SM: room for the ~100 registers it needs without spills
// (left alone, ptxas caps it near 64 and spills).
template <typename T, typename C, int kDims>
__global__ void __launch_bounds__(kMaxRowWarps * kWarp, 2)
    paged_attention_kernel(const AttentionArgs a) {
  extern __shared__ float4 shared_raw[];
  __shared__ float weights[kMaxRowWarps][kTile];  // general path: the tile's softmax weights
  float* shared = reinterpret_cast<float*>(shared_raw);
  const int64_t token = blockIdx.x, kv_head = blockIdx.y, part = blockIdx.z;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t D = a.head_size;

  // The token's sequence and the keys it sees, clamped to the block table.
  int64_t seq = token, q_index = 0, q_len = 1;
  bool valid = a.num_seqs > 0;
  if (a.query_start != nullptr && valid) {
    int64_t lo_seq = 0, hi_seq = a.num_seqs;  // last sequence starting at or before token
    while (hi_seq - lo_seq > 1) {
      const int64_t mid = (lo_seq + hi_seq) / 2;
      if (load_index(a.query_start, a.starts_long, mid) <= token) lo_seq = mid;
      else hi_seq = mid;
    }
    seq = lo_seq;
    const int64_t first = load_index(a.query_start, a.starts_long, seq);
    q_len = load_index(a.query_start, a.starts_long, seq + 1) - first;
    q_index = token - first;
    valid = q_index >= 0 && q_index < q_len;
  }
  int64_t begin = 0, end = 0;
  if (valid) {
    const int64_t seq_len = load_index(a.seq_lens, a.lens_long, seq);
    const int64_t pos = a.causal ? seq_len - q_len + q_index : seq_len - 1;
    int64_t lo = a.kv_start != nullptr ? load_index(a.kv_start, a.kv_start_long, seq) : 0;
    const int64_t hi = a.causal ? pos + 1 : seq_len;
    if (a.sliding_window > 0) lo = std::max(lo, pos - a.sliding_window + 1);
    begin = std::max(std::max(lo, int64_t{0}), part * kPartition);
    end = std::min(std::min(hi, a.max_blocks * a.block_size), (part + 1) * kPartition);
  }
  const bool empty = begin >= end;  // the same for the whole thread block

  const int64_t d4 = padded_dims(D), row_stride = tile_row_stride(D);
  float* k_tile = shared;
  float* v_tile = k_tile + kTile * row_stride;
  float* q_rows = v_tile + kTile * row_stride;  // [row_warps][d4], scaled by a.scale
  if constexpr (kDims > 0) {
    // The keys' padding dims are read by the float4 dot products and never written.
    for (int64_t i = threadIdx.x; i < kTile * (d4 - D); i += blockDim.x)
      k_tile[(i / (d4 - D)) * row_stride + D + i % (d4 - D)] = 0.0f;
  }
  const T* query = static_cast<const T*>(a.query) + token * a.q_token_stride;

  for (int pass = 0; pass < a.passes; ++pass) {
    const int64_t head_row = static_cast<int64_t>(pass) * a.row_warps + warp;
    const bool row_active = warp < a.row_warps && head_row < a.group;  // the same for the whole warp
    const int64_t head = kv_head * a.group + head_row;
    const int64_t out_row = token * a.num_heads + head;
    float row_max = -INFINITY, row_sum = 0.0f;
    float acc[kDims > 0 ? kDims : 1];
#pragma unroll
    for (int i = 0; i < (kDims > 0 ? kDims : 1); ++i) acc[i] = 0.0f;
    float* ws_acc = a.direct ? nullptr : a.ws_acc + (out_row * a.partitions + part) * D;

    if (!empty) {
      if constexpr (kDims > 0) {
        __syncthreads();  // the previous pass is done with q_rows and the tiles
        for (int64_t i = threadIdx.x; i < a.row_warps * d4; i += blockDim.x) {
          const int64_t r = i / d4, d = i % d4, h = static_cast<int64_t>(pass) * a.row_warps + r;
          q_rows[i] = d < D && h < a.group
                          ? static_cast<float>(query[(kv_head * a.group + h) * a.q_head_stride + d]) * a.scale
                          : 0.0f;
        }
      }
      for (int64_t tile_begin = begin; tile_begin < end; tile_begin += kTile) {
        const int n = static_cast<int>(std::min<int64_t>(kTile, end - tile_begin));
        if constexpr (kDims > 0) {
          __syncthreads();  // the previous tile is consumed (and q_rows written)
          stage_tile<C>(a, true, seq, kv_head, tile_begin, n, k_tile, row_stride);
          stage_tile<C>(a, false, seq, kv_head, tile_begin, n, v_tile, row_stride);
          __syncthreads();
        }
        if (!row_active) continue;
        // Lane j scores key tile_begin + j.
        const int64_t t = tile_begin + lane;
        const int64_t block = lane < n ? key_block(a, seq, t) : -1;
        float score = -INFINITY;
        if (block >= 0) {
          float dot = 0.0f;
          if constexpr (kDims > 0) {
            const float4* q4 = reinterpret_cast<const float4*>(q_rows + warp * d4);
            const float4* k4 = reinterpret_cast<const float4*>(k_tile + lane * row_stride);
            for (int64_t i = 0; i < d4 / 4; ++i) {
              const float4 q = q4[i], k = k4[i];
              dot = fmaf(q.x, k.x, fmaf(q.y, k.y, fmaf(q.z, k.z, fmaf(q.w, k.w, dot))));
            }
          } else {
            const int64_t slot = t % a.block_size;
            const C* k = static_cast<const C*>(a.k_cache) + block * a.k_block_stride + slot * a.k_slot_stride +
                         kv_head * a.k_head_stride;
            const T* q = query + head * a.q_head_stride;
            for (int64_t d = 0; d < D; ++d) dot = fmaf(static_cast<float>(q[d]), static_cast<float>(k[d]), dot);
            dot *= row_scale<C>(a, true, kv_head, block, slot) * a.scale;
          }
          score = a.softcap > 0.0f ? a.softcap * tanhf(dot / a.softcap) : dot;
        }
        const float tile_max = warp_max(score);
        if (tile_max == -INFINITY) continue;  // no key of the tile is visible (warp-uniform)
        const float new_max = fmaxf(row_max, tile_max);
        const float alpha = expf(row_max - new_max);  // 0 while the row saw nothing
        const float p = expf(score - new_max);        // 0 for masked keys
        row_sum = row_sum * alpha + warp_sum(p);
        if constexpr (kDims > 0) {
#pragma unroll
          for (int i = 0; i < kDims; ++i) acc[i] *= alpha;
          for (int j = 0; j < n; ++j) {
            const float pj = __shfl_sync(0xffffffffu, p, j);
            const float* v = v_tile + j * row_stride;
#pragma unroll
            for (int i = 0; i < kDims; ++i) {
              const int64_t d = lane + i * kWarp;
              if (d < D) acc[i] = fmaf(pj, v[d], acc[i]);
            }
          }
        } else {
          weights[warp][lane] = p;
          __syncwarp();
          const bool first = row_max == -INFINITY;  // the workspace holds nothing yet
          for (int64_t d = lane; d < D; d += kWarp) {
            float x = first ? 0.0f : ws_acc[d] * alpha;
            for (int j = 0; j < n; ++j) {
              const float pj = weights[warp][j];
              if (pj == 0.0f) continue;
              const int64_t key_t = tile_begin + j, b = key_block(a, seq, key_t), slot = key_t % a.block_size;
              const C* v = static_cast<const C*>(a.v_cache) + b * a.v_block_stride + slot * a.v_slot_stride +
                           kv_head * a.v_head_stride;
              x = fmaf(pj * row_scale<C>(a, false, kv_head, b, slot), static_cast<float>(v[d]), x);
            }
            ws_acc[d] = x;
          }
          __syncwarp();  // weights are read before the next tile overwrites them
        }
        row_max = new_max;
      }
    }

    if (!row_active) continue;
    if (a.direct) {
      float lse = 0.0f;
      const float factor = finish_row(row_max, row_sum, a.sinks ? a.sinks + head : nullptr, &lse);
      T* out = static_cast<T*>(a.out) + out_row * D;
      if constexpr (kDims > 0) {
#pragma unroll
        for (int i = 0; i < kDims; ++i) {
          const int64_t d = lane + i * kWarp;
          if (d < D) out[d] = static_cast<T>(acc[i] * factor);
        }
      }
      if (lane == 0) a.lse[out_row] = lse;
    } else {
      const int64_t index = out_row * a.partitions + part;
      if (lane == 0) {
        a.ws_max[index] = row_max;
        a.ws_sum[index] = row_sum;
      }
      if constexpr (kDims > 0) {
        if (row_max != -INFINITY) {  // the merge skips partitions that saw no key
#pragma unroll
          for (int i = 0; i < kDims; ++i) {
            const int64_t d = lane + i * kWarp;
            if (d < D) ws_acc[d] = acc[i];
          }
        }
      }
    }
  }
}

// One warp per (token, head): log-sum-exp merge of the partitions, sinks, out and lse.
template <typename T>
__global__ void __launch_bounds__(kMergeWarps * kWarp)
    merge_partitions_kernel(const float* __restrict__ ws_max, const float* __restrict__ ws_sum,
                            const float* __restrict__ ws_acc, const float* __restrict__ sinks, T* __restrict__ out,
                            float* __restrict__ lse, int64_t rows, int64_t num_heads, int64_t partitions,
                            int64_t head_size) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // the same for the whole warp
  const float* maxes = ws_max + row * partitions;
  const float* sums = ws_sum + row * partitions;
  float merged_max = -INFINITY;
  for (int64_t p = lane; p < partitions; p += kWarp) merged_max = fmaxf(merged_max, maxes[p]);
  merged_max = warp_max(merged_max);
  const bool seen = merged_max != -INFINITY;  // the partitions that saw no key hold no output
  float sum = 0.0f;
  for (int64_t p = lane; seen && p < partitions; p += kWarp)
    if (maxes[p] != -INFINITY) sum += sums[p] * expf(maxes[p] - merged_max);
  sum = warp_sum(sum);
  float row_lse = 0.0f;
  const float factor = finish_row(merged_max, sum, sinks ? sinks + row % num_heads : nullptr, &row_lse);
  const float* acc = ws_acc + row * partitions * head_size;
  for (int64_t d = lane; d < head_size; d += kWarp) {
    float x = 0.0f;
    for (int64_t p = 0; seen && p < partitions; ++p)
      if (maxes[p] != -INFINITY) x = fmaf(acc[p * head_size + d], expf(maxes[p] - merged_max), x);
    out[row * head_size + d] = static_cast<T>(x * factor);
  }
  if (lane == 0) lse[row] = row_lse;
}

template <typename T, typename C, int kDims>
void launch_attention(const AttentionArgs& a, dim3 grid, int threads, int64_t shared_bytes, cudaStream_t stream) {
  const auto kernel = paged_attention_kernel<T, C, kDims>;
  if (shared_bytes > kDefaultSharedBytes)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
  kernel<<<grid, threads, static_cast<size_t>(shared_bytes), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Output dims per lane kept in registers for head_size (0: the general path).
int register_dims(int64_t head_size) {
  if (head_size <= 64) return 2;
  if (head_size <= 128) return 4;
  if (head_size <= 256) return 8;
  if (head_size <= kMaxRegisterDims) return 16;
  return 0;
}

template <typename T, typename C>
void run_attention(AttentionArgs a, int64_t num_tokens, int64_t num_kv_heads, const at::TensorOptions& float_options,
                   cudaStream_t stream) {
  // Vector staging: 16 bytes of cache per load when the rows and strides allow it.
  constexpr int64_t per = 16 / sizeof(C);
  a.vec = a.head_size % per == 0 && reinterpret_cast<uintptr_t>(a.k_cache) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(a.v_cache) % 16 == 0;
  for (int64_t stride : {a.k_block_stride, a.k_slot_stride, a.k_head_stride, a.v_block_stride, a.v_slot_stride,
                         a.v_head_stride})
    a.vec = a.vec && stride % per == 0;

  int dims = register_dims(a.head_size);
  const int64_t row_stride = tile_row_stride(a.head_size);
  const int64_t shared_bytes =
      static_cast<int64_t>(sizeof(float)) * (2 * kTile * row_stride + a.row_warps * padded_dims(a.head_size));
  const int64_t static_bytes = static_cast<int64_t>(sizeof(float)) * kMaxRowWarps * kTile;  // the weights
  int shared_limit = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
  if (shared_bytes + static_bytes > shared_limit) dims = 0;
  if (dims == 0) a.direct = false;  // the general path accumulates in the workspace

  const at::Tensor workspace =
      a.direct ? at::Tensor()
               : at::empty({num_tokens * a.num_heads * a.partitions * (a.head_size + 2)}, float_options);
  if (!a.direct) {
    const int64_t rows = num_tokens * a.num_heads;
    a.ws_max = workspace.data_ptr<float>();
    a.ws_sum = a.ws_max + rows * a.partitions;
    a.ws_acc = a.ws_sum + rows * a.partitions;
  }

  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(num_kv_heads),
                  static_cast<unsigned>(a.partitions));
  const int threads = std::max(a.row_warps, kMinWarps) * kWarp;
  switch (dims) {
    case 2: launch_attention<T, C, 2>(a, grid, threads, shared_bytes, stream); break;
    case 4: launch_attention<T, C, 4>(a, grid, threads, shared_bytes, stream); break;
    case 8: launch_attention<T, C, 8>(a, grid, threads, shared_bytes, stream); break;
    case 16: launch_attention<T, C, 16>(a, grid, threads, shared_bytes, stream); break;
    default: launch_attention<T, C, 0>(a, grid, threads, 0, stream); break;
  }
  if (a.direct) return;
  const int64_t rows = num_tokens * a.num_heads;
  merge_partitions_kernel<T><<<static_cast<unsigned>((rows + kMergeWarps - 1) / kMergeWarps), kMergeWarps * kWarp,
                               0, stream>>>(a.ws_max, a.ws_sum, a.ws_acc, a.sinks, static_cast<T*>(a.out), a.lse,
                                            rows, a.num_heads, a.partitions, a.head_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> paged_attention_cuda(
    const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale,
    const std::optional<at::Tensor>& query_start_loc, c10::string_view kv_cache_dtype,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    const std::optional<at::Tensor>& k_scale_cache, const std::optional<at::Tensor>& v_scale_cache,
    int64_t sliding_window, double softcap, const std::optional<at::Tensor>& sinks,
    const std::optional<at::Tensor>& kv_start, bool causal) {
  const char* op = "paged_attention";
  const KvCacheDtype dtype = parse_kv_cache_dtype(op, kv_cache_dtype);
  const PagedAttentionGeometry g =
      paged_attention_check(query, key_cache, value_cache, block_tables, seq_lens, scale, query_start_loc, dtype,
                            k_scale, v_scale, k_scale_cache, v_scale_cache, sliding_window, softcap, sinks, kv_start,
                            causal);
  const bool int8_static = dtype == KvCacheDtype::kInt8;
  if (check_on_host()) {
    if (int8_static) check_static_scales_on_host(op, *k_scale, *v_scale);
    const at::Tensor starts_cpu = query_start_loc.has_value() ? query_start_loc->cpu() : at::Tensor();
    const at::Tensor kv_start_cpu = kv_start.has_value() ? kv_start->cpu() : at::Tensor();
    check_paged_attention_values(g, block_tables.cpu(), seq_lens.cpu(),
                                 query_start_loc.has_value() ? &starts_cpu : nullptr,
                                 kv_start.has_value() ? &kv_start_cpu : nullptr);
  }
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = at::empty(query.sizes(), query.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({g.num_tokens, g.num_heads}, query.options().dtype(at::kFloat));
  if (g.num_tokens == 0 || g.num_heads == 0) return {out, lse};

  const FlashGeometry& cg = g.cache;
  const int64_t max_context = g.max_blocks * cg.block_size;
  const int64_t partitions = std::max<int64_t>(1, (max_context + kPartition - 1) / kPartition);
  TORCH_CHECK_VALUE(partitions <= 65535, std::string(op) + ": block_tables may cover at most " +
                                             std::to_string(65535 * kPartition) + " tokens on CUDA, got " +
                                             std::to_string(max_context));
  TORCH_CHECK_VALUE(cg.num_heads <= 65535, std::string(op) + ": at most 65535 kv heads on CUDA, got " +
                                               std::to_string(cg.num_heads));
  TORCH_CHECK_VALUE(g.num_tokens <= INT32_MAX, std::string(op) + ": at most " + std::to_string(INT32_MAX) +
                                                   " query tokens on CUDA, got " + std::to_string(g.num_tokens));
  const at::Tensor table = block_tables.contiguous();
  const at::Tensor lens = seq_lens.contiguous();
  const at::Tensor starts = query_start_loc.has_value() ? query_start_loc->contiguous() : at::Tensor();
  const at::Tensor first_keys = kv_start.has_value() ? kv_start->contiguous() : at::Tensor();
  const at::Tensor sink_values = sinks.has_value() ? sinks->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor k_static = int8_static ? k_scale->contiguous() : at::Tensor();
  const at::Tensor v_static = int8_static ? v_scale->contiguous() : at::Tensor();
  const bool per_token = dtype == KvCacheDtype::kInt8PerTokenHead;

  AttentionArgs a{};
  a.query = query.const_data_ptr();
  a.q_token_stride = g.q_token_stride;
  a.q_head_stride = g.q_head_stride;
  a.k_cache = key_cache.const_data_ptr();
  a.v_cache = value_cache.const_data_ptr();
  a.k_block_stride = cg.k_block_stride;
  a.k_slot_stride = cg.k_slot_stride;
  a.k_head_stride = cg.k_head_stride;
  a.v_block_stride = cg.v_block_stride;
  a.v_slot_stride = cg.v_slot_stride;
  a.v_head_stride = cg.v_head_stride;
  a.k_scale_cache = per_token ? k_scale_cache->const_data_ptr<float>() : nullptr;
  a.v_scale_cache = per_token ? v_scale_cache->const_data_ptr<float>() : nullptr;
  a.ks_block_stride = cg.ks_block_stride;
  a.ks_slot_stride = cg.ks_slot_stride;
  a.ks_head_stride = cg.ks_head_stride;
  a.vs_block_stride = cg.vs_block_stride;
  a.vs_slot_stride = cg.vs_slot_stride;
  a.vs_head_stride = cg.vs_head_stride;
  a.k_scale = int8_static ? k_static.const_data_ptr<float>() : nullptr;
  a.v_scale = int8_static ? v_static.const_data_ptr<float>() : nullptr;
  a.scale_per_head = int8_static && cg.per_head_scale;
  a.per_token_scale = per_token;
  a.block_table = table.const_data_ptr();
  a.seq_lens = lens.const_data_ptr();
  a.query_start = starts.defined() ? starts.const_data_ptr() : nullptr;
  a.kv_start = first_keys.defined() ? first_keys.const_data_ptr() : nullptr;
  a.table_long = table.scalar_type() == at::kLong;
  a.lens_long = lens.scalar_type() == at::kLong;
  a.starts_long = starts.defined() && starts.scalar_type() == at::kLong;
  a.kv_start_long = first_keys.defined() && first_keys.scalar_type() == at::kLong;
  a.sinks = sink_values.defined() ? sink_values.const_data_ptr<float>() : nullptr;
  a.num_seqs = g.num_seqs;
  a.max_blocks = g.max_blocks;
  a.num_blocks = cg.num_blocks;
  a.block_size = cg.block_size;
  a.num_heads = g.num_heads;
  a.group = g.num_heads / cg.num_heads;
  a.head_size = cg.head_size;
  a.scale = static_cast<float>(g.scale);
  a.softcap = static_cast<float>(g.softcap);
  a.sliding_window = g.sliding_window;
  a.causal = g.causal;
  // The group's heads in passes of at most kMaxRowWarps, as even as possible.
  a.passes = static_cast<int>((a.group + kMaxRowWarps - 1) / kMaxRowWarps);
  a.row_warps = static_cast<int>((a.group + a.passes - 1) / a.passes);
  a.partitions = partitions;
  a.direct = partitions == 1;
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();

  const auto stream = c10::cuda::getCurrentCUDAStream();
  MW_DISPATCH_FLOAT_HALF_BF16(query.scalar_type(), "paged_attention", [&] {
    if (dtype == KvCacheDtype::kAuto)
      run_attention<scalar_t, scalar_t>(a, g.num_tokens, cg.num_heads, lse.options(), stream);
    else
      run_attention<scalar_t, int8_t>(a, g.num_tokens, cg.num_heads, lse.options(), stream);
  });
  return {out, lse};
}

}  // namespace memwarden::ops
