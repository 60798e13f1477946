"""Chunk (keep boundary tokens) and dechunk (smooth, then plug back), as pure functions.

Dechunk has two steps, computed in fp32:

a. smoothing over each sample's kept tokens, with p clamped to
   [1e-4, 1 - 1e-4] and positions pos (grid (row, col) on 2D stages, the
   sequence index on 1D stages)::

       w_ij  = exp(-|pos_i - pos_j|^2 / (2 sigma^2)) * p_j
       out_i = p_i h_i + (1 - p_i) * sum_j w_ij h_j / (sum_j w_ij + 1e-8)

b. plug-back: every position of the stage's sequence takes the output of the
   nearest kept token in Euclidean distance (ties: the lowest index).

This module holds the dense per-sample reference versions (k x k smoothing and
L x k nearest search per sample). Faster implementations can replace
:func:`smooth_kept` / :func:`nearest_kept_index` and be tested against these.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from dcdit.chunking.packing import PackedSeqs

P_CLAMP = 1e-4
NORM_EPS = 1e-8


def chunk(h: torch.Tensor, keep: torch.Tensor, seqs: PackedSeqs) -> tuple[torch.Tensor, torch.Tensor, PackedSeqs]:
    """Keep the boundary tokens of every sequence in their original order.

    h: (T, D) packed tokens; keep: (B, M) bool in padded layout (or (T,) packed).
    Returns the kept tokens (T', D), their indices into h (T',) and the packing
    of the kept sequences. Costs one host sync (the kept counts).
    """
    keep_packed = seqs.unpad(keep) if keep.dim() == 2 else keep
    counts = keep.sum(dim=1) if keep.dim() == 2 else torch.zeros(
        seqs.batch, dtype=torch.long, device=keep.device
    ).index_add_(0, seqs.seg_ids, keep.long())
    counts = counts.tolist()
    total = sum(counts)
    if hasattr(torch, "nonzero_static"):
        idx = torch.nonzero_static(keep_packed, size=total)[:, 0]
    else:  # pragma: no cover - older torch
        idx = keep_packed.nonzero()[:, 0]
    return h.index_select(0, idx), idx, PackedSeqs(counts, h.device)


def _rows_cols(local: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raster positions (N,) -> (row, col), each (N,) long."""
    return torch.div(local, grid[1], rounding_mode="floor"), local % grid[1]


def _pairwise_sq_dist(local: torch.Tensor, grid: Optional[tuple[int, int]]) -> torch.Tensor:
    """(k,) positions -> (k, k) exact squared distances (on the grid, or along the sequence)."""
    if grid is None:
        x = local.float()
        return (x[:, None] - x[None, :]).square()
    r, c = (v.float() for v in _rows_cols(local, grid))
    return (r[:, None] - r[None, :]).square() + (c[:, None] - c[None, :]).square()


def smooth_kept(
    h: torch.Tensor,
    p: torch.Tensor,
    local: torch.Tensor,
    seqs_kept: PackedSeqs,
    grid: Optional[tuple[int, int]],
    sigma: float,
) -> torch.Tensor:
    """Step a: confidence-weighted Gaussian smoothing among each sample's kept tokens.

    h: (T', D) kept outputs; p: (T',) clamped probabilities; local: (T',)
    positions in the stage's sequence. Dense (k x k) per sample.
    """
    out = []
    for b, k in enumerate(seqs_kept.lengths):
        if k == 0:
            continue
        s = slice(seqs_kept.starts_host[b], seqs_kept.starts_host[b] + k)
        hb, pb = h[s], p[s]
        w = torch.exp(_pairwise_sq_dist(local[s], grid) / (-2.0 * sigma**2)) * pb[None, :]  # (k, k)
        w = w / (w.sum(dim=-1, keepdim=True) + NORM_EPS)
        out.append(torch.addcmul(pb[:, None] * hb, (1 - pb)[:, None], w @ hb))
    return torch.cat(out, dim=0) if out else h.new_empty(h.shape)


