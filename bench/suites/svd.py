"""Benchmark suite ``svd``: the top right singular vector of UPI-PCA-sized matrices.

1. **Stream** (never held): n x 150,528 float32 rows with a planted spectrum, regenerated on the fly
   from a seed (:class:`upi_fast.linalg.PlantedRows`; n = 20,000, i.e. 12 GB, or 1,000 with
   ``--quick``, which also skips the stream warm-up). Contenders: one plain pass that only
   generates and sums the rows (the floor), and the single-pass
   :class:`~upi_fast.linalg.StreamingSketch`, timed in interleaved rounds. Peak resident memory of
   each is measured in a fresh subprocess (growth of ``ru_maxrss`` over the run, cross-checked with
   Linux ``VmHWM``; CUDA: peak allocated).
   Accuracy: |cos| with the planted top vector and (not with ``--quick``) with a 3-pass block
   Krylov run over the same regenerated stream (timed once, for reference).
2. **In memory**: n x 150,528 float32 (n = 4,000, or 500 with ``--quick``), planted spectrum with
   sigma_1 / sigma_2 ~ 1.27 (as in docs/calibration.md). Exact top vector from ``eigh`` of ``A A^T``;
   contenders: ``torch.svd_lowrank(q=6, niter=2)``, scikit-learn ``randomized_svd(k=1,
   n_oversamples=5, n_iter=2)`` and ``(10, 7)``, and ours (subspace / block Krylov / single-pass
   sketch / frequent directions), all on the same tensor. Reported: median time over interleaved
   rounds (contenders alternate, so load drifts hit all of them), matrix reads, |cos| with the exact
   top vector, relative error of sigma_1.

    python -m bench.suites.svd [--quick] [--device cpu|cuda] [--no-save]

Results go to ``bench/results/<date>-<device>/svd.json`` (written atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from ..harness import Measurement, compare, finish_suite, machine_info, measure, print_table, suite_parser

__all__ = ["run", "main"]

D = 150_528
_STREAM_BLOCK = 256
_STREAM_COLUMNS = ["name", "median_s", "min_s", "max_s", "rows_per_s", "vs_floor", "peak_rss_growth_mb",
                   "vm_hwm_growth_mb", "abs_cos_planted", "abs_cos_krylov_ref"]
_MEM_COLUMNS = ["name", "reads", "median_s", "min_s", "max_s", "speedup_vs_sklearn(5,2)", "abs_cos_exact",
                "sigma1_rel_err"]


def _sizes(quick: bool, smoke: bool = False) -> dict:
    if smoke:  # tests of the benchmark entry point only: tiny sizes
        return {"stream_n": 128, "memory_n": 64, "d": D}
    return {"stream_n": 1_000 if quick else 20_000, "memory_n": 500 if quick else 4_000, "d": D}


def _stream_source(n: int, device: str):
    from upi_fast.linalg import PlantedRows
    return PlantedRows.preset("ratio127", n, D, r=32, seed=7, chunk=64, block_size=_STREAM_BLOCK, device=device)


def _floor(src, device: str) -> torch.Tensor:
    acc = torch.zeros(D, device=device)
    for _, blk in src.blocks(_STREAM_BLOCK):
        acc += blk.sum(0)
    return acc


def _sketch_stream(src, device: str):
    from upi_fast.linalg import StreamingSketch
    sk = StreamingSketch(D, k=1, oversample=10, seed=0, device=device)
    for off, blk in src.blocks(_STREAM_BLOCK):
        sk.update(blk, off)
    return sk


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _vm_hwm_mb() -> float | None:
    """This process's own resident high-water mark (Linux ``VmHWM``; reset by exec, unlike
    ``ru_maxrss``, which a child inherits from its parent's peak)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _memory_worker(which: str, n: int) -> dict:
    """Run one stream contender once in this (fresh) process; report the growth of the peak RSS."""
    src = _stream_source(n, "cpu")
    base, base_hwm = _maxrss_mb(), _vm_hwm_mb()
    t0 = time.perf_counter()
    if which == "floor":
        _floor(src, "cpu")
    else:
        _sketch_stream(src, "cpu").finalize()
    hwm = _vm_hwm_mb()
    return {"which": which, "base_rss_mb": base, "peak_rss_growth_mb": _maxrss_mb() - base,
            "vm_hwm_growth_mb": (hwm - base_hwm) if hwm is not None and base_hwm is not None else None,
            "seconds": time.perf_counter() - t0}


