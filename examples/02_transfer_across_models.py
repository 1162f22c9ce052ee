"""Worked example 2: evaluate one perturbation across several models (transfer).

A universal perturbation is computed on a *source* model (or loaded from a file written by
``upi-fast compute`` / :func:`upi_fast.io.save_perturbation`) and evaluated, on held-out images,
against several *target* models it never saw -- each next to random noise of the same norm. Here
all models are classifiers of the embedded digits data (16 x 16 grey images, pixels in [0, 1]):
the embedded CNN, the same architecture trained from another seed, a wider CNN and an MLP. With your
own data, replace ``digits()`` by :func:`upi_fast.data.image_folder` and the models by
:func:`upi_fast.models.load_model` (see example 1).

    python examples/02_transfer_across_models.py                  # ~15 s on 2 CPU cores (+15 s the first time)
    python examples/02_transfer_across_models.py --perturbation FILE.safetensors   # e.g. from `upi-fast demo`
    python examples/02_transfer_across_models.py --smoke          # seconds: briefly trained models (CI)

Prints a table (one row per target model) and, with ``--out``, writes ``transfer.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

import upi_fast
from upi_fast.baselines import universal_random
from upi_fast.data import digits
from upi_fast.io import load_perturbation, save_perturbation, write_json_atomic
from upi_fast.models import build_digits_cnn, digits_cnn


def wide_cnn() -> nn.Module:
    """A different architecture: wider convolutions, average pooling."""
    return nn.Sequential(nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(512, 10))


def mlp() -> nn.Module:
    """No convolutions at all."""
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """Adam, minibatches of 64; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0], 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def initialised(build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--perturbation", help="evaluate this perturbation file (1 x 16 x 16) instead of computing one")
    p.add_argument("--eps-scale", type=float, default=0.1, help="L2 budget as a fraction of the mean image norm")
    p.add_argument("--epochs", type=int, default=10, help="UPI-Grad epochs on the source model")
    p.add_argument("--out", help="folder for transfer.json (and upi.safetensors when computed)")
    p.add_argument("--smoke", action="store_true", help="small and fast (CI): briefly trained models, few samples")
    args = p.parse_args(argv)

    splits = digits()
    Xtr, ytr = splits.train
    Xa, ya = splits.attack
    Xe, ye = splits.eval
    train_epochs = 8
    if args.smoke:
        train_epochs, args.epochs = 2, 1
        Xa, ya, Xe, ye = Xa[:64], ya[:64], Xe[:120], ye[:120]

    # The models. The source is the embedded CNN (trained once, then cached); with --smoke every
    # model is trained for two epochs here instead.
    t0 = time.perf_counter()
    source = (train(initialised(build_digits_cnn, 0), Xtr, ytr, train_epochs, 0) if args.smoke
              else digits_cnn())
    models = {
        "digits CNN (source)": source,
        "digits CNN, other seed": train(initialised(build_digits_cnn, 1), Xtr, ytr, train_epochs, 1),
        "wide CNN": train(initialised(wide_cnn, 2), Xtr, ytr, train_epochs, 2),
        "MLP": train(initialised(mlp, 3), Xtr, ytr, train_epochs, 3),
    }
    print(f"models ready in {time.perf_counter() - t0:.1f} s")

    # The perturbation: from a file, or UPI-Grad on the source model's attack split.
    eps = float(args.eps_scale * Xe.reshape(Xe.shape[0], -1).norm(dim=1).mean())
    if args.perturbation:
        delta, meta = load_perturbation(args.perturbation, expected_shape=splits.input_shape)
        eps = float(delta.norm())
        print(f"loaded {args.perturbation}: method {meta.get('method')}, L2 norm {eps:.3f}")
    else:
        t0 = time.perf_counter()
        delta = upi_fast.UPIGrad(source, eps, epochs=args.epochs, batch_size=32, progress=False).fit((Xa, ya)).delta_
        print(f"UPI-Grad on the source model: eps = {eps:.3f} (L2, pixel units), {time.perf_counter() - t0:.1f} s")
        if args.out:
            save_perturbation(os.path.join(args.out, "upi.safetensors"), delta,
                              {"method": "upi-grad", "eps": eps, "norm": "2", "model": "digits_cnn"})
    noise = universal_random(splits.input_shape, eps, 2, seed=0)

    # Evaluate the same delta against every model.
    rows = []
    print(f"{'target model':<24} {'acc.':>5} {'dissim. UPI':>11} {'random':>7} {'ratio':>6} "
          f"{'top-k UPI':>9} {'fooling UPI':>11}")
    for name, model in models.items():
        with torch.no_grad():
            acc = float((model(Xe).argmax(1) == ye).float().mean())
        upi = upi_fast.evaluate(model, delta, (Xe, ye))
        rnd = upi_fast.evaluate(model, noise, (Xe, ye))
        ratio = upi["dissimilarity"] / max(rnd["dissimilarity"], 1e-12)
        rows.append({"model": name, "accuracy": acc, "upi": upi, "random": rnd, "ratio": ratio})
        print(f"{name:<24} {acc:>5.2f} {upi['dissimilarity']:>11.3f} {rnd['dissimilarity']:>7.3f} {ratio:>6.2f} "
              f"{upi['topk_intersection']:>9.3f} {upi['fooling_rate']:>11.3f}")
    if args.out:
        write_json_atomic(os.path.join(args.out, "transfer.json"), {"eps": eps, "rows": rows})
        print(f"wrote {os.path.join(args.out, 'transfer.json')}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
