"""Variable-length attention backends: agreement, no cross-sample leakage, FLOPs, selection."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dcdit.attention import available_backends, packed_attn_fn, resolve_backend, varlen_attention

LENGTHS = [7, 1, 7, 7, 13, 2, 30]  # runs of equal lengths, a singleton, a long one


def naive(q, k, v, lengths):
    out, a = [], 0
    for n in lengths:
        qs, ks, vs = (t[a : a + n].transpose(0, 1) for t in (q, k, v))  # (H, n, d)
        att = (qs @ ks.transpose(-1, -2) / qs.shape[-1] ** 0.5).softmax(-1)
        out.append((att @ vs).transpose(0, 1))
        a += n
    return torch.cat(out)


def packed_qkv(lengths, H=3, d=16, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, H, d, generator=g).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0] + lengths).cumsum(0).to(device=device, dtype=torch.int32)
    return q, k, v, cu


@pytest.mark.parametrize("backend", ["sdpa_loop", "padded", "auto"])
def test_backends_agree_with_naive_attention_fp32(backend):
    q, k, v, cu = packed_qkv(LENGTHS)
    want = naive(q, k, v, LENGTHS)
    out = varlen_attention(q, k, v, cu, max(LENGTHS), LENGTHS, backend=backend)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    # lengths are optional (read from cu_seqlens)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, max(LENGTHS), backend=backend), want, atol=1e-5, rtol=0)


def test_no_attention_across_sequences():
    q, k, v, cu = packed_qkv(LENGTHS)
    base = varlen_attention(q, k, v, cu, max(LENGTHS), LENGTHS)
    v2 = v.clone()
    v2[:7] += 100.0  # change only the first sequence
    out = varlen_attention(q, k, v2, cu, max(LENGTHS), LENGTHS)
    assert not torch.allclose(out[:7], base[:7])
    torch.testing.assert_close(out[7:], base[7:], atol=0, rtol=0)


def test_packed_attn_fn_layout_and_rounding():
    q, k, v, cu = packed_qkv(LENGTHS)
    fn = packed_attn_fn(cu, max(LENGTHS), LENGTHS)
    as_block = lambda t: t.transpose(0, 1)[None]  # (T, H, d) -> (1, H, T, d), what Attention hands over
    out = fn(as_block(q), as_block(k), as_block(v))
    assert out.shape == (1, 3, sum(LENGTHS), 16)
    torch.testing.assert_close(out[0].transpose(0, 1), naive(q, k, v, LENGTHS), atol=1e-5, rtol=0)
    rounded = packed_attn_fn(cu, max(LENGTHS), LENGTHS, round_qkv=torch.bfloat16)
    r = lambda t: t.bfloat16().float()
    want = naive(r(q), r(k), r(v), LENGTHS)
    torch.testing.assert_close(rounded(as_block(q), as_block(k), as_block(v))[0].transpose(0, 1), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        fn(q.transpose(0, 1)[None].expand(2, -1, -1, -1), as_block(k), as_block(v))


def test_gradients_flow_through_loop_backend():
    q, k, v, cu = packed_qkv(LENGTHS)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    varlen_attention(q, k, v, cu, max(LENGTHS), LENGTHS, backend="sdpa_loop").square().sum().backward()
    qn, kn, vn = (t.detach().clone().requires_grad_() for t in (q, k, v))
    naive(qn, kn, vn, LENGTHS).square().sum().backward()
    for a, b in ((q, qn), (k, kn), (v, vn)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


def test_attention_flops_follow_real_lengths():
    """Counted attention work is sum_i L_i^2, not B * max(L)^2."""
    q, k, v, cu = packed_qkv(LENGTHS)
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v)}
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        varlen_attention(q, k, v, cu, max(LENGTHS), LENGTHS, backend="sdpa_loop")
    H, d = q.shape[1], q.shape[2]
    assert counter.get_total_flops() == 4 * H * d * sum(n * n for n in LENGTHS)  # QK^T and AV, 2 FLOPs per MAC


def test_backend_selection():
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa_loop"
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa_loop"
    assert "padded" in available_backends("cpu", torch.float32)
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", "cpu", torch.float32)
    with pytest.raises(ValueError, match="not usable"):
        resolve_backend("flash_attn", "cpu", torch.float32)
    with pytest.raises(ValueError):
        varlen_attention(torch.zeros(4, 2, 8), torch.zeros(4, 2, 8), torch.zeros(3, 2, 8), torch.tensor([0, 4]), 4)


def test_bf16_loop_backend_close_to_fp32():
    q, k, v, cu = packed_qkv(LENGTHS)
    want = naive(q, k, v, LENGTHS)
    out = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, max(LENGTHS), LENGTHS)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backends_agree(dtype):
    q, k, v, cu = packed_qkv(LENGTHS, device="cuda", dtype=dtype)
    want = naive(q.float(), k.float(), v.float(), LENGTHS)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name in available_backends("cuda", dtype):
        out = varlen_attention(q, k, v, cu, max(LENGTHS), LENGTHS, backend=name)
        torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("grad", [True, False])
def test_cpu_half_attention_matches_fp32_and_keeps_dtype(grad):
    """bf16 q, k, v on CPU: attended in fp32 when autograd records (fast backward), in bf16 otherwise."""
    from dcdit.attention.backends import _cpu_half, sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    qh, kh, vh = (t.to(torch.bfloat16).requires_grad_(grad) for t in (q, k, v))
    assert _cpu_half(qh) == grad
    out = sdpa(qh, kh, vh)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
    if grad:
        out.float().sum().backward()
        assert qh.grad is not None and qh.grad.dtype == torch.bfloat16 and torch.isfinite(qh.grad.float()).all()


# --------------------------------------------------------------------------- #
#      The CPU training path: batched-matmul attention, one padded call       #
# --------------------------------------------------------------------------- #

def _grads(fn, *ts):
    ts = [t.detach().clone().requires_grad_(True) for t in ts]
    out = fn(*ts)
    g = torch.Generator().manual_seed(1)
    out.float().backward(torch.randn(out.shape, generator=g))
    return out.detach(), [t.grad for t in ts]


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_math_attention_equals_sdpa_fp32_with_grads(mask):
    """math_attention computes F.scaled_dot_product_attention (fp32: to rounding), masks and gradients included."""
    from dcdit.attention.backends import math_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 9, 8, generator=g) for _ in range(3))
    m = None
    if mask == "bool":
        m = torch.rand(3, 1, 1, 9, generator=g) > 0.3
        m[..., 0] = True
    elif mask == "float":
        m = torch.randn(3, 2, 9, 9, generator=g)
    sdpa_ = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3)
    want, want_g = _grads(sdpa_, q, k, v)
    out, out_g = _grads(lambda q, k, v: math_attention(q, k, v, attn_mask=m, scale=0.3), q, k, v)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    for a, b in zip(out_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lengths", [LENGTHS, [40, 33, 37, 40, 29], [5, 0, 64, 3]])
def test_padded_train_equals_sdpa_loop_fp32_with_grads(lengths):
    """The padded training path attends exactly like one SDPA call per sequence (fp32, gradients
    included, empty sequences too): padded keys get probability 0, padded queries no gradient."""
    from dcdit.attention.backends import _padded_train, _sdpa_loop

    q, k, v, cu = packed_qkv(lengths)
    args = (cu, max(lengths), lengths, None)
    want, want_g = _grads(lambda q, k, v: _sdpa_loop(q, k, v, *args), q, k, v)
    out, out_g = _grads(lambda q, k, v: _padded_train(q, k, v, *args), q, k, v)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    for a, b in zip(out_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_pad_rule_pads_many_short_sequences_not_one_long_among_short():
    """One padded call when the padding costs fewer token pairs than the calls it saves."""
    import dcdit.attention.backends as B

    canvas = [25 + (7 * i) % 59 for i in range(64)]  # a DC-DiT main network's spread: 25..83, ~59 runs
    assert B.pad_pays(canvas, max(canvas))  # 64 x 96^2 padded vs ~59 calls: pad
    one_long = [8] * 63 + [256]
    assert not B.pad_pays(one_long, 256)  # 64 x 256^2 to save one call: loop
    assert not B.pad_pays([40] * 8, 40)  # equal lengths are one call already
    # the cost model itself: extra token pairs of the padded call vs PAD_CALL_COST per call saved
    lens = [30, 31, 30, 33]  # 4 runs; M = 64 (rounded up to PAD_MULTIPLE)
    extra = 4 * 64 * 64 - sum(n * n for n in lens)
    assert B.pad_pays(lens, 33) == (extra <= B.PAD_CALL_COST * 3)


@pytest.mark.parametrize("lengths", [[40, 33, 37, 40, 29], LENGTHS])
def test_cpu_training_attention_modes_agree(monkeypatch, lengths):
    """bf16 q, k, v with grad on CPU: the "math" path (one padded call when the padding is small,
    else per length) agrees with the fp32 kernel to bf16 rounding, output and gradients."""
    import dcdit.attention.backends as B

    calls, orig = [], B._padded_train
    monkeypatch.setattr(B, "_padded_train", lambda *a: calls.append(1) or orig(*a))
    q, k, v, cu = packed_qkv(lengths, d=32)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    run = lambda q, k, v: varlen_attention(q, k, v, cu, max(lengths), lengths)
    monkeypatch.setattr(B, "CPU_TRAIN_ATTENTION", "fp32")
    want, want_g = _grads(run, q, k, v)
    monkeypatch.setattr(B, "CPU_TRAIN_ATTENTION", "math")
    out, out_g = _grads(run, q, k, v)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in out_g)
    assert len(calls) == int(B.pad_pays(lengths, max(lengths)))
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert rel(out, want) < 2e-2
    for a, b in zip(out_g, want_g):
        assert rel(a, b) < 3e-2
    with torch.no_grad():  # inference keeps PyTorch's bf16 kernel
        assert not B._cpu_half(q.requires_grad_())


# --------------------------------------------------------------------------- #
#   Sampling on CPU in half precision: sequences bucketed by rounded length   #
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("lengths", [LENGTHS, [5, 0, 64, 3, 33, 32, 31], [64, 64, 32], [1]])
def test_bucketed_inference_equals_sdpa_loop(lengths):
    """The sampling path attends like one SDPA call per sequence: same values (fp32, to rounding) for
    mixed, empty, already-aligned and single sequences; padded keys get probability exactly 0."""
    from dcdit.attention.backends import _bucketed_infer, _sdpa_loop

    q, k, v, cu = packed_qkv(lengths)
    args = (cu, max(lengths), lengths, None)
    want = _sdpa_loop(q, k, v, *args)
    out = _bucketed_infer(q, k, v, *args)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    v2 = v.clone()
    v2[: lengths[0]] += 100.0  # only the first sequence changes
    out2 = _bucketed_infer(q, k, v2, *args)
    torch.testing.assert_close(out2[lengths[0]:], out[lengths[0]:], atol=0, rtol=0)


def test_bf16_sampling_attention_takes_the_bucketed_path(monkeypatch):
    """bf16 on CPU without autograd: bucketed (close to fp32, one call per rounded length); with
    autograd, fp32, or INFER_BUCKETS off: not."""
    import dcdit.attention.backends as B

    calls = []
    real = B._bucketed_infer
    monkeypatch.setattr(B, "_bucketed_infer", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    sdpa_calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: sdpa_calls.append(1) or real_sdpa(*a, **kw))
    q, k, v, cu = packed_qkv(LENGTHS)
    want = naive(q, k, v, LENGTHS)
    qh, kh, vh = (t.bfloat16() for t in (q, k, v))
    with torch.inference_mode():
        out = varlen_attention(qh, kh, vh, cu, max(LENGTHS), LENGTHS)
    assert calls and len(sdpa_calls) == 1  # every length in LENGTHS rounds up to 32
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
    calls.clear()
    varlen_attention(q, k, v, cu, max(LENGTHS), LENGTHS)  # fp32: the exact per-length loop
    varlen_attention(*(t.requires_grad_() for t in (qh.clone(), kh.clone(), vh.clone())), cu, max(LENGTHS), LENGTHS)
    monkeypatch.setattr(B, "INFER_BUCKETS", False)
    varlen_attention(qh, kh, vh, cu, max(LENGTHS), LENGTHS)
    assert not calls


def test_bucketed_inference_reads_fused_qkv_in_one_gather():
    """q, k, v sliced from one fused (T, 3, H, d) projection are gathered together: same values as
    separate tensors, and separate (non-fused) tensors are not mistaken for fused ones."""
    from dcdit.attention.backends import _bucketed_infer, _fused_qkv

    lengths = [5, 0, 40, 3, 33]
    T, H, d = sum(lengths), 3, 16
    g = torch.Generator().manual_seed(0)
    fused = torch.randn(T, 3 * H * d, generator=g)
    q, k, v = fused.view(T, 3, H, d).unbind(1)  # what Attention hands over, as (T, H, d) views
    assert _fused_qkv(q, k, v) is not None
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    assert _fused_qkv(qc, kc, vc) is None and _fused_qkv(q, v, k) is None
    cu = torch.tensor([0] + lengths).cumsum(0)
    out = _bucketed_infer(q, k, v, cu, max(lengths), lengths, None)
    torch.testing.assert_close(out, _bucketed_infer(qc, kc, vc, cu, max(lengths), lengths, None), atol=0, rtol=0)
    torch.testing.assert_close(out, naive(qc, kc, vc, lengths), atol=1e-5, rtol=0)


def test_flop_counts_of_bf16_sampling_do_not_count_the_buckets_padding():
    """Counting FLOPs (dcdit.flops.count_flops) runs attention per sequence: the count is sum(L_i^2)
    work whatever path plain bf16 sampling takes, and plain sampling still takes the bucketed one."""
    import dcdit.attention.backends as B
    from dcdit.flops import count_flops

    q, k, v, cu = packed_qkv(LENGTHS)
    qh, kh, vh = (t.bfloat16() for t in (q, k, v))
    run = lambda: varlen_attention(qh, kh, vh, cu, max(LENGTHS), LENGTHS)
    report, counted = count_flops(run)
    d = q.shape[-1]
    assert report.macs == sum(2 * q.shape[1] * L * L * d for L in LENGTHS)  # QK^T and AV per sequence
    with torch.inference_mode():
        assert not B._flop_counter_watching()
        assert B._cpu_half_infer(qh)
        assert torch.equal(counted, run())  # counting changes no value: the same images either way


def test_torchs_own_flop_counter_sees_the_sequences_work_too():
    """A torch FlopCounterMode opened by the user (not through dcdit.flops.count_flops; given the CPU
    attention kernel's formula, which torch lacks) counts bf16 sampling attention as sum(L_i^2) work,
    and the values are plain sampling's."""
    from torch.utils.flop_counter import FlopCounterMode

    import dcdit.attention.backends as B
    from dcdit.flops import _EXTRA_ATTENTION

    q, k, v, cu = packed_qkv(LENGTHS)
    qh, kh, vh = (t.bfloat16() for t in (q, k, v))
    with torch.inference_mode():
        plain = varlen_attention(qh, kh, vh, cu, max(LENGTHS), LENGTHS)
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_ATTENTION) as counter:
            assert B._flop_counter_watching()
            counted = varlen_attention(qh, kh, vh, cu, max(LENGTHS), LENGTHS)
        assert not B._flop_counter_watching()
    assert counter.get_total_flops() == sum(2 * 2 * q.shape[1] * L * L * q.shape[-1] for L in LENGTHS)
    assert torch.equal(counted, plain)
