"""CUDA attention paths, exercised on CPU with fakes: every path checks what it needs and falls back with a
warning instead of failing (issue 16.7). No GPU has run these paths here; this pins the selection logic."""
import warnings

import pytest
import torch

from dcdit.attention import backends as B


def _fake_kernel(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None):  # flash-attn's keyword
    return B._sdpa_loop(q, k, v, cu_q, max_q, (cu_q[1:] - cu_q[:-1]).tolist(), softmax_scale)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Both varlen kernels 'installed', a GPU of settable compute capability, fresh warning state."""
    cap = {"value": (9, 0)}
    monkeypatch.setattr(B, "_flash_attn_varlen", lambda: _fake_kernel)
    monkeypatch.setattr(B, "_torch_varlen", lambda: _fake_kernel)
    monkeypatch.setattr(B, "_capability", lambda device: cap["value"])
    monkeypatch.setattr(B, "_WARNED", set())
    monkeypatch.setattr(B, "_BROKEN", set())
    return cap


def _qkv(lengths=(3, 5, 2), h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, d, generator=g) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return q, k, v, cu, max(lengths), list(lengths)


def test_modern_gpu_in_half_precision_gets_the_varlen_kernels(fake_gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert B.available_backends("cuda", torch.bfloat16)[:2] == ["flash_attn", "torch_varlen"]
        assert B.resolve_backend("auto", "cuda", torch.float16) == "flash_attn"


def test_old_gpu_generation_falls_back_with_one_warning(fake_gpu):
    fake_gpu["value"] = (7, 5)  # Turing: no flash-attn 2
    with pytest.warns(RuntimeWarning, match=r"compute capability >= 8\.0, this GPU has 7\.5"):
        assert B.resolve_backend("auto", "cuda", torch.bfloat16) == "sdpa_loop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every call
        assert B.available_backends("cuda", torch.bfloat16) == ["sdpa_loop", "padded"]
    with pytest.raises(ValueError, match="not usable"):
        B.resolve_backend("flash_attn", "cuda", torch.bfloat16)


def test_fp32_on_cuda_says_why_it_loops(fake_gpu):
    with pytest.warns(RuntimeWarning, match=r"no variable-length CUDA kernel takes torch\.float32.*bf16"):
        assert B.resolve_backend("auto", "cuda", torch.float32) == "sdpa_loop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert B.resolve_backend("auto", "cpu", torch.float32) == "sdpa_loop"  # CPU: nothing to say


def test_torch_varlen_without_scale_keyword_gets_q_prescaled(monkeypatch):
    q, k, v, cu, m, lengths = _qkv()
    want = B._sdpa_loop(q, k, v, cu, m, lengths, 0.3)

    def old_api(q, k, v, cu_q, cu_k, max_q, max_k):  # a release whose varlen_attn has no `scale`
        return B._sdpa_loop(q, k, v, cu_q, max_q, (cu_q[1:] - cu_q[:-1]).tolist(), None)

    seen = {}

    def new_api(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None):
        seen["scale"] = scale
        return old_api(q * (scale * q.shape[-1] ** 0.5 if scale else 1.0), k, v, cu_q, cu_k, max_q, max_k)

    for fn in (old_api, new_api):
        monkeypatch.setattr(B, "_torch_varlen", lambda fn=fn: fn)
        torch.testing.assert_close(B._torch_varlen_call(q, k, v, cu, m, lengths, 0.3), want)
    assert seen["scale"] == 0.3
    torch.testing.assert_close(B._torch_varlen_call(q, k, v, cu, m, lengths, None),
                               B._sdpa_loop(q, k, v, cu, m, lengths, None))


def test_kernel_failing_at_run_time_falls_back_for_good(fake_gpu, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    monkeypatch.setattr(B, "_flash_attn_varlen", lambda: broken)
    monkeypatch.setattr(B, "resolve_backend", lambda name, device, dtype: "flash_attn")  # as on a CUDA device
    q, k, v, cu, m, lengths = _qkv()
    with pytest.warns(RuntimeWarning, match="flash_attn kernel failed.*Ampere.*sdpa_loop"):
        out = B.varlen_attention(q, k, v, cu, m, lengths)
    torch.testing.assert_close(out, B._sdpa_loop(q, k, v, cu, m, lengths, None))
    assert "flash_attn" in B._BROKEN
    assert B.available_backends("cuda", torch.bfloat16)[0] == "torch_varlen"  # not offered again
