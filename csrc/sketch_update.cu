// Streaming sketch update W += Psi[:, rows] @ normalize_rows(A), in place (upi_fast::sketch_update).
//
// W: (k, d) float32/float64, contiguous, the accumulator; A: (b, d) block of matrix rows with global
// indices row_offset .. row_offset + b - 1 (float16, bfloat16, float32 or float64; converted to W's
// dtype, which is also the accumulation dtype). Psi (k x n) is the Rademacher test matrix, never
// stored: its entries are generated in the kernel from (seed, global row, sketch row) by the
// counter-based generator of upi_fast.h, bit-identical to rademacher_columns in
// upi_fast/ops/sketch_update.py.
//
// Kernels:
//   1. (normalize only) inv[i] = 1 / ||A_i||_2 (0 for a zero row): one block per row, reads A once;
//   2. one block per (16 sketch rows) x (256 columns) tile of W; it walks over A's rows in chunks of
//      32, generates the chunk's 32 x 16 signs into shared memory (2 hashes per sign, amortised over
//      the 256 columns), and accumulates acc[j][col] += psi[j][i] * A[i][col] * inv[i] in registers;
//      every W element is read and written once, by one thread (no atomics, deterministic).
// Memory traffic: A is read ceil(k / 16) times by kernel 2 (plus once by kernel 1), W read and
// written once; for the usual k <= 16 that is two passes over A with normalisation, one without.
#include "upi_fast.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if !defined(__CUDA_ARCH__)
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace upi_fast {

constexpr int kSkThreads = 128;   // threads per block of the update kernel
constexpr int kSkCols = 2;        // columns of W per thread (strided by kSkThreads: coalesced)
constexpr int kSkRowsW = 16;      // sketch rows (rows of W) per block
constexpr int kSkRowsA = 32;      // rows of A per shared-memory chunk
constexpr int kNormThreads = 256;

/// inv[i] = 1 / max(||A_i||, 1e-30) if ||A_i|| > 0 else 0, accumulated in w_t.
template <typename w_t, typename a_t>
UPI_GLOBAL void row_inverse_norm_kernel(const a_t* __restrict__ A, int64_t b, int64_t d, w_t* __restrict__ inv) {
  __shared__ w_t red[32];
  for (int64_t i = blockIdx.x; i < b; i += gridDim.x) {
    const a_t* row = A + i * d;
    w_t ss[1] = {w_t(0)};
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
      const w_t a = static_cast<w_t>(row[c]);
      ss[0] += a * a;
    }
    block_sum<1>(ss, red);
    if (threadIdx.x == 0) {
      const w_t n = sqrt_(ss[0]);
      inv[i] = n > w_t(0) ? w_t(1) / max_(n, w_t(1e-30)) : w_t(0);
    }
  }
}

/// W[j, col] += sum_i Psi[j, row_offset + i] * A[i, col] * inv[i] for the block's tile
/// (inv == nullptr: no normalisation). Grid: ceil(k / kSkRowsW) * col_tiles blocks.
template <typename w_t, typename a_t>
UPI_GLOBAL void sketch_update_kernel(w_t* __restrict__ W, const a_t* __restrict__ A, const w_t* __restrict__ inv,
                                     int64_t k, int64_t b, int64_t d, int64_t col_tiles, uint32_t key,
                                     uint32_t row_offset) {
  __shared__ w_t psi[kSkRowsA][kSkRowsW];  // +-1, 0 outside the matrix
  __shared__ w_t scale[kSkRowsA];
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) / col_tiles * kSkRowsW;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) % col_tiles * (static_cast<int64_t>(blockDim.x) * kSkCols) +
                       threadIdx.x;
  w_t acc[kSkRowsW][kSkCols];
#pragma unroll
  for (int jj = 0; jj < kSkRowsW; ++jj)
