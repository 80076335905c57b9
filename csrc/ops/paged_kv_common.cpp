// Device-generic parts of the paged KV family: argument checks (which are also the Meta
// kernels) and the checks of index and scale values on CPU copies.
//
// Messages are built from strings with std::to_string, never by streaming numbers (see
// quant_int8_common.cpp). Sizes go through guard_int so the checks also run on the
// symbolic shapes of torch.compile (they specialise the sizes they look at).
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "ops/checks.h"
#include "ops/paged_kv.h"

namespace memwarden::ops {
namespace {

using std::to_string;

// A static dequantization scale: fp32, [1] or [num_heads] elements, contiguous, and (on
// the CPU; the CUDA ops check a host copy, see check_static_scale_values) every value
// positive and finite.
bool check_static_scale(const char* op, const char* arg, const at::Tensor& scale, const at::Tensor& cache,
                        int64_t num_heads) {
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat,
                   prefix(op, arg) + " must be torch.float32, got " + dtype_name(scale.scalar_type()));
  const int64_t n = scale.sym_numel().guard_int(__FILE__, __LINE__);
  TORCH_CHECK_VALUE(n == 1 || n == num_heads, prefix(op, arg) + " must have 1 or num_heads = " +
                                                  to_string(num_heads) + " elements, got shape " +
                                                  shape_string(scale));
  TORCH_CHECK_VALUE(scale.is_contiguous(), prefix(op, arg) + " must be contiguous");
  check_device(op, arg, scale, cache);
  if (scale.is_cpu()) check_static_scale_values(op, arg, scale);
  return n != 1 || num_heads == 1;
}

// A per-(token, head) scale cache [num_blocks, block_size, num_heads] fp32.
void check_scale_cache(const char* op, const char* arg, const std::optional<at::Tensor>& t, const at::Tensor& cache,
                       int64_t num_blocks, int64_t block_size, int64_t num_heads, int64_t strides[3]) {
  TORCH_CHECK_VALUE(t.has_value() && t->defined(),
                    prefix(op, arg) + " is required for kv_cache_dtype \"int8_per_token_head\"");
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat,
                   prefix(op, arg) + " must be torch.float32, got " + dtype_name(t->scalar_type()));
  check_dim(op, arg, *t, 3, "[num_blocks, block_size, num_heads]");
  TORCH_CHECK_VALUE(dim_of(*t, 0) == num_blocks && dim_of(*t, 1) == block_size && dim_of(*t, 2) == num_heads,
                    prefix(op, arg) + " must have shape [" + to_string(num_blocks) + ", " + to_string(block_size) +
                        ", " + to_string(num_heads) + "], got " + shape_string(*t));
  for (int i = 0; i < 3; ++i) {
    strides[i] = stride_of(*t, i);
    TORCH_CHECK_VALUE(strides[i] >= 0, prefix(op, arg) + " must not have negative strides");
  }
  check_device(op, arg, *t, cache);
}

void check_no_scale_cache(const char* op, const char* arg, const std::optional<at::Tensor>& t) {
  TORCH_CHECK_VALUE(!t.has_value() || !t->defined(),
                    prefix(op, arg) + " is only used with kv_cache_dtype \"int8_per_token_head\"");
}

// A flash-layout cache [num_blocks, block_size, num_heads, head_size].
void check_flash_cache(const char* op, const char* arg, const at::Tensor& cache, KvCacheDtype dtype,
                       std::optional<at::ScalarType> float_dtype) {
  check_dim(op, arg, cache, 4, "[num_blocks, block_size, num_heads, head_size]");
  check_inner_contiguous(op, arg, cache);
  if (dtype == KvCacheDtype::kAuto) {
    if (float_dtype) {
      TORCH_CHECK_TYPE(cache.scalar_type() == *float_dtype,
                       prefix(op, arg) + " must have the dtype of key/value (" + dtype_name(*float_dtype) +
                           ") with kv_cache_dtype \"auto\", got " + dtype_name(cache.scalar_type()));
    } else {
      check_float(op, arg, cache);
    }
  } else {
    TORCH_CHECK_TYPE(cache.scalar_type() == at::kChar, prefix(op, arg) +
                                                           " must be torch.int8 with an int8 kv_cache_dtype, got " +
                                                           dtype_name(cache.scalar_type()));
  }
  TORCH_CHECK_VALUE(dim_of(cache, 1) > 0, prefix(op, arg) + " must have a positive block size, got shape " +
                                              shape_string(cache));
}

