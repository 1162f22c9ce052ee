"""Datasets: the embedded digits default and local real datasets, streamed.

Nothing here downloads anything.

* :func:`digits`: scikit-learn's bundled handwritten digits (1797 grey 8 x 8 images), scaled to
  [0, 1] and upsampled bilinearly, split once into disjoint train / attack / eval tensors.
* :func:`image_folder`, :func:`cifar10`, :func:`open_dataset`: map-style datasets over files on
  disk that read one image (ImageFolder) or one CIFAR-10 batch file (CIFAR) at a time.
* :func:`split_indices`, :func:`make_loader`: deterministic disjoint attack / eval subsets and
  their loaders; :func:`as_batches`: one iterator over ``(x, y)`` batches for tensors or loaders.
* :func:`epoch_order`, :func:`global_batches`, :class:`ShareSampler`, :func:`share_loader`: the
  data-parallel, resumable reading order: each epoch's order is a pure function of
  ``(seed, epoch)``, cut into global batches; each process loads only its contiguous share of
  every global batch, from any batch index on.

Images are float32 (C, H, W) in the model's input units: [0, 1] pixel scale, or ``(x - mean) / std``
when a normalisation is given here.
"""
from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ._checks import check_images, check_labels, check_positive

__all__ = ["TensorSplit", "DigitsSplits", "digits", "image_folder", "cifar10", "CIFAR10Batches",
           "open_dataset", "split_indices", "make_loader", "as_batches", "RestrictedUnpickler", "UnsafePickleError",
           "safe_pickle_load",
           "derive_seed", "epoch_order", "global_batches", "ShareSampler", "share_loader",
           "DEFAULT_IMAGE_FOLDER_SIZE", "dataset_num_classes", "stored_image_sizes", "resize_note"]

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


# --------------------------------------------------------------------------------------------- CIFAR-10
def _numpy_reconstructors() -> dict:
    """The array-rebuilding callables a pickled numpy array refers to, under all their names
    (numpy 1.x ``numpy.core``, numpy 2.x ``numpy._core``), mapped to the objects themselves so
    that no module is imported while unpickling."""
    a = np.zeros(1, dtype=np.uint8)
    reconstruct = a.__reduce__()[0]        # multiarray._reconstruct (pickle protocols 0..4)
    frombuffer = a.__reduce_ex__(5)[0]     # numeric._frombuffer (pickle protocol 5)
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{pkg}.numeric", "_frombuffer")] = frombuffer
    return allowed


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    """Stand-in for ``_codecs.encode``, which Python 3 pickles of bytes at protocol < 3 refer to;
    only the latin-1 codec is allowed."""
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode({type(obj).__name__}, {encoding!r})")
    return obj.encode("latin-1", errors)


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A data pickle that refers to a global outside the allowed set (or is corrupt): nothing was
    executed. Both a ``pickle.UnpicklingError`` and a ``ValueError``."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers of numbers, strings, bytes and numpy arrays, nothing else.

    ``find_class`` resolves only numpy's array reconstruction helpers (``_reconstruct``,
    ``_frombuffer``, ``ndarray``, ``dtype``, under their numpy 1 and 2 module names) and a
    latin-1-only ``_codecs.encode``; any other global raises :class:`UnsafePickleError` (a
    ``pickle.UnpicklingError`` and a ``ValueError``), so a
    pickle cannot call arbitrary code.
    """

    _ALLOWED: dict | None = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._ALLOWED is None:
            allowed = _numpy_reconstructors()
            allowed[("_codecs", "encode")] = _latin1_encode
            RestrictedUnpickler._ALLOWED = allowed
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load global {module}.{name} from a data pickle") from None


def safe_pickle_load(path: str | os.PathLike, encoding: str = "bytes"):
    """Load a data pickle with :class:`RestrictedUnpickler` (Python 2 strings decoded per ``encoding``)."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding=encoding).load()


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


# --------------------------------------------------------------------------------------------- auto-detection
def _existing_dir(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"dataset path not found: {str(p)!r}")
    if not p.is_dir():
        raise ValueError(f"dataset path {str(p)!r} is a file, expected a folder (extract archives first)")
    return p


def _is_image_folder(root: Path) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS
    for sub in root.iterdir():
        if sub.is_dir():
            for dirpath, _, files in os.walk(sub, followlinks=True):
                if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
                    return True
    return False


