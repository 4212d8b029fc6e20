// Load an exported TorchScript module in C++, run it, and compare its output with the output
// Python saved (tests/cpp/make_jit_fixture.py):
//
//   jit_load [--preload LIB]... [--forbid NAME]... MODULE.pt IO.pt
//
// IO.pt is torch.save({"inputs": (args...), "expected": output}); the module's output must be
// equal to "expected" (tensors: same dtype, shape and values, torch::equal), recursively through
// tuples, lists and dicts. Exit code 0 when equal, 1 when something differs (each difference is
// printed), 2 on any error (the message is printed).
//
// The overlap_sampler ops are registered by linking liboverlap_sampler_ops.so. A scripted
// torchvision detector also calls torchvision::nms and torchvision::roi_align, whose kernels
// live in torchvision's _C_stable.so; --preload dlopens each LIB with RTLD_NOW | RTLD_GLOBAL,
// in order, before the module is loaded (see make_jit_fixture.py --print-preload for the list
// and why libpython is on it).
//
// --forbid NAME fails the run (exit 2) if, after the module ran, a loaded shared object's path
// contains NAME (e.g. --forbid libpython proves no Python runtime was needed).
//
// Runs on one thread with the JIT fusers off, as the fixture did, so results are bit-identical.

#include <dlfcn.h>
#include <link.h>

#include <ATen/Parallel.h>
#include <torch/csrc/jit/codegen/fuser/interface.h>
#include <torch/csrc/jit/passes/tensorexpr_fuser.h>
#include <torch/script.h>
#include <torch/serialize.h>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  if (!stream) {
    throw std::runtime_error("cannot open " + path);
  }
  return {std::istreambuf_iterator<char>(stream), std::istreambuf_iterator<char>()};
}

std::string describe(const at::Tensor& actual, const at::Tensor& expected) {
  std::ostringstream out;
  if (actual.scalar_type() != expected.scalar_type()) {
    out << "dtype " << actual.scalar_type() << " vs expected " << expected.scalar_type();
  } else if (actual.sizes() != expected.sizes()) {
    out << "shape " << actual.sizes() << " vs expected " << expected.sizes();
  } else {
    const auto difference = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs();
    out << difference.gt(0).sum().item<int64_t>() << " of " << actual.numel()
        << " values differ, max abs difference " << difference.max().item<double>();
  }
  return out.str();
}

// Appends one line per difference between `actual` and `expected` to `problems`.
void compare(const c10::IValue& actual, const c10::IValue& expected, const std::string& where,
             std::vector<std::string>& problems) {
  if (expected.isTensor()) {
    if (!actual.isTensor()) {
      problems.push_back(where + ": expected a tensor, got " + actual.tagKind());
      return;
    }
    const auto a = actual.toTensor().cpu();
    const auto e = expected.toTensor().cpu();
    if (a.scalar_type() != e.scalar_type() || a.sizes() != e.sizes() || !torch::equal(a, e)) {
      problems.push_back(where + ": " + describe(a, e));
    }
  } else if (expected.isTuple() || expected.isList()) {
    const auto items = [](const c10::IValue& v) {
      return v.isTuple() ? v.toTupleRef().elements().vec() : v.toListRef().vec();
    };
    if (!(actual.isTuple() || actual.isList())) {
      problems.push_back(where + ": expected a tuple or list, got " + actual.tagKind());
      return;
    }
    const auto a = items(actual);
    const auto e = items(expected);
    if (a.size() != e.size()) {
      problems.push_back(where + ": " + std::to_string(a.size()) + " items, expected " +
                         std::to_string(e.size()));
      return;
    }
    for (size_t i = 0; i < e.size(); ++i) {
      compare(a[i], e[i], where + "[" + std::to_string(i) + "]", problems);
    }
  } else if (expected.isGenericDict()) {
    if (!actual.isGenericDict()) {
      problems.push_back(where + ": expected a dict, got " + actual.tagKind());
      return;
    }
    const auto a = actual.toGenericDict();
    const auto e = expected.toGenericDict();
    if (a.size() != e.size()) {
      problems.push_back(where + ": " + std::to_string(a.size()) + " keys, expected " +
                         std::to_string(e.size()));
    }
    for (const auto& item : e) {
      const auto key = item.key().isString() ? "'" + item.key().toStringRef() + "'"
                                             : item.key().tagKind();
      if (!a.contains(item.key())) {
        problems.push_back(where + "[" + key + "]: missing");
        continue;
      }
      compare(a.at(item.key()), item.value(), where + "[" + key + "]", problems);
    }
  } else if (!(actual == expected)) {
    problems.push_back(where + ": value differs (" + actual.tagKind() + ")");
  }
}

