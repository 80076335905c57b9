// Checks shared by the op families (quant_int8, paged_kv).
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/util/ArrayRef.h>

#include <optional>
#include <string>
#include <utility>

namespace memwarden::ops {

// A dtype as Python spells it ("torch.float32"), for messages (c10 prints "Float").
std::string dtype_name(at::ScalarType dtype);

// A shape for messages ("[2, <symbolic>, 8]"), built with std::to_string.
std::string shape_string(const at::Tensor& t);

// Sizes and strides through guard_int, so the checks also run on the symbolic shapes of
// torch.compile (they specialise the sizes they look at).
int64_t dim_of(const at::Tensor& t, int64_t i);
int64_t stride_of(const at::Tensor& t, int64_t i);

// Argument checks whose errors start "<op>: <arg>" (TypeError for dtypes, ValueError
// for shapes and devices).
std::string prefix(const char* op, const char* arg);  // "<op>: <arg>"
bool is_float(at::ScalarType t);  // float32, float16 or bfloat16
void check_float(const char* op, const char* arg, const at::Tensor& t);
void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim, const char* expected);
// A contiguous last dimension and no negative strides.
void check_inner_contiguous(const char* op, const char* arg, const at::Tensor& t);
void check_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& cache);
void check_index_dtype(const char* op, const char* arg, const at::Tensor& t, bool allow_int32);
// Element i of a contiguous int32 or int64 CPU tensor.
int64_t index_at(const at::Tensor& t, int64_t i);

// Outputs are rejected the way torch's in-place ops reject them (ATen/MemoryOverlap.h):
// an output whose elements share memory (a stride-0 or overlapping as_strided view),
// or two tensors of which one writes what the other reads or writes. Each error names
// the Python arguments.
void check_no_internal_overlap(const char* op, const char* name, const at::Tensor& out);
void check_no_overlap(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                      const at::Tensor& b);

// A tensor argument by name; null when an optional one is absent.
using NamedTensor = std::pair<const char*, const at::Tensor*>;
const at::Tensor* optional_arg(const std::optional<at::Tensor>& t);
// An optional tensor argument as the kernels take it: undefined when absent.
at::Tensor defined_or_empty(const std::optional<at::Tensor>& t);

// Every output has no internal overlap and overlaps no other output and no input.
// Outputs are compared only where their byte spans meet (sorted by start), so the caches
// of n layers (copy_blocks) cost n log n comparisons, not n^2.
void check_outputs_independent(const char* op, c10::ArrayRef<NamedTensor> outputs, c10::ArrayRef<NamedTensor> inputs);

// Every value of a static quantization scale (a float32 CPU tensor) must be positive and
// finite: a zero, negative or NaN scale quantizes every value to the zero point, silently
// wiping what is written. A ValueError names `name` and the first bad element (nothing is
// checked for tensors without values: Meta, fake or functional ones under torch.compile).
void check_static_scale_values(const char* op, const char* name, const at::Tensor& scale_cpu);

// The same for a scale on any device, as the quant family checks it: CPU values are read;
// reading a CUDA scale would wait for the GPU on every call, so there the check is a
// device-side assertion (at::_assert_async), free of synchronization, that surfaces as a
// CUDA error at the next one (and, like any device-side assertion, leaves the CUDA
// context unusable). The paged-KV family instead checks a host copy when its CUDA index
// checks run (they synchronise anyway; see paged_kv.h). Meta and traced tensors have no
// values: nothing is checked.
void check_static_scale(const char* op, const char* name, const at::Tensor& scale);

}  // namespace memwarden::ops
