// Fused softplus(beta) surrogate: forward, backward and double backward, one elementwise kernel
// each (upi_fast::softplus, upi_fast::softplus_backward, upi_fast::softplus_double_backward).
//
// With z = beta * x and s = sigmoid(z):
//   forward          y      = x                     if z > 20 (as torch.nn.functional.softplus)
//                           = log1p(exp(z)) / beta  otherwise
//   backward         grad_x = grad_y * s
//   double backward  (gg * s, gg * grad_y * beta * s * (1 - s))
// s and 1 - s are both computed from exp(-|z|) (no cancellation in 1 - s, no overflow).
//
// dtypes: float32, float64, float16, bfloat16 (half types computed in float32). All tensors of a
// call share a dtype and shape. Memory traffic: one read of every input and one write of every
// output (16-byte vector loads/stores when all pointers are 16-byte aligned, scalar otherwise);
// inputs whose layout differs from the output's are first copied into the output's layout.
//
// This translation unit also holds the small helpers the others share (launch check, SM count,
// build information).
#include "upi_fast.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if !defined(__CUDA_ARCH__)
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <atomic>
#include <cmath>
#endif

namespace upi_fast {

constexpr int kSoftplusThreads = 256;
constexpr double kSoftplusThreshold = 20.0;

/// Raw pointers of one elementwise call: NI inputs, NO outputs, all with the same layout.
template <typename scalar_t, int NI, int NO>
struct ElementwisePtrs {
  const scalar_t* in[NI];
  scalar_t* out[NO];
};

/// s = sigmoid(z) and 1 - s, both accurate.
template <typename A>
UPI_HD void sigmoid_pair(A z, A& s, A& one_minus_s) {
  const A e = exp_(-abs_(z));
  const A d = A(1) / (A(1) + e);
  if (z >= A(0)) {
    s = d;
    one_minus_s = e * d;
  } else {
    s = e * d;
    one_minus_s = d;
  }
}

template <typename A>
struct SoftplusForward {
  A beta;
  UPI_HD void operator()(const A (&in)[1], A (&out)[1]) const {
    const A x = in[0];
    const A z = x * beta;
    out[0] = z > A(kSoftplusThreshold) ? x : log1p_(exp_(z)) / beta;
  }
};

template <typename A>
struct SoftplusBackward {  // in: grad_y, x
  A beta;
  UPI_HD void operator()(const A (&in)[2], A (&out)[1]) const {
    A s, t;
    sigmoid_pair(in[1] * beta, s, t);
    out[0] = in[0] * s;
  }
};

template <typename A>
struct SoftplusDoubleBackward {  // in: gg, grad_y, x
  A beta;
  UPI_HD void operator()(const A (&in)[3], A (&out)[2]) const {
    A s, t;
    sigmoid_pair(in[2] * beta, s, t);
    out[0] = in[0] * s;
    out[1] = in[0] * in[1] * (beta * s * t);
  }
};

/// Grid-stride elementwise kernel: 16-byte vectors over the first floor(n / V) * V elements when
/// ``vec`` (all pointers aligned), then scalars over the rest.
template <typename scalar_t, int NI, int NO, typename Op>
UPI_GLOBAL void elementwise_kernel(ElementwisePtrs<scalar_t, NI, NO> p, int64_t n, bool vec, Op op) {
  using A = acc_t<scalar_t>;
  constexpr int V = vec_width<scalar_t>();
  using VecT = Vec<scalar_t, V>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = vec ? n / V : 0;
  for (int64_t i = first; i < nvec; i += stride) {
    VecT lv[NI];
#pragma unroll
    for (int k = 0; k < NI; ++k) lv[k] = reinterpret_cast<const VecT*>(p.in[k])[i];
    VecT sv[NO];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      A a[NI], o[NO];
#pragma unroll
      for (int k = 0; k < NI; ++k) a[k] = static_cast<A>(lv[k].v[e]);
      op(a, o);
#pragma unroll
      for (int k = 0; k < NO; ++k) sv[k].v[e] = static_cast<scalar_t>(o[k]);
    }
#pragma unroll
    for (int k = 0; k < NO; ++k) reinterpret_cast<VecT*>(p.out[k])[i] = sv[k];
  }
  for (int64_t i = nvec * V + first; i < n; i += stride) {
    A a[NI], o[NO];
#pragma unroll
    for (int k = 0; k < NI; ++k) a[k] = static_cast<A>(p.in[k][i]);
    op(a, o);
#pragma unroll
    for (int k = 0; k < NO; ++k) p.out[k][i] = static_cast<scalar_t>(o[k]);
  }
}

