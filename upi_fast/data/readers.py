"""Dataset readers: the embedded digits default, normalisation options, ImageFolder and
CIFAR-10 python batches (one file at a time) (:mod:`upi_fast.data`)."""
from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._checks import check_positive
from .unpickle import UnsafePickleError, safe_pickle_load


#: Side of the square an ImageFolder's images are resized / centre-cropped to when no ``size`` is given:
#: 224, the input size torchvision's ImageNet classifiers were trained at.
DEFAULT_IMAGE_FOLDER_SIZE = 224


# --------------------------------------------------------------------------------------------- digits
class TensorSplit(NamedTuple):
    """One split held in memory: ``X`` float32 (N, C, H, W), ``y`` int64 (N,). Unpacks as ``X, y``."""
    X: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class DigitsSplits:
    """The digits data, split. ``indices[name]`` are the rows of ``load_digits()`` in each split
    (disjoint; each sorted). ``mean`` / ``std`` are per channel over the train split, for the
    record only: the images are *not* normalised (model units = [0, 1] pixel scale, black = 0)."""
    train: TensorSplit
    attack: TensorSplit
    eval: TensorSplit
    indices: dict
    num_classes: int
    input_shape: tuple
    mean: tuple
    std: tuple
    size: int
    seed: int


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.ascontiguousarray(d.images, dtype=np.float32) / 16.0  # 0..16 -> [0, 1]
    images.setflags(write=False)
    target = np.asarray(d.target, dtype=np.int64)
    target.setflags(write=False)
    return images, target


