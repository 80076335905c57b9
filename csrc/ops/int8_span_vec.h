// Vectorised INT8 building blocks shared by the *_vec.cpp kernels: float chunks from and
// to fp32/fp16/bf16, INT8 loads and stores, finite-value ranges, and span (de)quantization
// with the arithmetic of core/quant/int8.h. Included only by files compiled once per CPU
// capability, so everything lives in memwarden::ops::<CPU_CAPABILITY>.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <utility>

#include "core/quant/int8.h"

#ifdef CPU_CAPABILITY_AVX2
#include <immintrin.h>
#endif

namespace memwarden::ops::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
static_assert(Vec::size() == 8, "kernels assume 8 floats per vector");
constexpr int64_t kChunk = 2 * Vec::size();  // elements per step: two float vectors

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

inline FiniteRange merge(const FiniteRange& a, const FiniteRange& b) {
  return {std::max(a.absmax, b.absmax), std::min(a.min, b.min), std::max(a.max, b.max)};
}

// Folds one row of n elements into per-column finite statistics (absmax, or min and
// max), each an array of n floats.
template <typename T>
void accumulate_columns(const T* src, int64_t n, bool symmetric, float* absmax, float* min, float* max) {
  const Vec limit(FLT_MAX);
  auto fold = [&](const Vec& x, int64_t i) {
    const Vec finite = x.abs() <= limit;  // false for NaN and +-Inf
    if (symmetric) {
      at::vec::maximum(Vec::loadu(absmax + i), Vec::blendv(Vec(0.0f), x.abs(), finite)).store(absmax + i);
    } else {
      at::vec::minimum(Vec::loadu(min + i), Vec::blendv(Vec(FLT_MAX), x, finite)).store(min + i);
      at::vec::maximum(Vec::loadu(max + i), Vec::blendv(Vec(-FLT_MAX), x, finite)).store(max + i);
    }
  };
  int64_t i = 0;
  for (; i + kChunk <= n; i += kChunk) {
    auto [lo, hi] = load_chunk(src + i);
    fold(lo, i);
    fold(hi, i + Vec::size());
  }
  for (; i < n; ++i) {
    const float x = static_cast<float>(src[i]);
    if (!std::isfinite(x)) continue;
    absmax[i] = std::max(absmax[i], std::fabs(x));
    min[i] = std::min(min[i], x);
    max[i] = std::max(max[i], x);
  }
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

}  // namespace
}  // namespace memwarden::ops::CPU_CAPABILITY
