"""Data sources behind one interface: ``build_dataset(DataConfig) -> Dataset`` of (x, y)."""
from __future__ import annotations

import importlib

from dcdit.data.base import DcditDataset, SubsetDataset
from dcdit.data.config import SOURCES, DataConfig, DataError
from dcdit.data.shapes import ShapesDataset
from dcdit.data.transforms import from_uint8_images, to_uint8_images
from dcdit.data.vae import LATENT_SCALE, decode_latents, encode_images, load_vae

__all__ = ["DataConfig", "DataError", "DcditDataset", "SubsetDataset", "SOURCES", "build_dataset",
           "to_uint8_images", "from_uint8_images", "LATENT_SCALE", "load_vae", "encode_images", "decode_latents"]


def build_dataset(cfg: DataConfig):
    """The dataset ``cfg`` describes (see :class:`DataConfig`)."""
    if cfg.source == "shapes":
        return ShapesDataset(
            num_samples=cfg.num_samples or 10000, image_size=cfg.image_size or 32, channels=cfg.channels or 3,
            num_classes=cfg.num_classes or 10, seed=cfg.seed, random_flip=cfg.random_flip, in_memory=cfg.in_memory,
        )
    try:
        module = importlib.import_module(f"dcdit.data.{cfg.source}")
    except ModuleNotFoundError as e:
        raise DataError(f"data source {cfg.source!r} is not available in this build ({e})") from None
    return module.build(cfg)
