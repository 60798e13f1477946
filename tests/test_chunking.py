"""Routing rules, chunk, dechunk and the packed per-sequence ops, against brute-force versions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from dcdit.chunking import (
    GroupNorm,
    PackedSeqs,
    SpatialPredictabilityRouter,
    chunk,
    check_tail_drop,
    dechunk,
    nearest_kept_index,
    packed_conv1d,
    packed_group_norm,
    select_boundaries,
    ste,
)


def random_keep(B, L, g, p=0.3):
    keep = torch.rand(B, L, generator=g) < p
    keep[:, 0] = True  # at least one kept token per sample
    return keep


# --------------------------------------------------------------------------- #
#                             Packed sequences                                #
# --------------------------------------------------------------------------- #

def test_packed_seqs_bookkeeping():
    s = PackedSeqs([3, 1, 4], "cpu")
    assert s.total == 8 and s.max_seqlen == 4 and s.cu_seqlens.tolist() == [0, 3, 4, 8]
    assert s.cu_seqlens.dtype == torch.int32
    assert s.seg_ids.tolist() == [0, 0, 0, 1, 2, 2, 2, 2] and s.local.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    x = torch.arange(8.0)
    padded = s.pad(x, fill=-1)
    assert padded.tolist() == [[0, 1, 2, -1], [3, -1, -1, -1], [4, 5, 6, 7]]
    assert torch.equal(s.unpad(padded), x)
    assert s.valid_mask().sum().item() == 8
    with pytest.raises(ValueError):
        PackedSeqs([2, -1], "cpu")


@pytest.mark.parametrize("k", [1, 3, 5])
def test_packed_conv1d_matches_per_sequence_conv(k):
    g = torch.Generator().manual_seed(k)
    lengths = [5, 1, 7, 2]
    conv = nn.Conv1d(6, 4, k, padding=k // 2)
    s = PackedSeqs(lengths, "cpu")
    x = torch.randn(s.total, 6, generator=g)
    want = torch.cat([conv(x[a : a + n].T[None])[0].T for a, n in zip(s.starts_host, lengths)])
    torch.testing.assert_close(packed_conv1d(x, conv, s), want, atol=1e-5, rtol=0)


def test_packed_group_norm_matches_per_sequence_norm():
    g = torch.Generator().manual_seed(1)
    lengths = [5, 1, 9]
    norm = nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
    s = PackedSeqs(lengths, "cpu")
    x = torch.randn(s.total, 8, generator=g) * 3 + 1
    want = torch.cat([norm(x[a : a + n].T[None])[0].T for a, n in zip(s.starts_host, lengths)])
    torch.testing.assert_close(packed_group_norm(x, norm, s), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_channels_last_matches_nn_group_norm(dtype):
    """Same forward bits as nn.GroupNorm on a channels-last view; gradients agree (computed in NCHW)."""
    g = torch.Generator().manual_seed(2)
    ref, ours = nn.GroupNorm(4, 16), GroupNorm(4, 16)
    with torch.no_grad():
        ref.weight.normal_(generator=g), ref.bias.normal_(generator=g)
    ours.load_state_dict(ref.state_dict())  # same parameter names
    base = (torch.randn(3, 5, 6, 16, generator=g) * 2 + 1).to(dtype)
    xs = [base.permute(0, 3, 1, 2).detach().requires_grad_() for _ in range(2)]  # (B, C, H, W) channels-last
    assert not xs[0].is_contiguous()
    y_ref, y = ref(xs[0]), ours(xs[1])
    assert torch.equal(y, y_ref)
    gy = torch.randn(y.shape, generator=g).to(dtype)
    y_ref.backward(gy), y.backward(gy)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(xs[1].grad, xs[0].grad, **tol)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **tol)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **tol)


@pytest.mark.parametrize("channels", [32, 128])
def test_group_norm_bf16_channels_last_inference(channels):
    """Inference on a bf16 channels-last input (the scaffold's convs at sampling): nn.GroupNorm's values within
    bf16 rounding, channels-last out. Groups of < 16 channels go through an NCHW copy (torch's channels-last
    bf16 kernel is slow for them); wider groups keep torch's kernel, bit for bit."""
    g = torch.Generator().manual_seed(3)
    ref, ours = nn.GroupNorm(8, channels), GroupNorm(8, channels)
    with torch.no_grad():
        ref.weight.normal_(generator=g), ref.bias.normal_(generator=g)
    ours.load_state_dict(ref.state_dict())
    x = (torch.randn(4, 6, 5, channels, generator=g) * 2 + 1).bfloat16().permute(0, 3, 1, 2)  # channels-last view
    with torch.no_grad():
        y, y_ref, y32 = ours(x), ref(x), ref(x.float())
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), y32, atol=4e-2, rtol=1e-2)  # bf16 rounding of the fp32 result
    if channels >= 16 * 8:
        assert torch.equal(y, y_ref)


