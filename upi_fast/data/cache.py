"""Decode once, then read fast: a local uint8 cache of a reader's decoded, resized images.

:class:`CachedImageDataset` wraps a dataset of :mod:`upi_fast.data.readers` (an ImageFolder from
:func:`~upi_fast.data.image_folder` / :func:`~upi_fast.data.open_dataset`, or CIFAR-10) and stores
the images at the last *uint8* stage of the reader: an ImageFolder's RGB image after ``Resize`` and
``CenterCrop`` (before ``ToTensor``), CIFAR-10's stored 32 x 32 rows. Reading an item applies the
reader's own remaining float steps (``/ 255``, CIFAR's bilinear resize, ``Normalize``) to the cached
bytes, so items are **bit-identical** to the uncached reader's (no rounding: the readers decode to
uint8 anyway, and mean / std do not change the cached bytes, so they share one entry).

One cache entry is a folder ``<cache_dir>/<key>/`` holding

* ``images.u8``: (N, C, H, W) uint8, memory-mapped (``numpy.memmap``); ``labels.i64``: int64 (N,);
* ``digests.bin``: a blake2b-128 digest per image, written after its bytes (zero: not filled yet);
* ``manifest.json``: format, key description, shape, the labels' digest, per-chunk checksums
  (blake2b over the per-image digests of each ``chunk`` images, i.e. a two-level hash of the
  bytes) and ``complete``; rewritten atomically, ``complete: true`` only once every image is in.

The key (folder name) is a sha256 of the reader's file list with sizes and mtimes, its class map,
the uint8-stage transform (``repr``: size, interpolation, crop) and the loader; a changed file,
size or transform is a different entry. Images are filled lazily (the first read of an item decodes
and stores it, in whichever process reads it: DataLoader workers share the file) or all at once
with :meth:`CachedImageDataset.fill`. On open a complete entry is verified (``verify="open"``: every
chunk rehashed; ``"lazy"``: each chunk when a process first reads it), an incomplete one has its
filled images rehashed; a truncated file or a bad manifest rebuilds the entry, a damaged chunk or
image is decoded again, each with a :class:`CacheRebuiltWarning`, never used. Creation and
finalisation hold an exclusive lock (``fcntl.flock`` on ``.lock``; none where fcntl is missing);
concurrent fillers write identical bytes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..io import write_text_atomic

__all__ = ["CachedImageDataset", "CacheRebuiltWarning", "cache_key", "open_cached_dataset"]

FORMAT, VERSION = "upi_fast image cache", 1
_DIGEST = 16


class CacheRebuiltWarning(UserWarning):
    """A cache entry (or part of it) was damaged, truncated or unreadable and is decoded again."""


def _digest(buf) -> bytes:
    return hashlib.blake2b(memoryview(np.ascontiguousarray(buf)).cast("B"), digest_size=_DIGEST).digest()


# --------------------------------------------------------------------------------------------- readers' uint8 stage
class _Source:
    """How to read one reader's uint8 stage: ``decode(i)`` -> uint8 (C, H, W), ``finish(u8, i)`` -> the
    reader's item, ``labels`` int64 (N,), ``key`` a JSON-able description."""

    def __init__(self, dataset: Dataset) -> None:
        from .readers import CIFAR10Batches
        self.dataset = dataset
        if isinstance(dataset, CIFAR10Batches):
            self.kind = "cifar10"
            self.labels = np.asarray(dataset.targets, dtype=np.int64)
            self.key = {"kind": self.kind, "train": dataset.train,
                        "files": [[f.name, *_stat(f)] for f in dataset.files]}
            return
        from torchvision import transforms as T
        from torchvision.datasets import DatasetFolder
        if not isinstance(dataset, DatasetFolder):
            raise TypeError(f"dataset must be an ImageFolder or CIFAR-10 dataset of upi_fast.data, got "
                            f"{type(dataset).__name__}")
        tf = dataset.transform
        steps = list(tf.transforms) if isinstance(tf, T.Compose) else [tf]
        cut = next((k for k, s in enumerate(steps) if isinstance(s, T.ToTensor)), None)
        if cut is None or not all(isinstance(s, (T.Resize, T.CenterCrop)) for s in steps[:cut]):
            raise ValueError(f"dataset: its transform must be Resize / CenterCrop steps, then ToTensor (then "
                             f"anything), so that the images can be cached as uint8; got {tf!r}")
        self.kind, self.pre, self.post = "image_folder", steps[:cut], T.Compose(steps[cut:])
        self.target_transform = dataset.target_transform
        self.labels = np.asarray([t for _, t in dataset.samples], dtype=np.int64)
        root = os.path.abspath(dataset.root)
        listing = hashlib.sha256()
        for path, target in dataset.samples:
            listing.update(json.dumps([os.path.relpath(path, root), target, *_stat(path)]).encode() + b"\n")
        loader = getattr(dataset.loader, "__qualname__", type(dataset.loader).__name__)
        self.key = {"kind": self.kind, "files": len(dataset.samples), "files_sha256": listing.hexdigest(),
                    "classes": dataset.class_to_idx, "transform": [repr(s) for s in self.pre],
                    "loader": f"{getattr(dataset.loader, '__module__', '')}.{loader}"}

    def decode(self, i: int) -> np.ndarray:
        if self.kind == "cifar10":
            f, j = self.dataset._locate(i)
            return self.dataset._batch(f)[j].reshape(3, 32, 32)
        path = self.dataset.samples[i][0]
        img = self.dataset.loader(path)
        for step in self.pre:
            img = step(img)
        arr = np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim != 3:
            raise ValueError(f"dataset: {path!r} decodes to {arr.dtype} {arr.shape}, not an 8-bit colour image")
        return arr.transpose(2, 0, 1)

    def finish(self, u8: np.ndarray, i: int):
        label = int(self.labels[i])
        if self.kind == "cifar10":
            return self.dataset._image(u8.reshape(-1)), label
        # exactly ToTensor's uint8 path (to float32, div 255), then the reader's remaining steps
        x = torch.from_numpy(u8).to(dtype=torch.get_default_dtype()).div(255)
        for step in self.post.transforms[1:]:
            x = step(x)
        return x, (self.target_transform(label) if self.target_transform is not None else label)


