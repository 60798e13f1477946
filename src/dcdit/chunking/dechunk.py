"""Dechunk (smooth over the kept tokens, then plug back onto every position), MECHANISM step 10.

Dechunk has two steps, computed in fp32:

a. smoothing over each sample's kept tokens, with p clamped to
   [1e-4, 1 - 1e-4] and positions pos (grid (row, col) on 2D stages, the
   sequence index on 1D stages)::

       w_ij  = exp(-|pos_i - pos_j|^2 / (2 sigma^2)) * p_j
       out_i = p_i h_i + (1 - p_i) * sum_j w_ij h_j / (sum_j w_ij + 1e-8)

b. plug-back: every position of the stage's sequence takes the output of the
   nearest kept token in Euclidean distance (ties: the lowest index).

Two implementations live here:

* the dense per-sample definitions (``*_dense``: k x k smoothing, L x k
  nearest search), kept as the reference the fast path is tested against;
* the default fast path, linear in the grid (work O(L) per sample at a fixed
  kernel width, independent of the kept count k):

  - smoothing as a separable Gaussian filter. The kept tokens are scattered
    onto their grid (zeros elsewhere) as [p h, p]; the Gaussian kernel is
    separable, exp(-(dr^2 + dc^2) / 2s^2) = g(dr) g(dc), so sum_j w_ij h_j and
    sum_j w_ij are two 1D filters along columns then rows, read back at the
    kept tokens. The filter is a band of radius r = :func:`truncation_radius`
    (sigma) (7 at sigma 1, 15 at sigma 2): one Toeplitz matmul on axes up to
    ``TILE`` cells, tile by tile on longer ones, so the work per cell does not
    grow with the grid. The dropped weights are below fp32
    resolution relative to the kept ones *for every input*: every kept token
    has its own weight p_i >= 1e-4 in its normaliser, and r is the smallest
    radius whose whole infinite-lattice Gaussian tail is <= 2^-24 * 1e-4, so
    the truncation error is at most 2^-23 x max |h| (no data-dependent
    fallback is needed).
  - plug-back by an exact separable nearest search: per column the nearest
    kept row (cummax / cummin, ties to the upper row), then per row a search
    over a window of columns keyed by (squared distance, raster index), so
    ties go to the lowest raster index exactly as in the dense argmin. Cells
    whose best candidate is not provably optimal (no kept token closer than
    the window's edge) are searched over the full row; on CUDA every cell
    takes the full-row search so no host sync is needed. 1D stages use a
    segmented cummax / cummin (linear, no per-sample loop).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn as nn

from dcdit.chunking.packing import PackedSeqs

P_CLAMP = 1e-4
NORM_EPS = 1e-8
TILE = 64  # axes longer than this are filtered tile by tile (see gaussian_filter_axis)
FP32_EPS = 2.0**-24


def _rows_cols(local: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raster positions (N,) -> (row, col), each (N,) long."""
    return torch.div(local, grid[1], rounding_mode="floor"), local % grid[1]


# --------------------------------------------------------------------------- #
#                    Dense reference (the definition, per sample)             #
# --------------------------------------------------------------------------- #

def _pairwise_sq_dist(local: torch.Tensor, grid: Optional[tuple[int, int]]) -> torch.Tensor:
    """(k,) positions -> (k, k) exact squared distances (on the grid, or along the sequence)."""
    if grid is None:
        x = local.float()
        return (x[:, None] - x[None, :]).square()
    r, c = (v.float() for v in _rows_cols(local, grid))
    return (r[:, None] - r[None, :]).square() + (c[:, None] - c[None, :]).square()


def smooth_kept_dense(
    h: torch.Tensor,
    p: torch.Tensor,
    local: torch.Tensor,
    seqs_kept: PackedSeqs,
    grid: Optional[tuple[int, int]],
    sigma: float,
) -> torch.Tensor:
    """Step a by its definition: dense (k x k) smoothing per sample. p: clamped probabilities."""
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


def _nearest_1d_dense(kept: torch.Tensor, L: int) -> torch.Tensor:
    """Sorted kept positions (k,) -> for each of 0..L-1 the index of the nearest (ties: lower)."""
    q = torch.arange(L, device=kept.device)
    right = torch.searchsorted(kept, q).clamp_(max=kept.numel() - 1)
    left = (right - 1).clamp_(min=0)
    use_left = (q - kept[left]).abs() <= (kept[right] - q).abs()
    return torch.where(use_left, left, right)


