# torch::torch (and torch::torch_cuda) imported targets built from what the
# installed torch reports about itself, the way torch.utils.cpp_extension does.
# Why not find_package(Torch): with a CUDA build of torch, Caffe2's CMake wants
# a full CUDA toolkit (nvrtc, cuDNN, ...) even for a CPU build, fails where the
# toolkit has only nvcc and cudart, and rewrites the architecture list from
# TORCH_CUDA_ARCH_LIST (whose default, 5.0, nvcc 13 rejects).
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import os, torch, torch.utils.cpp_extension as e; \
print(';'.join(e.include_paths())); \
print(e.library_paths()[0]); \
print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); \
print(torch.__version__); \
print(int(torch.version.cuda is not None)); \
print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia', 'cu13', 'include'))"
  OUTPUT_VARIABLE _torch_info
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _torch_rc)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "Could not import torch with ${Python_EXECUTABLE}: install torch first "
                      "(and build with --no-build-isolation so the build sees it)")
endif()
string(REPLACE ";" "|" _torch_info "${_torch_info}")  # keep the include list in one line
string(REPLACE "\n" ";" _torch_lines "${_torch_info}")
list(GET _torch_lines 0 _torch_includes)
list(GET _torch_lines 1 TORCH_LIBRARY_DIR)
list(GET _torch_lines 2 _torch_cxx11_abi)
list(GET _torch_lines 3 TORCH_VERSION_STRING)
list(GET _torch_lines 4 TORCH_HAS_CUDA)
list(GET _torch_lines 5 _nvidia_include_dir)
string(REPLACE "|" ";" _torch_includes "${_torch_includes}")

message(STATUS "torch ${TORCH_VERSION_STRING} from ${TORCH_LIBRARY_DIR} (CUDA build: ${TORCH_HAS_CUDA})")

function(_torch_imported name)
  find_library(_lib_${name} NAMES ${name} PATHS "${TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
  add_library(torchlib::${name} SHARED IMPORTED)
  set_target_properties(torchlib::${name} PROPERTIES IMPORTED_LOCATION "${_lib_${name}}")
endfunction()

foreach(_lib c10 torch_cpu torch)
  _torch_imported(${_lib})
endforeach()
add_library(torch::torch INTERFACE IMPORTED)
set_target_properties(torch::torch PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES "${_torch_includes}"
  INTERFACE_COMPILE_DEFINITIONS "_GLIBCXX_USE_CXX11_ABI=${_torch_cxx11_abi}"
  INTERFACE_LINK_LIBRARIES "torchlib::c10;torchlib::torch_cpu;torchlib::torch")

if(TORCH_HAS_CUDA)
  foreach(_lib c10_cuda torch_cuda)
    _torch_imported(${_lib})
  endforeach()
  add_library(torch::torch_cuda INTERFACE IMPORTED)
  set(_cuda_includes "")
  if(EXISTS "${_nvidia_include_dir}")
    set(_cuda_includes "${_nvidia_include_dir}")  # cuBLAS/cuSPARSE headers of the pip wheels
  endif()
  set_target_properties(torch::torch_cuda PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${_cuda_includes}"
    INTERFACE_LINK_LIBRARIES "torchlib::c10_cuda;torchlib::torch_cuda")
endif()
