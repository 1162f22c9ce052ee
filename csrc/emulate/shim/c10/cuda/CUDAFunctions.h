// Emulator shim for c10/cuda/CUDAFunctions.h: the current device is the emulator's (tests select it).
#pragma once

#include <c10/core/Device.h>

#include "CUDAException.h"

namespace c10::cuda {

inline DeviceIndex device_count() noexcept { return static_cast<DeviceIndex>(::upi_emu::kDevices); }

inline DeviceIndex current_device() { return static_cast<DeviceIndex>(::upi_emu::runtime().device); }

}  // namespace c10::cuda
