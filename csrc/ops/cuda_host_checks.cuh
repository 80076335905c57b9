// Host-side index checking shared by the CUDA entry points: whether to copy the index
// tensors to the host and check their values, and the check of the static INT8 scales.
// Shared so that every CUDA op family switches its checks off under the same conditions.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include "ops/checks.h"
#include "ops/paged_kv.h"

namespace memwarden::ops {

// Unless switched off (set_cuda_index_checks) or the current stream is capturing a CUDA
// graph, where a device-to-host copy would break the capture.
inline bool check_on_host() {
  return cuda_index_checks() &&
         c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

// The values of the static INT8 scales, on one host copy of both. Called where the index
// checks run (check_on_host), so with those off nothing is copied and nothing syncs.
inline void check_static_scales_on_host(const char* op, const at::Tensor& k_scale, const at::Tensor& v_scale) {
  const at::Tensor host = at::cat({k_scale.reshape(-1), v_scale.reshape(-1)}).cpu();
  const int64_t n = k_scale.numel();
  check_static_scale_values(op, "k_scale", host.narrow(0, 0, n));
  check_static_scale_values(op, "v_scale", host.narrow(0, n, n));
}

}  // namespace memwarden::ops