def _memory_in_subprocesses(which: list[str], n: int) -> dict:
    """One fresh subprocess per contender, run side by side (only their peak memory is used).

    Must run before this process grows: a child's ``ru_maxrss`` starts at its parent's peak.
    """
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = {w: subprocess.Popen([sys.executable, "-m", "bench.suites.svd", "--memory-worker", w, "--stream-n", str(n)],
                                 cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in which}
    out = {}
    for w, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=3600)
            out[w] = json.loads(stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
            if p.returncode != 0:
                print(f"memory worker {w} failed: {stderr[-500:]}", flush=True)
        except (subprocess.SubprocessError, ValueError, IndexError) as exc:
            p.kill()
            print(f"memory worker {w} failed: {exc}", flush=True)
            out[w] = None
    return out


def _abs_cos(v, u) -> float:
    v = torch.as_tensor(v).double().flatten().cpu()
    u = torch.as_tensor(u).double().flatten().cpu()
    return float((v @ u).abs() / (v.norm() * u.norm()))


def _stream_section(n: int, device: str, warmup: int, repeat: int, memory: dict,
                    quick: bool) -> tuple[list[dict], dict]:
    from upi_fast.linalg import randomized_svd
    src = _stream_source(n, device)
    planted = src.V[0]
    last: dict = {}

    def sketch():
        last["sketch"] = _sketch_stream(src, device)
        return last["sketch"].finalize()

    cont = {"generate + sum (floor)": lambda: _floor(src, device), "StreamingSketch k=1, l=11 (1 pass)": sketch}
    for fn in cont.values():  # warm-up (untimed)
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cont}
    peaks: dict[str, float | None] = {name: None for name in cont}
    for _ in range(repeat):  # interleaved rounds: load drifts hit both contenders alike
        for name, fn in cont.items():
            m = measure(name, fn, items=n, warmup=0, repeat=1, device=device, track_memory=(device == "cuda"))
            times[name] += m.times_s
            if m.peak_mem_mb is not None:
                peaks[name] = max(peaks[name] or 0.0, m.peak_mem_mb)
    ms = [Measurement(name, times[name], n, peaks[name]) for name in cont]
    sk = last["sketch"] if "sketch" in last else _sketch_stream(src, device)
    S, Vh = sk.finalize()
    err = sk.error_estimate()
    ref = None
    if not quick:  # a multi-pass reference over the regenerated stream (3 more reads of it)
        t0 = time.perf_counter()
        ref = randomized_svd(src, k=1, oversample=5, n_iter=2, method="block_krylov", block_size=_STREAM_BLOCK)
        ref_s = time.perf_counter() - t0
    rows = compare(ms, "generate + sum (floor)")
    for r in rows:
        r["rows_per_s"] = r["items_per_s"]
        r["vs_floor"] = r["median_s"] / rows[0]["median_s"]
        if device == "cpu":
            mem = memory.get("floor" if r is rows[0] else "sketch") or {}
            r["peak_rss_growth_mb"] = mem.get("peak_rss_growth_mb")
            r["vm_hwm_growth_mb"] = mem.get("vm_hwm_growth_mb")
        else:
            r["peak_rss_growth_mb"] = r["peak_mem_mb"]
    rows[1]["abs_cos_planted"] = _abs_cos(Vh[0], planted)
    info = {"sketch_S1": float(S[0]), "sketch_sigma_upper": float(err.sigma_upper[0]),
            "sketch_residual_fro": err.residual_fro, "sketch_residual_fro_W_estimate": err.residual_fro_sketch,
            "sketch_sin_angle_bound": err.sin_angle_bound, "fro_norm": err.fro_norm,
            "planted_sigma": src.sigma[:4].tolist(), "noise": src.noise, "memory_workers": memory}
    if ref is not None:
        rows[1]["abs_cos_krylov_ref"] = _abs_cos(Vh[0], ref.Vh[0])
        rows.append({"name": "block Krylov l=6, 3 passes (reference, timed once)", "median_s": ref_s,
                     "min_s": ref_s, "max_s": ref_s, "rows_per_s": 3 * n / ref_s,
                     "vs_floor": ref_s / rows[0]["median_s"], "abs_cos_planted": _abs_cos(ref.Vh[0], planted),
                     "abs_cos_krylov_ref": 1.0})
        info.update({"krylov_S1": float(ref.S[0]), "krylov_sigma_upper": float(ref.sigma_upper[0])})
    return rows, info


