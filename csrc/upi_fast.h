// Shared header of the C++/CUDA extension upi_fast._C.
//
// Three parts:
//   1. host/device helpers shared by the kernels (the counter-based Rademacher generator, the
//      saliency-dissimilarity kinds, block reductions, vector loads, the launch macro);
//   2. the tensor-level entry points, registered as the ops upi_fast_cuda::<op> for the CUDA dispatch
//      key (declared here, defined in one .cu per op family, registered in register.cpp; the table of
//      the ops is upi_fast/ops/table.py);
//   3. build information compiled into the CUDA translation units.
//
// With UPI_FAST_EMULATE defined (tests only: csrc/emulate/) the same sources compile as plain C++
// (g++): the kernels run on the host under a thread-per-CUDA-thread emulator, and the host code (the
// tensor entry points, launch checks, device queries) runs unchanged against the emulator's CUDA
// runtime, on CPU tensors. The only differences from the CUDA build are here: the kernel qualifiers,
// the launch syntax (UPI_KERNEL_CALL) and which tensors count as device tensors (is_device_tensor).
#pragma once

#include <cstdint>
#include <cmath>

#if defined(UPI_FAST_EMULATE)
#include "emulate/emulate.h"
#define UPI_HD inline
#define UPI_D inline
#define UPI_GLOBAL
namespace upi_fast { using stream_t = cudaStream_t; }
#elif defined(__CUDACC__)
#include <cuda_runtime.h>
#define UPI_HD __host__ __device__ __forceinline__
#define UPI_D __device__ __forceinline__
#define UPI_GLOBAL __global__
namespace upi_fast { using stream_t = cudaStream_t; }
#else
#define UPI_HD inline
#define UPI_D inline
#define UPI_GLOBAL
#endif

namespace upi_fast {

// ---------------------------------------------------------------------------------------------
// Counter-based Rademacher generator: bit-identical to upi_fast/ops/sketch_update.py
// (rademacher_columns). All arithmetic on uint32, wrapping.
//   key = mix(seed); h(i, j) = mix(mix(i + key) + j * 0x9E3779B9); Psi[j, i] = top bit ? -1 : +1
// ---------------------------------------------------------------------------------------------
constexpr uint32_t kMixC1 = 0x7FEB352Du;
constexpr uint32_t kMixC2 = 0x846CA68Bu;
constexpr uint32_t kGolden = 0x9E3779B9u;

/// lowbias32 integer hash.
UPI_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixC1;
  x ^= x >> 15;
  x *= kMixC2;
  x ^= x >> 16;
  return x;
}

/// Hash of global matrix row ``row`` (the per-row half of h), given ``key = mix32(seed)``.
UPI_HD uint32_t rademacher_row_hash(uint32_t key, uint32_t row) { return mix32(row + key); }

/// 1 where Psi[j, row] = -1, 0 where it is +1; ``row_hash = rademacher_row_hash(key, row)``.
UPI_HD uint32_t rademacher_negative(uint32_t row_hash, uint32_t j) {
  return mix32(row_hash + j * kGolden) >> 31;
}

// ---------------------------------------------------------------------------------------------
// Saliency dissimilarity kinds (the ``kind`` string of upi_fast::saliency_dissim).
// ---------------------------------------------------------------------------------------------
enum SaliencyKind : int { kL2 = 0, kRelL2 = 1, kCosine = 2 };

// ---------------------------------------------------------------------------------------------
// Accumulation types: fp32 for fp32/fp16/bf16, fp64 for fp64.
// ---------------------------------------------------------------------------------------------
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

/// ``V`` consecutive elements loaded/stored as one aligned vector (16 bytes for V = 16/sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

/// Elements per 16-byte vector.
template <typename T> constexpr int vec_width() { return static_cast<int>(16 / sizeof(T)); }

inline bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

UPI_HD float sqrt_(float x) { return sqrtf(x); }
UPI_HD double sqrt_(double x) { return sqrt(x); }
UPI_HD float exp_(float x) { return expf(x); }
UPI_HD double exp_(double x) { return exp(x); }
UPI_HD float log1p_(float x) { return log1pf(x); }
UPI_HD double log1p_(double x) { return log1p(x); }
UPI_HD float abs_(float x) { return fabsf(x); }
UPI_HD double abs_(double x) { return fabs(x); }
template <typename T> UPI_HD T max_(T a, T b) { return a > b ? a : b; }
/// torch.sign: -1, 0 or +1 (NaN stays NaN).
template <typename T> UPI_HD T sign_(T x) { return x > T(0) ? T(1) : (x < T(0) ? T(-1) : x); }

