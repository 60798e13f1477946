"""The spatial-predictability router and the boundary rules.

The router scores how poorly a token is predicted from its neighbourhood:
z = conv1x1(h) (width D/4), r = z - conv3x3(z), logit = conv3x3 -> GroupNorm ->
SiLU -> conv1x1(r), p = sigmoid(logit). Predictable (smooth) regions score low.
The first and last token of every sequence get p = 1; a token is a boundary
(kept) iff p > 0.5. Tail dropping then removes the floor(f * n) kept tokens
with the lowest p (elastic inference).

Router modes (``DCDiTConfig.router_mode``), the controls that isolate what the
learned router contributes: ``"learned"`` is the router above; ``"grid"`` and
``"random"`` are fixed routers that keep 1/N of the tokens (N the stage's
``downsample_factor``) without looking at them (:func:`fixed_routing`).
"""
from __future__ import annotations

import numbers
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from dcdit.chunking.packing import GroupNorm, PackedSeqs, packed_conv1d, packed_group_norm

TailDrop = Union[float, torch.Tensor]

ROUTER_MODES = ("learned", "grid", "random")
_M32 = 0xFFFFFFFF


def check_router_mode(mode) -> None:
    if mode not in ROUTER_MODES:
        raise ValueError(f"router_mode must be one of {', '.join(ROUTER_MODES)}, got {mode!r}")


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
    """Validate a drop fraction (a number or one per sample) in [0, 1); tensors come back float32 (B,).

    The model's one check (``DCDiT.forward`` calls it once per call); user input is checked where it
    enters (:func:`dcdit.sampling.budget.parse_tail_drop`).
    """
    if torch.is_tensor(tail_drop):
        if tail_drop.dim() == 0:
            tail_drop = tail_drop.expand(batch)
        if tail_drop.shape != (batch,):
            raise ValueError(f"tail_drop must be a float or a ({batch},) tensor, got shape {tuple(tail_drop.shape)}")
        tail_drop = tail_drop.to(dtype=torch.float32)
        # range check on host tensors only: on an accelerator it would cost a host sync every call
        if tail_drop.device.type == "cpu" and not bool(((tail_drop >= 0) & (tail_drop < 1)).all()):  # NaN fails
            raise ValueError(f"tail_drop fractions must lie in [0, 1), got {tail_drop.tolist()}")
        return tail_drop.to(device=device)
    if isinstance(tail_drop, bool) or not isinstance(tail_drop, numbers.Real):
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
    order: Optional[torch.Tensor] = None,
) -> StageRouting:
    """Apply the boundary rules to router probabilities (MECHANISM steps 5-6).

    prob: (B, M) with the forced tokens already at 1; valid: (B, M) bool.
    A token is kept iff p > 0.5 (the reference's argmax over (1 - p, p)); with
    a drop fraction ``tail_drop``, the floor(tail_drop * n_kept) kept tokens of lowest p are
    dropped (ties: lower raster index first). ``tail_drop`` is a number or a (B,) tensor;
    the count is computed in float32 exactly as the reference does.
    ``order`` (B, M): the tail-drop key in place of p (lowest dropped first),
    for the fixed routers, whose p is the same on every kept token.
    """
    natural = (prob > 0.5) & valid
    keep = natural
    if torch.is_tensor(tail_drop) or tail_drop > 0.0:
        B, M = prob.shape
        n = natural.sum(dim=1)  # (B,)
        if torch.is_tensor(tail_drop):
            tail_drop = tail_drop.to(prob.device, torch.float32)
        n_drop = (n.float() * tail_drop).long()  # floor, in float32 like the reference
        key = (prob if order is None else order).detach().masked_fill(~natural, float("inf"))
        order = torch.sort(key, dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(M, device=prob.device).expand(B, M))
        keep = natural & (rank >= n_drop[:, None])
    selected = torch.where(natural, prob, 1 - prob)
    return StageRouting(boundary_prob=prob, natural_mask=natural, keep_mask=keep, valid_mask=valid,
                        selected_prob=selected, grid=grid, padded=padded)


# --------------------------------------------------------------------------- #
#                 Fixed routers: the controls for the learned one             #
# --------------------------------------------------------------------------- #

