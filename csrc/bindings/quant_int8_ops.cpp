// torch.ops.memwarden INT8 quantization ops: schemas and per-device registrations.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "bindings/module.h"

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

// The decode hot path without the dispatcher: memwarden.quant calls this for eager,
// plain tensors (no torch.compile, no dispatch mode), where dispatching a custom op from
// Python costs several times the kernel at decode sizes (1 x 8192: ~5 us of ~7).
MEMWARDEN_PYBIND(quant) {
  module.def(
      "quantize_groups",
      [](const at::Tensor& input, int64_t group_size, bool symmetric) -> QuantResult {
        if (input.is_cpu()) return quantize_int8_groups_cpu(input, group_size, symmetric);
#ifdef MEMWARDEN_WITH_CUDA
        if (input.is_cuda()) return quantize_int8_groups_cuda(input, group_size, symmetric);
#endif
        static auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("memwarden::quantize_int8_groups", "")
                             .typed<QuantResult(const at::Tensor&, int64_t, bool)>();
        return op.call(input, group_size, symmetric);
      },
      pybind11::arg("input"), pybind11::arg("group_size"), pybind11::arg("symmetric") = true,
      "torch.ops.memwarden.quantize_int8_groups without the dispatcher (eager tensors only).");
}
