"""Print CMake `set()` lines describing the installed torch, for building against it.

CMake runs this with the interpreter the package is built for, so the extension links
the torch that will import it (no build isolation, no second torch).
"""
import sys

import torch
import torch.utils.cpp_extension as cpp_extension


def cmake_list(values):
    return ";".join(str(v).replace("\\", "/") for v in values)


lines = {
    "TORCH_VERSION": torch.__version__,
    "TORCH_CUDA_VERSION": torch.version.cuda or "",
    "TORCH_INCLUDE_DIRS": cmake_list(cpp_extension.include_paths()),
    "TORCH_LIBRARY_DIRS": cmake_list(cpp_extension.library_paths()),
    "TORCH_CXX11_ABI": int(torch._C._GLIBCXX_USE_CXX11_ABI),
}
sys.stdout.write("".join(f'set({key} "{value}")\n' for key, value in lines.items()))
