"""The attack data as resumable, data-parallel global batches of correctly classified samples.

:class:`CleanBatches` turns the attack data into *global batches* and gives this process its share
of each, filtered (samples the real network misclassifies are dropped, and, where the maps are
computed, samples whose clean map is identically zero: their input gradient vanishes, there is no
interpretation to attack) and paired with the clean reference maps ``I_ref``:

* the order of epoch ``e`` is a pure function of ``(seed, e)`` (:func:`upi_fast.data.epoch_order`),
  so a resumed run regenerates it and can start at any batch index without reading what it skips;
* a global batch of ``s`` samples is split into contiguous shares, one per rank
  (:class:`upi_fast.data.ShareSampler`); every rank walks every global batch in lock-step, so
  per-step collectives line up, and learns how many samples each rank kept (``Batch.counts``);
* every sample keeps its position in its global batch (``Batch.slots``), so per-sample noise drawn
  for the whole global batch from a generator shared by all ranks (:func:`batch_noise`) is the same
  whatever the number of processes.

Three kinds of data:

* tensors ``(X, y)`` (cached): filtered and mapped once (each rank its contiguous share of ``X``,
  then gathered), global batches over the correctly classified samples;
* a DataLoader over a map-style dataset with a ``batch_size`` (streamed): global batches of the
  loader's size over the dataset, in the loader's order kind (sequential, or a fresh permutation per
  epoch for a shuffling loader), read through a loader with the same workers / collate function;
  nothing is held across batches;
* any other iterable of ``(x, y)`` batches (e.g. an IterableDataset loader): read as it comes,
  single process only; resuming skips batches by reading them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Callable, ContextManager, Iterator

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from ..data import as_batches, derive_seed, epoch_order, global_batches, ShareSampler, share_loader
from ..distributed import Comm, current, shard_bounds
from ..hvp import SaliencySpec
from ..saliency import postprocess_maps, raw_gradient
from ._common import model_check, surrogate_context
from ._microbatch import MicroBatcher

__all__ = ["Batch", "CleanBatches", "batch_noise"]

_SALT_SMOOTHGRAD = 0x5347  # smoothgrad draws: derive_seed(seed, salt, epoch, batch, rank)


@dataclasses.dataclass
class Batch:
    """This rank's share of one global batch.

    Attributes:
        index: the global batch's index in its epoch.
        size: samples in the global batch before filtering (rows of its noise draw).
        x, y, I_ref: this rank's correctly classified samples (b, C, H, W), (b,), maps (b, N) (None when
            maps were not asked for); b may be 0.
        slots: (b,) int64 positions of these samples in the global batch.
        counts: kept samples of every rank in this global batch (rank order).
        rank: this process's rank.
        rows: (b,) positions of these samples in the stream's cache (cached tensors; None otherwise).
    """
    index: int
    size: int
    x: torch.Tensor
    y: torch.Tensor
    I_ref: torch.Tensor | None
    slots: torch.Tensor
    counts: list[int]
    rank: int = 0
    rows: torch.Tensor | None = None

    @property
    def n(self) -> int:
        """Samples of this rank."""
        return int(self.x.shape[0])

    @property
    def n_global(self) -> int:
        """Correctly classified samples of the global batch (all ranks)."""
        return sum(self.counts)

    @property
    def offset(self) -> int:
        """Position of this rank's first sample among the global batch's kept samples."""
        return sum(self.counts[:self.rank])


def batch_noise(batch: Batch, shape: tuple, sigma: float, generator: torch.Generator, dtype: torch.dtype,
                device) -> torch.Tensor | None:
    """Gaussian noise (b, *shape) of std ``sigma`` for this rank's samples of ``batch``: drawn for the
    whole global batch (``(batch.size, *shape)``, every rank the same draw from a generator seeded
    alike), rows picked by ``batch.slots``. None when ``sigma == 0`` (nothing is drawn)."""
    if sigma == 0:
        return None
    z = sigma * torch.randn((batch.size, *shape), generator=generator, dtype=dtype, device=device)
    return z[batch.slots.to(z.device)]


def _nothing_to_attack(zero_maps: float) -> ValueError:
    """The error for an epoch without a usable sample: none correctly classified, or (``zero_maps`` > 0)
    every correctly classified one has a zero saliency map (its input gradient vanishes)."""
    if zero_maps > 0:
        return ValueError("the model's input gradient is zero for every correctly classified sample in data, so every "
                          "saliency map is zero: the model's output does not depend on its input in a differentiable "
                          "way (rounding, argmax or quantisation inside?)")
    return ValueError("the model classifies none of the samples in data correctly, so there is no saliency map of "
                      "the true class to attack (only correctly classified samples are used): untrained weights, "
                      "wrong normalisation, or classes in another order than the model's?")


def _as_tensors(data):
    """``(X, y)`` when ``data`` is a pair of tensors (or a TensorSplit), else None."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    if hasattr(data, "X") and hasattr(data, "y") and isinstance(getattr(data, "X"), torch.Tensor):
        return data.X, data.y
    return None