void fill_flash_cache_strides(const at::Tensor& key_cache, const at::Tensor& value_cache, FlashGeometry& g) {
  g.k_block_stride = stride_of(key_cache, 0);
  g.k_slot_stride = stride_of(key_cache, 1);
  g.k_head_stride = stride_of(key_cache, 2);
  g.v_block_stride = stride_of(value_cache, 0);
  g.v_slot_stride = stride_of(value_cache, 1);
  g.v_head_stride = stride_of(value_cache, 2);
}

void check_same_shape(const char* op, const char* a, const at::Tensor& x, const char* b, const at::Tensor& y) {
  bool same = x.dim() == y.dim();
  for (int64_t i = 0; same && i < x.dim(); ++i) same = dim_of(x, i) == dim_of(y, i);
  TORCH_CHECK_VALUE(same, std::string(op) + ": " + a + " and " + b + " must have the same shape, got " +
                              shape_string(x) + " and " + shape_string(y));
}

// The writes' slot mapping is int64 [num_tokens], and every tensor is on key_cache's device.
void check_slot_mapping_and_devices(const char* op, const at::Tensor& key, const at::Tensor& value,
                                    const at::Tensor& key_cache, const at::Tensor& value_cache,
                                    const at::Tensor& slot_mapping) {
  check_dim(op, "slot_mapping", slot_mapping, 1, "[num_tokens]");
  check_index_dtype(op, "slot_mapping", slot_mapping, /*allow_int32=*/false);
  check_device(op, "key", key, key_cache);
  check_device(op, "value", value, key_cache);
  check_device(op, "value_cache", value_cache, key_cache);
  check_device(op, "slot_mapping", slot_mapping, key_cache);
}

// value holds num_heads heads of head_size like key, and both hold at least num_tokens
// rows (they may be longer: padded), so the kernels never read past either.
void check_value_and_token_rows(const char* op, const at::Tensor& key, const at::Tensor& value, int64_t num_heads,
                                int64_t head_size, int64_t num_tokens) {
  TORCH_CHECK_VALUE(dim_of(value, 1) == num_heads && dim_of(value, 2) == head_size,
                    std::string(op) + ": value has " + to_string(dim_of(value, 1)) + " heads of size " +
                        to_string(dim_of(value, 2)) + " but the cache holds " + to_string(num_heads) +
                        " heads of size " + to_string(head_size));
  TORCH_CHECK_VALUE(dim_of(key, 0) >= num_tokens && dim_of(value, 0) >= num_tokens,
                    std::string(op) + ": key and value need at least slot_mapping.size(0) = " +
                        to_string(num_tokens) + " tokens, got " + to_string(dim_of(key, 0)) + " and " +
                        to_string(dim_of(value, 0)));
}

// The scales an INT8 cache dtype needs, into g: static k/v scales for "int8" (null when
// not given), per-(token, head) scale caches for "int8_per_token_head" (and none else).
void check_cache_scales(const char* op, KvCacheDtype dtype, const at::Tensor* k_scale, const at::Tensor* v_scale,
                        const std::optional<at::Tensor>& k_scale_cache,
                        const std::optional<at::Tensor>& v_scale_cache, const at::Tensor& key_cache,
                        FlashGeometry& g) {
  if (dtype == KvCacheDtype::kInt8) {
    TORCH_CHECK_VALUE(k_scale && v_scale,
                      std::string(op) + ": k_scale and v_scale are required for kv_cache_dtype \"int8\"");
    g.per_head_scale = check_static_scale(op, "k_scale", *k_scale, key_cache, g.num_heads);
    const bool v_per_head = check_static_scale(op, "v_scale", *v_scale, key_cache, g.num_heads);
    TORCH_CHECK_VALUE(v_per_head == g.per_head_scale,
                      std::string(op) + ": k_scale and v_scale must have the same number of elements, got " +
                          shape_string(*k_scale) + " and " + shape_string(*v_scale));
  }
  if (dtype == KvCacheDtype::kInt8PerTokenHead) {
    int64_t ks[3], vs[3];
    check_scale_cache(op, "k_scale_cache", k_scale_cache, key_cache, g.num_blocks, g.block_size, g.num_heads, ks);
    check_scale_cache(op, "v_scale_cache", v_scale_cache, key_cache, g.num_blocks, g.block_size, g.num_heads, vs);
    g.ks_block_stride = ks[0], g.ks_slot_stride = ks[1], g.ks_head_stride = ks[2];
    g.vs_block_stride = vs[0], g.vs_slot_stride = vs[1], g.vs_head_stride = vs[2];
  } else {
    check_no_scale_cache(op, "k_scale_cache", k_scale_cache);
    check_no_scale_cache(op, "v_scale_cache", v_scale_cache);
  }
}

}  // namespace

