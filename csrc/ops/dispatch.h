// Dtype dispatch shared by the op families.
#pragma once

#include <ATen/Dispatch.h>

// float32, float16 and bfloat16: the activation and KV dtypes the kernels accept.
#define MW_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
