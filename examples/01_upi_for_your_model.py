"""Worked example 1: a UPI for your own torchvision model and folder of images.

Your data: an ImageFolder (``root/<class>/<image>``); your model: a torchvision classifier with
local weights (safetensors, or a state dict readable by ``torch.load(weights_only=True)``; nothing
is downloaded) and its input normalisation. The perturbation budget is given on the 0-255 pixel
scale and converted to the model's units (pixels in [0, 1], normalisation inside the model).

    python examples/01_upi_for_your_model.py --data /data/imagenet-val-subset --model resnet18 \\
        --weights resnet18.safetensors --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \\
        --size 224 --eps-pixels 8 --attack-samples 512 --eval-samples 512 --out upi_out/example1

    python examples/01_upi_for_your_model.py --smoke     # self-contained, ~10 s on 2 CPU cores

``--smoke`` builds a tiny two-class ImageFolder of generated 32 x 32 images in a temporary folder,
trains a ResNet-18 on it for a few steps, saves its weights, and then runs the very same code path.
It writes ``upi.safetensors``, ``upi.png`` and ``results.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time

import torch

import upi_fast
from upi_fast.baselines import universal_random
from upi_fast.data import image_folder, make_loader, split_indices
from upi_fast.io import save_perturbation, write_json_atomic
from upi_fast.models import Normalized, load_model, model_name
from upi_fast.viz import plot_perturbation


def make_tiny_image_folder(root: str, per_class: int = 16, size: int = 32, seed: int = 0) -> None:
    """Two classes of RGB PNGs: ``left`` (bright blob on the left) and ``right`` (on the right)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(("left", "right")):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            img = 0.25 * torch.rand(3, size, size, generator=g)
            cols = slice(2, size // 2 - 2) if c == 0 else slice(size // 2 + 2, size - 2)
            img[:, 4:size - 4, cols] += 0.6 + 0.1 * torch.rand(3, 1, 1, generator=g)
            arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(os.path.join(root, name, f"{i:03d}.png"))


def train_tiny_resnet(data: str, size: int, mean: tuple, std: tuple, path: str, steps: int = 10) -> None:
    """A few Adam steps of a ResNet-18 (2 classes) on the tiny folder; weights saved to ``path``."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ds = image_folder(data, size=size)
    X = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    net = torchvision.models.resnet18(num_classes=2)
    wrapped = Normalized(net, mean, std)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    wrapped.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(wrapped(X), y).backward()
        opt.step()
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, path)


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(","))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="ImageFolder root (root/<class>/<image>)")
    p.add_argument("--model", default="resnet18", help="torchvision classification model name")
    p.add_argument("--weights", help="local weights file (safetensors or a torch state dict)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the model (default: torchvision's)")
    p.add_argument("--mean", type=floats, default=(0.485, 0.456, 0.406), help="per-channel mean, comma-separated")
    p.add_argument("--std", type=floats, default=(0.229, 0.224, 0.225), help="per-channel std, comma-separated")
    p.add_argument("--size", type=int, default=224, help="image side after resize + centre crop (pixels)")
    p.add_argument("--eps-pixels", type=float, default=8.0,
                   help="L2 budget as an RMS change per pixel on the 0-255 scale")
    p.add_argument("--method", choices=("grad", "pca"), default="grad", help="UPI-Grad or UPI-PCA")
    p.add_argument("--attack-samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="output folder (default: upi_out/example1, or a temp dir with --smoke)")
    p.add_argument("--smoke", action="store_true", help="run on a tiny generated ImageFolder (CI)")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        return run(args, p, stack)


def run(args: argparse.Namespace, p: argparse.ArgumentParser, stack: contextlib.ExitStack) -> dict:
    if args.smoke:  # everything in a temporary folder, removed at the end unless --out is given
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="upi_example1_"))
        args.data, args.size, args.num_classes = os.path.join(tmp, "images"), 32, 2
        args.weights = os.path.join(tmp, "resnet18-tiny.safetensors")
        args.attack_samples, args.eval_samples, args.epochs, args.batch_size = 10, 10, 2, 5
        args.out = args.out or os.path.join(tmp, "out")
        make_tiny_image_folder(args.data, per_class=10, size=args.size)
        train_tiny_resnet(args.data, args.size, args.mean, args.std, args.weights)
    if not args.data:
        p.error("--data is required (or --smoke)")
    out = args.out or os.path.join("upi_out", "example1")
    if not args.weights:
        print("no --weights given: the model keeps its random initialisation (fine for trying the code only)")

    # 1. Data in pixel units [0, 1]; the model carries its own normalisation.
    dataset = image_folder(args.data, size=args.size)
    attack_idx, eval_idx = split_indices(len(dataset), args.attack_samples, args.eval_samples, seed=0)
    attack = make_loader(dataset, attack_idx, args.batch_size)
    evaluation = make_loader(dataset, eval_idx, args.batch_size)
    model = load_model(f"torchvision:{args.model}", args.weights, num_classes=args.num_classes,
                       mean=args.mean, std=args.std).to(args.device)

    # 2. Budget: RMS change of eps_pixels grey levels per pixel -> L2 radius in [0, 1] units.
    shape = tuple(dataset[0][0].shape)
    eps = args.eps_pixels / 255.0 * math.sqrt(math.prod(shape))

    # 3. The universal perturbation.
    t0 = time.perf_counter()
    if args.method == "grad":
        solver = upi_fast.UPIGrad(model, eps, norm=2, epochs=args.epochs, batch_size=args.batch_size,
                                  hvp="auto", device=args.device, progress=False)
    else:
        solver = upi_fast.UPIPCA(model, eps, norm=2, batch_size=args.batch_size, device=args.device, progress=False)
    delta = solver.fit(attack).delta_
    seconds = time.perf_counter() - t0

    # 4. Evaluate on the held-out split, next to random noise of the same norm.
    rows = {f"UPI-{args.method}": upi_fast.evaluate(model, delta, evaluation, device=args.device),
            "universal random": upi_fast.evaluate(model, universal_random(shape, eps, 2), evaluation,
                                                  device=args.device)}
    print(f"model {model_name(model)}, {len(dataset)} images of shape {shape}, eps = {eps:.3f} (L2, pixel units), "
          f"solver {seconds:.1f} s")
    print(f"{'perturbation':<18} {'rel. L2 dissim.':>15} {'top-k inter.':>12} {'Spearman':>9} {'fooling':>8}  n")
    for name, r in rows.items():
        print(f"{name:<18} {r['dissimilarity']:>15.3f} {r['topk_intersection']:>12.3f} {r['spearman']:>9.3f} "
              f"{r['fooling_rate']:>8.3f}  {r['n']}")

    # 5. Save it with its metadata, and a picture.
    save_perturbation(os.path.join(out, "upi.safetensors"), delta,
                      {"method": f"upi-{args.method}", "eps": eps, "norm": "2", "model": model_name(model),
                       "mean": list(args.mean), "std": list(args.std)})
    plot_perturbation(delta, os.path.join(out, "upi.png"), title=f"UPI-{args.method}, eps = {eps:.2f}")
    write_json_atomic(os.path.join(out, "results.json"), {"eps": eps, "seconds": seconds, "results": rows})
    print(f"wrote {out}/upi.safetensors, upi.png, results.json")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
