// Vectorised CPU kernels for INT8 quantization. This file is compiled once per CPU
// capability (CMake defines CPU_CAPABILITY and, for AVX2, CPU_CAPABILITY_AVX2), so
// every variant lives in its own namespace memwarden::ops::<CPU_CAPABILITY>.
#include "ops/dispatch.h"
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cfloat>
#include <vector>

#include "ops/int8_span_vec.h"
#include "ops/quant_int8_cpu.h"

namespace memwarden::ops::CPU_CAPABILITY {
namespace {

constexpr int64_t kMinGrain = 1 << 15;  // elements per parallel task

// Per-column scales (granularity "channel"): one inverse scale per element.
template <typename T>
void quantize_span_per_column(const T* src, int8_t* dst, int64_t n, const float* inv_scales,
                              const float* zero_points) {
  int64_t i = 0;
  for (; i + kChunk <= n; i += kChunk) {
    auto [lo, hi] = load_chunk(src + i);
    store_int8(dst + i, quantize_vec(lo, Vec::loadu(inv_scales + i), Vec::loadu(zero_points + i)));
    store_int8(dst + i + Vec::size(), quantize_vec(hi, Vec::loadu(inv_scales + i + Vec::size()),
                                                   Vec::loadu(zero_points + i + Vec::size())));
  }
  for (; i < n; ++i) {
    const quant::Int8Params params{0.0f, inv_scales[i], static_cast<int32_t>(zero_points[i])};
    dst[i] = quant::quantize_value(static_cast<float>(src[i]), params);
  }
}

template <typename T>
void dequantize_span_per_column(const int8_t* src, T* dst, int64_t n, const float* scales,
                                const float* zero_points) {
  int64_t i = 0;
  for (; i + kChunk <= n; i += kChunk) {
    const Vec lo = (load_int8(src + i) - Vec::loadu(zero_points + i)) * Vec::loadu(scales + i);
    const Vec hi = (load_int8(src + i + Vec::size()) - Vec::loadu(zero_points + i + Vec::size())) *
                   Vec::loadu(scales + i + Vec::size());
    store_chunk(dst + i, lo, hi);
  }
  for (; i < n; ++i) dst[i] = static_cast<T>((static_cast<float>(src[i]) - zero_points[i]) * scales[i]);
}

// Runs fn(row_begin, row_end) over rows in parallel, with tasks of >= kMinGrain elements.
template <typename Fn>
void parallel_rows(int64_t rows, int64_t cols, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kMinGrain / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, fn);
}

// The zero points of an asymmetric layout, or null (symmetric: every zero point is 0).
const int32_t* zero_points_of(const at::Tensor& zero_point) {
  return zero_point.defined() ? zero_point.const_data_ptr<int32_t>() : nullptr;
}

void quantize_groups_kernel(const at::Tensor& input, int64_t group_size, at::Tensor& q, at::Tensor& scale,
                            at::Tensor& zero_point) {
  const int64_t cols = input.size(-1);
  const int64_t rows = cols == 0 ? 0 : input.numel() / cols;
  const int64_t groups_per_row = cols / group_size;
  const bool symmetric = !zero_point.defined();
  MW_DISPATCH_FLOAT_HALF_BF16(input.scalar_type(), "quantize_int8_groups", [&] {
    const scalar_t* src = input.const_data_ptr<scalar_t>();
    int8_t* dst = q.data_ptr<int8_t>();
    float* scales = scale.data_ptr<float>();
    int32_t* zero_points = symmetric ? nullptr : zero_point.data_ptr<int32_t>();
    parallel_rows(rows, cols, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t g = 0; g < groups_per_row; ++g) {
          const int64_t offset = row * cols + g * group_size;
          const FiniteRange range = finite_range(src + offset, group_size, symmetric);
          const quant::Int8Params params =
              symmetric ? quant::symmetric_params(range.absmax) : quant::asymmetric_params(range.min, range.max);
          quantize_span(src + offset, dst + offset, group_size, params);
          scales[row * groups_per_row + g] = params.scale;
          if (zero_points) zero_points[row * groups_per_row + g] = params.zero_point;
        }
      }
    });
  });
}

void write_params(const FiniteRange& range, int64_t index, float* scales, int32_t* zero_points) {
  const quant::Int8Params params =
      zero_points ? quant::asymmetric_params(range.min, range.max) : quant::symmetric_params(range.absmax);
  scales[index] = params.scale;
  if (zero_points) zero_points[index] = params.zero_point;
}

