// Emulator shim for c10/cuda/CUDAGuard.h. The real guard makes the tensor's CUDA device current; the
// emulated device's tensors are CPU tensors, which carry no device index, so the guard keeps the
// device the test selected. It insists on a tensor of the emulated device (as the real one insists
// on a CUDA device) and counts itself alive, so that tests can check each launch ran under a guard.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include "CUDAFunctions.h"

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard() = delete;
  explicit CUDAGuard(DeviceIndex device_index) : saved_(::upi_emu::runtime().device) {
    TORCH_CHECK(device_index >= 0 && device_index < ::upi_emu::kDevices, "upi_emu: no device ",
                static_cast<int>(device_index));
    ::upi_emu::runtime().device = device_index;
    ++::upi_emu::runtime().guards;
  }
  explicit CUDAGuard(Device device) : saved_(::upi_emu::runtime().device) {
    TORCH_CHECK(device.is_cpu(), "upi_emu: CUDAGuard expects a device of the emulator (cpu), got ", device);
    ++::upi_emu::runtime().guards;
  }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
  CUDAGuard(CUDAGuard&&) = delete;
  CUDAGuard& operator=(CUDAGuard&&) = delete;
  ~CUDAGuard() {
    --::upi_emu::runtime().guards;
    ::upi_emu::runtime().device = saved_;
  }

 private:
  int saved_;
};

}  // namespace c10::cuda