def digits(size: int = 16, seed: int = 0) -> DigitsSplits:
    """scikit-learn's bundled digits as float32 tensors (N, 1, size, size) in [0, 1], int64 labels.

    The 8 x 8 images (values 0..16) are divided by 16 and resized to ``size`` x ``size`` with
    bilinear interpolation (``align_corners=False``, no antialiasing; each output pixel is a convex
    combination of input pixels, so values stay in [0, 1]). ``size=8`` keeps the originals.

    The 1797 samples are split by a random permutation drawn from ``seed`` into train (60%),
    attack (20%) and eval (the rest, ~20%): 1078 / 359 / 360. Same ``seed``, same splits.
    """
    check_positive("size", size, integer=True)
    if size < 4:
        raise ValueError(f"size must be >= 4, got {size}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    images, target = _digits_raw()
    X = torch.from_numpy(images.copy()).unsqueeze(1)
    if size != X.shape[-1]:
        X = F.interpolate(X, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    X = X.contiguous()
    y = torch.from_numpy(target.copy())
    n = X.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_attack = round(0.6 * n), round(0.2 * n)
    parts = {"train": perm[:n_train], "attack": perm[n_train:n_train + n_attack], "eval": perm[n_train + n_attack:]}
    parts = {k: v.sort().values for k, v in parts.items()}
    splits = {k: TensorSplit(X[v].contiguous(), y[v].contiguous()) for k, v in parts.items()}
    Xt = splits["train"].X
    return DigitsSplits(
        train=splits["train"], attack=splits["attack"], eval=splits["eval"], indices=parts,
        num_classes=10, input_shape=(1, size, size),
        mean=tuple(Xt.mean(dim=(0, 2, 3)).tolist()), std=tuple(Xt.std(dim=(0, 2, 3)).tolist()),
        size=size, seed=seed,
    )


# --------------------------------------------------------------------------------------------- normalisation
def _check_mean_std(mean, std, channels: int | None = None) -> tuple[tuple | None, tuple | None]:
    """``mean`` and ``std`` both None, or both sequences of the same length (``channels`` when
    given, a single value is broadcast), ``std`` > 0."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError("mean and std must be given together (or neither)")
    out = []
    for name, v in (("mean", mean), ("std", std)):
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().reshape(-1).tolist()
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v]
        try:
            v = tuple(float(t) for t in v)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a sequence of numbers, got {v!r}") from None
        if not v or not all(np.isfinite(v)):
            raise ValueError(f"{name} must be a non-empty sequence of finite numbers, got {v!r}")
        if channels is not None and len(v) == 1 and channels > 1:
            v = v * channels
        if channels is not None and len(v) != channels:
            raise ValueError(f"{name} must have {channels} values (one per channel), got {len(v)}")
        out.append(v)
    mean, std = out
    if len(mean) != len(std):
        raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be > 0, got {std}")
    return mean, std


# --------------------------------------------------------------------------------------------- ImageFolder
def image_folder(root: str | os.PathLike, size: int = 224, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> Dataset:
    """A torchvision ``ImageFolder`` over ``root/<class>/<image>`` files, classes sorted by name.

    Each image is read when indexed, converted to RGB, resized so its shorter side is ``size``,
    centre-cropped to ``size`` x ``size``, scaled to [0, 1] and, when ``mean`` / ``std`` (3 values
    each) are given, normalised ``(x - mean) / std``. Items are ``(float32 (3, size, size), int)``.
    """
    from torchvision import datasets, transforms

    root = _existing_dir(root)
    check_positive("size", size, integer=True)
    mean, std = _check_mean_std(mean, std, channels=3)
    tf = [transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()]
    if mean is not None:
        tf.append(transforms.Normalize(mean, std))
    return datasets.ImageFolder(str(root), transform=transforms.Compose(tf))


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)


def _cifar_dir(root: Path) -> Path | None:
    """The folder holding the CIFAR-10 python batch files: ``root`` or ``root/cifar-10-batches-py``."""
    for d in (root, root / "cifar-10-batches-py"):
        if d.is_dir() and any((d / f).is_file() for f in _CIFAR_TRAIN + _CIFAR_TEST):
            return d
    return None


def _get(d: dict, key: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    return None


class CIFAR10Batches(Dataset):
    """CIFAR-10 in its python format (``data_batch_1..5`` / ``test_batch`` pickles), read safely.

    At construction each batch file is read once, in turn, to learn its length and keep its labels
    (one file in memory at a time). Indexing loads the batch file holding the item (30 MB for the
    official files) and keeps it until an item of another file is asked for: reading in index
    order (as :func:`make_loader` does with the sorted indices of :func:`split_indices`) reads each
    file once per pass; batches fetched by a DataLoader are grouped by file (``__getitems__``).

    Items are ``(float32 (3, size, size) in [0, 1] or normalised, int)``.
    """

    def __init__(self, root: str | os.PathLike, train: bool = False, size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        root = _existing_dir(root)
        folder = _cifar_dir(root)
        if folder is None:
            raise FileNotFoundError(f"no CIFAR-10 python batch files (data_batch_1..5, test_batch) in {str(root)!r} "
                                    f"or {str(root / 'cifar-10-batches-py')!r}")
        names = _CIFAR_TRAIN if train else _CIFAR_TEST
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"CIFAR-10 folder {str(folder)!r} lacks {', '.join(missing)}")
        if size is not None:
            check_positive("size", size, integer=True)
        self.size = size
        self.mean, self.std = _check_mean_std(mean, std, channels=3)
        self.files = [folder / n for n in names]
        self.train = train
        labels, self._starts = [], [0]
        for f in self.files:
            data, lab = self._read(f)
            labels.append(lab)
            self._starts.append(self._starts[-1] + len(lab))
        self.targets = torch.cat(labels)
        self._loaded: tuple[int, np.ndarray] | None = (len(self.files) - 1, data)
        if mean is not None:
            self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
            self._std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        self.classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    @staticmethod
    def _read(path: Path) -> tuple[np.ndarray, torch.Tensor]:
        try:
            d = safe_pickle_load(path)
        except pickle.UnpicklingError as e:  # a refused global, or a corrupt pickle
            raise UnsafePickleError(f"{str(path)!r}: {e}") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
            raise ValueError(f"{str(path)!r} is not a readable CIFAR-10 batch file: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{str(path)!r} is not a CIFAR-10 batch file (expected a dict, got {type(d).__name__})")
        data, labels = _get(d, "data"), _get(d, "labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise ValueError(f"{str(path)!r}: 'data' must be a uint8 array (N, 3072), got {desc}")
        try:
            labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        except (TypeError, ValueError):
            raise ValueError(f"{str(path)!r}: 'labels' must be a list of integers") from None
        if labels.dim() != 1 or labels.shape[0] != data.shape[0]:
            raise ValueError(f"{str(path)!r}: {data.shape[0]} images but labels of shape {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
            raise ValueError(f"{str(path)!r}: labels outside 0..9")
        return data, labels

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self) -> dict:
        """Pickled (e.g. for spawned DataLoader workers) without the loaded batch file."""
        state = self.__dict__.copy()
        state["_loaded"] = None
        return state

    def _locate(self, index: int) -> tuple[int, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f, index - self._starts[f]

    def _batch(self, f: int) -> np.ndarray:
        if self._loaded is None or self._loaded[0] != f:
            self._loaded = None  # release the previous file before reading the next
            self._loaded = (f, self._read(self.files[f])[0])
        return self._loaded[1]

    def _image(self, row: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(row.astype(np.float32)).view(3, 32, 32).div_(255.0)
        if self.size is not None and self.size != 32:
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        if self.mean is not None:
            x = (x - self._mean_t) / self._std_t
        return x

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        f, i = self._locate(int(index))
        return self._image(self._batch(f)[i]), int(self.targets[self._starts[f] + i])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        located = [self._locate(int(i)) for i in indices]
        out: list = [None] * len(located)
        order = sorted(range(len(located)), key=lambda j: (located[j][0] != (self._loaded or (-1,))[0], located[j]))
        for j in order:
            f, i = located[j]
            out[j] = (self._image(self._batch(f)[i]), int(self.targets[self._starts[f] + i]))
        return out


def cifar10(root: str | os.PathLike, train: bool = False, mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None, size: int | None = None) -> Dataset:
    """CIFAR-10 (python format) under ``root`` or ``root/cifar-10-batches-py``: the test batch
    (10,000 images) by default, the five training batches with ``train=True``. Pickles are read
    with :class:`RestrictedUnpickler`. See :class:`CIFAR10Batches`."""
    return CIFAR10Batches(root, train=train, size=size, mean=mean, std=std)

def _existing_dir(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset path not found: {str(p)!r}")
    if not p.is_dir():
        raise ValueError(f"dataset path {str(p)!r} is a file, expected a folder (extract archives first)")
    return p