KvCacheDtype parse_kv_cache_dtype(const char* op, c10::string_view name) {
  if (name == "auto") return KvCacheDtype::kAuto;
  if (name == "int8") return KvCacheDtype::kInt8;
  if (name == "int8_per_token_head") return KvCacheDtype::kInt8PerTokenHead;
  TORCH_CHECK_VALUE(false, std::string(op) + ": kv_cache_dtype must be \"auto\", \"int8\" or "
                                             "\"int8_per_token_head\", got \"" +
                               std::string(name) + "\"");
  return KvCacheDtype::kAuto;
}

FlashGeometry reshape_and_cache_flash_check(const at::Tensor& key, const at::Tensor& value,
                                            const at::Tensor& key_cache, const at::Tensor& value_cache,
                                            const at::Tensor& slot_mapping, KvCacheDtype dtype,
                                            const at::Tensor& k_scale, const at::Tensor& v_scale,
                                            const std::optional<at::Tensor>& k_scale_cache,
                                            const std::optional<at::Tensor>& v_scale_cache) {
  const char* op = "reshape_and_cache_flash";
  check_dim(op, "key", key, 3, "[num_tokens, num_heads, head_size]");
  check_dim(op, "value", value, 3, "[num_tokens, num_heads, head_size]");
  check_float(op, "key", key);
  TORCH_CHECK_TYPE(value.scalar_type() == key.scalar_type(), std::string(op) + ": value must have the dtype of key (" +
                                                                 dtype_name(key.scalar_type()) + "), got " +
                                                                 dtype_name(value.scalar_type()));
  check_inner_contiguous(op, "key", key);
  check_inner_contiguous(op, "value", value);
  check_flash_cache(op, "key_cache", key_cache, dtype, key.scalar_type());
  check_flash_cache(op, "value_cache", value_cache, dtype, key.scalar_type());
  check_same_shape(op, "key_cache", key_cache, "value_cache", value_cache);
  check_slot_mapping_and_devices(op, key, value, key_cache, value_cache, slot_mapping);

  FlashGeometry g;
  g.num_blocks = dim_of(key_cache, 0);
  g.block_size = dim_of(key_cache, 1);
  g.num_heads = dim_of(key_cache, 2);
  g.head_size = dim_of(key_cache, 3);
  g.num_tokens = dim_of(slot_mapping, 0);
  TORCH_CHECK_VALUE(dim_of(key, 1) == g.num_heads && dim_of(key, 2) == g.head_size,
                    std::string(op) + ": key has " + to_string(dim_of(key, 1)) + " heads of size " +
                        to_string(dim_of(key, 2)) + " but the cache holds " + to_string(g.num_heads) +
                        " heads of size " + to_string(g.head_size) + " (key " + shape_string(key) + ", key_cache " +
                        shape_string(key_cache) + ")");
  check_value_and_token_rows(op, key, value, g.num_heads, g.head_size, g.num_tokens);
  g.src_token_stride = stride_of(key, 0);
  g.src_head_stride = stride_of(key, 1);
  g.src_v_token_stride = stride_of(value, 0);
  g.src_v_head_stride = stride_of(value, 1);
  fill_flash_cache_strides(key_cache, value_cache, g);

  check_cache_scales(op, dtype, &k_scale, &v_scale, k_scale_cache, v_scale_cache, key_cache, g);
  const bool int8 = dtype == KvCacheDtype::kInt8;
  check_outputs_independent(op,
                            {{"key_cache", &key_cache},
                             {"value_cache", &value_cache},
                             {"k_scale_cache", optional_arg(k_scale_cache)},
                             {"v_scale_cache", optional_arg(v_scale_cache)}},
                            {{"key", &key},
                             {"value", &value},
                             {"slot_mapping", &slot_mapping},
                             {"k_scale", int8 ? &k_scale : nullptr},
                             {"v_scale", int8 ? &v_scale : nullptr}});
  return g;
}

void reshape_and_cache_flash_meta(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                                  c10::string_view kv_cache_dtype, const at::Tensor& k_scale,
                                  const at::Tensor& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                                  const std::optional<at::Tensor>& v_scale_cache) {
  reshape_and_cache_flash_check(key, value, key_cache, value_cache, slot_mapping,
                                parse_kv_cache_dtype("reshape_and_cache_flash", kv_cache_dtype), k_scale, v_scale,
                                k_scale_cache, v_scale_cache);
}

