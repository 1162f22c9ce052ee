"""Datasets: digits splits, fake ImageFolder / CIFAR-10 folders, safe unpickling, loaders, as_batches."""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from upi_fast.data import (CIFAR10Batches, DigitsSplits, TensorSplit, as_batches, cifar10, digits, image_folder,
                           make_loader, open_dataset, safe_pickle_load, split_indices)


# --------------------------------------------------------------------------------------------- digits
def test_digits_splits_shapes_and_range():
    d = digits(size=16, seed=0)
    assert isinstance(d, DigitsSplits)
    assert d.num_classes == 10 and d.input_shape == (1, 16, 16)
    sizes = [d.train.X.shape[0], d.attack.X.shape[0], d.eval.X.shape[0]]
    assert sum(sizes) == 1797 and sizes == [1078, 359, 360]
    for s in (d.train, d.attack, d.eval):
        assert isinstance(s, TensorSplit)
        X, y = s  # unpacks as a tuple
        assert X.dtype == torch.float32 and X.shape[1:] == (1, 16, 16)
        assert y.dtype == torch.int64 and y.shape == (X.shape[0],)
        assert float(X.min()) >= 0.0 and float(X.max()) <= 1.0
    assert set(d.train.y.tolist()) == set(range(10))
    assert len(d.mean) == 1 and len(d.std) == 1 and 0 < d.mean[0] < 1 and d.std[0] > 0


def test_digits_disjoint_and_deterministic():
    a, b, c = digits(seed=0), digits(seed=0), digits(seed=1)
    idx = a.indices
    sets = [set(idx[k].tolist()) for k in ("train", "attack", "eval")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) == set(range(1797))
    for k in ("train", "attack", "eval"):
        assert torch.equal(a.indices[k], b.indices[k])
        assert torch.equal(getattr(a, k).X, getattr(b, k).X) and torch.equal(getattr(a, k).y, getattr(b, k).y)
    assert not torch.equal(a.indices["eval"], c.indices["eval"])


def test_digits_matches_sklearn_at_native_size():
    from sklearn.datasets import load_digits
    raw = load_digits()
    d = digits(size=8)
    i = d.indices["eval"]
    assert torch.allclose(d.eval.X[:, 0], torch.from_numpy(raw.images[i.numpy()] / 16.0).float())
    assert torch.equal(d.eval.y, torch.from_numpy(raw.target[i.numpy()]).long())
    up = digits(size=16)  # bilinear upsampling keeps the mean brightness close
    assert abs(up.eval.X.mean().item() - d.eval.X.mean().item()) < 0.02


def test_digits_bad_args():
    with pytest.raises(TypeError, match="size"):
        digits(size=16.0)
    with pytest.raises(ValueError, match="size"):
        digits(size=2)


# --------------------------------------------------------------------------------------------- fake folders
def _image_folder(root, classes=("cat", "dog"), per_class=3, size=(20, 14)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def _cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"fake batch", b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(n)]}


def _cifar_folder(root, train_sizes=(4, 3, 5, 2, 3), test_size=6, protocol=pickle.DEFAULT_PROTOCOL, nested=True):
    folder = root / "cifar-10-batches-py" if nested else root
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    names = [f"data_batch_{i + 1}" for i in range(len(train_sizes))] + (["test_batch"] if test_size else [])
    for k, (name, n) in enumerate(zip(names, list(train_sizes) + [test_size])):
        batches[name] = _cifar_batch(n, k)
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f, protocol=protocol)
    return batches


