"""Small image conversions shared by datasets, samplers and evaluation.

Conventions used throughout ``dcdit``:

* model-side images are float tensors, channels first (CHW / NCHW), in [-1, 1];
* stored / displayed images are uint8 arrays, channels last (HWC / NHWC).

The uint8 mapping is ``u = floor(127.5 * x + 128)`` clamped to [0, 255]
(the usual diffusion convention), whose inverse on integers is
``x = u / 127.5 - 1``: the round trip uint8 -> float -> uint8 is exact.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

__all__ = [
    "to_uint8_images",
    "from_uint8_images",
    "center_crop_arr",
    "convert_channels",
]


def to_uint8_images(x) -> np.ndarray:
    """[-1, 1] images, CHW or NCHW (tensor or array) -> uint8 NHWC numpy array.

    A single CHW image becomes a batch of one. Values outside [-1, 1] are clipped.
    """
    t = torch.as_tensor(x).detach()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise ValueError(f"to_uint8_images expects CHW or NCHW images, got shape {tuple(t.shape)}")
    t = t.to("cpu", torch.float32)
    u = torch.clamp(torch.floor(127.5 * t + 128.0), 0, 255).to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8_images(u) -> torch.Tensor:
    """uint8 HWC or NHWC images -> float32 CHW or NCHW tensor in [-1, 1]."""
    a = np.asarray(u)
    if a.dtype != np.uint8:
        raise ValueError(f"from_uint8_images expects uint8 images, got dtype {a.dtype}")
    if a.ndim not in (3, 4):
        raise ValueError(f"from_uint8_images expects HWC or NHWC images, got shape {a.shape}")
    t = torch.from_numpy(a.astype(np.float32)).div_(127.5).sub_(1.0)  # astype copies: safe for read-only input
    return t.permute(2, 0, 1) if a.ndim == 3 else t.permute(0, 3, 1, 2)


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """Resize so the short side equals ``image_size``, then crop the centre square.

    Same recipe as ADM / DiT: halve with a BOX filter while the short side is at
    least twice the target (cheap, alias-free), finish with one BICUBIC resize,
    then take the central ``image_size`` x ``image_size`` crop.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = image_size / min(image.size)
    new_size = (max(image_size, round(image.size[0] * scale)), max(image_size, round(image.size[1] * scale)))
    image = image.resize(new_size, resample=Image.BICUBIC)
    left = (image.size[0] - image_size) // 2
    top = (image.size[1] - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def convert_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """Convert a uint8 HWC (or NHWC) array to 1 or 3 channels.

    3 -> 1 uses ITU-R 601 luma (as PIL's "L" mode); 1 -> 3 repeats the channel.
    """
    c = arr.shape[-1]
    if c == channels:
        return arr
    if c == 3 and channels == 1:
        luma = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    if c == 1 and channels == 3:
        return np.repeat(arr, 3, axis=-1)
    raise ValueError(f"cannot convert images with {c} channels to {channels} channels")
