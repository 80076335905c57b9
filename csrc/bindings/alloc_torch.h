// memwarden's host caching allocator as PyTorch's CPU allocator (c10::Allocator).
#pragma once

#include <cstddef>

namespace memwarden::bindings::alloc_torch {

// Makes every CPU tensor allocated afterwards come from memwarden's host pool. Returns
// false if it was installed already; throws std::runtime_error when another CPU allocator
// with a higher priority keeps it from taking effect.
bool install_host();
// Puts back the CPU allocator that was there before install_host(). Tensors allocated
// meanwhile keep working and are given back to memwarden's pool when freed.
bool uninstall_host();
bool host_installed();

// Replays an allocate/free trace through at::empty with the current CPU allocator: the
// C++-level tensor allocation rate without Python overhead (benchmarks). Returns seconds.
// ops[i] >= 0: allocate a tensor of sizes[ops[i]] bytes into slot ops[i]; ops[i] < 0: free
// slot -ops[i]-1.
double replay_trace_seconds(const long* ops, std::size_t n_ops, const long* sizes, std::size_t n_slots);

// The same trace on raw pointers, without tensors: PyTorch's default CPU allocator
// (c10::GetDefaultCPUAllocator()->raw_allocate) or memwarden's host allocator.
double replay_raw_seconds(const long* ops, std::size_t n_ops, const long* sizes, std::size_t n_slots, bool memwarden);

}  // namespace memwarden::bindings::alloc_torch
