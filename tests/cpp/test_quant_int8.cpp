// Core INT8 arithmetic against hand-computed values.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <stdexcept>

#include "core/quant/int8.h"

using namespace memwarden::quant;

TEST(QuantInt8, RoundsHalfToEven) {
  const Int8Params unit{1.0f, 1.0f, 0};
  EXPECT_EQ(quantize_value(0.5f, unit), 0);
  EXPECT_EQ(quantize_value(1.5f, unit), 2);
  EXPECT_EQ(quantize_value(2.5f, unit), 2);
  EXPECT_EQ(quantize_value(-0.5f, unit), 0);
  EXPECT_EQ(quantize_value(-1.5f, unit), -2);
  EXPECT_EQ(quantize_value(-2.5f, unit), -2);
  EXPECT_EQ(quantize_value(2.4f, unit), 2);
}

TEST(QuantInt8, ZeroPointIsAddedAfterRounding) {
  // round(2.5) + 3 = 5; rounding 5.5 instead would give 6.
  EXPECT_EQ(quantize_value(2.5f, Int8Params{1.0f, 1.0f, 3}), 5);
}

TEST(QuantInt8, Saturates) {
  const Int8Params unit{1.0f, 1.0f, 0};
  EXPECT_EQ(quantize_value(300.0f, unit), 127);
  EXPECT_EQ(quantize_value(-300.0f, unit), -128);
  EXPECT_EQ(quantize_value(std::numeric_limits<float>::infinity(), unit), 127);
  EXPECT_EQ(quantize_value(-std::numeric_limits<float>::infinity(), unit), -128);
  EXPECT_EQ(quantize_value(std::numeric_limits<float>::quiet_NaN(), unit), 0);
  EXPECT_EQ(quantize_value(120.0f, Int8Params{1.0f, 1.0f, 20}), 127);
}

TEST(QuantInt8, SymmetricParams) {
  const Int8Params p = symmetric_params(254.0f);
  EXPECT_FLOAT_EQ(p.scale, 2.0f);
  EXPECT_EQ(quantize_value(254.0f, p), 127);
  EXPECT_EQ(quantize_value(-254.0f, p), -127);
  EXPECT_EQ(quantize_value(3.0f, p), 2);  // 1.5 rounds to 2
  const Int8Params zero = symmetric_params(0.0f);
  EXPECT_EQ(zero.scale, 0.0f);
  EXPECT_EQ(quantize_value(0.0f, zero), 0);
}

TEST(QuantInt8, AsymmetricParams) {
  // min -1, max 254: scale 1, azp = round(-128 + 1) = -127.
  const Int8Params p = asymmetric_params(-1.0f, 254.0f);
  EXPECT_FLOAT_EQ(p.scale, 1.0f);
  EXPECT_EQ(p.zero_point, -127);
  EXPECT_EQ(quantize_value(-1.0f, p), -128);
  EXPECT_EQ(quantize_value(254.0f, p), 127);
  EXPECT_FLOAT_EQ(dequantize_value(quantize_value(100.0f, p), p.scale, p.zero_point), 100.0f);
}

TEST(QuantInt8, AsymmetricConstantGroupIsExact) {
  for (float c : {5.0f, -3.0f}) {
    const Int8Params p = asymmetric_params(c, c);
    EXPECT_GT(p.scale, 0.0f);
    EXPECT_NEAR(dequantize_value(quantize_value(c, p), p.scale, p.zero_point), c, 1e-6f);
  }
  const Int8Params zero = asymmetric_params(0.0f, 0.0f);
  EXPECT_EQ(zero.scale, 0.0f);
  EXPECT_EQ(zero.zero_point, 0);
  EXPECT_EQ(quantize_value(0.0f, zero), 0);
}

TEST(QuantInt8, AsymmetricWithoutFiniteValues) {
  const Int8Params p = asymmetric_params(std::numeric_limits<float>::max(), -std::numeric_limits<float>::max());
  EXPECT_EQ(p.scale, 0.0f);
  EXPECT_EQ(quantize_value(1.0f, p), 0);
}

