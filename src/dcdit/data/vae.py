"""The Stable-Diffusion VAE (a diffusers ``AutoencoderKL``), loaded from a local folder only.

``dcdit`` never downloads weights: ``load_vae`` takes a folder holding a saved
``AutoencoderKL`` (``config.json`` + weights, e.g. a copy of
``stabilityai/sd-vae-ft-ema``), or a pipeline folder with a ``vae/`` sub-folder.

Latents follow the LDM / DiT convention: ``z = posterior draw * 0.18215``
(:data:`SCALE`); :func:`decode_latents` divides the scale out before decoding.
diffusers is an optional dependency (``pip install diffusers``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dcdit.data.config import DataError

SCALE = 0.18215  # SD-VAE latent scale used by LDM and DiT
LATENT_SCALE = SCALE  # alias
INSTALL_HINT = "pip install diffusers"

__all__ = ["SCALE", "LATENT_SCALE", "load_vae", "resolve_vae_dir", "vae_downsample_factor", "encode_images",
           "decode_latents"]


def _autoencoder_cls():
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise DataError(f"VAE support needs diffusers ({INSTALL_HINT}): {e}") from None
    return AutoencoderKL


def resolve_vae_dir(local_dir: str | Path) -> Path:
    """The folder holding the VAE's ``config.json``: ``local_dir`` itself or ``local_dir/vae``."""
    d = Path(local_dir)
    if not d.exists():
        raise FileNotFoundError(f"VAE folder not found: {d}")
    if not d.is_dir():
        raise DataError(f"VAE path {d} is a file; expected a folder saved by AutoencoderKL.save_pretrained")
    for cand in (d, d / "vae"):
        cfg = cand / "config.json"
        if cfg.is_file():
            try:
                kind = json.loads(cfg.read_text()).get("_class_name", "AutoencoderKL")
            except (OSError, ValueError, AttributeError) as e:
                raise DataError(f"cannot read {cfg}: {e}") from None
            if kind != "AutoencoderKL":
                raise DataError(f"{cand} holds a {kind}, not an AutoencoderKL")
            return cand
    raise DataError(f"{d} is not a saved AutoencoderKL (no config.json in it or in {d / 'vae'})")


def load_vae(local_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A diffusers ``AutoencoderKL`` from ``local_dir`` (no network), in eval mode, frozen, on ``device``."""
    cls = _autoencoder_cls()
    path = resolve_vae_dir(local_dir)
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # a local load needs no advice about accelerate etc.
    try:
        vae = cls.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load the VAE from {path}: {first}") from None
    finally:
        dlogging.set_verbosity(level)
    vae = vae.to(device=device).eval()
    vae.requires_grad_(False)
    return vae


def vae_downsample_factor(vae) -> int:
    """Spatial stride of the VAE encoder (8 for the SD VAE: one halving per block after the first)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _param(vae) -> torch.Tensor:
    return next(vae.parameters())


@torch.no_grad()
def encode_images(vae, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
                  scale: float = SCALE) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> scaled latents (B, C, H/f, W/f), float32 on the VAE's device.

    ``sample=True`` draws from the posterior (DiT's feature extraction), reproducibly
    with ``generator``; ``sample=False`` takes the posterior mean (deterministic).
    """
    want = int(vae.config.in_channels)
    if x.ndim != 4 or x.shape[1] != want:
        raise ValueError(f"encode_images expects images (B, {want}, H, W), got shape {tuple(x.shape)}")
    p = _param(vae)
    post = vae.encode(x.to(device=p.device, dtype=p.dtype)).latent_dist
    z = post.sample(generator=generator) if sample else post.mean
    return z.float() * scale


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    """Scaled latents (B, C, h, w) -> images in [-1, 1] (B, 3, h*f, w*f), float32: ``vae.decode(z / scale)``."""
    want = int(vae.config.latent_channels)
    if z.ndim != 4 or z.shape[1] != want:
        raise ValueError(f"decode_latents expects latents (B, {want}, h, w), got shape {tuple(z.shape)}")
    p = _param(vae)
    out = vae.decode(z.to(device=p.device, dtype=p.dtype) / scale).sample
    return out.float().clamp_(-1.0, 1.0)
