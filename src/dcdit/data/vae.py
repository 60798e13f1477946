"""The Stable-Diffusion VAE (diffusers ``AutoencoderKL``), loaded from a local folder only.

``dcdit`` never downloads weights: point ``load_vae`` at a folder holding a
saved ``AutoencoderKL`` (``config.json`` + weights, e.g. a copy of
``stabilityai/sd-vae-ft-ema``), or at a pipeline folder with a ``vae/`` sub-folder.

Latents follow the LDM / DiT convention: ``z = posterior sample * 0.18215``;
``decode_latents`` undoes the scale before decoding.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dcdit.data.config import DataError

LATENT_SCALE = 0.18215  # SD-VAE latent scaling used by LDM and DiT
INSTALL_HINT = "pip install diffusers"


def _autoencoder_cls():
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise DataError(f"VAE support needs diffusers ({INSTALL_HINT}): {e}") from None
    return AutoencoderKL


def resolve_vae_dir(local_dir: str | Path) -> Path:
    """The folder holding the VAE's ``config.json`` (``local_dir`` itself or ``local_dir/vae``)."""
    d = Path(local_dir)
    if not d.exists():
        raise FileNotFoundError(f"VAE folder not found: {d}")
    for cand in (d, d / "vae"):
        if (cand / "config.json").is_file():
            return cand
    raise DataError(f"{d} holds no saved AutoencoderKL (no config.json here or in {d / 'vae'})")


def load_vae(local_dir: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32):
    """Load a diffusers ``AutoencoderKL`` from ``local_dir`` without network access.

    Returned in eval mode, frozen, on ``device`` in ``dtype``.
    """
    cls = _autoencoder_cls()
    path = resolve_vae_dir(local_dir)
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # no "install accelerate" chatter for a local load
    try:
        vae = cls.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        raise DataError(f"cannot load the VAE from {path}: {e}") from None
    finally:
        dlogging.set_verbosity(level)
    vae = vae.to(device=device).eval()
    vae.requires_grad_(False)
    return vae


def vae_downsample_factor(vae) -> int:
    """Spatial stride of the VAE encoder (8 for the SD VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_images(vae, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
                  scale: float = LATENT_SCALE) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> scaled latents (B, C, H/f, W/f), float32.

    ``sample=True`` draws from the posterior (as DiT's feature extraction);
    ``False`` takes its mean. ``generator`` makes the draw reproducible.
    """
    p = next(vae.parameters())
    post = vae.encode(x.to(device=p.device, dtype=p.dtype)).latent_dist
    z = post.sample(generator=generator) if sample else post.mean
    return z.float() * scale


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, scale: float = LATENT_SCALE) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (B, 3, H, W), float32 (``vae.decode(z / scale)``)."""
    p = next(vae.parameters())
    out = vae.decode(z.to(device=p.device, dtype=p.dtype) / scale).sample
    return out.float().clamp_(-1.0, 1.0)
