// Fused saliency post-processing + dissimilarity, forward and gradient (upi_fast::saliency_dissim).
//
// Per sample b, with N = H * W, from the raw gradient g[b] (C x N) and the reference map r = ref[b] (N):
//   S = sum_c |g_c|,  I = S * inv,  inv = 1 / ||S||_1 (0 when ||S||_1 = 0)
//   l2:      loss = ||I - r||,              dD/dI = (I - r) / ||I - r||       (0 at I = r)
//   rel_l2:  loss = ||I - r|| / ||r||,      dD/dI = (I - r) / (||I - r|| ||r||)
//   cosine:  loss = 1 - <I, r> / (|I| |r|), dD/dI = c I / |I|^2 - r / (|I| |r|)  (0 if I or r is 0)
//   dD/dS = (dD/dI - <I, dD/dI>) * inv,  grad = dD/dS (broadcast over c) * sign(g)
// exactly as saliency_dissim_reference in upi_fast/ops/saliency_dissim.py (tiny = 1e-30 clamps).
//
// Each sample is split into ``nchunk`` chunks of spatial positions so that small batches of large
// maps still fill the GPU; one block per (sample, chunk). Three kernels, deterministic (per-chunk
// partial sums in a fixed order, no atomics):
//   1. map:   S (workspace) and the partial sums of S              reads g once, writes S
//   2. stats: with inv known, partial sums of |I|^2, <I,r>, |r|^2,  reads S and ref
//             |I - r|^2 and <I, I - r>
//   3. grad:  reduces the partials, writes the loss and (when       reads g again, S and ref,
//             compute_grad) grad = dD/dS * sign(g)                  writes grad
// Memory traffic per sample, in elements: forward only C*N (g) + 3*N (S written, S and ref read);
// with the gradient 3*C*N (g twice, grad once) + 5*N: two passes over g in all.
// dtypes: float32 and float64 (accumulation in the input's dtype); 16-byte vector loads/stores
// when N is a multiple of the vector width and the pointers are aligned.
#include "upi_fast.h"

#if !defined(__CUDA_ARCH__)
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace upi_fast {

constexpr int kSalThreads = 256;
constexpr int kSalStats = 5;  // |I|^2, <I,r>, |r|^2, |I-r|^2, <I,I-r>

template <typename T> UPI_HD T tiny_() { return T(1e-30); }

/// Block (sample b, chunk ch) of a flattened grid of B * nchunk blocks.
struct ChunkRange {
  int64_t b, ch, begin, end;
};

UPI_D ChunkRange chunk_range(int64_t nchunk, int64_t chunk, int64_t N) {
  ChunkRange r;
  r.b = static_cast<int64_t>(blockIdx.x) / nchunk;
  r.ch = static_cast<int64_t>(blockIdx.x) % nchunk;
  r.begin = r.ch * chunk;
  r.end = r.begin + chunk < N ? r.begin + chunk : N;
  if (r.begin > N) r.begin = N;
  return r;
}

/// Kernel 1: S[b, j] = sum_c |g[b, c, j]| over the block's chunk; part1[b * nchunk + ch] = sum_j S.
template <typename scalar_t>
UPI_GLOBAL void saliency_map_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ S,
                                    scalar_t* __restrict__ part1, int64_t C, int64_t N, int64_t chunk,
                                    int64_t nchunk, bool vec) {
  using T = scalar_t;
  constexpr int V = vec_width<T>();
  using VecT = Vec<T, V>;
  __shared__ T red[32];
  const ChunkRange rg = chunk_range(nchunk, chunk, N);
  const T* gb = g + rg.b * C * N;
  T* Sb = S + rg.b * N;
  T local[1] = {T(0)};
  if (vec) {  // begin, end and N are multiples of V
    for (int64_t jv = rg.begin / V + threadIdx.x; jv < rg.end / V; jv += blockDim.x) {
      VecT s;
#pragma unroll
      for (int e = 0; e < V; ++e) s.v[e] = T(0);
      for (int64_t c = 0; c < C; ++c) {
        const VecT x = reinterpret_cast<const VecT*>(gb + c * N)[jv];
#pragma unroll
        for (int e = 0; e < V; ++e) s.v[e] += abs_(x.v[e]);
      }
      reinterpret_cast<VecT*>(Sb)[jv] = s;
#pragma unroll
      for (int e = 0; e < V; ++e) local[0] += s.v[e];
    }
  } else {
    for (int64_t j = rg.begin + threadIdx.x; j < rg.end; j += blockDim.x) {
      T s = T(0);
      for (int64_t c = 0; c < C; ++c) s += abs_(gb[c * N + j]);
      Sb[j] = s;
      local[0] += s;
    }
  }
  block_sum<1>(local, red);
  if (threadIdx.x == 0) part1[blockIdx.x] = local[0];
}