def _in_memory_matrix(n: int, device: str) -> torch.Tensor:
    from upi_fast.linalg import PlantedRows
    src = PlantedRows.preset("ratio127", n, D, r=32, seed=11, chunk=64, block_size=512, device=device)
    A = torch.empty(n, D, device=device)
    for off, blk in src.blocks():
        A[off:off + blk.shape[0]] = blk
    return A


def _memory_section(n: int, device: str, rounds: int) -> tuple[list[dict], dict]:
    from sklearn.utils.extmath import randomized_svd as sk_rsvd

    from upi_fast.linalg import FrequentDirections, StreamingSketch, exact_svd, randomized_svd

    A = _in_memory_matrix(n, device)
    t0 = time.perf_counter()
    S_ex, V_ex = exact_svd(A, 2, gram_dtype=torch.float32)  # eigh of A A^T (float32 products, float64 sum)
    exact_s = time.perf_counter() - t0
    v, s1 = V_ex[0], float(S_ex[0])

    def ours(method, oversample, n_iter):
        return lambda: randomized_svd(A, k=1, oversample=oversample, n_iter=n_iter, method=method)

    def sketch():
        sk = StreamingSketch(D, k=1, oversample=10, device=device)
        sk.update(A)
        return sk.finalize()

    def fd():
        f = FrequentDirections(D, ell=20, device=device)
        f.update(A)
        return f.finalize(1)

    cont = {"one plain pass (sum)": (lambda: A.sum(0), 1)}
    if device == "cpu":
        An = A.numpy()
        cont["sklearn randomized_svd(k=1, n_oversamples=5, n_iter=2)"] = (
            lambda: sk_rsvd(An, 1, n_oversamples=5, n_iter=2, random_state=0), 6)
        cont["sklearn randomized_svd(k=1, n_oversamples=10, n_iter=7)"] = (
            lambda: sk_rsvd(An, 1, n_oversamples=10, n_iter=7, random_state=0), 16)
    cont["torch.svd_lowrank(q=6, niter=2)"] = (lambda: torch.svd_lowrank(A, q=6, niter=2), 6)
    cont["ours subspace(oversample=5, n_iter=2)"] = (ours("subspace", 5, 2), 7)
    cont["ours block_krylov(oversample=5, n_iter=1)"] = (ours("block_krylov", 5, 1), 5)
    cont["ours block_krylov(oversample=5, n_iter=2)"] = (ours("block_krylov", 5, 2), 7)
    cont["ours subspace defaults(oversample=10, n_iter=4)"] = (ours("subspace", 10, 4), 11)
    cont["ours StreamingSketch l=11 (1 pass)"] = (sketch, 4)
    cont["ours FrequentDirections ell=20 (1 pass)"] = (fd, 1)

    acc = {}
    for name, (fn, _) in cont.items():  # warm-up round (untimed) also gives the accuracy
        out = fn()
        if name.startswith("one plain"):
            continue
        if name.startswith("sklearn"):
            S, Vh = torch.from_numpy(out[1]), torch.from_numpy(out[2])
        elif name.startswith("torch"):
            S, Vh = out[1], out[2].T
        else:
            S, Vh = out
        acc[name] = (_abs_cos(Vh[0], v), abs(float(S[0]) - s1) / s1)
    times: dict[str, list[float]] = {name: [] for name in cont}
    for _ in range(rounds):  # interleaved rounds: load drifts hit every contender alike
        for name, (fn, _) in cont.items():
            times[name] += measure(name, fn, warmup=0, repeat=1, device=device).times_s
    ms = [Measurement(name, times[name]) for name in cont]
    ref = ("sklearn randomized_svd(k=1, n_oversamples=5, n_iter=2)" if device == "cpu"
           else "torch.svd_lowrank(q=6, niter=2)")
    rows = compare(ms, ref)
    rows.insert(0, {"name": "exact (eigh of A A^T), timed once", "median_s": exact_s, "min_s": exact_s,
                    "max_s": exact_s, "abs_cos_exact": 1.0, "sigma1_rel_err": 0.0, "reads": 2})
    for r in rows[1:]:
        r["reads"] = cont[r["name"]][1]
        r["speedup_vs_sklearn(5,2)"] = r.pop("speedup_vs_" + ref)
        if r["name"] in acc:
            r["abs_cos_exact"], r["sigma1_rel_err"] = acc[r["name"]]
    info = {"sigma_1": s1, "sigma_2": float(S_ex[1]), "ratio": s1 / float(S_ex[1]), "exact_seconds": exact_s,
            "reads_note": "matrix reads (each of our passes reads A twice: A X then (A X)^T A; "
                          "+1 read for ||A||_F in the first pass; sketch: norms, A Omega^T, Y^T A, and the W op)"}
    return rows, info


