"""Precomputed VAE latents in memory-mappable shards (written by ``dcdit extract-features``).

Layout of a latents directory::

    index.json              format, shapes, scale, dtype, classes, shard list
    latents_00000.npy       (n, C, h, w) float16 or float32, already * 0.18215
    labels_00000.npy        (n,) int64
    latents_00001.npy ...

``index.json`` is written last, so a directory without it is an unfinished
extraction. The reader opens shards with ``np.load(mmap_mode="r")``: the
dataset costs no memory up front and pickles cheaply to DataLoader workers
(shards are reopened lazily in each process).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from dcdit.data.base import DcditDataset, SubsetDataset, check_labels
from dcdit.data.config import DataConfig, DataError

INDEX_NAME = "index.json"
FORMAT = "dcdit-latents"
VERSION = 1


class LatentShardWriter:
    """Append latents + labels; write a shard every ``shard_size`` items; ``close()`` writes the index.

    Args:
        out_dir: created if missing; an existing index there is an error unless ``overwrite``.
        shard_size: items per shard file.
        dtype: "float16" (half the disk, plenty for 0.18215-scaled latents) or "float32".
        meta: extra fields for index.json (image_size, class_names, vae, ...).
    """

    def __init__(self, out_dir: str | Path, shard_size: int = 4096, dtype: str = "float16",
                 meta: dict | None = None, overwrite: bool = False):
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / INDEX_NAME).exists() and not overwrite:
            raise DataError(f"{self.out_dir} already holds extracted latents ({INDEX_NAME}); "
                            "choose another --out or pass --overwrite")
        if (self.out_dir / INDEX_NAME).exists():
            os.remove(self.out_dir / INDEX_NAME)
        self.shard_size, self.dtype, self.meta = int(shard_size), dtype, dict(meta or {})
        self.shards: list[dict] = []
        self._z: list[np.ndarray] = []
        self._y: list[np.ndarray] = []
        self._pending = 0
        self.latent_shape: tuple[int, ...] | None = None

    def add(self, latents, labels) -> None:
        """Append a batch: latents (B, C, h, w) tensor/array, labels (B,)."""
        z = torch.as_tensor(latents).detach().cpu().numpy().astype(self.dtype)
        y = torch.as_tensor(labels).detach().cpu().numpy().astype(np.int64).reshape(-1)
        if z.ndim != 4 or len(z) != len(y):
            raise ValueError(f"expected latents (B, C, h, w) and B labels, got {z.shape} and {y.shape}")
        if self.latent_shape is None:
            self.latent_shape = tuple(z.shape[1:])
        elif tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"latent shape changed from {self.latent_shape} to {tuple(z.shape[1:])}")
        self._z.append(z)
        self._y.append(y)
        self._pending += len(z)
        while self._pending >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        z, y = np.concatenate(self._z), np.concatenate(self._y)
        k = len(self.shards)
        names = {"latents": f"latents_{k:05d}.npy", "labels": f"labels_{k:05d}.npy", "count": int(n)}
        np.save(self.out_dir / names["latents"], np.ascontiguousarray(z[:n]))
        np.save(self.out_dir / names["labels"], y[:n])
        self.shards.append(names)
        self._z, self._y = ([z[n:]], [y[n:]]) if n < len(z) else ([], [])
        self._pending = len(z) - n

    def close(self) -> dict:
        """Write the last shard and index.json; returns the index."""
        if self._pending:
            self._flush(self._pending)
        if not self.shards:
            raise DataError(f"no latents were written to {self.out_dir}")
        all_labels = np.concatenate([np.load(self.out_dir / s["labels"]) for s in self.shards])
        c, h, w = self.latent_shape
        index = {
            "format": FORMAT, "version": VERSION,
            "num_samples": int(sum(s["count"] for s in self.shards)),
            "latent_channels": c, "latent_size": h, "dtype": self.dtype,
            "num_classes": int(all_labels.max()) + 1,
            **self.meta,
            "shards": self.shards,
        }
        if h != w:
            raise DataError(f"latents must be square, got {h}x{w}")
        tmp = self.out_dir / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.out_dir / INDEX_NAME)
        return index


def read_index(path: str | Path) -> dict:
    """index.json of a latents directory, validated."""
    d = Path(path)
    if not d.exists():
        raise FileNotFoundError(f"latents directory not found: {d}")
    f = d / INDEX_NAME if d.is_dir() else d
    if not f.is_file():
        raise DataError(f"{d} has no {INDEX_NAME}: not a finished `dcdit extract-features` output")
    try:
        index = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {f}: {e}") from None
    if index.get("format") != FORMAT:
        raise DataError(f"{f} is not a dcdit latents index (format {index.get('format')!r})")
    return index


class LatentDataset(DcditDataset):
    """Items ``(z, y)``: z float32 (C, h, w), the stored latent (already scaled by 0.18215).

    Attributes beyond the common ones: ``index`` (the parsed index.json),
    ``latent_scale`` and ``pixel_size`` (image size the latents came from, if recorded).
    """

    def __init__(self, path: str | Path, num_classes: int | None = None, random_flip: bool = False):
        self.path = Path(path)
        self.index = read_index(self.path)
        self.root = self.path if self.path.is_dir() else self.path.parent
        counts = [int(s["count"]) for s in self.index["shards"]]
        self._offsets = np.cumsum([0] + counts)
        labels = []
        for s in self.index["shards"]:
            lf = self.root / s["labels"]
            if not lf.is_file():
                raise DataError(f"missing latent labels shard: {lf}")
            y = np.load(lf)
            if len(y) != s["count"]:
                raise DataError(f"{lf}: {len(y)} labels, index says {s['count']}")
            labels.append(y.astype(np.int64))
        self.labels = np.concatenate(labels)
        self.channels = int(self.index["latent_channels"])
        self.image_size = int(self.index["latent_size"])
        self.pixel_size = self.index.get("image_size")
        self.latent_scale = float(self.index.get("scale", 0.18215))
        self.num_classes = check_labels(self.labels, num_classes if num_classes is not None
                                        else self.index.get("num_classes"), f"latents {self.path}")
        self.is_latent, self.random_flip = True, bool(random_flip)
        self._shards: list[np.ndarray] | None = None
        self._open()  # validate every shard now; reopened lazily after pickling

    def _open(self) -> list[np.ndarray]:
        if self._shards is None:
            shards = []
            want = (self.channels, self.image_size, self.image_size)
            for s in self.index["shards"]:
                f = self.root / s["latents"]
                if not f.is_file():
                    raise DataError(f"missing latents shard: {f}")
                try:
                    a = np.load(f, mmap_mode="r")
                except (OSError, ValueError) as e:
                    raise DataError(f"cannot read latents shard {f}: {e}") from None
                if a.shape != (s["count"], *want):
                    raise DataError(f"{f}: shape {a.shape}, index says {(s['count'], *want)}")
                shards.append(a)
            self._shards = shards
        return self._shards

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_shards"] = None  # memmaps are reopened in the receiving process
        return state

    def __getitem__(self, i: int):
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} latents")
        i %= len(self)
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        z = torch.from_numpy(np.array(self._open()[k][i - self._offsets[k]], dtype=np.float32))
        if self.random_flip and torch.rand(()) < 0.5:
            z = z.flip(-1)
        return z, torch.tensor(int(self.labels[i]), dtype=torch.int64)


def build(cfg: DataConfig):
    if not cfg.path:
        raise DataError("data.path must name the latents directory for source 'latents'")
    ds = LatentDataset(cfg.path, cfg.num_classes, cfg.random_flip)
    if cfg.image_size is not None and cfg.image_size not in (ds.image_size, ds.pixel_size):
        raise DataError(f"{cfg.path}: latents are {ds.image_size}x{ds.image_size} "
                        f"(from {ds.pixel_size}px images), not image_size={cfg.image_size}")
    if cfg.channels is not None and cfg.channels != ds.channels:
        raise DataError(f"{cfg.path}: latents have {ds.channels} channels, not channels={cfg.channels}")
    if cfg.num_samples is not None and cfg.num_samples < len(ds):
        ds = SubsetDataset(ds, np.sort(np.random.default_rng(cfg.seed).choice(len(ds), cfg.num_samples, replace=False)))
    return ds
