#include "core/alloc/registry.h"

namespace memwarden::alloc {

CachingAllocator& host_allocator() {
  static CachingAllocator* instance = new CachingAllocator(std::make_shared<HostBackend>(), Options{}, "cpu");
  return *instance;
}

}  // namespace memwarden::alloc
