"""Precomputed VAE latents in memory-mappable shards (written by ``dcdit extract-features``).

A latents directory holds::

    index.json          format, item count, shard list with counts, latent shape,
                        pixel image_size, classes, scale, VAE path, dtype
    latents-00000.npy   (n, C, h, w) float16 or float32, already multiplied by 0.18215
    labels-00000.npy    (n,) int64
    latents-00001.npy   ...

Every file is written to a temporary name and renamed when complete, and
``index.json`` is written last: an interrupted extraction leaves whole shards
but no index, which the reader refuses. Shards are opened with
``np.load(mmap_mode="r")``, so a dataset costs almost no memory up front and
pickles cheaply to DataLoader workers (each process reopens the shards).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from dcdit.data.base import DcditDataset, as_int_labels, check_labels, random_subset
from dcdit.data.config import DataConfig, DataError
from dcdit.utils import atomic_write, save_json

INDEX_NAME = "index.json"
FORMAT = "dcdit-latents"
VERSION = 1
DTYPES = ("float16", "float32")
DEFAULT_SCALE = 0.18215  # same as dcdit.data.vae.SCALE (not imported: that module is for diffusers users)
_SHARD_RE = re.compile(r"^(\.?(latents|labels)-\d{5,}\.npy|\.index\.json)(\..*\.tmp)?$")

__all__ = ["LatentsDataset", "LatentDataset", "LatentShardWriter", "read_index", "shard_names", "build"]


def shard_names(k: int) -> tuple[str, str]:
    """File names of shard ``k``: (latents, labels)."""
    return f"latents-{k:05d}.npy", f"labels-{k:05d}.npy"


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` through a temporary file renamed into place (never a half-written ``path``)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a bare name
            np.save(f, arr)

    atomic_write(path, write)


def existing_outputs(out_dir: str | Path) -> list[Path]:
    """Files of an earlier extraction in ``out_dir`` (index, shards, leftover temporaries)."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if _SHARD_RE.match(p.name)]
    if (d / INDEX_NAME).exists():
        found.insert(0, d / INDEX_NAME)
    return found


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Fail early if ``out_dir`` is unusable or already holds latents (unless ``overwrite``)."""
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise DataError(f"output path {d} is a file, not a directory")
    old = existing_outputs(d)
    if old and not overwrite:
        what = "extracted latents (index.json)" if old[0].name == INDEX_NAME else \
            "shards of an unfinished extraction (no index.json)"
        raise DataError(f"{d} already holds {what}; choose another --out or pass --overwrite")


class LatentShardWriter:
    """Append latents + labels; every ``shard_size`` items a shard is written; ``close()`` writes the index.

    Args:
        out_dir: created if missing. One holding an earlier extraction is an error
            unless ``overwrite``, which deletes its index first, then its shards.
        shard_size: items per shard file (the last one may be shorter).
        dtype: stored dtype, "float32" or "float16" (half the disk; ample for scaled latents).
        meta: extra index fields (image_size, class_names, num_classes, scale, vae, ...).
    """

    def __init__(self, out_dir: str | Path, shard_size: int = 4096, dtype: str = "float32",
                 meta: dict | None = None, overwrite: bool = False):
        if int(shard_size) <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.out_dir = Path(out_dir)
        check_out_dir(self.out_dir, overwrite)
        for p in existing_outputs(self.out_dir):  # index first: the directory never describes a mix
            p.unlink()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size, self.dtype, self.meta = int(shard_size), dtype, dict(meta or {})
        self.shards: list[dict] = []
        self._z: list[np.ndarray] = []
        self._y: list[np.ndarray] = []
        self._pending = 0
        self._labels: list[np.ndarray] = []
        self.latent_shape: tuple[int, ...] | None = None

    @property
    def num_items(self) -> int:
        """Items added so far (written or pending)."""
        return sum(s["count"] for s in self.shards) + self._pending

    def add(self, latents, labels) -> None:
        """Append a batch: latents (B, C, h, w) tensor or array, labels (B,)."""
        z = torch.as_tensor(latents).detach().cpu().numpy().astype(self.dtype)
        y = torch.as_tensor(labels).detach().cpu().numpy().astype(np.int64).reshape(-1)
        if z.ndim != 4 or len(z) != len(y):
            raise ValueError(f"expected latents (B, C, h, w) and B labels, got {z.shape} and {y.shape}")
        if z.shape[2] != z.shape[3]:
            raise ValueError(f"latents must be square, got {z.shape[2]}x{z.shape[3]}")
        if self.latent_shape is None:
            self.latent_shape = tuple(int(s) for s in z.shape[1:])
        elif tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"latent shape changed from {self.latent_shape} to {tuple(z.shape[1:])}")
        self._z.append(z)
        self._y.append(y)
        self._pending += len(z)
        while self._pending >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        z, y = np.concatenate(self._z), np.concatenate(self._y)
        lat_name, lab_name = shard_names(len(self.shards))
        _save_npy(self.out_dir / lat_name, np.ascontiguousarray(z[:n]))
        _save_npy(self.out_dir / lab_name, y[:n])
        self.shards.append({"latents": lat_name, "labels": lab_name, "count": int(n)})
        self._labels.append(y[:n])
        self._z, self._y = ([z[n:]], [y[n:]]) if n < len(z) else ([], [])
        self._pending = len(z) - n

    def close(self, extra: dict | None = None) -> dict:
        """Write the last shard, then ``index.json`` (plus ``extra`` fields); returns the index."""
        if self._pending:
            self._flush(self._pending)
        if not self.shards:
            raise DataError(f"no latents were written to {self.out_dir}")
        labels = np.concatenate(self._labels)
        meta = {**self.meta, **(extra or {})}
        c, h, _ = self.latent_shape
        index = {
            "format": FORMAT, "version": VERSION,
            "num_items": int(len(labels)),
            "latent_shape": [c, h, h], "latent_size": h, "latent_channels": c,
            "dtype": self.dtype, "scale": DEFAULT_SCALE,
            **meta,
            "num_classes": check_labels(labels, meta.get("num_classes"), str(self.out_dir)),
            "shards": self.shards,
        }
        save_json(self.out_dir / INDEX_NAME, index)
        return index


def read_index(path: str | Path) -> dict:
    """The validated ``index.json`` of a latents directory (or the index file itself)."""
    d = Path(path)
    if not d.exists():
        raise FileNotFoundError(f"latents directory not found: {d}")
    f = d / INDEX_NAME if d.is_dir() else d
    if not f.is_file():
        hint = " (shards without an index: the extraction was interrupted; rerun it)" \
            if existing_outputs(d) else ""
        raise DataError(f"{d} has no {INDEX_NAME}: not a finished `dcdit extract-features` output{hint}")
    try:
        index = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {f}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{f} is not a dcdit latents index (format {index.get('format') if isinstance(index, dict) else None!r})")
    if int(index.get("version", 0)) > VERSION:
        raise DataError(f"{f} has format version {index['version']}; this dcdit reads up to {VERSION} (upgrade dcdit)")
    for key in ("num_items", "latent_shape", "shards"):
        if key not in index:
            raise DataError(f"{f} lacks the field {key!r}")
    shards = index["shards"]
    if not shards or not all(isinstance(s, dict) and {"latents", "labels", "count"} <= s.keys() for s in shards):
        raise DataError(f"{f}: 'shards' must be a non-empty list of {{latents, labels, count}}")
    total = sum(int(s["count"]) for s in shards)
    if total != int(index["num_items"]):
        raise DataError(f"{f}: shard count mismatch: shards hold {total} items, num_items says {index['num_items']}")
    shape = index["latent_shape"]
    if len(shape) != 3 or shape[1] != shape[2]:
        raise DataError(f"{f}: latent_shape must be [C, h, h], got {shape}")
    return index


class LatentsDataset(DcditDataset):
    """Items ``(z, y)``: z float32 (C, h, w), the stored latent (already scaled); y int64.

    ``image_size`` is the latent side; ``pixel_size`` the image size the latents
    were extracted at. Also ``index`` (parsed index.json), ``class_names``, ``scale``.
    ``random_flip`` mirrors the latent grid (an approximation of flipping the image);
    ``in_memory`` loads the shards into RAM instead of memory-mapping them.
    """

    def __init__(self, path: str | Path, num_classes: int | None = None, random_flip: bool = False,
                 in_memory: bool = False):
        self.path = Path(path)
        self.index = read_index(self.path)
        self.root = self.path if self.path.is_dir() else self.path.parent
        shards = self.index["shards"]
        self._offsets = np.cumsum([0] + [int(s["count"]) for s in shards])
        labels = []
        for s in shards:
            f = self.root / s["labels"]
            if not f.is_file():
                raise DataError(f"missing labels shard: {f}")
            try:
                y = np.load(f, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read labels shard {f}: {e}") from None
            if y.ndim != 1 or len(y) != int(s["count"]):
                raise DataError(f"shard count mismatch: {f} holds {y.shape} labels, {INDEX_NAME} says {s['count']}")
            labels.append(as_int_labels(y, f"labels shard {f}"))
        self.labels = np.concatenate(labels)
        c, h, _ = (int(v) for v in self.index["latent_shape"])
        self.channels, self.image_size = c, h
        self.pixel_size = self.index.get("image_size")
        self.class_names = self.index.get("class_names")
        self.scale = self.latent_scale = float(self.index.get("scale", DEFAULT_SCALE))
        self.num_classes = check_labels(self.labels, num_classes if num_classes is not None
                                        else self.index.get("num_classes"), f"latents {self.path}")
        self.is_latent, self.random_flip, self.in_memory = True, bool(random_flip), bool(in_memory)
        self._shards: list[np.ndarray] | None = None
        self._open()  # validate every shard now; after pickling they are reopened lazily

    def _open(self) -> list[np.ndarray]:
        if self._shards is None:
            shards = []
            for s in self.index["shards"]:
                f = self.root / s["latents"]
                if not f.is_file():
                    raise DataError(f"missing latents shard: {f}")
                try:
                    a = np.load(f, mmap_mode=None if self.in_memory else "r", allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise DataError(f"cannot read latents shard {f}: {e}") from None
                want = (int(s["count"]), self.channels, self.image_size, self.image_size)
                if a.shape != want:
                    what = "shard count mismatch" if a.shape[1:] == want[1:] else "wrong latent shape"
                    raise DataError(f"{what}: {f} has shape {a.shape}, {INDEX_NAME} says {want}")
                shards.append(a)
            self._shards = shards
        return self._shards

    def __getstate__(self):
        state = self.__dict__.copy()
        if not self.in_memory:
            state["_shards"] = None  # memory maps are reopened in the receiving process
        return state

    def __getitem__(self, i):
        i = int(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} latents")
        i %= n
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        z = torch.from_numpy(np.array(self._open()[k][i - self._offsets[k]], dtype=np.float32))
        if self.random_flip and torch.rand(()) < 0.5:
            z = z.flip(-1)
        return z, torch.tensor(int(self.labels[i]), dtype=torch.int64)


LatentDataset = LatentsDataset  # alias


def build(cfg: DataConfig):
    if not cfg.path:
        raise DataError("data.path must name the latents directory for source 'latents'")
    ds = LatentsDataset(cfg.path, cfg.num_classes, cfg.random_flip, bool(cfg.in_memory))
    if cfg.image_size is not None and cfg.image_size not in (ds.image_size, ds.pixel_size):
        raise DataError(f"{cfg.path}: latents are {ds.image_size}x{ds.image_size}, extracted from "
                        f"{ds.pixel_size}px images, not image_size={cfg.image_size} (give either size)")
    if cfg.channels is not None and cfg.channels != ds.channels:
        raise DataError(f"{cfg.path}: latents have {ds.channels} channels, not channels={cfg.channels}")
    ds = random_subset(ds, cfg.num_samples, cfg.seed)
    return ds