def _mix32(z: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values in [0, 2^32) (no int64 overflow)."""
    z = ((z >> 16) ^ z) * 0x45D9F3B & _M32
    z = ((z >> 16) ^ z) * 0x45D9F3B & _M32
    return (z >> 16) ^ z


def sample_keys(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B,) int64 keys in [0, 2^32): a hash of each sample's input bits and timestep.

    The seed of the random router: a sample's boundaries depend on its own
    input only (not on the batch it sits in, the device's random state or how
    inference groups the batch), so a sampling run is reproducible from its
    seed, and training, whose noised inputs differ every step, draws fresh
    boundaries every step.
    """
    B = x.shape[0]
    bits = x.detach().float().reshape(B, -1).contiguous().view(torch.int32).long() & _M32  # (B, CHW)
    pos = _mix32(torch.arange(1, bits.shape[1] + 1, device=x.device, dtype=torch.long))
    acc = _mix32(bits ^ pos).sum(dim=1) & _M32  # (B,) order-sensitive through pos
    return _mix32(acc ^ _mix32(t.detach().long().reshape(B) & _M32))


def lattice(n: int) -> tuple[int, int, int]:
    """(row stride sy, column period sx, shift) of the regular 2D lattice that keeps 1 token in n.

    Kept: (r, c) with r % sy == 0 and (c - shift * (r // sy)) % sx == 0, so
    (0, 0) is always kept and the share is 1/n (exactly when sy divides the
    grid's height and sx its width). n = sy * sx with sy the largest divisor of n
    at most sqrt(n) when that is > 1: a rectangle lattice without shift (n = 4:
    every 2nd token in each direction; 6: 2 x 3; 9: 3 x 3). Prime n (and 2, 3): one
    token per row, shifted by round(sqrt(n)) columns per row (n = 2: the
    checkerboard; n = 5: the square lattice spanned by (1, 2) and (2, -1)).
    """
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"a grid router keeps 1 token in n for a whole n >= 2, got {n!r}")
    sy = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    if sy > 1:
        return sy, n // sy, 0
    return 1, n, int(round(n**0.5))


def lattice_mask(local: torch.Tensor, grid: tuple[int, int], n: int) -> torch.Tensor:
    """Whether each raster position ``local`` of a ``grid`` lies on :func:`lattice` ``(n)`` (1 token in n)."""
    sy, sx, shift = lattice(n)
    r, c = torch.div(local, grid[1], rounding_mode="floor"), local % grid[1]
    off = (shift * torch.div(r, sy, rounding_mode="floor")) % sx
    return (r % sy == 0) & ((c - off) % sx == 0)


def _bayer(i: torch.Tensor, j: torch.Tensor, nbits: int) -> torch.Tensor:
    """Index of (i, j) in the 2^nbits ordered-dither (Bayer) matrix: every prefix 0..k-1 of the
    order is spread evenly over the square (the coarsest lattice first)."""
    out = torch.zeros_like(i)
    for b in range(nbits):  # bit b of (i, j) is the base-4 digit nbits-1-b
        ib, jb = (i >> b) & 1, (j >> b) & 1
        out = out + (2 * (ib ^ jb) + ib) * (4 ** (nbits - 1 - b))
    return out


def _bit_reverse(i: torch.Tensor, nbits: int) -> torch.Tensor:
    """The 1D ordered dither: i with its nbits bits reversed (van der Corput order)."""
    out = torch.zeros_like(i)
    for b in range(nbits):
        out = out + (((i >> b) & 1) << (nbits - 1 - b))
    return out