#pragma unroll
    for (int c = 0; c < kSkCols; ++c) acc[jj][c] = w_t(0);

  for (int64_t i0 = 0; i0 < b; i0 += kSkRowsA) {
    const int rows = b - i0 < kSkRowsA ? static_cast<int>(b - i0) : kSkRowsA;
    __syncthreads();  // the previous chunk's signs are consumed
    for (int t = threadIdx.x; t < kSkRowsA * kSkRowsW; t += blockDim.x) {
      const int ii = t / kSkRowsW, jj = t % kSkRowsW;
      w_t v = w_t(0);
      if (ii < rows && j0 + jj < k) {
        const uint32_t rh = rademacher_row_hash(key, row_offset + static_cast<uint32_t>(i0 + ii));
        v = rademacher_negative(rh, static_cast<uint32_t>(j0 + jj)) ? w_t(-1) : w_t(1);
      }
      psi[ii][jj] = v;
    }
    for (int t = threadIdx.x; t < kSkRowsA; t += blockDim.x)
      scale[t] = t < rows ? (inv != nullptr ? inv[i0 + t] : w_t(1)) : w_t(0);
    __syncthreads();
    const a_t* Ai = A + i0 * d;
#pragma unroll 4
    for (int ii = 0; ii < rows; ++ii) {
      w_t a[kSkCols];
#pragma unroll
      for (int c = 0; c < kSkCols; ++c) {
        const int64_t col = col0 + static_cast<int64_t>(c) * blockDim.x;
        a[c] = col < d ? static_cast<w_t>(Ai[ii * d + col]) * scale[ii] : w_t(0);
      }
#pragma unroll
      for (int jj = 0; jj < kSkRowsW; ++jj) {
        const w_t p = psi[ii][jj];
#pragma unroll
        for (int c = 0; c < kSkCols; ++c) acc[jj][c] += p * a[c];  // exact product: +-a
      }
    }
  }
#pragma unroll
  for (int jj = 0; jj < kSkRowsW; ++jj) {
    if (j0 + jj >= k) break;
#pragma unroll
    for (int c = 0; c < kSkCols; ++c) {
      const int64_t col = col0 + static_cast<int64_t>(c) * blockDim.x;
      if (col < d) W[(j0 + jj) * d + col] += acc[jj][c];
    }
  }
}

/// Raw entry point: W (k, d) and A (b, d) contiguous; ``inv_workspace`` holds b elements (used
/// when ``normalize``); ``seed`` is taken modulo 2^32; row_offset + b <= 2^32.
template <typename w_t, typename a_t>
void sketch_update_raw(w_t* W, const a_t* A, w_t* inv_workspace, int64_t k, int64_t b, int64_t d,
                       int64_t row_offset, int64_t seed, bool normalize, int sm_count, stream_t stream) {
  if (k <= 0 || b <= 0 || d <= 0) return;
  const uint32_t key = mix32(static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xFFFFFFFFull));
  const w_t* inv = nullptr;
  if (normalize) {
    int64_t blocks = b;
    const int64_t max_blocks = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * 16;
    if (blocks > max_blocks) blocks = max_blocks;
    auto* row_norms = &row_inverse_norm_kernel<w_t, a_t>;
    UPI_LAUNCH(row_norms, dim3(static_cast<unsigned>(blocks)), dim3(kNormThreads), stream, A, b, d, inv_workspace);
    inv = inv_workspace;
  }
  const int64_t cols_per_block = static_cast<int64_t>(kSkThreads) * kSkCols;
  const int64_t col_tiles = (d + cols_per_block - 1) / cols_per_block;
  const int64_t row_tiles = (k + kSkRowsW - 1) / kSkRowsW;
  auto* sketch_update_tiles = &sketch_update_kernel<w_t, a_t>;
  UPI_LAUNCH(sketch_update_tiles, dim3(static_cast<unsigned>(col_tiles * row_tiles)), dim3(kSkThreads), stream, W,
             A, inv, k, b, d, col_tiles, key, static_cast<uint32_t>(row_offset));
}

// Every instantiation the tensor wrapper uses (the device passes do not see the wrapper).
#define UPI_SKETCH_INSTANTIATE(W, A)                                                                      \
  template void sketch_update_raw<W, A>(W*, const A*, W*, int64_t, int64_t, int64_t, int64_t, int64_t, bool, \
                                        int, stream_t);
