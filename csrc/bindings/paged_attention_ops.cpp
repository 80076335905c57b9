// torch.ops.memwarden.paged_attention: schema and per-device registrations. Returns
// (out, lse); the output tensors are new (the op is functional, so torch.compile and
// opcheck see no mutation).
#include <torch/library.h>

#include "ops/paged_attention.h"

using namespace memwarden::ops;

TORCH_LIBRARY_FRAGMENT(memwarden, m) {
  m.def(
      "paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor seq_lens, "
      "float scale, Tensor? query_start_loc=None, str kv_cache_dtype=\"auto\", Tensor? k_scale=None, "
      "Tensor? v_scale=None, Tensor? k_scale_cache=None, Tensor? v_scale_cache=None, int sliding_window=-1, "
      "float softcap=0.0, Tensor? sinks=None, Tensor? kv_start=None, bool causal=True) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(memwarden, CPU, m) { m.impl("paged_attention", TORCH_FN(paged_attention_cpu)); }

TORCH_LIBRARY_IMPL(memwarden, Meta, m) { m.impl("paged_attention", TORCH_FN(paged_attention_meta)); }

#ifdef MEMWARDEN_WITH_CUDA
TORCH_LIBRARY_IMPL(memwarden, CUDA, m) { m.impl("paged_attention", TORCH_FN(paged_attention_cuda)); }
#endif
