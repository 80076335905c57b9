// INT8 quantization arithmetic shared by the CPU and CUDA kernels (torch-free).
//
// Conventions follow vLLM's scaled_int8_quant:
//   symmetric:  scale = absmax / 127,          q = sat(round(x / scale))
//   asymmetric: scale = (max - min) / 255,     azp = round(-128 - min / scale),
//               q = sat(round(x / scale) + azp)
// round = round half to even, sat = saturate to [-128, 127]. Only finite values
// enter min/max/absmax; +-Inf saturates. A group whose finite values are all zero (or
// that has none) gets scale 0 and q = 0, never NaN. NaN quantizes to the zero point (so
// it dequantizes to 0).
//
// Three choices keep every finite input representable without overflow:
// - The asymmetric range always includes 0 (min <= 0 <= max), as torch.ao's observers
//   do: the zero point then lies in [-128, 127], so it cannot overflow int32, zero
//   (padding, masked and NaN values) reads back as exactly 0, and |x / scale| <= 255
//   keeps float32 exact to the step. A group far from zero ([1e6, 1e6 + 1]) gets the
//   coarse step max / 255: subtract such an offset before quantizing.
// - The range is computed in double, so max - min beyond FLT_MAX still gives a finite
//   scale.
// - The scale is at least kMinScale (FLT_MIN, the smallest normal float) so 1 / scale
//   stays finite: a group whose absmax is below 127 * FLT_MIN (~1.5e-36) is quantized
//   with that step, an absolute error of at most FLT_MIN / 2 (~5.9e-39).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define MW_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MW_HOST_DEVICE inline
#endif

namespace memwarden::quant {

struct Int8Params {
  float scale;      // dequantized value = (q - zero_point) * scale
  float inv_scale;  // 1 / scale, or 0 when scale is 0 (so every q becomes 0)
  int32_t zero_point;
};

// Saturates an integral float to [-128, 127].
MW_HOST_DEVICE int8_t saturate_int8(float integral) {
  if (integral >= 127.0f) return 127;
  if (integral <= -128.0f) return -128;
  return static_cast<int8_t>(integral);
}

constexpr float kMinScale = FLT_MIN;

// Parameters of a positive step (or of scale 0, which quantizes everything to 0).
MW_HOST_DEVICE Int8Params params_for_step(double step, int32_t zero_point) {
  if (!(step > 0.0)) return {0.0f, 0.0f, 0};
  const float scale = fmaxf(static_cast<float>(step), kMinScale);
  return {scale, 1.0f / scale, zero_point};
}

// Multiplies by 127 / absmax like vLLM's kernels (that is 1 / scale, but for rounding).
MW_HOST_DEVICE Int8Params symmetric_params(float absmax) {
  if (!(absmax > 0.0f)) return {0.0f, 0.0f, 0};
  const float scale = absmax / 127.0f;
  return scale < kMinScale ? Int8Params{kMinScale, 1.0f / kMinScale, 0} : Int8Params{scale, 127.0f / absmax, 0};
}

// min/max are over the finite values of a group; an empty group passes min > max.
MW_HOST_DEVICE Int8Params asymmetric_params(float min_value, float max_value) {
  if (!(min_value <= max_value)) return {0.0f, 0.0f, 0};
  const double lo = fmin(static_cast<double>(min_value), 0.0);
  const double hi = fmax(static_cast<double>(max_value), 0.0);
  Int8Params params = params_for_step((hi - lo) / 255.0, 0);
  if (params.scale > 0.0f) {
    // In [-128, 127] because lo <= 0 <= hi; the clamp guards the rounding at the ends.
    params.zero_point = static_cast<int32_t>(fmin(fmax(rint(-128.0 - lo / params.scale), -128.0), 127.0));
  }
  return params;
}

// The zero point is added after rounding: adding it first would move the ties that
// round half to even decides (2.5 + 3 rounds to 6, round(2.5) + 3 is 5). NaN is
// quantized as 0, i.e. to the zero point.
MW_HOST_DEVICE int8_t quantize_value(float x, const Int8Params& p) {
  const float rounded = rintf(x * p.inv_scale);
  return saturate_int8((rounded == rounded ? rounded : 0.0f) + static_cast<float>(p.zero_point));
}

MW_HOST_DEVICE float dequantize_value(int8_t q, float scale, int32_t zero_point) {
  return static_cast<float>(static_cast<int32_t>(q) - zero_point) * scale;
}

// Which elements share a scale.
enum class Granularity { kTensor, kToken, kChannel, kGroup };

// Parses "tensor" | "token" | "channel" | "group"; throws std::invalid_argument.
Granularity parse_granularity(const std::string& name);
const char* granularity_name(Granularity granularity);

// Where an element's scale lives, for a tensor seen as [rows, cols] (cols = last dim):
// scale index = row * row_stride + col / group_size.
struct ScaleLayout {
  int64_t row_stride;
  int64_t group_size;
  int64_t num_scales;
};

// Throws std::invalid_argument naming group_size when it is missing (for kGroup),
// not positive, or does not divide cols.
ScaleLayout scale_layout(Granularity granularity, int64_t rows, int64_t cols,
                         int64_t group_size);

}  // namespace memwarden::quant
