"""The DC-DiT ratio loss (Switch-Transformer-style load balancing of the router).

Per chunking stage with target compression N: F = share of tokens the router
keeps before tail dropping (the natural mask), G = mean boundary probability
(forced tokens included); loss = N/(N-1) * ((1-F)(1-G) + (N-1) F G), which is 1
at F = G = 1/N. Computed per group of ``group_size`` samples and averaged,
then averaged over stages (as the reference's training loop does).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch


def switch_loss(avg_prob: torch.Tensor, true_ratio: torch.Tensor, N: float) -> torch.Tensor:
    """N/(N-1) * ((1-F)(1-G) + (N-1) F G) with F = true_ratio, G = avg_prob."""
    return ((1 - true_ratio) * (1 - avg_prob) + true_ratio * avg_prob * (N - 1)) * N / (N - 1)


def stage_ratio_loss(stage: dict, N: float, group_size: Optional[int] = None) -> torch.Tensor:
    """Ratio loss of one stage's routing dict (``boundary_prob``, ``natural_mask``, optional ``valid_mask``)."""
    prob = stage["boundary_prob"].float()  # (B, L)
    mask = stage["natural_mask"] if stage.get("natural_mask") is not None else stage["keep_mask"]
    valid = stage.get("valid_mask")
    B = prob.shape[0]
    g = B if group_size is None else int(group_size)
    if g < 1 or B % g:
        raise ValueError(f"ratio loss group_size {group_size} must divide the batch size {B}")
    prob, mask = prob.reshape(B // g, -1), mask.float().reshape(B // g, -1)  # (groups, g*L)
    if valid is None or stage.get("grid") is not None:  # 2D stage: no padding
        avg_prob, true_ratio = prob.mean(dim=-1), mask.mean(dim=-1)
    else:  # inner stages: variable-length sequences padded to (B, max L)
        v = valid.float().reshape(B // g, -1)
        n = v.sum(dim=-1).clamp(min=1)
        avg_prob, true_ratio = (prob * v).sum(dim=-1) / n, (mask * v).sum(dim=-1) / n
    return switch_loss(avg_prob, true_ratio, N).mean()


def ratio_loss(
    routing: Sequence[dict],
    N: Union[float, Sequence[float]],
    group_size: Optional[int] = None,
) -> torch.Tensor:
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
