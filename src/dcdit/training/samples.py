"""Cheap periodic EMA sample grids (a short DDIM run, saved as one PNG)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from dcdit.data.transforms import to_uint8_images
from dcdit.data.vae import decode_latents
from dcdit.sampling import sample, sampling_diffusion_for
from dcdit.training.config import SamplesConfig
from dcdit.viz.grid import image_grid, save_png


@torch.no_grad()
def sample_images(model: nn.Module, cfg: SamplesConfig, num_classes: int, diffusion_steps: int, noise_schedule: str,
                  device: torch.device, clip_denoised: bool = True, seed: int = 0) -> torch.Tensor:
    """``cfg.num`` samples (N, C, H, W) in model space, classes 0, 1, 2, ... cycling; fixed noise per seed.

    A short deterministic DDIM run of :func:`dcdit.sampling.sample` (the library's one sampling loop).
    """
    diffusion = sampling_diffusion_for(model, "ddim", cfg.steps, noise_schedule, diffusion_steps)
    labels = torch.arange(cfg.num) % num_classes
    was_training = model.training
    model.eval()
    try:
        out, _ = sample(model, diffusion, labels, seed=seed, cfg_scale=cfg.cfg_scale, clip_denoised=clip_denoised,
                        measure_flops=False, device=device)
    finally:
        model.train(was_training)
    return out


def write_sample_grid(path: Path, model: nn.Module, cfg: SamplesConfig, dataset, diffusion_steps: int,
                      noise_schedule: str, device: torch.device, vae=None) -> Optional[Path]:
    """Sample with ``model`` (the EMA) and save a PNG grid; latents need ``vae`` (else skipped, returns None)."""
    if dataset.is_latent and vae is None:
        return None
    x = sample_images(model, cfg, dataset.num_classes, diffusion_steps, noise_schedule, device,
                      clip_denoised=not dataset.is_latent)
    if dataset.is_latent:
        x = decode_latents(vae, x)
    save_png(path, image_grid(to_uint8_images(x.float().cpu()), fill=128))
    return path
