// Registration of the CUDA kernels, and the Python module upi_fast._C.
//
// The kernels are ops of the extension's own namespace, upi_fast_cuda::<op>, registered for the CUDA
// dispatch key; they never register anything for the public upi_fast::<op> ops. Their schemas are
// defined from Python, from the one table of the ops (upi_fast/ops/table.py, define_schemas), before
// upi_fast/ops/__init__.py imports this module; the Python dispatcher of upi_fast::<op> then calls
// torch.ops.upi_fast_cuda.<op> when the cuda backend serves a CUDA tensor. Each kernel's schema is
// inferred from its C++ signature and checked by the dispatcher against the Python one, so a
// signature that disagrees fails loudly instead of being called wrongly.
//
// A static TORCH_LIBRARY_IMPL block would run while the shared library is being dlopen'ed, and a
// schema mismatch detected there (a stale build against edited schemas) would throw out of a static
// initializer: std::terminate, the whole Python process aborts. So the same registration (a
// torch::Library of kind IMPL, as TORCH_LIBRARY_IMPL(upi_fast_cuda, CUDA, m) creates) is made when
// the module is imported, inside a try block: a mismatch becomes an ImportError that upi_fast reports
// as "cuda backend unavailable". Loading the library with torch.ops.load_library therefore registers
// nothing; import it instead.
#include <torch/library.h>
#include <torch/version.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <memory>
#include <string>
#include <vector>

#include "upi_fast.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#ifndef UPI_FAST_BUILD_SYSTEM
#define UPI_FAST_BUILD_SYSTEM unknown
#endif
#ifndef UPI_FAST_CUDA_ARCHS
#define UPI_FAST_CUDA_ARCHS unknown
#endif
// Where the kernels are registered. The emulated build (tests only, csrc/emulate/) compiles this
// file unchanged but for these two: its own namespace upi_fast_emu (schemas from the same table),
// and CompositeExplicitAutograd, so that tensors of any device reach the host code's device checks.
#ifndef UPI_FAST_OPS_NAMESPACE
#define UPI_FAST_OPS_NAMESPACE upi_fast_cuda
#endif
#ifndef UPI_FAST_DISPATCH_KEY
#define UPI_FAST_DISPATCH_KEY CUDA
#endif

#define UPI_STR2(...) #__VA_ARGS__
#define UPI_STR(...) UPI_STR2(__VA_ARGS__)

namespace {

/// The ops this library registers (in namespace UPI_FAST_OPS_NAMESPACE), in registration order; the
/// same set as upi_fast/ops/table.py (tests/test_op_table.py checks).
const std::vector<std::string>& registered_ops() {
  static const std::vector<std::string> ops = {"saliency_dissim", "softplus", "softplus_backward",
                                                "softplus_double_backward", "sketch_update"};
  return ops;
}

std::string host_compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
  return "msvc " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

std::string version_string(int v) {  // CUDA encodes 13.0 as 13000
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : s) {
    if (ch == ',' || ch == '+') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else if (ch != ' ') {
      cur += ch;
    }
  }
  if (!cur.empty()) out.push_back(cur);
  return out;
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda_version"] = version_string(CUDART_VERSION);
  info["nvcc_version"] = version_string(upi_fast::nvcc_version());
  // -gencode targets as given to nvcc (sm_XY: machine code, compute_XY: PTX), and the virtual
  // architectures nvcc reports for the kernels' translation units.
  info["cuda_archs"] = split_list(UPI_STR(UPI_FAST_CUDA_ARCHS));
  info["cuda_arch_list"] = split_list(upi_fast::cuda_arch_list());
  info["host_compiler"] = host_compiler();
#if defined(TORCH_VERSION)
  info["torch_version"] = std::string(TORCH_VERSION);
#else
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#endif
#if defined(_GLIBCXX_USE_CXX11_ABI)
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#endif
  info["build_system"] = std::string(UPI_STR(UPI_FAST_BUILD_SYSTEM));
  info["ops"] = registered_ops();
  info["ops_namespace"] = std::string(UPI_STR(UPI_FAST_OPS_NAMESPACE));
  return info;
}

/// The body of TORCH_LIBRARY_IMPL(upi_fast_cuda, CUDA, m); keep registered_ops() in step.
void register_cuda_kernels(torch::Library& m) {
  m.impl("saliency_dissim", TORCH_FN(upi_fast::saliency_dissim_cuda));
  m.impl("softplus", TORCH_FN(upi_fast::softplus_cuda));
  m.impl("softplus_backward", TORCH_FN(upi_fast::softplus_backward_cuda));
  m.impl("softplus_double_backward", TORCH_FN(upi_fast::softplus_double_backward_cuda));
  m.impl("sketch_update", TORCH_FN(upi_fast::sketch_update_cuda));
}

/// The registrations live as long as the library is loaded (as a static TORCH_LIBRARY_IMPL's do).
std::unique_ptr<torch::Library>& cuda_library() {
  static std::unique_ptr<torch::Library> lib;
  return lib;
}

void register_once() {
  auto& lib = cuda_library();
  if (lib) return;
  try {
    lib = std::make_unique<torch::Library>(torch::Library::IMPL, UPI_STR(UPI_FAST_OPS_NAMESPACE),
                                           c10::DispatchKey::UPI_FAST_DISPATCH_KEY, __FILE__, __LINE__);
    register_cuda_kernels(*lib);
  } catch (const std::exception& e) {
    lib.reset();  // undo the registrations made before the failure
    throw pybind11::import_error(std::string("upi_fast._C: registering the CUDA kernels failed (is the extension "
                                             "older than the op schemas in upi_fast/ops/table.py? rebuild it): ") +
                                 e.what());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  register_once();
  mod.doc() =
      "upi_fast._C: CUDA kernels of the upi_fast:: ops, registered on load as the ops " UPI_STR(UPI_FAST_OPS_NAMESPACE) "::<op> "
      "for the " UPI_STR(UPI_FAST_DISPATCH_KEY) " dispatch key";
  mod.attr("ops_namespace") = UPI_STR(UPI_FAST_OPS_NAMESPACE);
  mod.def("build_info", &build_info,
          "Build information: CUDA/nvcc versions, architectures, host compiler, torch version, registered ops.");
  mod.def("registered_ops", &registered_ops, "Names of the ops this library registers (in namespace ops_namespace).");
}
