#include "ops/checks.h"

#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <string>

namespace memwarden::ops {

std::string dtype_name(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

namespace {
// Whether t has memory to read or compare: not a Meta tensor, nor one of the stand-ins
// torch.compile traces with (fake and functional tensors, symbolic sizes).
bool is_concrete(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return !t.is_meta() && !impl->is_python_dispatch() && !impl->has_symbolic_sizes_strides() &&
         !at::functionalization::impl::isFunctionalTensor(t);
}
}  // namespace

void check_no_internal_overlap(const char* op, const char* name, const at::Tensor& out) {
  if (out.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return;
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op, ": ", name,
                    " has elements that share memory (e.g. an expanded or overlapping view); "
                    "an output needs one location per element (call .clone() first)");
}

void check_no_overlap(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                      const at::Tensor& b) {
  // Meta and fake tensors have storages to compare; symbolic sizes have no numbers.
  if (a.unsafeGetTensorImpl()->has_symbolic_sizes_strides() || b.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return;
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, op, ": ",
                    name_a, " and ", name_b, " overlap in memory; pass tensors that do not share storage");
}

void check_static_scale_values(const char* op, const char* name, const at::Tensor& scale_cpu) {
  if (!is_concrete(scale_cpu)) return;
  const at::Tensor values = scale_cpu.contiguous();
  const float* data = values.const_data_ptr<float>();
  for (int64_t i = 0; i < values.numel(); ++i) {
    if (data[i] > 0.0f && std::isfinite(data[i])) continue;
    C10_THROW_ERROR(ValueError, std::string(op) + ": " + name + " must be positive and finite, got " + name + "[" +
                                    std::to_string(i) + "] = " + std::to_string(data[i]));
  }
}

void check_static_scale(const char* op, const char* name, const at::Tensor& scale) {
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, op, ": ", name, " must be torch.float32, got ",
                   dtype_name(scale.scalar_type()));
  if (!is_concrete(scale) || scale.numel() == 0) return;
  if (scale.is_cpu()) {
    check_static_scale_values(op, name, scale);
    return;
  }
  at::_assert_async(at::logical_and(scale > 0, at::isfinite(scale)).all(),
                    std::string(op) + ": " + name + " must be positive and finite");
}

}  // namespace memwarden::ops
