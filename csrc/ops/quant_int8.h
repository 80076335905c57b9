// INT8 quantize / dequantize op family: entry points per device and the shared
// argument checks. Schemas and registrations live in bindings/quant_int8_ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

#include "core/quant/int8.h"

namespace memwarden::ops {

using QuantResult = std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>>;

// The input's last dimension and its scale layout (rows stay symbolic under
// torch.compile, so they are not part of it).
struct QuantShape {
  int64_t cols;
  quant::ScaleLayout layout;
};

// Checks shared by every device (Meta included); each raises a Python exception that
// names the offending argument.
QuantShape check_float_input(const char* op, const at::Tensor& input, quant::Granularity granularity,
                             std::optional<int64_t> group_size);
QuantShape check_int8_input(const char* op, const at::Tensor& q, quant::Granularity granularity,
                            std::optional<int64_t> group_size);
void check_scale(const char* op, const at::Tensor& like, const QuantShape& shape, const at::Tensor& scale,
                 const std::optional<at::Tensor>& zero_point, quant::Granularity granularity);
quant::Granularity parse_granularity_arg(const char* op, c10::string_view granularity);
// The scale layout of a checked, concrete (non-Meta) tensor.
quant::ScaleLayout concrete_layout(const at::Tensor& t, c10::string_view granularity,
                                   std::optional<int64_t> group_size);

// *_outputs check the arguments and allocate the uninitialised outputs on the input's
// device: the Meta kernels, and the first step of every device's kernel.

// quantize_int8_groups: dynamic per-group (group_size = last dim: per-token) scales.
QuantResult quantize_int8_groups_cpu(const at::Tensor& input, int64_t group_size, bool symmetric);
QuantResult quantize_int8_groups_outputs(const at::Tensor& input, int64_t group_size, bool symmetric);
// quantize_int8_groups_out: the same into preallocated q, scale (and azp, whose
// presence makes it asymmetric). The check is also the Meta kernel.
void quantize_int8_groups_out_check(const at::Tensor& input, int64_t group_size, const at::Tensor& q,
                                    const at::Tensor& scale, const std::optional<at::Tensor>& azp);
void quantize_int8_groups_out_cpu(const at::Tensor& input, int64_t group_size, const at::Tensor& q,
                                  const at::Tensor& scale, const std::optional<at::Tensor>& azp);

// quantize_int8_params: dynamic per-tensor or per-channel scale (and zero point, when
// not symmetric), from the input's finite values.
using ParamsResult = std::tuple<at::Tensor, std::optional<at::Tensor>>;
ParamsResult quantize_int8_params_outputs(const at::Tensor& input, c10::string_view granularity, bool symmetric);
ParamsResult quantize_int8_params_cpu(const at::Tensor& input, c10::string_view granularity, bool symmetric);

// quantize_int8_static: quantize with given scales (and zero points).
at::Tensor quantize_int8_static_cpu(const at::Tensor& input, const at::Tensor& scale,
                                    const std::optional<at::Tensor>& zero_point, c10::string_view granularity,
                                    std::optional<int64_t> group_size);
at::Tensor quantize_int8_static_outputs(const at::Tensor& input, const at::Tensor& scale,
                                     const std::optional<at::Tensor>& zero_point, c10::string_view granularity,
                                     std::optional<int64_t> group_size);

at::Tensor dequantize_int8_cpu(const at::Tensor& q, const at::Tensor& scale,
                               const std::optional<at::Tensor>& zero_point, c10::string_view granularity,
                               std::optional<int64_t> group_size, std::optional<at::ScalarType> out_dtype);
at::Tensor dequantize_int8_outputs(const at::Tensor& q, const at::Tensor& scale,
                                const std::optional<at::Tensor>& zero_point, c10::string_view granularity,
                                std::optional<int64_t> group_size, std::optional<at::ScalarType> out_dtype);

#ifdef MEMWARDEN_WITH_CUDA
ParamsResult quantize_int8_params_cuda(const at::Tensor& input, c10::string_view granularity, bool symmetric);
QuantResult quantize_int8_groups_cuda(const at::Tensor& input, int64_t group_size, bool symmetric);
void quantize_int8_groups_out_cuda(const at::Tensor& input, int64_t group_size, const at::Tensor& q,
                                   const at::Tensor& scale, const std::optional<at::Tensor>& azp);
at::Tensor quantize_int8_static_cuda(const at::Tensor& input, const at::Tensor& scale,
                                     const std::optional<at::Tensor>& zero_point, c10::string_view granularity,
                                     std::optional<int64_t> group_size);
at::Tensor dequantize_int8_cuda(const at::Tensor& q, const at::Tensor& scale,
                                const std::optional<at::Tensor>& zero_point, c10::string_view granularity,
                                std::optional<int64_t> group_size, std::optional<at::ScalarType> out_dtype);
#endif

// Device-generic compositions of the kernels above.
QuantResult quantize_int8(const at::Tensor& input, c10::string_view granularity,
                          std::optional<int64_t> group_size, bool symmetric);
QuantResult scaled_int8_quant(const at::Tensor& input, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& zero_point, bool symmetric);

}  // namespace memwarden::ops