# --------------------------------------------------------------------------- #
#                                 Routing                                     #
# --------------------------------------------------------------------------- #

def test_boundary_rule_is_strictly_above_half():
    prob = torch.tensor([[1.0, 0.5, 0.5000001, 0.2, 1.0]])
    sel = select_boundaries(prob, torch.ones_like(prob, dtype=torch.bool))
    assert sel.natural_mask.tolist() == [[True, False, True, False, True]]
    torch.testing.assert_close(sel.selected_prob, torch.tensor([[1.0, 0.5, 0.5000001, 0.8, 1.0]]))


def test_tail_drop_removes_floor_fraction_of_lowest_p():
    g = torch.Generator().manual_seed(0)
    B, L = 5, 64
    prob = torch.rand(B, L, generator=g)
    prob[:, 0] = prob[:, -1] = 1.0
    valid = torch.ones(B, L, dtype=torch.bool)
    frac = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.99])
    sel = select_boundaries(prob, valid, frac)
    n = sel.natural_mask.sum(1)
    n_drop = (n.float() * frac).long()  # float32 floor, as the reference
    assert torch.equal(sel.keep_mask.sum(1), n - n_drop)
    assert not (sel.keep_mask & ~sel.natural_mask).any()
    for b in range(B):  # every dropped boundary has p <= every kept one
        dropped, kept = prob[b][sel.natural_mask[b] & ~sel.keep_mask[b]], prob[b][sel.keep_mask[b]]
        if dropped.numel():
            assert dropped.max() <= kept.min()
    # one number for all samples is the same as that number per sample
    same = select_boundaries(prob, valid, 0.3)
    assert torch.equal(same.keep_mask, select_boundaries(prob, valid, torch.full((B,), 0.3)).keep_mask)


def test_tail_drop_count_uses_float32_arithmetic():
    # 70 * 0.3 is 20.999... in float64 but 21.0 in float32: the reference drops 21.
    prob = torch.full((1, 72), 0.9)
    prob[0, :2] = 0.1  # 70 boundaries
    sel = select_boundaries(prob, torch.ones_like(prob, dtype=torch.bool), 0.3)
    assert sel.natural_mask.sum().item() == 70 and sel.keep_mask.sum().item() == 70 - 21


def test_tail_drop_ties_drop_lower_index_first():
    prob = torch.tensor([[1.0, 0.7, 0.7, 0.7, 1.0]])
    sel = select_boundaries(prob, torch.ones_like(prob, dtype=torch.bool), 0.4)  # floor(5 * .4) = 2
    assert sel.keep_mask.tolist() == [[True, False, False, True, True]]


def test_check_tail_drop_validates():
    assert check_tail_drop(0.25, 3, torch.device("cpu")) == 0.25
    assert check_tail_drop(torch.tensor([0.0, 0.5]), 2, torch.device("cpu")).dtype == torch.float32
    assert check_tail_drop(np.float32(0.5), 2, torch.device("cpu")) == 0.5  # any real number
    for bad, msg in ((1.0, r"\[0, 1\), got 1.0"), (-0.1, "got -0.1"), (float("nan"), "got nan"), ("0.3", "got str"),
                     (torch.tensor([0.1, 0.2, 0.3]), r"\(2,\) tensor"), (torch.tensor([0.2, 1.0]), r"got \[0.2.*, 1.0\]"),
                     (torch.tensor([0.2, float("nan")]), "nan"), (True, "got bool")):
        with pytest.raises(ValueError, match=msg):
            check_tail_drop(bad, 2, torch.device("cpu"))


