#include "ops/checks.h"

#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/MemoryOverlap.h>

#include <c10/util/SmallVector.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace memwarden::ops {

std::string dtype_name(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

std::string shape_string(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    const auto v = t.sym_size(i).maybe_as_int();
    out += (i ? ", " : "") + (v ? std::to_string(*v) : std::string("<symbolic>"));
  }
  return out + "]";
}

int64_t dim_of(const at::Tensor& t, int64_t i) { return t.sym_size(i).guard_int(__FILE__, __LINE__); }
int64_t stride_of(const at::Tensor& t, int64_t i) { return t.sym_stride(i).guard_int(__FILE__, __LINE__); }

std::string prefix(const char* op, const char* arg) { return std::string(op) + ": " + arg; }

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void check_float(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), prefix(op, arg) +
                                                  " must be torch.float32, torch.float16 or torch.bfloat16, got " +
                                                  dtype_name(t.scalar_type()));
}

void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim, const char* expected) {
  TORCH_CHECK_VALUE(t.dim() == dim, prefix(op, arg) + " must have " + std::to_string(dim) + " dimensions " +
                                        expected + ", got shape " + shape_string(t));
}

void check_inner_contiguous(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 0 || dim_of(t, -1) <= 1 || stride_of(t, -1) == 1,
                    prefix(op, arg) + " must have a contiguous last dimension (stride 1), got stride " +
                        std::to_string(stride_of(t, -1)));
  for (int64_t i = 0; i < t.dim(); ++i)
    TORCH_CHECK_VALUE(stride_of(t, i) >= 0, prefix(op, arg) + " must not have negative strides");
}

void check_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& cache) {
  TORCH_CHECK_VALUE(t.device() == cache.device(), prefix(op, arg) + " must be on " + cache.device().str() +
                                                      " like the cache, got " + t.device().str());
}

void check_index_dtype(const char* op, const char* arg, const at::Tensor& t, bool allow_int32) {
  const bool ok = t.scalar_type() == at::kLong || (allow_int32 && t.scalar_type() == at::kInt);
  TORCH_CHECK_TYPE(ok, prefix(op, arg) + " must be " + (allow_int32 ? "torch.int32 or torch.int64" : "torch.int64") +
                           ", got " + dtype_name(t.scalar_type()));
}

int64_t index_at(const at::Tensor& t, int64_t i) {
  return t.scalar_type() == at::kInt ? t.const_data_ptr<int32_t>()[i] : t.const_data_ptr<int64_t>()[i];
}

namespace {
// Whether t has memory to read or compare: not a Meta tensor, nor one of the stand-ins
// torch.compile traces with (fake and functional tensors, symbolic sizes).
bool is_concrete(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  return !t.is_meta() && !impl->is_python_dispatch() && !impl->has_symbolic_sizes_strides() &&
         !at::functionalization::impl::isFunctionalTensor(t);
}

// The addresses from a tensor's first byte to one past its last (strides are non-negative),
// from its storage: the data pointer of a tensor with symbolic sizes cannot be read.
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  const c10::Storage& storage = t.unsafeGetTensorImpl()->unsafe_storage();
  const int64_t es = static_cast<int64_t>(t.element_size());
  const uintptr_t begin = reinterpret_cast<uintptr_t>(storage ? storage.data() : nullptr) +
                          t.sym_storage_offset().guard_int(__FILE__, __LINE__) * es;
  int64_t last = 0;
  for (int64_t i = 0; i < t.dim(); ++i) {
    const int64_t size = t.sym_size(i).guard_int(__FILE__, __LINE__);
    if (size == 0) return {begin, begin};
    last += (size - 1) * t.sym_stride(i).guard_int(__FILE__, __LINE__);
  }
  return {begin, begin + (last + 1) * es};
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

const at::Tensor* optional_arg(const std::optional<at::Tensor>& t) { return t && t->defined() ? &*t : nullptr; }

at::Tensor defined_or_empty(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

void check_outputs_independent(const char* op, c10::ArrayRef<NamedTensor> outputs,
                               c10::ArrayRef<NamedTensor> inputs) {
  c10::SmallVector<size_t, 4> order;
  c10::SmallVector<std::pair<uintptr_t, uintptr_t>, 4> spans(outputs.size());
  for (size_t i = 0; i < outputs.size(); ++i) {
    const auto& [name, t] = outputs[i];
    if (!t) continue;
    check_no_internal_overlap(op, name, *t);
    for (const auto& [input, u] : inputs)
      if (u) check_no_overlap(op, name, *t, input, *u);
    spans[i] = byte_span(*t);
    order.push_back(i);
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return spans[a].first < spans[b].first; });
  for (size_t i = 0; i < order.size(); ++i) {
    for (size_t j = i + 1; j < order.size() && spans[order[j]].first < spans[order[i]].second; ++j) {
      const size_t a = std::min(order[i], order[j]), b = std::max(order[i], order[j]);
      check_no_overlap(op, outputs[a].first, *outputs[a].second, outputs[b].first, *outputs[b].second);
    }
  }
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
