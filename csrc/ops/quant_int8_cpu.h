// CPU kernels of the INT8 family, compiled once per CPU capability (quant_int8_vec.cpp)
// and chosen at run time by quant_int8_cpu_kernels().
#pragma once

#include <ATen/core/Tensor.h>

#include "core/quant/int8.h"

namespace memwarden::ops {

struct QuantInt8CpuKernels {
  // Dynamic: one scale (and zero point, when zero_point is defined) per group of
  // `group_size` consecutive elements of each row. All tensors contiguous.
  void (*quantize_groups)(const at::Tensor& input, int64_t group_size, at::Tensor& q, at::Tensor& scale,
                          at::Tensor& zero_point);
  // Dynamic per-tensor (one scale) or per-column (per_column: one per column of the
  // last dimension) parameters, computed in one pass over the input.
  void (*reduce_params)(const at::Tensor& input, bool per_column, at::Tensor& scale, at::Tensor& zero_point);
  // Static: scales (and zero points, when defined) given in `layout`.
  void (*quantize_static)(const at::Tensor& input, const quant::ScaleLayout& layout, const at::Tensor& scale,
                          const at::Tensor& zero_point, at::Tensor& q);
  void (*dequantize)(const at::Tensor& q, const quant::ScaleLayout& layout, const at::Tensor& scale,
                     const at::Tensor& zero_point, at::Tensor& out);
};

namespace DEFAULT {
extern const QuantInt8CpuKernels kQuantInt8CpuKernels;
}
#if defined(__x86_64__) || defined(_M_X64)
namespace AVX2 {
extern const QuantInt8CpuKernels kQuantInt8CpuKernels;
}
#endif

// The widest variant this CPU runs (ATEN_CPU_CAPABILITY=default forces the fallback).
const QuantInt8CpuKernels& quant_int8_cpu_kernels();

}  // namespace memwarden::ops