@pytest.mark.parametrize("spatial_dims", [2, 1])
def test_router_forces_first_and_last_token(spatial_dims):
    torch.manual_seed(0)
    router = SpatialPredictabilityRouter(64, spatial_dims=spatial_dims, bias_init=-30.0)
    if spatial_dims == 2:
        seqs, grid = PackedSeqs.uniform(3, 12, "cpu"), (3, 4)
    else:
        seqs, grid = PackedSeqs([5, 1, 7], "cpu"), None
    sel = router(torch.randn(seqs.total, 64), seqs, grid)
    valid = seqs.valid_mask()
    for b, n in enumerate(seqs.lengths):
        want = torch.zeros(seqs.max_seqlen, dtype=torch.bool)
        want[0] = want[n - 1] = True
        assert torch.equal(sel.natural_mask[b], want) and torch.equal(sel.keep_mask[b], want)
        assert sel.boundary_prob[b, 0] == 1 and sel.boundary_prob[b, n - 1] == 1
    assert (sel.boundary_prob[~valid] == 0).all()
    assert sel.boundary_prob.dtype == torch.float32
    # kept shares leave the padding out: first and last of each sequence kept
    want = torch.tensor([min(2, n) / n for n in seqs.lengths])
    torch.testing.assert_close(sel.kept_share(), want)
    torch.testing.assert_close(sel.kept_share(natural=True, group_size=3), (want * torch.tensor(seqs.lengths)).sum()[None] / seqs.total)
    assert sel.padded == (grid is None) and torch.equal(sel.num_kept, sel.keep_mask.sum(1))


def test_stage_routing_cat_and_rows():
    """Routing of sample groups concatenates (padding inner stages to one width) and slices back exactly."""
    from dcdit.chunking import StageRouting

    a = select_boundaries(torch.tensor([[1.0, 0.2, 0.9, 1.0]]), torch.ones(1, 4, dtype=torch.bool), padded=False)
    valid = torch.tensor([[True, True, False, False, False, False], [True] * 6])
    b = select_boundaries(torch.tensor([[1.0, 1.0, 0, 0, 0, 0], [1.0, 0.1, 0.7, 0.3, 0.2, 1.0]]), valid, padded=True)
    ab = StageRouting.cat([a, b])
    assert ab.keep_mask.shape == (3, 6) and ab.padded and not ab.valid_mask[0, 4:].any()
    torch.testing.assert_close(ab.kept_share(), torch.cat([a.kept_share(), b.kept_share()]))
    torch.testing.assert_close(ab.kept_share(), torch.tensor([0.75, 1.0, 0.5]))
    torch.testing.assert_close(ab.mean_prob()[1:], b.mean_prob())
    assert torch.equal(ab.rows(slice(1, 3)).keep_mask, b.keep_mask)


def test_router_1d_is_per_sequence():
    """A 1D router scores a sequence the same alone and packed with others."""
    torch.manual_seed(0)
    router = SpatialPredictabilityRouter(64, spatial_dims=1, bias_init=0.0)
    lengths = [6, 9, 3]
    seqs = PackedSeqs(lengths, "cpu")
    h = torch.randn(seqs.total, 64)
    together = router(h, seqs).boundary_prob
    for b, (a, n) in enumerate(zip(seqs.starts_host, lengths)):
        alone = router(h[a : a + n], PackedSeqs([n], "cpu")).boundary_prob[0]
        torch.testing.assert_close(together[b, :n], alone, atol=1e-6, rtol=0)


def test_ste_is_one_forward_and_identity_backward():
    p = torch.tensor([0.2, 0.9], requires_grad=True)
    out = ste(p)
    assert torch.equal(out, torch.ones(2))
    (out * torch.tensor([3.0, -2.0])).sum().backward()
    assert torch.equal(p.grad, torch.tensor([3.0, -2.0]))


# --------------------------------------------------------------------------- #
#                             Chunk / dechunk                                 #
# --------------------------------------------------------------------------- #

def test_chunk_keeps_raster_order():
    g = torch.Generator().manual_seed(0)
    B, L = 3, 20
    seqs = PackedSeqs.uniform(B, L, "cpu")
    keep = random_keep(B, L, g)
    h = torch.randn(B * L, 5, generator=g)
    hk, idx, seqs_k = chunk(h, keep, seqs)
    assert seqs_k.lengths == keep.sum(1).tolist()
    assert torch.equal(hk, h.view(B, L, 5)[keep])
    assert torch.equal(idx, keep.reshape(-1).nonzero()[:, 0])


