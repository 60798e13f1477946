"""The DC-DiT ratio loss and its schedule (Switch-Transformer-style load balancing of the router).

Per chunking stage with target compression N: F = share of tokens the router
keeps before tail dropping (the natural mask), G = mean boundary probability
(forced tokens included); loss = N/(N-1) * ((1-F)(1-G) + (N-1) F G), which is 1
at F = G = 1/N. Computed per group of ``group_size`` samples and averaged,
then averaged over stages (as the reference's training loop does). The
training total is ``diffusion + weight * ratio`` (weight 0.03 in the paper).

N defaults to the model's ``downsample_factor`` and may ramp linearly from a
start value (:func:`ratio_targets`); F and G come from
:meth:`~dcdit.chunking.routing.StageRouting.kept_share` and ``mean_prob``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from dcdit.chunking.routing import StageRouting

TargetN = Union[float, Sequence[float]]


def switch_loss(avg_prob: torch.Tensor, true_ratio: torch.Tensor, N: float) -> torch.Tensor:
    """N/(N-1) * ((1-F)(1-G) + (N-1) F G) with F = true_ratio, G = avg_prob."""
    return ((1 - true_ratio) * (1 - avg_prob) + true_ratio * avg_prob * (N - 1)) * N / (N - 1)


def stage_ratio_loss(stage: StageRouting, N: float, group_size: Optional[int] = None) -> torch.Tensor:
    """Ratio loss of one stage's routing, averaged over groups of ``group_size`` samples (None: one group)."""
    B = stage.boundary_prob.shape[0]
    g = B if group_size is None else int(group_size)
    if g < 1 or B % g:
        raise ValueError(f"ratio loss group_size {group_size} must divide the batch size {B}")
    return switch_loss(stage.mean_prob(g), stage.kept_share(natural=True, group_size=g), N).mean()


def ratio_loss(routing: Sequence[StageRouting], N: TargetN, group_size: Optional[int] = None) -> torch.Tensor:
    """Mean over stages of the per-stage ratio loss.

    routing: the model's routing list; N: one target for every stage or one
    per stage (each > 1); group_size: samples per group (None = whole batch).
    """
    Ns = list(N) if isinstance(N, (list, tuple)) else [N] * len(routing)
    if len(Ns) != len(routing):
        raise ValueError(f"got {len(Ns)} ratio-loss targets for {len(routing)} chunking stages")
    if any(not n > 1 for n in Ns):
        raise ValueError(f"ratio-loss targets N must be > 1, got {Ns}")
    if not routing:
        return torch.zeros(())
    return sum(stage_ratio_loss(s, float(n), group_size) for s, n in zip(routing, Ns)) / len(routing)


def ratio_targets(r, step: int, n_stages: int, model_N: Optional[TargetN] = None) -> list[float]:
    """Target N per stage at ``step``: ``r.target_N`` (null: ``model_N``, the model's downsample_factor),
    ramped linearly from ``r.start_N`` over ``r.warmup_steps`` when those are set.

    ``r`` is a :class:`dcdit.training.config.RatioConfig` (or anything with those fields).
    """

    def per_stage(v):
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        if len(v) == 1:
            v = v * n_stages
        if len(v) != n_stages:
            raise ValueError(f"ratio.target_N: {len(v)} values for a model with {n_stages} routing stage(s)")
        return [float(x) for x in v]

    target_N = r.target_N if r.target_N is not None else model_N
    if target_N is None:
        raise ValueError("ratio.target_N is null and the model declares no downsample_factor")
    target = per_stage(target_N)
    if r.start_N is None or r.warmup_steps <= 0:
        return target
    start = per_stage(r.start_N)
    progress = min(1.0, step / r.warmup_steps)
    return [s + (e - s) * progress for s, e in zip(start, target)]


def ratio_group_size(group_size: Optional[int], micro_batch: int) -> Optional[int]:
    """The ratio-loss group for a per-process micro-batch: None (one group) when the group covers it."""
    if group_size is None or group_size >= micro_batch:
        return None
    if micro_batch % group_size:
        raise ValueError(f"ratio.group_size ({group_size}) must divide the per-process micro-batch ({micro_batch})")
    return group_size
