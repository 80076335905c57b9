// memwarden._C.plan: the torch-free balanced planner (csrc/core/plan) for Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/module.h"
#include "core/plan/planner.h"

namespace py = pybind11;
namespace mp = memwarden::plan;

namespace {

struct Inputs {
  std::vector<mp::Item> items;
  std::vector<mp::Device> devices;
  mp::Options options;
};

Inputs make_inputs(const std::vector<int64_t>& bytes, const std::vector<int32_t>& layers,
                   const std::vector<bool>& free, const std::vector<int64_t>& capacities,
                   const std::vector<bool>& spill, const std::string& balance, bool locality, int window,
                   int max_rounds) {
  if (layers.size() != bytes.size() || free.size() != bytes.size())
    throw std::invalid_argument("bytes, layers and free must have the same length, got " +
                                std::to_string(bytes.size()) + ", " + std::to_string(layers.size()) + ", " +
                                std::to_string(free.size()));
  if (spill.size() != capacities.size())
    throw std::invalid_argument("capacities and spill must have the same length, got " +
                                std::to_string(capacities.size()) + " and " + std::to_string(spill.size()));
  Inputs in;
  in.items.resize(bytes.size());
  for (size_t i = 0; i < bytes.size(); ++i) in.items[i] = mp::Item{bytes[i], layers[i], static_cast<bool>(free[i])};
  in.devices.resize(capacities.size());
  for (size_t d = 0; d < capacities.size(); ++d) in.devices[d] = mp::Device{capacities[d], static_cast<bool>(spill[d])};
  if (balance == "bytes") in.options.balance = mp::Balance::Bytes;
  else if (balance == "capacity") in.options.balance = mp::Balance::Capacity;
  else throw std::invalid_argument("balance must be 'bytes' or 'capacity', got '" + balance + "'");
  in.options.locality = locality;
  in.options.window = window;
  in.options.max_rounds = max_rounds;
  return in;
}

py::dict to_dict(const mp::Result& r) {
  py::dict d;
  d["feasible"] = r.feasible;
  d["shortfall"] = r.shortfall;
  d["device"] = r.device;
  d["load"] = r.load;
  d["target"] = r.target;
  d["imbalance"] = r.imbalance;
  d["spread"] = r.spread;
  d["strategy"] = r.strategy;
  d["message"] = r.message;
  d["seconds"] = r.seconds;
  d["evaluations"] = r.evaluations;
  return d;
}

}  // namespace

MEMWARDEN_PYBIND(plan) {
  module.doc() = "Balanced placement of model parts on devices (see csrc/core/plan/planner.h)";
  const auto run = [](bool greedy) {
    return [greedy](const std::vector<int64_t>& bytes, const std::vector<int32_t>& layers,
                    const std::vector<bool>& free, const std::vector<int64_t>& capacities,
                    const std::vector<bool>& spill, const std::string& balance, bool locality, int window,
                    int max_rounds) {
      Inputs in = make_inputs(bytes, layers, free, capacities, spill, balance, locality, window, max_rounds);
      mp::Result r;
      {
        py::gil_scoped_release release;
        r = greedy ? mp::layer_greedy(in.items, in.devices, in.options) : mp::plan(in.items, in.devices, in.options);
      }
      return to_dict(r);
    };
  };
  module.def("plan", run(false), py::arg("bytes"), py::arg("layers"), py::arg("free"), py::arg("capacities"),
             py::arg("spill"), py::arg("balance") = "bytes", py::arg("locality") = true, py::arg("window") = 3,
             py::arg("max_rounds") = 64,
             "Place items (pipeline items in order, free items = experts) on devices; returns a dict.");
  module.def("layer_greedy", run(true), py::arg("bytes"), py::arg("layers"), py::arg("free"),
             py::arg("capacities"), py::arg("spill"), py::arg("balance") = "bytes", py::arg("locality") = true,
             py::arg("window") = 3, py::arg("max_rounds") = 64,
             "The baseline: whole layers cut at the cumulative targets.");
}