int count_tensors(const c10::IValue& value) {
  if (value.isTensor()) return 1;
  int n = 0;
  if (value.isTuple()) {
    for (const auto& v : value.toTupleRef().elements()) n += count_tensors(v);
  } else if (value.isList()) {
    for (const auto& v : value.toListRef()) n += count_tensors(v);
  } else if (value.isGenericDict()) {
    for (const auto& item : value.toGenericDict()) n += count_tensors(item.value());
  }
  return n;
}

// torch.save'd lists come back as List[Any]; a scripted forward(Tensor[] images) wants the
// element type, so a list of tensors is rebuilt as a List[Tensor].
c10::IValue typed(const c10::IValue& value) {
  if (value.isList()) {
    const auto items = value.toListRef();
    const bool all_tensors = std::all_of(items.begin(), items.end(),
                                         [](const c10::IValue& v) { return v.isTensor(); });
    if (all_tensors && !items.empty()) {
      c10::List<at::Tensor> tensors;
      for (const auto& v : items) tensors.push_back(v.toTensor());
      return tensors;
    }
  }
  return value;
}

std::vector<std::string> loaded_objects() {
  std::vector<std::string> names;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        static_cast<std::vector<std::string>*>(data)->emplace_back(info->dlpi_name);
        return 0;
      },
      &names);
  return names;
}

int usage() {
  std::cerr << "usage: jit_load [--preload LIB]... [--forbid NAME]... MODULE.pt IO.pt\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> preload;
  std::vector<std::string> forbidden;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--preload" || arg == "--forbid") {
      if (++i == argc) return usage();
      (arg == "--preload" ? preload : forbidden).emplace_back(argv[i]);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() != 2) return usage();

  for (const auto& library : preload) {
    if (dlopen(library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      std::cerr << "jit_load: dlopen(" << library << ") failed: " << dlerror() << "\n";
      return 2;
    }
  }
  at::set_num_threads(1);
  torch::jit::overrideCanFuseOnCPU(false);
  torch::jit::overrideCanFuseOnGPU(false);
  torch::jit::setTensorExprFuserEnabled(false);

  try {
    torch::jit::Module module = torch::jit::load(positional[0]);
    module.eval();
    const c10::IValue io = torch::pickle_load(read_file(positional[1]));
    const auto fields = io.toGenericDict();
    std::vector<c10::IValue> inputs;
    for (const auto& input : fields.at("inputs").toTupleRef().elements()) {
      inputs.push_back(typed(input));
    }
    const c10::IValue expected = fields.at("expected");

    torch::NoGradGuard no_grad;
    const c10::IValue output = module.forward(inputs);
    std::vector<std::string> problems;
    compare(output, expected, "output", problems);
    if (!problems.empty()) {
      std::cerr << "jit_load: " << positional[0] << " differs from the Python output:\n";
      for (const auto& problem : problems) std::cerr << "  " << problem << "\n";
      return 1;
    }
    for (const auto& object : loaded_objects()) {
      for (const auto& name : forbidden) {
        if (object.find(name) != std::string::npos) {
          std::cerr << "jit_load: " << object << " is loaded (--forbid " << name << ")\n";
          return 2;
        }
      }
    }
    std::cout << "jit_load: " << positional[0] << ": all " << count_tensors(expected)
              << " output tensors equal the Python output\n";
    return 0;
  } catch (const c10::Error& error) {
    std::cerr << "jit_load: " << error.what_without_backtrace() << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "jit_load: " << error.what() << "\n";
    return 2;
  }
}
