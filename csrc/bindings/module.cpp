#include "bindings/module.h"

#include <utility>
#include <vector>

namespace memwarden::bindings {
namespace {

std::vector<std::pair<const char*, BindFunction>>& registrations() {
  static std::vector<std::pair<const char*, BindFunction>> all;
  return all;
}

}  // namespace

PybindRegistration::PybindRegistration(const char* name, BindFunction fn) {
  registrations().emplace_back(name, fn);
}

}  // namespace memwarden::bindings

// Importing the module also loads the TORCH_LIBRARY registrations of every op family.
PYBIND11_MODULE(_C, module) {
  module.doc() = "memwarden native extension: tensor ops (torch.ops.memwarden) and core classes";
  for (const auto& [name, fn] : memwarden::bindings::registrations()) {
    auto submodule = module.def_submodule(name);
    fn(submodule);
  }
}
