"""Building blocks shared by DiT and DC-DiT.

Written from the DiT paper's description (adaLN-Zero blocks, sinusoidal
timestep MLP, label table with a null row for classifier-free guidance, fixed
2D sin-cos positions). Parameter names follow the released DiT checkpoints so
their state dicts load with ``strict=True``.

Shape legend: B batch, T tokens, D hidden width, H heads, C channels.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dcdit.attention import backends as attention_backends
if TYPE_CHECKING:  # only for the annotation; models may import chunking, but layers need not
    from dcdit.chunking.packing import PackedSeqs

# attn_fn(q, k, v) -> out, all (B, H, T, head_dim); lets DC-DiT swap in
# variable-length backends without touching the block's parameters.
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; x (B, T, D), shift/scale (B, D) or already (B, T, D)."""
    if shift.dim() == x.dim() - 1:
        shift, scale = shift.unsqueeze(-2), scale.unsqueeze(-2)
    if _amp_training(x):
        return _modulate_amp(x, shift, 1 + scale)
    return x * (1 + scale) + shift


def _amp_training(x: torch.Tensor) -> bool:
    """Training (autograd records) under autocast on x's device: the mixed-precision fast paths apply."""
    return torch.is_grad_enabled() and torch.is_autocast_enabled(x.device.type)


def _modulate_amp(h: torch.Tensor, shift: torch.Tensor, scale1: torch.Tensor) -> torch.Tensor:
    """``h * scale1 + shift`` in the dtype of the adaLN output (the autocast dtype), for training.

    The normalised h (fp32 when the residual stream is) is rounded to that dtype first and one
    ``addcmul`` modulates it, so the linear layer that follows gets its input without another cast:
    ~8 % of a bf16 DiT training step on CPU, for one extra bf16 rounding. Everywhere else (fp32, and
    any run without autograd) the modulation is computed as before, bit for bit.
    """
    return torch.addcmul(shift, h.to(shift.dtype), scale1)


