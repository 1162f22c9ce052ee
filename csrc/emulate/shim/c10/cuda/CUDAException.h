// Emulator shim for c10/cuda/CUDAException.h: the runtime-call checks, on the emulator's runtime.
#pragma once

#include <c10/util/Exception.h>

#include "../../cuda_runtime_api.h"

#define C10_CUDA_CHECK(EXPR)                                                             \
  do {                                                                                   \
    const cudaError_t upi_emu_err_ = (EXPR);                                             \
    TORCH_CHECK(upi_emu_err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(upi_emu_err_)); \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
