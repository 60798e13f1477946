"""Arrays in ``.npz``: ``arr_0`` uint8 NHWC images (the ADM layout) plus labels.

Labels are read from ``labels`` or ``arr_1``; a file without labels is one
class (all zeros) and says so in a warning.
"""
from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np

from dcdit.data.base import DcditDataset, as_int_labels, check_labels, random_subset
from dcdit.data.config import DataConfig, DataError
from dcdit.data.transforms import convert_channels


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, H, W, C), int64 labels (N,)) from an ADM-style npz."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "arr_0" not in f.files:
                raise DataError(f"{path}: no 'arr_0' array (expected uint8 NHWC images), found {f.files}")
            images = f["arr_0"]
            key = "labels" if "labels" in f.files else ("arr_1" if "arr_1" in f.files else None)
            labels = f[key] if key else None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read npz file {path}: {e}") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(f"{path}: arr_0 must be uint8 (N, H, W[, C]), got {images.dtype} {images.shape}")
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] not in (1, 3):
        raise DataError(f"{path}: arr_0 must have 1 or 3 channels last, got shape {images.shape}")
    if labels is None:
        warnings.warn(f"{path}: no labels ('labels' or 'arr_1'); treating every image as class 0")
        labels = np.zeros(len(images), dtype=np.int64)
    labels = as_int_labels(np.asarray(labels).reshape(-1), f"{path}: {key}")
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


class NpzDataset(DcditDataset):
    def __init__(self, path: str | Path, channels: int | None = None, image_size: int | None = None,
                 num_classes: int | None = None, random_flip: bool = False):
        images, labels = read_npz(path)
        if images.shape[1] != images.shape[2]:
            raise DataError(f"{path}: images must be square, got {images.shape[1]}x{images.shape[2]}")
        if image_size is not None and image_size != images.shape[1]:
            from PIL import Image

            images = np.stack([np.asarray(Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im)
                                          .resize((image_size, image_size), Image.BICUBIC)) for im in images])
            images = images[..., None] if images.ndim == 3 else images
        self.images = convert_channels(images, channels or images.shape[-1])
        self.labels = labels
        self.channels, self.image_size = self.images.shape[-1], self.images.shape[1]
        self.num_classes = check_labels(labels, num_classes, str(path))
        self.is_latent, self.random_flip = False, random_flip

    def __getitem__(self, i: int):
        return self._finish(self.images[i], self.labels[i])


def build(cfg: DataConfig):
    if not cfg.path:
        raise DataError("data.path must name the .npz file for source 'npz'")
    ds = NpzDataset(cfg.path, cfg.channels, cfg.image_size, cfg.num_classes, cfg.random_flip)
    ds = random_subset(ds, cfg.num_samples, cfg.seed)
    return ds