LegacyGeometry reshape_and_cache_check(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                                       const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                                       KvCacheDtype dtype, const at::Tensor& k_scale, const at::Tensor& v_scale) {
  const char* op = "reshape_and_cache";
  TORCH_CHECK_VALUE(dtype != KvCacheDtype::kInt8PerTokenHead,
                    std::string(op) + ": kv_cache_dtype \"int8_per_token_head\" needs the flash layout "
                                      "(reshape_and_cache_flash)");
  check_dim(op, "key", key, 3, "[num_tokens, num_heads, head_size]");
  check_dim(op, "value", value, 3, "[num_tokens, num_heads, head_size]");
  check_float(op, "key", key);
  TORCH_CHECK_TYPE(value.scalar_type() == key.scalar_type(),
                   std::string(op) + ": value must have the dtype of key (" + dtype_name(key.scalar_type()) +
                       "), got " + dtype_name(value.scalar_type()));
  check_inner_contiguous(op, "key", key);
  check_inner_contiguous(op, "value", value);
  check_dim(op, "key_cache", key_cache, 5, "[num_blocks, num_heads, head_size / x, block_size, x]");
  check_dim(op, "value_cache", value_cache, 4, "[num_blocks, num_heads, head_size, block_size]");
  for (const auto& [name, cache] : {std::pair<const char*, const at::Tensor&>{"key_cache", key_cache},
                                    std::pair<const char*, const at::Tensor&>{"value_cache", value_cache}}) {
    TORCH_CHECK_VALUE(cache.is_contiguous(), prefix(op, name) + " must be contiguous");
    if (dtype == KvCacheDtype::kAuto) {
      TORCH_CHECK_TYPE(cache.scalar_type() == key.scalar_type(),
                       prefix(op, name) + " must have the dtype of key/value (" + dtype_name(key.scalar_type()) +
                           ") with kv_cache_dtype \"auto\", got " + dtype_name(cache.scalar_type()));
    } else {
      TORCH_CHECK_TYPE(cache.scalar_type() == at::kChar, prefix(op, name) +
                                                             " must be torch.int8 with kv_cache_dtype \"int8\", got " +
                                                             dtype_name(cache.scalar_type()));
    }
  }
  check_slot_mapping_and_devices(op, key, value, key_cache, value_cache, slot_mapping);

  LegacyGeometry g;
  g.num_blocks = dim_of(key_cache, 0);
  g.num_heads = dim_of(key_cache, 1);
  g.block_size = dim_of(key_cache, 3);
  g.x = dim_of(key_cache, 4);
  g.head_size = dim_of(key, 2);
  g.num_tokens = dim_of(slot_mapping, 0);
  const int64_t expected_x = 16 / static_cast<int64_t>(key_cache.element_size());
  TORCH_CHECK_VALUE(g.x == expected_x, std::string(op) + ": key_cache's last dimension must be x = 16 bytes / " +
                                           to_string(key_cache.element_size()) + " = " + to_string(expected_x) +
                                           ", got shape " + shape_string(key_cache));
  TORCH_CHECK_VALUE(g.block_size > 0, std::string(op) + ": key_cache must have a positive block size");
  TORCH_CHECK_VALUE(g.head_size % g.x == 0, std::string(op) + ": head_size " + to_string(g.head_size) +
                                                " is not a multiple of x = " + to_string(g.x) +
                                                " (16 bytes of the cache dtype), so the legacy layout cannot hold it");
  TORCH_CHECK_VALUE(dim_of(key_cache, 2) == g.head_size / g.x && dim_of(key, 1) == g.num_heads,
                    std::string(op) + ": key " + shape_string(key) + " does not fit key_cache " +
                        shape_string(key_cache) + " ([num_blocks, num_heads, head_size / x, block_size, x])");
  TORCH_CHECK_VALUE(dim_of(value_cache, 0) == g.num_blocks && dim_of(value_cache, 1) == g.num_heads &&
                        dim_of(value_cache, 2) == g.head_size && dim_of(value_cache, 3) == g.block_size,
                    std::string(op) + ": value_cache must have shape [" + to_string(g.num_blocks) + ", " +
                        to_string(g.num_heads) + ", " + to_string(g.head_size) + ", " + to_string(g.block_size) +
                        "], got " + shape_string(value_cache));
  check_value_and_token_rows(op, key, value, g.num_heads, g.head_size, g.num_tokens);
  g.key_token_stride = stride_of(key, 0);
  g.key_head_stride = stride_of(key, 1);
  g.value_token_stride = stride_of(value, 0);
  g.value_head_stride = stride_of(value, 1);
  if (dtype == KvCacheDtype::kInt8) {
    g.per_head_scale = check_static_scale(op, "k_scale", k_scale, key_cache, g.num_heads);
    const bool v_per_head = check_static_scale(op, "v_scale", v_scale, key_cache, g.num_heads);
    TORCH_CHECK_VALUE(v_per_head == g.per_head_scale,
                      std::string(op) + ": k_scale and v_scale must have the same number of elements");
  }
  const bool int8 = dtype == KvCacheDtype::kInt8;
  check_outputs_independent(op, {{"key_cache", &key_cache}, {"value_cache", &value_cache}},
                            {{"key", &key},
                             {"value", &value},
                             {"slot_mapping", &slot_mapping},
                             {"k_scale", int8 ? &k_scale : nullptr},
                             {"v_scale", int8 ? &v_scale : nullptr}});
  return g;
}

