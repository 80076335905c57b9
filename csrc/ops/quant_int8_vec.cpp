// Vectorised CPU kernels for INT8 quantization. This file is compiled once per CPU
// capability (CMake defines CPU_CAPABILITY and, for AVX2, CPU_CAPABILITY_AVX2), so
// every variant lives in its own namespace memwarden::ops::<CPU_CAPABILITY>.
#include "ops/dispatch.h"
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cfloat>

#include "ops/quant_int8_cpu.h"

#ifdef CPU_CAPABILITY_AVX2
#include <immintrin.h>
#endif

namespace memwarden::ops::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
static_assert(Vec::size() == 8, "kernels assume 8 floats per vector");
constexpr int64_t kChunk = 2 * Vec::size();  // elements per step: two float vectors
constexpr int64_t kMinGrain = 1 << 15;       // elements per parallel task

// Loads kChunk elements as two float vectors.
template <typename T>
inline std::pair<Vec, Vec> load_chunk(const T* src) {
  if constexpr (std::is_same_v<T, float>) {
    return {Vec::loadu(src), Vec::loadu(src + Vec::size())};
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(src));
    return {lo, hi};
  }
}

template <typename T>
inline void store_chunk(T* dst, const Vec& lo, const Vec& hi) {
  if constexpr (std::is_same_v<T, float>) {
    lo.store(dst);
    hi.store(dst + Vec::size());
  } else {
    at::vec::convert_from_float<T>(lo, hi).store(dst);
  }
}

// v holds integral values in [-128, 127].
inline void store_int8(int8_t* dst, const Vec& v) {
#ifdef CPU_CAPABILITY_AVX2
  const __m256i i32 = _mm256_cvtps_epi32(v);
  const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packs_epi16(i16, i16));
#else
  float values[Vec::size()];
  v.store(values);
  for (int i = 0; i < Vec::size(); ++i) dst[i] = static_cast<int8_t>(values[i]);
#endif
}

inline Vec load_int8(const int8_t* src) {
#ifdef CPU_CAPABILITY_AVX2
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src))));
#else
  float values[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) values[i] = src[i];
  return Vec::loadu(values);
#endif
}

// round(x * inv_scale) + zero_point, NaN as 0, saturated: the vector form of
// quant::quantize_value.
inline Vec quantize_vec(const Vec& x, const Vec& inv_scale, const Vec& zero_point) {
  Vec r = (x * inv_scale).round();
  r = Vec::blendv(r, Vec(0.0f), r.isnan()) + zero_point;
  return at::vec::clamp(r, Vec(-128.0f), Vec(127.0f));
}

// Finite-value statistics of n elements: absmax (symmetric) or min/max (asymmetric).
struct FiniteRange {
  float absmax = 0.0f;
  float min = FLT_MAX;  // min > max means no finite value was seen
  float max = -FLT_MAX;
};

template <typename T>
FiniteRange finite_range(const T* src, int64_t n, bool symmetric) {
  const Vec limit(FLT_MAX);
  Vec vabsmax(0.0f), vmin(FLT_MAX), vmax(-FLT_MAX);
  int64_t i = 0;
  for (; i + kChunk <= n; i += kChunk) {
    auto [lo, hi] = load_chunk(src + i);
    for (const Vec& x : {lo, hi}) {
      const Vec finite = x.abs() <= limit;  // false for NaN and +-Inf
      if (symmetric) {
        vabsmax = at::vec::maximum(vabsmax, Vec::blendv(Vec(0.0f), x.abs(), finite));
      } else {
        vmin = at::vec::minimum(vmin, Vec::blendv(Vec(FLT_MAX), x, finite));
        vmax = at::vec::maximum(vmax, Vec::blendv(Vec(-FLT_MAX), x, finite));
      }
    }
  }
  FiniteRange range;
  float lanes[3][Vec::size()];
  vabsmax.store(lanes[0]);
  vmin.store(lanes[1]);
  vmax.store(lanes[2]);
  for (int lane = 0; lane < Vec::size(); ++lane) {
    range.absmax = std::max(range.absmax, lanes[0][lane]);
    range.min = std::min(range.min, lanes[1][lane]);
    range.max = std::max(range.max, lanes[2][lane]);
  }
  for (; i < n; ++i) {
    const float x = static_cast<float>(src[i]);
    if (!std::isfinite(x)) continue;
    range.absmax = std::max(range.absmax, std::fabs(x));
    range.min = std::min(range.min, x);
    range.max = std::max(range.max, x);
  }
  return range;
}

template <typename T>
void quantize_span(const T* src, int8_t* dst, int64_t n, const quant::Int8Params& params) {
  const Vec inv_scale(params.inv_scale), zero_point(static_cast<float>(params.zero_point));
  int64_t i = 0;
  for (; i + kChunk <= n; i += kChunk) {
    auto [lo, hi] = load_chunk(src + i);
    store_int8(dst + i, quantize_vec(lo, inv_scale, zero_point));
    store_int8(dst + i + Vec::size(), quantize_vec(hi, inv_scale, zero_point));
  }
  for (; i < n; ++i) dst[i] = quant::quantize_value(static_cast<float>(src[i]), params);
}

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
void dequantize_span(const int8_t* src, T* dst, int64_t n, float scale, int32_t zero_point) {
  const Vec vscale(scale), vzero(static_cast<float>(zero_point));
  int64_t i = 0;
  for (; i + kChunk <= n; i += kChunk) {
    store_chunk(dst + i, (load_int8(src + i) - vzero) * vscale,
                (load_int8(src + i + Vec::size()) - vzero) * vscale);
  }
  for (; i < n; ++i) dst[i] = static_cast<T>(quant::dequantize_value(src[i], scale, zero_point));
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

int32_t zero_point_at(const at::Tensor& zero_point, int64_t index) {
  return zero_point.defined() ? zero_point.data_ptr<int32_t>()[index] : 0;
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

// Per-column parameters for granularity "channel", as float vectors for the kernels.
std::pair<std::vector<float>, std::vector<float>> column_params(const quant::ScaleLayout& layout,
                                                                const at::Tensor& scale,
                                                                const at::Tensor& zero_point, bool inverse) {
  std::vector<float> scales(layout.num_scales), zero_points(layout.num_scales, 0.0f);
  const float* s = scale.const_data_ptr<float>();
  for (int64_t c = 0; c < layout.num_scales; ++c) {
    scales[c] = inverse ? (s[c] > 0.0f ? 1.0f / s[c] : 0.0f) : s[c];
    zero_points[c] = static_cast<float>(zero_point_at(zero_point, c));
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
    parallel_rows(rows, cols, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t col = 0; col < cols; col += layout.group_size) {
          const int64_t index = row * layout.row_stride + col / layout.group_size;
          const float s = scales[index];
          const quant::Int8Params params{s, s > 0.0f ? 1.0f / s : 0.0f, zero_point_at(zero_point, index)};
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
    parallel_rows(rows, cols, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t col = 0; col < cols; col += layout.group_size) {
          const int64_t index = row * layout.row_stride + col / layout.group_size;
          const int64_t offset = row * cols + col;
          dequantize_span(src + offset, dst + offset, std::min(layout.group_size, cols - col), scales[index],
                          zero_point_at(zero_point, index));
        }
      }
    });
  });
}

}  // namespace

extern const QuantInt8CpuKernels kQuantInt8CpuKernels{quantize_groups_kernel, quantize_static_kernel,
                                                      dequantize_kernel};

}  // namespace memwarden::ops::CPU_CAPABILITY