/// Launch ``op`` over ``n`` elements (raw pointers, identical layouts); at most
/// 8 blocks per multiprocessor, grid-stride beyond.
template <typename scalar_t, int NI, int NO, typename Op>
void launch_elementwise(const ElementwisePtrs<scalar_t, NI, NO>& p, int64_t n, Op op, int sm_count,
                        stream_t stream) {
  if (n <= 0) return;
  constexpr int V = vec_width<scalar_t>();
  bool vec = true;
  for (int k = 0; k < NI; ++k) vec = vec && is_aligned(p.in[k], 16);
  for (int k = 0; k < NO; ++k) vec = vec && is_aligned(p.out[k], 16);
  const int64_t items = vec ? n / V + n % V : n;
  const int64_t max_blocks = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * 8;
  int64_t blocks = (items + kSoftplusThreads - 1) / kSoftplusThreads;
  if (blocks > max_blocks) blocks = max_blocks;
  auto* softplus_elementwise = &elementwise_kernel<scalar_t, NI, NO, Op>;
  UPI_LAUNCH(softplus_elementwise, dim3(static_cast<unsigned>(blocks)), dim3(kSoftplusThreads), stream, p, n, vec, op);
}

/// Raw entry points (also used by the host emulation tests).
template <typename scalar_t>
void softplus_forward_raw(const scalar_t* x, scalar_t* y, int64_t n, double beta, int sm_count, stream_t stream) {
  using A = acc_t<scalar_t>;
  ElementwisePtrs<scalar_t, 1, 1> p{{x}, {y}};
  launch_elementwise(p, n, SoftplusForward<A>{static_cast<A>(beta)}, sm_count, stream);
}

template <typename scalar_t>
void softplus_backward_raw(const scalar_t* grad_y, const scalar_t* x, scalar_t* grad_x, int64_t n, double beta,
                           int sm_count, stream_t stream) {
  using A = acc_t<scalar_t>;
  ElementwisePtrs<scalar_t, 2, 1> p{{grad_y, x}, {grad_x}};
  launch_elementwise(p, n, SoftplusBackward<A>{static_cast<A>(beta)}, sm_count, stream);
}

template <typename scalar_t>
void softplus_double_backward_raw(const scalar_t* gg, const scalar_t* grad_y, const scalar_t* x,
                                  scalar_t* grad_grad_y, scalar_t* grad_x, int64_t n, double beta, int sm_count,
                                  stream_t stream) {
  using A = acc_t<scalar_t>;
  ElementwisePtrs<scalar_t, 3, 2> p{{gg, grad_y, x}, {grad_grad_y, grad_x}};
  launch_elementwise(p, n, SoftplusDoubleBackward<A>{static_cast<A>(beta)}, sm_count, stream);
}

// Every instantiation the tensor wrappers use (the device passes do not see the wrappers).
#define UPI_SOFTPLUS_INSTANTIATE(T)                                                                          \
  template void softplus_forward_raw<T>(const T*, T*, int64_t, double, int, stream_t);                       \
  template void softplus_backward_raw<T>(const T*, const T*, T*, int64_t, double, int, stream_t);           \
  template void softplus_double_backward_raw<T>(const T*, const T*, const T*, T*, T*, int64_t, double, int, \
                                                stream_t);
UPI_SOFTPLUS_INSTANTIATE(float)
UPI_SOFTPLUS_INSTANTIATE(double)
UPI_SOFTPLUS_INSTANTIATE(c10::Half)
UPI_SOFTPLUS_INSTANTIATE(c10::BFloat16)
#undef UPI_SOFTPLUS_INSTANTIATE

#if !defined(__CUDA_ARCH__)