void reshape_and_cache_meta(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                            const at::Tensor& value_cache, const at::Tensor& slot_mapping,
                            c10::string_view kv_cache_dtype, const at::Tensor& k_scale, const at::Tensor& v_scale) {
  reshape_and_cache_check(key, value, key_cache, value_cache, slot_mapping,
                          parse_kv_cache_dtype("reshape_and_cache", kv_cache_dtype), k_scale, v_scale);
}

BlockBytes block_bytes(const char* op, const char* arg, const at::Tensor& cache) {
  TORCH_CHECK_VALUE(cache.dim() >= 1, prefix(op, arg) + " must have a block dimension");
  const int64_t num_blocks = dim_of(cache, 0);
  int64_t numel = 1;
  for (int64_t i = 1; i < cache.dim(); ++i) numel *= dim_of(cache, i);
  for (int64_t i = 0; i < cache.dim(); ++i)
    TORCH_CHECK_VALUE(stride_of(cache, i) >= 0, prefix(op, arg) + " must not have negative strides");
  // A block is dense when its elements, sorted by stride, tile a range without gaps.
  if (num_blocks > 0 && numel > 0) {
    std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
    for (int64_t i = 1; i < cache.dim(); ++i)
      if (dim_of(cache, i) != 1) dims.emplace_back(stride_of(cache, i), dim_of(cache, i));
    std::sort(dims.begin(), dims.end());
    int64_t expected = 1;
    for (const auto& [stride, size] : dims) {
      TORCH_CHECK_VALUE(stride == expected, prefix(op, arg) + " must hold each block densely (dimensions after "
                                                              "the first without gaps), got shape " +
                                                shape_string(cache));
      expected *= size;
    }
    TORCH_CHECK_VALUE(num_blocks == 1 || stride_of(cache, 0) >= numel,
                      prefix(op, arg) + " has overlapping blocks (stride(0) < elements per block)");
  }
  const int64_t es = static_cast<int64_t>(cache.element_size());
  return {numel * es, (num_blocks == 1 ? numel : stride_of(cache, 0)) * es};
}

void copy_blocks_check(const at::TensorList& key_caches, const at::TensorList& value_caches,
                       const at::Tensor& block_mapping) {
  const char* op = "copy_blocks";
  TORCH_CHECK_VALUE(key_caches.size() == value_caches.size(),
                    std::string(op) + ": key_caches and value_caches must have the same length, got " +
                        to_string(key_caches.size()) + " and " + to_string(value_caches.size()));
  check_dim(op, "block_mapping", block_mapping, 2, "[num_pairs, 2]");
  TORCH_CHECK_VALUE(dim_of(block_mapping, 1) == 2, std::string(op) + ": block_mapping must have shape [n, 2], got " +
                                                       shape_string(block_mapping));
  check_index_dtype(op, "block_mapping", block_mapping, false);
  if (key_caches.empty()) return;
  const at::Tensor& first = key_caches[0];
  const int64_t num_blocks = first.dim() >= 1 ? dim_of(first, 0) : 0;
  for (size_t i = 0; i < key_caches.size(); ++i) {
    for (const auto& [name, cache] : {std::pair<const char*, const at::Tensor&>{"key_caches", key_caches[i]},
                                      std::pair<const char*, const at::Tensor&>{"value_caches", value_caches[i]}}) {
      const std::string arg = std::string(name) + "[" + to_string(i) + "]";
      block_bytes(op, arg.c_str(), cache);
      TORCH_CHECK_VALUE(cache.device() == first.device(),
                        std::string(op) + ": " + arg + " must be on " + first.device().str() + " like key_caches[0]");
      TORCH_CHECK_VALUE(dim_of(cache, 0) == num_blocks,
                        std::string(op) + ": " + arg + " must have " + to_string(num_blocks) +
                            " blocks like key_caches[0], got shape " + shape_string(cache));
    }
  }
  TORCH_CHECK_VALUE(block_mapping.device() == first.device() || block_mapping.device().is_cpu(),
                    std::string(op) + ": block_mapping must be on the caches' device or the CPU, got " +
                        block_mapping.device().str());
  std::vector<std::string> names;  // "key_caches[3]"; reserved, so the pointers into it stay valid
  std::vector<NamedTensor> caches;
  names.reserve(2 * key_caches.size());
  for (const auto& [name, list] : {std::pair<const char*, const at::TensorList&>{"key_caches", key_caches},
                                   std::pair<const char*, const at::TensorList&>{"value_caches", value_caches}}) {
    for (size_t i = 0; i < list.size(); ++i) {
      names.push_back(std::string(name) + "[" + to_string(i) + "]");
      caches.emplace_back(names.back().c_str(), &list[i]);
    }
  }
  check_outputs_independent(op, caches, {{"block_mapping", &block_mapping}});
}

