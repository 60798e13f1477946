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


# --------------------------------------------------------------------------- #
#          An opaque op for torch.compile (inference): the graph stays         #
#          independent of the per-sequence lengths                            #
# --------------------------------------------------------------------------- #

@torch.library.custom_op("dcdit::varlen_attention", mutates_args=())
def varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        backend: str) -> torch.Tensor:
    """:func:`varlen_attention` as a custom op: (T, H, d) x3 + cu_seqlens -> (T, H, d).

    torch.compile treats it as one opaque call, so a compiled graph depends on
    the packed total T only, never on the individual sequence lengths (read
    from ``cu_seqlens`` inside; on CPU that costs nothing, on CUDA a sync).
    Forward only (no autograd formula): the compiled path is for inference.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    out = varlen_attention(q, k, v, cu_seqlens, max(lengths, default=0), lengths, backend)
    return out.clone() if out.data_ptr() in (q.data_ptr(), k.data_ptr(), v.data_ptr()) else out.contiguous()


@varlen_attention_op.register_fake
def _varlen_attention_fake(q, k, v, cu_seqlens, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


__all__.append("varlen_attention_op")
