"""Benchmark suite ``ops``: each custom op's Triton kernel against the eager PyTorch composition it
replaces (the op's pure-PyTorch reference), on the same inputs, timed by :mod:`bench.harness`.

On a GPU every row reports the median time, the achieved bandwidth ``bytes that must move / time``
(the op's minimal traffic: each input read once, each output written once), that bandwidth as a
fraction of a measured device-to-device copy (``torch.empty_like(x).copy_(x)``, counted as read +
write), the time ratio against eager, and the kernel's maximal error against eager. GPU sizes:

* saliency dissimilarity: ``g`` 128 x 3 x 224 x 224 float32, l2 / rel_l2 / cosine, with gradient;
* softplus surrogate: forward, backward, double backward on 128 x 256 x 56 x 56 float32;
* sketch update: a 128 x 150528 float32 block into a k = 16 sketch, normalised and not.

On the CPU the Triton kernels can only run under the interpreter, whose timings mean nothing; the
suite then times the torch reference alone (smaller sizes) and, when ``TRITON_INTERPRET=1``,
checks the kernels' correctness on small inputs.

    python -m bench.suites.ops [--quick] [--device cuda|cpu] [--no-save]

Results go to ``bench/results/<date>-<device>/ops.json`` (written atomically).
"""
from __future__ import annotations

import os
import sys

import torch

from ..harness import Measurement, finish_suite, machine_info, measure, print_table, suite_parser

__all__ = ["run", "main"]

_COLUMNS_GPU = ["op", "name", "median_s", "iqr_s", "GB_per_s", "frac_of_copy", "speedup_vs_eager", "max_rel_err"]
_COLUMNS_CPU = ["op", "name", "median_s", "iqr_s", "GB_per_s"]


def _sizes(quick: bool, device: str) -> dict:
    if device == "cuda":
        return {"g": (128, 3, 224, 224), "act": (128, 256, 56, 56), "sketch": (16, 128, 150528)}
    if quick:
        return {"g": (4, 3, 64, 64), "act": (4, 64, 28, 28), "sketch": (16, 32, 8192)}
    return {"g": (16, 3, 224, 224), "act": (16, 256, 56, 56), "sketch": (16, 128, 150528)}


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _max_rel_err(got, want) -> float:
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    worst = 0.0
    for a, b in zip(got, want):
        scale = b.double().abs().max().item() or 1.0
        worst = max(worst, (a.double() - b.double()).abs().max().item() / scale)
    return worst


def _row(op: str, m: Measurement, must_move: int, copy_gbps: float | None, eager_s: float | None,
         err: float | None) -> dict:
    row = {"op": op, **m.as_dict(), "bytes": must_move, "GB_per_s": must_move / m.median_s / 1e9}
    if copy_gbps:
        row["frac_of_copy"] = row["GB_per_s"] / copy_gbps
    if eager_s:
        row["speedup_vs_eager"] = eager_s / m.median_s
    if err is not None:
        row["max_rel_err"] = err
    return row


def _copy_gbps(x: torch.Tensor, device: str, warmup: int, repeat: int) -> tuple[dict, float]:
    m = measure("copy", lambda: torch.empty_like(x).copy_(x), device=device, warmup=warmup, repeat=repeat)
    gbps = 2 * _nbytes(x) / m.median_s / 1e9
    return {"op": f"copy {tuple(x.shape)}", **m.as_dict(), "bytes": 2 * _nbytes(x), "GB_per_s": gbps,
            "frac_of_copy": 1.0}, gbps


