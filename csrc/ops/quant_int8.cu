// CUDA kernels of the INT8 family. Dynamic quantization runs one thread block per
// group (a token's row, or a group within it) with a CUB block reduction; static
// quantization and dequantization are element-wise over a [rows, cols] grid. Loads are
// 16 bytes wide whenever the pointers and sizes allow it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cfloat>
#include <limits>
#include <vector>
#include <cub/block/block_reduce.cuh>
#include <cuda/functional>

#include "ops/dispatch.h"
#include "ops/quant_int8.h"

namespace memwarden::ops {
namespace {

constexpr int kVectorBytes = 16;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T values[N];
};

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// N elements from src (vectorised when N > 1; the host checked alignment) as floats.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* src, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(src);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = static_cast<float>(pack.values[j]);
}

template <typename T, int N>
__device__ __forceinline__ void store_values(T* dst, const T (&values)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int j = 0; j < N; ++j) pack.values[j] = values[j];
  *reinterpret_cast<Pack<T, N>*>(dst) = pack;
}

// One block per group of `group_size` consecutive elements (groups tile the
// contiguous input, so group k starts at element k * group_size).
template <typename T, int N, int kBlock>
__global__ void quantize_groups_kernel(const T* __restrict__ input, int8_t* __restrict__ q,
                                       float* __restrict__ scales, int32_t* __restrict__ zero_points,
                                       int64_t group_size) {
  const int64_t group = blockIdx.x;
  const T* src = input + group * group_size;
  int8_t* dst = q + group * group_size;
  const bool symmetric = zero_points == nullptr;

  float absmax = 0.0f, lo = FLT_MAX, hi = -FLT_MAX;
  for (int64_t i = threadIdx.x * N; i < group_size; i += kBlock * N) {
    float x[N];
    load_floats<T, N>(src + i, x);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (!isfinite(x[j])) continue;
      absmax = fmaxf(absmax, fabsf(x[j]));
      lo = fminf(lo, x[j]);
      hi = fmaxf(hi, x[j]);
    }
  }

  using BlockReduce = cub::BlockReduce<float, kBlock>;
  __shared__ typename BlockReduce::TempStorage storage;
  __shared__ quant::Int8Params shared_params;
  if (symmetric) {
    const float block_absmax = BlockReduce(storage).Reduce(absmax, cuda::maximum<float>{});
    if (threadIdx.x == 0) shared_params = quant::symmetric_params(block_absmax);
  } else {
    const float block_lo = BlockReduce(storage).Reduce(lo, cuda::minimum<float>{});
    __syncthreads();  // the temp storage is reused
    const float block_hi = BlockReduce(storage).Reduce(hi, cuda::maximum<float>{});
    if (threadIdx.x == 0) shared_params = quant::asymmetric_params(block_lo, block_hi);
  }
  __syncthreads();
  const quant::Int8Params params = shared_params;
  if (threadIdx.x == 0) {
    scales[group] = params.scale;
    if (!symmetric) zero_points[group] = params.zero_point;
  }

  for (int64_t i = threadIdx.x * N; i < group_size; i += kBlock * N) {
    float x[N];
    load_floats<T, N>(src + i, x);
    int8_t out[N];
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = quant::quantize_value(x[j], params);
    store_values<int8_t, N>(dst + i, out);
  }
}

// One thread per scale: the parameters of finite ranges reduced by ATen. lo is unused
// when symmetric (zero_points null), where hi holds the absmax.
__global__ void params_kernel(const float* __restrict__ lo, const float* __restrict__ hi, int64_t n,
                              float* __restrict__ scales, int32_t* __restrict__ zero_points) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const quant::Int8Params params =
      zero_points ? quant::asymmetric_params(lo[i], hi[i]) : quant::symmetric_params(hi[i]);
  scales[i] = params.scale;
  if (zero_points) zero_points[i] = params.zero_point;
}

// Scale index of element (row, col) for the non-per-column layouts; N consecutive
// columns share it because group_size % N == 0 (checked on the host).
__device__ __forceinline__ int64_t scale_index(int64_t row, int64_t col, const quant::ScaleLayout& layout) {
  return row * layout.row_stride + col / layout.group_size;
}

// Element-wise conversions with one element's scale and zero point.
struct QuantizeElement {
  __device__ __forceinline__ int8_t operator()(float x, float scale, int32_t zero_point) const {
    return quant::quantize_value(x, {scale, scale > 0.0f ? 1.0f / scale : 0.0f, zero_point});
  }
};

template <typename T>
struct DequantizeElement {
  __device__ __forceinline__ T operator()(float q, float scale, int32_t zero_point) const {
    return static_cast<T>(quant::dequantize_value(static_cast<int8_t>(q), scale, zero_point));
  }
};

