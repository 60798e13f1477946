"""Built-in procedural dataset: textured shapes on flat or gently graded backgrounds.

Why: a data set that needs no download, trains in minutes on a CPU, and has a
known answer to "where is the detail?", so the router's boundary map can be
scored against ground truth (ROC-AUC of p against ``detail_map``).

Each image holds one object. Its class fixes two things a classifier can see:

* the shape kind: circle, square, triangle (pointing up), ring, plus-cross;
* the texture: stripes, checker, dots, or solid (no texture).

Class ``c`` has kind ``c % 5`` and texture ``(c % 5 + c // 5) % 4``, so the 20
(kind, texture) pairs are all distinct and the default 10 classes use every
kind twice and every texture at least twice.

Everything else is per-image nuisance drawn from a counter-based hash of
``(seed, index)`` (so item ``i`` is the same whatever else is generated):
position, size, small rotation, texture period / phase / stripe angle, colours
(dark background with bright object or the reverse, guaranteed contrast) and
an optional gentle linear background gradient. Labels are balanced:
``y = index % num_classes``.

The detail map marks pixels where the clean picture (before the background
gradient) changes by more than a threshold within the pixel's 4-neighbourhood:
the object's outline and its texture transitions. Flat object interiors
(solid class, wide stripes' centres) and the background are not detail.

Rendering is vectorised over images with numpy: 10k images of 32 x 32 take
one to three seconds on one CPU core.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from dcdit.data.base import DcditDataset

KINDS = ("circle", "square", "triangle", "ring", "cross")
TEXTURES = ("stripes", "checker", "dots", "solid")
MAX_CLASSES = len(KINDS) * len(TEXTURES)
DETAIL_THRESHOLD = 0.1  # local intensity change (in [0, 1] units) that counts as detail


def class_spec(c: int) -> tuple[str, str]:
    """(shape kind, texture) of class ``c``."""
    if not 0 <= c < MAX_CLASSES:
        raise ValueError(f"shapes has {MAX_CLASSES} classes, got class {c}")
    k = c % len(KINDS)
    return KINDS[k], TEXTURES[(k + c // len(KINDS)) % len(TEXTURES)]


# --------------------------------------------------------------------------- hashing
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class _Draws:
    """Independent uniform [0, 1) streams per (seed, index): ``draws(k)`` is stream k."""

    def __init__(self, seed: int, indices: np.ndarray):
        with np.errstate(over="ignore"):
            s = _splitmix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
            self.keys = _splitmix(s ^ indices.astype(np.uint64))

    def __call__(self, stream: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            z = _splitmix(self.keys + np.uint64(stream) * np.uint64(0xD1B54A32D192ED03))
        return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --------------------------------------------------------------------------- geometry
def _sdf(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (in units of the object radius; < 0 inside) in local coordinates."""
    if kind == "circle":
        return np.sqrt(u * u + v * v) - 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.82
    if kind == "triangle":
        # Equilateral, pointing up (v grows downwards in image rows): inradius 0.55.
        d = v - 0.55
        for ang in (math.radians(210.0), math.radians(330.0)):
            d = np.maximum(d, u * math.cos(ang) + v * math.sin(ang) - 0.55)
        return d
    if kind == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.7) - 0.3
    if kind == "cross":
        a, b = 1.0, 0.36
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - a, av - b), np.maximum(au - b, av - a))
    raise ValueError(kind)


def _texture(tex: str, tu, tv, period, phase, dot_r) -> np.ndarray:
    """Texture field in [0, 1] (0: object colour, 1: second colour); pixel units."""
    if tex == "solid":
        return np.zeros_like(tu)
    if tex == "stripes":
        return np.clip(0.5 + 1.5 * np.sin(2 * np.pi * tu / period + phase), 0.0, 1.0)
    if tex == "checker":
        cell = period / 2
        return ((np.floor(tu / cell + phase) + np.floor(tv / cell + phase)) % 2).astype(np.float32)
    if tex == "dots":
        fu = (tu / period + phase) % 1.0 - 0.5
        fv = (tv / period + phase) % 1.0 - 0.5
        dist = np.sqrt(fu * fu + fv * fv) * period
        return np.clip(dot_r + 0.5 - dist, 0.0, 1.0)
    raise ValueError(tex)


