#!/usr/bin/env bash
# One-shot check of the C++/CUDA extension on a GPU machine (no internet needed), under 8 minutes on
# an H100:
#   1. installs the project in place (pip install --no-deps --no-build-isolation -e .) and builds
#      upi_fast._C for the local card only (TORCH_CUDA_ARCH_LIST from get_device_capability);
#   2. runs the GPU tests (pytest -m gpu: CUDA extension vs Triton vs PyTorch, float64 references,
#      odd sizes, poisoned outputs) with the Triton kernels compiled and the extension required;
#   3. times every op on the three backends side by side (bench.harness; same inputs per op);
#   4. runs the benchmark suites one by one (python -m bench SUITE --device cuda --quick; each its cap);
#   5. prints a short summary table last.
# Full results (logs, pytest XML, JSON) go to $OUT when set, else bench/results/gpu_check-<time>/.
# Each step runs under `timeout`; the steps share a budget (GPU_CHECK_BUDGET_S, default 450 s).
#
#   bash bench/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
export PATH="$(cd "$(dirname "$(command -v "$PY")")" && pwd):$PATH"   # ninja next to the interpreter
OUT_DIR="${OUT:-bench/results/gpu_check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
END=$((SECONDS + BUDGET))
declare -a SUMMARY=()

# run_step NAME CAP_S CMD...: runs CMD with the smaller of CAP_S and the time left, logs to $OUT_DIR/NAME.log
run_step() {
  local name="$1" cap="$2"
  shift 2
  local left=$((END - SECONDS - 15))
  local limit=$(( cap < left ? cap : left ))
  if (( left < 20 )); then
    SUMMARY+=("$(printf '| %-22s | %-9s | %6s |' "$name" "skipped" "-")")
    echo "=== $name: skipped (time budget)"
    return 1
  fi
  echo "=== $name (limit ${limit} s)"
  local start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - start)) status="ok"
  if (( rc == 124 || rc == 137 )); then status="timeout"; elif (( rc != 0 )); then status="FAILED($rc)"; fi
  tail -n 25 "$OUT_DIR/$name.log"
  SUMMARY+=("$(printf '| %-22s | %-9s | %5ss |' "$name" "$status" "$took")")
  return $rc
}

# --- 0. the machine ----------------------------------------------------------------------------
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi unavailable"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || true
  command -v ninja && ninja --version
} > "$OUT_DIR/machine.txt" 2>&1
cat "$OUT_DIR/machine.txt"
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')" || {
  echo "gpu_check: no CUDA device visible to torch" >&2; exit 1; }

# --- 1. build ----------------------------------------------------------------------------------
export UPI_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}"
run_step build 240 "$PY" -m pip install --no-deps --no-build-isolation -v -e .
"$PY" -c "import upi_fast, upi_fast._C as C; print(C.build_info())" > "$OUT_DIR/build_info.txt" 2>&1
cat "$OUT_DIR/build_info.txt"

# --- 2. GPU tests --------------------------------------------------------------------------------
# this extension's comparisons first, then the other GPU tests (Triton kernels, ...)
export TRITON_INTERPRET=0 UPI_FAST_REQUIRE_EXT=1
run_step pytest_cuda_ext 150 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu_cuda_ext.py \
  --junitxml="$OUT_DIR/pytest_cuda_ext.xml"
run_step pytest_gpu_other 120 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests \
  --ignore=tests/test_gpu_cuda_ext.py --junitxml="$OUT_DIR/pytest_gpu_other.xml"

# --- 3. the three backends side by side ----------------------------------------------------------
run_step backends_bench 75 "$PY" - "$OUT_DIR/backends.json" <<'PYEOF'
"""Each op on the cuda / triton / torch backends: same inputs, bench.harness timing (CUDA events)."""
import sys
import torch
import upi_fast
from bench.harness import machine_info, measure, print_table, write_json

