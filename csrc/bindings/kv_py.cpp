// memwarden._C.kv: the torch-free block manager (csrc/core/kv) for Python.
// std::invalid_argument becomes ValueError, std::out_of_range IndexError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/module.h"
#include "core/kv/block_pool.h"

namespace py = pybind11;
namespace kv = memwarden::kv;

MEMWARDEN_PYBIND(kv) {
  module.doc() = "Paged KV cache block management (BlockPool, KVCacheManager)";
  module.attr("ROOT_HASH") = py::int_(kv::kRootHash);
  module.def(
      "hash_block",
      [](kv::BlockHash parent, const std::vector<int32_t>& tokens, uint64_t extra_key) {
        return kv::hash_block(parent, tokens.data(), tokens.size(), extra_key);
      },
      py::arg("parent"), py::arg("tokens"), py::arg("extra_key") = 0,
      "Hash of a full block chained from its parent's hash (ROOT_HASH for the first block).");

  py::class_<kv::BlockPool>(module, "BlockPool")
      .def(py::init<int32_t, bool>(), py::arg("num_blocks"), py::arg("enable_caching") = true)
      .def_property_readonly("num_blocks", &kv::BlockPool::num_blocks)
      .def_property_readonly("num_free", &kv::BlockPool::num_free)
      .def_property_readonly("num_cached", &kv::BlockPool::num_cached)
      .def_property_readonly("num_evictions", &kv::BlockPool::num_evictions)
      .def("allocate", &kv::BlockPool::allocate, py::arg("n"),
           "n blocks with ref count 1, or None (nothing changes) when fewer are free")
      .def("touch", &kv::BlockPool::touch, py::arg("block"))
      .def("release", &kv::BlockPool::release, py::arg("blocks"))
      .def("cache", &kv::BlockPool::cache, py::arg("block"), py::arg("hash"))
      .def("lookup", &kv::BlockPool::lookup, py::arg("hash"))
      .def("hash_of", &kv::BlockPool::hash_of, py::arg("block"))
      .def("ref_count", &kv::BlockPool::ref_count, py::arg("block"))
      .def("free_queue", &kv::BlockPool::free_queue)
      .def("__len__", &kv::BlockPool::num_blocks)
      .def("__repr__", [](const kv::BlockPool& p) {
        return "BlockPool(num_blocks=" + std::to_string(p.num_blocks()) + ", num_free=" + std::to_string(p.num_free()) +
               ", num_cached=" + std::to_string(p.num_cached()) + ")";
      });

  py::class_<kv::KVCacheManager>(module, "KVCacheManager")
      .def(py::init<int32_t, int32_t, int32_t, bool>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("num_host_blocks") = 0, py::arg("enable_prefix_caching") = true)
      .def_property_readonly("block_size", &kv::KVCacheManager::block_size)
      .def_property_readonly("device_pool", &kv::KVCacheManager::device_pool, py::return_value_policy::reference_internal)
      .def_property_readonly("host_pool", &kv::KVCacheManager::host_pool, py::return_value_policy::reference_internal)
      .def("add_sequence", &kv::KVCacheManager::add_sequence, py::arg("seq_id"), py::arg("tokens"),
           py::arg("extra_key") = 0)
      .def("append", &kv::KVCacheManager::append, py::arg("seq_id"), py::arg("tokens"))
      .def("fork", &kv::KVCacheManager::fork, py::arg("parent"), py::arg("child"))
      .def("free_sequence", &kv::KVCacheManager::free_sequence, py::arg("seq_id"))
      .def("swap_out", &kv::KVCacheManager::swap_out, py::arg("seq_id"))
      .def("swap_in", &kv::KVCacheManager::swap_in, py::arg("seq_id"))
      .def("lookup", &kv::KVCacheManager::lookup, py::arg("tokens"), py::arg("extra_key") = 0)
      .def("has_sequence", &kv::KVCacheManager::has_sequence, py::arg("seq_id"))
      .def("is_swapped", &kv::KVCacheManager::is_swapped, py::arg("seq_id"))
      .def("block_table", &kv::KVCacheManager::block_table, py::arg("seq_id"))
      .def("num_tokens", &kv::KVCacheManager::num_tokens, py::arg("seq_id"))
      .def("sequence_ids", &kv::KVCacheManager::sequence_ids)
      .def("slot_mapping", &kv::KVCacheManager::slot_mapping, py::arg("seq_id"), py::arg("start"), py::arg("end"))
      .def("stats", [](const kv::KVCacheManager& m) {
        const kv::KVCacheStats s = m.stats();
        py::dict d;
        d["num_blocks"] = s.num_blocks;
        d["num_free_blocks"] = s.num_free_blocks;
        d["num_cached_blocks"] = s.num_cached_blocks;
        d["num_host_blocks"] = s.num_host_blocks;
        d["num_free_host_blocks"] = s.num_free_host_blocks;
        d["usage"] = s.usage;
        d["prefix_query_tokens"] = s.prefix_query_tokens;
        d["prefix_hit_tokens"] = s.prefix_hit_tokens;
        d["prefix_hit_rate"] = s.prefix_hit_rate;
        d["num_evictions"] = s.num_evictions;
        d["num_cow_copies"] = s.num_cow_copies;
        d["num_swapped_out"] = s.num_swapped_out;
        d["num_swapped_in"] = s.num_swapped_in;
        return d;
      });
}