def open_dataset(path: str | os.PathLike, size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> Dataset:
    """Open a local dataset folder, detecting its kind.

    * a CIFAR-10 python folder (``test_batch`` / ``data_batch_*`` in ``path`` or in
      ``path/cifar-10-batches-py``): its test batch when present, else its training batches;
      images 32 x 32, resized bilinearly when ``size`` is given;
    * an ImageFolder (``path/<class>/<images>``): see :func:`image_folder`, ``size`` 224 by default.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ValueError: ``path`` is a file, or a folder that is neither kind.
    """
    root = _existing_dir(path)
    folder = _cifar_dir(root)
    if folder is not None:
        train = not (folder / _CIFAR_TEST[0]).is_file()
        return cifar10(root, train=train, mean=mean, std=std, size=size)
    if _is_image_folder(root):
        return image_folder(root, size=DEFAULT_IMAGE_FOLDER_SIZE if size is None else size, mean=mean, std=std)
    raise ValueError(f"{str(root)!r} is neither a CIFAR-10 python folder (data_batch_1..5 / test_batch) nor an "
                     f"ImageFolder (one sub-folder of images per class)")


def dataset_num_classes(dataset: Dataset) -> int | None:
    """How many classes a dataset from :func:`open_dataset` has: an ImageFolder's class folders,
    CIFAR-10's 10; None when the dataset does not say."""
    if isinstance(dataset, CIFAR10Batches):
        return 10
    classes = getattr(dataset, "classes", None)
    return len(classes) if isinstance(classes, (list, tuple)) and classes else None


def stored_image_sizes(dataset: Dataset, limit: int = 64) -> list[tuple[int, int]]:
    """The distinct (width, height) of the first ``limit`` images as stored on disk (read from the
    image headers only), in order of first appearance; CIFAR-10: [(32, 32)]; [] when unknown."""
    if isinstance(dataset, CIFAR10Batches):
        return [(32, 32)]
    samples = getattr(dataset, "samples", None)
    if not isinstance(samples, list):
        return []
    from PIL import Image
    sizes: list[tuple[int, int]] = []
    for path, _ in samples[:limit]:
        try:
            with Image.open(path) as im:
                wh = tuple(im.size)
        except OSError:
            continue
        if wh not in sizes:
            sizes.append(wh)
    return sizes


def resize_note(dataset: Dataset, size: int | None, why: str) -> str | None:
    """One line saying that (and how) :func:`open_dataset` resizes the images, e.g. ``"resizing
    images from 64x64 to 224x224 (WHY)"``; None when they are used at their stored size. ``size``
    is what was passed to :func:`open_dataset`; ``why`` says where it came from."""
    if size is None and isinstance(dataset, CIFAR10Batches):
        return None
    to = DEFAULT_IMAGE_FOLDER_SIZE if size is None else size
    sizes = stored_image_sizes(dataset)
    if not sizes or sizes == [(to, to)]:
        return None
    if len(sizes) == 1:
        src = f"{sizes[0][0]}x{sizes[0][1]}"
    else:
        src = f"{len(sizes)} sizes ({', '.join(f'{w}x{h}' for w, h in sizes[:3])}{', ...' if len(sizes) > 3 else ''})"
    how = "" if isinstance(dataset, CIFAR10Batches) else "shorter side, then centre crop; "
    return f"resizing images from {src} to {to}x{to} ({how}{why})"


# --------------------------------------------------------------------------------------------- splits, loaders
def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def split_indices(n: int, attack: int, eval: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint random index sets ``(attack_idx, eval_idx)`` into a dataset of ``n`` items.

    Drawn from one permutation of ``range(n)`` seeded by ``seed`` (same arguments, same sets);
    each returned int64 tensor is sorted, so that reading it in order touches storage sequentially.
    """
    n, attack, eval, seed = (_check_int(k, v) for k, v in (("n", n), ("attack", attack), ("eval", eval), ("seed", seed)))
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if attack <= 0 or eval <= 0:
        raise ValueError(f"attack and eval must both be > 0, got attack={attack}, eval={eval}")
    if attack + eval > n:
        raise ValueError(f"attack + eval = {attack + eval} exceeds the dataset size n = {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:attack].sort().values, perm[attack:attack + eval].sort().values


def make_loader(dataset: Dataset, indices: Sequence[int] | torch.Tensor, batch_size: int, workers: int = 0,
                shuffle: bool = False,
                seed: int = 0) -> DataLoader:
    """A DataLoader over ``Subset(dataset, indices)``, deterministic: the shuffling order (when
    ``shuffle``) and the worker seeds come from a generator seeded with ``seed``. Keeps the last,
    smaller batch."""
    check_positive("batch_size", batch_size, integer=True)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    seed = _check_int("seed", seed)
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset must be a map-style Dataset (with __getitem__ and __len__), got {type(dataset).__name__}")
    idx = torch.as_tensor(indices)
    if idx.dim() != 1 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"indices must be a 1-D sequence of integers, got {idx.dtype} of shape {tuple(idx.shape)}")
    if idx.numel() == 0:
        raise ValueError("indices is empty")
    n = len(dataset)
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"indices must lie in [0, {n - 1}] for a dataset of {n} items, "
                         f"got min {int(idx.min())}, max {int(idx.max())}")
    return DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, shuffle=bool(shuffle),
                      num_workers=workers, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=False, drop_last=False)


def _check_batch(x, y, where: str) -> None:
    check_images(f"{where} images", x)
    check_labels(f"{where} labels", y, x.shape[0])


def as_batches(data: DataLoader | tuple[torch.Tensor, torch.Tensor],
               batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate over ``(x, y)`` batches of ``data``.

    ``data`` is a DataLoader (its own batches, in its order; ``batch_size`` is ignored, each batch
    checked as it arrives), a ``(X, y)`` tuple / list of tensors or a :class:`TensorSplit`
    (sliced into ``batch_size`` chunks, in order, checked up front): X a finite floating
    (N, C, H, W) tensor, y integer (N,), N >= 1.
    """
    if isinstance(data, DataLoader):
        return _loader_batches(data)
    check_positive("batch_size", batch_size, integer=True)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        X, y = data
    else:
        raise TypeError(f"data must be a DataLoader, a TensorSplit or a tuple (X, y) of tensors, "
                        f"got {type(data).__name__}")
    _check_batch(X, y, "data")
    return _tensor_batches(X, y, batch_size)


def _tensor_batches(X: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, X.shape[0], batch_size):
        yield X[i:i + batch_size], y[i:i + batch_size]


def _loader_batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for k, batch in enumerate(loader):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"data (a DataLoader) must yield (x, y) pairs, batch {k} is a {type(batch).__name__}"
                            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        x, y = batch
        _check_batch(x, y, f"data batch {k}")
        yield x, y


# --------------------------------------------------------------------------------------------- data-parallel order
_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, *parts: int) -> int:
    """A seed in ``[0, 2^63)`` that is a pure function of ``seed`` and ``parts`` (SplitMix64 mixing,
    order-sensitive), e.g. ``derive_seed(seed, epoch)`` for an epoch's order: no generator is carried
    across epochs, so a resumed run regenerates the order of any epoch."""
    h = _splitmix64((int(seed) + 0x9E3779B97F4A7C15) & _MASK64)
    for p in (*parts, len(parts)):
        h = _splitmix64((h + 0x9E3779B97F4A7C15 + (int(p) & _MASK64)) & _MASK64)
    return h >> 1


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The reading order (int64, (n,)) of epoch ``epoch``: ``0..n-1``, or with ``shuffle`` a random
    permutation drawn from ``derive_seed(seed, epoch)`` on the CPU (the same on every device)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))


