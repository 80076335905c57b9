// Upstream memory resources for the caching allocator (torch-free).
//
// A Backend hands out raw segments and takes them back, like an RMM upstream
// memory_resource. Backends that run work on streams (CUDA) also provide events, so the
// caching allocator can hold back a block that other streams still use.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace memwarden::alloc {

using StreamId = std::uintptr_t;  // an opaque stream handle (cudaStream_t), 0 = default
using EventId = void*;

class Backend {
 public:
  virtual ~Backend() = default;
  // A segment of `bytes` bytes, or nullptr when the resource has no memory left.
  virtual void* allocate(std::size_t bytes) = 0;
  virtual void deallocate(void* ptr, std::size_t bytes) noexcept = 0;
  // Memory the resource could still hand out (for error messages); SIZE_MAX if unknown.
  virtual std::size_t free_memory() const { return SIZE_MAX; }
  virtual std::string name() const = 0;

  // Cross-stream use. Without events, record_stream is a no-op for the allocator.
  virtual bool has_events() const { return false; }
  virtual EventId record_event(StreamId /*stream*/) { return nullptr; }
  virtual bool query_event(EventId /*event*/) { return true; }  // true once complete
  virtual void destroy_event(EventId /*event*/) noexcept {}
  // Waits for all outstanding work (before segments are given back).
  virtual void synchronize() {}
};

// Host memory from the C library, 4 KiB aligned.
class HostBackend final : public Backend {
 public:
  void* allocate(std::size_t bytes) override;
  void deallocate(void* ptr, std::size_t bytes) noexcept override;
  std::size_t free_memory() const override;
  std::string name() const override { return "host"; }
};

// Adaptor: caps the bytes outstanding in `upstream` (RMM's limiting_resource_adaptor).
// Emulates a device of `limit` bytes on any machine.
class LimitingBackend final : public Backend {
 public:
  LimitingBackend(std::shared_ptr<Backend> upstream, std::size_t limit);
  void* allocate(std::size_t bytes) override;
  void deallocate(void* ptr, std::size_t bytes) noexcept override;
  std::size_t free_memory() const override;
  std::string name() const override;
  bool has_events() const override { return upstream_->has_events(); }
  EventId record_event(StreamId s) override { return upstream_->record_event(s); }
  bool query_event(EventId e) override { return upstream_->query_event(e); }
  void destroy_event(EventId e) noexcept override { upstream_->destroy_event(e); }
  void synchronize() override { upstream_->synchronize(); }

  void set_limit(std::size_t limit) { limit_.store(limit); }
  std::size_t limit() const { return limit_.load(); }
  std::size_t used() const { return used_.load(); }

 private:
  std::shared_ptr<Backend> upstream_;
  std::atomic<std::size_t> limit_;
  std::atomic<std::size_t> used_{0};
};

}  // namespace memwarden::alloc
