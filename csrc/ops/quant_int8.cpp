// CPU entry points of the INT8 family: allocate outputs, then run the widest
// vectorised kernel variant this CPU supports.
#include <ATen/ATen.h>
#include <ATen/Version.h>

#include "ops/quant_int8.h"
#include "ops/quant_int8_cpu.h"

namespace memwarden::ops {

const QuantInt8CpuKernels& quant_int8_cpu_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  // ATen's own choice ("DEFAULT", "AVX2", "AVX512"; ATEN_CPU_CAPABILITY overrides it).
  static const bool avx2 = at::get_cpu_capability().rfind("AVX", 0) == 0;
  static const QuantInt8CpuKernels& kernels = avx2 ? AVX2::kQuantInt8CpuKernels : DEFAULT::kQuantInt8CpuKernels;
  return kernels;
#else
  return DEFAULT::kQuantInt8CpuKernels;
#endif
}

void quantize_int8_groups_out_cpu(const at::Tensor& input, int64_t group_size, const at::Tensor& q,
                                  const at::Tensor& scale, const std::optional<at::Tensor>& azp) {
  quantize_int8_groups_out_check(input, group_size, q, scale, azp);
  at::Tensor q_out = q, scale_out = scale, zero_point = azp.value_or(at::Tensor());
  quant_int8_cpu_kernels().quantize_groups(input, group_size, q_out, scale_out, zero_point);
}

QuantResult quantize_int8_groups_cpu(const at::Tensor& input, int64_t group_size, bool symmetric) {
  auto outputs = quantize_int8_groups_outputs(input, group_size, symmetric);
  auto& [q, scale, zero_point] = outputs;
  at::Tensor zero_point_or_undefined = zero_point.value_or(at::Tensor());
  quant_int8_cpu_kernels().quantize_groups(input, group_size, q, scale, zero_point_or_undefined);
  return outputs;
}

ParamsResult quantize_int8_params_cpu(const at::Tensor& input, c10::string_view granularity, bool symmetric) {
  auto outputs = quantize_int8_params_outputs(input, granularity, symmetric);
  auto& [scale, zero_point] = outputs;
  at::Tensor zero_point_or_undefined = zero_point.value_or(at::Tensor());
  quant_int8_cpu_kernels().reduce_params(input, granularity == "channel", scale, zero_point_or_undefined);
  return outputs;
}

at::Tensor quantize_int8_static_cpu(const at::Tensor& input, const at::Tensor& scale,
                                    const std::optional<at::Tensor>& zero_point, c10::string_view granularity,
                                    std::optional<int64_t> group_size) {
  at::Tensor q = quantize_int8_static_outputs(input, scale, zero_point, granularity, group_size);
  const quant::ScaleLayout layout = concrete_layout(input, granularity, group_size);
  quant_int8_cpu_kernels().quantize_static(input, layout, scale, zero_point.value_or(at::Tensor()), q);
  return q;
}

at::Tensor dequantize_int8_cpu(const at::Tensor& q, const at::Tensor& scale,
                               const std::optional<at::Tensor>& zero_point, c10::string_view granularity,
                               std::optional<int64_t> group_size, std::optional<at::ScalarType> out_dtype) {
  at::Tensor out = dequantize_int8_outputs(q, scale, zero_point, granularity, group_size, out_dtype);
  const quant::ScaleLayout layout = concrete_layout(q, granularity, group_size);
  quant_int8_cpu_kernels().dequantize(q, layout, scale, zero_point.value_or(at::Tensor()), out);
  return out;
}

}  // namespace memwarden::ops