void reduce_params_kernel(const at::Tensor& input, bool per_column, at::Tensor& scale, at::Tensor& zero_point) {
  const int64_t cols = input.size(-1);
  const int64_t n = input.numel();
  const int64_t rows = cols == 0 ? 0 : n / cols;
  const bool symmetric = !zero_point.defined();
  float* scales = scale.data_ptr<float>();
  int32_t* zero_points = symmetric ? nullptr : zero_point.data_ptr<int32_t>();
  MW_DISPATCH_FLOAT_HALF_BF16(input.scalar_type(), "quantize_int8_params", [&] {
    const scalar_t* src = input.const_data_ptr<scalar_t>();
    if (!per_column) {
      const FiniteRange range = at::parallel_reduce(
          0, n, kMinGrain, FiniteRange{},
          [&](int64_t begin, int64_t end, const FiniteRange& acc) {
            return merge(acc, finite_range(src + begin, end - begin, symmetric));
          },
          merge);
      write_params(range, 0, scales, zero_points);
      return;
    }
    // Each thread folds its rows into its own per-column statistics; they are merged after.
    const int64_t threads = at::get_num_threads();
    std::vector<float> absmax(threads * cols, 0.0f), min(threads * cols, FLT_MAX), max(threads * cols, -FLT_MAX);
    parallel_rows(rows, cols, [&](int64_t begin, int64_t end) {
      const int64_t offset = at::get_thread_num() * cols;
      for (int64_t row = begin; row < end; ++row) {
        accumulate_columns(src + row * cols, cols, symmetric, &absmax[offset], &min[offset], &max[offset]);
      }
    });
    for (int64_t col = 0; col < cols; ++col) {
      FiniteRange range;
      for (int64_t t = 0; t < threads; ++t) {
        range = merge(range, {absmax[t * cols + col], min[t * cols + col], max[t * cols + col]});
      }
      write_params(range, col, scales, zero_points);
    }
  });
}

// Per-column parameters for granularity "channel", as float vectors for the kernels.
std::pair<std::vector<float>, std::vector<float>> column_params(const quant::ScaleLayout& layout,
                                                                const at::Tensor& scale,
                                                                const at::Tensor& zero_point, bool inverse) {
  std::vector<float> scales(layout.num_scales), zero_points(layout.num_scales, 0.0f);
  const float* s = scale.const_data_ptr<float>();
  const int32_t* zp = zero_points_of(zero_point);
  for (int64_t c = 0; c < layout.num_scales; ++c) {
    scales[c] = inverse ? (s[c] > 0.0f ? 1.0f / s[c] : 0.0f) : s[c];
    zero_points[c] = zp ? static_cast<float>(zp[c]) : 0.0f;
  }
  return {std::move(scales), std::move(zero_points)};
}

void quantize_static_kernel(const at::Tensor& input, const quant::ScaleLayout& layout, const at::Tensor& scale,
                            const at::Tensor& zero_point, at::Tensor& q) {
  const int64_t cols = input.size(-1);
  const int64_t rows = cols == 0 ? 0 : input.numel() / cols;
  const bool per_column = layout.group_size == 1 && layout.row_stride == 0;
  MW_DISPATCH_FLOAT_HALF_BF16(input.scalar_type(), "quantize_int8_static", [&] {
    const scalar_t* src = input.const_data_ptr<scalar_t>();
    int8_t* dst = q.data_ptr<int8_t>();
    if (per_column) {
      const auto [inv_scales, zero_points] = column_params(layout, scale, zero_point, /*inverse=*/true);
      parallel_rows(rows, cols, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          quantize_span_per_column(src + row * cols, dst + row * cols, cols, inv_scales.data(), zero_points.data());
        }
      });
      return;
    }
    const float* scales = scale.const_data_ptr<float>();
    const int32_t* zero_points = zero_points_of(zero_point);
    parallel_rows(rows, cols, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t col = 0; col < cols; col += layout.group_size) {
          const int64_t index = row * layout.row_stride + col / layout.group_size;
          const float s = scales[index];
          const quant::Int8Params params{s, s > 0.0f ? 1.0f / s : 0.0f, zero_points ? zero_points[index] : 0};
          const int64_t offset = row * cols + col;
          quantize_span(src + offset, dst + offset, std::min(layout.group_size, cols - col), params);
        }
      }
    });
  });
}

void dequantize_kernel(const at::Tensor& q, const quant::ScaleLayout& layout, const at::Tensor& scale,
                       const at::Tensor& zero_point, at::Tensor& out) {
  const int64_t cols = q.size(-1);
  const int64_t rows = cols == 0 ? 0 : q.numel() / cols;
  const bool per_column = layout.group_size == 1 && layout.row_stride == 0;
  MW_DISPATCH_FLOAT_HALF_BF16(out.scalar_type(), "dequantize_int8", [&] {
    const int8_t* src = q.const_data_ptr<int8_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    if (per_column) {
      const auto [scales, zero_points] = column_params(layout, scale, zero_point, /*inverse=*/false);
      parallel_rows(rows, cols, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          dequantize_span_per_column(src + row * cols, dst + row * cols, cols, scales.data(), zero_points.data());
        }
      });
      return;
    }
    const float* scales = scale.const_data_ptr<float>();
    const int32_t* zero_points = zero_points_of(zero_point);
    parallel_rows(rows, cols, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t col = 0; col < cols; col += layout.group_size) {
          const int64_t index = row * layout.row_stride + col / layout.group_size;
          const int64_t offset = row * cols + col;
          dequantize_span(src + offset, dst + offset, std::min(layout.group_size, cols - col), scales[index],
                          zero_points ? zero_points[index] : 0);
        }
      }
    });
  });
}

}  // namespace

extern const QuantInt8CpuKernels kQuantInt8CpuKernels{quantize_groups_kernel, reduce_params_kernel,
                                                      quantize_static_kernel, dequantize_kernel};

}  // namespace memwarden::ops::CPU_CAPABILITY
