// Host emulation of the small subset of CUDA that the upi_fast kernels and their host code use, so
// that both can be tested on machines without a GPU (tests/test_cuda_host_emulated.py).
//
// Device side. Blocks run one after another; the threads of a block run as cooperative fibers
// (ucontext) on one OS thread, scheduled round-robin; __syncthreads is a barrier over the block's
// live threads, the warp shuffles a barrier over the warp's 32 threads (a thread that returned no
// longer counts, like a thread that exited on the GPU); __shared__ variables become function-local
// statics (one block runs at a time). Deterministic. Only 1-D grids and blocks whose size is a
// multiple of 32 run (anything else throws std::logic_error: a limit of the emulator, not a CUDA
// error).
//
// Host side: the CUDA runtime calls the host code makes. A launch is first checked as the CUDA
// runtime checks it (grid and block dimensions, shared memory; a bad configuration is reported by
// cudaGetLastError, as on a GPU, and nothing runs), recorded (kernel, grid, block, stream, device,
// live device guards), then run synchronously on the calling thread. The emulated machine has
// kDevices devices with fixed multiprocessor counts (fixed because the host code caches them per
// device). Tests choose the current device and stream, can make the next launch fail with a given
// error, and can record launches without running them (large problems whose launch configuration is
// the point). Device memory is host memory: the tensors are CPU tensors. shim/ maps the CUDA and
// c10/cuda headers that the host code includes onto this file.
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <math.h>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---------------------------------------------------------------------------------------------
// CUDA runtime subset (host side). Numeric values as in CUDA's driver_types.h.
// ---------------------------------------------------------------------------------------------
typedef struct CUstream_st* cudaStream_t;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};

enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };

namespace upi_emu {

/// Multiprocessor counts of the emulated devices: a small GPU (few blocks, long grid-stride loops),
/// an H100 SXM (132), and one that reports 0 (the host code must clamp it to 1).
constexpr int kDevices = 3;
constexpr int kMultiprocessors[kDevices] = {2, 132, 0};

/// One kernel launch and the state it was made in.
struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  int device;
  int guards;  // device guards alive at the launch
  bool ran;    // false: rejected (bad configuration, injected error) or recorded only
};

struct Runtime {
  int device = 0;                 // the current device
  cudaStream_t stream = nullptr;  // the current stream (nullptr: the default stream)
  int guards = 0;
  cudaError_t last_error = cudaSuccess;
  cudaError_t inject = cudaSuccess;  // the next launch fails with this error
  bool execute = true;               // false: launches are checked and recorded, not run
  std::vector<LaunchRecord> launches;
  std::mutex mutex;  // one launch at a time (the scheduler is global)
};

inline Runtime& runtime() {
  static Runtime r;
  return r;
}

}  // namespace upi_emu

/// The last error of a runtime call (here: of a launch), which it resets, as CUDA's does.
inline cudaError_t cudaGetLastError() {
  upi_emu::Runtime& r = upi_emu::runtime();
  const cudaError_t err = r.last_error;
  r.last_error = cudaSuccess;
  return err;
}

inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {  // CUDA's wording
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoKernelImageForDevice: return "no kernel image is available for execution on the device";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unrecognized error code";
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= upi_emu::kDevices) return cudaErrorInvalidDevice;
  if (value == nullptr || attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = upi_emu::kMultiprocessors[device];
  return cudaSuccess;
}

inline cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return cudaErrorInvalidValue;
  *device = upi_emu::runtime().device;
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// Device side: fibers, barriers, the launcher.
// ---------------------------------------------------------------------------------------------
namespace upi_emu {
constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t ctx;  // used once, to enter the fiber on its own stack
  jmp_buf env;     // where the fiber yielded
  std::vector<char> stack;
  bool started = false, done = false;
};

struct Barrier {
  unsigned arrived = 0, alive = 0, generation = 0;
};

struct Scheduler {
  jmp_buf main;
  std::vector<Fiber> fibers;
  std::vector<Barrier> warps;
  Barrier block;
  std::vector<uint64_t> shfl;  // one 8-byte slot per thread
  std::function<void()> body;
  unsigned current = 0;
};

inline Scheduler& sched() {
  static Scheduler s;
  return s;
}

inline dim3 g_thread, g_block, g_block_dim, g_grid_dim;

