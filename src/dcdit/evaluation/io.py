"""Sample I/O: ADM-format ``.npz`` batches and image folders as uint8 NHWC.

The ADM evaluation format (openai/guided-diffusion ``evaluations/``) is an
``.npz`` whose ``arr_0`` holds uint8 images shaped (N, H, W, C); class labels,
if any, sit in ``arr_1`` (ADM's sampler) or ``labels``.  Reference batches may
also carry FID statistics ``mu``/``sigma`` (see :mod:`dcdit.evaluation.stats`).

Everything here passes images around as uint8 (N, H, W, C) with C in {1, 3}.
:class:`ImageSource` lets large files be read in batches without loading the
whole array: ``.npz`` members are streamed from the zip archive.
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from dcdit.utils import atomic_write

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
LABEL_KEYS = ("arr_1", "labels")


# --------------------------------------------------------------------------- checks


def check_images(images, what: str = "images") -> np.ndarray:
    """Return ``images`` as a uint8 (N, H, W, C) numpy array with C in {1, 3}.

    Accepts numpy arrays or torch tensors; (N, H, W) is read as one channel.
    Raises ValueError naming the problem for any other dtype or shape.
    """
    if hasattr(images, "detach"):  # torch tensor
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(
            f"{what}: expected uint8 pixels in [0, 255], got dtype {images.dtype} "
            "(convert with dcdit.evaluation.to_uint8)"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{what}: expected shape (N, H, W, C) with C = 1 or 3, got {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{what}: no images (N = 0)")
    return images


def to_uint8(x) -> np.ndarray:
    """Convert float images in [-1, 1], NCHW or NHWC (C in {1, 3}), to uint8 NHWC.

    Rounds like ADM's sampler: ``((x + 1) * 127.5).clamp(0, 255).round()``.
    """
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"to_uint8: expected a 4-D batch, got shape {tuple(x.shape)}")
    if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_rgb(images: np.ndarray) -> np.ndarray:
    """Repeat a single channel three times; RGB input is returned unchanged."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def to_gray(images: np.ndarray) -> np.ndarray:
    """RGB -> one channel with ITU-R 601 luma (as PIL's ``convert("L")``)."""
    if images.shape[-1] == 1:
        return images
    w = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.round(images.astype(np.float32) @ w), 0, 255).astype(np.uint8)[..., None]


def check_labels(labels, n: int, what: str = "labels") -> np.ndarray:
    """Return labels as an int64 (N,) array; ValueError if the shape is wrong."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{what}: expected shape ({n},), got {tuple(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what}: expected integer class labels, got dtype {labels.dtype}")
    return labels.astype(np.int64)


# --------------------------------------------------------------------------- npz


def save_samples_npz(path, images, labels=None) -> Path:
    """Write images (uint8 NHWC) and optional labels in ADM format (``arr_0``, ``arr_1``)."""
    images = check_images(images)
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: sample files must end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = check_labels(labels, images.shape[0])
    save_npz_atomic(path, arrays)
    return path


def save_npz_atomic(path, arrays: dict) -> Path:
    """``np.savez`` into a temporary file renamed onto ``path``: a crash never leaves half a file."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write)
    return Path(path)