/// Sum of ``part[(b * nchunk + i) * stride + k]`` over i, for k < NV, in a fixed order.
template <int NV, typename T>
UPI_D void reduce_partials(const T* __restrict__ part, int64_t b, int64_t nchunk, T (&out)[NV], T* smem) {
#pragma unroll
  for (int k = 0; k < NV; ++k) out[k] = T(0);
  for (int64_t i = threadIdx.x; i < nchunk; i += blockDim.x) {
#pragma unroll
    for (int k = 0; k < NV; ++k) out[k] += part[(b * nchunk + i) * NV + k];
  }
  block_sum<NV>(out, smem);
}

template <typename T>
UPI_HD T inverse_l1(T n1) {
  return n1 > T(0) ? T(1) / max_(n1, tiny_<T>()) : T(0);
}

/// Kernel 2: partial sums of |I|^2, <I,r>, |r|^2, |I-r|^2, <I,I-r> over the block's chunk.
template <typename scalar_t>
UPI_GLOBAL void saliency_stats_kernel(const scalar_t* __restrict__ S, const scalar_t* __restrict__ ref,
                                      const scalar_t* __restrict__ part1, scalar_t* __restrict__ part2, int64_t N,
                                      int64_t chunk, int64_t nchunk) {
  using T = scalar_t;
  __shared__ T red[kSalStats * 32];
  const ChunkRange rg = chunk_range(nchunk, chunk, N);
  T n1[1];
  reduce_partials<1>(part1, rg.b, nchunk, n1, red);
  const T inv = inverse_l1(n1[0]);
  const T* Sb = S + rg.b * N;
  const T* rb = ref + rg.b * N;
  T acc[kSalStats] = {T(0), T(0), T(0), T(0), T(0)};
  for (int64_t j = rg.begin + threadIdx.x; j < rg.end; j += blockDim.x) {
    const T I = Sb[j] * inv;
    const T r = rb[j];
    const T dlt = I - r;
    acc[0] += I * I;
    acc[1] += I * r;
    acc[2] += r * r;
    acc[3] += dlt * dlt;
    acc[4] += I * dlt;
  }
  block_sum<kSalStats>(acc, red);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kSalStats; ++k) part2[static_cast<int64_t>(blockIdx.x) * kSalStats + k] = acc[k];
  }
}

/// Per-sample loss and the coefficients of dD/dS_j = (dd_j - proj) * inv, where
/// dd_j = (I_j - r_j) * a (l2, rel_l2) or kI * I_j + kR * r_j (cosine).
template <typename T>
struct SalCoef {
  T loss, inv, a, kI, kR, proj;
};

template <typename T>
UPI_HD SalCoef<T> saliency_coefficients(int kind, T n1, const T (&st)[kSalStats]) {
  SalCoef<T> k;
  k.inv = inverse_l1(n1);
  k.a = k.kI = k.kR = T(0);
  const T q = st[0], p = st[1], rr = st[2], e = st[3], t = st[4];
  if (kind == kCosine) {
    const T In = sqrt_(q), rn = sqrt_(rr);
    const T denom = max_(In * rn, tiny_<T>());
    const T c = p / denom;
    k.loss = T(1) - c;
    if (In > T(0) && rn > T(0)) {
      k.kI = c / max_(In * In, tiny_<T>());
      k.kR = -T(1) / denom;
    }
    k.proj = k.kI * q + k.kR * p;
  } else {
    const T d = sqrt_(e);
    k.a = d > T(0) ? T(1) / max_(d, tiny_<T>()) : T(0);
    k.loss = d;
    if (kind == kRelL2) {
      const T rn = max_(sqrt_(rr), tiny_<T>());
      k.loss = d / rn;
      k.a = k.a / rn;
    }
    k.proj = k.a * t;
  }
  return k;
}