#if defined(__CUDACC__) || defined(UPI_FAST_EMULATE)
// ---------------------------------------------------------------------------------------------
// Block reductions (blockDim.x a multiple of 32, at most 1024). Deterministic: fixed order.
// Every thread of the block must call them; every thread receives the totals.
// ``smem`` holds NV * 32 values.
// ---------------------------------------------------------------------------------------------
template <typename T>
UPI_D T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <int NV, typename T>
UPI_D void block_sum(T (&v)[NV], T* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < NV; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) smem[k * 32 + warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      T w = lane < nwarps ? smem[k * 32 + lane] : T(0);
      w = warp_sum(w);
      if (lane == 0) smem[k * 32] = w;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < NV; ++k) v[k] = smem[k * 32];
  __syncthreads();  // smem may be reused right after
}
#endif  // __CUDACC__ || UPI_FAST_EMULATE

}  // namespace upi_fast

// ---------------------------------------------------------------------------------------------
// Kernel launch: ``UPI_LAUNCH(kernel_pointer, grid, block, stream, args...)``; a launch error
// throws with the kernel pointer's name (and a rebuild hint when the binary has no image for the
// device). The pointer variable's name is what error messages show: name it after the kernel.
// ---------------------------------------------------------------------------------------------
#if defined(__CUDACC__) || defined(UPI_FAST_EMULATE)
namespace upi_fast {
/// Throws (c10::Error) if the last launch failed; defined in softplus.cu.
void check_launch(const char* kernel_name);
/// Number of streaming multiprocessors of the current device (cached per device); softplus.cu.
int multiprocessor_count();
}  // namespace upi_fast
#if defined(UPI_FAST_EMULATE)
#define UPI_KERNEL_CALL(kernel, grid, block, smem, stream, ...) \
  ::upi_emu::launch(#kernel, kernel, (grid), (block), (smem), (stream), __VA_ARGS__)
#else
#define UPI_KERNEL_CALL(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif
#define UPI_LAUNCH(kernel, grid, block, stream, ...)                \
  do {                                                                \
    UPI_KERNEL_CALL(kernel, grid, block, 0, stream, __VA_ARGS__);     \
    ::upi_fast::check_launch(#kernel);                                \
  } while (0)
#endif

// ---------------------------------------------------------------------------------------------
// Tensor-level entry points (CUDA tensors), registered for the CUDA key in register.cpp.
// Schemas (defined from Python in upi_fast/ops/*.py):
//   saliency_dissim(Tensor g, Tensor ref, str kind, bool compute_grad) -> (Tensor, Tensor)
//   softplus(Tensor x, float beta) -> Tensor
//   softplus_backward(Tensor grad_y, Tensor x, float beta) -> Tensor
//   softplus_double_backward(Tensor gg, Tensor grad_y, Tensor x, float beta) -> (Tensor, Tensor)
//   sketch_update(Tensor(a!) W, Tensor A, int row_offset, int seed, bool normalize) -> ()
// ---------------------------------------------------------------------------------------------
// Host code only: nvcc's device passes (__CUDA_ARCH__ defined) skip the ATen headers and the tensor
// wrappers, which cuts the build time of each .cu by about a quarter. The device passes therefore
// see the kernels only through the raw launchers each .cu instantiates explicitly: every
// instantiation a wrapper calls must be in that list (the GPU tests cover every dtype).
// Under UPI_FAST_EMULATE (no __CUDA_ARCH__) the host code is compiled too.
#if !defined(__CUDA_ARCH__)
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <tuple>

namespace upi_fast {

/// Whether the kernels can read ``t``'s memory: a CUDA tensor; under the emulator, whose device
/// memory is host memory, a CPU tensor. (Error messages say "CUDA tensor" in both builds.)
inline bool is_device_tensor(const at::Tensor& t) {
#if defined(UPI_FAST_EMULATE)
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

std::tuple<at::Tensor, at::Tensor> saliency_dissim_cuda(const at::Tensor& g, const at::Tensor& ref,
                                                        c10::string_view kind, bool compute_grad);
at::Tensor softplus_cuda(const at::Tensor& x, double beta);
at::Tensor softplus_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, double beta);
std::tuple<at::Tensor, at::Tensor> softplus_double_backward_cuda(const at::Tensor& gg, const at::Tensor& grad_y,
                                                                 const at::Tensor& x, double beta);
void sketch_update_cuda(at::Tensor& W, const at::Tensor& A, int64_t row_offset, int64_t seed, bool normalize);

/// nvcc version the kernels were compiled with, as major * 1000 + minor * 10 (softplus.cu).
int nvcc_version();
/// Virtual architectures the kernels were compiled for (nvcc's __CUDA_ARCH_LIST__, e.g. "800,900").
const char* cuda_arch_list();

}  // namespace upi_fast
#endif
