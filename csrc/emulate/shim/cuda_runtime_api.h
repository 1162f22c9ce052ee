// Emulator shim (tests only; csrc/emulate/README in csrc/README.md): stands in for the CUDA
// toolkit's header when the host code is compiled by g++ against the emulator (emulate.h).
#pragma once

#include "../emulate.h"

// No CUDA runtime is linked: build_info() of the emulated module reports cuda_version "0.0".
#define CUDART_VERSION 0