/// Kernel 3: loss[b] (chunk 0) and, when ``grad`` is not null, grad[b, c, j] over the block's chunk.
template <typename scalar_t>
UPI_GLOBAL void saliency_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ S,
                                     const scalar_t* __restrict__ ref, const scalar_t* __restrict__ part1,
                                     const scalar_t* __restrict__ part2, scalar_t* __restrict__ loss,
                                     scalar_t* __restrict__ grad, int64_t C, int64_t N, int64_t chunk, int64_t nchunk,
                                     int64_t grid_chunks, int kind, bool vec) {
  using T = scalar_t;
  constexpr int V = vec_width<T>();
  using VecT = Vec<T, V>;
  __shared__ T red[kSalStats * 32];
  // This block's sample and chunk in a grid of B * grid_chunks blocks (grid_chunks = 1: loss only).
  const int64_t b = static_cast<int64_t>(blockIdx.x) / grid_chunks;
  const int64_t ch = static_cast<int64_t>(blockIdx.x) % grid_chunks;
  T n1[1];
  reduce_partials<1>(part1, b, nchunk, n1, red);
  T st[kSalStats];
  reduce_partials<kSalStats>(part2, b, nchunk, st, red);
  const SalCoef<T> k = saliency_coefficients<T>(kind, n1[0], st);
  if (ch == 0 && threadIdx.x == 0) loss[b] = k.loss;
  if (grad == nullptr) return;
  const int64_t begin = ch * chunk < N ? ch * chunk : N;
  const int64_t end = begin + chunk < N ? begin + chunk : N;
  const T* gb = g + b * C * N;
  T* grb = grad + b * C * N;
  const T* Sb = S + b * N;
  const T* rb = ref + b * N;
  const bool cosine = kind == kCosine;
  if (vec) {
    for (int64_t jv = begin / V + threadIdx.x; jv < end / V; jv += blockDim.x) {
      const VecT s = reinterpret_cast<const VecT*>(Sb)[jv];
      const VecT r = reinterpret_cast<const VecT*>(rb)[jv];
      T dS[V];
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const T I = s.v[e] * k.inv;
        const T dd = cosine ? k.kI * I + k.kR * r.v[e] : (I - r.v[e]) * k.a;
        dS[e] = (dd - k.proj) * k.inv;
      }
      for (int64_t c = 0; c < C; ++c) {
        const VecT x = reinterpret_cast<const VecT*>(gb + c * N)[jv];
        VecT o;
#pragma unroll
        for (int e = 0; e < V; ++e) o.v[e] = dS[e] * sign_(x.v[e]);
        reinterpret_cast<VecT*>(grb + c * N)[jv] = o;
      }
    }
  } else {
    for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
      const T I = Sb[j] * k.inv;
      const T dd = cosine ? k.kI * I + k.kR * rb[j] : (I - rb[j]) * k.a;
      const T dS = (dd - k.proj) * k.inv;
      for (int64_t c = 0; c < C; ++c) grb[c * N + j] = dS * sign_(gb[c * N + j]);
    }
  }
}

/// Number of chunks per sample and their length (a multiple of the vector width).
struct ChunkPlan {
  int64_t nchunk, chunk;
};

inline ChunkPlan plan_chunks(int64_t B, int64_t N, int V, int sm_count) {
  const int64_t per_block = static_cast<int64_t>(kSalThreads) * V;  // one vector per thread at least
  const int64_t max_chunks = N > 0 ? (N + per_block - 1) / per_block : 1;
  const int64_t target_blocks = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * 4;
  int64_t nchunk = B > 0 ? (target_blocks + B - 1) / B : 1;
  if (nchunk > max_chunks) nchunk = max_chunks;
  if (nchunk < 1) nchunk = 1;
  int64_t chunk = (N + nchunk - 1) / nchunk;
  chunk = (chunk + V - 1) / V * V;
  if (chunk < V) chunk = V;
  nchunk = N > 0 ? (N + chunk - 1) / chunk : 1;
  return {nchunk, chunk};
}

/// Workspace elements needed by saliency_dissim_raw: S (B*N) and the partial sums.
inline int64_t saliency_workspace_size(int64_t B, int64_t N, int sm_count, int V) {
  const ChunkPlan pl = plan_chunks(B, N, V, sm_count);
  return B * N + B * pl.nchunk * (1 + kSalStats);
}

/// Raw entry point: g (B, C, N) contiguous, ref (B, N) contiguous, loss (B), grad (B, C, N) or null,
/// workspace of saliency_workspace_size elements.
template <typename scalar_t>
void saliency_dissim_raw(const scalar_t* g, const scalar_t* ref, scalar_t* loss, scalar_t* grad,
                         scalar_t* workspace, int64_t B, int64_t C, int64_t N, int kind, int sm_count,
                         stream_t stream) {
  if (B <= 0) return;
  constexpr int V = vec_width<scalar_t>();
  const ChunkPlan pl = plan_chunks(B, N, V, sm_count);
  scalar_t* S = workspace;
  scalar_t* part1 = S + B * N;
  scalar_t* part2 = part1 + B * pl.nchunk;
  const bool vec = N % V == 0 && is_aligned(g, 16) && is_aligned(ref, 16) && is_aligned(S, 16) &&
                   (grad == nullptr || is_aligned(grad, 16));
  const dim3 blocks(static_cast<unsigned>(B * pl.nchunk));
  auto* saliency_map = &saliency_map_kernel<scalar_t>;
  UPI_LAUNCH(saliency_map, blocks, dim3(kSalThreads), stream, g, S, part1, C, N, pl.chunk, pl.nchunk, vec);
  auto* saliency_stats = &saliency_stats_kernel<scalar_t>;
  UPI_LAUNCH(saliency_stats, blocks, dim3(kSalThreads), stream, S, ref, part1, part2, N, pl.chunk, pl.nchunk);
  const int64_t grid_chunks = grad != nullptr ? pl.nchunk : 1;
  auto* saliency_grad = &saliency_grad_kernel<scalar_t>;
  UPI_LAUNCH(saliency_grad, dim3(static_cast<unsigned>(B * grid_chunks)), dim3(kSalThreads), stream, g, S, ref,
             part1, part2, loss, grad, C, N, pl.chunk, pl.nchunk, grid_chunks, kind, vec);
}

