// The CUDA backend (cuda_backend.cu, compiled into the extension when CUDA is on) and the
// C functions torch.cuda.memory.CUDAPluggableAllocator loads:
//   void* memwarden_cuda_malloc(ssize_t size, int device, cudaStream_t stream);
//   void  memwarden_cuda_free(void* ptr, ssize_t size, int device, cudaStream_t stream);
#pragma once

#include "core/alloc/caching_allocator.h"

namespace memwarden::alloc {

// The caching allocator of CUDA device `device` (created on first use, never destroyed).
// Throws std::out_of_range for a device that does not exist.
CachingAllocator& cuda_allocator(int device);
int cuda_device_count();

}  // namespace memwarden::alloc
