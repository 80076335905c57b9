#include "bindings/alloc_torch.h"

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <chrono>
#include <cstdio>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "core/alloc/registry.h"

namespace memwarden::bindings::alloc_torch {
namespace {

namespace ma = memwarden::alloc;

void host_delete(void* ptr) {
  try {
    ma::host_allocator().deallocate(ptr);
  } catch (const std::exception& e) {
    // A deleter must not throw; a pointer we do not know is a bug worth seeing.
    std::fprintf(stderr, "memwarden: CPU tensor free failed: %s\n", e.what());
  }
}

class HostTorchAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const c10::Device dev(c10::DeviceType::CPU);
    if (n == 0) return {nullptr, nullptr, &host_delete, dev};
    void* p = nullptr;
    try {
      p = ma::host_allocator().allocate(n);
    } catch (const ma::OutOfMemory& e) {
      TORCH_CHECK_WITH(OutOfMemoryError, false, e.what());
    }
    return {p, p, &host_delete, dev};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &host_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

HostTorchAllocator& instance() {
  static HostTorchAllocator* a = new HostTorchAllocator();  // never destroyed
  return *a;
}

std::mutex g_mutex;
c10::Allocator* g_previous = nullptr;

}  // namespace

bool install_host() {
  std::lock_guard<std::mutex> lock(g_mutex);
  c10::Allocator* current = c10::GetAllocator(c10::DeviceType::CPU);
  if (current == &instance()) return false;
  c10::SetCPUAllocator(&instance(), /*priority=*/0);
  if (c10::GetAllocator(c10::DeviceType::CPU) != &instance())
    throw std::runtime_error("memwarden.alloc.install('cpu'): another CPU allocator was registered with a higher "
                             "priority; memwarden's cannot replace it");
  g_previous = current;
  return true;
}

bool uninstall_host() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (c10::GetAllocator(c10::DeviceType::CPU) != &instance()) return false;
  c10::Allocator* prev = g_previous != nullptr ? g_previous : c10::GetDefaultCPUAllocator();
  c10::SetCPUAllocator(prev, /*priority=*/0);
  g_previous = nullptr;
  return c10::GetAllocator(c10::DeviceType::CPU) == prev;
}

bool host_installed() { return c10::GetAllocator(c10::DeviceType::CPU) == &instance(); }

double replay_trace_seconds(const long* ops, std::size_t n_ops, const long* sizes, std::size_t n_slots) {
  std::vector<at::Tensor> slots(n_slots);
  const auto opts = at::TensorOptions().dtype(at::kByte).device(at::kCPU);
  const auto start = std::chrono::steady_clock::now();
  for (std::size_t i = 0; i < n_ops; ++i) {
    const long op = ops[i];
    if (op >= 0) slots[static_cast<std::size_t>(op)] = at::empty({sizes[op]}, opts);
    else slots[static_cast<std::size_t>(-op - 1)].reset();
  }
  const auto end = std::chrono::steady_clock::now();
  slots.clear();
  return std::chrono::duration<double>(end - start).count();
}

double replay_raw_seconds(const long* ops, std::size_t n_ops, const long* sizes, std::size_t n_slots, bool memwarden) {
  std::vector<void*> slots(n_slots, nullptr);
  c10::Allocator* dflt = c10::GetDefaultCPUAllocator();
  ma::CachingAllocator& mw = ma::host_allocator();
  const auto release = [&](void* p) {
    if (memwarden) mw.deallocate(p);
    else dflt->raw_deallocate(p);
  };
  const auto start = std::chrono::steady_clock::now();
  try {
    for (std::size_t i = 0; i < n_ops; ++i) {
      const long op = ops[i];
      if (op >= 0) {
        const auto n = static_cast<std::size_t>(sizes[op]);
        slots[static_cast<std::size_t>(op)] = memwarden ? mw.allocate(n) : dflt->raw_allocate(n);
      } else {
        void*& p = slots[static_cast<std::size_t>(-op - 1)];
        release(p);
        p = nullptr;
      }
    }
  } catch (...) {  // out of memory part-way: give back what the trace holds
    for (void* p : slots)
      if (p != nullptr) release(p);
    throw;
  }
  const auto end = std::chrono::steady_clock::now();
  return std::chrono::duration<double>(end - start).count();
}

}  // namespace memwarden::bindings::alloc_torch