def run(quick: bool = False, device: str = "cpu", smoke: bool = False) -> dict:
    """Run both sections; print Markdown tables; return ``{"rows": ..., "markdown": ..., ...}`` (JSON-able).
    ``smoke``: tiny sizes (128-row stream, 64-row matrix), for tests of ``python -m bench``."""
    device = torch.device(device).type
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' asked for but no CUDA device is present (use device='cpu')")
    quick = quick or smoke
    sizes = _sizes(quick, smoke)
    warmup, repeat, rounds = (1, 1, 1) if quick else (1, 3, 3)
    t0 = time.perf_counter()
    result = {"suite": "svd", "machine": machine_info(device), "quick": quick, "sizes": sizes,
              "command": "python -m bench.suites.svd" + (" --quick" if quick else "") + f" --device {device}"}
    # Memory first, in fresh subprocesses, while this process is still small (see _memory_in_subprocesses).
    memory = (_memory_in_subprocesses(["floor", "sketch"], sizes["stream_n"])
              if device == "cpu" and not smoke else {})  # smoke: no worker processes
    srows, sinfo = _stream_section(sizes["stream_n"], device, 0 if quick else warmup, repeat, memory, quick)
    md = print_table(f"Stream: {sizes['stream_n']:,} x {D:,} float32 rows regenerated from a seed "
                     f"({sizes['stream_n'] * D * 4 / 1e9:.1f} GB, never held), {device}, "
                     f"{torch.get_num_threads()} threads, median of {repeat} interleaved rounds",
                     srows, _STREAM_COLUMNS)
    mrows, minfo = _memory_section(sizes["memory_n"], device, rounds)
    md += "\n" + print_table(f"In memory: {sizes['memory_n']:,} x {D:,} float32, sigma1/sigma2 = "
                             f"{minfo['ratio']:.3f}, {device}, median of {rounds} interleaved rounds",
                             mrows, _MEM_COLUMNS)
    result.update({"stream": {"rows": srows, **sinfo}, "in_memory": {"rows": mrows, **minfo},
                   "rows": srows + mrows, "markdown": md, "seconds": time.perf_counter() - t0})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("svd", __doc__, "1,000-row stream and 500-row matrix, one round", threads=False)
    parser.add_argument("--memory-worker", choices=["floor", "sketch"], help=argparse.SUPPRESS)
    parser.add_argument("--stream-n", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(_memory_worker(args.memory_worker, args.stream_n)))
        return 0
    return finish_suite("svd", run(args.quick, args.device), args.device, args.no_save)


if __name__ == "__main__":
    sys.exit(main())
