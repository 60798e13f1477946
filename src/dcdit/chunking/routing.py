"""The spatial-predictability router and the boundary rules.

The router scores how poorly a token is predicted from its neighbourhood:
z = conv1x1(h) (width D/4), r = z - conv3x3(z), logit = conv3x3 -> GroupNorm ->
SiLU -> conv1x1(r), p = sigmoid(logit). Predictable (smooth) regions score low.
The first and last token of every sequence get p = 1; a token is a boundary
(kept) iff p > 0.5. Tail dropping then removes the floor(f * n) kept tokens
with the lowest p (elastic inference).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from dcdit.chunking.packing import GroupNorm, PackedSeqs, packed_conv1d, packed_group_norm

TailDrop = Union[float, torch.Tensor]


class STE(torch.autograd.Function):
    """Ones in the forward pass; the gradient passes straight through to the input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def ste(x: torch.Tensor) -> torch.Tensor:
    return STE.apply(x)


class _STEResidual(torch.autograd.Function):
    """h * STE(p)[:, None] + residual in one pass: h + residual forward (STE(p) is exactly 1), and
    the gradients h, residual <- g, p <- sum_d g * h (one vecdot instead of a product and a sum)."""

    @staticmethod
    def forward(ctx, h, p, residual):
        ctx.save_for_backward(h)
        return h + residual

    @staticmethod
    def backward(ctx, g):
        (h,) = ctx.saved_tensors
        gp = torch.linalg.vecdot(g, h, dim=-1) if ctx.needs_input_grad[1] else None
        return g, gp, g


