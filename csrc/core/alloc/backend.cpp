#include "core/alloc/backend.h"

#include <unistd.h>

#include <cstdlib>
#include <stdexcept>

namespace memwarden::alloc {

void* HostBackend::allocate(std::size_t bytes) {
  void* ptr = nullptr;
  if (posix_memalign(&ptr, 4096, bytes) != 0) return nullptr;
  return ptr;
}

void HostBackend::deallocate(void* ptr, std::size_t /*bytes*/) noexcept { std::free(ptr); }

std::size_t HostBackend::free_memory() const {
  long pages = sysconf(_SC_AVPHYS_PAGES);
  long page = sysconf(_SC_PAGESIZE);
  if (pages < 0 || page < 0) return SIZE_MAX;
  return static_cast<std::size_t>(pages) * static_cast<std::size_t>(page);
}

LimitingBackend::LimitingBackend(std::shared_ptr<Backend> upstream, std::size_t limit)
    : upstream_(std::move(upstream)), limit_(limit) {
  if (!upstream_) throw std::invalid_argument("LimitingBackend: upstream must not be null");
}

void* LimitingBackend::allocate(std::size_t bytes) {
  std::size_t used = used_.load();
  do {
    if (bytes > limit_.load() || used > limit_.load() - bytes) return nullptr;
  } while (!used_.compare_exchange_weak(used, used + bytes));
  void* ptr = upstream_->allocate(bytes);
  if (ptr == nullptr) used_.fetch_sub(bytes);
  return ptr;
}

void LimitingBackend::deallocate(void* ptr, std::size_t bytes) noexcept {
  upstream_->deallocate(ptr, bytes);
  used_.fetch_sub(bytes);
}

std::size_t LimitingBackend::free_memory() const {
  std::size_t lim = limit_.load(), used = used_.load();
  std::size_t left = used >= lim ? 0 : lim - used;
  std::size_t up = upstream_->free_memory();
  return left < up ? left : up;
}

std::string LimitingBackend::name() const { return "limit(" + upstream_->name() + ")"; }

}  // namespace memwarden::alloc
