#!/usr/bin/env bash
# Build the C++/CUDA extension upi_fast._C in place, for CI (compiles only: no GPU needed).
#
#   .ci/build_ext.sh            # uses .venv/bin/python if present, else python3 ($PYTHON overrides)
#
# Sets CUDA_HOME by discovery (setup_cuda.find_cuda_home: the nvcc on PATH may be a wrapper
# script), one architecture (TORCH_CUDA_ARCH_LIST, default 9.0), MAX_JOBS=2, and runs the in-place
# editable build with UPI_FAST_BUILD_CUDA=1 (a compile error fails the script). Then imports the
# module and prints its build information. Run tests with UPI_FAST_REQUIRE_EXT=1 afterwards so
# that a missing extension fails tests/test_cuda_ext.py instead of skipping it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
fi
# ninja (pip package) lives next to the interpreter in a virtual environment
export PATH="$(cd "$(dirname "$(command -v "$PY")")" && pwd):$PATH"

CUDA_HOME="$("$PY" -c 'import setup_cuda, torch; print(setup_cuda.find_cuda_home(torch.version.cuda) or "")')"
if [[ -z "$CUDA_HOME" ]]; then
  echo "build_ext.sh: no CUDA toolkit found (need bin/nvcc, include/cuda_runtime.h, lib64/libcudart.so)" >&2
  exit 1
fi
export CUDA_HOME
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export UPI_FAST_BUILD_CUDA=1

echo "build_ext.sh: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" \
     "ninja=$(command -v ninja || echo none)"
start=$(date +%s)
"$PY" -m pip install --no-build-isolation --no-deps -e . 
echo "build_ext.sh: built in $(( $(date +%s) - start )) s"

"$PY" - <<'PYEOF'
import upi_fast  # noqa: F401  (defines the op schemas, then loads upi_fast._C)
import upi_fast._C as C
from upi_fast.ops import _state
assert _state.get("ext") is C, f"upi_fast did not load the extension: {_state.get('ext_error')}"
print("build_ext.sh: upi_fast._C", C.__file__)
for key, value in sorted(C.build_info().items()):
    print(f"  {key}: {value}")
PYEOF