def ste_residual(h: torch.Tensor, p: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``h * ste(p)[:, None] + residual`` for h, residual (T, D) of one dtype and p (T,): the same
    forward bits and gradients (to rounding in the sum over D), fewer passes over (T, D)."""
    if h.dtype != residual.dtype or h.shape != residual.shape or p.shape != h.shape[:1]:
        return h * ste(p)[:, None] + residual
    return _STEResidual.apply(h, p.to(h.dtype), residual)


def check_tail_drop(tail_drop: TailDrop, batch: int, device: torch.device) -> TailDrop:
    """Validate a drop fraction (a number or one per sample) in [0, 1); tensors come back float32 (B,)."""
    if torch.is_tensor(tail_drop):
        if tail_drop.dim() == 0:
            tail_drop = tail_drop.expand(batch)
        if tail_drop.shape != (batch,):
            raise ValueError(f"tail_drop must be a float or a ({batch},) tensor, got shape {tuple(tail_drop.shape)}")
        tail_drop = tail_drop.to(dtype=torch.float32)
        # range check on host tensors only: on an accelerator it would cost a host sync every call
        if tail_drop.device.type == "cpu" and tail_drop.numel() and (
            bool((tail_drop < 0).any()) or bool((tail_drop >= 1).any())
        ):
            raise ValueError(f"tail_drop fractions must lie in [0, 1), got {tail_drop.tolist()}")
        return tail_drop.to(device=device)
    if isinstance(tail_drop, bool) or not isinstance(tail_drop, (int, float)):
        raise ValueError(f"tail_drop must be a float or a ({batch},) tensor, got {type(tail_drop).__name__}")
    if not 0.0 <= float(tail_drop) < 1.0:
        raise ValueError(f"tail_drop must lie in [0, 1), got {tail_drop}")
    return float(tail_drop)


@dataclass
class StageRouting:
    """What the router decided at one chunking stage: the model returns one per stage.

    Every tensor is in padded (B, M) layout: M = L on the 2D stage (every
    sequence fills the grid), the longest sequence on inner 1D stages, whose
    padding has prob 0 and all masks False. Read shares through
    :meth:`kept_share`, which leaves the padding out.
    """

    boundary_prob: torch.Tensor  # (B, M) float32 p; the forced first/last tokens are 1
    natural_mask: torch.Tensor  # (B, M) bool, p > 0.5: the router's choice, before tail dropping
    keep_mask: torch.Tensor  # (B, M) bool, the tokens kept after tail dropping
    valid_mask: torch.Tensor  # (B, M) bool, False at padding
    selected_prob: torch.Tensor  # (B, M) max(p, 1 - p) of the natural choice: what the STE passes (step 11)
    grid: Optional[tuple[int, int]] = None  # (h, w) on the 2D stage, None on 1D stages
    padded: bool = False  # True when sequences differ in length (then M > some lengths)

    @property
    def num_kept(self) -> torch.Tensor:
        """(B,) tokens kept per sample."""
        return self.keep_mask.sum(dim=1)

    def kept_share(self, natural: bool = False, group_size: int = 1) -> torch.Tensor:
        """Share of each sample's tokens kept, (B,); or of each group of ``group_size`` samples, (B // g,).

        ``natural=True``: the router's choice before tail dropping (what the ratio loss reads).
        """
        return self._group_mean((self.natural_mask if natural else self.keep_mask).float(), group_size)

    def mean_prob(self, group_size: int = 1) -> torch.Tensor:
        """Mean boundary probability per sample (B,), or per group of ``group_size`` samples, padding left out."""
        return self._group_mean(self.boundary_prob.float(), group_size)

    def _group_mean(self, x: torch.Tensor, g: int) -> torch.Tensor:
        B = x.shape[0]
        if g < 1 or B % g:
            raise ValueError(f"group_size {g} must divide the batch size {B}")
        x = x.reshape(B // g, -1)  # (groups, g*M)
        if not self.padded:
            return x.mean(dim=-1)
        v = self.valid_mask.float().reshape(B // g, -1)
        return (x * v).sum(dim=-1) / v.sum(dim=-1).clamp(min=1)

    def rows(self, sl: slice) -> "StageRouting":
        """The routing of samples ``sl`` (e.g. the conditional half of a guided batch)."""
        return replace(self, boundary_prob=self.boundary_prob[sl], natural_mask=self.natural_mask[sl],
                       keep_mask=self.keep_mask[sl], valid_mask=self.valid_mask[sl],
                       selected_prob=self.selected_prob[sl])

    @staticmethod
    def cat(parts: Sequence["StageRouting"]) -> "StageRouting":
        """Concatenate one stage's routing of several sample groups along the batch (padding to one M)."""
        M = max(r.keep_mask.shape[1] for r in parts)
        pad = lambda t: torch.nn.functional.pad(t, (0, M - t.shape[1]))
        return StageRouting(
            boundary_prob=torch.cat([pad(r.boundary_prob) for r in parts]),
            natural_mask=torch.cat([pad(r.natural_mask) for r in parts]),
            keep_mask=torch.cat([pad(r.keep_mask) for r in parts]),
            valid_mask=torch.cat([pad(r.valid_mask) for r in parts]),
            selected_prob=torch.cat([pad(r.selected_prob) for r in parts]),
            grid=parts[0].grid,
            padded=any(r.padded or r.keep_mask.shape[1] < M for r in parts),
        )


def select_boundaries(
    prob: torch.Tensor,
    valid: torch.Tensor,
    tail_drop: TailDrop = 0.0,
    grid: Optional[tuple[int, int]] = None,
    padded: bool = False,
) -> StageRouting:
    """Apply the boundary rules to router probabilities (MECHANISM steps 5-6).

    prob: (B, M) with the forced tokens already at 1; valid: (B, M) bool.
    A token is kept iff p > 0.5 (the reference's argmax over (1 - p, p)); with
    a drop fraction f, the floor(f * n_kept) kept tokens of lowest p are
    dropped (ties: lower raster index first). f is a number or a (B,) tensor;
    the count is computed in float32 exactly as the reference does.
    """
    natural = (prob > 0.5) & valid
    keep = natural
    if torch.is_tensor(tail_drop) or tail_drop > 0.0:
        B, M = prob.shape
        n = natural.sum(dim=1)  # (B,)
        frac = tail_drop.to(prob.device, torch.float32) if torch.is_tensor(tail_drop) else tail_drop
        n_drop = (n.float() * frac).long()  # floor, in float32 like the reference
        key = prob.detach().masked_fill(~natural, float("inf"))
        order = torch.sort(key, dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(M, device=prob.device).expand(B, M))
        keep = natural & (rank >= n_drop[:, None])
    selected = torch.where(natural, prob, 1 - prob)
    return StageRouting(boundary_prob=prob, natural_mask=natural, keep_mask=keep, valid_mask=valid,
                        selected_prob=selected, grid=grid, padded=padded)


class SpatialPredictabilityRouter(nn.Module):
    """Scores tokens by their local prediction residual; 2D on the outer grid, 1D on inner sequences.

    Parameter names follow the reference (``proj``, ``context_predictor``,
    ``residual_scorer.{0,1,3}``).
    """

    def __init__(
        self,
        dim: int,
        spatial_dims: int = 2,
        norm_groups: int = 8,
        bias_init: float = -1.1,
        fp32: bool = True,
    ):
        super().__init__()
        if spatial_dims not in (1, 2):
            raise ValueError(f"spatial_dims must be 1 or 2, got {spatial_dims}")
        bottleneck = dim // 4
        if bottleneck < 1 or bottleneck % norm_groups:
            raise ValueError(f"router width {dim} // 4 = {bottleneck} must be a positive multiple of {norm_groups} groups")
        Conv = nn.Conv2d if spatial_dims == 2 else nn.Conv1d
        self.spatial_dims, self.fp32 = spatial_dims, fp32
        self.proj = Conv(dim, bottleneck, kernel_size=1)
        self.context_predictor = Conv(bottleneck, bottleneck, kernel_size=3, padding=1)
        self.residual_scorer = nn.Sequential(
            Conv(bottleneck, bottleneck, kernel_size=3, padding=1),
            GroupNorm(norm_groups, bottleneck),
            nn.SiLU(),
            Conv(bottleneck, 1, kernel_size=1),
        )
        nn.init.constant_(self.residual_scorer[-1].bias, bias_init)

    def logits(self, h: torch.Tensor, seqs: PackedSeqs, grid: Optional[tuple[int, int]]) -> torch.Tensor:
        """h (T, D) -> keep logits (T,)."""
        if self.spatial_dims == 2:
            if grid is None or not seqs.is_uniform or seqs.max_seqlen != grid[0] * grid[1]:
                raise ValueError(f"2D routing needs every sequence to fill the {grid} grid")
            B, (gh, gw) = seqs.batch, grid
            hw = h.reshape(B, gh, gw, -1).permute(0, 3, 1, 2)  # (B, D, gh, gw), a channels-last view
            if torch.is_grad_enabled():  # training: NCHW is faster on CPU (see ConvResBlock)
                hw = hw.contiguous()
            z = self.proj(hw)  # (B, D/4, gh, gw)
            r = z - self.context_predictor(z)
            return self.residual_scorer(r).reshape(-1)  # (T,)
        conv0, norm, act, conv1 = self.residual_scorer
        z = packed_conv1d(h, self.proj, seqs)  # (T, D/4)
        r = z - packed_conv1d(z, self.context_predictor, seqs)
        r = act(packed_group_norm(packed_conv1d(r, conv0, seqs), norm, seqs))
        return packed_conv1d(r, conv1, seqs)[:, 0]

    def forward(
        self,
        h: torch.Tensor,
        seqs: PackedSeqs,
        grid: Optional[tuple[int, int]] = None,
        tail_drop: TailDrop = 0.0,
    ) -> StageRouting:
        """h (T, D) packed tokens -> this stage's routing, in padded (B, M) layout."""
        ctx = torch.autocast(h.device.type, enabled=False) if self.fp32 else nullcontext()
        with ctx:
            if self.fp32:
                h = h.to(self.proj.weight.dtype)
            p = torch.sigmoid(self.logits(h, seqs, grid).float())  # (T,)
            last = seqs.local == (seqs.lengths_t[seqs.seg_ids] - 1)
            p = torch.where((seqs.local == 0) | last, torch.ones_like(p), p)  # forced boundaries
            prob = seqs.pad(p)  # (B, M), 0 at padding
            return select_boundaries(prob, seqs.valid_mask(), tail_drop, grid, padded=not seqs.is_uniform)