def _stat(path) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def cache_key(dataset: Dataset, extra: str | None = None) -> str:
    """The cache entry name (32 hex digits) of a readers dataset: see the module docstring."""
    return _key(_Source(dataset), extra)


def _key(src: _Source, extra) -> str:
    text = json.dumps({"format": FORMAT, "version": VERSION, "key": src.key, "extra": extra}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_HELD: set[str] = set()  # lock files this process holds (the lock is re-entrant within a process)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no advisory locks here: rename-based writes only
        yield
        return
    key = f"{os.getpid()}:{path}"
    if key in _HELD:
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------- the cached dataset
class CachedImageDataset(Dataset):
    """``dataset`` (a readers ImageFolder or CIFAR-10) read through a uint8 cache under ``cache_dir``.

    Items equal ``dataset[i]`` exactly. ``key``: an extra string mixed into the entry's key (e.g.
    a data version). ``chunk``: images per manifest checksum. ``verify``: ``"open"`` (rehash a
    complete entry on open, once per process tree) or ``"lazy"`` (each chunk when first read).
    ``entry`` is the entry folder; ``complete`` whether every image is stored.

    Raises ValueError / TypeError naming ``cache_dir``, ``dataset``, ``chunk`` or ``verify``, and
    OSError naming ``cache_dir`` when it cannot be created or lacks the free space.
    """

    def __init__(self, dataset: Dataset, cache_dir: str | os.PathLike, *, key: str | None = None,
                 chunk: int = 1024, verify: str = "open") -> None:
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise TypeError(f"cache_dir must be a str or os.PathLike, got {type(cache_dir).__name__}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
        if verify not in ("open", "lazy"):
            raise ValueError(f"verify must be 'open' or 'lazy', got {verify!r}")
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key must be a str or None, got {type(key).__name__}")
        root = Path(os.fspath(cache_dir)).expanduser()
        if root.exists() and not root.is_dir():
            raise ValueError(f"cache_dir {str(root)!r} is a file, expected a folder")
        self.dataset, self._src = dataset, _Source(dataset)
        self.n, self.chunk, self.verify = len(self._src.labels), chunk, verify
        if self.n == 0:
            raise ValueError("dataset holds no images: nothing to cache")
        self.entry = root / _key(self._src, key)
        try:
            self.entry.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cache_dir {str(root)!r} cannot be created: {e.strerror or e}") from None
        self._mm: dict | None = None
        self._pid = os.getpid()
        self._verified: set[int] = set()
        self._done_chunks: set[int] = set()
        with _locked(self.entry / ".lock"):
            self._open()

    # ---------------------------------------------------------------- files
    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk)

    def _path(self, name: str) -> Path:
        return self.entry / name

    def _arrays(self) -> dict:
        if self._mm is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._mm = {"images": np.memmap(self._path("images.u8"), np.uint8, "r+", shape=(self.n, *self.shape)),
                        "digests": np.memmap(self._path("digests.bin"), np.uint8, "r+", shape=(self.n, _DIGEST))}
        return self._mm

    def _read_manifest(self) -> dict | None:
        p = self._path("manifest.json")
        if not p.is_file():
            return None
        try:
            if p.stat().st_size > 64 * 2**20:
                raise ValueError("larger than 64 MiB")
            m = json.loads(p.read_text(encoding="utf-8"))
            ok = (isinstance(m, dict) and m.get("format") == FORMAT and m.get("version") == VERSION
                  and m.get("n") == self.n and m.get("chunk") == self.chunk and isinstance(m.get("complete"), bool)
                  and isinstance(m.get("shape"), list) and len(m["shape"]) == 3
                  and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in m["shape"])
                  and isinstance(m.get("labels_blake2b"), str)
                  and (not m["complete"] or (isinstance(m.get("chunks"), list) and len(m["chunks"]) == self.n_chunks
                                             and all(isinstance(c, str) for c in m["chunks"]))))
            if not ok:
                raise ValueError("unexpected fields or values")
            return m
        except (OSError, UnicodeDecodeError, ValueError) as e:
            self._warn(f"its manifest is unreadable ({e})")
            return {}

    def _warn(self, what: str) -> None:
        warnings.warn(f"image cache {str(self.entry)!r}: {what}; rebuilding it", CacheRebuiltWarning, stacklevel=4)

    def _write_manifest(self, complete: bool, chunks: list | None = None) -> None:
        m = {"format": FORMAT, "version": VERSION, "key": self._src.key, "n": self.n, "shape": list(self.shape),
             "dtype": "uint8", "chunk": self.chunk, "checksum": "blake2b-128 per image; per chunk blake2b-128 "
             "of its images' digests", "labels_blake2b": _digest(self._src.labels).hex(), "complete": complete}
        if complete:
            m["chunks"] = chunks
        write_text_atomic(self._path("manifest.json"), json.dumps(m, indent=1))

    def _open(self) -> None:
        m = self._read_manifest()
        if m:
            self.shape = tuple(m["shape"])
            problem = self._files_problem()
            if problem is None and m["labels_blake2b"] != _digest(self._src.labels).hex():
                problem = "its labels differ from the dataset's"
            if problem is None:
                self.complete = m["complete"]
                self._chunk_sums = m.get("chunks")
                if self.complete and self.verify == "open":
                    self._check_chunks(range(self.n_chunks))
                elif not self.complete:
                    self._check_images(np.flatnonzero(self._filled_mask()))
                return
            self._warn(problem)
        self._create()

    def _files_problem(self) -> str | None:
        want = {"images.u8": self.n * int(np.prod(self.shape)), "digests.bin": self.n * _DIGEST,
                "labels.i64": self.n * 8}
        for name, size in want.items():
            p = self._path(name)
            if not p.is_file():
                return f"{name} is missing"
            if p.stat().st_size != size:
                return f"{name} is {p.stat().st_size} bytes, expected {size} (truncated or overwritten)"
        labels = np.fromfile(self._path("labels.i64"), dtype=np.int64)
        if not np.array_equal(labels, self._src.labels):
            return "labels.i64 differs from the dataset's labels"
        return None

    def _create(self) -> None:
        self._mm = None
        first = np.ascontiguousarray(self._src.decode(0))
        self.shape = tuple(first.shape)
        size = self.n * int(np.prod(self.shape))
        free = shutil.disk_usage(self.entry).free
        if free < size * 1.02 + 2**20:
            raise OSError(f"cache_dir {str(self.entry.parent)!r}: the cache needs {size / 2**30:.2f} GiB, "
                          f"{free / 2**30:.2f} GiB are free")
        for name in ("manifest.json", "images.u8", "digests.bin", "labels.i64"):
            self._path(name).unlink(missing_ok=True)
        for name, nbytes in (("images.u8", size), ("digests.bin", self.n * _DIGEST)):
            tmp = self._path(f".{name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                fh.truncate(nbytes)  # sparse zeros: digests all zero = nothing filled
            os.replace(tmp, self._path(name))
        tmp = self._path(f".labels.{os.getpid()}.tmp")
        self._src.labels.tofile(tmp)
        os.replace(tmp, self._path("labels.i64"))
        self.complete, self._chunk_sums = False, None
        self._done_chunks.clear()
        self._write_manifest(False)
        mm = self._arrays()
        mm["images"][0] = first
        mm["digests"][0] = np.frombuffer(_digest(first), np.uint8)
        if self.n <= self.chunk:
            self._maybe_finalize()

    # ---------------------------------------------------------------- verification
    def _filled_mask(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        return self._arrays()["digests"][lo:hi].any(axis=1)

    def _image_digests(self, idx) -> list[bytes]:
        imgs = self._arrays()["images"]
        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:  # hashlib releases the GIL
            return list(pool.map(lambda i: _digest(imgs[i]), idx))

    def _check_images(self, idx: np.ndarray) -> None:
        if not len(idx):
            return
        dig = self._arrays()["digests"]
        bad = [int(i) for i, d in zip(idx, self._image_digests(idx)) if d != bytes(dig[i])]
        if bad:
            self._warn(f"{len(bad)} stored image(s) do not match their digests (first: index {bad[0]})")
            dig[bad] = 0
            dig.flush()

    def _check_chunks(self, chunks) -> None:
        bad = []
        for c in chunks:
            lo, hi = c * self.chunk, min(self.n, (c + 1) * self.chunk)
            digests = self._image_digests(range(lo, hi))
            if _chunk_sum(digests) != self._chunk_sums[c]:
                bad.append((c, digests))
            else:  # the bytes are right: repair a damaged per-image digest, if any
                dig = self._arrays()["digests"]
                for i, d in zip(range(lo, hi), digests):
                    if d != bytes(dig[i]):
                        dig[i] = np.frombuffer(d, np.uint8)
            self._verified.add(c)
        if not bad:
            return
        self._warn(f"chunk(s) {[c for c, _ in bad][:5]}{'...' if len(bad) > 5 else ''} of {self.chunk} images "
                   f"fail their checksums")
        dig = self._arrays()["digests"]
        for c, digests in bad:
            lo, hi = c * self.chunk, min(self.n, (c + 1) * self.chunk)
            wrong = [i for i, d in zip(range(lo, hi), digests) if d != bytes(dig[i])]
            if wrong:  # keep the images that still match their digests
                dig[wrong] = 0
            else:  # the bytes match the digests: the digests or the manifest were damaged
                dig[lo:hi] = 0
            self._done_chunks.discard(c)
        dig.flush()
        self.complete, self._chunk_sums = False, None
        with _locked(self.entry / ".lock"):
            self._write_manifest(False)

    # ---------------------------------------------------------------- filling
    def _fill_one(self, i: int) -> np.ndarray:
        arr = np.ascontiguousarray(self._src.decode(i))
        if arr.shape != self.shape:
            raise ValueError(f"dataset: image {i} ({self._describe(i)}) decodes to shape {arr.shape}, the cache "
                             f"holds {self.shape}")
        mm = self._arrays()
        mm["images"][i] = arr
        mm["digests"][i] = np.frombuffer(_digest(arr), np.uint8)  # after the bytes: marks the image filled
        c = i // self.chunk
        if self._filled_mask(c * self.chunk, (c + 1) * self.chunk).all():
            self._maybe_finalize()
        return arr

    def _describe(self, i: int) -> str:
        samples = getattr(self.dataset, "samples", None)
        return repr(samples[i][0]) if samples else f"index {i}"

    def _maybe_finalize(self) -> bool:
        """Mark the entry complete when every image is in (any process may; idempotent)."""
        if self.complete:
            return True
        mm = self._arrays()
        dig = mm["digests"]
        for c in range(self.n_chunks):  # chunk by chunk: stops at the first unfilled one
            if c not in self._done_chunks:
                if not self._filled_mask(c * self.chunk, (c + 1) * self.chunk).all():
                    return False
                self._done_chunks.add(c)
        mm["images"].flush()
        dig.flush()
        sums = [_chunk_sum([bytes(dig[i]) for i in range(c * self.chunk, min(self.n, (c + 1) * self.chunk))])
                for c in range(self.n_chunks)]
        with _locked(self.entry / ".lock"):
            self._write_manifest(True, sums)
        self.complete, self._chunk_sums = True, sums
        self._verified.update(range(self.n_chunks))
        return True

    def fill(self, workers: int = 0, batch_size: int = 64) -> "CachedImageDataset":
        """Decode and store every image not stored yet, with ``workers`` DataLoader processes; returns self."""
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not self.complete:
            todo = np.flatnonzero(~self._filled_mask()).tolist()
            if todo:
                loader = DataLoader(_Filler(self, todo), batch_size=batch_size, num_workers=workers,
                                    collate_fn=len)
                for _ in loader:
                    pass
            self._maybe_finalize()
        return self

    # ---------------------------------------------------------------- reading
    def __len__(self) -> int:
        return self.n

    def _u8(self, i: int) -> np.ndarray:
        mm = self._arrays()
        if self.complete:
            c = i // self.chunk
            if c not in self._verified:  # verify="lazy"
                self._check_chunks([c])
        if not self.complete and not mm["digests"][i].any():
            return self._fill_one(i)
        return np.array(mm["images"][i])

    def __getitem__(self, index: int):
        i = int(index)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"index {index} out of range for a dataset of {self.n} images")
        return self._src.finish(self._u8(i), i)

    def __getattr__(self, name: str):  # classes, samples, targets, ... of the wrapped reader
        inner = self.__dict__.get("dataset")
        if inner is None or name.startswith("_") or name in ("shape", "complete"):
            raise AttributeError(name)
        return getattr(inner, name)

    def __getstate__(self) -> dict:
        """Pickled (spawned DataLoader workers) without the memory maps: reopened on first use."""
        state = self.__dict__.copy()
        state["_mm"] = None
        return state

    def __repr__(self) -> str:
        return (f"CachedImageDataset({self.n} images {self.shape}, {'complete' if self.complete else 'filling'}, "
                f"{str(self.entry)!r})")


def _chunk_sum(digests: Sequence[bytes]) -> str:
    return hashlib.blake2b(b"".join(digests), digest_size=_DIGEST).hexdigest()


class _Filler(Dataset):
    def __init__(self, cached: CachedImageDataset, todo: list) -> None:
        self.cached, self.todo = cached, todo

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, k: int) -> int:
        i = self.todo[k]
        if not self.cached._arrays()["digests"][i].any():
            self.cached._fill_one(i)
        return i


def open_cached_dataset(path: str | os.PathLike, cache_dir: str | os.PathLike | None, size: int | None = None,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                        **cache_options) -> Dataset:
    """:func:`~upi_fast.data.open_dataset` read through a :class:`CachedImageDataset` in ``cache_dir``
    (the plain dataset when ``cache_dir`` is None)."""
    from .detection import open_dataset
    dataset = open_dataset(path, size=size, mean=mean, std=std)
    return dataset if cache_dir is None else CachedImageDataset(dataset, cache_dir, **cache_options)
