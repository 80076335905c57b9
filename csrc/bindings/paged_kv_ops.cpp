// torch.ops.memwarden paged KV cache ops: schemas and per-device registrations. All ops
// write in place and return nothing, like vLLM's.
#include <torch/library.h>

#include "bindings/module.h"

#include "ops/paged_kv.h"

using namespace memwarden::ops;

TORCH_LIBRARY_FRAGMENT(memwarden, m) {
  m.def(
      "reshape_and_cache_flash(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale, "
      "Tensor(c!)? k_scale_cache=None, Tensor(d!)? v_scale_cache=None) -> ()");
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale) -> ()");
  m.def("copy_blocks(Tensor(a!)[] key_caches, Tensor(b!)[] value_caches, Tensor block_mapping) -> ()");
  m.def("swap_blocks(Tensor src, Tensor(a!) dst, int block_size_in_bytes, Tensor block_mapping) -> ()");
  m.def(
      "gather_cache(Tensor key_cache, Tensor value_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor(a!) key_out, Tensor(b!) value_out, str kv_cache_dtype=\"auto\", Tensor? k_scale=None, "
      "Tensor? v_scale=None, Tensor? k_scale_cache=None, Tensor? v_scale_cache=None) -> ()");
}

TORCH_LIBRARY_IMPL(memwarden, CPU, m) {
  m.impl("reshape_and_cache_flash", TORCH_FN(reshape_and_cache_flash_cpu));
  m.impl("reshape_and_cache", TORCH_FN(reshape_and_cache_cpu));
  m.impl("copy_blocks", TORCH_FN(copy_blocks_cpu));
  m.impl("swap_blocks", TORCH_FN(swap_blocks_cpu));
  m.impl("gather_cache", TORCH_FN(gather_cache_cpu));
}

TORCH_LIBRARY_IMPL(memwarden, Meta, m) {
  m.impl("reshape_and_cache_flash", TORCH_FN(reshape_and_cache_flash_meta));
  m.impl("reshape_and_cache", TORCH_FN(reshape_and_cache_meta));
  m.impl("copy_blocks", TORCH_FN(copy_blocks_meta));
  m.impl("swap_blocks", TORCH_FN(swap_blocks_meta));
  m.impl("gather_cache", TORCH_FN(gather_cache_meta));
}

#ifdef MEMWARDEN_WITH_CUDA
TORCH_LIBRARY_IMPL(memwarden, CUDA, m) {
  m.impl("reshape_and_cache_flash", TORCH_FN(reshape_and_cache_flash_cuda));
  m.impl("reshape_and_cache", TORCH_FN(reshape_and_cache_cuda));
  m.impl("copy_blocks", TORCH_FN(copy_blocks_cuda));
  m.impl("swap_blocks", TORCH_FN(swap_blocks_cuda));
  m.impl("gather_cache", TORCH_FN(gather_cache_cuda));
}
#endif

// memwarden._C.paged_kv: settings of the ops that are not arguments.
MEMWARDEN_PYBIND(paged_kv) {
  module.def("cuda_index_checks", &cuda_index_checks,
             "Whether CUDA ops check index values on a host copy (a stream sync) before writing");
  module.def("set_cuda_index_checks", &set_cuda_index_checks, pybind11::arg("enabled"),
             "Switches the CUDA index checks on or off; returns the previous setting");
}
