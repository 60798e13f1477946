"""Sampling: DDPM / DDIM and diffusers' solvers (DPM-Solver++, UniPC, Euler) with guidance, Lite-CFG and
elastic compute budgets, in fp32 or bf16/fp16; batched and DDP generation.

Main entry points:

* :func:`sample` - one batch -> (samples, :class:`SampleStats`): per-step
  kept-token shares and FLOPs; per-sample seeds make results batch-invariant.
  ``sampler`` is one of :data:`SAMPLERS`; ``precision`` one of :data:`PRECISIONS`.
* :class:`Budget` / :func:`solve_budget` - a tail-drop fraction from a
  kept-share or GFLOPs target (bisection on a measured probe run).
* :func:`generate_local` / :func:`merge_ranks` / :func:`save_outputs` - many
  samples over batches and ranks, written as an ADM ``.npz`` and a PNG grid.
"""
from dcdit.sampling.budget import (
    BUDGET_KINDS,
    Budget,
    BudgetSolution,
    bisect_tail_drop,
    parse_tail_drop,
    parse_tail_drops,
    probe_diffusion,
    resolve_tail_drop,
    solve_budget,
)
from dcdit.sampling.generate import (
    LocalSamples,
    diffusion_for_checkpoint,
    generate_local,
    is_latent_checkpoint,
    latent_decoder,
    merge_ranks,
    read_train_config,
    resolve_workers,
    save_outputs,
)
from dcdit.sampling.guidance import is_guided, make_model_fn, model_info
from dcdit.sampling.precision import PRECISIONS, autocast_for, resolve_precision
from dcdit.sampling.sampler import (
    DIFFUSION_SAMPLERS,
    SAMPLERS,
    SampleStats,
    create_sampling_diffusion,
    sample,
    sampling_diffusion_for,
)
from dcdit.sampling.schedulers import SCHEDULERS, SchedulerSampling
from dcdit.sampling.seeds import SampleNoise, derive_seed, labels_for_indices, parse_classes, shard_indices

__all__ = [
    "sample", "SampleStats", "SAMPLERS", "DIFFUSION_SAMPLERS", "create_sampling_diffusion", "sampling_diffusion_for",
    "SCHEDULERS", "SchedulerSampling", "PRECISIONS", "resolve_precision", "autocast_for",
    "diffusion_for_checkpoint",
    "Budget", "BudgetSolution", "BUDGET_KINDS", "bisect_tail_drop", "probe_diffusion", "solve_budget",
    "resolve_tail_drop", "parse_tail_drop", "parse_tail_drops",
    "LocalSamples", "generate_local", "resolve_workers", "merge_ranks", "save_outputs", "read_train_config",
    "is_latent_checkpoint", "latent_decoder",
    "make_model_fn", "model_info", "is_guided",
    "SampleNoise", "derive_seed", "labels_for_indices", "parse_classes", "shard_indices",
]