def fixed_routing(
    mode: str,
    N: float,
    seqs: PackedSeqs,
    grid: Optional[tuple[int, int]] = None,
    tail_drop: TailDrop = 0.0,
    sample_key: Optional[torch.Tensor] = None,
    salt: int = 0,
) -> StageRouting:
    """A router that keeps 1/N of the tokens without looking at them (``mode`` "grid" or "random").

    * ``"grid"``: the regular lattice of :func:`lattice` (N whole) on the 2D
      stage, every N-th token on 1D stages; the same for every sample and step.
      Tail dropping removes the kept tokens last in ordered-dither order
      (:func:`_bayer` over the lattice's own coordinates; bit reversal in 1D), so
      any drop leaves a thinned but evenly spread lattice, the first token last.
    * ``"random"``: every token kept with probability 1/N, independently, from a
      hash of (``sample_key`` (B,) from :func:`sample_keys`, ``salt`` (the stage),
      position): reproducible, per sample, fresh when the input changes. Tail
      dropping removes a random subset of the kept tokens (by a hash of the same).

    Both keep the first token of every sequence (the plug-back needs one kept
    token per sample; the learned router forces it too), and no other forced token.

    The boundary probability is constant: p = 1 on kept tokens, 0 elsewhere.
    So p > 0.5 is the mask; STE(max(p, 1 - p)) = 1 (there is nothing to train);
    the dechunk's smoothing, out_i = p_i h_i + (1 - p_i) * (neighbour average),
    reduces to the nearest-kept plug-back (p clamped to 1 - 1e-4), as for a fully
    confident learned router; and the ratio loss reads F = G = the kept share,
    a constant with no gradient (exactly its minimum 1 when the share is 1/N).
    """
    check_router_mode(mode)
    if mode == "learned":
        raise ValueError("fixed_routing is for the 'grid' and 'random' router modes")
    local = seqs.local  # (T,)
    if mode == "grid":
        n = int(round(N))
        if abs(N - n) > 1e-9:
            raise ValueError(f"router_mode 'grid' needs a whole downsample_factor N, got {N}")
        if grid is None:
            keep = local % n == 0
            k = local // n
            order = -_bit_reverse(k, max(1, int(seqs.max_seqlen // n).bit_length())).float()
        else:
            sy, sx, shift = lattice(n)
            r, c = torch.div(local, grid[1], rounding_mode="floor"), local % grid[1]
            i = torch.div(r, sy, rounding_mode="floor")
            off = (shift * i) % sx
            keep = lattice_mask(local, grid, n)
            j = torch.div(c - off, sx, rounding_mode="floor").clamp(min=0)
            nbits = max(1, max(grid[0] // sy, grid[1] // sx).bit_length())
            order = -_bayer(i, j, nbits).float()
    else:
        if sample_key is None or sample_key.shape != (seqs.batch,):
            raise ValueError(f"router_mode 'random' needs one sample key per sequence ({seqs.batch},)")
        key = _mix32((sample_key.long() ^ _mix32(torch.full_like(sample_key, salt + 1))) & _M32)
        h = _mix32((key.index_select(0, seqs.seg_ids) + 0x9E3779B9 * (local + 1)) & _M32)  # (T,)
        keep = h < int(round(2**32 / N))
        order = _mix32(h ^ 0x5BD1E995).float()
        order = torch.where(local == 0, torch.full_like(order, 2.0**33), order)
    keep = keep | (local == 0)
    p = keep.float()
    valid = seqs.valid_mask()
    return select_boundaries(seqs.pad(p), valid, tail_drop, grid, padded=not seqs.is_uniform,
                             order=seqs.pad(order))


class SpatialPredictabilityRouter(nn.Module):
    """Scores tokens by their local prediction residual; 2D on the outer grid, 1D on inner sequences.

    Parameter names follow the reference (``proj``, ``context_predictor``,
    ``residual_scorer.{0,1,3}``). ``mode`` "grid" or "random" replaces the
    scores by a fixed router keeping 1/``N`` of the tokens (:func:`fixed_routing`;
    ``salt`` tells stages apart); the parameters stay, unused, so a control
    model has the learned one's parameter count and state-dict layout.
    """

    def __init__(
        self,
        dim: int,
        spatial_dims: int = 2,
        norm_groups: int = 8,
        bias_init: float = -1.1,
        fp32: bool = True,
        mode: str = "learned",
        N: float = 4.0,
        salt: int = 0,
        floor: int = 0,
    ):
        super().__init__()
        check_router_mode(mode)
        if mode != "learned" and not N > 1:
            raise ValueError(f"a {mode} router keeps 1 token in N for N > 1, got {N}")
        if floor and (spatial_dims != 2 or mode != "learned"):
            raise ValueError("a router floor (a fixed lattice always kept) is for the learned 2D router")
        self.mode, self.N, self.salt, self.floor = mode, float(N), int(salt), int(floor)
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
        sample_key: Optional[torch.Tensor] = None,
    ) -> StageRouting:
        """h (T, D) packed tokens -> this stage's routing, in padded (B, M) layout.

        ``sample_key`` (B,): the random router's per-sample seed (:func:`sample_keys`).
        """
        if self.mode != "learned":  # a fixed router: h is not read, no parameter is used
            return fixed_routing(self.mode, self.N, seqs, grid, tail_drop, sample_key, self.salt)
        ctx = torch.autocast(h.device.type, enabled=False) if self.fp32 else nullcontext()
        with ctx:
            if self.fp32:
                h = h.to(self.proj.weight.dtype)
            p = torch.sigmoid(self.logits(h, seqs, grid).float())  # (T,)
            last = seqs.local == (seqs.lengths_t[seqs.seg_ids] - 1)
            forced = (seqs.local == 0) | last
            if self.floor and grid is not None:  # the fixed lattice of 1 token in `floor`, always kept
                forced = forced | lattice_mask(seqs.local, grid, self.floor)
            p = torch.where(forced, torch.ones_like(p), p)  # forced boundaries
            prob = seqs.pad(p)  # (B, M), 0 at padding
            return select_boundaries(prob, seqs.valid_mask(), tail_drop, grid, padded=not seqs.is_uniform)