// Switching uses _setjmp/_longjmp between stacks (no system call, unlike swapcontext); the
// harness is compiled with -U_FORTIFY_SOURCE so that glibc's longjmp stack check stays out.
inline void yield_to_scheduler() {
  Scheduler& s = sched();
  if (_setjmp(s.fibers[s.current].env) == 0) _longjmp(s.main, 1);
}

inline void wait_at(Barrier& b) {
  const unsigned gen = b.generation;
  if (++b.arrived == b.alive) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) {
    if (b.arrived == b.alive) {  // the last live threads returned instead of arriving
      b.arrived = 0;
      ++b.generation;
      break;
    }
    yield_to_scheduler();
  }
}

inline void syncthreads() { wait_at(sched().block); }

template <typename T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  Scheduler& s = sched();
  const unsigned tid = g_thread.x, warp = tid / 32, lane = tid % 32;
  std::memcpy(&s.shfl[tid], &v, sizeof(T));
  wait_at(s.warps[warp]);
  T out;
  std::memcpy(&out, &s.shfl[warp * 32 + ((lane ^ static_cast<unsigned>(lane_mask)) & 31u)], sizeof(T));
  wait_at(s.warps[warp]);
  return out;
}

inline void fiber_entry() {
  Scheduler& s = sched();
  s.body();
  s.fibers[s.current].done = true;
  --s.block.alive;
  --s.warps[s.current / 32].alive;
  _longjmp(s.main, 1);  // never returns
}

/// The checks cudaLaunchKernel makes on a configuration (limits of current GPUs).
inline bool valid_configuration(dim3 grid, dim3 block, size_t smem) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  return grid.x >= 1 && grid.x <= 0x7FFFFFFFu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
         grid.z <= 65535 && block.x >= 1 && block.x <= 1024 && block.y >= 1 && block.y <= 1024 &&
         block.z >= 1 && block.z <= 64 && threads <= 1024 && smem <= 48 * 1024;
}

/// ``kernel<<<grid, block, smem, stream>>>(args...)`` on the current device: checked, recorded,
/// then (unless only recording) run over a 1-D grid of 1-D blocks. Errors go to cudaGetLastError.
template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
            A... args) {
  Runtime& rt = runtime();
  const std::lock_guard<std::mutex> lock(rt.mutex);
  rt.launches.push_back(LaunchRecord{name, grid, block, smem, stream, rt.device, rt.guards, false});
  if (rt.inject != cudaSuccess) {
    rt.last_error = rt.inject;
    rt.inject = cudaSuccess;
    return;
  }
  if (!valid_configuration(grid, block, smem)) {
    rt.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (!rt.execute) return;
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1 || block.x % 32 != 0)
    throw std::logic_error(std::string("upi_emu: 1-D launches with a multiple of 32 threads only (") + name + ")");
  rt.launches.back().ran = true;
  Scheduler& s = sched();
  g_grid_dim = grid;
  g_block_dim = block;
  s.body = [&]() { kernel(static_cast<P>(args)...); };
  s.fibers.resize(block.x);
  s.shfl.assign(block.x, 0);
  for (unsigned b = 0; b < grid.x; ++b) {
    g_block = dim3(b);
    s.block = Barrier{0, block.x, 0};
    s.warps.assign(block.x / 32, Barrier{0, 32, 0});
    for (unsigned t = 0; t < block.x; ++t) {
      Fiber& f = s.fibers[t];
      f.done = false;
      f.started = false;
      if (f.stack.size() != kStackBytes) f.stack.assign(kStackBytes, 0);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = f.stack.size();
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_entry, 0);
    }
    for (bool any = true; any;) {
      any = false;
      for (unsigned t = 0; t < block.x; ++t) {
        if (s.fibers[t].done) continue;
        any = true;
        s.current = t;
        g_thread = dim3(t);
        Fiber& f = s.fibers[t];
        if (_setjmp(s.main) == 0) {
          if (!f.started) {
            f.started = true;
            setcontext(&f.ctx);
          }
          _longjmp(f.env, 1);
        }
      }
    }
  }
}

}  // namespace upi_emu

#define threadIdx (::upi_emu::g_thread)
#define blockIdx (::upi_emu::g_block)
#define blockDim (::upi_emu::g_block_dim)
#define gridDim (::upi_emu::g_grid_dim)
#define __shared__ static
#define __syncthreads() ::upi_emu::syncthreads()
#define __shfl_xor_sync(mask, v, off) ::upi_emu::shfl_xor((v), (off))