dev = "cuda"
torch.manual_seed(0)
sizes = {"g": (128, 3, 224, 224), "act": (128, 256, 56, 56), "sketch": (16, 128, 150528)}
names = [n for n in ("cuda", "triton", "torch") if upi_fast.backends()[n]]
rows = []


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def bench(op, make_call, must_move, ref_out=None):
    times = {}
    for name in names:
        upi_fast.set_backend(name)
        fn = make_call()
        out = fn()
        m = measure(f"{op}[{name}]", fn, warmup=3, repeat=10, device=dev)
        err = None
        if ref_out is not None:
            got = out if isinstance(out, (tuple, list)) else (out,)
            err = max(((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                      for a, b in zip(got, ref_out) if b.numel())
        times[name] = m.median_s
        rows.append({"op": op, "backend": name, "median_ms": m.median_s * 1e3, "iqr_ms": m.iqr_s * 1e3,
                     "GB_per_s": must_move / m.median_s / 1e9, "max_rel_err": err})
    for r in rows:
        if r["op"] == op and "torch" in times:
            r["speedup_vs_torch"] = times["torch"] / (r["median_ms"] / 1e3)
    upi_fast.set_backend("auto")
    torch.cuda.empty_cache()


g = torch.randn(sizes["g"], device=dev)
ref = torch.rand(sizes["g"][0], sizes["g"][2] * sizes["g"][3], device=dev)
ref /= ref.sum(1, keepdim=True)
upi_fast.set_backend("torch")
want = [t.double() for t in torch.ops.upi_fast.saliency_dissim(g.double(), ref.double(), "l2", True)]
bench("saliency_dissim l2+grad f32", lambda: (lambda: torch.ops.upi_fast.saliency_dissim(g, ref, "l2", True)),
      nbytes(g, ref) + nbytes(g) + g.shape[0] * 4, want)
del g, ref, want

for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(sizes["act"], device=dev).to(dtype)
    gy = torch.randn_like(x)
    gg = torch.randn_like(x)
    tag = "f32" if dtype == torch.float32 else "bf16"
    bench(f"softplus fwd {tag}", lambda: (lambda: torch.ops.upi_fast.softplus(x, 10.0)), 2 * nbytes(x))
    bench(f"softplus bwd {tag}", lambda: (lambda: torch.ops.upi_fast.softplus_backward(gy, x, 10.0)), 3 * nbytes(x))
    bench(f"softplus bwd2 {tag}", lambda: (lambda: torch.ops.upi_fast.softplus_double_backward(gg, gy, x, 10.0)),
          5 * nbytes(x))
    del x, gy, gg
    torch.cuda.empty_cache()

k, b, d = sizes["sketch"]
A = torch.randn(b, d, device=dev)
W = torch.zeros(k, d, device=dev)
bench("sketch_update k16 norm f32", lambda: (lambda: torch.ops.upi_fast.sketch_update(W, A, 0, 7, True)),
      nbytes(A) + 2 * nbytes(W))

print_table(f"upi_fast ops on three backends ({torch.cuda.get_device_name(0)})", rows,
            ["op", "backend", "median_ms", "iqr_ms", "GB_per_s", "speedup_vs_torch", "max_rel_err"])
write_json(sys.argv[1], {"machine": machine_info(dev), "sizes": sizes, "rows": rows})
PYEOF

# --- 4. the benchmark suites ---------------------------------------------------------------------
# one step per suite, most wanted first (the step cost in plain gradients, whole fits against the naive
# loop, the data path), so that a slow suite costs only its own cap and the budget decides what is left
for entry in upi_grad:70 fits:70 data:80 hvp:40 fixed_costs:40 upi_pca:40 ops:30 svd:30; do
  suite="${entry%%:*}" cap="${entry##*:}"
  run_step "bench_$suite" "$cap" "$PY" -m bench "$suite" --device cuda --quick
done
# the suites write under bench/results/<date>-<device>/: keep a copy with the rest
for d in bench/results/*/; do
  [[ "$(cd "$d" && pwd)" == "$OUT_DIR" || "$d" == *gpu_check-* ]] && continue
  [[ -n "$(find "$d" -newer "$OUT_DIR/machine.txt" -name '*.json' 2>/dev/null)" ]] && cp -r "$d" "$OUT_DIR/" 2>/dev/null
done

# --- 5. summary ----------------------------------------------------------------------------------
echo
echo "=== gpu_check summary ($(head -n 2 "$OUT_DIR/machine.txt" | tail -n 1 | cut -d, -f1), ${SECONDS} s, results in $OUT_DIR)"
for log in pytest_cuda_ext pytest_gpu_other; do
  echo "$log: $(grep -E "passed|failed|error" "$OUT_DIR/$log.log" 2>/dev/null | tail -n 1)"
done
echo "| step                   | status    |   time |"
echo "|------------------------|-----------|--------|"
printf '%s\n' "${SUMMARY[@]}"
if [[ -f "$OUT_DIR/backends.json" ]]; then
  "$PY" - "$OUT_DIR/backends.json" <<'PYEOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print("\n| op | backend | median ms | GB/s | x torch |")
print("|---|---|---|---|---|")
for r in rows:
    print(f"| {r['op']} | {r['backend']} | {r['median_ms']:.3f} | {r['GB_per_s']:.0f} | "
          f"{r.get('speedup_vs_torch', float('nan')):.2f} |")
PYEOF
fi
