// The Python extension `overlap_sampler._C`. Linking it loads the op library
// (its static initialisers register the ops); the module itself only reports
// how the library was built, so a mismatch can be explained to the user.
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "overlap_sampler native library (ops live in torch.ops.overlap_sampler)";
  py::dict info;
  info["version"] = OVERLAP_SAMPLER_VERSION;
  info["cuda"] = static_cast<bool>(OVERLAP_SAMPLER_WITH_CUDA);
  info["cuda_version"] = std::string(OVERLAP_SAMPLER_CUDA_VERSION);
  info["cuda_architectures"] = std::string(OVERLAP_SAMPLER_CUDA_ARCHS);
  info["torch_version"] = OVERLAP_SAMPLER_TORCH_VERSION;
  m.attr("build_info") = info;
}
