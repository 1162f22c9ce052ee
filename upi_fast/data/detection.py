"""Opening a dataset folder by its layout (CIFAR-10 or ImageFolder) and what it says about itself
(classes, stored image sizes, resizing)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from .readers import CIFAR10Batches, DEFAULT_IMAGE_FOLDER_SIZE, _CIFAR_TEST, _cifar_dir, cifar10, image_folder, _existing_dir


# --------------------------------------------------------------------------------------------- auto-detection


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
