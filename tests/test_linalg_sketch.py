"""StreamingSketch: accuracy against float64 SVD on planted spectra, exact merges, checkpoints, bad input.

Accuracy bounds used below (single pass; A_hat = Q Q^T A with Q = orth(A Omega^T), l = k + 10):
the top-vector angle obeys sin(theta) <= ||A - A_hat||_2^2 / (S_1^2 - S_2^2 - ||A - A_hat||_2^2)
(Davis-Kahan on A^T A, see upi_fast.linalg.sketch), and E||A - A_hat||_F <= sqrt(1 + k/(p-1)) *
(sum_{j>k} sigma_j^2)^{1/2} (HMT 2011 Thm 10.5). For the planted "fast" spectrum (sigma_j = 2^-j)
the tail past l = 11 is ~2^-11, so the angle is <= ~1e-3 and the singular values are within
~1e-3 relative; the test thresholds add a safety factor of ~5-10.
"""
import pytest
import torch

from upi_fast.linalg import PlantedRows, StreamingSketch
from upi_fast.ops.sketch_update import rademacher_columns

from _tolerance import assert_close_scaled, f32_rtol


pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]


def _sin(v, u):
    v = v.double() / v.double().norm()
    u = u.double() / u.double().norm()
    return float((v - (v @ u) * u).norm())


def _exact(A):
    """Reference top singular triplets in float64 via eigh of the smaller Gram (fast and accurate
    for the leading values: relative error ~ 1e-16 * (sigma_1 / sigma_i)^2)."""
    A = A.double()
    lam, E = torch.linalg.eigh(A.T @ A)
    lam, E = lam.flip(0).clamp_min(0), E.flip(1)
    return lam.sqrt(), E.T


def _sketch(src, d, k=2, bs=128, **kw):
    sk = StreamingSketch(d, k=k, **kw)
    for off, blk in src.blocks(bs):
        sk.update(blk)
    return sk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_decay_vectors_and_values(dtype):
    src = PlantedRows.preset("fast", 1000, 400, r=30, seed=1)
    A = src.materialize().double()
    S, Vh = _exact(A)
    sk = _sketch(src, 400, k=3, dtype=dtype)
    s, vh = sk.finalize()
    assert s.dtype == dtype and vh.shape == (3, 400)
    assert _sin(vh[0], Vh[0]) < 1e-3
    assert _sin(vh[1], Vh[1]) < 5e-3
    rel = (s.double() - S[:3]).abs() / S[:3]
    assert float(rel.max()) < 5e-3
    assert bool((s.double() <= S[:3] * (1 + 1e-6)).all())  # lower bounds
    err = sk.error_estimate()
    assert bool((err.sigma_upper >= S[:3] * (1 - 1e-6)).all())  # upper bounds
    assert _sin(vh[0], Vh[0]) <= err.sin_angle_bound + 1e-6
    assert err.fro_norm == pytest.approx(float(A.norm()), rel=1e-5)


def test_reconstruction_matches_definition_and_error_identities():
    """S are exactly the singular values of A_hat = Q Q^T A, Q = orth(A Omega^T) (float64),
    and ||A - A_hat||_F equals both the exact identity and (within sqrt(2/l) spread) the W estimate."""
    src = PlantedRows.preset("slow", 800, 300, r=60, seed=2, dtype=torch.float64)
    A = src.materialize()
    sk = _sketch(src, 300, k=2, dtype=torch.float64, oversample=18)
    Q = torch.linalg.qr(A @ sk.omega().T)[0]
    A_hat = Q @ (Q.T @ A)
    S_hat, _ = _exact(A_hat)
    s, _ = sk.finalize()
    assert torch.allclose(s, S_hat[:2], rtol=1e-9)
    err = sk.error_estimate()
    true_res = float((A - A_hat).norm())
    assert err.residual_fro == pytest.approx(true_res, rel=1e-6)
    assert err.residual_fro_sketch == pytest.approx(true_res, rel=0.5)