// Every instantiation the tensor wrapper uses (the device passes do not see the wrapper).
template void saliency_dissim_raw<float>(const float*, const float*, float*, float*, float*, int64_t, int64_t,
                                         int64_t, int, int, stream_t);
template void saliency_dissim_raw<double>(const double*, const double*, double*, double*, double*, int64_t, int64_t,
                                          int64_t, int, int, stream_t);

#if !defined(__CUDA_ARCH__)

std::tuple<at::Tensor, at::Tensor> saliency_dissim_cuda(const at::Tensor& g_in, const at::Tensor& ref_in,
                                                        c10::string_view kind_name, bool compute_grad) {
  TORCH_CHECK(g_in.defined() && g_in.dim() == 4, "upi_fast::saliency_dissim: g must be a (B, C, H, W) tensor, got ",
              g_in.defined() ? g_in.sizes() : at::IntArrayRef{});
  TORCH_CHECK(is_device_tensor(g_in), "upi_fast::saliency_dissim: g must be a CUDA tensor, got device ",
              g_in.device());
  TORCH_CHECK(g_in.scalar_type() == at::kFloat || g_in.scalar_type() == at::kDouble,
              "upi_fast::saliency_dissim: g must be float32 or float64, got ", g_in.scalar_type());
  const int64_t B = g_in.size(0), C = g_in.size(1), N = g_in.size(2) * g_in.size(3);
  TORCH_CHECK(ref_in.defined() && ref_in.dim() == 2 && ref_in.size(0) == B && ref_in.size(1) == N,
              "upi_fast::saliency_dissim: ref must have shape (B, H*W) = (", B, ", ", N, "), got ",
              ref_in.defined() ? ref_in.sizes() : at::IntArrayRef{});
  TORCH_CHECK(ref_in.device() == g_in.device(), "upi_fast::saliency_dissim: ref is on ", ref_in.device(),
              " but g is on ", g_in.device());
  TORCH_CHECK(ref_in.is_floating_point(), "upi_fast::saliency_dissim: ref must be floating point, got ",
              ref_in.scalar_type());
  int kind;
  if (kind_name == "l2") {
    kind = kL2;
  } else if (kind_name == "rel_l2") {
    kind = kRelL2;
  } else if (kind_name == "cosine") {
    kind = kCosine;
  } else {
    TORCH_CHECK(false, "upi_fast::saliency_dissim: kind must be one of ('l2', 'rel_l2', 'cosine'), got '",
                std::string(kind_name), "'");
  }
  const c10::cuda::CUDAGuard guard(g_in.device());
  const at::Tensor g = g_in.contiguous();
  const at::Tensor ref = ref_in.to(g.scalar_type()).contiguous();
  at::Tensor loss = at::empty({B}, g.options());
  at::Tensor grad = compute_grad ? at::empty_like(g) : at::empty({0}, g.options());
  if (B == 0) return {loss, compute_grad ? at::empty_like(g_in) : grad};
  const int sm = multiprocessor_count();
  TORCH_CHECK(B * plan_chunks(B, N, vec_width<float>(), sm).nchunk < (int64_t(1) << 31),
              "upi_fast::saliency_dissim: g of shape ", g.sizes(), " is too large for one launch");
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "upi_fast::saliency_dissim", [&] {
    constexpr int V = vec_width<scalar_t>();
    at::Tensor workspace = at::empty({saliency_workspace_size(B, N, sm, V)}, g.options());
    saliency_dissim_raw<scalar_t>(g.const_data_ptr<scalar_t>(), ref.const_data_ptr<scalar_t>(),
                                  loss.mutable_data_ptr<scalar_t>(),
                                  compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr,
                                  workspace.mutable_data_ptr<scalar_t>(), B, C, N, kind, sm,
                                  c10::cuda::getCurrentCUDAStream().stream());
  });
  if (compute_grad && !g_in.is_contiguous()) {
    // the fake kernel promises empty_like(g)'s layout
    at::Tensor out = at::empty_like(g_in);
    if (out.strides() != grad.strides()) return {loss, out.copy_(grad)};
  }
  return {loss, grad};
}

#endif  // !__CUDA_ARCH__

}  // namespace upi_fast
