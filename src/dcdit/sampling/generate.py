"""Many samples, batched and optionally spread over ranks, written as an ADM ``.npz`` and/or a PNG grid.

Rank ``r`` of ``W`` produces the global indices ``r, r + W, ...`` (labels and
noise follow from the index, see :mod:`dcdit.sampling.seeds`), writes its
share to a part file, and rank 0 merges the parts in index order, checking
that every index 0..N-1 is present exactly once.
"""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from dcdit.data.transforms import to_uint8_images
from dcdit.data.vae import decode_latents, load_vae
from dcdit.evaluation.io import save_npz_atomic, save_samples_npz
from dcdit.sampling.guidance import model_info
from dcdit.sampling.sampler import SampleStats, sample, sampling_diffusion_for
from dcdit.sampling.seeds import labels_for_indices, shard_indices
from dcdit.viz.grid import image_grid, save_png

__all__ = ["LocalSamples", "generate_local", "resolve_workers", "merge_ranks", "save_outputs", "read_train_config",
           "is_latent_checkpoint", "latent_decoder", "diffusion_for_checkpoint"]

FLOP_MODES = ("first", "all", "none")


@dataclass
class LocalSamples:
    """One rank's samples: global ``indices`` (n,), ``labels`` (n,), and ``images`` uint8 (n, H, W, C)
    or, for undecoded latent models, ``latents`` float32 (n, C, H, W)."""

    indices: np.ndarray
    labels: np.ndarray
    images: Optional[np.ndarray]
    latents: Optional[np.ndarray]
    stats: Optional[SampleStats]
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def generate_local(
    model: nn.Module,
    diffusion,
    num_samples: int,
    *,
    batch_size: int = 16,
    seed: int = 0,
    classes: Optional[Sequence[int]] = None,
    rank: int = 0,
    world_size: int = 1,
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    keep_latents: bool = False,
    flops: str = "first",
    flop_images: Optional[int] = None,
    workers: int = 1,
    progress: bool = False,
    **sample_kwargs,
) -> LocalSamples:
    """Sample this rank's share of ``num_samples`` in batches.

    Labels cycle through the classes (or ``classes``) by global index, and every sample's noise comes
    from ``(seed, index)``, so the split into batches and ranks does not change the images.

    Args:
        decode: maps model-space samples to [-1, 1] images (e.g. a VAE decoder); None: identity.
        keep_latents: return raw model-space float arrays instead of uint8 images (no decode).
        flops: "first" counts FLOPs on this rank's first batch only (cheap), "all" on
            every batch, "none" never.
        flop_images: size of the first batch (default ``batch_size``); with ``flops="first"`` the
            FLOPs are counted on exactly these images, since the counter slows sampling.
        workers: batches sampled side by side in this many threads, each with 1/workers of torch's
            intra-op threads (on CPU: see :func:`resolve_workers`). The images do not depend on it (each
            batch is the batch a single worker samples); a FLOP-counted batch runs alone first.
        **sample_kwargs: passed to :func:`dcdit.sampling.sample` (sampler, eta, cfg_scale, tail_drop,
            precision, clip_denoised, ...).

    Returns:
        :class:`LocalSamples`: uint8 images (or latents), labels, the batches' merged
        :class:`SampleStats` and the seconds it took.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if flops not in FLOP_MODES:
        raise ValueError(f"flops mode must be one of {', '.join(FLOP_MODES)}, got {flops!r}")
    if flop_images is not None and flop_images < 1:
        raise ValueError(f"flop_images must be positive, got {flop_images}")
    indices = shard_indices(num_samples, rank, world_size)
    labels = labels_for_indices(indices, model_info(model)["num_classes"], classes)
    if workers < 1:
        raise ValueError(f"workers must be positive, got {workers}")
    bounds = batch_bounds(len(indices), batch_size, flop_images)

    def one_batch(b: int) -> tuple[np.ndarray, SampleStats]:
        start, stop = bounds[b]
        measure = flops == "all" or (flops == "first" and b == 0)
        x, st = sample(model, diffusion, labels[start:stop], seed=seed, indices=indices[start:stop],
                       measure_flops=measure, **sample_kwargs)
        if keep_latents:
            return x.float().cpu().numpy(), st
        return to_uint8_images((decode(x) if decode is not None else x).float().cpu()), st

    outs: list[tuple[np.ndarray, SampleStats]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc="sampling", unit="img", dynamic_ncols=True)
    t0 = time.perf_counter()
    # A FLOP counter must run alone: its module tracking hooks are global, not per thread.
    alone = len(bounds) if workers == 1 or flops == "all" else (1 if flops == "first" else 0)
    for b in range(min(alone, len(bounds))):
        outs.append(one_batch(b))
        if bar is not None:
            bar.update(bounds[b][1] - bounds[b][0])
    rest = range(len(outs), len(bounds))
    if len(rest):
        with intra_op_threads(max(1, torch.get_num_threads() // workers)), ThreadPoolExecutor(workers) as pool:
            for b, out in zip(rest, pool.map(one_batch, rest)):  # in batch order
                outs.append(out)
                if bar is not None:
                    bar.update(bounds[b][1] - bounds[b][0])
    if bar is not None:
        bar.close()
    arrays = [a for a, _ in outs]
    images = [] if keep_latents else arrays
    latents = arrays if keep_latents else []
    stats = [st for _, st in outs]
    return LocalSamples(
        indices=indices, labels=labels,
        images=np.concatenate(images) if images else None,
        latents=np.concatenate(latents) if latents else None,
        stats=SampleStats.merge(stats) if stats else None,
        seconds=time.perf_counter() - t0,
    )


def resolve_workers(workers: int | str, device: torch.device | str = "cpu") -> int:
    """``workers`` for :func:`generate_local` from an int or "auto".

    "auto": 2 on a CPU where torch runs 2 or more intra-op threads, else 1. Torch's intra-op threads
    share each op; many of a sampling step's ops (DC-DiT's gathers and small convolutions, layer norms,
    the per-sample bookkeeping) are too small to split well, so two batches at half the threads each
    keep both cores busier: 1.46x (DiT/4) and 1.50x (DC-DiT) the images per second at 2 threads on
    the 2-core machine of BENCHMARKS.md (``benchmarks/bench_sample_workers.py``). On a GPU one stream of batches is the fast path.
    """
    if workers == "auto":
        return 2 if torch.device(device).type == "cpu" and torch.get_num_threads() >= 2 else 1
    try:
        n = int(workers)
    except (TypeError, ValueError):
        raise ValueError(f"workers must be a positive integer or 'auto', got {workers!r}") from None
    if n < 1:
        raise ValueError(f"workers must be a positive integer or 'auto', got {workers!r}")
    return n


@contextmanager
def intra_op_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block (it is process-wide), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def batch_bounds(n: int, batch_size: int, first: Optional[int] = None) -> list[tuple[int, int]]:
    """``[start, stop)`` of each batch of ``n`` items: the first holds ``first`` (default ``batch_size``), the rest
    ``batch_size`` each (the last may be short)."""
    if n == 0:
        return []
    head = min(n, first or batch_size)
    return [(0, head)] + [(a, min(n, a + batch_size)) for a in range(head, n, batch_size)]


def _save_part(path: Path, part: LocalSamples) -> None:
    arrays = {"indices": part.indices, "labels": part.labels}
    if part.images is not None:
        arrays["images"] = part.images
    if part.latents is not None:
        arrays["latents"] = part.latents
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def merge_ranks(part: LocalSamples, num_samples: int, parts_dir: Path, rank: int = 0,
                world_size: int = 1) -> Optional[LocalSamples]:
    """Gather every rank's samples on rank 0 in global index order (None on other ranks).

    With one process the local part is only sorted and checked. Parts travel
    through files in ``parts_dir`` (removed afterwards); statistics through the
    process group. Raises ValueError if an index is missing or duplicated.
    """
    if world_size == 1:
        merged = part
        stats, seconds = part.stats, part.seconds
    else:
        import torch.distributed as dist

        parts_dir.mkdir(parents=True, exist_ok=True)
        _save_part(parts_dir / f"rank{rank:05d}.npz", part)
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (part.stats, part.seconds))
        dist.barrier()
        if rank != 0:
            return None
        chunks = []
        for r in range(world_size):
            with np.load(parts_dir / f"rank{r:05d}.npz") as f:
                chunks.append({k: f[k] for k in f.files})
        shutil.rmtree(parts_dir, ignore_errors=True)
        cat = lambda key: np.concatenate([c[key] for c in chunks]) if key in chunks[0] else None
        merged = LocalSamples(cat("indices"), cat("labels"), cat("images"), cat("latents"), None)
        stats = SampleStats.merge([s for s, _ in gathered if s is not None]) if any(s is not None for s, _ in gathered) else None
        seconds = max(sec for _, sec in gathered)
    order = np.argsort(merged.indices, kind="stable")
    idx = merged.indices[order]
    if idx.shape[0] != num_samples or not np.array_equal(idx, np.arange(num_samples)):
        dup = int(idx.shape[0] - np.unique(idx).shape[0])
        raise ValueError(f"merged samples do not cover indices 0..{num_samples - 1} exactly once "
                         f"({idx.shape[0]} samples, {dup} duplicates)")
    take = lambda a: None if a is None else a[order]
    return LocalSamples(idx, merged.labels[order], take(merged.images), take(merged.latents), stats, seconds)


def save_outputs(samples: LocalSamples, npz: Optional[str | Path] = None, grid: Optional[str | Path] = None,
                 grid_count: int = 64, grid_cols: Optional[int] = None) -> list[Path]:
    """Write the ``.npz`` (ADM format: ``arr_0`` uint8 NHWC, ``arr_1`` labels; or ``latents`` +
    ``labels`` for undecoded latents) and a PNG grid of the first ``grid_count`` images."""
    written = []
    if npz is not None:
        npz = Path(npz)
        if samples.images is not None:
            written.append(save_samples_npz(npz, samples.images, samples.labels))
        else:
            if npz.suffix != ".npz":
                raise ValueError(f"{npz}: sample files must end in .npz")
            written.append(save_npz_atomic(npz, {"latents": samples.latents.astype(np.float32),
                                                 "labels": samples.labels.astype(np.int64)}))
    if grid is not None and samples.images is not None:
        written.append(save_png(grid, image_grid(samples.images[:grid_count], grid_cols)))
    return written


# ----------------------------------------------------------------- run config


def read_train_config(ckpt: str | Path) -> Optional[dict]:
    """The training config (YAML) that produced a checkpoint, if one sits with it; else None.

    Looks for ``train_config.yaml`` in a checkpoint directory and
    ``config.yaml`` in its run directory (also for a run directory or weights file).
    """
    import yaml

    path = Path(ckpt)
    cands = []
    if path.is_dir():
        latest = path / "latest"
        if latest.is_file():
            cands.append(path / latest.read_text().strip() / "train_config.yaml")
        cands += [path / "train_config.yaml", path / "config.yaml", path.parent / "config.yaml"]
    else:
        cands += [path.parent / "train_config.yaml", path.parent / "config.yaml", path.parent.parent / "config.yaml"]
    for c in cands:
        if c.is_file():
            try:
                cfg = yaml.safe_load(c.read_text())
            except yaml.YAMLError as e:
                raise ValueError(f"corrupt training config {c}: {str(e).splitlines()[0]}") from None
            if isinstance(cfg, dict) and ("data" in cfg or "diffusion" in cfg):
                return cfg
    return None


def diffusion_for_checkpoint(ckpt: Optional[str | Path], model: nn.Module, sampler: str, steps: int, *,
                             noise_schedule: Optional[str] = None, diffusion_steps: Optional[int] = None):
    """The sampling diffusion that matches a loaded checkpoint: use it whenever you sample a model you load.

    What the network's output means (``prediction``: epsilon / v / x0, and ``learn_sigma``) comes
    from the model's own config; the noise schedule and the number of training timesteps from the
    training config saved beside the checkpoint (linear / 1000 when there is none, as for
    ``pretrained:`` models and released DiT weights). ``noise_schedule`` / ``diffusion_steps``
    override the latter; ``ckpt=None`` (a model built, not loaded) means the defaults. A diffusion built for another run (say the demo's v-prediction run) would
    be refused by :func:`sample` for an epsilon model: building it here keeps the pair matched.
    """
    train_cfg = read_train_config(ckpt) if ckpt is not None else None
    dcfg = (train_cfg or {}).get("diffusion") or {}
    schedule = noise_schedule or dcfg.get("noise_schedule", "linear")
    T = diffusion_steps or int(dcfg.get("diffusion_steps", 1000))
    return sampling_diffusion_for(model, sampler, steps, schedule, T)


def is_latent_checkpoint(train_config: Optional[dict], in_channels: int) -> bool:
    """Latent-space model? The training config's data source decides; without one, 4 channels means latent."""
    if train_config is not None:
        source = (train_config.get("data") or {}).get("source")
        if source is not None:
            return source == "latents"
    return in_channels == 4


def latent_decoder(vae_dir: str | Path, device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """``z -> images in [-1, 1]`` with the local VAE in ``vae_dir`` (``dcdit.data.vae``; z as the model samples it)."""
    if not Path(vae_dir).exists():
        raise FileNotFoundError(f"VAE directory not found: {vae_dir}")
    vae = load_vae(vae_dir)
    if hasattr(vae, "to"):
        vae = vae.to(device)
    return lambda z: decode_latents(vae, z.to(device))