TEST(QuantInt8, AsymmetricRangeIncludesZero) {
  // [2, 257] is priced as [0, 257]: step 257 / 255, zero point -128, and 0 is exact.
  const Int8Params p = asymmetric_params(2.0f, 257.0f);
  EXPECT_FLOAT_EQ(p.scale, 257.0f / 255.0f);
  EXPECT_EQ(p.zero_point, -128);
  EXPECT_EQ(dequantize_value(quantize_value(std::numeric_limits<float>::quiet_NaN(), p), p.scale, p.zero_point), 0.0f);
}

TEST(QuantInt8, LargeOffsetZeroPointStaysInInt8) {
  // An offset of 1e6 with a spread of 0.0625 overflowed int32 (zero point -2^31).
  const Int8Params p = asymmetric_params(1e6f, 1e6f + 0.0625f);
  EXPECT_GE(p.zero_point, -128);
  EXPECT_LE(p.zero_point, 127);
  const float x = 1e6f + 0.0625f;
  EXPECT_NEAR(dequantize_value(quantize_value(x, p), p.scale, p.zero_point), x, p.scale);
}

TEST(QuantInt8, RangeBeyondFloatMaxHasFiniteScale) {
  const float big = 3e38f;
  const Int8Params p = asymmetric_params(-big, big);
  EXPECT_TRUE(std::isfinite(p.scale));
  EXPECT_TRUE(std::isfinite(p.inv_scale));
  EXPECT_NEAR(dequantize_value(quantize_value(big, p), p.scale, p.zero_point), big, p.scale);
}

TEST(QuantInt8, TinyGroupsUseTheMinimumScale) {
  // 127 / 1e-37 is not a float: the step is FLT_MIN instead of absmax / 127.
  const Int8Params p = symmetric_params(1e-37f);
  EXPECT_EQ(p.scale, kMinScale);
  EXPECT_TRUE(std::isfinite(p.inv_scale));
  EXPECT_EQ(quantize_value(1e-37f, p), 9);  // 1e-37 / FLT_MIN = 8.51
  EXPECT_EQ(quantize_value(3e-40f, p), 0);
  EXPECT_EQ(symmetric_params(std::numeric_limits<float>::denorm_min()).scale, kMinScale);
}

TEST(QuantInt8, Granularity) {
  EXPECT_EQ(parse_granularity("group"), Granularity::kGroup);
  EXPECT_STREQ(granularity_name(parse_granularity("channel")), "channel");
  EXPECT_THROW(parse_granularity("row"), std::invalid_argument);
}

TEST(QuantInt8, ScaleLayouts) {
  // [rows=3, cols=8]: scale index = row * row_stride + col / group_size.
  const ScaleLayout tensor = scale_layout(Granularity::kTensor, 3, 8, 0);
  EXPECT_EQ(tensor.num_scales, 1);
  EXPECT_EQ(2 * tensor.row_stride + 7 / tensor.group_size, 0);
  const ScaleLayout token = scale_layout(Granularity::kToken, 3, 8, 0);
  EXPECT_EQ(token.num_scales, 3);
  EXPECT_EQ(2 * token.row_stride + 7 / token.group_size, 2);
  const ScaleLayout channel = scale_layout(Granularity::kChannel, 3, 8, 0);
  EXPECT_EQ(channel.num_scales, 8);
  EXPECT_EQ(2 * channel.row_stride + 7 / channel.group_size, 7);
  const ScaleLayout group = scale_layout(Granularity::kGroup, 3, 8, 4);
  EXPECT_EQ(group.num_scales, 6);
  EXPECT_EQ(2 * group.row_stride + 7 / group.group_size, 5);
}

TEST(QuantInt8, GroupSizeMustDivide) {
  EXPECT_THROW(scale_layout(Granularity::kGroup, 2, 10, 4), std::invalid_argument);
  EXPECT_THROW(scale_layout(Granularity::kGroup, 2, 10, 0), std::invalid_argument);
  EXPECT_THROW(scale_layout(Granularity::kGroup, 2, 10, -5), std::invalid_argument);
}
