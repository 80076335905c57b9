// INT8 quantization arithmetic shared by the CPU and CUDA kernels (torch-free).
//
// Conventions follow vLLM's scaled_int8_quant:
//   symmetric:  scale = absmax / 127,          q = sat(round(x / scale))
//   asymmetric: scale = (max - min) / 255,     azp = round(-128 - min / scale),
//               q = sat(round(x / scale) + azp)
// round = round half to even, sat = saturate to [-128, 127]. Only finite values
// enter min/max/absmax; +-Inf saturates. A group whose finite
// values are all zero (or that has none) gets scale 0 and q = 0, never NaN. NaN
// quantizes to the zero point (so it dequantizes to 0).
#pragma once

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

MW_HOST_DEVICE Int8Params symmetric_params(float absmax) {
  const float scale = absmax / 127.0f;
  return {scale, scale > 0.0f ? 127.0f / absmax : 0.0f, 0};
}

// min/max are over the finite values of a group; an empty group passes min > max.
MW_HOST_DEVICE Int8Params asymmetric_params(float min_value, float max_value) {
  if (!(min_value <= max_value)) return {0.0f, 0.0f, 0};
  if (min_value == max_value) {
    // A constant group has no range: widen it to include zero so the constant
    // itself is exactly representable (and an all-zero group stays scale 0).
    min_value = fminf(min_value, 0.0f);
    max_value = fmaxf(max_value, 0.0f);
  }
  const float scale = (max_value - min_value) / 255.0f;
  if (!(scale > 0.0f)) return {0.0f, 0.0f, 0};
  const float zero_point = rintf(-128.0f - min_value / scale);
  return {scale, 1.0f / scale, static_cast<int32_t>(zero_point)};
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
