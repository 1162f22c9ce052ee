"""The uint8 image cache (issue 17): cached items are bit-identical to the reader's, a second open
reads the cache without decoding, a changed file / size / transform is a new entry, damaged or
truncated caches are detected and rebuilt, bad arguments name themselves, the CLI's --cache."""
from __future__ import annotations

import contextlib
import io as _io
import json
import os
import pickle
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from upi_fast.data import CachedImageDataset, CacheRebuiltWarning, cache_key, cifar10, image_folder, open_cached_dataset
from upi_fast.data.splits import make_loader

Image = pytest.importorskip("PIL.Image")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _folder(root, classes=("a", "b", "c"), per_class=14, seed=0):
    """Colour-coded noise (class k: channel k bright), non-square, PNG and JPEG mixed: 42 images."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 120, (20 + i % 3, 26, 3))
            img[..., k % 3] += 135
            Image.fromarray(img.astype(np.uint8)).save(root / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture
def data(tmp_path):
    return _folder(tmp_path / "data")


def _items(ds):
    return [ds[i] for i in range(len(ds))]


def _assert_same(got, want):
    assert len(got) == len(want)
    for (x, y), (x0, y0) in zip(got, want):
        assert y == y0 and x.dtype == x0.dtype == torch.float32 and torch.equal(x, x0)


def _no_decode(monkeypatch):
    def boom(*a, **k):
        raise OSError("an image was decoded")
    monkeypatch.setattr(Image, "open", boom)


@pytest.mark.parametrize("norm", [False, True])
def test_cached_items_equal_uncached_exactly(data, tmp_path, norm):
    kw = dict(mean=MEAN, std=STD) if norm else {}
    ds = image_folder(data, size=16, **kw)
    want = _items(ds)
    cached = CachedImageDataset(ds, tmp_path / "cache", chunk=8)
    assert not cached.complete and len(cached) == 42 and cached.classes == ["a", "b", "c"]
    _assert_same(_items(cached), want)  # epoch 1: decoded and stored
    assert cached.complete
    manifest = json.loads((cached.entry / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shape"] == [3, 16, 16] and len(manifest["chunks"]) == 6
    assert (cached.entry / "images.u8").stat().st_size == 42 * 3 * 16 * 16
    _assert_same(_items(cached), want)  # epoch 2: read back
    if not norm:
        for x, _ in want:  # the reader's floats are uint8 / 255: the cache loses nothing
            assert torch.equal(torch.round(x * 255) / 255, x)


def test_workers_fill_and_second_open_reads_without_decoding(data, tmp_path, monkeypatch):
    ds = image_folder(data, size=12)
    want = _items(ds)
    cached = CachedImageDataset(ds, tmp_path / "cache", chunk=5)
    got = [b for b in make_loader(cached, list(range(42)), 8, workers=2)]  # filled inside two worker processes
    x = torch.cat([b[0] for b in got])
    assert torch.equal(x, torch.stack([w[0] for w in want]))
    assert json.loads((cached.entry / "manifest.json").read_text())["complete"]  # finalised by a worker
    _no_decode(monkeypatch)
    again = CachedImageDataset(image_folder(data, size=12), tmp_path / "cache", chunk=5)
    assert again.complete and again.entry == cached.entry
    _assert_same(_items(again), want)
    assert pickle.loads(pickle.dumps(again))[3][1] == want[3][1]  # spawned workers: maps reopened


def test_fill_in_parallel_then_read(data, tmp_path, monkeypatch):
    ds = image_folder(data, size=12)
    want = _items(ds)
    cached = CachedImageDataset(ds, tmp_path / "cache").fill(workers=2, batch_size=4)
    assert cached.complete
    _no_decode(monkeypatch)
    _assert_same(_items(CachedImageDataset(image_folder(data, size=12), tmp_path / "cache")), want)


def test_partial_fill_is_reused_by_the_next_open(data, tmp_path, monkeypatch):
    ds = image_folder(data, size=12)
    cached = CachedImageDataset(ds, tmp_path / "cache")
    some = [1, 7, 30]
    want = {i: ds[i] for i in some}
    for i in some:
        cached[i]
    assert not cached.complete
    _no_decode(monkeypatch)
    again = CachedImageDataset(image_folder(data, size=12), tmp_path / "cache")
    assert not again.complete
    _assert_same([again[i] for i in some], [want[i] for i in some])
    with pytest.raises(OSError, match="decoded"):
        again[2]  # not stored yet: decoded (and here refused)


def test_new_entry_for_changed_size_transform_or_file(data, tmp_path):
    from torchvision import transforms as T
    root = tmp_path / "cache"
    base = CachedImageDataset(image_folder(data, size=16), root)
    assert CachedImageDataset(image_folder(data, size=20), root).entry != base.entry
    nearest = image_folder(data, size=16)
    nearest.transform = T.Compose([T.Resize(16, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(16),
                                   T.ToTensor()])
    other = CachedImageDataset(nearest, root)
    assert other.entry != base.entry
    _assert_same(_items(other), _items(nearest))
    # normalisation is applied after the cached uint8 stage: same entry, exact items
    normed = image_folder(data, size=16, mean=MEAN, std=STD)
    assert cache_key(normed) == cache_key(image_folder(data, size=16))
    _assert_same(_items(CachedImageDataset(normed, root)), _items(normed))
    # a rewritten file (new content, size and mtime): a new entry holding the new image
    _items(base)
    path = data / "b" / "3.png"
    Image.fromarray(np.full((22, 26, 3), 200, np.uint8)).save(path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = image_folder(data, size=16)
    fresh = CachedImageDataset(changed, root)
    assert fresh.entry != base.entry and not fresh.complete
    _assert_same(_items(fresh), _items(changed))
    assert len(list(root.iterdir())) == 4  # size 16, size 20, nearest, the changed folder; the old ones intact
    assert torch.equal(base[17][0], _items(image_folder(data, size=16))[17][0])


@pytest.mark.parametrize("verify", ["open", "lazy"])
def test_corrupted_byte_is_detected_and_rebuilt(data, tmp_path, verify):
    ds = image_folder(data, size=16)
    want = _items(ds)
    entry = CachedImageDataset(ds, tmp_path / "cache", chunk=8).fill().entry
    with open(entry / "images.u8", "r+b") as fh:  # one byte of image 20
        fh.seek(20 * 768 + 100)
        b = fh.read(1)
        fh.seek(20 * 768 + 100)
        fh.write(bytes([b[0] ^ 0x5A]))
    with pytest.warns(CacheRebuiltWarning, match="checksum"):
        again = CachedImageDataset(image_folder(data, size=16), tmp_path / "cache", chunk=8, verify=verify)
        _assert_same(_items(again), want)
    assert again.complete
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(_items(CachedImageDataset(image_folder(data, size=16), tmp_path / "cache", chunk=8)), want)


@pytest.mark.parametrize("damage", ["truncate", "manifest", "labels", "digest"])
def test_truncated_or_damaged_files_are_rebuilt(data, tmp_path, damage):
    ds = image_folder(data, size=16)
    want = _items(ds)
    entry = CachedImageDataset(ds, tmp_path / "cache", chunk=8).fill().entry
    if damage == "truncate":
        os.truncate(entry / "images.u8", 42 * 768 - 100)
    elif damage == "manifest":
        (entry / "manifest.json").write_text('{"format": "upi_fast image cache", "complete": tr')
    elif damage == "labels":
        np.zeros(42, np.int64).tofile(entry / "labels.i64")
    else:
        with open(entry / "digests.bin", "r+b") as fh:
            fh.seek(16 * 9)
            fh.write(b"\x01" * 16)
    if damage == "digest":  # the bytes still match the manifest's chunk checksum: the digest is repaired
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = CachedImageDataset(image_folder(data, size=16), tmp_path / "cache", chunk=8)
        assert again.complete and (entry / "digests.bin").read_bytes()[16 * 9:16 * 10] != b"\x01" * 16
    else:
        with pytest.warns(CacheRebuiltWarning, match="rebuilding"):
            again = CachedImageDataset(image_folder(data, size=16), tmp_path / "cache", chunk=8)
    _assert_same(_items(again), want)
    assert again.complete and (entry / "images.u8").stat().st_size == 42 * 768


def test_damaged_partial_cache_redecodes_the_bad_image(data, tmp_path):
    ds = image_folder(data, size=16)
    cached = CachedImageDataset(ds, tmp_path / "cache")
    for i in (0, 5, 6):
        cached[i]
    with open(cached.entry / "images.u8", "r+b") as fh:
        fh.seek(5 * 768)
        fh.write(b"\xff" * 4)
    with pytest.warns(CacheRebuiltWarning, match="do not match their digests"):
        again = CachedImageDataset(image_folder(data, size=16), tmp_path / "cache")
    _assert_same([again[i] for i in (0, 5, 6)], [ds[i] for i in (0, 5, 6)])


def test_cifar_cached_exactly(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": rng.integers(0, 256, (9, 3072), dtype=np.uint8), b"labels": list(range(9))}, fh)
    ds = cifar10(folder, size=40, mean=MEAN, std=STD)
    cached = CachedImageDataset(ds, tmp_path / "cache")
    _assert_same(_items(cached), _items(ds))
    assert cached.complete and cached.shape == (3, 32, 32)  # the stored rows; resized on read as the reader does
    assert type(open_cached_dataset(folder, tmp_path / "cache", size=40)) is CachedImageDataset
    assert type(open_cached_dataset(folder, None)) is not CachedImageDataset


def test_bad_arguments_name_themselves(data, tmp_path):
    from torchvision import transforms as T
    ds = image_folder(data, size=8)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cache_dir .* is a file"):
        CachedImageDataset(ds, tmp_path / "file")
    with pytest.raises(TypeError, match="cache_dir must be"):
        CachedImageDataset(ds, 3)
    with pytest.raises(ValueError, match="chunk must be"):
        CachedImageDataset(ds, tmp_path / "c", chunk=0)
    with pytest.raises(ValueError, match="verify must be"):
        CachedImageDataset(ds, tmp_path / "c", verify="never")
    with pytest.raises(TypeError, match="dataset must be"):
        CachedImageDataset(torch.utils.data.TensorDataset(torch.zeros(2, 3)), tmp_path / "c")
    ds.transform = T.Compose([T.RandomCrop(8), T.ToTensor()])
    with pytest.raises(ValueError, match="dataset: its transform must be"):
        CachedImageDataset(ds, tmp_path / "c")
    with pytest.raises(ValueError, match="workers must be"):
        CachedImageDataset(image_folder(data, size=8), tmp_path / "c").fill(workers=-1)


# --------------------------------------------------------------------------------------------- CLI
class _ColourNet(nn.Module):
    """Predicts the brightest channel (the fixture's class), smoothly."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 3)
        with torch.no_grad():
            self.head.weight.copy_(20 * torch.eye(3))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(nn.functional.softplus(x.mean(dim=(2, 3)) * 4) / 4)


def colour_model():
    return _ColourNet().eval()


def _compute(argv):
    from upi_fast.cli import main
    out, err = _io.StringIO(), _io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def test_cli_cache_round_trip(data, tmp_path, monkeypatch):
    from upi_fast.io import load_perturbation
    cache = tmp_path / "cache"

    def argv(out, *extra):
        return ["compute", "--data", data, "--model", "test_data_cache:colour_model", "--size", "16", "--eps-pixels",
                "8", "--epochs", "2", "--attack-samples", "8", "--eval-samples", "10", "--batch-size", "4",
                "--no-progress", "--out", tmp_path / out, *extra]

    rc, _, err = _compute(argv("plain"))
    assert rc == 0, err
    rc, _, err = _compute(argv("first", "--cache", cache))
    assert rc == 0, err
    (entry,) = cache.iterdir()
    assert (entry / "images.u8").stat().st_size == 42 * 768
    _no_decode(monkeypatch)  # the second run reads every image it needs from the cache
    rc, _, err = _compute(argv("second", "--cache", cache))
    assert rc == 0, err
    deltas = [load_perturbation(tmp_path / d / "upi.safetensors")[0] for d in ("plain", "first", "second")]
    assert torch.equal(deltas[0], deltas[1]) and torch.equal(deltas[1], deltas[2])
    (tmp_path / "afile").write_text("x")
    rc, _, err = _compute(argv("bad", "--cache", tmp_path / "afile"))
    assert rc == 2 and "--cache" in err and "is a file" in err
