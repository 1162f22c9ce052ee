"""Op ``upi_fast::saliency_dissim``: post-processing of a raw input gradient fused with the
dissimilarity to a reference map, forward and gradient in one call.

For each sample b, from the raw gradient ``g[b]`` (C x H x W) and the reference map ``ref[b]``
(H*W, already post-processed):

* ``S = sum_c |g_c|``  (H*W),  ``I = S / ||S||_1``  (``I = 0`` when ``||S||_1 = 0``);
* ``loss`` = ``||I - ref||_2`` (``l2``), ``||I - ref||_2 / ||ref||_2`` (``rel_l2``) or
  ``1 - <I, ref> / (||I||_2 ||ref||_2)`` (``cosine``);
* ``grad = d loss / d g`` (B x C x H x W), when ``compute_grad`` is true (else an empty tensor).

Defined everywhere: a zero map ``S`` gives ``I = 0`` and a zero gradient; ``l2`` at ``I = ref``
has gradient zero (its subgradient of least norm); ``cosine`` with a zero map has loss 1.
"""
from __future__ import annotations

import torch

__all__ = ["saliency_dissim", "saliency_dissim_reference", "fused_saliency_loss", "KINDS"]

#: Dissimilarities the fused op implements.
KINDS = ("l2", "rel_l2", "cosine")
_TINY = 1e-30

# The schema and the implementations (torch reference, Triton, CUDA) are in upi_fast/ops/table.py.


@torch.library.register_fake("upi_fast::saliency_dissim")
def _fake(g, ref, kind, compute_grad):
    loss = g.new_empty((g.shape[0],))
    grad = torch.empty_like(g) if compute_grad else g.new_empty((0,))
    return loss, grad


def saliency_dissim_reference(g: torch.Tensor, ref: torch.Tensor, kind: str, compute_grad: bool):
    """Pure-PyTorch implementation (closed-form gradient, no autograd); the reference for kernels.

    Computes in ``g``'s dtype (float32 or float64); returns ``(loss (B,), grad (B,C,H,W) or (0,))``.
    """
    B = g.shape[0]
    gf = g.reshape(B, g.shape[1], -1)
    S = gf.abs().sum(1)  # (B, N)
    n1 = S.sum(1, keepdim=True)  # (B, 1)
    nonzero = n1 > 0
    inv = torch.where(nonzero, 1.0 / n1.clamp_min(_TINY), torch.zeros_like(n1))
    I = S * inv
    r = ref.reshape(B, -1).to(g.dtype)
    if kind in ("l2", "rel_l2"):
        diff = I - r
        d = diff.norm(dim=1, keepdim=True)
        dd = torch.where(d > 0, diff / d.clamp_min(_TINY), torch.zeros_like(diff))  # dD/dI
        loss = d
        if kind == "rel_l2":
            rn = r.norm(dim=1, keepdim=True).clamp_min(_TINY)
            loss = d / rn
            dd = dd / rn
    elif kind == "cosine":
        In = I.norm(dim=1, keepdim=True)
        rn = r.norm(dim=1, keepdim=True)
        denom = (In * rn).clamp_min(_TINY)
        c = (I * r).sum(1, keepdim=True) / denom
        loss = 1.0 - c
        # d(1 - c)/dI = -(r / (|I||r|) - c I / |I|^2)
        dd = -(r / denom - c * I / (In * In).clamp_min(_TINY))
        dd = torch.where((In > 0) & (rn > 0), dd, torch.zeros_like(dd))
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    loss = loss.squeeze(1)
    if not compute_grad:
        return loss, g.new_empty((0,))
    # I = S / sum(S):  dD/dS_j = (dD/dI_j - sum_k I_k dD/dI_k) / ||S||_1
    dS = (dd - (dd * I).sum(1, keepdim=True)) * inv
    grad = dS.unsqueeze(1) * torch.sign(gf)
    return loss, grad.reshape(g.shape)


def _check(g: torch.Tensor, ref: torch.Tensor, kind: str) -> None:
    if not isinstance(g, torch.Tensor) or g.dim() != 4:
        raise ValueError(f"g must be a (B, C, H, W) tensor, got {_shape(g)}")
    if not g.is_floating_point():
        raise TypeError(f"g must be a floating-point tensor, got {g.dtype}")
    if not isinstance(ref, torch.Tensor) or ref.dim() != 2 or ref.shape[0] != g.shape[0] \
            or ref.shape[1] != g.shape[2] * g.shape[3]:
        raise ValueError(f"ref must have shape (B, H*W) = ({g.shape[0]}, {g.shape[2] * g.shape[3]}), "
                         f"got {_shape(ref)}")
    if ref.device != g.device:
        raise ValueError(f"ref is on {ref.device} but g is on {g.device}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.compute_grad = inputs[3]
    ctx.mark_non_differentiable(output[1])  # the gradient output is first order only


def _backward(ctx, grad_loss, grad_grad):
    (grad,) = ctx.saved_tensors
    if not ctx.compute_grad:
        raise RuntimeError("upi_fast::saliency_dissim: call with compute_grad=True to differentiate the loss")
    return grad * grad_loss.view(-1, 1, 1, 1), None, None, None


torch.library.register_autograd("upi_fast::saliency_dissim", _backward, setup_context=_setup_context)


def saliency_dissim(g: torch.Tensor, ref: torch.Tensor, kind: str = "l2",
                    compute_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``abs_sum_l1`` post-processing + dissimilarity, with its gradient.

    Args:
        g: raw input gradients, (B, C, H, W), float32 or float64 (any strides).
        ref: reference maps, (B, H*W), already normalised (e.g. ``saliency(..., "abs_sum_l1")``).
        kind: ``"l2"``, ``"rel_l2"`` or ``"cosine"``.
        compute_grad: also return ``d loss_b / d g_b`` (B, C, H, W); otherwise an empty tensor.

    Returns:
        ``(loss, grad)``: loss (B,) in ``g``'s dtype; grad as described. The loss is
        differentiable with respect to ``g`` (first order) when ``compute_grad`` is true.
    """
    _check(g, ref, kind)
    return torch.ops.upi_fast.saliency_dissim(g.contiguous(), ref.contiguous().to(g.dtype), kind, compute_grad)


def fused_saliency_loss(g: torch.Tensor, ref: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Per-sample loss (B,) of :func:`saliency_dissim`, differentiable with respect to ``g``."""
    return saliency_dissim(g, ref, kind, True)[0]
