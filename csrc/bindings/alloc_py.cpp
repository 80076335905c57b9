// memwarden._C.alloc: the caching allocator core (csrc/core/alloc) for Python.
// Devices are named "cpu" (the host allocator) or "cuda:N" (when built with CUDA).
#include <Python.h>
#include <frameobject.h>
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/alloc_torch.h"
#include "bindings/module.h"
#include "core/alloc/caching_allocator.h"
#include "core/alloc/registry.h"
#ifdef MEMWARDEN_WITH_CUDA
#include "core/alloc/cuda_backend.h"
#endif

#if PY_VERSION_HEX >= 0x030D0000
#define MEMWARDEN_PY_FINALIZING() Py_IsFinalizing()
#else
#define MEMWARDEN_PY_FINALIZING() _Py_IsFinalizing()
#endif

namespace py = pybind11;
namespace ma = memwarden::alloc;

namespace {

ma::CachingAllocator& allocator_for(const std::string& device) {
  if (device == "cpu") return ma::host_allocator();
  if (device.rfind("cuda", 0) == 0) {
#ifdef MEMWARDEN_WITH_CUDA
    int index = 0;
    if (device.size() > 4) {
      if (device[4] != ':' || device.size() == 5)
        throw std::invalid_argument("device must be 'cpu' or 'cuda:N', got '" + device + "'");
      try {
        index = std::stoi(device.substr(5));
      } catch (const std::exception&) {
        throw std::invalid_argument("device must be 'cpu' or 'cuda:N', got '" + device + "'");
      }
    }
    return ma::cuda_allocator(index);
#else
    throw std::invalid_argument("memwarden was built without CUDA: no allocator for '" + device + "'");
#endif
  }
  throw std::invalid_argument("device must be 'cpu' or 'cuda:N', got '" + device + "'");
}

// Up to 32 frames of the calling thread's Python stack, innermost first. Needs the GIL.
ma::Context capture_python_stack() {
  auto frames = std::make_shared<std::vector<ma::Frame>>();
  PyFrameObject* f = PyEval_GetFrame();  // borrowed
  Py_XINCREF(f);
  for (int depth = 0; f != nullptr && depth < 32; ++depth) {
    PyCodeObject* code = PyFrame_GetCode(f);  // new reference
    ma::Frame fr;
    fr.line = PyFrame_GetLineNumber(f);
    if (const char* s = PyUnicode_AsUTF8(code->co_filename)) fr.filename = s;
    if (const char* s = PyUnicode_AsUTF8(code->co_name)) fr.name = s;
    Py_DECREF(code);
    frames->push_back(std::move(fr));
    PyFrameObject* back = PyFrame_GetBack(f);  // new reference
    Py_DECREF(f);
    f = back;
  }
  Py_XDECREF(f);
  if (PyErr_Occurred()) PyErr_Clear();
  return frames;
}

// Only a thread that holds the GIL is asked for its stack, unless acquire_gil is set: then a
// Python thread that released the GIL around a torch op takes it back for the capture (what
// PyTorch's CUDA allocator does). Either way the allocator's own lock is not held here.
ma::ContextRecorder make_recorder(bool acquire_gil) {
  return [acquire_gil]() -> ma::Context {
    if (!Py_IsInitialized() || MEMWARDEN_PY_FINALIZING()) return nullptr;
    if (PyGILState_Check()) return capture_python_stack();
    if (!acquire_gil || PyGILState_GetThisThreadState() == nullptr) return nullptr;
    PyGILState_STATE st = PyGILState_Ensure();
    ma::Context ctx = capture_python_stack();
    PyGILState_Release(st);
    return ctx;
  };
}

py::list frames_list(const ma::Context& context) {
  py::list frames;
  if (context)
    for (const auto& f : *context) {
      py::dict fd;
      fd["filename"] = f.filename;
      fd["name"] = f.name;
      fd["line"] = f.line;
      frames.append(fd);
    }
  return frames;
}

py::dict block_dict(const ma::BlockInfo& b) {
  py::dict d;
  d["address"] = b.address;
  d["size"] = b.size;
  d["requested_size"] = b.requested_size;
  d["state"] = b.allocated ? "active_allocated" : (b.active ? "active_pending_free" : "inactive");
  d["frames"] = frames_list(b.context);
  return d;
}

// Trace entries as torch's snapshot lists them (its keys; an oom has device_free instead of addr).
py::list trace_list(const std::vector<ma::TraceEntry>& trace) {
  py::list entries;
  for (const auto& e : trace) {
    py::dict d;
    d["action"] = ma::action_name(e.action);
    // An unknown device_free is -1: torch's viewer reads numbers that fit a double.
    if (e.action == ma::TraceAction::kOom)
      d["device_free"] = e.device_free == SIZE_MAX ? py::int_(-1) : py::int_(e.device_free);
    else
      d["addr"] = e.addr;
    d["size"] = e.size;
    d["stream"] = e.stream;
    d["time_us"] = e.time_us;
    d["frames"] = frames_list(e.context);
    entries.append(d);
  }
  return entries;
}

// A benchmark trace: op >= 0 allocates sizes[op], op < 0 frees slot -op - 1; every slot
// is allocated once and then freed once.
void check_trace(const char* name, const std::vector<long>& ops, const std::vector<long>& sizes) {
  const long num_slots = static_cast<long>(sizes.size());
  std::vector<int> state(sizes.size(), 0);
  for (long op : ops) {
    const bool ok = op >= 0 ? op < num_slots && state[op] == 0 : op >= -num_slots && state[-op - 1] == 1;
    if (!ok) throw std::invalid_argument(std::string(name) + ": invalid trace at op " + std::to_string(op));
    state[op >= 0 ? op : -op - 1] += 1;
  }
  for (int s : state)
    if (s != 2) throw std::invalid_argument(std::string(name) + ": every slot must be allocated and freed");
}

py::dict segment_dict(const ma::SegmentInfo& s) {
  py::dict sd;
  sd["address"] = s.address;
  sd["total_size"] = s.total_size;
  sd["allocated_size"] = s.allocated_size;
  sd["active_size"] = s.active_size;
  sd["requested_size"] = s.requested_size;
  sd["stream"] = s.stream;
  sd["segment_type"] = s.small ? "small" : "large";
  sd["segment_pool_id"] = py::make_tuple(0, 0);  // torch's id of the default pool
  sd["is_expandable"] = false;
  sd["frames"] = py::list();
  py::list blocks;
  for (const auto& b : s.blocks) blocks.append(block_dict(b));
  sd["blocks"] = blocks;
  return sd;
}

py::dict snapshot_dict(const std::string& device, bool include_trace) {
  ma::Snapshot snap = allocator_for(device).snapshot(include_trace);
  py::list segments;
  const int dev_index = device == "cpu" ? -1 : std::stoi(device.substr(device.find(':') + 1));
  for (const auto& s : snap.segments) {
    py::dict sd = segment_dict(s);
    sd["device"] = dev_index;
    segments.append(sd);
  }
  py::dict out;
  out["segments"] = segments;
  out["free_bytes"] = snap.free_bytes;
  out["largest_free_block"] = snap.largest_free;
  out["fragmentation"] = snap.fragmentation;
  if (include_trace) out["trace"] = trace_list(snap.trace);
  return out;
}

// Holds a Python callable; drops it with the GIL held (or leaks it after finalization).
struct PyCallable {
  explicit PyCallable(py::function f) : fn(new py::function(std::move(f))) {}
  ~PyCallable() {
    if (Py_IsInitialized() && !MEMWARDEN_PY_FINALIZING()) {
      py::gil_scoped_acquire gil;
      delete fn;
    }
  }
  py::function* fn;
};

}  // namespace

