"""Row sources: tensor views, memmap spill / re-read round trip, regenerating callables, bad input."""
import numpy as np
import pytest
import torch

from upi_fast.linalg import (CallableRows, MemmapRows, MemmapRowWriter, PlantedRows, RowSource, TensorRows,
                             as_source, randomized_svd)


pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]


def test_tensor_rows_blocks_are_views_covering_all_rows():
    A = torch.randn(103, 7)
    src = TensorRows(A)
    assert src.shape == (103, 7)
    offs, parts = zip(*src.blocks(25))
    assert offs == (0, 25, 50, 75, 100)
    assert torch.equal(torch.cat(parts), A)
    assert parts[1].data_ptr() == A[25:].data_ptr()  # a view, no copy
    (off, whole), = list(src.blocks())
    assert off == 0 and whole.shape == (103, 7)
    assert isinstance(src, RowSource)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_memmap_spill_and_reread_round_trip(tmp_path, dtype):
    """Unscaled storage: blocks come back in the stored dtype, equal to the rows cast to it."""
    A = torch.randn(257, 33, dtype=torch.float64)
    path = tmp_path / "rows.bin"
    with MemmapRowWriter(path, 33, dtype=dtype, scale_rows=False) as w:
        for blk in A.split(50):
            w.append(blk)
        src = w.finish()
    assert isinstance(src, MemmapRows) and src.shape == (257, 33) and src.dtype == dtype
    for bs in (1, 64, 1000):
        offs, parts = zip(*src.blocks(bs))
        assert offs[0] == 0 and all(p.dtype == dtype for p in parts)
        assert torch.equal(torch.cat(parts), A.to(dtype))
    # re-open by path, numpy / string dtype spelling
    again = MemmapRows(path, 257, 33, {torch.float32: np.float32, torch.float64: "float64",
                                       torch.float16: np.float16, torch.bfloat16: "bf16"}[dtype])
    assert torch.equal(torch.cat([b for _, b in again.blocks()]), A.to(dtype))


def test_multi_pass_over_memmap_equals_over_tensor(tmp_path):
    A = PlantedRows.preset("fast", 300, 120, r=10, seed=3).materialize()
    w = MemmapRowWriter(tmp_path / "a.bin", 120)
    for blk in A.split(64):
        w.append(blk)
    src = w.finish()
    r1 = randomized_svd(src, k=2, n_iter=2, block_size=300)
    r2 = randomized_svd(A, k=2, n_iter=2)
    assert torch.allclose(r1.S, r2.S, rtol=1e-5)
    assert torch.allclose((r1.Vh * r2.Vh).sum(1).abs(), torch.ones(2), atol=1e-5)


def test_memmap_bad_inputs(tmp_path):
    path = tmp_path / "x.bin"
    np.zeros((10, 4), np.float32).tofile(path)
    with pytest.raises(ValueError, match="bytes"):
        MemmapRows(path, 10, 5)
    with pytest.raises(ValueError, match="path"):
        MemmapRows(tmp_path / "missing.bin", 10, 4)
    with pytest.raises(ValueError, match="dtype"):
        MemmapRows(path, 10, 4, dtype=torch.int32)
    w = MemmapRowWriter(tmp_path / "y.bin", 4)
    with pytest.raises(ValueError, match="rows"):
        w.append(torch.zeros(3, 5))
    bad = torch.zeros(2, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        w.append(bad)
    w.append(torch.ones(2, 4))
    src = w.finish()
    assert src.shape == (2, 4)  # the refused blocks wrote nothing
    with pytest.raises(ValueError, match="finished"):
        w.append(torch.ones(1, 4))


def test_callable_rows_regenerate_and_check_shapes():
    calls = []

    def fn(start, stop):
        calls.append((start, stop))
        return torch.arange(start, stop, dtype=torch.float32).unsqueeze(1).repeat(1, 3)

    src = CallableRows(fn, 10, 3, block_size=4)
    assert torch.equal(torch.cat([b for _, b in src.blocks()])[:, 0], torch.arange(10.0))
    assert calls == [(0, 4), (4, 8), (8, 10)]
    broken = CallableRows(lambda s, e: torch.zeros(e - s, 2), 10, 3)
    with pytest.raises(ValueError, match=r"fn\(0, "):
        list(broken.blocks())


def test_planted_rows_identical_for_any_block_partition():
    src = PlantedRows.preset("slow", 333, 50, r=12, seed=7, chunk=16)
    full = src.materialize()
    for bs in (1, 7, 16, 100, 333):
        assert torch.equal(torch.cat([b for _, b in src.blocks(bs)]), full)


def test_as_source_and_bad_types():
    A = torch.randn(5, 3)
    assert isinstance(as_source(A), TensorRows)
    assert isinstance(as_source(A.numpy()), TensorRows)
    src = TensorRows(A)
    assert as_source(src) is src
    with pytest.raises(ValueError, match="source"):
        as_source([1, 2, 3])
    with pytest.raises(ValueError, match="tensor"):
        TensorRows(torch.zeros(3))
    with pytest.raises(ValueError, match="floating"):
        TensorRows(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="block_size"):
        list(src.blocks(0))
