// Host emulation of the small subset of CUDA the upi_fast kernels use, so that their logic
// (indexing, tails, reductions, vector paths) can be tested on machines without a GPU.
//
// Semantics: blocks run one after another; the threads of a block run as cooperative fibers
// (ucontext) on one OS thread, scheduled round-robin; __syncthreads is a barrier over the block's
// live threads, the warp shuffles a barrier over the warp's 32 threads (a thread that returned no
// longer counts, like a thread that exited on the GPU); __shared__ variables become function-local
// statics (one block runs at a time). Deterministic. Only 1-D grids and blocks whose size is a
// multiple of 32 are supported. Not part of the extension build.
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <math.h>
#include <stdexcept>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

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

/// Run ``kernel(args...)`` over a 1-D grid of 1-D blocks.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, A... args) {
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x > 1024)
    throw std::invalid_argument("upi_emu: 1-D launches with a multiple of 32 threads only");
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