// Static quantization and dequantization: N elements per thread over a [rows, cols]
// grid, each converted with the scale (and zero point) of its group or column.
template <typename In, typename Out, int N, bool kPerColumn, typename Convert>
__global__ void elementwise_kernel(const In* __restrict__ input, Out* __restrict__ output,
                                   const float* __restrict__ scales, const int32_t* __restrict__ zero_points,
                                   int64_t rows, int64_t cols, quant::ScaleLayout layout, Convert convert) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    for (int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * N; col < cols;
         col += static_cast<int64_t>(gridDim.x) * blockDim.x * N) {
      float x[N];
      load_floats<In, N>(input + row * cols + col, x);
      Out out[N];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const int64_t index = kPerColumn ? col + j : scale_index(row, col, layout);
        out[j] = convert(x[j], scales[index], zero_points ? zero_points[index] : 0);
      }
      store_values<Out, N>(output + row * cols + col, out);
    }
  }
}

// Launch shape for the element-wise kernels: columns in x, rows (grid-strided) in y.
struct ElementwiseLaunch {
  dim3 grid;
  dim3 block;
};

ElementwiseLaunch elementwise_launch(int64_t rows, int64_t cols, int vector) {
  constexpr int kThreads = 256;
  const int64_t column_blocks = std::max<int64_t>(1, (cols / vector + kThreads - 1) / kThreads);
  return {dim3(static_cast<unsigned>(std::min<int64_t>(column_blocks, 1 << 16)),
               static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(rows, 1), 65535))),
          dim3(kThreads)};
}

