"""Variable-length attention backends (flash-attn, PyTorch varlen, per-sample SDPA, padded)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from dcdit.attention.backends import BACKENDS, available_backends, resolve_backend, varlen_attention

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "varlen_attention", "packed_attn_fn"]


def packed_attn_fn(
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    lengths: Optional[Sequence[int]] = None,
    backend: str = "auto",
    round_qkv: Optional[torch.dtype] = None,
):
    """An ``attn_fn(q, k, v)`` for :class:`dcdit.models.layers.Attention` on a packed (1, T, D) batch.

    The block hands over (1, H, T, d) tensors; attention is confined to the
    sequences delimited by ``cu_seqlens``. ``round_qkv`` (e.g. torch.bfloat16)
    rounds q, k, v to that dtype and back before attending, which is what the
    reference DC-DiT does in fp32 runs (its flash-attn path casts to bf16).
    """

    def attn_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != 1:
            raise ValueError(f"packed attention expects a (1, H, T, d) batch, got {tuple(q.shape)}")
        if round_qkv is not None and q.dtype != round_qkv:
            q, k, v = (t.to(round_qkv).to(t.dtype) for t in (q, k, v))
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # (T, H, d) views
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, lengths, backend)  # (T, H, d)
        return out.transpose(0, 1).unsqueeze(0)  # (1, H, T, d)

    return attn_fn
