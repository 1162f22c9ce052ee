"""Deterministic disjoint attack / eval splits, their loaders, and one iterator over ``(x, y)``
batches for tensors or loaders."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .._checks import check_images, check_labels, check_positive


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
