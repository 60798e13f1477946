"""Exactness of the optimised paths against the dense definitions they replace.

The fast dechunk (separable banded Gaussian filter + exact separable nearest
search) must equal the dense k x k smoothing / L x k nearest search: the
nearest-token lookup exactly (ties to the lowest raster index), the smoothed
values to fp32 resolution, gradients included.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import perturb_params_

import importlib
from dcdit.chunking import PackedSeqs, chunk, dechunk, nearest_kept_index, smooth_kept
from dcdit.chunking.dechunk import (
    P_CLAMP,
    dechunk_dense,
    gaussian_filter_axis,
    nearest_kept_index_dense,
    smooth_kept_dense,
    truncation_radius,
)

GRIDS = [(6, 7), (1, 9), (9, 1), (3, 3), (32, 32), (33, 40), (64, 64), (70, 33)]
SHARES = [0.9, 0.5, 0.25, 1 / 16, 0.01]


def kept_batch(grid, share, B=3, D=6, seed=0, p_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    L = grid[0] * grid[1]
    keep = torch.rand(B, L, generator=g) < share
    keep[:, 0] |= ~keep.any(1)
    seqs = PackedSeqs.uniform(B, L, "cpu")
    h = torch.randn(B * L, D, generator=g)
    prob = torch.rand(B, L, generator=g) * p_scale
    hk, idx, sk = chunk(h, keep, seqs)
    return hk, seqs.unpad(prob)[idx], seqs.local[idx], sk, seqs, keep


# --------------------------------------------------------------------------- #
#                                 Plug-back                                   #
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("share", SHARES)
def test_nearest_matches_dense_exactly(grid, share):
    hk, pk, lk, sk, seqs, _ = kept_batch(grid, share, seed=hash((grid, share)) % 1000)
    want = nearest_kept_index_dense(lk, sk, seqs, grid)
    for window in (None, 0, 1, 3, 100):  # None: full rows (the CUDA path); small windows force the fallback
        assert torch.equal(nearest_kept_index(lk, sk, seqs, grid, window=window), want)
    assert torch.equal(nearest_kept_index(lk, sk, seqs, grid), want)  # default window


@pytest.mark.parametrize("grid", [(9, 9), (16, 16), (12, 20)])
def test_nearest_ties_on_lattices_and_rings(grid):
    """Regular lattices and symmetric pairs make many exact ties: the lowest raster index must win."""
    gh, gw = grid
    L = gh * gw
    seqs = PackedSeqs.uniform(4, L, "cpu")
    keep = torch.zeros(4, gh, gw, dtype=torch.bool)
    keep[0, ::4, ::4] = True  # square lattice: cell centres tie 4 ways
    keep[1, ::3, ::5] = True
    keep[2, 0, 0] = keep[2, -1, -1] = keep[2, 0, -1] = keep[2, -1, 0] = True  # corners only
    keep[3, gh // 2, gw // 2] = True
    keep[3, gh // 2 - 2, gw // 2 + 2] = keep[3, gh // 2 + 2, gw // 2 - 2] = True  # mirrored pair
    keep = keep.view(4, L)
    h = torch.randn(4 * L, 3)
    _, idx, sk = chunk(h, keep, seqs)
    lk = seqs.local[idx]
    want = nearest_kept_index_dense(lk, sk, seqs, grid)
    for window in (None, 1, 2, 6):
        assert torch.equal(nearest_kept_index(lk, sk, seqs, grid, window=window), want)


def test_nearest_1d_variable_lengths_matches_dense():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        lengths = torch.randint(1, 80, (5,), generator=g).tolist()
        seqs = PackedSeqs(lengths, "cpu")
        keep = torch.rand(seqs.total, generator=g) < [0.5, 0.1, 0.02][trial % 3]
        keep[seqs.starts + (torch.rand(5, generator=g) * seqs.lengths_t).long()] = True  # >= 1 per sequence
        _, idx, sk = chunk(torch.randn(seqs.total, 2), seqs.pad(keep), seqs)
        lk = seqs.local[idx]
        assert torch.equal(nearest_kept_index(lk, sk, seqs, None), nearest_kept_index_dense(lk, sk, seqs, None))


def test_nearest_rejects_empty_samples():
    seqs = PackedSeqs.uniform(2, 9, "cpu")
    with pytest.raises(ValueError):
        nearest_kept_index(torch.tensor([3]), PackedSeqs([1, 0], "cpu"), seqs, (3, 3))


# --------------------------------------------------------------------------- #
#                                 Smoothing                                   #
# --------------------------------------------------------------------------- #

def test_truncation_radius_bounds_the_whole_lattice_tail():
    for sigma in (0.5, 1.0, 1.5, 2.0, 3.0):
        r = truncation_radius(sigma)
        g = lambda a: math.exp(-a * a / (2 * sigma * sigma))
        inside = sum(g(a) for a in range(-r, r + 1))
        total = sum(g(a) for a in range(-50 * int(sigma + 1), 50 * int(sigma + 1) + 1))
        assert total**2 - inside**2 <= 2.0**-24 * P_CLAMP * 1.0001
        if r > 0:  # and r is the smallest such radius
            inside_less = sum(g(a) for a in range(-(r - 1), r))
            assert total**2 - inside_less**2 > 2.0**-24 * P_CLAMP
    assert truncation_radius(1.0) == 7 and truncation_radius(2.0) == 15


@pytest.mark.parametrize("n", [1, 5, 32, 33, 64, 100, 130])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_gaussian_filter_axis_matches_truncated_convolution(n, sigma):
    x = torch.randn(3, n, 5, dtype=torch.float64)
    r = truncation_radius(sigma)
    a = torch.arange(n, dtype=torch.float64)
    d = a[:, None] - a[None, :]
    G = torch.exp(-d.square() / (2 * sigma**2)) * (d.abs() <= r)
    xf = x.float().requires_grad_()
    y = gaussian_filter_axis(xf, sigma)
    torch.testing.assert_close(y.double(), G @ x, atol=1e-5, rtol=1e-5)
    gy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(gy.float())  # the hand-written backward (K^T = K) against the transposed operator
    torch.testing.assert_close(xf.grad.double(), G.T @ gy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_dechunk_matches_dense(grid, sigma):
    for share, p_scale in ((0.5, 1.0), (1 / 16, 1.0), (0.25, 1e-3)):  # tiny p: the clamp's worst case
        hk, pk, lk, sk, seqs, _ = kept_batch(grid, share, seed=7, p_scale=p_scale)
        want = dechunk_dense(hk, pk, lk, sk, seqs, grid, sigma)
        got = dechunk(hk, pk, lk, sk, seqs, grid, sigma)
        scale = hk.abs().max().item()
        torch.testing.assert_close(got, want, atol=4e-7 * scale, rtol=1e-6)
        p = pk.clamp(P_CLAMP, 1 - P_CLAMP)
        torch.testing.assert_close(smooth_kept(hk, p, lk, sk, grid, sigma),
                                   smooth_kept_dense(hk, p, lk, sk, grid, sigma), atol=4e-7 * scale, rtol=1e-6)


def test_dechunk_1d_matches_dense():
    g = torch.Generator().manual_seed(2)
    for sigma in (1.0, 2.0):
        lengths = [70, 3, 1, 41, 100]
        seqs = PackedSeqs(lengths, "cpu")
        keep = torch.rand(seqs.total, generator=g) < 0.3
        keep[seqs.starts] = True
        h = torch.randn(seqs.total, 5, generator=g)
        p = torch.rand(seqs.total, generator=g)
        hk, idx, sk = chunk(h, seqs.pad(keep), seqs)
        args = (hk, p[idx], seqs.local[idx], sk, seqs, None, sigma)
        torch.testing.assert_close(dechunk(*args), dechunk_dense(*args), atol=1e-6, rtol=1e-6)


def test_dechunk_gradients_match_dense():
    g = torch.Generator().manual_seed(3)
    grid = (40, 36)
    hk, pk, lk, sk, seqs, _ = kept_batch(grid, 0.2, B=2, D=4, seed=3)
    w = torch.randn(seqs.total, 4, generator=g)
    grads = []
    for fn in (dechunk, dechunk_dense):
        h = hk.clone().requires_grad_()
        p = (pk * 0.8 + 0.1).clone().requires_grad_()
        (fn(h, p, lk, sk, seqs, grid, 1.0) * w).sum().backward()
        grads.append((h.grad, p.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- #
#                                  Model                                      #
# --------------------------------------------------------------------------- #

def test_model_output_unchanged_by_fast_dechunk(monkeypatch):
    from dcdit.models import DCDiT, DCDiTConfig

    cfg = DCDiTConfig(input_size=16, in_channels=4, num_classes=10, arch_layout=["c1", ["D2"], "c1"],
                      d_model=[64, 64], num_heads=[4, 4], enc_dec_dim_factor=[2, None])
    model = DCDiT(cfg)
    g = perturb_params_(model)
    with torch.no_grad():
        model.routing_module.residual_scorer[-1].bias.fill_(0.0)
    model.eval()
    x = torch.randn(3, 4, 16, 16, generator=g)
    t, y = torch.tensor([10, 500, 990]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        fast, r_fast = model(x, t, y, tail_drop=0.3)
        monkeypatch.setattr(importlib.import_module("dcdit.chunking.dechunk"), "dechunk", dechunk_dense)
        dense, r_dense = model(x, t, y, tail_drop=0.3)
    assert torch.equal(r_fast[0].keep_mask, r_dense[0].keep_mask)
    torch.testing.assert_close(fast, dense, atol=1e-5, rtol=0)


def _tiny(**kw):
    from dcdit.models import DCDiT, DCDiTConfig

    base = dict(input_size=16, in_channels=4, num_classes=10, arch_layout=["c1", ["D2"], "c1"], d_model=[64, 64],
                num_heads=[4, 4], enc_dec_dim_factor=[2, None])
    model = DCDiT(DCDiTConfig(**{**base, **kw}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, m in model.named_modules():
            if name.endswith("routing_module"):
                m.residual_scorer[-1].bias.fill_(0.0)
                m.residual_scorer[-1].weight.normal_(0, 2.0, generator=g)  # kept counts vary per sample
    return model.eval()


@pytest.mark.parametrize("nested", [False, True])
def test_grouped_inference_equals_one_batch(nested):
    kw = dict(arch_layout=["c1", ["c1", ["D1"], "c1"], "c1"], d_model=[64, 64, 64], num_heads=[4, 4, 4],
              enc_dec_dim_factor=[2, None, None], downsample_factor=[4.0, 2.0]) if nested else {}
    model = _tiny(**kw)
    g = torch.Generator().manual_seed(1)
    B = 5
    x = torch.randn(B, 4, 16, 16, generator=g)
    t, y = torch.randint(0, 1000, (B,), generator=g), torch.randint(0, 10, (B,), generator=g)
    drop = torch.tensor([0.0, 0.3, 0.5, 0.1, 0.9])
    with torch.no_grad():
        model.set_inference(group_tokens=0)
        whole, r_whole = model(x, t, y, tail_drop=drop)
        model.set_inference(group_tokens=2 * 256)  # groups of 2, 2, 1 samples
        grouped, r_grouped = model(x, t, y, tail_drop=drop)
    assert len(set(r_whole[0].num_kept.tolist())) > 1
    torch.testing.assert_close(grouped, whole, atol=1e-5, rtol=0)
    assert len(r_grouped) == len(r_whole)
    for a, b in zip(r_grouped, r_whole):
        assert a.grid == b.grid
        for k in ("keep_mask", "natural_mask", "valid_mask", "num_kept"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
        torch.testing.assert_close(a.kept_share(), b.kept_share(), atol=0, rtol=0)
        torch.testing.assert_close(a.boundary_prob, b.boundary_prob, atol=1e-5, rtol=0)
    # with gradients recorded the batch is never split
    model.set_inference(group_tokens=256)
    out, _ = model(x, t, y, tail_drop=drop)
    torch.testing.assert_close(out.detach(), whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lengths", [[7, 7, 7], [3, 9, 1, 6]])
def test_dit_block_on_packed_tokens_matches_each_sequence_alone(lengths):
    from dcdit.attention import packed_attn_fn
    from dcdit.models.layers import DiTBlock

    torch.manual_seed(0)
    block = DiTBlock(32, 4)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    seqs = PackedSeqs(lengths, "cpu")
    x = torch.randn(seqs.total, 32)
    c = torch.randn(len(lengths), 32)
    attn = packed_attn_fn(seqs.cu_seqlens, seqs.max_seqlen, seqs.lengths, "sdpa_loop")
    got = block(x, c, attn, seqs)  # packed tokens
    for b, (a, n) in enumerate(zip(seqs.starts_host, lengths)):  # each sequence alone through the DiT block
        want = block(x[a : a + n][None], c[b : b + 1])[0]
        torch.testing.assert_close(got[a : a + n], want, atol=1e-5, rtol=0)


def test_kept_bucket_padding_changes_nothing():
    """Padding the main network's packed tokens to a bucket (its own attention sequence) is exact."""
    model = _tiny()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 16, 16, generator=g)
    t, y = torch.tensor([5, 500, 995]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        want, r = model(x, t, y, tail_drop=0.3)
        assert sum(r[0].num_kept.tolist()) % 64  # the bucket really pads
        model.set_inference(kept_bucket=64)
        got, _ = model(x, t, y, tail_drop=0.3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # with gradients too (training may bucket as well)
    out, _ = model(x, t, y, tail_drop=0.3)
    out.square().mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_varlen_attention_custom_op_matches_backend():
    from dcdit.attention import varlen_attention

    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 9]
    q, k, v = (torch.randn(sum(lengths), 2, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    want = varlen_attention(q, k, v, cu, max(lengths), lengths, "sdpa_loop")
    assert torch.equal(torch.ops.dcdit.varlen_attention(q, k, v, cu, "sdpa_loop"), want)


def test_functional_block_matches_packed_block():
    """The pure-function block (what compile_main_network compiles) equals DiTBlock.forward on packed tokens."""
    from dcdit.attention import packed_attn_fn
    from dcdit.models.dcdit import functional_dit_block
    from dcdit.models.layers import DiTBlock

    torch.manual_seed(0)
    block = DiTBlock(32, 4)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    seqs = PackedSeqs([3, 9, 1, 6], "cpu")
    x, c = torch.randn(seqs.total, 32), torch.randn(4, 32)
    attn = packed_attn_fn(seqs.cu_seqlens, seqs.max_seqlen, seqs.lengths, "sdpa_loop")
    want = block(x, c, attn, seqs)
    a, m = block.attn, block.mlp
    got = functional_dit_block(x, seqs.seg_ids, block.adaLN_modulation(c), seqs.cu_seqlens, a.qkv.weight, a.qkv.bias,
                               a.proj.weight, a.proj.bias, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, 4,
                               "sdpa_loop")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")
def test_compiled_main_network_matches_eager():
    """torch.compile path (inference): same output as eager, one compiled graph for all blocks and lengths."""
    pytest.importorskip("torch._inductor")
    model = _tiny(arch_layout=["c1", ["D3"], "c1"])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 16, 16, generator=g)
    t, y = torch.tensor([5, 500, 995]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        want_a, _ = model(x, t, y, tail_drop=0.3)
        want_b, _ = model(x, t, y, tail_drop=0.5)
        model.compile_main_network(bucket=64, dynamic=False)
        got_a, ra = model(x, t, y, tail_drop=0.3)
        got_b, rb = model(x, t, y, tail_drop=0.5)
    torch.testing.assert_close(got_a, want_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_b, want_b, atol=1e-4, rtol=1e-4)