def load_samples_npz(path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an ADM-format ``.npz``: (images uint8 NHWC, labels int64 or None)."""
    path = _existing(path)
    with np.load(path) as f:
        if "arr_0" not in f.files:
            raise ValueError(f"{path}: no 'arr_0' image array (keys: {', '.join(f.files)})")
        images = check_images(f["arr_0"], what=f"{path}: arr_0")
        labels = None
        for key in LABEL_KEYS:
            if key in f.files:
                labels = check_labels(f[key], images.shape[0], what=f"{path}: {key}")
                break
    return images, labels


def npz_keys(path) -> list[str]:
    """Names of the arrays in an ``.npz`` (without reading them)."""
    path = _existing(path)
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] if n.endswith(".npy") else n for n in z.namelist()]
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not a valid .npz file ({e})") from None


def _read_npy_header(fh):
    """(shape, fortran_order, dtype) of an open ``.npy`` stream, positioned at the data."""
    major, _ = np.lib.format.read_magic(fh)
    if major == 1:
        return np.lib.format.read_array_header_1_0(fh)
    return np.lib.format.read_array_header_2_0(fh)


def _npz_member_header(z: zipfile.ZipFile, key: str, path) -> tuple[tuple, np.dtype]:
    with z.open(key + ".npy") as fh:
        shape, fortran, dtype = _read_npy_header(fh)
    if fortran:
        raise ValueError(f"{path}: {key} is stored in Fortran order; re-save it with np.savez")
    return shape, dtype


def iter_npz_batches(path, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """Stream ``key`` of an ``.npz`` in batches along axis 0 (works for compressed files)."""
    with zipfile.ZipFile(path) as z, z.open(key + ".npy") as fh:
        shape, fortran, dtype = _read_npy_header(fh)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}: {key} cannot be streamed (Fortran order or object dtype)")
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            buf = fh.read(n * row)
            if len(buf) != n * row:
                raise ValueError(f"{path}: {key} is truncated")
            yield np.frombuffer(bytearray(buf), dtype=dtype).reshape((n,) + tuple(shape[1:]))


# --------------------------------------------------------------------------- folders


def list_image_files(folder) -> list[Path]:
    """Image files (PNG/JPG) under ``folder``, recursively, in sorted order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images found")
    return files


def _folder_channels(files: list[Path]) -> int:
    """3 unless every image is grayscale (then 1); reads only the headers."""
    from PIL import Image

    for p in files:
        with Image.open(p) as im:
            if im.mode not in ("L", "LA", "1", "I", "I;16", "F"):
                return 3
    return 1


def _read_image(p: Path, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(p) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        a = np.asarray(im, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


def load_image_folder(folder) -> np.ndarray:
    """All PNG/JPG images under ``folder`` as one uint8 (N, H, W, C) array.

    C is 1 when every image is grayscale, else 3 (grayscale images are then
    expanded, RGBA/palette images converted to RGB).  All images must share
    one size; ValueError names the first one that does not.
    """
    src = FolderImages(folder)
    return np.concatenate(list(src.iter_batches(256)), axis=0)


# --------------------------------------------------------------------------- sources


class ImageSource:
    """A set of uint8 NHWC images read in batches.

    Attributes: ``name`` (for reports), ``num_images``, ``channels``,
    ``image_size`` (H, W), ``labels`` (int64 array or None).
    """

    name: str = "images"
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return self.num_images

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hex digest of the image content (used as a cache key)."""
        raise NotImplementedError


class ArrayImages(ImageSource):
    """Images already in memory."""

    def __init__(self, images, labels=None, name: str = "array"):
        self.images = check_images(images)
        self.num_images = self.images.shape[0]
        self.channels = self.images.shape[-1]
        self.image_size = self.images.shape[1:3]
        self.labels = None if labels is None else check_labels(labels, self.num_images)
        self.name = name

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, self.num_images, batch_size):
            yield self.images[i : i + batch_size]

    def fingerprint(self) -> str:
        h = hashlib.sha1(str(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).data)
        return h.hexdigest()


class NpzImages(ImageSource):
    """``arr_0`` of an ADM-format ``.npz``, streamed from disk; ``limit`` keeps the first N."""

    def __init__(self, path, limit: int | None = None):
        self.path = _existing(path)
        self.name = str(path)
        keys = npz_keys(self.path)
        if "arr_0" not in keys:
            raise ValueError(f"{self.path}: no 'arr_0' image array (keys: {', '.join(keys)})")
        with zipfile.ZipFile(self.path) as z:
            shape, dtype = _npz_member_header(z, "arr_0", self.path)
        if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
            raise ValueError(
                f"{self.path}: arr_0 must be uint8 (N, H, W, C) with C = 1 or 3, "
                f"got {dtype} {tuple(shape)}"
            )
        self.num_images = _apply_limit(shape[0], limit, self.path)
        self.limit = limit
        self.channels = shape[3] if len(shape) == 4 else 1
        self.image_size = tuple(shape[1:3])
        self.labels = None
        for key in LABEL_KEYS:
            if key in keys:
                with np.load(self.path) as f:
                    lab = check_labels(f[key], shape[0], what=f"{self.path}: {key}")
                self.labels = lab[: self.num_images]
                break

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        left = self.num_images
        for b in iter_npz_batches(self.path, "arr_0", batch_size):
            if left <= 0:
                break
            b = b[:left]
            left -= b.shape[0]
            yield b[..., None] if b.ndim == 3 else b

    def fingerprint(self) -> str:
        h = _hash_file(self.path)
        h.update(f"limit={self.num_images}".encode())
        return h.hexdigest()


class FolderImages(ImageSource):
    """PNG/JPG files under a folder (recursive, sorted by path)."""

    def __init__(self, folder, limit: int | None = None):
        self.path = Path(folder)
        self.name = str(folder)
        files = list_image_files(self.path)
        self.num_images = _apply_limit(len(files), limit, self.path)
        self.files = files[: self.num_images]
        self.channels = _folder_channels(self.files)
        first = _read_image(self.files[0], self.channels)
        self.image_size = first.shape[:2]
        self.labels = None

    def iter_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, self.num_images, batch_size):
            batch = []
            for p in self.files[i : i + batch_size]:
                a = _read_image(p, self.channels)
                if a.shape[:2] != tuple(self.image_size):
                    raise ValueError(
                        f"{p}: size {a.shape[1]}x{a.shape[0]} differs from the first image's "
                        f"{self.image_size[1]}x{self.image_size[0]}"
                    )
                batch.append(a)
            yield np.stack(batch)

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for p in self.files:
            h.update(str(p.relative_to(self.path)).encode() + b"\0")
            h.update(_hash_file(p).digest())
        return h.hexdigest()


def open_images(path, limit: int | None = None) -> ImageSource:
    """An :class:`ImageSource` for an ADM ``.npz`` or an image folder."""
    p = Path(path)
    if p.is_dir():
        return FolderImages(p, limit=limit)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.suffix != ".npz":
        raise ValueError(f"{p}: expected an .npz file or an image folder")
    return NpzImages(p, limit=limit)


# --------------------------------------------------------------------------- helpers


def _existing(path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    return p


def _apply_limit(n: int, limit: int | None, path) -> int:
    if limit is None:
        return n
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    return min(n, limit)


def _hash_file(path, chunk: int = 1 << 20):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h


def file_sha1(path) -> str:
    """Hex SHA-1 of a file's bytes."""
    return _hash_file(_existing(path)).hexdigest()


__all__ = [
    "ArrayImages",
    "FolderImages",
    "ImageSource",
    "NpzImages",
    "check_images",
    "check_labels",
    "file_sha1",
    "iter_npz_batches",
    "list_image_files",
    "load_image_folder",
    "load_samples_npz",
    "npz_keys",
    "open_images",
    "save_npz_atomic",
    "save_samples_npz",
    "to_gray",
    "to_rgb",
    "to_uint8",
]