def _map_style(loader) -> bool:
    """A DataLoader whose batches we may re-plan: map-style dataset, batch_size set, standard sampler."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return False
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        return False
    if not hasattr(loader.dataset, "__len__"):
        return False
    s = loader.sampler
    if isinstance(s, RandomSampler):
        return not s.replacement and getattr(s, "_num_samples", None) is None
    return isinstance(s, SequentialSampler)


#: Live cached streams by :meth:`CleanBatches._cache_key` (weak: an entry ends with its stream, i.e. its fit).
_LIVE_CACHES: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


class CleanBatches:
    """The attack data as global batches ``Batch`` of correctly classified samples (see the module).

    Args:
        model: the real network (judges correctness); reference maps come from the attacked network
            (``surrogate`` applied).
        data: ``(X, y)`` tensors, a DataLoader, or an iterable of ``(x, y)`` batches.
        batch_size: global batch size for tensors (a DataLoader keeps its own).
        spec: the attacked saliency map and loss.
        device: where batches are delivered.
        shuffle: for tensors, a fresh permutation per epoch (loaders keep their own order kind).
        cache: for tensors, filter and map once and keep the result (else read like a loader).
        surrogate: the surrogate of the attacked network (None: the network itself).
        seed: derives the epoch orders and the smoothgrad draws.
        comm: the process group (default: :func:`upi_fast.distributed.current`).
        autocast: a function returning the precision context of the saliency passes.
        micro: how the per-batch passes handle running out of device memory
            (:class:`~upi_fast.solvers._microbatch.MicroBatcher`; default: a clear error).

    Attributes:
        input_shape: (C, H, W); dtype: the images' dtype; batches_per_epoch (0 when unknown);
        n_seen / n_correct: samples read / correctly classified (with a nonzero clean map) in a full
        epoch, over all ranks (known up front for tensors, after the first full epoch for streams);
        n_zero_maps: correctly classified samples dropped for a zero map (tensors).
    """

    def __init__(self, model, data, batch_size: int, spec: SaliencySpec, device: torch.device,
                 shuffle: bool = True, cache: bool = True, surrogate=None, seed: int = 0, comm: Comm | None = None,
                 autocast: Callable[[], ContextManager] | None = None, micro: MicroBatcher | None = None,
                 net=None) -> None:
        self.model, self.data, self.batch_size, self.spec = model, data, batch_size, spec
        # the clean passes' network: ``net`` (the fit's prepared copy, the same function to float rounding)
        # when given and the real network is the attacked one, else the model itself
        self.net = net if net is not None and (surrogate is None or surrogate is False) else model
        self.micro = micro if micro is not None else MicroBatcher(False, batch_size, device)
        self.device, self.shuffle, self.surrogate, self.seed = device, shuffle, surrogate, seed
        self.comm = comm or current()
        self.autocast = autocast or contextlib.nullcontext
        self.n_seen = self.n_correct = self.n_zero_maps = 0
        self._zero_maps = 0
        self.input_shape: tuple | None = None
        self.dtype = torch.float32
        self._epoch_counter = 0
        tensors = _as_tensors(data)
        if tensors is not None:
            as_batches(tensors, batch_size)  # validates X and y up front
            self.input_shape, self.dtype = tuple(tensors[0].shape[1:]), tensors[0].dtype
        if tensors is not None and cache:
            self.kind = "cached"
            if not self._share_cache(*tensors):
                self._build_cache(*tensors)
                self._register_cache(*tensors)
        elif tensors is not None or _map_style(data):
            self.kind = "indexed"
            self._init_indexed(tensors)
        else:
            self.kind = "stream"
            if self.comm.active:
                raise ValueError("data: a distributed run needs tensors (X, y) or a DataLoader over a map-style "
                                 "dataset with a batch_size and a sequential or shuffling sampler, got "
                                 f"{type(data).__name__}")
            try:
                self.batches_per_epoch = len(data)
            except TypeError:  # an IterableDataset without __len__
                self.batches_per_epoch = 0
            self._peek_stream()

    # -- per-batch work -----------------------------------------------------------------------------
    def clean_maps(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reference maps (B, N) of the attacked network (the surrogate, when one is used)."""
        s = self.spec
        # smoothgrad: the draws for the whole batch, as raw_gradient would make them, split with the batch
        noise = s.draw_noise(x, generator)

        def part(lo: int, hi: int, net=self.net) -> torch.Tensor:
            g = raw_gradient(net, x[lo:hi], y[lo:hi], s.method, s.target_kind, False, s.steps, s.baseline,
                             s.multiply_by_input, s.smoothgrad_std, s.n_samples, None,
                             None if noise is None else noise[:, lo:hi], integration=s.integration)
            return postprocess_maps(g, s.postprocess).detach()

        with surrogate_context(self.model, self.surrogate), self.autocast():
            try:
                parts = self.micro.run(part, x.shape[0], "the clean saliency maps")
            except ValueError:  # a model that cannot be attacked: the error as the model itself gives it
                if self.net is self.model:
                    raise
                parts = self.micro.run(lambda lo, hi: part(lo, hi, self.model), x.shape[0], "the clean saliency maps")
        m = parts[0][2] if len(parts) == 1 else torch.cat([p for _, _, p in parts])
        return m if m.dtype == x.dtype else m.to(x.dtype)

    def smoothgrad_generator(self, *parts: int) -> torch.Generator | None:
        """A generator for smoothgrad draws, seeded from ``(seed, parts, rank)`` (None for other maps)."""
        if not self.spec.stochastic:
            return None
        return torch.Generator(device=self.device).manual_seed(
            derive_seed(self.seed, _SALT_SMOOTHGRAD, *parts, self.comm.rank))

    def _keep(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Check one batch; the mask (B,) of samples the real network classifies correctly."""
        if self.input_shape is None:
            self.input_shape, self.dtype = tuple(x.shape[1:]), x.dtype
        elif tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"data has images of shapes {self.input_shape} and {tuple(x.shape[1:])}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("data contains images with NaN or Inf values")
        def part(lo: int, hi: int) -> torch.Tensor:
            logits = model_check(self.model, x[lo:hi], y[lo:hi])
            self._n_classes = logits.shape[1]
            return logits.argmax(1) == y[lo:hi]

        parts = self.micro.run(part, x.shape[0], "the clean predictions")
        return parts[0][2] if len(parts) == 1 else torch.cat([p for _, _, p in parts])

    def _one_pass(self) -> bool:
        """Whether the clean predictions can come from the clean maps' own forward pass: the real
        network is the attacked one (no surrogate), full precision, and the map is the gradient at
        the image itself (one model call, deterministic)."""
        s = self.spec
        return ((self.surrogate is None or self.surrogate is False) and self.autocast is contextlib.nullcontext
                and s.saliency_method.single_point and not s.stochastic)

    def _keep_and_maps(self, x: torch.Tensor, y: torch.Tensor, n_classes: int | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep, maps)`` of a whole batch from one forward and one backward: the correctness mask from
        the logits of the maps' forward pass (a fixed cost cut: the separate prediction pass was
        0.45 of a gradient per batch on ResNet-18). The checks of :meth:`_keep`: finite images, labels
        in range (``n_classes``; None on the first batch, whose errors the caller re-raises the
        checked way), logits (B, K) and finite. Sets ``_n_classes``."""
        from .._checks import check_labels
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"data has images of shapes {self.input_shape} and {tuple(x.shape[1:])}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("data contains images with NaN or Inf values")
        if n_classes is not None:
            check_labels("labels in data", y, x.shape[0], n_classes)
        s, seen = self.spec, []

        def net(p):
            z = self.net(p)
            seen.append(z)
            return z

        def part(lo: int, hi: int):
            seen.clear()
            g = raw_gradient(net, x[lo:hi], y[lo:hi], s.method, s.target_kind, False, s.steps, s.baseline,
                             s.multiply_by_input, integration=s.integration)
            if len(seen) != 1 or not isinstance(seen[0], torch.Tensor) or seen[0].dim() != 2:
                raise ValueError("the model must return logits of shape (B, K)")
            z = seen[0].detach()
            if not bool(torch.isfinite(z).all()):
                raise ValueError("the model returned NaN or Inf logits")
            self._n_classes = z.shape[1]
            return z.argmax(1) == y[lo:hi], postprocess_maps(g, s.postprocess).detach()

        parts = self.micro.run(part, x.shape[0], "the clean saliency maps")
        keep, m = (torch.cat([p[i] for _, _, p in parts]) for i in (0, 1))
        return keep, (m if m.dtype == x.dtype else m.to(x.dtype))

    def _share(self, k: int, epoch: int, size: int, lo: int, x, y, maps: bool) -> Batch:
        """Filter and map this rank's raw share (x, y) of global batch k (x None: an empty share)."""
        if x is None:
            x = torch.zeros((0, *self.input_shape), dtype=self.dtype, device=self.device)
            y = torch.zeros(0, dtype=torch.long, device=self.device)
            slots = torch.zeros(0, dtype=torch.long)
        else:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            keep = self._keep(x, y)
            slots = lo + keep.nonzero().flatten().cpu()
            x, y = x[keep], y[keep]
        I_ref = None
        if maps and x.shape[0]:
            I_ref = self.clean_maps(x, y, self.smoothgrad_generator(epoch, k))
            nz = (I_ref != 0).any(1)  # maps not identically zero
            if not bool(nz.all()):  # no interpretation to attack: dropped like a misclassified sample
                self._zero_maps += int((~nz).sum())
                x, y, I_ref, slots = x[nz], y[nz], I_ref[nz], slots[nz.cpu()]
        counts = self.comm.all_gather_ints(x.shape[0])
        return Batch(k, size, x, y, I_ref, slots, counts, self.comm.rank)

    # -- tensors, cached ----------------------------------------------------------------------------
    def _build_cache(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        n = X.shape[0]
        lo, hi = shard_bounds(n, self.comm.world, self.comm.rank)
        keeps, maps = [], []
        zero_maps = 0
        n_classes = None
        for j, i in enumerate(range(lo, hi, self.batch_size)):
            x = X[i:min(i + self.batch_size, hi)].to(self.device, non_blocking=True)
            y = Y[i:min(i + self.batch_size, hi)].to(self.device, non_blocking=True)
            keep = m = None
            if self._one_pass():
                try:
                    keep, m = self._keep_and_maps(x, y, n_classes)
                    n_classes = self._n_classes
                except Exception:  # noqa: BLE001 - the checked two-pass way below raises the canonical error
                    if n_classes is not None:
                        raise
            if keep is None:
                keep = self._keep(x, y)
            if bool(keep.any()):
                if m is None:
                    m = self.clean_maps(x[keep], y[keep], self.smoothgrad_generator(-1, j))
                    n_classes = self._n_classes
                else:
                    m = m[keep]
                nz = (m != 0).any(1)
                if not bool(nz.all()):  # no interpretation to attack: dropped like a misclassified sample
                    zero_maps += int((~nz).sum())
                    keep = keep.clone()
                    keep[keep.nonzero().flatten()[~nz]] = False
                    m = m[nz]
                if m.shape[0]:
                    maps.append(m)
            keeps.append(keep)
        keep = torch.cat(keeps) if keeps else torch.zeros(0, dtype=torch.bool, device=self.device)
        M = torch.cat(maps) if maps else None
        if self.comm.active:  # every rank gets the whole cache, in row order
            parts = self.comm.all_gather_objects((keep.cpu(), None if M is None else M.cpu(), zero_maps))
            keep = torch.cat([k for k, _, _ in parts]).to(self.device)
            ms = [m for _, m, _ in parts if m is not None]
            M = torch.cat(ms).to(self.device) if ms else None
            zero_maps = sum(z for _, _, z in parts)
        self.n_seen, self.n_zero_maps = n, zero_maps
        if M is None:
            raise _nothing_to_attack(zero_maps)
        idx = keep.nonzero().flatten().to(X.device)
        self._cache = (X[idx].to(self.device), Y[idx].to(self.device), M)
        self.n_correct = int(idx.numel())
        self.batches_per_epoch = -(-self.n_correct // self.batch_size)

    # -- one cache per fit: UPIGrad's UPI-PCA start reads the same tensors with the same settings -----
    def _cache_key(self, X: torch.Tensor, Y: torch.Tensor) -> tuple | None:
        """What the cache depends on (None: not shared, e.g. under autocast); see :meth:`_cache_state`."""
        if self.autocast is not contextlib.nullcontext:
            return None
        from ._common import spec_fields
        return (id(self.model), id(X), id(Y), self.batch_size, repr(spec_fields(self.spec)), str(self.device),
                repr(self.surrogate), self.seed, self.comm.world, self.comm.rank)

    def _cache_state(self, X: torch.Tensor, Y: torch.Tensor) -> tuple:
        from ..accel.prepare import _fingerprint
        return ((X.data_ptr(), X._version, Y.data_ptr(), Y._version)
                + (_fingerprint(self.model) if isinstance(self.model, torch.nn.Module) else (id(self.model),)))

    def _share_cache(self, X: torch.Tensor, Y: torch.Tensor) -> bool:
        """Take the filtered data and clean maps of a live stream over the same tensors, model and
        settings (while it is alive, and neither the tensors nor the model changed since it was built)."""
        other = _LIVE_CACHES.get(self._cache_key(X, Y))
        if other is None or other._state != self._cache_state(X, Y):
            return False
        self._cache, self._state = other._cache, other._state
        self.n_seen, self.n_zero_maps, self.n_correct = other.n_seen, other.n_zero_maps, other.n_correct
        self.batches_per_epoch = other.batches_per_epoch
        return True

    def _register_cache(self, X: torch.Tensor, Y: torch.Tensor) -> None:
        key = self._cache_key(X, Y)
        if key is not None:
            self._state = self._cache_state(X, Y)
            _LIVE_CACHES[key] = self

    def _cached_epoch(self, epoch: int, start: int, maps: bool, shuffle: bool | None = None) -> Iterator[Batch]:
        Xc, Yc, Mc = self._cache
        shuffle = self.shuffle if shuffle is None else shuffle
        order = epoch_order(self.n_correct, self.seed, epoch, shuffle).to(self.device)
        for k, idx in enumerate(global_batches(order, self.batch_size)):
            if k < start:
                continue
            s = idx.numel()
            counts = [hi - lo for lo, hi in (shard_bounds(s, self.comm.world, r) for r in range(self.comm.world))]
            lo, hi = shard_bounds(s, self.comm.world, self.comm.rank)
            mine = idx[lo:hi]
            yield Batch(k, s, Xc[mine], Yc[mine], Mc[mine] if maps else None, torch.arange(lo, hi), counts,
                        self.comm.rank, mine)

    def in_order(self) -> Iterator[Batch]:
        """Cached tensors only: this rank's shares of the cache in row order (what epoch 0 of an
        unshuffled stream over the same cache gives every rank), with the clean maps and ``rows``."""
        return self._cached_epoch(0, 0, True, shuffle=False)

    # -- map-style loaders (and uncached tensors) ---------------------------------------------------
    def _init_indexed(self, tensors) -> None:
        if tensors is not None:
            self._dataset, self._like = None, None
            self._n, self._bs = tensors[0].shape[0], self.batch_size
            self._drop_last, self._shuffle = False, self.shuffle
        else:
            loader: DataLoader = self.data
            self._dataset, self._like = loader.dataset, loader
            self._n, self._bs, self._drop_last = len(loader.dataset), loader.batch_size, loader.drop_last
            self._shuffle = isinstance(loader.sampler, RandomSampler)
            if self._n == 0:
                raise ValueError("data is empty")
            item = self._dataset[0]
            if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.Tensor):
                self.input_shape, self.dtype = tuple(item[0].shape), item[0].dtype
            else:
                raise TypeError(f"data (a DataLoader) must yield (x, y) pairs; its dataset's items are "
                                f"{type(item).__name__}")
        n_batches = self._n // self._bs if self._drop_last else -(-self._n // self._bs)
        self.batches_per_epoch = n_batches

    def _indexed_reader(self, sampler: ShareSampler, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._dataset is None:
            X, Y = _as_tensors(self.data)
            for idx in sampler:
                yield X[idx], Y[idx]
            return
        loader = share_loader(self._dataset, sampler, like=self._like, seed=derive_seed(self.seed, epoch, 1))
        yield from as_batches(loader, self._bs)

    def _indexed_epoch(self, epoch: int, start: int, maps: bool) -> Iterator[Batch]:
        order = epoch_order(self._n, self.seed, epoch, self._shuffle)
        sampler = ShareSampler(global_batches(order, self._bs, self._drop_last), self.comm.rank, self.comm.world,
                               start)
        reader = self._indexed_reader(sampler, epoch)
        for k, lo, hi in sampler.shares():
            x, y = next(reader) if hi > lo else (None, None)
            if x is not None and x.shape[0] != hi - lo:
                raise ValueError(f"data: the loader's collate function returned {x.shape[0]} samples for a batch of "
                                 f"{hi - lo}")
            yield self._share(k, epoch, sampler.batches[k].numel(), lo, x, y, maps)

    # -- any other iterable of batches --------------------------------------------------------------
    def _peek_stream(self) -> None:
        for x, _ in as_batches(self.data, self.batch_size):
            self.input_shape, self.dtype = tuple(x.shape[1:]), x.dtype
            return
        raise ValueError("data is empty")

    def _stream_epoch(self, epoch: int, start: int, maps: bool) -> Iterator[Batch]:
        for k, (x, y) in enumerate(as_batches(self.data, self.batch_size)):
            if k >= start:
                yield self._share(k, epoch, x.shape[0], 0, x, y, maps)

    # -- iteration ----------------------------------------------------------------------------------
    def epoch(self, epoch: int, start: int = 0, maps: bool = True) -> Iterator[Batch]:
        """This rank's shares of the global batches ``start, start + 1, ...`` of epoch ``epoch``
        (every rank gets one ``Batch`` per global batch, possibly empty). ``maps=False`` skips the
        reference maps. A full epoch (``start == 0``) updates ``n_seen`` / ``n_correct``."""
        gen = {"cached": self._cached_epoch, "indexed": self._indexed_epoch, "stream": self._stream_epoch}[self.kind]
        seen = correct = 0
        self._zero_maps = 0
        for batch in gen(epoch, start, maps):
            seen += batch.size
            correct += batch.n_global
            yield batch
        if start == 0 and self.kind != "cached":
            if seen == 0:
                raise ValueError("data is empty")
            if correct == 0:  # the same on every rank: the collective below lines up
                raise _nothing_to_attack(self.comm.sum_floats(self._zero_maps)[0] if maps else 0)
            if maps or not self.n_correct:  # epochs without maps keep the samples whose maps are zero
                self.n_seen, self.n_correct = seen, correct

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The next epoch's non-empty local batches as ``(x, y, I_ref)`` (epochs counted per call)."""
        e, self._epoch_counter = self._epoch_counter, self._epoch_counter + 1
        for b in self.epoch(e):
            if b.n:
                yield b.x, b.y, b.I_ref
