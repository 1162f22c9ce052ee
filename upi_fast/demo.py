"""The main job on the embedded default: every method and baseline at the same eps, side by side.

Data: scikit-learn's digits (16 x 16, pixel units [0, 1]); model: the small ReLU CNN of
:func:`upi_fast.models.digits_cnn`. ``eps = eps_scale x`` the mean L2 norm of the evaluation
images (0.1 by default), L2 ball. Every perturbation is computed on the attack split and
measured on the disjoint evaluation split.
"""
from __future__ import annotations

import os
import time

import torch

from . import io, viz
from .data import digits
from .evaluate import evaluate
from .models import digits_cnn
from .report import format_eps, format_table, json_report, markdown_report
from .saliency import saliency
from .solvers import UPIGrad, UPIPCA
from .solvers.baselines import classification_uap, per_image_attack, universal_random

__all__ = ["run_demo"]


def run_demo(out_dir: str, eps_scale: float = 0.1, seed: int = 0, epochs: int = 20, hvp: str = "double_backward",
             random_draws: int = 5, per_image_steps: int = 40, progress: bool = True, log=print,
             data_seed: int | None = None) -> dict:
    """Run the comparison and write ``report.md``, ``report.json``, one ``.safetensors`` per
    universal perturbation and PNG figures into ``out_dir``. Returns the report as a dict.
    ``seed`` seeds every method; ``data_seed`` (default: ``seed``) the splits and the CNN."""
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    data_seed = seed if data_seed is None else data_seed
    splits = digits(seed=data_seed)
    model = digits_cnn(seed=data_seed, progress=progress)
    Xa, ya = splits.attack
    Xe, ye = splits.eval
    eps = float(eps_scale * Xe.reshape(Xe.shape[0], -1).norm(dim=1).mean())
    shape = tuple(Xe.shape[1:])
    log(f"digits {shape}: attack {len(ya)}, eval {len(ye)} images; eps = {eps:.4f} (L2, {eps_scale} x mean image norm)")
    rows, deltas = [], {}

    def record(name, fn):
        t = time.perf_counter()
        delta = fn()
        secs = time.perf_counter() - t
        res = evaluate(model, delta, (Xe, ye)) if not isinstance(delta, list) else _mean_eval(model, delta, (Xe, ye))
        rows.append({"method": name, **{k: v for k, v in res.items() if k != "per_sample"}, "seconds": secs})
        if isinstance(delta, torch.Tensor):
            deltas[name] = delta
        log(f"  {name:<22} dissimilarity {res['dissimilarity']:.3f}  fooling {res['fooling_rate']:.3f}  "
            f"n {res['n']}/{res['n_total']}  ({secs:.1f} s)")

    record("random (mean of 5)", lambda: [universal_random(shape, eps, seed=seed + i) for i in range(random_draws)])
    record("classification UAP", lambda: classification_uap(model, (Xa, ya), eps, epochs=10, seed=seed, progress=progress))
    grad = UPIGrad(model, eps, epochs=epochs, batch_size=32, hvp=hvp, seed=seed, progress=progress)
    record("UPI-Grad", lambda: grad.fit((Xa, ya)).delta_)
    pca = UPIPCA(model, eps, seed=seed, progress=progress, hvp=hvp)
    record("UPI-PCA", lambda: pca.fit((Xa, ya)).delta_)
    plus = UPIPCA(model, eps, plus_lambda=1.0, seed=seed, progress=progress, hvp=hvp)
    record("PCA+ (lambda=1)", lambda: plus.fit((Xa, ya)).delta_)
    t = time.perf_counter()
    res = evaluate(model, lambda x, y: per_image_attack(model, x, y, eps, steps=per_image_steps, seed=seed, hvp=hvp),
                   (Xe, ye))
    rows.append({"method": f"per-image attack ({per_image_steps} steps)", **res, "seconds": time.perf_counter() - t})
    log(f"  {rows[-1]['method']:<22} dissimilarity {res['dissimilarity']:.3f}  fooling {res['fooling_rate']:.3f}  "
        f"n {res['n']}/{res['n_total']}")

    meta = {"eps": eps, "norm": "2", "model": "digits_cnn", "input_shape": list(shape), "units": "pixels [0, 1]",
            "mean": splits.mean, "std": splits.std}
    figures = []
    for name, delta in deltas.items():
        stem = _slug(name)
        io.save_perturbation(os.path.join(out_dir, f"{stem}.safetensors"), delta, {**meta, "method": name})
        viz.plot_perturbation(delta, os.path.join(out_dir, f"{stem}.png"), title=f"{name}, ||delta||_2 = {delta.norm():.3f}")
        figures.append(f"{stem}.png")
    best = deltas["UPI-Grad"]
    idx = torch.arange(8)
    xs, ys = Xe[idx], ye[idx]
    viz.plot_saliency_grid(xs, saliency(model, xs, ys), saliency(model, xs + best, ys),
                           os.path.join(out_dir, "saliency_grid.png"), labels=[f"digit {k}" for k in ys.tolist()],
                           images_after=xs + best, titles=("image", "saliency", "saliency + UPI-Grad", "image + UPI-Grad"))
    figures.append("saliency_grid.png")
    viz.plot_metric_bars({r["method"]: r for r in rows}, os.path.join(out_dir, "metrics.png"),
                         title=f"every method at eps = {format_eps(eps)} (L2), digits_cnn, evaluation split")
    figures.append("metrics.png")
    setup = {"data": f"scikit-learn digits {shape}, attack {len(ya)} / eval {len(ye)} images",
             "model": "digits_cnn (small ReLU CNN)", "eps": f"{eps:.4f} (L2; {eps_scale} x mean eval image norm)",
             "hvp": hvp, "seed": seed, "total seconds": f"{time.perf_counter() - t0:.1f}"}
    io.write_text_atomic(os.path.join(out_dir, "report.md"), markdown_report("upi-fast demo", setup, rows, figures))
    io.write_text_atomic(os.path.join(out_dir, "report.json"), json_report(setup, rows))
    log("\n" + format_table(rows))
    return {"setup": setup, "results": rows}


def _mean_eval(model, deltas: list, data) -> dict:
    runs = [evaluate(model, d, data) for d in deltas]
    return {k: (sum(r[k] for r in runs) / len(runs) if k not in ("n", "n_total") else runs[0][k]) for k in runs[0]}


def _slug(name: str) -> str:
    keep = "".join(c.lower() if c.isalnum() else "_" for c in name)
    return "_".join(p for p in keep.split("_") if p)
