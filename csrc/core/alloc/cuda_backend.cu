// CUDA backend of the caching allocator: segments from cudaMalloc, cross-stream safety
// from CUDA events, and the C entry points of torch.cuda.memory.CUDAPluggableAllocator.
#include <cuda_runtime.h>
#include <sys/types.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "core/alloc/cuda_backend.h"

namespace memwarden::alloc {
namespace {

constexpr int kMaxDevices = 64;

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&prev_);
    if (prev_ != device) cudaSetDevice(device);
    device_ = device;
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = 0, device_ = 0;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {}
  void* allocate(std::size_t bytes) override {
    DeviceGuard g(device_);
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // clear the sticky-free error state of a failed malloc
      return nullptr;
    }
    return p;
  }
  void deallocate(void* ptr, std::size_t) noexcept override {
    DeviceGuard g(device_);
    cudaFree(ptr);
  }
  std::size_t free_memory() const override {
    DeviceGuard g(device_);
    std::size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) return SIZE_MAX;
    return free;
  }
  std::string name() const override { return "cuda:" + std::to_string(device_); }
  bool has_events() const override { return true; }
  EventId record_event(StreamId stream) override {
    DeviceGuard g(device_);
    cudaEvent_t ev = nullptr;
    if (cudaEventCreateWithFlags(&ev, cudaEventDisableTiming) != cudaSuccess)
      throw std::runtime_error("memwarden: cudaEventCreate failed");
    cudaEventRecord(ev, reinterpret_cast<cudaStream_t>(stream));
    return ev;
  }
  bool query_event(EventId e) override {
    cudaError_t err = cudaEventQuery(static_cast<cudaEvent_t>(e));
    if (err == cudaErrorNotReady) {
      (void)cudaGetLastError();
      return false;
    }
    return true;
  }
  void destroy_event(EventId e) noexcept override { cudaEventDestroy(static_cast<cudaEvent_t>(e)); }
  void synchronize() override {
    DeviceGuard g(device_);
    cudaDeviceSynchronize();
  }

 private:
  int device_;
};

std::mutex g_mutex;  // serialises the creation of allocators, not their use
std::array<std::atomic<CachingAllocator*>, kMaxDevices> g_allocators{};

// The device count is fixed once CUDA is initialised; asking the runtime on every
// allocation would put an API call on the hot path.
int device_count_once() {
  static const int count = cuda_device_count();
  return count;
}

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

CachingAllocator& cuda_allocator(int device) {
  if (device < 0 || device >= kMaxDevices || device >= device_count_once())
    throw std::out_of_range("memwarden: no CUDA device " + std::to_string(device));
  if (CachingAllocator* existing = g_allocators[device].load(std::memory_order_acquire)) return *existing;
  std::lock_guard<std::mutex> lock(g_mutex);
  CachingAllocator* allocator = g_allocators[device].load(std::memory_order_relaxed);
  if (allocator == nullptr) {  // never freed: tensors may outlive every Python object
    allocator = new CachingAllocator(std::make_shared<CudaBackend>(device), Options{}, "cuda:" + std::to_string(device));
    g_allocators[device].store(allocator, std::memory_order_release);
  }
  return *allocator;
}

}  // namespace memwarden::alloc

// ---- torch.cuda.memory.CUDAPluggableAllocator entry points ------------------------------
#define MEMWARDEN_EXPORT extern "C" __attribute__((visibility("default")))

MEMWARDEN_EXPORT void* memwarden_cuda_malloc(ssize_t size, int device, cudaStream_t stream) {
  if (size <= 0) return nullptr;
  try {
    return memwarden::alloc::cuda_allocator(device).allocate(static_cast<std::size_t>(size),
                                                             reinterpret_cast<memwarden::alloc::StreamId>(stream));
  } catch (const std::exception& e) {
    // The pluggable allocator treats nullptr as out of memory and raises torch.OutOfMemoryError.
    std::fprintf(stderr, "%s\n", e.what());
    return nullptr;
  }
}

MEMWARDEN_EXPORT void memwarden_cuda_free(void* ptr, ssize_t /*size*/, int device, cudaStream_t /*stream*/) {
  if (ptr == nullptr) return;
  try {
    memwarden::alloc::cuda_allocator(device).deallocate(ptr);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "memwarden: CUDA free failed: %s\n", e.what());
  }
}

MEMWARDEN_EXPORT void memwarden_cuda_record_stream(void* ptr, cudaStream_t stream, int device) {
  try {
    memwarden::alloc::cuda_allocator(device).record_stream(ptr, reinterpret_cast<memwarden::alloc::StreamId>(stream));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "memwarden: record_stream failed: %s\n", e.what());
  }
}

MEMWARDEN_EXPORT void memwarden_cuda_empty_cache() {
  for (int d = 0; d < memwarden::alloc::cuda_device_count(); ++d) memwarden::alloc::cuda_allocator(d).empty_cache();
}