def _colours(lum: np.ndarray, hue: np.ndarray, sat: np.ndarray, channels: int) -> np.ndarray:
    """(n,) luminance/hue/saturation -> (n, channels) colours in [0, 1] with mean ~ lum."""
    if channels == 1:
        return lum[:, None]
    phases = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
    chroma = 0.5 * np.cos(hue[:, None] - phases[None])  # zero mean over channels
    return np.clip(lum[:, None] + sat[:, None] * chroma, 0.0, 1.0)


def render_shapes(seed: int, indices, image_size: int = 32, channels: int = 3,
                  num_classes: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render items ``indices`` of the shapes dataset.

    Returns ``(images uint8 (n, S, S, C), labels int64 (n,), detail bool (n, S, S))``.
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"shapes supports 1..{MAX_CLASSES} classes, got {num_classes}")
    if channels not in (1, 3):
        raise ValueError(f"shapes supports 1 or 3 channels, got {channels}")
    if image_size < 8:
        raise ValueError(f"shapes needs image_size >= 8, got {image_size}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    n, S, f32 = len(idx), int(image_size), np.float32
    labels = idx % num_classes
    r = _Draws(seed, idx)
    scale = S / 32.0

    # Object placement: centre, radius (pixels), small rotation.
    rad = (0.26 + 0.10 * r(0)) * S
    cx = S / 2 + (r(1) - 0.5) * (S - 2.2 * rad)
    cy = S / 2 + (r(2) - 0.5) * (S - 2.2 * rad)
    rot = np.radians((r(3) - 0.5) * 40.0)
    # Texture parameters (pixel units, scaled with the image).
    period = (4.0 + 2.5 * r(4)) * scale
    phase = r(5) * 2 * np.pi
    tex_angle = r(6) * np.pi
    dot_r = (0.9 + 0.5 * r(7)) * scale
    # Colours: dark background + bright object, or the reverse (chosen by r(8)).
    dark_bg = r(8) < 0.5
    lum_bg = np.where(dark_bg, 0.05 + 0.2 * r(9), 0.75 + 0.2 * r(9))
    lum_obj = np.where(dark_bg, 0.75 + 0.2 * r(10), 0.05 + 0.2 * r(10))
    lum_tex = 0.42 + 0.16 * r(11)
    bg = _colours(lum_bg, r(12) * 2 * np.pi, 0.3 * r(13), channels)
    obj = _colours(lum_obj, r(14) * 2 * np.pi, 0.5 * r(15), channels)
    tex_col = _colours(lum_tex, r(16) * 2 * np.pi, 0.6 * r(17), channels)
    # Background gradient: a third of images flat, the rest a gentle linear ramp.
    grad_amp = np.where(r(18) < 1 / 3, 0.0, (r(19) - 0.5) * 0.24)
    grad_dir = r(20) * 2 * np.pi

    coords = (np.arange(S, dtype=f32) + 0.5)
    X, Y = coords[None, None, :], coords[None, :, None]
    dx, dy = X - cx[:, None, None].astype(f32), Y - cy[:, None, None].astype(f32)
    c, s = np.cos(rot)[:, None, None].astype(f32), np.sin(rot)[:, None, None].astype(f32)
    u, v = c * dx + s * dy, -s * dx + c * dy  # pixel units, object frame

    alpha = np.empty((n, S, S), f32)
    tfield = np.empty((n, S, S), f32)
    kinds = labels % len(KINDS)
    texs = (kinds + labels // len(KINDS)) % len(TEXTURES)
    for k, kind in enumerate(KINDS):
        m = kinds == k
        if m.any():
            rk = rad[m][:, None, None].astype(f32)
            d = _sdf(kind, u[m] / rk, v[m] / rk) * rk  # pixels
            alpha[m] = np.clip(0.5 - d, 0.0, 1.0)
    ca, sa = np.cos(tex_angle)[:, None, None].astype(f32), np.sin(tex_angle)[:, None, None].astype(f32)
    for t, tex in enumerate(TEXTURES):
        m = texs == t
        if m.any():
            if tex == "stripes":  # free stripe angle
                tu = ca[m] * u[m] + sa[m] * v[m]
                tv = -sa[m] * u[m] + ca[m] * v[m]
            else:  # lattices follow the object's rotation
                tu, tv = u[m], v[m]
            p = period[m][:, None, None].astype(f32)
            ph = phase[m][:, None, None].astype(f32)
            tfield[m] = _texture(tex, tu, tv, p, ph if tex == "stripes" else ph / (2 * np.pi),
                                 dot_r[m][:, None, None].astype(f32))

    a, t = alpha[..., None], tfield[..., None]
    obj_px = obj[:, None, None, :] * (1 - t) + tex_col[:, None, None, :] * t
    clean = bg[:, None, None, :].astype(f32) * (1 - a) + obj_px * a

    # Detail: largest change to a 4-neighbour, over channels, in the clean picture.
    pad = np.pad(clean, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    change = np.zeros((n, S, S), f32)
    for dy_, dx_ in ((0, 1), (2, 1), (1, 0), (1, 2)):
        diff = np.abs(pad[:, dy_:dy_ + S, dx_:dx_ + S] - clean).max(-1)
        np.maximum(change, diff, out=change)
    detail = change > DETAIL_THRESHOLD

    ramp = (np.cos(grad_dir)[:, None, None] * (X - S / 2) + np.sin(grad_dir)[:, None, None] * (Y - S / 2)) / S
    gradient = (grad_amp[:, None, None] * ramp).astype(f32)[..., None]
    img = np.clip(clean + gradient * (1 - a), 0.0, 1.0)
    images = np.clip(np.floor(img * 255.0 + 0.5), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64), detail


def pool_detail_map(detail, factor: int) -> torch.Tensor:
    """Fraction of detail pixels in each ``factor`` x ``factor`` cell: (..., H, W) -> (..., H/f, W/f).

    Use it to score a router working on a coarser token grid (patch size or VAE stride).
    """
    d = torch.as_tensor(np.asarray(detail)).to(torch.float32)
    H, W = d.shape[-2:]
    if H % factor or W % factor:
        raise ValueError(f"detail map {H}x{W} is not divisible by factor {factor}")
    d = d.reshape(*d.shape[:-2], H // factor, factor, W // factor, factor)
    return d.mean(dim=(-3, -1))


class ShapesDataset(DcditDataset):
    """The procedural shapes dataset (see module docstring).

    Args:
        num_samples: number of items.
        image_size: side in pixels (>= 8).
        channels: 1 (grey) or 3 (colour).
        num_classes: 1..20.
        seed: generator seed; item ``i`` depends only on (seed, i, size, channels).
        random_flip: random horizontal flip in ``__getitem__`` (never in ``get_with_detail``).
        in_memory: render everything up front (None: when it takes under ~1 GiB).
    """

    def __init__(self, num_samples: int = 10000, image_size: int = 32, channels: int = 3,
                 num_classes: int = 10, seed: int = 0, random_flip: bool = False,
                 in_memory: bool | None = None, chunk: int = 1024):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 1 <= num_classes <= MAX_CLASSES:
            raise ValueError(f"shapes supports 1..{MAX_CLASSES} classes, got {num_classes}")
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.image_size, self.channels, self.num_classes = int(image_size), int(channels), int(num_classes)
        self.is_latent, self.random_flip = False, bool(random_flip)
        self.labels = np.arange(self.num_samples, dtype=np.int64) % self.num_classes
        per_item = self.image_size ** 2 * (self.channels + 1)
        if in_memory is None:
            in_memory = self.num_samples * per_item <= (1 << 30)
        self._images = self._detail = None
        if in_memory:
            imgs, dets = [], []
            for start in range(0, self.num_samples, chunk):
                im, _, de = self._render(np.arange(start, min(start + chunk, self.num_samples)))
                imgs.append(im)
                dets.append(de)
            self._images, self._detail = np.concatenate(imgs), np.concatenate(dets)

    def _render(self, indices):
        return render_shapes(self.seed, indices, self.image_size, self.channels, self.num_classes)

    def _item(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for {self.num_samples} items")
        i %= self.num_samples
        if self._images is not None:
            return self._images[i], self._detail[i]
        im, _, de = self._render([i])
        return im[0], de[0]

    def __getitem__(self, i: int):
        img, _ = self._item(int(i))
        return self._finish(img, self.labels[int(i)])

    def detail_map(self, i: int) -> torch.Tensor:
        """Ground-truth detail map of item ``i``: bool tensor (image_size, image_size)."""
        return torch.from_numpy(np.array(self._item(int(i))[1]))

    def get_with_detail(self, i: int):
        """``(x, y, detail)`` for item ``i``, never flipped so ``x`` and ``detail`` align."""
        img, det = self._item(int(i))
        x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
        return x, torch.tensor(int(self.labels[int(i)])), torch.from_numpy(np.array(det))
