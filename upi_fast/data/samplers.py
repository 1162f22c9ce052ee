"""The data-parallel, resumable reading order: seeds, epoch orders, global batches and each
process's share of them (:class:`ShareSampler`, :func:`share_loader`)."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .._checks import check_positive


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
