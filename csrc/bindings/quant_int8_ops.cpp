// torch.ops.memwarden INT8 quantization ops: schemas and per-device registrations.
#include <torch/library.h>

#include "ops/quant_int8.h"

using namespace memwarden::ops;

TORCH_LIBRARY_FRAGMENT(memwarden, m) {
  // Kernels (CPU, CUDA, Meta).
  m.def("quantize_int8_groups(Tensor input, int group_size, bool symmetric=True) -> (Tensor, Tensor, Tensor?)");
  m.def("quantize_int8_params(Tensor input, str granularity, bool symmetric=True) -> (Tensor, Tensor?)");
  m.def(
      "quantize_int8_groups_out(Tensor input, int group_size, Tensor(a!) q, Tensor(b!) scale, "
      "Tensor(c!)? azp=None) -> ()");
  m.def(
      "quantize_int8_static(Tensor input, Tensor scale, Tensor? azp=None, str granularity=\"tensor\", "
      "int? group_size=None) -> Tensor");
  m.def(
      "dequantize_int8(Tensor q, Tensor scale, Tensor? azp=None, str granularity=\"tensor\", int? group_size=None, "
      "ScalarType? out_dtype=None) -> Tensor");
  // Compositions of the kernels, for every device.
  m.def(
      "quantize_int8(Tensor input, str granularity=\"token\", int? group_size=None, bool symmetric=True) "
      "-> (Tensor, Tensor, Tensor?)",
      TORCH_FN(quantize_int8));
  m.def(
      "scaled_int8_quant(Tensor input, Tensor? scale=None, Tensor? azp=None, bool symmetric=True) "
      "-> (Tensor, Tensor, Tensor?)",
      TORCH_FN(scaled_int8_quant));
}

TORCH_LIBRARY_IMPL(memwarden, CPU, m) {
  m.impl("quantize_int8_params", TORCH_FN(quantize_int8_params_cpu));
  m.impl("quantize_int8_groups", TORCH_FN(quantize_int8_groups_cpu));
  m.impl("quantize_int8_groups_out", TORCH_FN(quantize_int8_groups_out_cpu));
  m.impl("quantize_int8_static", TORCH_FN(quantize_int8_static_cpu));
  m.impl("dequantize_int8", TORCH_FN(dequantize_int8_cpu));
}

TORCH_LIBRARY_IMPL(memwarden, Meta, m) {
  m.impl("quantize_int8_params", TORCH_FN(quantize_int8_params_outputs));
  m.impl("quantize_int8_groups", TORCH_FN(quantize_int8_groups_outputs));
  m.impl("quantize_int8_groups_out", TORCH_FN(quantize_int8_groups_out_check));
  m.impl("quantize_int8_static", TORCH_FN(quantize_int8_static_outputs));
  m.impl("dequantize_int8", TORCH_FN(dequantize_int8_outputs));
}

#ifdef MEMWARDEN_WITH_CUDA
TORCH_LIBRARY_IMPL(memwarden, CUDA, m) {
  m.impl("quantize_int8_params", TORCH_FN(quantize_int8_params_cuda));
  m.impl("quantize_int8_groups", TORCH_FN(quantize_int8_groups_cuda));
  m.impl("quantize_int8_groups_out", TORCH_FN(quantize_int8_groups_out_cuda));
  m.impl("quantize_int8_static", TORCH_FN(quantize_int8_static_cuda));
  m.impl("dequantize_int8", TORCH_FN(dequantize_int8_cuda));
}
#endif