def _nearest_2d_dense(kept: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Raster positions (k,) ascending -> for every grid cell the index of the nearest (first minimum)."""
    gh, gw = grid
    r, c = (v.float() for v in _rows_cols(kept, grid))
    dr2 = (torch.arange(gh, device=kept.device, dtype=torch.float32)[:, None] - r[None, :]).square()  # (gh, k)
    dc2 = (torch.arange(gw, device=kept.device, dtype=torch.float32)[:, None] - c[None, :]).square()  # (gw, k)
    return (dr2[:, None, :] + dc2[None, :, :]).reshape(gh * gw, -1).argmin(dim=1)  # first minimum


def _check_plug_back(seqs_kept: PackedSeqs, seqs: PackedSeqs, grid: Optional[tuple[int, int]]) -> None:
    if seqs_kept.batch != seqs.batch:
        raise ValueError(f"kept packing has {seqs_kept.batch} sequences, the stage has {seqs.batch}")
    for b, (L, k) in enumerate(zip(seqs.lengths, seqs_kept.lengths)):
        if L and k == 0:
            raise ValueError(f"sample {b} has no kept token to plug back from")
        if L and grid is not None and L != grid[0] * grid[1]:
            raise ValueError(f"sample {b} has {L} tokens, not a full {grid} grid")


def nearest_kept_index_dense(
    local_kept: torch.Tensor,
    seqs_kept: PackedSeqs,
    seqs: PackedSeqs,
    grid: Optional[tuple[int, int]],
) -> torch.Tensor:
    """Step b's lookup by its definition: an (L, k) distance table per sample, first minimum."""
    _check_plug_back(seqs_kept, seqs, grid)
    out = []
    for b, L in enumerate(seqs.lengths):
        if L == 0:
            continue
        s0, k = seqs_kept.starts_host[b], seqs_kept.lengths[b]
        kept = local_kept[s0 : s0 + k]
        out.append((_nearest_1d_dense(kept, L) if grid is None else _nearest_2d_dense(kept, grid)) + s0)
    if not out:
        return local_kept.new_empty(0)
    return torch.cat(out, dim=0)


def dechunk_dense(
    h_kept: torch.Tensor,
    p_kept: torch.Tensor,
    local_kept: torch.Tensor,
    seqs_kept: PackedSeqs,
    seqs: PackedSeqs,
    grid: Optional[tuple[int, int]] = None,
    sigma: float = 1.0,
) -> torch.Tensor:
    """The dense reference dechunk (quadratic): what :func:`dechunk` is tested against."""
    p = p_kept.clamp(P_CLAMP, 1 - P_CLAMP)
    smoothed = smooth_kept_dense(h_kept, p, local_kept, seqs_kept, grid, sigma)
    return smoothed.index_select(0, nearest_kept_index_dense(local_kept, seqs_kept, seqs, grid))


# --------------------------------------------------------------------------- #
#                     Fast path: separable Gaussian filter                    #
# --------------------------------------------------------------------------- #

@functools.lru_cache(maxsize=None)
def truncation_radius(sigma: float) -> int:
    """Smallest r whose 2D lattice Gaussian mass outside the (2r+1)^2 square is <= 2^-24 * P_CLAMP.

    Every kept token's own weight (>= P_CLAMP) sits in its normaliser, so the
    weights a radius-r band drops are below fp32 resolution relative to the
    ones it keeps, whatever the input.
    """
    g = lambda a: math.exp(-a * a / (2.0 * sigma * sigma))
    bound = FP32_EPS * P_CLAMP
    for r in range(0, 100000):
        inside = 1.0 + 2.0 * sum(g(a) for a in range(1, r + 1))
        tail1, a = 0.0, r + 1
        while True:  # 2 * sum_{a > r} g(a), to convergence
            term = 2.0 * g(a)
            tail1 += term
            if term < 1e-30 or a > r + 100000:
                break
            a += 1
        if 2.0 * inside * tail1 + tail1 * tail1 <= bound:  # (inside + tail)^2 - inside^2
            return r
    raise ValueError(f"sigma {sigma} is too large")  # pragma: no cover


@functools.lru_cache(maxsize=64)
def _toeplitz(n: int, sigma: float, device: str) -> torch.Tensor:
    """(n, n) banded Toeplitz g(i - j), zero beyond the truncation radius.

    The zeros also keep denormals (g(13) ~ 1e-37 at sigma 1) out of the
    matmul, where they would cost ~20x on x86 CPUs.
    """
    a = torch.arange(n, dtype=torch.float64)
    d = a[:, None] - a[None, :]
    g = torch.exp(-d.square() / (2.0 * sigma**2)) * (d.abs() <= truncation_radius(sigma))
    return g.float().to(device)


@functools.lru_cache(maxsize=64)
def _halo(r: int, sigma: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, r) couplings across a tile edge: prev[o, w] = g(o + r - w) (w >= o), next[o, w] = g(w + r - o) (w <= o).

    prev maps the last r rows of tile i-1 onto the first r rows of tile i;
    next maps the first r rows of tile i+1 onto the last r rows of tile i.
    """
    o = torch.arange(r, dtype=torch.float64)[:, None]
    w = torch.arange(r, dtype=torch.float64)[None, :]
    g = lambda d: torch.exp(-d.square() / (2.0 * sigma**2)) * (d <= r)
    return g(o + r - w).float().to(device), g(w + r - o).float().to(device)


class _SymmetricMatmul(torch.autograd.Function):
    """y = K @ x for a constant symmetric K (n, n) and x (P, n, C).

    The backward is K @ grad (K^T = K), the same broadcast kernel as the
    forward. Autograd's generic backward multiplies by an expanded,
    transposed K, a path ~6x slower on CPU.
    """

    @staticmethod
    def forward(ctx, k, x):
        ctx.save_for_backward(k)
        return torch.matmul(k, x)

    @staticmethod
    def backward(ctx, grad):
        (k,) = ctx.saved_tensors
        return None, torch.matmul(k.to(grad.dtype), grad)


def _toeplitz_matmul(k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _SymmetricMatmul.apply(k, x) if torch.is_grad_enabled() and x.requires_grad else torch.matmul(k, x)


def gaussian_filter_axis(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """y[p, i, c] = sum_j g(i - j) x[p, j, c] along axis 1 of x (P, n, C), g(a) = exp(-a^2 / 2 sigma^2).

    The kernel is cut at radius r = truncation_radius(sigma) (see the module
    docstring). Axes up to TILE cells take one banded Toeplitz matmul; longer
    axes are cut into tiles of TILE cells: one (TILE, TILE) matmul per tile
    plus two (r, r) ones across each tile edge, so the cost per cell stays
    about TILE multiply-adds whatever the axis length.
    """
    P, n, C = x.shape
    r = truncation_radius(float(sigma))
    dev = str(x.device)
    if n <= TILE or r > TILE:
        return _toeplitz_matmul(_toeplitz(n, float(sigma), dev).to(x.dtype), x)
    nt = -(-n // TILE)
    if nt * TILE != n:
        x = torch.nn.functional.pad(x, (0, 0, 0, nt * TILE - n))
    xb = x.reshape(P, nt, TILE, C)
    y = _toeplitz_matmul(_toeplitz(TILE, float(sigma), dev).to(x.dtype), xb)  # within each tile
    if r > 0:
        prev, nxt = (m.to(x.dtype) for m in _halo(r, float(sigma), dev))
        y[:, 1:, :r] += torch.matmul(prev, xb[:, :-1, TILE - r :])  # from the tile above
        y[:, :-1, TILE - r :] += torch.matmul(nxt, xb[:, 1:, :r])  # from the tile below
    return y.reshape(P, nt * TILE, C)[:, :n]


def _smooth_on_grid(
    h: torch.Tensor,
    p: torch.Tensor,
    flat: torch.Tensor,
    batch: int,
    shape: tuple[int, ...],
    sigma: float,
) -> torch.Tensor:
    """Smoothing via scatter -> separable filter -> gather. flat: (T',) index into batch x prod(shape) cells."""
    D = h.shape[1]
    cells = math.prod(shape)
    C = D + 1
    ph = p[:, None] * h  # (T', D)
    grid = h.new_zeros(batch * cells, C)  # [p h, p] at the kept cells, zeros elsewhere
    if ph.requires_grad:  # autograd: one out-of-place scatter
        grid = grid.index_copy(0, flat, torch.cat([ph, p[:, None]], dim=1))
    else:  # no copy of [p h, p]: scatter both parts in place
        grid[:, :D].index_copy_(0, flat, ph)
        grid[:, D].index_copy_(0, flat, p)
    if len(shape) == 2:
        gh, gw = shape
        y = gaussian_filter_axis(grid.view(batch * gh, gw, C), sigma)  # along columns
        del grid
        y = gaussian_filter_axis(y.reshape(batch, gh, gw * C), sigma)  # along rows
    else:
        y = gaussian_filter_axis(grid.view(batch, shape[0], C), sigma)
    y = y.reshape(batch * cells, C).index_select(0, flat)  # (T', D + 1) at the kept tokens
    smoothed = y[:, :D] / (y[:, D:] + NORM_EPS)
    return torch.addcmul(ph, (1 - p)[:, None], smoothed)


def smooth_kept(
    h: torch.Tensor,
    p: torch.Tensor,
    local: torch.Tensor,
    seqs_kept: PackedSeqs,
    grid: Optional[tuple[int, int]],
    sigma: float,
    extent: Optional[int] = None,
) -> torch.Tensor:
    """Step a: confidence-weighted Gaussian smoothing among each sample's kept tokens (fast path).

    h: (T', D) kept outputs; p: (T',) clamped probabilities; local: (T',)
    positions in the stage's sequence; extent: the 1D sequence extent (> every
    position; default: read from ``local``, one host sync).
    Equals :func:`smooth_kept_dense` to fp32 resolution.
    """
    if h.shape[0] == 0:
        return h.new_empty(h.shape)
    B = seqs_kept.batch
    if grid is not None:
        shape = tuple(grid)
    else:
        shape = (int(extent) if extent is not None else int(local.max()) + 1,)
    flat = seqs_kept.seg_ids * math.prod(shape) + local
    return _smooth_on_grid(h, p, flat, B, shape, sigma)


# --------------------------------------------------------------------------- #
#                      Fast path: exact nearest kept token                    #
# --------------------------------------------------------------------------- #

def _nearest_raster_2d(keep: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
    """keep (B, gh, gw) bool, every sample with a kept cell -> (B, gh, gw) raster index of the nearest kept cell.

    Euclidean distance; ties go to the lowest raster index (exactly as a dense
    first-argmin over kept tokens in raster order). window: half-width of the
    column search before the full-row fallback (None: full rows for all cells).
    """
    B, gh, gw = keep.shape
    dev = keep.device
    L = gh * gw
    far = 2 * (gh + gw) + 2  # beyond every real distance along a column
    rows = torch.arange(gh, device=dev).view(1, gh, 1)
    up = torch.where(keep, rows, -far).cummax(dim=1).values  # last kept row <= i
    down = torch.where(keep, rows, gh + far).flip(1).cummin(dim=1).values.flip(1)  # first kept row >= i
    du, dd = rows - up, down - rows
    use_up = du <= dd  # ties: the upper row has the lower raster index
    g = torch.where(use_up, du, dd)  # vertical distance to the column's nearest kept row (>= far if none)
    rep = torch.where(use_up, up, down).clamp_(0, gh - 1)
    cols = torch.arange(gw, device=dev)
    # key = d^2 * L + raster index: its minimum is the nearest kept cell, lowest raster index on ties
    base = g.square() * L + rep * gw + cols  # (B, gh, gw), key of column j' at horizontal offset 0
    if window is None or window >= gw - 1:
        return _full_row_search(base, cols, L) % L
    W = int(window)
    inf = torch.iinfo(torch.int64).max // 4
    padded = torch.nn.functional.pad(base, (W, W), value=inf)
    best = padded[..., W : W + gw]
    for o in range(1, W + 1):
        best = torch.minimum(best, torch.minimum(padded[..., W - o : W - o + gw], padded[..., W + o : W + o + gw])
                             + o * o * L)
    unsure = best >= (W + 1) ** 2 * L  # a column outside the window could be as close: search the full row
    bi, ri, ci = unsure.nonzero(as_tuple=True)
    if bi.numel():
        keys = base[bi, ri] + (ci[:, None] - cols[None, :]).square() * L  # (n, gw)
        best[bi, ri, ci] = keys.min(dim=1).values
    return best % L


def _full_row_search(base: torch.Tensor, cols: torch.Tensor, L: int, chunk_cells: int = 1 << 22) -> torch.Tensor:
    """min over every column j' of base[b, i, j'] + (j - j')^2 L, for all cells; bounded memory per call."""
    B, gh, gw = base.shape
    off2 = (cols[:, None] - cols[None, :]).square() * L  # (gw: j, gw: j')
    per = max(1, chunk_cells // (gh * gw * gw))
    out = [(base[b : b + per, :, None, :] + off2).amin(dim=-1) for b in range(0, B, per)]
    return torch.cat(out) if len(out) > 1 else out[0]


def _nearest_packed_1d(keep: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
    """keep (T,) bool over packed sequences -> (T,) packed index of each token's nearest kept token (ties: left)."""
    T = keep.shape[0]
    idx = torch.arange(T, device=keep.device)
    left = torch.where(keep, idx, -1).cummax(dim=0).values
    right = torch.where(keep, idx, T).flip(0).cummin(dim=0).values.flip(0)
    start = seqs.starts.index_select(0, seqs.seg_ids)
    end = start + seqs.lengths_t.index_select(0, seqs.seg_ids)
    big = 2 * T + 2
    dl = torch.where(left >= start, idx - left, big)
    dr = torch.where(right < end, right - idx, big)
    return torch.where(dl <= dr, left, right)


def nearest_kept_index(
    local_kept: torch.Tensor,
    seqs_kept: PackedSeqs,
    seqs: PackedSeqs,
    grid: Optional[tuple[int, int]],
    window: Optional[int] = None,
) -> torch.Tensor:
    """Step b's lookup: for every token of ``seqs`` (T,), the packed index of its nearest kept token.

    Ties go to the kept token with the lowest index. Exact (equal to
    :func:`nearest_kept_index_dense`) and linear in the grid on CPU; see the
    module docstring. ``window``: the column-search half-width (default: from
    the mean kept share; cells it cannot settle are searched in full).
    """
    _check_plug_back(seqs_kept, seqs, grid)
    dev = local_kept.device
    if seqs.total == 0:
        return local_kept.new_empty(0)
    slot_of = torch.full((seqs.total,), -1, dtype=torch.long, device=dev)
    if grid is None:
        pos = seqs.starts.index_select(0, seqs_kept.seg_ids) + local_kept  # kept tokens' packed positions
        slot_of[pos] = torch.arange(local_kept.shape[0], device=dev)
        keep = slot_of >= 0
        return slot_of.index_select(0, _nearest_packed_1d(keep, seqs))
    gh, gw = grid
    L = gh * gw
    B = seqs.batch
    flat = seqs_kept.seg_ids * L + local_kept
    slot_of[flat] = torch.arange(local_kept.shape[0], device=dev)
    keep = (slot_of >= 0).view(B, gh, gw)
    if window is None and dev.type != "cuda":
        share = max(seqs_kept.total, 1) / max(seqs.total, 1)
        window = int(math.ceil(2.0 / math.sqrt(share))) + 1  # about twice the mean spacing of kept tokens
    elif dev.type == "cuda":
        window = None  # the full-row search needs no data-dependent shapes (no host sync)
    raster = _nearest_raster_2d(keep, window)  # (B, gh, gw)
    cell = raster.view(B, L) + (torch.arange(B, device=dev) * L)[:, None]
    return slot_of.index_select(0, cell.reshape(-1))


# --------------------------------------------------------------------------- #
#                                    Dechunk                                  #
# --------------------------------------------------------------------------- #

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
    Linear-time fast path; equals :func:`dechunk_dense` to fp32 resolution.
    """
    p = p_kept.clamp(P_CLAMP, 1 - P_CLAMP)
    nearest = nearest_kept_index(local_kept, seqs_kept, seqs, grid)
    smoothed = smooth_kept(h_kept, p, local_kept, seqs_kept, grid, sigma, extent=seqs.max_seqlen)
    return smoothed.index_select(0, nearest)


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
