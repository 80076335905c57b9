// Process-wide allocator instances shared by the bindings and the exported C functions.
#pragma once

#include "core/alloc/caching_allocator.h"

namespace memwarden::alloc {

// The host (CPU) allocator. Created on first use and never destroyed, so memory handed to
// torch tensors can be freed at any time, even while the interpreter shuts down.
CachingAllocator& host_allocator();

}  // namespace memwarden::alloc
