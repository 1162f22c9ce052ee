"""Worked example 3: upi_fast as a backend -- the fused ops and the streaming SVD, called directly.

What another interpretability library would do with :mod:`upi_fast.functional` (one import, no
estimators): take the raw input gradients its own attribution code produced, get the saliency
dissimilarity *and* its gradient from one fused op call, push that gradient back to the input
through batched Hessian-vector products, stream the per-sample attack directions through a
mergeable single-pass sketch for their top singular vector (the UPI-PCA direction), and project it
onto the norm ball. Every step is checked against a plain PyTorch computation; the script exits
with status 1 if any check fails.

    python examples/03_backend_ops.py                      # the automatic backend
    python examples/03_backend_ops.py --backend triton     # where a GPU (or TRITON_INTERPRET=1) allows
    python examples/03_backend_ops.py --smoke              # fewer samples (CI)
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from upi_fast import functional as F


def their_model(seed: int = 0) -> nn.Module:
    """Stands for the other library's classifier: smooth (softplus), 3 x 13 x 11 inputs, 5 classes."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(beta=4.0), nn.Conv2d(8, 8, 3, padding=1, stride=2),
                      nn.Softplus(beta=4.0), nn.Flatten(), nn.Linear(8 * 7 * 6, 5))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return m.double().eval()


def check(name: str, error: float, tol: float, failures: list[str]) -> None:
    ok = error <= tol
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {error:.2e} (tolerance {tol:.0e})")
    if not ok:
        failures.append(name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cuda"))
    p.add_argument("--samples", type=int, default=96, help="samples streamed through the sketch")
    p.add_argument("--smoke", action="store_true", help="fewer samples (CI)")
    args = p.parse_args(argv)
    n = 32 if args.smoke else args.samples
    failures: list[str] = []

    print(f"backends available here: {F.backends()}")
    F.set_backend(args.backend)
    print(f"selected backend: {F.get_backend()!r}")

    model = their_model()
    g = torch.Generator().manual_seed(1)
    X = torch.rand(n, 3, 13, 11, generator=g, dtype=torch.float64)
    with torch.no_grad():
        Y = model(X).argmax(1)              # explain the predicted classes
    eps = 0.1 * float(X[0].norm())          # L2 budget in input units
    delta = F.random_in_ball(tuple(X.shape[1:]), eps, 2, generator=g, dtype=torch.float64)

    # 1. Reference maps (B, H*W) and raw gradients at the perturbed points (B, C, H, W).
    x, y = X[:8], Y[:8]
    I_ref = F.saliency(model, x, y)                         # abs_sum_l1 maps, rows sum to 1
    graw = F.raw_gradient(model, x + delta, y)              # d p_y / d x, unchecked fast path

    # 2. Fused op: post-processing + dissimilarity + its gradient in one call.
    loss, dloss = F.saliency_dissim(graw, I_ref, "l2")      # (B,), (B, C, H, W)
    gg = graw.detach().requires_grad_(True)
    loss_ref = F.dissimilarity(F.postprocess_maps(gg), I_ref, "l2")
    (dloss_ref,) = torch.autograd.grad(loss_ref.sum(), gg)
    print("fused saliency_dissim vs. unfused autograd:")
    check("loss, max abs error", float((loss - loss_ref).detach().abs().max()), 1e-10, failures)
    check("gradient, max abs error", float((dloss - dloss_ref).abs().max()), 1e-8, failures)

    # 3. The attack-loss gradient with respect to delta (batched HVPs), two modes compared.
    _, g_exact = F.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward")
    _, g_fd = F.saliency_loss_grad(model, x, y, I_ref, delta, hvp="finite_difference", fd_step=1e-4)
    rel = float((g_exact - g_fd).norm() / g_exact.norm().clamp_min(1e-300))
    print("saliency_loss_grad, finite differences vs. double backward:")
    check("relative error", rel, 1e-3, failures)

    # 4. Stream per-sample attack directions (rows of G, n x d) through a single-pass sketch, in
    #    blocks as they are produced; never hold G.
    d = X[0].numel()
    sketch = F.StreamingSketch(d, k=2, oversample=10, seed=0, normalize_rows=True, dtype=torch.float64)
    rows = []
    for i in range(0, n, 16):
        xb, yb = X[i:i + 16], Y[i:i + 16]
        ref = F.saliency(model, xb, yb)
        per_sample = delta.expand_as(xb).clone()            # (B, C, H, W): one direction per sample
        _, G = F.saliency_loss_grad(model, xb, yb, ref, per_sample)
        block = G.reshape(G.shape[0], -1)
        sketch.update(block)                                 # row offsets follow on automatically
        rows.append(block)                                   # kept here only to check the result
    S, Vh = sketch.finalize()
    bound = sketch.error_estimate()          # a-posteriori: no second pass, no access to G
    A = torch.cat(rows)
    A = A / A.norm(dim=1, keepdim=True).clamp_min(1e-300)
    S_ex, Vh_ex = F.exact_svd(A, k=2)
    sin_true = float((1.0 - (Vh[0] @ Vh_ex[0]).square()).clamp_min(0).sqrt())
    print(f"streaming sketch of {n} x {d} rows (one pass, {sketch.l} x {d} state): "
          f"sigma_1 = {float(S[0]):.4f} (exact {float(S_ex[0]):.4f}, upper bound {float(bound.sigma_upper[0]):.4f}); "
          f"sin angle to the exact top vector {sin_true:.2e}, guaranteed <= {bound.sin_angle_bound:.2e}")
    check("sigma_1 outside its [lower, upper] bounds", max(0.0, float(S[0]) - float(S_ex[0]),
                                                           float(S_ex[0]) - float(bound.sigma_upper[0])),
          1e-9, failures)
    check("angle beyond its a-posteriori bound", max(0.0, sin_true - bound.sin_angle_bound), 1e-9, failures)

    # 5. The UPI-PCA perturbation: the top direction scaled onto the ball; sign by the attack loss.
    v = Vh[0].reshape(X.shape[1:])
    cands = [F.project(s * eps * v / v.norm(), eps, 2) for s in (1.0, -1.0)]
    scores = [float(F.saliency_loss_grad(model, x, y, I_ref, c)[0].mean()) for c in cands]
    upi = cands[0] if scores[0] >= scores[1] else cands[1]
    noise = F.random_in_ball(tuple(X.shape[1:]), eps, 2, generator=g, dtype=torch.float64)
    I_upi, I_noise = F.saliency(model, x + upi, y), F.saliency(model, x + noise, y)
    d_upi, d_noise = float(F.relative_l2(I_upi, I_ref).mean()), float(F.relative_l2(I_noise, I_ref).mean())
    print(f"norm of the perturbation {float(F.norm_of(upi)):.4f} (eps {eps:.4f}); relative L2 dissimilarity: "
          f"UPI {d_upi:.3f}, random {d_noise:.3f}")
    check("norm excess over eps", max(0.0, float(F.norm_of(upi)) - eps), 1e-9, failures)

    F.set_backend("auto")
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