def _nearest_1d(kept: torch.Tensor, L: int) -> torch.Tensor:
    """Sorted kept positions (k,) -> for each of 0..L-1 the index of the nearest (ties: lower)."""
    q = torch.arange(L, device=kept.device)
    right = torch.searchsorted(kept, q).clamp_(max=kept.numel() - 1)
    left = (right - 1).clamp_(min=0)
    use_left = (q - kept[left]).abs() <= (kept[right] - q).abs()
    return torch.where(use_left, left, right)


def _nearest_2d(kept: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Raster positions (k,) ascending -> for every grid cell the index of the nearest (ties: lower).

    Squared distances are separable, (dr^2)[row] + (dc^2)[col], so the (L, k)
    table is one broadcast add of a (h, k) and a (w, k) table.
    """
    gh, gw = grid
    r, c = (v.float() for v in _rows_cols(kept, grid))
    dr2 = (torch.arange(gh, device=kept.device, dtype=torch.float32)[:, None] - r[None, :]).square()  # (gh, k)
    dc2 = (torch.arange(gw, device=kept.device, dtype=torch.float32)[:, None] - c[None, :]).square()  # (gw, k)
    return (dr2[:, None, :] + dc2[None, :, :]).reshape(gh * gw, -1).argmin(dim=1)  # first minimum


def nearest_kept_index(
    local_kept: torch.Tensor,
    seqs_kept: PackedSeqs,
    seqs: PackedSeqs,
    grid: Optional[tuple[int, int]],
) -> torch.Tensor:
    """Step b's lookup: for every token of ``seqs`` (T,), the packed index of its nearest kept token.

    Ties go to the kept token with the lowest index. Exact; O(L k) per sample
    on a grid (dense search), O(L log k) along a sequence.
    """
    out = []
    for b, (L, k) in enumerate(zip(seqs.lengths, seqs_kept.lengths)):
        if L == 0:
            continue
        if k == 0:
            raise ValueError(f"sample {b} has no kept token to plug back from")
        if grid is not None and L != grid[0] * grid[1]:
            raise ValueError(f"sample {b} has {L} tokens, not a full {grid} grid")
        s0 = seqs_kept.starts_host[b]
        kept = local_kept[s0 : s0 + k]
        out.append((_nearest_1d(kept, L) if grid is None else _nearest_2d(kept, grid)) + s0)
    if not out:
        return local_kept.new_empty(0)
    return torch.cat(out, dim=0)


def dechunk(
    h_kept: torch.Tensor,
    p_kept: torch.Tensor,
    local_kept: torch.Tensor,
    seqs_kept: PackedSeqs,
    seqs: PackedSeqs,
    grid: Optional[tuple[int, int]] = None,
    sigma: float = 1.0,
) -> torch.Tensor:
    """Smooth the kept outputs and plug them back onto every position: (T', D) -> (T, D).

    p_kept: the kept tokens' boundary probabilities (unclamped); local_kept:
    their positions in the stage's sequence; grid: (h, w) for a 2D stage.
    """
    p = p_kept.clamp(P_CLAMP, 1 - P_CLAMP)
    smoothed = smooth_kept(h_kept, p, local_kept, seqs_kept, grid, sigma)
    return smoothed.index_select(0, nearest_kept_index(local_kept, seqs_kept, seqs, grid))


class ChunkLayer(nn.Module):
    """Module wrapper of :func:`chunk` (its own name for per-component FLOP attribution)."""

    def forward(self, h: torch.Tensor, keep: torch.Tensor, seqs: PackedSeqs):
        return chunk(h, keep, seqs)


class DeChunkLayer(nn.Module):
    """Module wrapper of :func:`dechunk`; runs in fp32 with autocast off unless ``fp32=False``."""

    def __init__(self, sigma: float = 1.0, fp32: bool = True):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"dechunk_kernel_sigma must be positive, got {sigma}")
        self.sigma, self.fp32 = float(sigma), fp32

    def forward(self, h_kept, p_kept, local_kept, seqs_kept, seqs, grid=None) -> torch.Tensor:
        if not self.fp32:
            return dechunk(h_kept, p_kept.to(h_kept.dtype), local_kept, seqs_kept, seqs, grid, self.sigma)
        with torch.autocast(h_kept.device.type, enabled=False):
            return dechunk(h_kept.float(), p_kept.float(), local_kept, seqs_kept, seqs, grid, self.sigma)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, fp32={self.fp32}"