_GELU_2C = 2.0 * math.sqrt(2.0 / math.pi)  # tanh(u) = 2 sigmoid(2u) - 1, u = sqrt(2/pi) (x + 0.044715 x^3)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (DiT's activation).

    Compiled into a bf16 training step on CPU it is written as ``x * sigmoid(2u)``, the same
    function (``0.5 (1 + tanh u) = sigmoid(2u)``): Inductor's CPU code computes sigmoid ~2x faster
    than tanh, forward and backward (~9 % of a compiled DiT/4 training step). Everywhere else
    (eager, fp32, inference, GPU) it is aten's ``gelu``, bit for bit.
    """
    if x.device.type == "cpu" and torch.compiler.is_compiling() and _amp_training(x):
        return x * torch.sigmoid(_GELU_2C * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


# --------------------------------------------------------------------------- #
#                     Positional embeddings (fixed, sin-cos)                  #
# --------------------------------------------------------------------------- #

def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): [sin(pos * w), cos(pos * w)], w = 1/10000^(2i/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(dim: int, grid_h: int, grid_w: Optional[int] = None) -> np.ndarray:
    """Fixed 2D sin-cos table for a grid_h x grid_w grid in raster order: (grid_h*grid_w, dim).

    Half the channels encode the column, half the row (the MAE/DiT layout).
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be divisible by 4, got {dim}")
    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    emb_w = _sincos_1d(dim // 2, cols)  # first half: column (x)
    emb_h = _sincos_1d(dim // 2, rows)  # second half: row (y)
    return np.concatenate([emb_w, emb_h], axis=1)


# --------------------------------------------------------------------------- #
#                                 Embedders                                   #
# --------------------------------------------------------------------------- #

class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D) by a strided conv; T = (H/p) * (W/p)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(
                f"expected input of shape (B, {self.in_chans}, {self.img_size}, {self.img_size}), got {tuple(x.shape)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (B, D): sinusoidal features (256) then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) possibly fractional timesteps -> (B, dim) as [cos | sin]."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class labels -> (B, D). Row ``num_classes`` is the null class used for guidance.

    During training labels are replaced by the null class with probability
    ``dropout_prob`` (classifier-free guidance training).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        n_rows = self.embedding_table.num_embeddings
        if labels.dtype not in (torch.int64, torch.int32) or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D integer tensor, got dtype {labels.dtype} shape {tuple(labels.shape)}")
        # Range check only for CPU tensors: on an accelerator it would force a
        # host sync every step (the embedding lookup still fails loudly there); not
        # while torch.compile traces either (a graph break; the lookup still checks).
        if (labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling()
                and (int(labels.min()) < 0 or int(labels.max()) >= n_rows)):
            raise ValueError(
                f"labels must lie in [0, {n_rows - 1}] ({self.num_classes} classes"
                + (f", {self.num_classes} = null class)" if n_rows > self.num_classes else ")")
                + f", got [{int(labels.min())}, {int(labels.max())}]"
            )
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------- #
#                              Transformer parts                              #
# --------------------------------------------------------------------------- #

def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact attention softmax(QK^T / sqrt(d)) V on (B, H, T, d) tensors."""
    return attention_backends.sdpa(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (names as timm's)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_fn: Optional[AttnFn] = None) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, T, d)
        out = (attn_fn or sdpa)(q, k, v)  # (B, H, T, d)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning.

    One forward for DiT's (B, T, D) batches and DC-DiT's packed variable-length
    tokens (see :meth:`forward`). ``cond_size`` is the width of c when it
    differs from the block's (nested DC-DiT stages); ``use_mlp=False`` gives an
    attention-only block (H-Net's lowercase "d" layout letter).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        cond_size: Optional[int] = None,
        use_mlp: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6) if use_mlp else None
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio)) if use_mlp else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size or hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        attn_fn: Optional[AttnFn] = None,
        seqs: Optional["PackedSeqs"] = None,
    ) -> torch.Tensor:
        """x (B, T, D) and c (B, cond) -> (B, T, D); or packed tokens x (T, D) of ``seqs``' sequences.

        The adaLN modulation is computed once per sample. On packed tokens it is
        broadcast over a (B, L, D) view when every sequence has the same length,
        otherwise gathered per token: in one gather when training, right before
        each use without autograd (never six (T, D) expansions held at once);
        ``attn_fn`` attends within each sequence.
        """
        # the six per-sample vectors, with 1 + scale formed per sample:
        # shift_msa, scale1_msa, gate_msa, shift_mlp, scale1_mlp, gate_mlp
        ada = list(self.adaLN_modulation(c).chunk(6, dim=-1))
        ada[1], ada[4] = 1 + ada[1], 1 + ada[4]
        xs = x
        tok = lambda i: ada[i].unsqueeze(1)  # (B, 1, D): broadcast over each sample's tokens
        attn_in = attn_out = lambda h: h
        if seqs is not None:
            T, D = x.shape
            if seqs.is_uniform and seqs.batch * seqs.max_seqlen == T:
                xs = x.view(seqs.batch, seqs.max_seqlen, D)  # (B, L, D)
                attn_in, attn_out = (lambda h: h.reshape(1, T, D)), (lambda a: a.view(xs.shape))
            elif torch.is_grad_enabled():
                # training: one gather of all six (four of them are held for the backward anyway)
                xs = x[None]  # (1, T, D)
                per_tok = seqs.per_token(torch.cat(ada, dim=-1))[None].chunk(6, dim=-1)  # 6 x (1, T, D)
                tok = lambda i: per_tok[i]
            else:
                xs = x[None]  # (1, T, D)
                tok = lambda i: seqs.per_token(ada[i])[None]  # (1, T, D), gathered right before its use
        # modulate(h, shift, scale) = h * (1 + scale) + shift
        if _amp_training(x):
            mod = lambda h, i: _modulate_amp(h, tok(i), tok(i + 1))
        else:
            mod = lambda h, i: h * tok(i + 1) + tok(i)
        h = mod(self.norm1(xs), 0)
        xs = xs + tok(2) * attn_out(self.attn(attn_in(h), attn_fn))
        del h
        if self.mlp is not None:
            xs = xs + tok(5) * self.mlp(mod(self.norm2(xs), 3))
        return xs if seqs is None else xs.reshape(x.shape)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm on fp32 x (..., D) and weight (D,), with a hand-written backward.

    The forward is PyTorch's fused kernel (``aten._fused_rms_norm``: the same bits as
    ``F.rms_norm``); PyTorch has no CPU kernel for its backward, and autograd through the
    decomposed expression makes ~12 passes over x. This backward makes ~6:
    gx = r g w - x r^3 (sum_j g_j w_j x_j) / D, gw = sum_n r_n g_n x_n, with r = rsqrt(mean(x^2) + eps).
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, r = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, r = ctx.saved_tensors
        D = x.shape[-1]
        gx_ = g * x  # (..., D)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            dot = (gx_ @ weight).unsqueeze(-1)  # (..., 1): sum_j g_j w_j x_j
            gx = (g * weight).mul_(r).addcmul_(x, dot.mul_(r.pow(3)).div_(-D))
        if ctx.needs_input_grad[1]:
            gw = (r.reshape(1, -1) @ gx_.reshape(-1, D)).reshape(D)
        return gx, gw, None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same expression, bit for bit in the forward (tests): F.rms_norm without autograd,
        # the fused kernel with a few-pass backward (_RMSNormFn) when autograd records.
        xf, w = x.float(), self.weight.float()
        if torch.is_grad_enabled() and (xf.requires_grad or w.requires_grad) and xf.numel():
            return _RMSNormFn.apply(xf, w, self.eps).to(x.dtype)
        return F.rms_norm(xf, (x.shape[-1],), w, self.eps).to(x.dtype)


class FinalLayer(nn.Module):
    """adaLN LayerNorm then a linear map to patch_size^2 * out_channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cond_size: Optional[int] = None):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size or hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def guided_combine(out: torch.Tensor, cfg_scale: float, guidance_channels: Optional[int] = None) -> torch.Tensor:
    """Classifier-free guidance on a [cond; uncond] batch.

    out: (2B, C_out, H, W) with the conditional half first. Guides the first
    ``guidance_channels`` channels (default: all eps channels, i.e. the first
    half when the model also predicts variances; the original DiT guides only
    3, pass ``guidance_channels=3`` to reproduce its numbers). The guided eps
    is written to both halves; the rest passes through from the batch.
    """
    if out.shape[0] % 2:
        raise ValueError(f"guided batch must have an even size (cond + uncond halves), got {out.shape[0]}")
    n = guidance_channels if guidance_channels is not None else None
    eps, rest = (out[:, :n], out[:, n:]) if n is not None else (out, out[:, :0])
    cond, uncond = eps.chunk(2, dim=0)
    half = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([half, half], dim=0), rest], dim=1)


def xavier_linear_init(m: nn.Module) -> None:
    """DiT's base init, applied with ``module.apply``: xavier-uniform Linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
