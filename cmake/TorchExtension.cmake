# Build settings for a torch C++/CUDA extension, taken from the installed torch.
#
# TorchConfig.cmake is not used: for CUDA builds of torch it needs the FindCUDA module
# (removed from CMake >= 3.27) and libraries such as nvrtc that a plain CUDA toolkit
# does not ship. torch.utils.cpp_extension knows the same facts and is always present.

execute_process(
  COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_LIST_DIR}/torch_build_info.py"
  OUTPUT_VARIABLE _torch_info
  RESULT_VARIABLE _torch_info_rc
  ERROR_VARIABLE _torch_info_err)
if(NOT _torch_info_rc EQUAL 0)
  message(FATAL_ERROR "Cannot import torch with ${Python_EXECUTABLE}: ${_torch_info_err}\n"
                      "Install torch first and build without build isolation "
                      "(pip install --no-build-isolation .).")
endif()
file(WRITE "${CMAKE_BINARY_DIR}/torch_info.cmake" "${_torch_info}")
include("${CMAKE_BINARY_DIR}/torch_info.cmake")
message(STATUS "memwarden: building against torch ${TORCH_VERSION} (CUDA '${TORCH_CUDA_VERSION}')")

function(_torch_import name)
  find_library(_lib_${name} NAMES ${name} PATHS ${TORCH_LIBRARY_DIRS} NO_DEFAULT_PATH REQUIRED)
  add_library(torch_ext::${name} SHARED IMPORTED)
  set_target_properties(torch_ext::${name} PROPERTIES IMPORTED_LOCATION "${_lib_${name}}")
endfunction()

foreach(_name c10 torch torch_cpu torch_python)  # torch_python: pybind11 casters for tensors
  _torch_import(${_name})
endforeach()

add_library(torch_ext::torch_ext INTERFACE IMPORTED)
target_include_directories(torch_ext::torch_ext SYSTEM INTERFACE ${TORCH_INCLUDE_DIRS})
target_link_libraries(torch_ext::torch_ext INTERFACE torch_ext::c10 torch_ext::torch torch_ext::torch_cpu torch_ext::torch_python)
target_compile_definitions(torch_ext::torch_ext INTERFACE
  TORCH_API_INCLUDE_EXTENSION_H
  TORCH_EXTENSION_NAME=_C
  _GLIBCXX_USE_CXX11_ABI=${TORCH_CXX11_ABI})

# CUDA is compiled when asked for (ON) or, with AUTO, when torch is a CUDA build and
# a CUDA compiler is found.
set(MEMWARDEN_WITH_CUDA OFF)
if(MEMWARDEN_CUDA STREQUAL "ON" OR (MEMWARDEN_CUDA STREQUAL "AUTO" AND TORCH_CUDA_VERSION))
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(MEMWARDEN_WITH_CUDA ON)
  elseif(MEMWARDEN_CUDA STREQUAL "ON")
    message(FATAL_ERROR "MEMWARDEN_CUDA=ON but no CUDA compiler was found")
  endif()
endif()

if(MEMWARDEN_WITH_CUDA)
  if(NOT TORCH_CUDA_VERSION)
    message(FATAL_ERROR "MEMWARDEN_CUDA=ON but the installed torch is not a CUDA build")
  endif()
  # TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX") wins over the default; "+PTX" keeps PTX too.
  if(DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    string(REPLACE " " ";" _arch_list "$ENV{TORCH_CUDA_ARCH_LIST}")
    set(CMAKE_CUDA_ARCHITECTURES "")
    foreach(_arch IN LISTS _arch_list)
      string(REPLACE "." "" _arch "${_arch}")
      if(_arch MATCHES "\\+PTX$")
        string(REPLACE "+PTX" "" _arch "${_arch}")
        list(APPEND CMAKE_CUDA_ARCHITECTURES "${_arch}")
      elseif(NOT _arch STREQUAL "")
        list(APPEND CMAKE_CUDA_ARCHITECTURES "${_arch}-real")
      endif()
    endforeach()
  elseif(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES "75-real;80-real;86-real;89-real;90-real;100-real;120")
  endif()
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)
  foreach(_name c10_cuda torch_cuda)
    _torch_import(${_name})
  endforeach()
  target_link_libraries(torch_ext::torch_ext INTERFACE
    torch_ext::c10_cuda torch_ext::torch_cuda CUDA::cudart)
  message(STATUS "memwarden: CUDA sources ON, architectures ${CMAKE_CUDA_ARCHITECTURES}")
else()
  message(STATUS "memwarden: CUDA sources OFF (CPU kernels only)")
endif()