void copy_blocks_meta(at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping) {
  copy_blocks_check(key_caches, value_caches, block_mapping);
}

void swap_blocks_check(const at::Tensor& src, const at::Tensor& dst, int64_t block_size_in_bytes,
                       const at::Tensor& block_mapping) {
  const char* op = "swap_blocks";
  const BlockBytes s = block_bytes(op, "src", src);
  const BlockBytes d = block_bytes(op, "dst", dst);
  TORCH_CHECK_VALUE(block_size_in_bytes >= 0 && block_size_in_bytes <= s.bytes && block_size_in_bytes <= d.bytes,
                    std::string(op) + ": block_size_in_bytes = " + to_string(block_size_in_bytes) +
                        " must be within the bytes of one block of src (" + to_string(s.bytes) + ") and dst (" +
                        to_string(d.bytes) + ")");
  check_dim(op, "block_mapping", block_mapping, 2, "[num_pairs, 2]");
  TORCH_CHECK_VALUE(dim_of(block_mapping, 1) == 2, std::string(op) + ": block_mapping must have shape [n, 2], got " +
                                                       shape_string(block_mapping));
  check_index_dtype(op, "block_mapping", block_mapping, false);
  TORCH_CHECK_VALUE(block_mapping.device().is_cpu() || block_mapping.device().is_meta(),
                    std::string(op) + ": block_mapping must be a CPU tensor, got " + block_mapping.device().str());
  const bool cuda_involved = src.device().is_cuda() || dst.device().is_cuda();
  TORCH_CHECK_VALUE(cuda_involved || src.device() == dst.device(),
                    std::string(op) + ": src (" + src.device().str() + ") and dst (" + dst.device().str() +
                        ") must be on the same device unless one is a CUDA device");
  TORCH_CHECK_VALUE(!(src.device().is_cuda() && dst.device().is_cuda()) || src.device() == dst.device(),
                    std::string(op) + ": src and dst must be on the same CUDA device, got " + src.device().str() +
                        " and " + dst.device().str());
  // dst may be src itself (blocks moved within one cache: check_block_pairs_independent
  // keeps the pairs apart), but not a partly overlapping view, whose block ids mean others.
  TORCH_CHECK_VALUE(at::get_overlap_status(src, dst) != at::MemOverlapStatus::Partial,
                    std::string(op) + ": src and dst overlap (partly: they share memory with different block "
                                      "offsets); pass the same tensor, or tensors that do not overlap");
  check_outputs_independent(op, {{"dst", &dst}}, {{"block_mapping", &block_mapping}});
}

void swap_blocks_meta(const at::Tensor& src, const at::Tensor& dst, int64_t block_size_in_bytes,
                      const at::Tensor& block_mapping) {
  swap_blocks_check(src, dst, block_size_in_bytes, block_mapping);
  // The dispatcher picks this kernel when any argument is on the meta device: a meta
  // block_mapping with real caches would otherwise be a silent no-op.
  TORCH_CHECK_VALUE(src.is_meta() && dst.is_meta(),
                    "swap_blocks: block_mapping is on the meta device but src and dst hold data (" +
                        src.device().str() + ", " + dst.device().str() + "); pass block_mapping as a CPU tensor");
}

void check_block_mapping_values(const char* op, const at::Tensor& block_mapping, int64_t src_blocks,
                                int64_t dst_blocks) {
  const at::Tensor m = block_mapping.contiguous();
  const int64_t* p = m.const_data_ptr<int64_t>();
  const int64_t n = m.size(0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(p[2 * i] >= 0 && p[2 * i] < src_blocks,
                      std::string(op) + ": block_mapping[" + to_string(i) + ", 0] = " + to_string(p[2 * i]) +
                          " is out of range for " + to_string(src_blocks) + " source blocks");
    TORCH_CHECK_INDEX(p[2 * i + 1] >= 0 && p[2 * i + 1] < dst_blocks,
                      std::string(op) + ": block_mapping[" + to_string(i) + ", 1] = " + to_string(p[2 * i + 1]) +
                          " is out of range for " + to_string(dst_blocks) + " destination blocks");
  }
}