def global_batches(order: torch.Tensor, batch_size: int, drop_last: bool = False) -> list[torch.Tensor]:
    """``order`` cut into consecutive global batches of ``batch_size`` (the last one smaller unless
    ``drop_last``)."""
    check_positive("batch_size", batch_size, integer=True)
    n = order.numel()
    stop = n - n % batch_size if drop_last else n
    return [order[i:min(i + batch_size, stop)] for i in range(0, stop, batch_size)]


class ShareSampler(Sampler):
    """Batch sampler: this process's contiguous share of each global batch, from batch ``start`` on.

    The share of rank ``r`` of a global batch of size ``s`` is its items ``[r s // w, (r + 1) s // w)``.
    Empty shares (``s < w``) are skipped, so the loader yields one batch per *non-empty* share; the
    caller pairs them with the plan (:meth:`shares`)."""

    def __init__(self, batches: Sequence[torch.Tensor], rank: int = 0, world: int = 1, start: int = 0) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world - 1], got rank {rank}, world {world}")
        self.batches, self.rank, self.world, self.start = batches, rank, world, start

    def shares(self) -> Iterator[tuple[int, int, int]]:
        """``(batch index, lo, hi)`` of this rank's share of every global batch from ``start`` on."""
        for k in range(self.start, len(self.batches)):
            s = self.batches[k].numel()
            yield k, self.rank * s // self.world, (self.rank + 1) * s // self.world

    def __iter__(self) -> Iterator[list[int]]:
        for k, lo, hi in self.shares():
            if hi > lo:
                yield self.batches[k][lo:hi].tolist()

    def __len__(self) -> int:
        return sum(1 for _, lo, hi in self.shares() if hi > lo)


def share_loader(dataset: Dataset, sampler: ShareSampler, like: DataLoader | None = None, seed: int = 0) -> DataLoader:
    """A DataLoader reading ``sampler``'s shares of ``dataset``, with the workers, collate function,
    pinning and worker hooks of ``like`` (a user's loader) when given; worker seeds from ``seed``."""
    kw: dict = {}
    if like is not None:
        kw = dict(num_workers=like.num_workers, collate_fn=like.collate_fn, pin_memory=like.pin_memory,
                  worker_init_fn=like.worker_init_fn, timeout=like.timeout,
                  multiprocessing_context=like.multiprocessing_context)
        if like.num_workers > 0:
            kw["prefetch_factor"] = like.prefetch_factor
    return DataLoader(dataset, batch_sampler=sampler, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=False, **kw)
