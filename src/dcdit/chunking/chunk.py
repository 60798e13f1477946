"""Chunk: keep each sequence's boundary tokens, in order, packed end to end (MECHANISM step 7)."""
from __future__ import annotations

import torch
import torch.nn as nn

from dcdit.chunking.packing import PackedSeqs


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


class ChunkLayer(nn.Module):
    """Module wrapper of :func:`chunk` (its own name for per-component FLOP attribution)."""

    def forward(self, h: torch.Tensor, keep: torch.Tensor, seqs: PackedSeqs):
        return chunk(h, keep, seqs)