def _bench_saliency(sizes, device, warmup, repeat, gpu) -> list[dict]:
    from upi_fast.ops.saliency_dissim import saliency_dissim_reference
    gen = torch.Generator(device=device).manual_seed(0)
    g = torch.randn(sizes["g"], generator=gen, device=device)
    B, _, H, W = g.shape
    ref = torch.rand(B, H * W, generator=gen, device=device)
    ref /= ref.sum(1, keepdim=True)
    rows = []
    copy_gbps = None
    if gpu:
        copy_row, copy_gbps = _copy_gbps(g, device, warmup, repeat)
        rows.append(copy_row)
        from upi_fast.kernels.saliency_dissim import saliency_dissim_triton
    must_move = 2 * _nbytes(g) + _nbytes(ref) + B * g.element_size()
    for kind in ("l2", "rel_l2", "cosine"):
        op = f"saliency_dissim[{kind}]"
        eager = measure("eager", lambda: saliency_dissim_reference(g, ref, kind, True), device=device,
                        warmup=warmup, repeat=repeat)
        rows.append(_row(op, eager, must_move, copy_gbps, eager.median_s, None))
        if gpu:
            tri = measure("triton", lambda: saliency_dissim_triton(g, ref, kind, True), device=device,
                          warmup=warmup, repeat=repeat)
            err = _max_rel_err(saliency_dissim_triton(g, ref, kind, True),
                               saliency_dissim_reference(g, ref, kind, True))
            rows.append(_row(op, tri, must_move, copy_gbps, eager.median_s, err))
    return rows


def _bench_softplus(sizes, device, warmup, repeat, gpu) -> list[dict]:
    from upi_fast.ops.softplus import (softplus_backward_reference, softplus_double_backward_reference,
                                       softplus_reference)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(sizes["act"], generator=gen, device=device)
    gy = torch.randn(sizes["act"], generator=gen, device=device)
    gg = torch.randn(sizes["act"], generator=gen, device=device)
    beta = 10.0
    rows = []
    copy_gbps = None
    if gpu:
        copy_row, copy_gbps = _copy_gbps(x, device, warmup, repeat)
        rows.append(copy_row)
        from upi_fast.kernels.softplus import softplus_bwd2_triton, softplus_bwd_triton, softplus_fwd_triton
    n = _nbytes(x)
    cases = [("softplus_fwd", 2 * n, lambda: softplus_reference(x, beta),
              (lambda: softplus_fwd_triton(x, beta)) if gpu else None),
             ("softplus_bwd", 3 * n, lambda: softplus_backward_reference(gy, x, beta),
              (lambda: softplus_bwd_triton(gy, x, beta)) if gpu else None),
             ("softplus_bwd2", 5 * n, lambda: softplus_double_backward_reference(gg, gy, x, beta),
              (lambda: softplus_bwd2_triton(gg, gy, x, beta)) if gpu else None)]
    for op, must_move, eager_fn, tri_fn in cases:
        eager = measure("eager", eager_fn, device=device, warmup=warmup, repeat=repeat)
        rows.append(_row(op, eager, must_move, copy_gbps, eager.median_s, None))
        if tri_fn is not None:
            tri = measure("triton", tri_fn, device=device, warmup=warmup, repeat=repeat)
            rows.append(_row(op, tri, must_move, copy_gbps, eager.median_s, _max_rel_err(tri_fn(), eager_fn())))
        if gpu:
            torch.cuda.empty_cache()
    return rows


def _bench_sketch(sizes, device, warmup, repeat, gpu) -> list[dict]:
    from upi_fast.ops.sketch_update import sketch_update_reference
    k, b, d = sizes["sketch"]
    gen = torch.Generator(device=device).manual_seed(2)
    A = torch.randn(b, d, generator=gen, device=device)
    W = torch.zeros(k, d, device=device)
    rows = []
    copy_gbps = None
    if gpu:
        copy_row, copy_gbps = _copy_gbps(A, device, warmup, repeat)
        rows.append(copy_row)
        from upi_fast.kernels.sketch_update import sketch_update_triton
    must_move = _nbytes(A) + 2 * _nbytes(W)
    for normalize in (True, False):
        op = f"sketch_update[k={k}, normalize={normalize}]"
        eager = measure("eager", lambda: sketch_update_reference(W, A, 1000, 7, normalize), device=device,
                        warmup=warmup, repeat=repeat)
        rows.append(_row(op, eager, must_move, copy_gbps, eager.median_s, None))
        if gpu:
            tri = measure("triton", lambda: sketch_update_triton(W, A, 1000, 7, normalize), device=device,
                          warmup=warmup, repeat=repeat)
            W_t, W_e = torch.zeros_like(W), torch.zeros_like(W)
            sketch_update_triton(W_t, A, 1000, 7, normalize)
            sketch_update_reference(W_e, A, 1000, 7, normalize)
            rows.append(_row(op, tri, must_move, copy_gbps, eager.median_s, _max_rel_err(W_t, W_e)))
    return rows


