"""Plain image grids (numpy / PIL, no matplotlib) and PNG writing."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from dcdit.utils import atomic_write

__all__ = ["image_grid", "save_png"]


def image_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """uint8 (N, H, W, C) -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) image, row-major."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"image_grid expects uint8 (N, H, W, C) images, got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("image_grid: no images")
    ncols = max(1, min(n, ncols or int(math.ceil(math.sqrt(n)))))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write a uint8 HWC (C = 1 or 3) or HW image as PNG (atomically); returns the path."""
    from PIL import Image


    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: image files must end in .png")
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    pil = Image.fromarray(image)
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))
    return path