def test_image_folder(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    ds = image_folder(root, size=8)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    x, y = ds[4]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 1
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    dn = image_folder(root, size=8, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert torch.allclose(dn[4][0], (x - 0.5) / 0.25, atol=1e-6)
    with pytest.raises(ValueError, match="3 values"):
        image_folder(root, size=8, mean=[0.5, 0.5], std=[1, 1])
    with pytest.raises(ValueError, match="together"):
        image_folder(root, size=8, mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="std must be > 0"):
        image_folder(root, size=8, mean=[0.5] * 3, std=[1, 0, 1])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reads_pickles(tmp_path, protocol):
    batches = _cifar_folder(tmp_path, protocol=protocol)
    test = cifar10(tmp_path)  # finds root/cifar-10-batches-py
    assert isinstance(test, CIFAR10Batches) and len(test) == 6
    ref = batches["test_batch"]
    x, y = test[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == ref[b"labels"][2]
    assert torch.allclose(x, torch.from_numpy(ref[b"data"][2].astype(np.float32) / 255).view(3, 32, 32))
    train = cifar10(tmp_path / "cifar-10-batches-py", train=True, mean=[0.5] * 3, std=[0.5] * 3)
    assert len(train) == 17
    all_labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train.targets.tolist() == all_labels
    # item 9 is the 3rd image of data_batch_3 (sizes 4, 3, 5, ...)
    x9, y9 = train[9]
    raw = batches["data_batch_3"][b"data"][2].astype(np.float32) / 255
    assert y9 == all_labels[9]
    assert torch.allclose(x9, (torch.from_numpy(raw).view(3, 32, 32) - 0.5) / 0.5)
    assert torch.equal(train[-1][0], train[16][0])
    clone = pickle.loads(pickle.dumps(train))  # what a spawned worker receives: no image data
    assert clone._loaded is None and torch.equal(clone[9][0], x9)
    with pytest.raises(IndexError):
        train[17]


def test_cifar10_loader_groups_by_file_and_resizes(tmp_path):
    _cifar_folder(tmp_path, nested=False)
    ds = cifar10(tmp_path, train=True, size=16)
    reads = []
    orig = ds._read
    ds._read = lambda p: (reads.append(p.name), orig(p))[1]
    idx = torch.tensor([14, 0, 9, 1, 15, 5])
    loader = make_loader(ds, idx, batch_size=6)
    (x, y), = list(loader)
    # sizes 4, 3, 5, 2, 3: the batch touches files 5 (loaded last at construction), 1, 3, 2;
    # each is read at most once, the loaded one first
    assert reads == ["data_batch_1", "data_batch_2", "data_batch_3"]
    assert x.shape == (6, 3, 16, 16)
    assert y.tolist() == [int(ds.targets[i]) for i in idx]
    for k, i in enumerate(idx.tolist()):
        assert torch.allclose(x[k], ds[i][0])


def test_malicious_cifar_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        cifar10(folder)
    with pytest.raises(pickle.UnpicklingError):
        open_dataset(folder)
    assert not marker.exists()
    # other dangerous globals, and _codecs.encode with a codec other than latin-1
    for payload in (pickle.dumps(Evil(), protocol=0),
                    b"c__builtin__\neval\n(Vprint(1)\ntR.",
                    b"c_codecs\nencode\n(Vx\nVrot13\ntR."):
        (folder / "test_batch").write_bytes(payload)
        with pytest.raises(pickle.UnpicklingError):
            safe_pickle_load(folder / "test_batch")
    assert not marker.exists()


def test_cifar_malformed_batches(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"uint8 array \(N, 3072\)"):
        cifar10(folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f)
    with pytest.raises(ValueError, match="labels"):
        cifar10(folder)
    (folder / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises((ValueError, pickle.UnpicklingError)):
        cifar10(folder)
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        cifar10(folder, train=True)


def test_open_dataset_detection(tmp_path):
    _cifar_folder(tmp_path / "cif")
    ds = open_dataset(tmp_path / "cif")
    assert isinstance(ds, CIFAR10Batches) and len(ds) == 6 and not ds.train
    _cifar_folder(tmp_path / "trainonly", test_size=0, nested=False)
    assert open_dataset(tmp_path / "trainonly").train
    _image_folder(tmp_path / "imgs")
    ds2 = open_dataset(tmp_path / "imgs", size=12)
    assert len(ds2) == 6 and ds2[0][0].shape == (3, 12, 12)
    assert open_dataset(tmp_path / "imgs")[0][0].shape == (3, 224, 224)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        open_dataset(tmp_path / "does_not_exist")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "file.tar.gz").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        open_dataset(tmp_path / "file.tar.gz")


# --------------------------------------------------------------------------------------------- splits, loaders
def test_split_indices():
    a, e = split_indices(100, 30, 20, seed=3)
    assert a.dtype == torch.int64 and a.shape == (30,) and e.shape == (20,)
    assert not set(a.tolist()) & set(e.tolist())
    assert torch.equal(a, a.sort().values) and 0 <= int(a.min()) and int(e.max()) < 100
    a2, e2 = split_indices(100, 30, 20, seed=3)
    assert torch.equal(a, a2) and torch.equal(e, e2)
    assert not torch.equal(split_indices(100, 30, 20, seed=4)[0], a)
    full_a, full_e = split_indices(10, 4, 6)
    assert sorted(full_a.tolist() + full_e.tolist()) == list(range(10))
    with pytest.raises(ValueError, match="exceeds"):
        split_indices(10, 6, 5)
    with pytest.raises(ValueError, match="> 0"):
        split_indices(10, 0, 5)
    with pytest.raises(TypeError, match="attack"):
        split_indices(10, 2.5, 5)


def test_make_loader_deterministic():
    ds = TensorDataset(torch.arange(50.0).view(50, 1, 1, 1), torch.arange(50))
    idx = torch.arange(10, 40)
    l1 = make_loader(ds, idx, batch_size=7, shuffle=True, seed=1)
    l2 = make_loader(ds, idx, batch_size=7, shuffle=True, seed=1)
    o1, o1b = (torch.cat([y for _, y in l1]) for _ in range(2))  # two epochs: reshuffled
    o2, o2b = (torch.cat([y for _, y in l2]) for _ in range(2))
    assert torch.equal(o1, o2) and torch.equal(o1b, o2b) and not torch.equal(o1, o1b)
    assert sorted(o1.tolist()) == list(range(10, 40)) and o1.tolist() != list(range(10, 40))
    plain = torch.cat([y for _, y in make_loader(ds, idx, batch_size=7)])
    assert plain.tolist() == list(range(10, 40))
    with pytest.raises(ValueError, match="indices must lie"):
        make_loader(ds, torch.tensor([0, 50]), batch_size=2)
    with pytest.raises(ValueError, match="1-D sequence of integers"):
        make_loader(ds, torch.tensor([0.5]), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, idx, batch_size=0)


def test_as_batches_tensors_and_loader():
    X, y = torch.rand(10, 1, 4, 4), torch.arange(10)
    got = list(as_batches((X, y), 4))
    assert [b[0].shape[0] for b in got] == [4, 4, 2]
    assert torch.equal(torch.cat([b[0] for b in got]), X) and torch.equal(torch.cat([b[1] for b in got]), y)
    assert len(list(as_batches(TensorSplit(X, y), 10))) == 1
    loader = DataLoader(TensorDataset(X, y), batch_size=3)
    assert [b[1].tolist() for b in as_batches(loader, 999)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_as_batches_errors_name_data():
    X, y = torch.rand(10, 1, 4, 4), torch.arange(10)
    with pytest.raises(ValueError, match=r"data images must have shape \(B, C, H, W\)"):
        as_batches((X[:, 0], y), 4)
    with pytest.raises(TypeError, match="data images must be a floating"):
        as_batches((X.long(), y), 4)
    with pytest.raises(ValueError, match=r"data labels must have shape \(10,\)"):
        as_batches((X, y[:9]), 4)
    with pytest.raises(TypeError, match="data labels must hold integer"):
        as_batches((X, y.float()), 4)
    with pytest.raises(ValueError, match="data images is empty"):
        as_batches((X[:0], y[:0]), 4)
    with pytest.raises(TypeError, match="data must be a DataLoader"):
        as_batches(X, 4)
    bad = DataLoader(TensorDataset(X, y.float()), batch_size=5)
    with pytest.raises(TypeError, match="data batch 0 labels"):
        list(as_batches(bad, 5))
    triple = DataLoader(TensorDataset(X, y, y), batch_size=5)
    with pytest.raises(TypeError, match=r"\(x, y\) pairs"):
        list(as_batches(triple, 5))
