// Host build of the CUDA kernels of csrc/*.cu under the emulator (emulate.h), exposed with a C ABI
// for tests/test_cuda_ext.py (ctypes), which compares them with the PyTorch references on CPU
// tensors. Not part of the extension. Build (the test does it):
//   g++ -std=c++20 -O1 -shared -fPIC -pthread -I<torch>/include harness.cpp -o harness.so
#define UPI_FAST_EMULATE 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../saliency_dissim.cu"
#include "../sketch_update.cu"
#include "../softplus.cu"

using upi_fast::stream_t;

namespace {

template <typename T>
int guarded(T&& fn) {
  try {
    fn();
    return 0;
  } catch (...) {
    return 1;
  }
}

}  // namespace

extern "C" {

// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16
int upi_emu_softplus(int dtype, int pass, const void* a, const void* b, const void* c, void* o1, void* o2,
                     int64_t n, double beta, int sm_count) {
  return guarded([&] {
    auto run = [&](auto tag) {
      using T = decltype(tag);
      if (pass == 0) {
        upi_fast::softplus_forward_raw<T>(static_cast<const T*>(a), static_cast<T*>(o1), n, beta, sm_count, nullptr);
      } else if (pass == 1) {
        upi_fast::softplus_backward_raw<T>(static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(o1), n,
                                           beta, sm_count, nullptr);
      } else {
        upi_fast::softplus_double_backward_raw<T>(static_cast<const T*>(a), static_cast<const T*>(b),
                                                  static_cast<const T*>(c), static_cast<T*>(o1), static_cast<T*>(o2),
                                                  n, beta, sm_count, nullptr);
      }
    };
    switch (dtype) {
      case 0: run(float()); break;
      case 1: run(double()); break;
      case 2: run(c10::Half()); break;
      default: run(c10::BFloat16()); break;
    }
  });
}

int64_t upi_emu_saliency_workspace(int dtype, int64_t B, int64_t N, int sm_count) {
  return dtype == 0 ? upi_fast::saliency_workspace_size(B, N, sm_count, upi_fast::vec_width<float>())
                    : upi_fast::saliency_workspace_size(B, N, sm_count, upi_fast::vec_width<double>());
}

int upi_emu_saliency(int dtype, const void* g, const void* ref, void* loss, void* grad, void* workspace, int64_t B,
                     int64_t C, int64_t N, int kind, int sm_count) {
  return guarded([&] {
    if (dtype == 0) {
      upi_fast::saliency_dissim_raw<float>(static_cast<const float*>(g), static_cast<const float*>(ref),
                                           static_cast<float*>(loss), static_cast<float*>(grad),
                                           static_cast<float*>(workspace), B, C, N, kind, sm_count, nullptr);
    } else {
      upi_fast::saliency_dissim_raw<double>(static_cast<const double*>(g), static_cast<const double*>(ref),
                                            static_cast<double*>(loss), static_cast<double*>(grad),
                                            static_cast<double*>(workspace), B, C, N, kind, sm_count, nullptr);
    }
  });
}

int upi_emu_sketch(int w_dtype, int a_dtype, void* W, const void* A, void* inv, int64_t k, int64_t b, int64_t d,
                   int64_t row_offset, int64_t seed, int normalize, int sm_count) {
  return guarded([&] {
    auto run_w = [&](auto wtag) {
      using WT = decltype(wtag);
      auto run = [&](auto atag) {
        using AT = decltype(atag);
        upi_fast::sketch_update_raw<WT, AT>(static_cast<WT*>(W), static_cast<const AT*>(A), static_cast<WT*>(inv), k,
                                            b, d, row_offset, seed, normalize != 0, sm_count, nullptr);
      };
      switch (a_dtype) {
        case 0: run(float()); break;
        case 1: run(double()); break;
        case 2: run(c10::Half()); break;
        default: run(c10::BFloat16()); break;
      }
    };
    if (w_dtype == 0) run_w(float());
    else run_w(double());
  });
}

uint32_t upi_emu_rademacher_negative(uint32_t seed, uint32_t row, uint32_t j) {
  return upi_fast::rademacher_negative(upi_fast::rademacher_row_hash(upi_fast::mix32(seed), row), j);
}

}  // extern "C"
