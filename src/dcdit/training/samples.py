"""Cheap periodic EMA sample grids (a short DDIM run, saved as one PNG)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from dcdit.training.config import SamplesConfig


def image_grid(images_u8: np.ndarray, ncols: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """uint8 NHWC -> one HWC grid image (grey padding)."""
    n, h, w, c = images_u8.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = images_u8[i]
    return grid


def save_png(path: Path, grid: np.ndarray) -> None:
    from PIL import Image

    from dcdit.utils import atomic_write

    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


@torch.no_grad()
def sample_images(model: nn.Module, cfg: SamplesConfig, channels: int, image_size: int, num_classes: int,
                  diffusion_steps: int, noise_schedule: str, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``cfg.num`` samples (N, C, H, W) in model space, classes 0, 1, 2, ... cycling; fixed noise per seed."""
    from dcdit.diffusion import create_diffusion

    diffusion = create_diffusion(f"ddim{cfg.steps}", noise_schedule=noise_schedule,
                                 learn_sigma=bool(dict(model.config).get("learn_sigma", True)),
                                 diffusion_steps=diffusion_steps)
    g = torch.Generator().manual_seed(seed)
    n = cfg.num
    noise = torch.randn(n, channels, image_size, image_size, generator=g).to(device)
    y = (torch.arange(n) % num_classes).to(device)
    was_training = model.training
    model.eval()
    try:
        if cfg.cfg_scale != 1.0:
            y_null = torch.full_like(y, num_classes)
            kwargs = dict(y=torch.cat([y, y_null]), cfg_scale=cfg.cfg_scale)
            out = diffusion.ddim_sample_loop(model.forward_with_cfg, (2 * n, channels, image_size, image_size),
                                             noise=torch.cat([noise, noise]), model_kwargs=kwargs, progress=False)
            out = out[:n]
        else:
            out = diffusion.ddim_sample_loop(model, noise.shape, noise=noise, model_kwargs=dict(y=y), progress=False)
    finally:
        model.train(was_training)
    return out


def write_sample_grid(path: Path, model: nn.Module, cfg: SamplesConfig, dataset, diffusion_steps: int,
                      noise_schedule: str, device: torch.device, vae=None) -> Optional[Path]:
    """Sample with ``model`` (the EMA) and save a PNG grid; latents need ``vae`` (else skipped, returns None)."""
    from dcdit.data.transforms import to_uint8_images

    if dataset.is_latent and vae is None:
        return None
    x = sample_images(model, cfg, dataset.channels, dataset.image_size, dataset.num_classes,
                      diffusion_steps, noise_schedule, device)
    if dataset.is_latent:
        from dcdit.data.vae import decode_latents

        x = decode_latents(vae, x)
    save_png(path, image_grid(to_uint8_images(x.float().cpu())))
    return path


def load_vae(path: str, device: torch.device):
    """The SD VAE from a local folder (dcdit.data.vae; needs diffusers) for decoding latent sample grids."""
    from dcdit.data.vae import load_vae as _load

    return _load(path, device)
