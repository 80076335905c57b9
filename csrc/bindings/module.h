// The pybind11 side of memwarden._C. Each binding file registers the classes of one
// core component with MEMWARDEN_PYBIND(name) { ... }, so adding a component never
// edits module.cpp. Tensor ops are not here: they go through TORCH_LIBRARY.
#pragma once

#include <pybind11/pybind11.h>

namespace memwarden::bindings {

using BindFunction = void (*)(pybind11::module_& module);

// Registers fn to run when memwarden._C is imported, in a submodule `name`.
struct PybindRegistration {
  PybindRegistration(const char* name, BindFunction fn);
};

}  // namespace memwarden::bindings

#define MEMWARDEN_PYBIND(name)                                                          \
  static void memwarden_bind_##name(pybind11::module_& module);                         \
  static const ::memwarden::bindings::PybindRegistration memwarden_registration_##name( \
      #name, memwarden_bind_##name);                                                    \
  static void memwarden_bind_##name(pybind11::module_& module)
