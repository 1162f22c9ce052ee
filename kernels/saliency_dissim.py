"""Triton kernels of ``upi_fast::saliency_dissim``: ``abs_sum_l1`` post-processing fused with the
dissimilarity to a reference map, loss and gradient with respect to the raw gradient ``g``.

Math (see :mod:`upi_fast.ops.saliency_dissim` for the conventions, matched exactly here): per sample
``S = sum_c |g_c|``, ``inv = 1 / ||S||_1`` (0 for a zero map), ``I = S inv``, a loss ``D(I, r)`` and
``dD/dI = dd``; then ``dD/dS_n = (dd_n - kappa) inv`` with ``kappa = <dd, I>`` and
``grad_{c,n} = sign(g_{c,n}) dD/dS_n``. Everything after ``S`` needs only a few per-sample scalars:

    s1 = sum S,  s2 = sum S^2,  sr = sum S r,  rr = sum r^2
    ||I||^2 = s2 inv^2,  <I, r> = sr inv,  ||I - r||^2 = ||I||^2 - 2 <I, r> + rr

and ``dd_n = p I_n + q r_n`` with per-sample ``p, q`` (l2 / rel_l2: ``p = -q = 1 / (d ||r||^a)``;
cosine: ``p = c / ||I||^2``, ``q = -1 / (||I|| ||r||)``), so ``kappa = p ||I||^2 + q <I, r>``.

Two paths (``path="auto"`` picks one by size):

* ``single`` -- one program per sample holds the whole (C x H*W) tile of ``g`` in registers (maps
  up to ``single_max`` padded elements, e.g. 3 x 64 x 64): reads ``g`` and ``ref`` once, writes the
  loss and the gradient once, and computes ``||I - r||`` and ``kappa`` directly like the reference.
  Memory traffic: ``B (C N + N) + B C N`` elements, the minimum.
* ``split`` -- large maps (e.g. 3 x 224 x 224). Pass 1, grid (B x blocks of ``block_n`` pixels),
  reads its block of ``g`` (all channels) and ``ref`` and writes the block's four partial sums
  (s1, s2, sr, rr) to a float64 workspace (two-stage reduction: no atomics, no zero-fill launch,
  bitwise deterministic). Pass 2, same grid, reduces the sample's partials (a few hundred bytes,
  L2 hits), forms ``p, q, kappa`` and the loss, re-reads its block of ``g`` and ``ref`` and writes
  the gradient. Memory traffic: ``2 B (C N + N) + B C N`` elements -- ``g`` and ``ref`` are read
  twice (for C = 3, 11 N instead of the minimal 7 N per sample, i.e. 1.57x), because the gradient
  of every pixel depends on sums over the whole map and programs cannot synchronise. Pass 2 walks
  the blocks in reverse launch order so that it starts on the blocks pass 1 touched last, which
  may still be in L2 (a free heuristic, not counted on). With ``compute_grad=False`` pass 2 is one
  program per sample reading only the workspace: ``B (C N + N)`` elements, the minimum.
  The partial sums are accumulated in float64 (products of float32 values are exact there), so the
  expanded ``||I - r||^2`` loses nothing to cancellation beyond the float32 rounding of ``S``.

Strides: ``g`` may have any strides (``channels_last`` and other layouts whose pixels are equally
spaced run at full speed; general views pay an integer division per element); ``ref`` any strides;
the gradient is written in ``torch.empty_like(g)``'s layout (or into ``out``). Arithmetic runs in
float32 (float64 for float64 inputs); float16 / bfloat16 ``g`` is upcast in registers and the loss
and gradient are returned in ``g``'s dtype.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["saliency_dissim_triton", "plan"]

KINDS = ("l2", "rel_l2", "cosine")
_TINY = tl.constexpr(1e-30)
_MAX_BLOCK_C = 8          # channels per register tile; more channels are processed in chunks
_SINGLE_MAX = 16384       # padded C x H*W elements held by one program on the single path
_SPLIT_ELEMS = 8192       # padded elements of g per program on the split path
_MAX_BLOCKS = 1024        # per-sample blocks on the split path (larger maps get larger blocks)


@triton.jit
def _spatial(n, W, sh, sw, FLAT: tl.constexpr):
    """Element offset of flat pixel index ``n`` (int64) of an H x W plane with strides (sh, sw)."""
    if FLAT:
        return n * sw
    else:
        return (n // W) * sh + (n % W) * sw


@triton.jit
def _sd_single_kernel(g_ptr, ref_ptr, loss_ptr, grad_ptr, C, N, W,
                      g_sb, g_sc, g_sh, g_sw, r_sb, r_sn, o_sb, o_sc, o_sh, o_sw,
                      KIND: tl.constexpr, COMPUTE_GRAD: tl.constexpr, G_FLAT: tl.constexpr,
                      O_FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                      COMPUTE: tl.constexpr):
    """One program per sample; the whole (C, N) tile lives in registers."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C).to(tl.int64)
    n = tl.arange(0, BLOCK_N).to(tl.int64)
    nm = n < N
    m2 = (c < C)[:, None] & nm[None, :]
    g = tl.load(g_ptr + b * g_sb + c[:, None] * g_sc + _spatial(n, W, g_sh, g_sw, G_FLAT)[None, :],
                mask=m2, other=0.0).to(COMPUTE)
    r = tl.load(ref_ptr + b * r_sb + n * r_sn, mask=nm, other=0.0).to(COMPUTE)
    S = tl.sum(tl.abs(g), axis=0)
    n1 = tl.sum(S, axis=0)
    inv = tl.where(n1 > 0, 1.0 / tl.maximum(n1, _TINY), 0.0)
    I = S * inv
    if KIND == 2:  # cosine
        II = tl.sum(I * I, axis=0)
        i_norm = tl.sqrt(II)
        r_norm = tl.sqrt(tl.sum(r * r, axis=0))
        denom = tl.maximum(i_norm * r_norm, _TINY)
        cos = tl.sum(I * r, axis=0) / denom
        loss = 1.0 - cos
        dd = -(r / denom - cos * I / tl.maximum(II, _TINY))
        dd = tl.where((i_norm > 0) & (r_norm > 0), dd, 0.0)
    else:  # l2, rel_l2
        diff = I - r
        d = tl.sqrt(tl.sum(diff * diff, axis=0))
        p = tl.where(d > 0, 1.0 / tl.maximum(d, _TINY), 0.0)
        loss = d
        if KIND == 1:
            r_norm = tl.maximum(tl.sqrt(tl.sum(r * r, axis=0)), _TINY)
            loss = d / r_norm
            p = p / r_norm
        dd = diff * p
    tl.store(loss_ptr + b, loss.to(loss_ptr.dtype.element_ty))
    if COMPUTE_GRAD:
        kappa = tl.sum(dd * I, axis=0)
        dS = ((dd - kappa) * inv)[None, :]
        out = tl.where(g > 0, dS, tl.where(g < 0, -dS, 0.0))
        tl.store(grad_ptr + b * o_sb + c[:, None] * o_sc + _spatial(n, W, o_sh, o_sw, O_FLAT)[None, :],
                 out.to(grad_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _abs_sum(g_ptr, g_base, n_off, nm, C, g_sc, BLOCK_C: tl.constexpr, C_CHUNKS: tl.constexpr,
             BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    """``sum_c |g_c|`` over all channels for one block of pixels, by chunks of ``BLOCK_C`` channels."""
    S = tl.zeros([BLOCK_N], COMPUTE)
    for ci in range(0, C_CHUNKS):
        c = ci * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
        g = tl.load(g_ptr + g_base + c[:, None] * g_sc + n_off[None, :],
                    mask=(c < C)[:, None] & nm[None, :], other=0.0).to(COMPUTE)
        S += tl.sum(tl.abs(g), axis=0)
    return S


@triton.jit
def _sd_partial_kernel(g_ptr, ref_ptr, ws_ptr, C, N, W, NB,
                       g_sb, g_sc, g_sh, g_sw, r_sb, r_sn,
                       G_FLAT: tl.constexpr, BLOCK_C: tl.constexpr, C_CHUNKS: tl.constexpr,
                       BLOCK_N: tl.constexpr, COMPUTE: tl.constexpr):
    """Pass 1 of the split path: partial (s1, s2, sr, rr) of one block of one sample, in float64."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // NB
    blk = pid % NB
    n = blk * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    nm = n < N
    S = _abs_sum(g_ptr, b * g_sb, _spatial(n, W, g_sh, g_sw, G_FLAT), nm, C, g_sc,
                 BLOCK_C, C_CHUNKS, BLOCK_N, COMPUTE).to(tl.float64)
    r = tl.load(ref_ptr + b * r_sb + n * r_sn, mask=nm, other=0.0).to(COMPUTE).to(tl.float64)
    base = ws_ptr + pid * 4
    tl.store(base + 0, tl.sum(S, axis=0))
    tl.store(base + 1, tl.sum(S * S, axis=0))
    tl.store(base + 2, tl.sum(S * r, axis=0))
    tl.store(base + 3, tl.sum(r * r, axis=0))


@triton.jit
def _sd_finish_kernel(g_ptr, ref_ptr, ws_ptr, loss_ptr, grad_ptr, C, N, W, NB, PROGS_PER_SAMPLE,
                      g_sb, g_sc, g_sh, g_sw, r_sb, r_sn, o_sb, o_sc, o_sh, o_sw,
                      KIND: tl.constexpr, COMPUTE_GRAD: tl.constexpr, REVERSE: tl.constexpr,
                      G_FLAT: tl.constexpr, O_FLAT: tl.constexpr, BLOCK_C: tl.constexpr,
                      C_CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr, NB_POW2: tl.constexpr,
                      COMPUTE: tl.constexpr):
    """Pass 2 of the split path: per-sample scalars from the workspace, the loss (written by the
    sample's first block) and, with ``COMPUTE_GRAD``, the gradient of one block."""
    pid = tl.program_id(0).to(tl.int64)
    if REVERSE:
        pid = tl.num_programs(0) - 1 - pid
    b = pid // PROGS_PER_SAMPLE
    blk = pid % PROGS_PER_SAMPLE
    j = tl.arange(0, NB_POW2)
    jm = j < NB
    parts = ws_ptr + (b * NB + j) * 4
    s1 = tl.sum(tl.load(parts + 0, mask=jm, other=0.0), axis=0)
    s2 = tl.sum(tl.load(parts + 1, mask=jm, other=0.0), axis=0)
    sr = tl.sum(tl.load(parts + 2, mask=jm, other=0.0), axis=0)
    rr = tl.sum(tl.load(parts + 3, mask=jm, other=0.0), axis=0)
    inv = tl.where(s1 > 0, 1.0 / tl.maximum(s1, _TINY), 0.0)
    II = s2 * inv * inv
    Ir = sr * inv
    if KIND == 2:  # cosine
        i_norm = tl.sqrt(II)
        r_norm = tl.sqrt(rr)
        denom = tl.maximum(i_norm * r_norm, _TINY)
        cos = Ir / denom
        loss = 1.0 - cos
        valid = (i_norm > 0) & (r_norm > 0)
        p = tl.where(valid, cos / tl.maximum(II, _TINY), 0.0)
        q = tl.where(valid, -1.0 / denom, 0.0)
    else:  # l2, rel_l2
        d = tl.sqrt(tl.maximum(II - 2.0 * Ir + rr, 0.0))
        p = tl.where(d > 0, 1.0 / tl.maximum(d, _TINY), 0.0)
        loss = d
        if KIND == 1:
            r_norm = tl.maximum(tl.sqrt(rr), _TINY)
            loss = d / r_norm
            p = p / r_norm
        q = -p
    kappa = p * II + q * Ir
    # float64 -> float32 first: a direct float64 -> bfloat16 conversion is not portable.
    tl.store(loss_ptr + b, loss.to(COMPUTE).to(loss_ptr.dtype.element_ty), mask=blk == 0)
    if COMPUTE_GRAD:
        n = blk * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        nm = n < N
        g_n = _spatial(n, W, g_sh, g_sw, G_FLAT)
        o_n = _spatial(n, W, o_sh, o_sw, O_FLAT)
        r = tl.load(ref_ptr + b * r_sb + n * r_sn, mask=nm, other=0.0).to(COMPUTE)
        inv_c = inv.to(COMPUTE)
        if C_CHUNKS == 1:  # the whole channel tile stays in registers between S and the store
            c = tl.arange(0, BLOCK_C).to(tl.int64)
            m2 = (c < C)[:, None] & nm[None, :]
            g = tl.load(g_ptr + b * g_sb + c[:, None] * g_sc + g_n[None, :], mask=m2, other=0.0).to(COMPUTE)
            S = tl.sum(tl.abs(g), axis=0)
        else:
            S = _abs_sum(g_ptr, b * g_sb, g_n, nm, C, g_sc, BLOCK_C, C_CHUNKS, BLOCK_N, COMPUTE)
        I = S * inv_c
        if KIND == 2:
            dd = I * p.to(COMPUTE) + r * q.to(COMPUTE)
        else:
            dd = (I - r) * p.to(COMPUTE)
        dS = ((dd - kappa.to(COMPUTE)) * inv_c)[None, :]
        if C_CHUNKS == 1:
            out = tl.where(g > 0, dS, tl.where(g < 0, -dS, 0.0))
            tl.store(grad_ptr + b * o_sb + c[:, None] * o_sc + o_n[None, :],
                     out.to(grad_ptr.dtype.element_ty), mask=m2)
        else:
            for ci in range(0, C_CHUNKS):
                c = ci * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
                m2 = (c < C)[:, None] & nm[None, :]
                g = tl.load(g_ptr + b * g_sb + c[:, None] * g_sc + g_n[None, :], mask=m2, other=0.0).to(COMPUTE)
                out = tl.where(g > 0, dS, tl.where(g < 0, -dS, 0.0))
                tl.store(grad_ptr + b * o_sb + c[:, None] * o_sc + o_n[None, :],
                         out.to(grad_ptr.dtype.element_ty), mask=m2)


def plan(C: int, N: int, path: str = "auto", block_n: int | None = None,
         single_max: int = _SINGLE_MAX) -> dict:
    """Tiling for a (B, C, H*W = N) problem: ``{"path", "block_c", "c_chunks", "block_n", "blocks",
    "num_warps"}``. ``path``: ``"auto"``, ``"single"`` or ``"split"``; ``block_n`` (a power of two)
    overrides the split path's pixels per program (tests lower it to exercise many blocks)."""
    if path not in ("auto", "single", "split"):
        raise ValueError(f"path must be 'auto', 'single' or 'split', got {path!r}")
    block_c = min(triton.next_power_of_2(C), _MAX_BLOCK_C)
    c_chunks = triton.cdiv(C, block_c)
    n_pow2 = triton.next_power_of_2(N)
    fits = c_chunks == 1 and block_c * n_pow2 <= single_max
    if path == "single" and not fits:
        raise ValueError(f"path='single' needs C <= {_MAX_BLOCK_C} and padded C x H*W <= single_max "
                         f"({single_max}); got C={C}, H*W={N}")
    if path == "single" or (path == "auto" and fits):
        tile = block_c * n_pow2
        return {"path": "single", "block_c": block_c, "c_chunks": 1, "block_n": n_pow2, "blocks": 1,
                "num_warps": 4 if tile <= 4096 else (8 if tile <= 8192 else 16)}
    if block_n is None:
        block_n = max(128, _SPLIT_ELEMS // block_c)
        block_n = max(block_n, triton.next_power_of_2(triton.cdiv(N, _MAX_BLOCKS)))
    elif block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a positive power of two, got {block_n}")
    block_n = min(block_n, n_pow2)
    return {"path": "split", "block_c": block_c, "c_chunks": c_chunks, "block_n": block_n,
            "blocks": triton.cdiv(N, block_n), "num_warps": 8 if block_c * block_n >= 4096 else 4}


def _compute(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current CUDA device), a no-op on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _flat(H: int, W: int, sh: int, sw: int) -> bool:
    """Whether pixel n = h W + w sits at offset n * sw (so no division is needed)."""
    return H == 1 or sh == W * sw


def _check(g, ref, kind: str, compute_grad: bool, out) -> None:
    if not isinstance(g, torch.Tensor) or g.dim() != 4:
        got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"g must be a (B, C, H, W) tensor, got {got}")
    if g.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"g must be float16, bfloat16, float32 or float64, got {g.dtype}")
    B, _, H, W = g.shape
    if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != (B, H * W):
        raise ValueError(f"ref must have shape (B, H*W) = ({B}, {H * W}), got "
                         f"{tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__}")
    if not ref.is_floating_point():
        raise TypeError(f"ref must be a floating-point tensor, got {ref.dtype}")
    if ref.device != g.device:
        raise ValueError(f"ref is on {ref.device} but g is on {g.device}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError("out must be a pair (loss, grad)")
        loss, grad = out
        if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != (B,) or loss.dtype != g.dtype \
                or loss.device != g.device or not loss.is_contiguous():
            raise ValueError(f"out[0] must be a contiguous ({B},) tensor of dtype {g.dtype} on {g.device}")
        if compute_grad and (not isinstance(grad, torch.Tensor) or grad.shape != g.shape
                             or grad.dtype != g.dtype or grad.device != g.device):
            raise ValueError(f"out[1] must be a tensor of g's shape {tuple(g.shape)} and dtype {g.dtype}")


def saliency_dissim_triton(g: torch.Tensor, ref: torch.Tensor, kind: str, compute_grad: bool, *,
                           out: tuple[torch.Tensor, torch.Tensor] | None = None, path: str = "auto",
                           block_n: int | None = None, single_max: int = _SINGLE_MAX,
                           reverse: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``abs_sum_l1`` + dissimilarity + gradient (the Triton implementation of the op).

    Args:
        g: raw input gradients (B, C, H, W), float16/bfloat16/float32/float64, any strides.
        ref: reference maps (B, H*W), any float dtype and strides (upcast in registers).
        kind: ``"l2"``, ``"rel_l2"`` or ``"cosine"``.
        compute_grad: also write ``d loss_b / d g_b``.
        out: optional preallocated ``(loss (B,), grad like g)`` to write into (returned).
        path, block_n, single_max: tiling (see :func:`plan` and the module docstring).
        reverse: pass 2 of the split path walks blocks in reverse launch order (default: on CUDA).

    Returns:
        ``(loss (B,), grad (B, C, H, W))`` in ``g``'s dtype; ``grad`` is an empty tensor when
        ``compute_grad`` is false.
    """
    _check(g, ref, kind, compute_grad, out)
    B, C, H, W = g.shape
    N = H * W
    if out is None:
        loss = torch.empty((B,), dtype=g.dtype, device=g.device)
        grad = torch.empty_like(g) if compute_grad else g.new_empty((0,))
    else:
        loss, grad = out
        grad = grad if compute_grad else g.new_empty((0,))
    if B == 0:
        return loss, grad
    if C == 0 or N == 0:  # degenerate maps: the reference's conventions, no kernel needed
        from upi_fast.ops.saliency_dissim import saliency_dissim_reference
        l_ref, g_ref = saliency_dissim_reference(g, ref.to(g.dtype), kind, compute_grad)
        loss.copy_(l_ref)
        if compute_grad:
            grad.copy_(g_ref)
        return loss, grad
    with _on_device(g):
        _launch(g, ref, kind, compute_grad, loss, grad, plan(C, N, path, block_n, single_max), reverse)
    return loss, grad


def _launch(g, ref, kind: str, compute_grad: bool, loss, grad, cfg: dict, reverse: bool | None) -> None:
    """Enqueue the kernels of one plan (single: one launch; split: partial sums, then finish)."""
    B, C, H, W = g.shape
    N = H * W
    kind_id = KINDS.index(kind)
    gs = g.stride()
    rs = ref.stride()
    os_ = grad.stride() if compute_grad else (0, 0, 0, 0)
    g_flat = _flat(H, W, gs[2], gs[3])
    o_flat = _flat(H, W, os_[2], os_[3]) if compute_grad else True
    grad_arg = grad if compute_grad else loss  # never written when compute_grad is false
    common = dict(BLOCK_C=cfg["block_c"], BLOCK_N=cfg["block_n"], COMPUTE=_compute(g),
                  num_warps=cfg["num_warps"])
    if cfg["path"] == "single":
        _sd_single_kernel[(B,)](g, ref, loss, grad_arg, C, N, W, gs[0], gs[1], gs[2], gs[3], rs[0], rs[1],
                                os_[0], os_[1], os_[2], os_[3], KIND=kind_id, COMPUTE_GRAD=bool(compute_grad),
                                G_FLAT=g_flat, O_FLAT=o_flat, **common)
        return
    nb = cfg["blocks"]
    ws = torch.empty((B * nb * 4,), dtype=torch.float64, device=g.device)
    _sd_partial_kernel[(B * nb,)](g, ref, ws, C, N, W, nb, gs[0], gs[1], gs[2], gs[3], rs[0], rs[1],
                                  G_FLAT=g_flat, C_CHUNKS=cfg["c_chunks"], **common)
    per_sample = nb if compute_grad else 1
    if reverse is None:
        reverse = g.is_cuda
    _sd_finish_kernel[(B * per_sample,)](
        g, ref, ws, loss, grad_arg, C, N, W, nb, per_sample, gs[0], gs[1], gs[2], gs[3], rs[0], rs[1],
        os_[0], os_[1], os_[2], os_[3], KIND=kind_id, COMPUTE_GRAD=bool(compute_grad), REVERSE=bool(reverse),
        G_FLAT=g_flat, O_FLAT=o_flat, C_CHUNKS=cfg["c_chunks"], NB_POW2=triton.next_power_of_2(nb), **common)
