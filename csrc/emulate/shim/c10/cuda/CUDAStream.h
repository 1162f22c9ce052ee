// Emulator shim for c10/cuda/CUDAStream.h: the current stream is the emulator's (tests set it, and
// the launches record the stream they were given).
#pragma once

#include <c10/core/Device.h>

#include "CUDAFunctions.h"

namespace c10::cuda {

class CUDAStream {
 public:
  CUDAStream(cudaStream_t stream, DeviceIndex device) : stream_(stream), device_(device) {}
  cudaStream_t stream() const { return stream_; }
  operator cudaStream_t() const { return stream_; }
  DeviceIndex device_index() const { return device_; }

 private:
  cudaStream_t stream_;
  DeviceIndex device_;
};

inline CUDAStream getCurrentCUDAStream(DeviceIndex device_index = -1) {
  const ::upi_emu::Runtime& rt = ::upi_emu::runtime();
  return CUDAStream(rt.stream, device_index < 0 ? static_cast<DeviceIndex>(rt.device) : device_index);
}

}  // namespace c10::cuda