def test_slow_decay_within_documented_bounds():
    """Slow decay (sigma_j = j^-1/2): one pass cannot resolve the top vector well; check the
    a-posteriori bounds hold and the values are lower bounds within the exact residual."""
    src = PlantedRows.preset("slow", 1200, 500, r=100, seed=4)
    A = src.materialize().double()
    S, _ = _exact(A)
    sk = _sketch(src, 500, k=2)
    s, vh = sk.finalize()
    err = sk.error_estimate()
    assert bool((s.double() <= S[:2] * (1 + 1e-5)).all())
    assert bool((err.sigma_upper >= S[:2] * (1 - 1e-5)).all())
    assert float(((S[:2] - s.double()) / S[:2]).max()) < 0.35  # measured ~0.1-0.2


def test_co_range_sketch_is_the_op_output():
    """W = Psi A with Psi generated from (seed, global row index) as in upi_fast.ops.sketch_update."""
    A = torch.randn(70, 40, dtype=torch.float64)
    sk = StreamingSketch(40, k=2, oversample=3, seed=11, dtype=torch.float64)
    sk.update(A[:30])
    sk.update(A[30:])
    Psi = rademacher_columns(11, torch.arange(70), 5, torch.float64)
    assert torch.allclose(sk.W, Psi @ A, atol=1e-12)
    assert torch.allclose(sk.Kt, sk.omega() @ A.T @ A, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("normalize", [False, True])
def test_merge_equals_sketch_of_stacked_rows(normalize):
    src = PlantedRows.preset("gap", 900, 300, r=20, seed=5)
    A = src.materialize()
    whole = StreamingSketch(300, k=2, seed=3, normalize_rows=normalize)
    whole.update(A)
    a = StreamingSketch(300, k=2, seed=3, normalize_rows=normalize)
    b = StreamingSketch(300, k=2, seed=3, normalize_rows=normalize)
    a.update(A[:400])
    b.update(A[400:700], row_offset=400)
    c = StreamingSketch(300, k=2, seed=3, normalize_rows=normalize)
    c.update(A[700:], row_offset=700)
    a.merge(c).merge(b)
    # float32 sums over the 900 rows in another grouping (both sides float32); Kt also sums over 300 columns
    for name in ("W", "Kt"):
        x, y = getattr(a, name), getattr(whole, name)
        assert_close_scaled(x, y, f32_rtol([300, 900], pair=True), name)
    assert float(a.fro2) == pytest.approx(float(whole.fro2), rel=1e-9)
    assert a.n_rows == 900 and a.next_row == 900
    s1, v1 = a.finalize()
    s2, v2 = whole.finalize()
    assert torch.allclose(s1, s2, rtol=1e-4)
    assert _sin(v1[0], v2[0]) < 1e-3


def test_normalize_rows_equals_sketch_of_normalized_rows():
    A = torch.randn(200, 64, dtype=torch.float64) * torch.rand(200, 1, dtype=torch.float64) * 10
    A[5] = 0.0
    sk = StreamingSketch(64, k=1, normalize_rows=True, dtype=torch.float64)
    sk.update(A)
    n = A.norm(dim=1, keepdim=True)
    An = torch.where(n > 0, A / n.clamp_min(1e-300), torch.zeros_like(A))
    ref = StreamingSketch(64, k=1, dtype=torch.float64)
    ref.update(An)
    assert torch.allclose(sk.W, ref.W, atol=1e-10)
    assert torch.allclose(sk.Kt, ref.Kt, atol=1e-9)
    assert float(sk.fro2) == 199.0


def test_merge_refuses_mismatched_or_overlapping():
    a = StreamingSketch(50, k=1, seed=0)
    a.update(torch.randn(10, 50))
    for other, word in [(StreamingSketch(50, k=1, seed=1), "seed"), (StreamingSketch(51, k=1), "d"),
                        (StreamingSketch(50, k=2), "k"), (StreamingSketch(50, k=1, oversample=3), "oversample"),
                        (StreamingSketch(50, k=1, normalize_rows=True), "normalize_rows"),
                        (StreamingSketch(50, k=1, dtype=torch.float64), "dtype")]:
        with pytest.raises(ValueError, match=word):
            a.merge(other)
    b = StreamingSketch(50, k=1, seed=0)
    b.update(torch.randn(10, 50), row_offset=5)  # rows 5..14 overlap 0..9
    with pytest.raises(ValueError, match="overlap"):
        a.merge(b)
    with pytest.raises(ValueError, match="other"):
        a.merge("not a sketch")


def test_state_dict_round_trip_then_continue():
    A = torch.randn(300, 80)
    sk = StreamingSketch(80, k=2, seed=9)
    sk.update(A[:120])
    state = sk.state_dict()
    assert all(isinstance(v, (torch.Tensor, int)) for v in state.values())
    restored = StreamingSketch(80, k=2, seed=9)
    restored.load_state_dict(state)
    restored.update(A[120:])
    sk.update(A[120:])
    assert torch.equal(restored.W, sk.W) and torch.equal(restored.Kt, sk.Kt)
    assert restored.next_row == 300 and restored.n_rows == 300
    with pytest.raises(ValueError, match="seed"):
        StreamingSketch(80, k=2, seed=1).load_state_dict(state)


def test_bad_updates_leave_the_sketch_unchanged():
    sk = StreamingSketch(30, k=2, seed=0)
    sk.update(torch.randn(20, 30))
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sk.state_dict().items()}
    bad_nan = torch.randn(5, 30)
    bad_nan[3, 7] = float("nan")
    bad_inf = torch.randn(5, 30)
    bad_inf[0, 0] = float("inf")
    cases = [(bad_nan, "NaN"), (bad_inf, "NaN or Inf"), (torch.randn(5, 31), "shape"),
             (torch.ones(5, 30, dtype=torch.int32), "floating"),
             (torch.randn(5, 30, dtype=torch.complex64), "floating"),
             ([[0.0] * 30], "Tensor")]
    for rows, word in cases:
        with pytest.raises(ValueError, match=word):
            sk.update(rows)
    with pytest.raises(ValueError, match="overlap"):
        sk.update(torch.randn(5, 30), row_offset=10)
    with pytest.raises(ValueError, match="row_offset"):
        sk.update(torch.randn(5, 30), row_offset=-1)
    with pytest.raises(ValueError, match="row_offset"):
        sk.update(torch.randn(5, 30), row_offset=2**32 - 2)
    after = sk.state_dict()
    for key, v in before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, after[key]), key
        else:
            assert v == after[key], key