def _interpreter_correctness() -> list[dict]:
    """Small-input correctness of every kernel under the interpreter (CPU): max relative errors."""
    from upi_fast.kernels.saliency_dissim import saliency_dissim_triton
    from upi_fast.kernels.sketch_update import sketch_update_triton
    from upi_fast.kernels.softplus import softplus_bwd2_triton
    from upi_fast.ops.saliency_dissim import saliency_dissim_reference
    from upi_fast.ops.sketch_update import sketch_update_reference
    from upi_fast.ops.softplus import softplus_double_backward_reference
    gen = torch.Generator().manual_seed(0)
    rows = []
    g = torch.randn(2, 3, 15, 13, generator=gen)
    ref = torch.rand(2, 195, generator=gen)
    for path in ("single", "split"):
        got = saliency_dissim_triton(g, ref, "rel_l2", True, path=path, block_n=64)
        want = saliency_dissim_reference(g.double(), ref.double(), "rel_l2", True)
        rows.append({"kernel": f"saliency_dissim[{path}]", "max_rel_err": _max_rel_err(got, want)})
    x, gy, gg = (torch.randn(3001, generator=gen) for _ in range(3))
    rows.append({"kernel": "softplus_bwd2", "max_rel_err": _max_rel_err(
        softplus_bwd2_triton(gg, gy, x, 10.0),
        softplus_double_backward_reference(gg.double(), gy.double(), x.double(), 10.0))})
    A = torch.randn(40, 300, generator=gen)
    W, W64 = torch.zeros(16, 300), torch.zeros(16, 300, dtype=torch.float64)
    sketch_update_triton(W, A, 5, 9, True)
    sketch_update_reference(W64, A.double(), 5, 9, True)
    rows.append({"kernel": "sketch_update", "max_rel_err": _max_rel_err(W, W64)})
    return rows


def run(quick: bool = False, device: str = "cuda", smoke: bool = False) -> dict:
    """Run the suite on ``device`` (``"cuda"`` or ``"cpu"``); returns ``{"machine", "sizes", "rows",
    "notes", ...}`` and prints Markdown tables. ``smoke`` (tests of ``python -m bench``): as ``quick``."""
    quick = quick or smoke
    device = torch.device(device).type
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' asked for but no CUDA device is present (use device='cpu')")
    gpu = device == "cuda"
    if gpu and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET=1 is set: the GPU numbers would time the interpreter; unset it")
    sizes = _sizes(quick, device)
    warmup, repeat = (2, 5) if quick else (3, 20)
    if not gpu:
        repeat = 3 if quick else 5
        warmup = 1
    notes = []
    if not gpu:
        notes.append("CPU: Triton kernels run only under the interpreter, whose timings are not meaningful; "
                     "only the torch reference (eager) is timed here.")
        print(notes[-1], flush=True)
    result = {"suite": "ops", "machine": machine_info(device), "quick": quick, "sizes": sizes, "notes": notes}
    rows = []
    for name, fn in (("saliency_dissim", _bench_saliency), ("softplus", _bench_softplus),
                     ("sketch_update", _bench_sketch)):
        part = fn(sizes, device, warmup, repeat, gpu)
        print_table(f"{name} ({device}, sizes {sizes})", part, _COLUMNS_GPU if gpu else _COLUMNS_CPU)
        rows.extend(part)
        if gpu:
            torch.cuda.empty_cache()
    result["rows"] = rows
    if not gpu:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            result["interpreter_correctness"] = _interpreter_correctness()
            print_table("Triton kernels under the interpreter (small inputs): correctness only",
                        result["interpreter_correctness"], ["kernel", "max_rel_err"])
        else:
            notes.append("TRITON_INTERPRET is not set: kernel correctness was not checked")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("ops", __doc__, "fewer repeats (and smaller CPU sizes)", threads=False,
                          default_device="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        # The interpreter must be chosen before the first kernel module is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return finish_suite("ops", run(args.quick, args.device), args.device, args.no_save)


if __name__ == "__main__":
    sys.exit(main())