MEMWARDEN_PYBIND(alloc) {
  module.doc() = "memwarden's caching allocator core: host ('cpu') and CUDA ('cuda:N') instances";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ma::OutOfMemory& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    }
  });

  module.def("install_host", &memwarden::bindings::alloc_torch::install_host,
             "Make memwarden's host pool PyTorch's CPU allocator; False if it was already");
  module.def("uninstall_host", &memwarden::bindings::alloc_torch::uninstall_host,
             "Put PyTorch's previous CPU allocator back; False if memwarden's was not installed");
  module.def("host_installed", &memwarden::bindings::alloc_torch::host_installed);
  module.def("cuda_built", []() {
#ifdef MEMWARDEN_WITH_CUDA
    return true;
#else
    return false;
#endif
  });

  module.def("stats", [](const std::string& device) { return allocator_for(device).stats().to_map(); },
             py::arg("device"));
  module.def("reset_peak_stats", [](const std::string& device) { allocator_for(device).reset_peak_stats(); },
             py::arg("device"));
  module.def("reset_accumulated_stats",
             [](const std::string& device) { allocator_for(device).reset_accumulated_stats(); }, py::arg("device"));
  module.def(
      "empty_cache",
      [](const std::string& device) {
        auto& a = allocator_for(device);
        py::gil_scoped_release nogil;
        a.empty_cache();
      },
      py::arg("device"));
  module.def("snapshot", &snapshot_dict, py::arg("device"), py::arg("include_trace") = false,
             "Segments and blocks; with include_trace also 'trace', the recorded entries (oldest first) with the "
             "keys of torch's device_traces, taken at the same instant");
  module.def(
      "set_memory_limit",
      [](const std::string& device, int64_t bytes) {
        if (bytes < 0) throw std::invalid_argument("bytes must be >= 0 (0: no limit), got " + std::to_string(bytes));
        auto& a = allocator_for(device);
        py::gil_scoped_release nogil;
        a.set_memory_limit(static_cast<std::size_t>(bytes));
      },
      py::arg("device"), py::arg("bytes"));
  module.def("memory_limit", [](const std::string& device) { return allocator_for(device).memory_limit(); },
             py::arg("device"));
  module.def(
      "set_gc_threshold", [](const std::string& device, double f) { allocator_for(device).set_gc_threshold(f); },
      py::arg("device"), py::arg("fraction"));
  module.def(
      "configure",
      [](const std::string& device, std::size_t max_split_size, unsigned roundup_power2_divisions,
         double gc_threshold) {
        auto& a = allocator_for(device);
        ma::Options o = a.options();
        o.max_split_size = max_split_size == 0 ? SIZE_MAX : max_split_size;
        o.roundup_power2_divisions = roundup_power2_divisions;
        o.gc_threshold = gc_threshold;
        a.set_options(o);
      },
      py::arg("device"), py::arg("max_split_size") = 0, py::arg("roundup_power2_divisions") = 0,
      py::arg("gc_threshold") = 0.0,
      "Change rounding/splitting options (only while nothing is reserved); max_split_size 0 = unlimited");
  module.def(
      "options",
      [](const std::string& device) {
        const ma::Options o = allocator_for(device).options();
        py::dict d;
        d["min_block"] = o.min_block;
        d["small_size"] = o.small_size;
        d["small_segment"] = o.small_segment;
        d["min_large_alloc"] = o.min_large_alloc;
        d["large_segment"] = o.large_segment;
        d["round_large"] = o.round_large;
        d["max_split_size"] = o.max_split_size == SIZE_MAX ? py::object(py::none()) : py::int_(o.max_split_size);
        d["roundup_power2_divisions"] = o.roundup_power2_divisions;
        d["gc_threshold"] = o.gc_threshold;
        d["memory_limit"] = o.memory_limit;
        return d;
      },
      py::arg("device"));
  module.def(
      "round_size", [](const std::string& device, std::size_t n) { return allocator_for(device).round_size(n); },
      py::arg("device"), py::arg("nbytes"));

  module.def(
      "add_oom_callback",
      [](const std::string& device, py::function fn) {
        auto holder = std::make_shared<PyCallable>(std::move(fn));
        return allocator_for(device).add_oom_callback([holder](std::size_t bytes) -> bool {
          if (!Py_IsInitialized() || MEMWARDEN_PY_FINALIZING()) return false;
          py::gil_scoped_acquire gil;
          try {
            py::object r = (*holder->fn)(bytes);
            if (r.is_none()) return true;
            const int truth = PyObject_IsTrue(r.ptr());  // any truthy result, as documented
            if (truth < 0) throw py::error_already_set();
            return truth == 1;
          } catch (py::error_already_set& e) {
            e.discard_as_unraisable("memwarden OOM callback");
            return false;
          }
        });
      },
      py::arg("device"), py::arg("callback"),
      "callback(nbytes) -> bool|None runs when an allocation fails after the cache was freed; "
      "return False if it freed nothing. Returns an id for remove_oom_callback.");
  module.def(
      "remove_oom_callback", [](const std::string& device, int id) { return allocator_for(device).remove_oom_callback(id); },
      py::arg("device"), py::arg("id"));
  module.def(
      "record_history",
      [](const std::string& device, bool enabled, bool acquire_gil, std::size_t max_entries, bool clear_history) {
        auto& a = allocator_for(device);
        a.record_trace(enabled, max_entries, clear_history);
        a.set_context_recorder(enabled ? make_recorder(acquire_gil) : ma::ContextRecorder{});
      },
      py::arg("device"), py::arg("enabled") = true, py::arg("acquire_gil") = false,
      py::arg("max_entries") = ma::TraceRing::kUnbounded, py::arg("clear_history") = false,
      "Stacks on live blocks and a trace of the newest max_entries actions while enabled; disabling keeps the "
      "trace, clear_history drops it");

  // Raw blocks, for tests and non-tensor users. OutOfMemory surfaces as MemoryError.
  module.def(
      "raw_alloc",
      [](const std::string& device, int64_t nbytes, std::uintptr_t stream) {
        if (nbytes < 0) throw std::invalid_argument("nbytes must be >= 0, got " + std::to_string(nbytes));
        // The GIL stays held (so record_history sees this stack); the allocator's lock is
        // never held while it waits for the GIL, so this cannot deadlock.
        return reinterpret_cast<std::uintptr_t>(
            allocator_for(device).allocate(static_cast<std::size_t>(nbytes), stream));
      },
      py::arg("device"), py::arg("nbytes"), py::arg("stream") = 0);
  module.def(
      "raw_free",
      [](const std::string& device, std::uintptr_t address) {
        auto& a = allocator_for(device);
        py::gil_scoped_release nogil;
        a.deallocate(reinterpret_cast<void*>(address));
      },
      py::arg("device"), py::arg("address"));
  module.def(
      "block_size",
      [](const std::string& device, std::uintptr_t address) {
        return allocator_for(device).block_size(reinterpret_cast<void*>(address));
      },
      py::arg("device"), py::arg("address"));
  // A private allocator over host memory (its own pool, options and limit): for tests and
  // components that want an isolated pool.
  py::class_<ma::CachingAllocator>(module, "HostPool")
      .def(py::init([](std::size_t memory_limit, std::size_t small_segment, std::size_t large_segment,
                       std::size_t max_split_size, unsigned roundup_power2_divisions, double gc_threshold) {
             ma::Options o;
             o.memory_limit = memory_limit;
             if (small_segment) o.small_segment = small_segment;
             if (large_segment) o.large_segment = large_segment;
             if (max_split_size) o.max_split_size = max_split_size;
             o.roundup_power2_divisions = roundup_power2_divisions;
             o.gc_threshold = gc_threshold;
             return std::make_unique<ma::CachingAllocator>(std::make_shared<ma::HostBackend>(), o, "host-pool");
           }),
           py::arg("memory_limit") = 0, py::arg("small_segment") = 0, py::arg("large_segment") = 0,
           py::arg("max_split_size") = 0, py::arg("roundup_power2_divisions") = 0, py::arg("gc_threshold") = 0.0)
      .def("allocate", [](ma::CachingAllocator& a, std::size_t n, std::uintptr_t stream) {
             return reinterpret_cast<std::uintptr_t>(a.allocate(n, stream));
           }, py::arg("nbytes"), py::arg("stream") = 0)
      .def("deallocate", [](ma::CachingAllocator& a, std::uintptr_t p) { a.deallocate(reinterpret_cast<void*>(p)); },
           py::arg("address"))
      .def("block_size", [](ma::CachingAllocator& a, std::uintptr_t p) { return a.block_size(reinterpret_cast<void*>(p)); })
      .def("round_size", &ma::CachingAllocator::round_size)
      .def("segment_size", &ma::CachingAllocator::segment_size)
      .def("stats", [](ma::CachingAllocator& a) { return a.stats().to_map(); })
      .def("reset_peak_stats", &ma::CachingAllocator::reset_peak_stats)
      .def("empty_cache", &ma::CachingAllocator::empty_cache)
      .def("set_memory_limit", &ma::CachingAllocator::set_memory_limit)
      .def("memory_limit", &ma::CachingAllocator::memory_limit)
      .def("snapshot", [](ma::CachingAllocator& a) {
        ma::Snapshot snap = a.snapshot();
        py::list segments;
        for (const auto& s : snap.segments) segments.append(segment_dict(s));
        py::dict out;
        out["segments"] = segments;
        out["fragmentation"] = snap.fragmentation;
        return out;
      });

  module.def(
      "replay_trace_seconds",
      [](const std::vector<long>& ops, const std::vector<long>& sizes) {
        check_trace("replay_trace_seconds", ops, sizes);
        py::gil_scoped_release nogil;
        return memwarden::bindings::alloc_torch::replay_trace_seconds(ops.data(), ops.size(), sizes.data(),
                                                                      sizes.size());
      },
      py::arg("ops"), py::arg("sizes"),
      "Seconds to replay an allocate/free trace through at::empty with the current CPU allocator");
  module.def(
      "replay_raw_seconds",
      [](const std::vector<long>& ops, const std::vector<long>& sizes, bool memwarden) {
        check_trace("replay_raw_seconds", ops, sizes);
        py::gil_scoped_release nogil;
        return memwarden::bindings::alloc_torch::replay_raw_seconds(ops.data(), ops.size(), sizes.data(),
                                                                    sizes.size(), memwarden);
      },
      py::arg("ops"), py::arg("sizes"), py::arg("memwarden"),
      "Seconds to replay a trace on raw pointers: PyTorch's default CPU allocator or memwarden's");
}