UPI_SKETCH_INSTANTIATE(float, float)
UPI_SKETCH_INSTANTIATE(float, double)
UPI_SKETCH_INSTANTIATE(float, c10::Half)
UPI_SKETCH_INSTANTIATE(float, c10::BFloat16)
UPI_SKETCH_INSTANTIATE(double, float)
UPI_SKETCH_INSTANTIATE(double, double)
UPI_SKETCH_INSTANTIATE(double, c10::Half)
UPI_SKETCH_INSTANTIATE(double, c10::BFloat16)
#undef UPI_SKETCH_INSTANTIATE

#if !defined(__CUDA_ARCH__)

void sketch_update_cuda(at::Tensor& W, const at::Tensor& A_in, int64_t row_offset, int64_t seed, bool normalize) {
  TORCH_CHECK(W.defined() && W.dim() == 2, "upi_fast::sketch_update: W must be a 2-D (k, d) tensor, got ",
              W.defined() ? W.sizes() : at::IntArrayRef{});
  TORCH_CHECK(is_device_tensor(W), "upi_fast::sketch_update: W must be a CUDA tensor, got device ",
              W.device());
  TORCH_CHECK(W.scalar_type() == at::kFloat || W.scalar_type() == at::kDouble,
              "upi_fast::sketch_update: W must be float32 or float64, got ", W.scalar_type());
  TORCH_CHECK(W.is_contiguous(), "upi_fast::sketch_update: W must be contiguous (it is updated in place)");
  TORCH_CHECK(A_in.defined() && A_in.dim() == 2 && A_in.size(1) == W.size(1),
              "upi_fast::sketch_update: A must have shape (b, ", W.size(1), "), got ",
              A_in.defined() ? A_in.sizes() : at::IntArrayRef{});
  TORCH_CHECK(A_in.device() == W.device(), "upi_fast::sketch_update: A is on ", A_in.device(), " but W is on ",
              W.device());
  const auto adt = A_in.scalar_type();
  TORCH_CHECK(adt == at::kFloat || adt == at::kDouble || adt == at::kHalf || adt == at::kBFloat16,
              "upi_fast::sketch_update: A must be float32, float64, float16 or bfloat16, got ", adt);
  const int64_t k = W.size(0), d = W.size(1), b = A_in.size(0);
  TORCH_CHECK(row_offset >= 0 && row_offset + b <= (int64_t(1) << 32),
              "upi_fast::sketch_update: row_offset must be in [0, 2^32 - b] with b = ", b, ", got ", row_offset);
  const int64_t cols_per_block = static_cast<int64_t>(kSkThreads) * kSkCols;
  TORCH_CHECK((d + cols_per_block - 1) / cols_per_block * ((k + kSkRowsW - 1) / kSkRowsW) < (int64_t(1) << 31),
              "upi_fast::sketch_update: W of shape ", W.sizes(), " is too large for one launch");
  if (k == 0 || d == 0 || b == 0) return;
  const c10::cuda::CUDAGuard guard(W.device());
  at::Tensor A = A_in.contiguous();
  if (at::get_overlap_status(W, A) != at::MemOverlapStatus::No) A = A.clone();  // A read while W is written
  at::Tensor inv = normalize ? at::empty({b}, W.options()) : at::Tensor();
  const int sm = multiprocessor_count();
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "upi_fast::sketch_update(W)", [&] {
    using w_t = scalar_t;
    w_t* inv_ptr = normalize ? inv.mutable_data_ptr<w_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, adt, "upi_fast::sketch_update(A)", [&] {
      sketch_update_raw<w_t, scalar_t>(W.mutable_data_ptr<w_t>(), A.const_data_ptr<scalar_t>(), inv_ptr, k, b, d,
                                       row_offset, seed, normalize, sm, stream);
    });
  });
}

#endif  // !__CUDA_ARCH__

}  // namespace upi_fast