void check_block_pairs_independent(const char* op, const at::Tensor& block_mapping, int64_t dst_blocks,
                                   bool same_storage) {
  const at::Tensor mapping = block_mapping.contiguous();
  const int64_t* m = mapping.const_data_ptr<int64_t>();
  const int64_t n = mapping.size(0);
  std::vector<char> is_dst(dst_blocks, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(!is_dst[m[2 * i + 1]], std::string(op) + ": block_mapping[" + to_string(i) + ", 1] = " +
                                                 to_string(m[2 * i + 1]) + " is a destination more than once");
    is_dst[m[2 * i + 1]] = 1;
  }
  if (!same_storage) return;
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_VALUE(m[2 * i] >= dst_blocks || !is_dst[m[2 * i]],
                      std::string(op) + ": block_mapping[" + to_string(i) + ", 0] = " + to_string(m[2 * i]) +
                          " is both a source and a destination in one call");
}

void check_slot_values(const char* op, const at::Tensor& slot_mapping_cpu, int64_t num_blocks, int64_t block_size) {
  const at::Tensor s = slot_mapping_cpu.contiguous();
  const int64_t* p = s.const_data_ptr<int64_t>();
  const int64_t limit = num_blocks * block_size;
  for (int64_t i = 0; i < s.numel(); ++i) {
    if (p[i] < limit) continue;
    TORCH_CHECK_INDEX(false, std::string(op) + ": slot_mapping[" + to_string(i) + "] = " + to_string(p[i]) +
                                 " is out of range for " + to_string(num_blocks) + " blocks x " +
                                 to_string(block_size) + " slots");
  }
}

namespace {
std::atomic<bool> cuda_index_checks_enabled{true};
}  // namespace

bool cuda_index_checks() { return cuda_index_checks_enabled.load(std::memory_order_relaxed); }

bool set_cuda_index_checks(bool enabled) { return cuda_index_checks_enabled.exchange(enabled); }

FlashGeometry check_read_caches(const char* op, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                KvCacheDtype dtype, const std::optional<at::Tensor>& k_scale,
                                const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                                const std::optional<at::Tensor>& v_scale_cache) {
  check_flash_cache(op, "key_cache", key_cache, dtype, std::nullopt);
  check_flash_cache(op, "value_cache", value_cache, dtype, std::nullopt);
  check_same_shape(op, "key_cache", key_cache, "value_cache", value_cache);
  TORCH_CHECK_TYPE(value_cache.scalar_type() == key_cache.scalar_type(),
                   std::string(op) + ": key_cache and value_cache must have the same dtype");
  check_device(op, "value_cache", value_cache, key_cache);
  FlashGeometry g;
  g.num_blocks = dim_of(key_cache, 0);
  g.block_size = dim_of(key_cache, 1);
  g.num_heads = dim_of(key_cache, 2);
  g.head_size = dim_of(key_cache, 3);
  fill_flash_cache_strides(key_cache, value_cache, g);
  check_cache_scales(op, dtype, k_scale ? &*k_scale : nullptr, v_scale ? &*v_scale : nullptr, k_scale_cache,
                     v_scale_cache, key_cache, g);
  return g;
}

void check_block_table(const char* op, const char* table_arg, const at::Tensor& block_table,
                       const at::Tensor& seq_lens, const at::Tensor& key_cache) {
  check_dim(op, table_arg, block_table, 2, "[num_seqs, max_blocks_per_seq]");
  check_index_dtype(op, table_arg, block_table, true);
  check_dim(op, "seq_lens", seq_lens, 1, "[num_seqs]");
  check_index_dtype(op, "seq_lens", seq_lens, true);
  TORCH_CHECK_VALUE(dim_of(seq_lens, 0) == dim_of(block_table, 0),
                    std::string(op) + ": seq_lens has " + to_string(dim_of(seq_lens, 0)) +
                        " sequences but " + table_arg + " has " + to_string(dim_of(block_table, 0)));
  check_device(op, table_arg, block_table, key_cache);
  check_device(op, "seq_lens", seq_lens, key_cache);
}

