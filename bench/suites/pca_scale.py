"""Benchmark suite ``pca_scale``: UPI-PCA's spill at ImageNet size, and what a half-precision spill costs.

1. **Spill** (real files): n x 150,528 rows of the ``svd`` suite's flat-spectrum matrix
   (:class:`upi_fast.linalg.PlantedRows` ``"ratio127"``, sigma_1 / sigma_2 ~ 1.27) written with
   :class:`~upi_fast.linalg.MemmapRowWriter` once per storage dtype (float32 / float16 / bfloat16):
   disk bytes, write time (generation + write + fsync; generation alone reported apart), one
   block-Krylov pass (``gram_pass`` with UPIPCA's default block of l = 11 rows) read **cold** (the
   file's pages dropped with ``posix_fadvise(DONTNEED)``, so it comes from the disk; this pass
   also checks every row's CRC32) and a **second** time (from the page cache when the file fits in
   RAM, else again largely from the disk; no CRC), then UPIPCA's default block
   Krylov (oversample 10, n_iter 4: 5 passes), |cos| of its top vector with the float32 spill's and
   with the planted one. Every number is also extrapolated linearly to 50,000 rows (labelled so).
2. **Digits** (``--seeds``; skipped with ``--no-digits``): UPIPCA(solver="block_krylov") on the
   embedded digits default (:func:`upi_fast.data.digits`, :func:`upi_fast.models.digits_cnn`, eps =
   0.1 mean ||x||) with each spill dtype: |cos| of the fp16 / bf16 direction with the fp32 one and
   the evaluation-split dissimilarity (:func:`upi_fast.evaluate`), mean and std over seeds.

    python -m bench.suites.pca_scale [--n 8000] [--dir /path] [--dtypes float32,float16] [--no-krylov]
                                     [--seeds 5] [--no-digits] [--quick] [--no-save]

Spill files go to ``--dir`` (default: the temp dir) and are deleted as soon as each is measured.
Results go to ``bench/results/<date>-cpu/pca_scale.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from ..harness import finish_suite, machine_info, print_table, suite_parser

__all__ = ["run", "main"]

D = 150_528
N_FULL = 50_000
_BLOCK = 256
_SPILL_COLUMNS = ["dtype", "n", "disk_gb", "generate_s", "write_s", "cold_pass_s", "cold_gb_per_s", "second_pass_s",
                  "krylov_5_passes_s", "one_minus_cos_vs_fp32", "abs_cos_planted", "disk_gb_at_50k",
                  "cold_pass_s_at_50k (extrapolated)", "second_pass_s_at_50k (extrapolated)"]
_DIGITS_COLUMNS = ["spill_dtype", "seeds", "eval_dissimilarity_mean", "eval_dissimilarity_std",
                   "one_minus_cos_vs_fp32_max", "fit_s_mean"]


def _source(n: int):
    from upi_fast.linalg import PlantedRows
    return PlantedRows.preset("ratio127", n, D, r=32, seed=7, chunk=64, block_size=_BLOCK)


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _abs_cos(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b).abs() / (a.norm() * b.norm()))


def _spill_one(n: int, dtype: str, folder: str, krylov: bool, gen_s: float) -> tuple[dict, torch.Tensor | None]:
    from upi_fast.linalg import MemmapRowWriter, randomized_svd
    from upi_fast.linalg.krylov import gram_pass
    src = _source(n)
    fd, path = tempfile.mkstemp(prefix=f"pca_scale_{dtype}_", suffix=".rows", dir=folder)
    os.close(fd)
    w = MemmapRowWriter(path, D, dtype)
    try:
        t0 = time.perf_counter()
        for _, blk in src.blocks(_BLOCK):
            w.append(blk)
        rows = w.finish()
        _drop_cache(path)  # fsync (part of the write) and drop the pages: the next read is from disk
        write_s = time.perf_counter() - t0
        X = torch.linalg.qr(torch.randn(D, 11, generator=torch.Generator().manual_seed(0)))[0].T.contiguous()
        t0 = time.perf_counter()
        gram_pass(rows, X)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        gram_pass(rows, X)
        second = time.perf_counter() - t0
        vec, kry_s = None, None
        if krylov:
            t0 = time.perf_counter()
            r = randomized_svd(rows, k=1, method="block_krylov", oversample=10, n_iter=4)
            kry_s, vec = time.perf_counter() - t0, r.Vh[0]
        gb = rows.nbytes / 1e9
        row = {"dtype": dtype, "n": n, "disk_gb": gb, "generate_s": gen_s, "write_s": write_s, "cold_pass_s": cold,
               "cold_gb_per_s": gb / cold, "second_pass_s": second, "krylov_5_passes_s": kry_s,
               "abs_cos_planted": _abs_cos(vec, src.V[0]) if vec is not None else None,
               "disk_gb_at_50k": gb * N_FULL / n, "cold_pass_s_at_50k (extrapolated)": cold * N_FULL / n,
               "second_pass_s_at_50k (extrapolated)": second * N_FULL / n}
        return row, vec
    finally:
        w.close()
        for p in (path, path + ".partial"):
            if os.path.exists(p):
                os.unlink(p)


def _spill_section(n: int, dtypes: list[str], folder: str, krylov: bool) -> list[dict]:
    t0 = time.perf_counter()
    for _ in _source(n).blocks(_BLOCK):  # generation alone (the floor of the write)
        pass
    gen_s = time.perf_counter() - t0
    rows, vecs = [], {}
    for dt in dtypes:
        row, vecs[dt] = _spill_one(n, dt, folder, krylov, gen_s)
        rows.append(row)
        print(f"  {dt}: {row['disk_gb']:.2f} GB, write {row['write_s']:.1f} s, cold pass {row['cold_pass_s']:.1f} s, "
              f"second pass {row['second_pass_s']:.1f} s", flush=True)
    ref = vecs.get("float32")
    for row in rows:
        v = vecs[row["dtype"]]
        row["abs_cos_vs_fp32"] = _abs_cos(v, ref) if v is not None and ref is not None else None
        row["one_minus_cos_vs_fp32"] = 1 - row["abs_cos_vs_fp32"] if row["abs_cos_vs_fp32"] is not None else None
    return rows


def _digits_section(seeds: int, dtypes: list[str]) -> tuple[list[dict], dict]:
    from upi_fast.data import digits
    from upi_fast.evaluate import evaluate
    from upi_fast.models import digits_cnn
    from upi_fast.solvers import UPIPCA
    splits = digits()
    model = digits_cnn()
    Xe = splits.eval.X
    eps = float(0.1 * Xe.reshape(Xe.shape[0], -1).norm(dim=1).mean())
    per: dict[str, list[dict]] = {dt: [] for dt in dtypes}
    with tempfile.TemporaryDirectory(prefix="pca_scale_digits_") as folder:
        for seed in range(seeds):
            comps = {}
            for dt in dtypes:
                pca = UPIPCA(model, eps, solver="block_krylov", spill_dtype=dt, spill_dir=folder, seed=seed,
                             progress=False).fit((splits.attack.X, splits.attack.y))
                res = evaluate(model, pca.delta_, (splits.eval.X, splits.eval.y), metrics=("dissimilarity",))
                comps[dt] = pca.components_[0]
                per[dt].append({"seed": seed, "dissimilarity": float(res["dissimilarity"]), "fit_s": pca.fit_time_,
                                "sigma": pca.singular_values_.tolist()})
            for dt in dtypes:
                per[dt][-1]["abs_cos_vs_fp32"] = _abs_cos(comps[dt], comps["float32"]) if "float32" in comps else None
    rows = []
    for dt in dtypes:
        dis = [p["dissimilarity"] for p in per[dt]]
        cos = [p["abs_cos_vs_fp32"] for p in per[dt] if p["abs_cos_vs_fp32"] is not None]
        rows.append({"spill_dtype": dt, "seeds": seeds, "eval_dissimilarity_mean": statistics.fmean(dis),
                     "eval_dissimilarity_std": statistics.stdev(dis) if len(dis) > 1 else 0.0,
                     "abs_cos_vs_fp32_min": min(cos) if cos else None,
                     "one_minus_cos_vs_fp32_max": 1 - min(cos) if cos else None,
                     "fit_s_mean": statistics.fmean(p["fit_s"] for p in per[dt])})
    return rows, {"eps": eps, "n_attack": int(splits.attack.X.shape[0]), "n_eval": int(Xe.shape[0]),
                  "d": int(Xe[0].numel()), "per_seed": per}


def run(n: int = 8000, dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16"), folder: str | None = None,
        krylov: bool = True, seeds: int = 5, digits: bool = True) -> dict:
    """Both sections; returns a JSON-able dict with ``rows`` and ``markdown``."""
    folder = folder or tempfile.gettempdir()
    t0 = time.perf_counter()
    result = {"suite": "pca_scale", "machine": machine_info("cpu"), "folder": folder,
              "threads": torch.get_num_threads(), "command": " ".join(["python -m bench.suites.pca_scale", *sys.argv[1:]])}
    md = ""
    rows: list[dict] = []
    if n:
        srows = _spill_section(n, list(dtypes), folder, krylov)
        md += print_table(f"Spill: {n:,} x {D:,} flat-spectrum rows, one block-Krylov pass (l = 11) cold (from disk, "
                          f"CRC32 checked) and a second time (page cache if the file fits in RAM), "
                          f"{torch.get_num_threads()} threads; '_at_50k' "
                          f"columns are linear extrapolations, not measurements", srows, _SPILL_COLUMNS)
        result["spill"] = srows
        rows += srows
    if digits:
        drows, dinfo = _digits_section(seeds, list(dtypes))
        md += "\n" + print_table(f"Digits: UPIPCA(solver='block_krylov') per spill dtype, {seeds} seeds, "
                                 f"{dinfo['n_attack']} attack rows x d = {dinfo['d']}", drows, _DIGITS_COLUMNS)
        result["digits"] = {"rows": drows, **dinfo}
        rows += drows
    result.update({"rows": rows, "markdown": md, "seconds": time.perf_counter() - t0})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("pca_scale", __doc__, "1,000 spilled rows, 2 seeds", threads=True)
    parser.add_argument("--n", type=int, default=8000, help="rows to spill (0: skip the spill section)")
    parser.add_argument("--dir", default=None, help="where the spill files go (default: the temp dir)")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--no-krylov", action="store_true", help="passes only, no 5-pass block Krylov")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--no-digits", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, seeds = (1000, 2) if args.quick else (args.n, args.seeds)
    res = run(n, tuple(args.dtypes.split(",")), args.dir, not args.no_krylov, seeds, not args.no_digits)
    return finish_suite("pca_scale", res, "cpu", args.no_save)


if __name__ == "__main__":
    sys.exit(main())
