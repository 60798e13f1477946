"""Packed variable-length batches and the per-sequence ops that run on them.

A batch of B sequences of lengths L_i is stored end to end as one (T, ...)
tensor, T = sum L_i. No padding token exists, so no FLOP is spent on one.
:class:`PackedSeqs` carries the bookkeeping (cu_seqlens for attention, the
sample and position of every token); the conv/GroupNorm helpers compute
exactly what ``nn.Conv1d``/``nn.GroupNorm`` compute on each sequence alone.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class PackedSeqs:
    """Bookkeeping for B sequences packed along one axis.

    Attributes: ``lengths`` / ``starts_host`` (host lists), ``batch`` B, ``total`` T,
    ``max_seqlen``, ``cu_seqlens`` (B+1,) int32 (flash-attn convention),
    ``starts`` (B,) long, ``seg_ids`` (T,) long sample of each token,
    ``local`` (T,) long position of each token inside its sequence.
    """

    def __init__(self, lengths: Sequence[int], device: torch.device | str):
        self.lengths = [int(n) for n in lengths]
        if any(n < 0 for n in self.lengths):
            raise ValueError(f"sequence lengths must be non-negative, got {self.lengths}")
        self.batch = len(self.lengths)
        self.total = sum(self.lengths)
        self.max_seqlen = max(self.lengths, default=0)
        self.device = torch.device(device)
        self.starts_host = list(itertools.accumulate([0] + self.lengths[:-1])) if self.lengths else []
        lens = torch.tensor(self.lengths, dtype=torch.long).to(self.device, non_blocking=True)
        cu = F.pad(lens.cumsum(0), (1, 0))
        self.lengths_t = lens  # (B,)
        self.starts = cu[:-1]  # (B,)
        self.cu_seqlens = cu.to(torch.int32)  # (B+1,)
        self.seg_ids = torch.repeat_interleave(torch.arange(self.batch, device=self.device), lens, output_size=self.total)
        self.local = torch.arange(self.total, device=self.device) - self.starts[self.seg_ids]  # (T,)

    @classmethod
    def uniform(cls, batch: int, length: int, device: torch.device | str) -> "PackedSeqs":
        return cls([length] * batch, device)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.lengths)) <= 1

    def valid_mask(self) -> torch.Tensor:
        """(B, max_seqlen) True where a padded layout holds a real token."""
        return torch.arange(self.max_seqlen, device=self.device)[None, :] < self.lengths_t[:, None]

    def pad(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(T, ...) -> (B, max_seqlen, ...) with ``fill`` at padding."""
        if self.is_uniform:
            return x.reshape(self.batch, self.max_seqlen, *x.shape[1:])
        out = x.new_full((self.batch, self.max_seqlen, *x.shape[1:]), fill)
        out[self.seg_ids, self.local] = x
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, max_seqlen, ...) -> (T, ...): the inverse of :meth:`pad`."""
        if self.is_uniform:
            return x.reshape(self.total, *x.shape[2:])
        return x[self.seg_ids, self.local]

    def per_token(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) per-sample values -> (T, ...) one row per token."""
        return x.index_select(0, self.seg_ids)

    def __repr__(self) -> str:
        return f"PackedSeqs(batch={self.batch}, total={self.total}, max_seqlen={self.max_seqlen})"


def packed_conv1d(x: torch.Tensor, conv: nn.Conv1d, seqs: PackedSeqs) -> torch.Tensor:
    """``conv`` (odd kernel k, stride 1, padding k // 2) applied to every sequence alone.

    x: (T, C_in) -> (T, C_out). Neighbours outside a token's own sequence
    count as the zero padding the convolution would see at its ends.
    """
    k = conv.kernel_size[0]
    if k % 2 == 0 or conv.stride[0] != 1 or conv.padding[0] != k // 2 or conv.groups != 1 or conv.dilation[0] != 1:
        raise ValueError(f"packed_conv1d supports odd kernels with 'same' padding only, got {conv}")
    if k == 1:
        return F.linear(x, conv.weight[:, :, 0], conv.bias)
    r = k // 2
    T = x.shape[0]
    lens = seqs.lengths_t[seqs.seg_ids]  # (T,) length of each token's sequence
    cols = []
    for off in range(-r, r + 1):
        if off == 0:
            cols.append(x)
            continue
        idx = (torch.arange(T, device=x.device) + off).clamp_(0, max(T - 1, 0))
        ok = ((seqs.local + off) >= 0) & ((seqs.local + off) < lens)
        cols.append(x.index_select(0, idx) * ok[:, None].to(x.dtype))
    w = conv.weight.permute(0, 2, 1).reshape(conv.out_channels, k * conv.in_channels)  # (out, k*in), tap-major
    return F.linear(torch.cat(cols, dim=-1), w, conv.bias)


def packed_group_norm(x: torch.Tensor, norm: nn.GroupNorm, seqs: PackedSeqs) -> torch.Tensor:
    """``norm`` applied to every sequence alone (statistics per sequence and group); x (T, C)."""
    T, C = x.shape
    G = norm.num_groups
    xf = x.float().view(T, G, C // G)
    count = (seqs.lengths_t.float() * (C // G)).clamp_(min=1.0)[:, None]  # (B, 1)
    mean = xf.new_zeros(seqs.batch, G).index_add_(0, seqs.seg_ids, xf.sum(-1)) / count  # (B, G)
    xc = xf - mean.index_select(0, seqs.seg_ids)[:, :, None]
    var = xf.new_zeros(seqs.batch, G).index_add_(0, seqs.seg_ids, xc.pow(2).sum(-1)) / count
    y = (xc * torch.rsqrt(var + norm.eps).index_select(0, seqs.seg_ids)[:, :, None]).view(T, C)
    if norm.affine:
        y = y * norm.weight.float() + norm.bias.float()
    return y.to(x.dtype)


class _GroupNormFn(torch.autograd.Function):
    """GroupNorm whose backward runs on contiguous (NCHW) tensors.

    The forward calls the kernel ``F.group_norm`` dispatches to (same output
    bits, in whatever layout arrives). On CPU the backward kernel for channels-last
    input is ~10x slower than for NCHW; the grid stages of DC-DiT hand their
    GroupNorms channels-last views, so the backward copies to NCHW first.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        N, C = x.shape[:2]
        ctx.sizes = (N, C, x.numel() // (N * C), groups)
        y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, *ctx.sizes, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, rstd = ctx.saved_tensors
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            gy.contiguous(), x.contiguous(), mean, rstd, weight, *ctx.sizes, list(ctx.needs_input_grad[:3]))
        return gx, gw, gb, None, None


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, same forward) with a fast CPU backward for channels-last input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and self.affine and x.dim() > 2 and x.numel() > 0
                and not x.is_contiguous() and (x.requires_grad or self.weight.requires_grad)):
            return _GroupNormFn.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] < 16 * self.num_groups):
            # torch's bf16 channels-last GroupNorm kernel on CPU is slow for groups of < 16 channels: 7.5 ms on
            # (64, 32, 16, 16) in 8 groups against 0.2 for NCHW (1.0 vs 0.8 at 16 per group). The scaffold's
            # convs want channels-last (faster at inference), so normalise an NCHW copy and hand back channels-last
            y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return y.contiguous(memory_format=torch.channels_last)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
