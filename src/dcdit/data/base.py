"""The common face of every dcdit dataset.

All datasets are plain map-style ``torch.utils.data.Dataset`` objects (so a
``DistributedSampler`` just works) whose items are ``(x, y)``:

* ``x``: float32 tensor (channels, image_size, image_size); pixels in [-1, 1],
  or a VAE latent already multiplied by 0.18215 when ``is_latent``;
* ``y``: int64 scalar tensor, the class.

and which expose ``channels``, ``image_size`` (spatial size of ``x``),
``num_classes``, ``is_latent`` and ``labels`` (int64 numpy array, one per item).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from dcdit.data.config import MAX_CLASSES
from dcdit.data.transforms import from_uint8_images


class DcditDataset(Dataset):
    """Base class: holds the shared attributes and the uint8 -> tensor step."""

    channels: int
    image_size: int
    num_classes: int
    is_latent: bool = False
    random_flip: bool = False
    labels: np.ndarray

    def __len__(self) -> int:
        return int(len(self.labels))

    def _finish(self, img_u8: np.ndarray, label: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 HWC image + label -> (float CHW in [-1, 1], int64), flipping at random if asked."""
        x = from_uint8_images(img_u8)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.contiguous(), torch.tensor(int(label), dtype=torch.int64)

    def describe(self) -> str:
        """One line for logs, e.g. ``shapes: 10000 x (3, 32, 32), 10 classes``."""
        kind = "latents" if self.is_latent else "images"
        return (f"{type(self).__name__}: {len(self)} {kind} of shape "
                f"({self.channels}, {self.image_size}, {self.image_size}), {self.num_classes} classes")


class SubsetDataset(DcditDataset):
    """A fixed subset of another dcdit dataset, keeping its attributes."""

    def __init__(self, base: DcditDataset, indices: np.ndarray):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.channels, self.image_size = base.channels, base.image_size
        self.num_classes, self.is_latent = base.num_classes, base.is_latent
        self.labels = np.asarray(base.labels)[self.indices]

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]

    def __getattr__(self, name: str):
        # Forward source-specific helpers (e.g. shapes' detail_map) through the index map.
        if name in ("detail_map", "get_with_detail"):
            fn = getattr(self.base, name)
            return lambda i: fn(int(self.indices[i]))
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


def as_int_labels(labels, what: str) -> np.ndarray:
    """Labels as int64, refusing values that an integer cast would change (2.5, NaN, 1e30)."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iu":
        if labels.dtype.kind == "u" and labels.size and labels.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{what}: label {int(labels.max())} is not a class index")
        return labels.astype(np.int64)
    if labels.dtype.kind == "b":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels)) | (np.abs(labels) > 2.0 ** 62)
        if bad.any():
            raise ValueError(f"{what}: labels must be whole numbers (class indices), found {labels[bad].flat[0].item()!r}")
        return labels.astype(np.int64)
    raise ValueError(f"{what}: labels must be integers (class indices), got dtype {labels.dtype}")


def random_subset(ds: DcditDataset, num_samples: int | None, seed: int) -> DcditDataset:
    """``num_samples`` items of ``ds`` drawn without replacement by ``seed``, in index order (all when None or more)."""
    if num_samples is None or num_samples >= len(ds):
        return ds
    return SubsetDataset(ds, np.sort(np.random.default_rng(seed).choice(len(ds), num_samples, replace=False)))


def check_labels(labels: np.ndarray, num_classes: int | None, what: str) -> int:
    """Validate integer labels and return the class count to use."""
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{what}: labels must be non-negative, found {int(labels.min())}")
    if labels.size and labels.max() >= MAX_CLASSES:
        raise ValueError(f"{what}: label {int(labels.max())} is too large: labels are class indices "
                         f"0..num_classes-1 with at most {MAX_CLASSES} classes")
    needed = int(labels.max()) + 1 if labels.size else 1
    if num_classes is None:
        return needed
    if num_classes < needed:
        raise ValueError(f"{what}: num_classes={num_classes} but labels go up to {needed - 1}")
    return int(num_classes)
