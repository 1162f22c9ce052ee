"""Half-precision spills (issue 17): float16 rows with per-row power-of-two scales, bfloat16, CRC32
checksums, atomic finish, and the spill_dtype option of top_singular_vectors and UPIPCA.

The fp16 bound: rows are stored as ``y = a / s`` with ``s`` a power of two >= max |a| (exact), then
rounded to fp16: ``|y_hat - y| <= 2^-11 |y|`` where ``y`` is a normal fp16 number (11 significant
bits, half an ulp) and ``<= 2^-25`` in the subnormal range (spacing 2^-24 below 2^-14). Multiplying
back by ``s`` is exact, so ``|a_hat - a| <= max(2^-11 |a|, 2^-25 s)``. bfloat16: 8 significant bits,
``<= 2^-8 |a|``.
"""
import os

import numpy as np
import pytest
import torch
from torch import nn

from upi_fast.linalg import (MemmapRows, MemmapRowWriter, PlantedRows, SpillChecksumError, exact_svd,
                             randomized_svd, spill_dtype, spill_rows, top_singular_vectors)
from upi_fast.solvers import UPIPCA

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]


def _wild_rows(n=60, d=257, seed=0):
    """Rows whose scales span 1e-30 .. 1e30 (fp16 alone would underflow / overflow), plus a zero
    row, a row with entries in fp16's subnormal range relative to its max, and a power-of-two max."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=g, dtype=torch.float64)
    A *= torch.logspace(-30, 30, n, dtype=torch.float64).unsqueeze(1)
    A[3] = 0
    A[5, :] = 1e-9
    A[5, 0] = 1.0  # the rest lands below 2^-14 after scaling
    A[7, 0] = 2.0 ** 20  # max exactly a power of two
    return A.float()


def _read(src):
    return torch.cat([b for _, b in src.blocks(17)])


def test_fp16_round_trip_within_the_derived_bound(tmp_path):
    A = _wild_rows()
    src = spill_rows(A.split(13), tmp_path / "a.f16", dtype="float16")
    back = _read(src)
    assert back.dtype == torch.float32 and back.shape == A.shape and torch.isfinite(back).all()
    amax = A.abs().amax(1)
    s = torch.from_numpy(src.scales)
    nz = amax > 0
    assert (s[nz] >= amax[nz]).all() and (s[nz] < 2 * amax[nz]).all() and s[~nz].eq(1).all()
    assert torch.equal(torch.log2(s), torch.log2(s).round())  # powers of two
    err = (back.double() - A.double()).abs()
    bound = torch.maximum(2.0 ** -11 * A.double().abs(), 2.0 ** -25 * s.double().unsqueeze(1))
    assert (err <= bound).all(), float((err / bound).max())
    rel = err[nz] / amax[nz].double().unsqueeze(1)
    assert rel.max() > 2.0 ** -14  # it really was rounded to 11 bits (not stored as float32)
    # every row keeps its relative precision whatever its scale: no underflow, no overflow
    row_rel = (back.double() - A.double()).norm(dim=1)[nz] / A.double().norm(dim=1)[nz]
    assert row_rel.max() < 2.0 ** -11


def test_bf16_round_trip_within_its_bound(tmp_path):
    A = _wild_rows(seed=1)
    A[5] = 1.0  # bf16 is unscaled: keep every value in the normal range
    src = spill_rows(A.split(8), tmp_path / "a.bf16", dtype="bf16")
    back = _read(src)
    assert back.dtype == torch.bfloat16 and src.scales is None
    err = (back.double() - A.double()).abs()
    assert (err <= 2.0 ** -8 * A.double().abs()).all()
    assert (err / A.double().abs().clamp_min(1e-300)).max() > 2.0 ** -10  # rounded to 8 bits


def test_unscaled_fp16_refuses_overflow_with_a_clear_message(tmp_path):
    w = MemmapRowWriter(tmp_path / "x.f16", 4, "float16", scale_rows=False)
    w.append(torch.ones(2, 4))
    with pytest.raises(ValueError, match="overflows float16.*scale_rows=True"):
        w.append(torch.full((1, 4), 1e5))
    src = w.finish()
    assert src.shape == (2, 4) and os.path.getsize(src.path) == 2 * 4 * 2  # nothing of the refused block


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_block_krylov_on_a_half_spill_recovers_a_gapped_top_vector(tmp_path, dtype):
    spectrum = [1.0, 0.6] + [0.3 * 0.9 ** j for j in range(10)]
    src = PlantedRows(500, 3000, spectrum, noise=1e-3, seed=4, chunk=50)
    A = src.materialize()
    _, V = exact_svd(A, 1)
    half = spill_rows(src.blocks(100), tmp_path / "a.half", dtype=dtype)
    r = randomized_svd(half, k=1, method="block_krylov", oversample=5, n_iter=3)
    cos = float((r.Vh[0].double() @ V[0]).abs())
    assert cos > 0.999, cos


def test_half_spill_takes_half_the_disk(tmp_path):
    A = torch.randn(300, 1001)
    full = spill_rows(A.split(64), tmp_path / "a.f32", dtype="float32")
    for name in ("float16", "bfloat16"):
        half = spill_rows(A.split(64), tmp_path / f"a.{name}", dtype=name)
        assert os.path.getsize(half.path) * 2 == os.path.getsize(full.path) == 300 * 1001 * 4
        assert half.nbytes * 2 == full.nbytes


def test_spill_dtype_options_validate_their_argument(tmp_path):
    assert spill_dtype("fp16") is torch.float16 and spill_dtype(np.float32) is torch.float32
    for bad in ("int8", "float8", torch.int32, 3, None):
        with pytest.raises(ValueError, match="dtype must be one of"):
            MemmapRowWriter(tmp_path / "x", 4, bad)
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="spill_dtype"):
        UPIPCA(m, 0.1, spill_dtype="int8")
    with pytest.raises(ValueError, match="spill_dtype"):
        top_singular_vectors(iter([torch.ones(3, 4)]), spill_dtype="float8")
    with pytest.raises(ValueError, match="spill_dtype"):  # a re-readable source needs no spill
        top_singular_vectors(torch.ones(3, 4), spill_dtype="float16")
    with pytest.raises(ValueError, match="scale_rows"):
        MemmapRowWriter(tmp_path / "y", 4, "float16", scale_rows="yes")
    src = spill_rows([torch.ones(3, 4)], tmp_path / "z")
    with pytest.raises(ValueError, match="verify"):
        MemmapRows(src.path, 3, 4, checksums=src.checksums, verify="sometimes")
    with pytest.raises(ValueError, match="scales"):
        MemmapRows(src.path, 3, 4, scales=np.ones(2))
    assert not os.path.exists(tmp_path / "x.partial")  # refused before any file was opened


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_checksums_catch_a_flipped_byte(tmp_path, dtype):
    A = torch.randn(40, 50)
    src = spill_rows(A.split(7), tmp_path / "a", dtype=dtype)
    _read(src)  # clean first pass
    item = 4 if dtype == "float32" else 2
    with open(src.path, "r+b") as fh:  # flip one bit of row 23
        fh.seek(23 * 50 * item + 11)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x04]))
    fresh = MemmapRows(src.path, 40, 50, dtype, scales=src.scales, checksums=src.checksums)
    with pytest.raises(SpillChecksumError, match="row 23 fails its CRC32"):
        _read(fresh)
    always = MemmapRows(src.path, 40, 50, dtype, scales=src.scales, checksums=src.checksums, verify="always")
    with pytest.raises(SpillChecksumError, match="row 23"):
        list(always.blocks(64))
    with pytest.raises(SpillChecksumError, match="row 23"):  # every pass is checked with "always"
        list(always.blocks(64))
    unchecked = MemmapRows(src.path, 40, 50, dtype, scales=src.scales, checksums=src.checksums, verify="never")
    assert _read(unchecked).shape == (40, 50)
    assert isinstance(SpillChecksumError("x"), ValueError)


def test_finish_is_atomic_and_an_unfinished_spill_leaves_nothing(tmp_path):
    path = tmp_path / "rows.f16"
    w = MemmapRowWriter(path, 8, "float16")
    w.append(torch.randn(5, 8))
    assert not path.exists() and os.path.exists(w.partial)  # readers never see a half-written spill
    src = w.finish()
    assert path.exists() and not os.path.exists(w.partial) and src.shape == (5, 8)
    assert w.finish() is src
    with MemmapRowWriter(tmp_path / "aborted", 8) as w2:
        w2.append(torch.randn(3, 8))
    assert not list(p for p in tmp_path.iterdir() if p.name.startswith("aborted"))

    def broken():
        yield torch.randn(2, 8)
        raise RuntimeError("stream died")

    with pytest.raises(RuntimeError, match="stream died"):
        spill_rows(broken(), tmp_path / "broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.f16"]


def test_top_singular_vectors_spills_a_one_shot_stream(tmp_path):
    src = PlantedRows.preset("fast", 200, 400, r=8, seed=5)
    A = src.materialize()
    _, V = exact_svd(A, 1)
    for dt in ("float32", "float16", "bfloat16"):
        S, Vh = top_singular_vectors((blk for _, blk in src.blocks(32)), spill_dir=tmp_path, spill_dtype=dt)
        assert float((Vh[0].double() @ V[0]).abs()) > 0.999, dt
    assert not list(tmp_path.iterdir())  # the temporary spill is deleted
    with pytest.raises(ValueError, match="reads once"):
        top_singular_vectors(iter([A]), method="sketch", spill_dtype="float16")


def _tiny():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(beta=4), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    X = torch.rand(40, 1, 6, 6)
    return m, X, m(X).argmax(1)


@pytest.mark.parametrize("normalize_rows", [True, False])
def test_upipca_half_spill_matches_the_float32_spill(tmp_path, normalize_rows):
    m, X, y = _tiny()
    kw = dict(progress=False, batch_size=16, seed=2, solver="block_krylov", spill_dir=str(tmp_path),
              normalize_rows=normalize_rows)
    full = UPIPCA(m, 0.5, **kw).fit((X, y))
    for dt in ("float16", "bfloat16"):
        half = UPIPCA(m, 0.5, spill_dtype=dt, **kw).fit((X, y))
        cos = float((full.components_[0] @ half.components_[0]).abs())
        assert cos > 0.999, (dt, cos)
        torch.testing.assert_close(half.singular_values_, full.singular_values_, rtol=1e-2, atol=0)
        assert half.spill_dtype == dt
    assert not list(tmp_path.iterdir())  # spill files (and partial files) are removed