// ---------------------------------------------------------------------------------------------
// Helpers shared by the three translation units.
// ---------------------------------------------------------------------------------------------
const char* cuda_arch_list() {
#if defined(__CUDA_ARCH_LIST__)
#define UPI_STR2(...) #__VA_ARGS__
#define UPI_STR(...) UPI_STR2(__VA_ARGS__)
  return UPI_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

int nvcc_version() {
#if defined(__CUDACC_VER_MAJOR__)
  return __CUDACC_VER_MAJOR__ * 1000 + __CUDACC_VER_MINOR__ * 10;
#else
  return 0;
#endif
}

void check_launch(const char* kernel_name) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return;
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    TORCH_CHECK(false, "upi_fast._C: no kernel image of ", kernel_name,
                " for this GPU (the extension was compiled for compute architectures ", cuda_arch_list(),
                "); rebuild it with TORCH_CUDA_ARCH_LIST set to this GPU's capability (csrc/README.md), "
                "or select another backend with upi_fast.set_backend('triton')");
  }
  TORCH_CHECK(false, "upi_fast._C: launching ", kernel_name, " failed: ", cudaGetErrorString(err));
}

int multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  const int device = c10::cuda::current_device();
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (count <= 0) count = 1;
  if (device >= 0 && device < kMaxDevices) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// ---------------------------------------------------------------------------------------------
// Tensor entry points.
// ---------------------------------------------------------------------------------------------
namespace {

void check_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "upi_fast::", op, ": ", name, " is undefined");
  TORCH_CHECK(is_device_tensor(t), "upi_fast::", op, ": ", name, " must be a CUDA tensor, got device ",
              t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, "upi_fast::", op,
              ": ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_input(t, op, name);
  TORCH_CHECK(t.device() == x.device(), "upi_fast::", op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "upi_fast::", op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), "upi_fast::", op, ": ", name, " must have the shape of x ", x.sizes(),
              ", got ", t.sizes());
}

void check_beta(double beta, const char* op) {
  TORCH_CHECK(std::isfinite(beta) && beta > 0, "upi_fast::", op, ": beta must be a finite positive number, got ",
              beta);
}

/// ``t`` itself when it already has ``out``'s strides, else a copy of it in ``out``'s layout (``out``
/// comes from empty_like, so it is non-overlapping and dense and flat indices address it directly).
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& out) {
  if (t.strides() == out.strides()) return t;
  return at::empty_like(out).copy_(t);
}

}  // namespace

at::Tensor softplus_cuda(const at::Tensor& x, double beta) {
  check_input(x, "softplus", "x");
  check_beta(beta, "softplus");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const at::Tensor xl = in_layout_of(x, y);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upi_fast::softplus", [&] {
    softplus_forward_raw<scalar_t>(xl.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), x.numel(), beta,
                                   multiprocessor_count(), stream);
  });
  return y;
}

at::Tensor softplus_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, double beta) {
  check_input(x, "softplus_backward", "x");
  check_like(grad_y, x, "softplus_backward", "grad_y");
  check_beta(beta, "softplus_backward");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return grad_x;
  const at::Tensor xl = in_layout_of(x, grad_x), gl = in_layout_of(grad_y, grad_x);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upi_fast::softplus_backward", [&] {
    softplus_backward_raw<scalar_t>(gl.const_data_ptr<scalar_t>(), xl.const_data_ptr<scalar_t>(),
                                    grad_x.mutable_data_ptr<scalar_t>(), x.numel(), beta, multiprocessor_count(),
                                    stream);
  });
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor> softplus_double_backward_cuda(const at::Tensor& gg, const at::Tensor& grad_y,
                                                                 const at::Tensor& x, double beta) {
  check_input(x, "softplus_double_backward", "x");
  check_like(gg, x, "softplus_double_backward", "gg");
  check_like(grad_y, x, "softplus_double_backward", "grad_y");
  check_beta(beta, "softplus_double_backward");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_grad_y = at::empty_like(x);
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) return {grad_grad_y, grad_x};
  const at::Tensor xl = in_layout_of(x, grad_x), gyl = in_layout_of(grad_y, grad_x), ggl = in_layout_of(gg, grad_x);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "upi_fast::softplus_double_backward", [&] {
        softplus_double_backward_raw<scalar_t>(ggl.const_data_ptr<scalar_t>(), gyl.const_data_ptr<scalar_t>(),
                                               xl.const_data_ptr<scalar_t>(), grad_grad_y.mutable_data_ptr<scalar_t>(),
                                               grad_x.mutable_data_ptr<scalar_t>(), x.numel(), beta,
                                               multiprocessor_count(), stream);
      });
  return {grad_grad_y, grad_x};
}

#endif  // !__CUDA_ARCH__

}  // namespace upi_fast