def brute_force_dechunk(h_kept, prob, keep, grid, sigma):
    """The reference's batched formulation: padded (B, M, M) smoothing and (B, L, M) nearest search."""
    B, L = keep.shape
    M = int(keep.sum(1).max())
    pos = torch.full((B, M), -1, dtype=torch.long)
    valid = torch.zeros(B, M, dtype=torch.bool)
    H = h_kept.new_zeros(B, M, h_kept.shape[-1])
    start = 0
    for b in range(B):
        ids = keep[b].nonzero()[:, 0]
        pos[b, : len(ids)], valid[b, : len(ids)] = ids, True
        H[b, : len(ids)] = h_kept[start : start + len(ids)]
        start += len(ids)
    p = prob.clamp(1e-4, 1 - 1e-4).gather(1, pos.clamp(min=0))

    def coords(ix):
        if grid is None:
            return ix.float()[..., None]
        return torch.stack([ix // grid[1], ix % grid[1]], -1).float()

    c = coords(pos)
    d2 = ((c[:, :, None] - c[:, None]) ** 2).sum(-1)
    w = torch.exp(-d2 / (2 * sigma**2)) * p[:, None, :] * (valid[:, :, None] & valid[:, None, :])
    w = w / (w.sum(-1, keepdim=True) + 1e-8)
    out = p[..., None] * H + (1 - p[..., None]) * torch.bmm(w, H)
    allc = coords(torch.arange(L))[None].expand(B, -1, -1)
    dist = ((allc[:, :, None] - c[:, None]) ** 2).sum(-1).masked_fill(~valid[:, None, :], float("inf"))
    nearest = dist.argmin(-1)  # first minimum = lowest index
    return out.gather(1, nearest[..., None].expand(-1, -1, out.shape[-1]))


@pytest.mark.parametrize("grid", [(6, 7), None])
def test_dechunk_matches_brute_force(grid):
    g = torch.Generator().manual_seed(3)
    B, L, D = 4, 42, 8
    seqs = PackedSeqs.uniform(B, L, "cpu")
    prob = torch.rand(B, L, generator=g)
    keep = random_keep(B, L, g, 0.25)
    keep[1] = False
    keep[1, 17] = True  # a single kept token
    hk, idx, seqs_k = chunk(torch.randn(B * L, D, generator=g), keep, seqs)
    out = dechunk(hk, seqs.unpad(prob)[idx], seqs.local[idx], seqs_k, seqs, grid, sigma=1.5)
    want = brute_force_dechunk(hk, prob, keep, grid, 1.5).reshape(B * L, D)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_dechunk_variable_length_sequences():
    """1D dechunk on packed sequences of different lengths equals each sequence alone."""
    g = torch.Generator().manual_seed(4)
    lengths = [9, 3, 14]
    seqs = PackedSeqs(lengths, "cpu")
    keep_packed = torch.rand(seqs.total, generator=g) < 0.4
    keep_packed[seqs.local == 0] = True
    h = torch.randn(seqs.total, 5, generator=g)
    prob = torch.rand(seqs.total, generator=g)
    hk, idx, seqs_k = chunk(h, seqs.pad(keep_packed), seqs)
    out = dechunk(hk, prob[idx], seqs.local[idx], seqs_k, seqs, None, 1.0)
    for a, n in zip(seqs.starts_host, lengths):
        s1 = PackedSeqs([n], "cpu")
        hk1, idx1, sk1 = chunk(h[a : a + n], keep_packed[a : a + n][None], s1)
        alone = dechunk(hk1, prob[a : a + n][idx1], s1.local[idx1], sk1, s1, None, 1.0)
        torch.testing.assert_close(out[a : a + n], alone, atol=1e-6, rtol=0)


def test_plug_back_nearest_with_lowest_index_ties():
    # 3x3 grid, kept tokens at raster 0 (0,0) and 8 (2,2): (0,2), (1,1), (2,0) are equidistant -> token 0.
    seqs = PackedSeqs.uniform(1, 9, "cpu")
    local_kept = torch.tensor([0, 8])
    idx = nearest_kept_index(local_kept, PackedSeqs([2], "cpu"), seqs, (3, 3))
    assert idx.tolist() == [0, 0, 0, 0, 0, 1, 0, 1, 1]
    # 1D: kept at 1 and 5; position 3 is a tie -> the left one.
    idx = nearest_kept_index(torch.tensor([1, 5]), PackedSeqs([2], "cpu"), PackedSeqs([7], "cpu"), None)
    assert idx.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_dechunk_gradients_reach_probabilities_and_tokens():
    g = torch.Generator().manual_seed(5)
    seqs = PackedSeqs.uniform(2, 16, "cpu")
    keep = random_keep(2, 16, g, 0.5)
    h = torch.randn(32, 4, generator=g, requires_grad=True)
    prob = torch.rand(32, generator=g).mul(0.8).add(0.1).requires_grad_()
    hk, idx, seqs_k = chunk(h, keep, seqs)
    dechunk(hk, prob[idx], seqs.local[idx], seqs_k, seqs, (4, 4)).square().sum().backward()
    assert h.grad.abs().sum() > 0 and prob.grad.abs().sum() > 0
    assert (h.grad[~keep.reshape(-1)] == 0).all()  # dropped tokens do not reach the output
