// Checks shared by the op families (quant_int8, paged_kv).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace memwarden::ops {

// A dtype as Python spells it ("torch.float32"), for messages (c10 prints "Float").
std::string dtype_name(at::ScalarType dtype);

// Outputs are rejected the way torch's in-place ops reject them (ATen/MemoryOverlap.h):
// an output whose elements share memory (a stride-0 or overlapping as_strided view),
// or two tensors of which one writes what the other reads or writes. Each error names
// the Python arguments.
void check_no_internal_overlap(const char* op, const char* name, const at::Tensor& out);
void check_no_overlap(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                      const at::Tensor& b);

// `scale` must be float32 and each element be positive and finite: a zero, negative or
// NaN scale quantizes every value to the zero point, silently wiping what is written.
// On the CPU (and on the host-resident scales of any device) the values are read and a
// bad one is a ValueError naming `name`. Reading a CUDA scale would wait for the GPU on
// every call, so there the check is a device-side assertion (at::_assert_async): it
// costs no synchronization and surfaces as a CUDA error at the next one (a device-side
// assertion leaves the CUDA context unusable, like an out-of-bounds index). Meta
// tensors have no values to check.
void check_static_scale(const char* op, const char* name, const at::Tensor& scale);

}  // namespace memwarden::ops