FlashGeometry gather_cache_check(const at::Tensor& key_cache, const at::Tensor& value_cache,
                                 const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& key_out,
                                 const at::Tensor& value_out, KvCacheDtype dtype,
                                 const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                                 const std::optional<at::Tensor>& k_scale_cache,
                                 const std::optional<at::Tensor>& v_scale_cache) {
  const char* op = "gather_cache";
  FlashGeometry g = check_read_caches(op, key_cache, value_cache, dtype, k_scale, v_scale, k_scale_cache,
                                      v_scale_cache);
  check_block_table(op, "block_table", block_table, seq_lens, key_cache);
  check_dim(op, "key_out", key_out, 3, "[total_tokens, num_heads, head_size]");
  check_dim(op, "value_out", value_out, 3, "[total_tokens, num_heads, head_size]");
  check_inner_contiguous(op, "key_out", key_out);
  check_inner_contiguous(op, "value_out", value_out);
  check_float(op, "key_out", key_out);
  TORCH_CHECK_TYPE(value_out.scalar_type() == key_out.scalar_type(),
                   std::string(op) + ": value_out must have the dtype of key_out");
  if (dtype == KvCacheDtype::kAuto)
    TORCH_CHECK_TYPE(key_out.scalar_type() == key_cache.scalar_type(),
                     std::string(op) + ": key_out must have the cache's dtype (" +
                         dtype_name(key_cache.scalar_type()) + ") with kv_cache_dtype \"auto\", got " +
                         dtype_name(key_out.scalar_type()));
  check_same_shape(op, "key_out", key_out, "value_out", value_out);
  check_device(op, "key_out", key_out, key_cache);
  check_device(op, "value_out", value_out, key_cache);

  g.num_tokens = dim_of(key_out, 0);
  TORCH_CHECK_VALUE(dim_of(key_out, 1) == g.num_heads && dim_of(key_out, 2) == g.head_size,
                    std::string(op) + ": key_out " + shape_string(key_out) + " must hold " + to_string(g.num_heads) +
                        " heads of size " + to_string(g.head_size) + " like key_cache " + shape_string(key_cache));
  g.src_token_stride = stride_of(key_out, 0);
  g.src_head_stride = stride_of(key_out, 1);
  g.src_v_token_stride = stride_of(value_out, 0);
  g.src_v_head_stride = stride_of(value_out, 1);
  check_outputs_independent(op, {{"key_out", &key_out}, {"value_out", &value_out}},
                            {{"key_cache", &key_cache},
                             {"value_cache", &value_cache},
                             {"block_table", &block_table},
                             {"seq_lens", &seq_lens},
                             {"k_scale", optional_arg(k_scale)},
                             {"v_scale", optional_arg(v_scale)},
                             {"k_scale_cache", optional_arg(k_scale_cache)},
                             {"v_scale_cache", optional_arg(v_scale_cache)}});
  return g;
}

void gather_cache_meta(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_table,
                       const at::Tensor& seq_lens, const at::Tensor& key_out, const at::Tensor& value_out,
                       c10::string_view kv_cache_dtype, const std::optional<at::Tensor>& k_scale,
                       const std::optional<at::Tensor>& v_scale, const std::optional<at::Tensor>& k_scale_cache,
                       const std::optional<at::Tensor>& v_scale_cache) {
  gather_cache_check(key_cache, value_cache, block_table, seq_lens, key_out, value_out,
                     parse_kv_cache_dtype("gather_cache", kv_cache_dtype), k_scale, v_scale, k_scale_cache,
                     v_scale_cache);
}

int64_t check_block_table_values(const char* op, const char* table_arg, const at::Tensor& block_table_cpu,
                                 const at::Tensor& seq_lens_cpu, int64_t num_blocks, int64_t block_size) {
  const at::Tensor table = block_table_cpu.contiguous();
  const at::Tensor lens = seq_lens_cpu.contiguous();
  const int64_t num_seqs = table.size(0), max_blocks = table.size(1);
  int64_t total = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len = index_at(lens, s);
    TORCH_CHECK_VALUE(len >= 0 && len <= max_blocks * block_size,
                      std::string(op) + ": seq_lens[" + to_string(s) + "] = " + to_string(len) +
                          " must be within 0 and max_blocks_per_seq x block_size = " + to_string(max_blocks) + " x " +
                          to_string(block_size));
    total += len;
    const int64_t used = (len + block_size - 1) / block_size;
    for (int64_t b = 0; b < used; ++b) {
      const int64_t block = index_at(table, s * max_blocks + b);
      TORCH_CHECK_INDEX(block >= 0 && block < num_blocks,
                        std::string(op) + ": " + table_arg + "[" + to_string(s) + ", " + to_string(b) + "] = " +
                            to_string(block) + " is out of range for " + to_string(num_blocks) + " blocks");
    }
  }
  return total;
}

void check_gather_values(const at::Tensor& block_table_cpu, const at::Tensor& seq_lens_cpu, int64_t num_blocks,
                         int64_t block_size, int64_t out_tokens) {
  const char* op = "gather_cache";
  const int64_t total =
      check_block_table_values(op, "block_table", block_table_cpu, seq_lens_cpu, num_blocks, block_size);
  TORCH_CHECK_VALUE(total == out_tokens, std::string(op) + ": sum(seq_lens) = " + to_string(total) +
                                             " but key_out/value_out have " + to_string(out_tokens) + " rows");
}

}  // namespace memwarden::ops
