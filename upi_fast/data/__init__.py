"""Datasets: the embedded digits default and local real datasets, streamed.

Nothing here downloads anything.

* :func:`digits`: scikit-learn's bundled handwritten digits (1797 grey 8 x 8 images), scaled to
  [0, 1] and upsampled bilinearly, split once into disjoint train / attack / eval tensors.
* :func:`image_folder`, :func:`cifar10`, :func:`open_dataset`: map-style datasets over files on
  disk that read one image (ImageFolder) or one CIFAR-10 batch file (CIFAR) at a time.
* :func:`split_indices`, :func:`make_loader`: deterministic disjoint attack / eval subsets and
  their loaders; :func:`as_batches`: one iterator over ``(x, y)`` batches for tensors or loaders.
* :class:`CachedImageDataset`, :func:`open_cached_dataset`: decode once into a memory-mapped,
  checksummed uint8 cache, then read it (items bit-identical to the reader's) (:mod:`.cache`).
* :func:`epoch_order`, :func:`global_batches`, :class:`ShareSampler`, :func:`share_loader`: the
  data-parallel, resumable reading order: each epoch's order is a pure function of
  ``(seed, epoch)``, cut into global batches; each process loads only its contiguous share of
  every global batch, from any batch index on.

Images are float32 (C, H, W) in the model's input units: [0, 1] pixel scale, or ``(x - mean) / std``
when a normalisation is given here.

Modules: :mod:`.readers` (digits, normalisation, ImageFolder, CIFAR-10), :mod:`.unpickle` (the
safe unpickler of CIFAR-10 batch files), :mod:`.detection` (:func:`open_dataset` and what a
dataset says about itself), :mod:`.splits` (splits, loaders, :func:`as_batches`) and
:mod:`.samplers` (the data-parallel reading order).
"""
from __future__ import annotations

from .cache import CachedImageDataset, CacheRebuiltWarning, cache_key, open_cached_dataset
from .detection import dataset_num_classes, open_dataset, resize_note, stored_image_sizes
from .readers import (DEFAULT_IMAGE_FOLDER_SIZE, CIFAR10Batches, DigitsSplits, TensorSplit, _check_mean_std,  # noqa: F401
                      _digits_raw, cifar10, digits, image_folder)
from .samplers import ShareSampler, derive_seed, epoch_order, global_batches, share_loader
from .splits import as_batches, make_loader, split_indices
from .unpickle import RestrictedUnpickler, UnsafePickleError, safe_pickle_load

__all__ = ["TensorSplit", "DigitsSplits", "digits", "image_folder", "cifar10", "CIFAR10Batches",
           "open_dataset", "split_indices", "make_loader", "as_batches", "RestrictedUnpickler", "UnsafePickleError",
           "safe_pickle_load",
           "derive_seed", "epoch_order", "global_batches", "ShareSampler", "share_loader",
           "DEFAULT_IMAGE_FOLDER_SIZE", "dataset_num_classes", "stored_image_sizes", "resize_note",
           "CachedImageDataset", "CacheRebuiltWarning", "cache_key", "open_cached_dataset"]
