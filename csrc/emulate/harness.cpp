// The kernels and their host code (csrc/*.cu) compiled by g++ against the emulator (emulate.h), for
// tests/test_cuda_host_emulated.py. Together with csrc/register.cpp (compiled with
// -DUPI_FAST_EMULATE, which registers the tensor entry points as upi_fast_emu:: ops) this is the
// torch extension the test builds with torch.utils.cpp_extension.load; not part of upi_fast._C.
//
// Besides the tensor entry points (through the dispatcher), the library exports a C ABI that the
// test reaches with ctypes on the same shared object:
//   * upi_emu_softplus / upi_emu_saliency / upi_emu_sketch: the raw launchers on raw pointers (odd
//     alignments, poisoned workspaces, any multiprocessor count);
//   * upi_emu_rademacher_negative: the generator, for bit identity with the Python one;
//   * upi_emu_set_* / upi_emu_launch_*: the emulated runtime (current device and stream, recording
//     only, injected launch errors, the launch log) and NaN-poisoning of new CPU allocations.
#define UPI_FAST_EMULATE 1

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cstdio>

#include "../saliency_dissim.cu"
#include "../sketch_update.cu"
#include "../softplus.cu"

#define UPI_EMU_API extern "C" __attribute__((visibility("default")))

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

/// A CPU allocator that fills new blocks with 0xFF bytes (NaN in every float dtype): what the GPU
/// tests do to the CUDA caching allocator, so that an output element the host code allocates and a
/// kernel forgets to write shows up as NaN. It is the CPU allocator only while switched on
/// (upi_emu_set_poison); the allocator it replaces still allocates and frees every block.
struct PoisoningAllocator final : c10::Allocator {
  c10::Allocator* base = nullptr;
  std::atomic<bool> on{false};

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = base->allocate(n);
    if (on.load(std::memory_order_relaxed) && n > 0 && p.get() != nullptr) std::memset(p.get(), 0xFF, n);
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base->raw_deleter(); }
  bool is_simple_data_ptr(const c10::DataPtr& p) const override { return base->is_simple_data_ptr(p); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    base->copy_data(dest, src, count);
  }
};

PoisoningAllocator& poisoning_allocator() {
  static PoisoningAllocator* alloc = new PoisoningAllocator();  // static lifetime, as SetCPUAllocator requires
  return *alloc;
}

}  // namespace

// ------------------------------------------------------------------------------- raw launchers
// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16
UPI_EMU_API int upi_emu_softplus(int dtype, int pass, const void* a, const void* b, const void* c, void* o1,
                                 void* o2, int64_t n, double beta, int sm_count) {
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

UPI_EMU_API int64_t upi_emu_saliency_workspace(int dtype, int64_t B, int64_t N, int sm_count) {
  return dtype == 0 ? upi_fast::saliency_workspace_size(B, N, sm_count, upi_fast::vec_width<float>())
                    : upi_fast::saliency_workspace_size(B, N, sm_count, upi_fast::vec_width<double>());
}

UPI_EMU_API int upi_emu_saliency(int dtype, const void* g, const void* ref, void* loss, void* grad, void* workspace,
                                 int64_t B, int64_t C, int64_t N, int kind, int sm_count) {
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

UPI_EMU_API int upi_emu_sketch(int w_dtype, int a_dtype, void* W, const void* A, void* inv, int64_t k, int64_t b,
                               int64_t d, int64_t row_offset, int64_t seed, int normalize, int sm_count) {
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

UPI_EMU_API uint32_t upi_emu_rademacher_negative(uint32_t seed, uint32_t row, uint32_t j) {
  return upi_fast::rademacher_negative(upi_fast::rademacher_row_hash(upi_fast::mix32(seed), row), j);
}

// ------------------------------------------------------------------------------- emulated runtime
UPI_EMU_API int upi_emu_device_count() { return upi_emu::kDevices; }

UPI_EMU_API int upi_emu_multiprocessors(int device) {
  return device >= 0 && device < upi_emu::kDevices ? upi_emu::kMultiprocessors[device] : -1;
}

/// Makes ``device`` current; returns the previous one (-1: no such device, nothing changed).
UPI_EMU_API int upi_emu_set_device(int device) {
  if (device < 0 || device >= upi_emu::kDevices) return -1;
  const int before = upi_emu::runtime().device;
  upi_emu::runtime().device = device;
  return before;
}

/// Makes ``stream`` (any non-zero value stands for a stream; 0 is the default stream) current;
/// returns the previous one.
UPI_EMU_API uintptr_t upi_emu_set_stream(uintptr_t stream) {
  const uintptr_t before = reinterpret_cast<uintptr_t>(upi_emu::runtime().stream);
  upi_emu::runtime().stream = reinterpret_cast<cudaStream_t>(stream);
  return before;
}

/// 0: record launches without running them; 1: run them. Returns the previous setting.
UPI_EMU_API int upi_emu_set_execute(int execute) {
  const int before = upi_emu::runtime().execute ? 1 : 0;
  upi_emu::runtime().execute = execute != 0;
  return before;
}

/// The next launch fails with CUDA error ``code`` (0: none).
UPI_EMU_API void upi_emu_inject_launch_error(int code) {
  upi_emu::runtime().inject = static_cast<cudaError_t>(code);
}

/// Live device guards (0 between calls: every guard was released).
UPI_EMU_API int upi_emu_live_guards() { return upi_emu::runtime().guards; }

/// 1: new CPU allocations are filled with NaN bytes; 0: left as they come. Returns the previous setting.
UPI_EMU_API int upi_emu_set_poison(int on) {
  PoisoningAllocator& a = poisoning_allocator();
  const bool before = a.on.load();
  if (on != 0 && !before) {
    a.base = c10::GetCPUAllocator();
    a.on.store(true);
    c10::SetCPUAllocator(&a, /*priority=*/255);
  } else if (on == 0 && before) {
    c10::SetCPUAllocator(a.base, /*priority=*/255);
    a.on.store(false);
  }
  return before ? 1 : 0;
}

UPI_EMU_API int64_t upi_emu_launch_count() { return static_cast<int64_t>(upi_emu::runtime().launches.size()); }

UPI_EMU_API void upi_emu_clear_launches() { upi_emu::runtime().launches.clear(); }

/// Launch ``i``: its kernel name into ``name`` (``cap`` bytes, NUL-terminated) and into ``fields``:
/// grid x, y, z, block x, y, z, shared memory bytes, stream, device, live guards, ran. 0 on success.
UPI_EMU_API int upi_emu_launch_record(int64_t i, char* name, int cap, int64_t* fields) {
  const auto& log = upi_emu::runtime().launches;
  if (i < 0 || i >= static_cast<int64_t>(log.size()) || cap <= 0) return 1;
  const upi_emu::LaunchRecord& r = log[static_cast<size_t>(i)];
  std::snprintf(name, static_cast<size_t>(cap), "%s", r.kernel.c_str());
  const int64_t values[] = {r.grid.x,
                            r.grid.y,
                            r.grid.z,
                            r.block.x,
                            r.block.y,
                            r.block.z,
                            static_cast<int64_t>(r.smem),
                            static_cast<int64_t>(reinterpret_cast<uintptr_t>(r.stream)),
                            r.device,
                            r.guards,
                            r.ran ? 1 : 0};
  std::memcpy(fields, values, sizeof(values));
  return 0;
}