def test_bad_k_and_parameters():
    sk = StreamingSketch(30, k=2, oversample=4)
    with pytest.raises(ValueError, match="no rows"):
        sk.finalize()
    sk.update(torch.randn(3, 30))
    with pytest.raises(ValueError, match="sketch size"):
        sk.finalize(7)
    with pytest.raises(ValueError, match="min"):
        sk.finalize(4)  # l = 6 but only 3 rows seen
    s, vh = sk.finalize(3)
    assert vh.shape == (3, 30)
    assert torch.allclose(vh @ vh.T, torch.eye(3), atol=1e-5)
    with pytest.raises(ValueError, match="dtype"):
        StreamingSketch(30, dtype=torch.float16)
    with pytest.raises(ValueError, match="k"):
        StreamingSketch(30, k=0)
    with pytest.raises(ValueError, match="d"):
        StreamingSketch(0)


def test_rank_deficient_stream_completes_orthonormally():
    u = torch.randn(40, 1, dtype=torch.float64)
    v = torch.randn(1, 25, dtype=torch.float64)
    sk = StreamingSketch(25, k=3, dtype=torch.float64)
    sk.update(u @ v)
    s, vh = sk.finalize()
    assert float(s[0]) == pytest.approx(float(u.norm() * v.norm()), rel=1e-10)
    assert float(s[1:].abs().max()) < 1e-6 * float(s[0])
    assert torch.allclose(vh @ vh.T, torch.eye(3, dtype=torch.float64), atol=1e-8)


@pytest.mark.gpu
def test_sketch_on_cuda_matches_cpu():
    A = torch.randn(500, 100)
    cpu = StreamingSketch(100, k=2)
    cpu.update(A)
    gpu = StreamingSketch(100, k=2)
    gpu.update(A.cuda())
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.W.cpu(), cpu.W, atol=1e-3) and torch.allclose(gpu.Kt.cpu(), cpu.Kt, rtol=1e-3, atol=1e-2)