// Calls fn(std::integral_constant<int, N>) with N = 16 bytes / sizeof(T) when every
// access can be that wide, else N = 1.
template <typename T, typename Fn>
void with_vector_width(bool vectorizable, const Fn& fn) {
  constexpr int kWide = kVectorBytes / sizeof(T);
  if (vectorizable) {
    fn(std::integral_constant<int, kWide>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

// For the element-wise kernels over [rows, cols]: picks the widest vector width the
// pointer alignment and the sizes allow, and the per-column variant, then calls
// launch(width, per_column, shape) with both as integral constants.
template <typename T, typename Launch>
void dispatch_elementwise(const void* data, int64_t alignment, int64_t rows, int64_t cols,
                          const quant::ScaleLayout& layout, const Launch& launch) {
  constexpr int kWide = kVectorBytes / sizeof(T);
  const bool per_column = layout.group_size == 1 && layout.row_stride == 0;
  const bool vectorizable =
      aligned(data, alignment) && cols % kWide == 0 && (per_column || layout.group_size % kWide == 0);
  with_vector_width<T>(vectorizable, [&](auto width) {
    const ElementwiseLaunch shape = elementwise_launch(rows, cols, decltype(width)::value);
    if (per_column) {
      launch(width, std::true_type{}, shape);
    } else {
      launch(width, std::false_type{}, shape);
    }
  });
}

}  // namespace

ParamsResult quantize_int8_params_cuda(const at::Tensor& input, c10::string_view granularity, bool symmetric) {
  auto outputs = quantize_int8_params_outputs(input, granularity, symmetric);
  auto& [scale, zero_point] = outputs;
  if (input.numel() == 0) {  // no finite value: the scale of an all-zero group
    scale.zero_();
    if (zero_point.has_value()) zero_point->zero_();
    return outputs;
  }
  // Reductions across rows: ATen's over the finite values, then one thread per scale.
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.reshape({-1, input.size(-1)});
  const at::Tensor finite = at::isfinite(x);
  const auto dims = granularity == "tensor" ? std::vector<int64_t>{0, 1} : std::vector<int64_t>{0};
  const double inf = std::numeric_limits<double>::infinity();
  at::Tensor lo, hi;
  if (symmetric) {
    hi = at::where(finite, x.abs(), 0.0).amax(dims).to(at::kFloat).reshape({-1});
  } else {
    lo = at::where(finite, x, inf).amin(dims).to(at::kFloat).reshape({-1});
    hi = at::where(finite, x, -inf).amax(dims).to(at::kFloat).reshape({-1});
  }
  const int64_t n = scale.numel();
  constexpr int kThreads = 256;
  params_kernel<<<static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0,
                  c10::cuda::getCurrentCUDAStream()>>>(symmetric ? nullptr : lo.const_data_ptr<float>(),
                                                        hi.const_data_ptr<float>(), n, scale.data_ptr<float>(),
                                                        symmetric ? nullptr : zero_point->data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return outputs;
}

void quantize_int8_groups_out_cuda(const at::Tensor& input, int64_t group_size, const at::Tensor& q,
                                   const at::Tensor& scale, const std::optional<at::Tensor>& azp) {
  quantize_int8_groups_out_check(input, group_size, q, scale, azp);
  if (input.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_groups = input.numel() / group_size;
  int32_t* zero_points = azp.has_value() ? azp->data_ptr<int32_t>() : nullptr;
  MW_DISPATCH_FLOAT_HALF_BF16(input.scalar_type(), "quantize_int8_groups_cuda", [&] {
    const bool vectorizable = aligned(input.const_data_ptr(), kVectorBytes) && aligned(q.const_data_ptr(), kVectorBytes) &&
                              (group_size * static_cast<int64_t>(sizeof(scalar_t))) % kVectorBytes == 0;
    with_vector_width<scalar_t>(vectorizable, [&](auto width) {
      constexpr int N = decltype(width)::value;
      auto launch = [&](auto block) {
        constexpr int kBlock = decltype(block)::value;
        quantize_groups_kernel<scalar_t, N, kBlock><<<num_groups, kBlock, 0, stream>>>(
            input.const_data_ptr<scalar_t>(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), zero_points,
            group_size);
      };
      // Small groups (per-group scales of 32..256 elements) would idle most of a big block.
      if (group_size / N >= 1024) {
        launch(std::integral_constant<int, 256>{});
      } else {
        launch(std::integral_constant<int, 64>{});
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

QuantResult quantize_int8_groups_cuda(const at::Tensor& input, int64_t group_size, bool symmetric) {
  auto outputs = quantize_int8_groups_outputs(input, group_size, symmetric);
  const auto& [q, scale, zero_point] = outputs;
  quantize_int8_groups_out_cuda(input, group_size, q, scale, zero_point);
  return outputs;
}

at::Tensor quantize_int8_static_cuda(const at::Tensor& input, const at::Tensor& scale,
                                     const std::optional<at::Tensor>& zero_point, c10::string_view granularity,
                                     std::optional<int64_t> group_size) {
  at::Tensor q = quantize_int8_static_outputs(input, scale, zero_point, granularity, group_size);
  if (input.numel() == 0) return q;
  const quant::ScaleLayout layout = concrete_layout(input, granularity, group_size);
  const int64_t cols = input.size(-1), rows = input.numel() / cols;
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int32_t* zero_points = zero_point.has_value() ? zero_point->const_data_ptr<int32_t>() : nullptr;
  MW_DISPATCH_FLOAT_HALF_BF16(input.scalar_type(), "quantize_int8_static_cuda", [&] {
    dispatch_elementwise<scalar_t>(input.const_data_ptr(), kVectorBytes, rows, cols, layout,
                                   [&](auto width, auto per_column, const ElementwiseLaunch& shape) {
      elementwise_kernel<scalar_t, int8_t, decltype(width)::value, decltype(per_column)::value>
          <<<shape.grid, shape.block, 0, stream>>>(input.const_data_ptr<scalar_t>(), q.data_ptr<int8_t>(),
                                                   scale.const_data_ptr<float>(), zero_points, rows, cols, layout,
                                                   QuantizeElement{});
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return q;
}

at::Tensor dequantize_int8_cuda(const at::Tensor& q, const at::Tensor& scale,
                                const std::optional<at::Tensor>& zero_point, c10::string_view granularity,
                                std::optional<int64_t> group_size, std::optional<at::ScalarType> out_dtype) {
  at::Tensor out = dequantize_int8_outputs(q, scale, zero_point, granularity, group_size, out_dtype);
  if (q.numel() == 0) return out;
  const quant::ScaleLayout layout = concrete_layout(q, granularity, group_size);
  const int64_t cols = q.size(-1), rows = q.numel() / cols;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int32_t* zero_points = zero_point.has_value() ? zero_point->const_data_ptr<int32_t>() : nullptr;
  MW_DISPATCH_FLOAT_HALF_BF16(out.scalar_type(), "dequantize_int8_cuda", [&] {
    // N int8 loads per step: the q pointer needs N-byte alignment (the output is fresh).
    dispatch_elementwise<scalar_t>(q.const_data_ptr(), kVectorBytes / sizeof(scalar_t), rows, cols, layout,
                                   [&](auto width, auto per_column, const ElementwiseLaunch& shape) {
      elementwise_kernel<int8_t, scalar_t, decltype(width)::value, decltype(per_column)::value>
          <<<shape.grid, shape.block, 0, stream>>>(q.const_data_ptr<int8_t>(), out.data_ptr<scalar_t>(),
                                                   scale.const_data_ptr<float>(), zero_points, rows, cols, layout,
                                                   DequantizeElement<scalar_t>{});
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace memwarden::ops
