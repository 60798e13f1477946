"""Image folders: one sub-folder per class (sorted names -> labels 0..K-1).

Images are centre-cropped and resized like DiT (box downsampling while the
image is at least twice the target, then bicubic, then a centre crop).
Unreadable files raise an error naming the file, or, with
``skip_corrupt=True``, are skipped and counted in one warning.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from dcdit.data.base import DcditDataset, check_labels, random_subset
from dcdit.data.config import DataConfig, DataError
from dcdit.data.transforms import center_crop_arr, convert_channels

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: expected one sub-folder of images per class, found none")
    files, labels = [], []
    for k, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                files.append(f)
                labels.append(k)
    if not files:
        raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in its class folders")
    return files, np.asarray(labels, dtype=np.int64), classes


def load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """uint8 (image_size, image_size, channels); DataError naming the file if it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            arr = np.asarray(center_crop_arr(im, image_size))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return convert_channels(arr[..., None] if arr.ndim == 2 else arr, channels)


class ImageFolderDataset(DcditDataset):
    """Images from ``root/<class>/**``, centre-cropped to ``image_size``; labels from sorted class names.

    ``in_memory`` (None: when the crops fit in ~1 GiB) decodes everything once up front.
    ``skip_corrupt`` drops unreadable files (count in ``num_skipped``, one warning);
    otherwise the first unreadable file raises `DataError` naming it.
    """

    def __init__(self, root: str | Path, image_size: int = 256, channels: int = 3, num_classes: int | None = None,
                 skip_corrupt: bool = False, random_flip: bool = False, in_memory: bool | None = None):
        files, labels, self.class_names = list_image_folder(root)
        self.image_size, self.channels, self.random_flip, self.is_latent = image_size, channels, random_flip, False
        if in_memory is None:
            in_memory = len(files) * image_size**2 * channels <= (1 << 30)
        self.images = None
        self.num_skipped = 0  # unreadable files dropped by skip_corrupt
        if in_memory or skip_corrupt:  # decoding up front finds the corrupt files once
            images, keep, bad = [], [], 0
            for i, f in enumerate(files):
                try:
                    images.append(load_image(f, image_size, channels))
                    keep.append(i)
                except DataError:
                    if not skip_corrupt:
                        raise
                    bad += 1
            self.num_skipped = bad
            if bad:
                warnings.warn(f"{root}: skipped {bad} unreadable image(s) of {len(files)}")
            if not keep:
                raise DataError(f"{root}: no readable images")
            files, labels = [files[i] for i in keep], labels[keep]
            self.images = np.stack(images) if in_memory else None
        self.files, self.labels = files, labels
        self.num_classes = check_labels(labels, num_classes or len(self.class_names), str(root))

    def __getitem__(self, i: int):
        img = self.images[i] if self.images is not None else load_image(self.files[i], self.image_size, self.channels)
        return self._finish(img, self.labels[i])


def build(cfg: DataConfig):
    if not cfg.path:
        raise DataError("data.path must name the image folder for source 'folder'")
    ds = ImageFolderDataset(cfg.path, cfg.image_size or 256, cfg.channels or 3, cfg.num_classes, cfg.skip_corrupt,
                            cfg.random_flip, cfg.in_memory)
    ds = random_subset(ds, cfg.num_samples, cfg.seed)
    return ds
