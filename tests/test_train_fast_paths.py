"""The CPU training-step fast paths against the paths they replace.

Each fast path runs only when autograd records (training); fp32 runs must be
unchanged (to fp32 rounding), bf16-autocast runs equal to bf16 rounding.
"""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import perturb_params_

import dcdit.attention.backends as AB
from dcdit.models import DCDiT, DCDiTConfig
from dcdit.models.dit import DiT
from dcdit.models.layers import RMSNorm


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def significant(grads: dict) -> list:
    """Parameters whose gradient is not rounding noise (e.g. conv biases right before a GroupNorm,
    whose exact gradient nearly cancels): norm above 1e-3 of the largest."""
    top = max(g.norm() for g in grads.values())
    return [n for n, g in grads.items() if g.norm() > 1e-3 * top]


def tiny_dcdit() -> DCDiT:
    cfg = DCDiTConfig(input_size=16, in_channels=1, num_classes=10, arch_layout=["c2", ["D2"], "c2"],
                      d_model=[64, 64], num_heads=[2, 2], enc_dec_dim_factor=[2, None], patch_size=2)
    model = DCDiT(cfg)
    perturb_params_(model)
    with torch.no_grad():
        model.routing_module.residual_scorer[-1].bias.fill_(0.3)
    return model.train()


def tiny_dit() -> DiT:
    model = DiT(input_size=16, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=2, num_classes=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def batch(B: int = 4, size: int = 16):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 1, size, size, generator=g), torch.randint(0, 1000, (B,), generator=g),
            torch.randint(0, 10, (B,), generator=g))


def loss_and_grads(model, x, t, y, bf16: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # label dropout
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x, t, y)
    out = out[0] if isinstance(out, tuple) else out
    loss = out.float().square().mean()
    loss.backward()
    return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16)])
def test_rms_norm_matches_its_formula(dtype, shape):
    """Forward bit for bit (with and without autograd); the hand-written backward to fp32 rounding."""
    m = RMSNorm(16)
    with torch.no_grad():
        m.weight.normal_(1, 0.1)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).requires_grad_()
    gy = torch.randn(shape, generator=g).to(dtype)
    xf = x.float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + m.eps) * m.weight.float()).to(dtype)
    want.backward(gy)
    want_gx, want_gw = x.grad.clone(), m.weight.grad.clone()
    x.grad = m.weight.grad = None
    out = m(x)
    out.backward(gy)
    assert out.dtype == dtype and torch.equal(out, want)
    with torch.no_grad():
        assert torch.equal(m(x), want)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(x.grad, want_gx, **tol)
    torch.testing.assert_close(m.weight.grad, want_gw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["dit", "dcdit"])
def test_fp32_training_forward_equals_inference_forward(arch):
    """fp32: the training paths (grad recorded) compute the no-grad forward, to fp32 rounding."""
    model = tiny_dit() if arch == "dit" else tiny_dcdit()
    model.eval()  # no label dropout; grad recording is what selects the paths
    x, t, y = batch()
    with torch.no_grad():
        want = model(x, t, y)
    got = model(x, t, y)
    want, got = (o[0] if isinstance(o, tuple) else o for o in (want, got))
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["dit", "dcdit"])
def test_bf16_training_step_matches_the_fp32_attention_path(monkeypatch, arch):
    """bf16 autocast training: the fast CPU attention ("math", padded) gives the outputs and
    gradients of PyTorch's fp32 kernel (the previous path), to bf16 rounding."""
    model = tiny_dit() if arch == "dit" else tiny_dcdit()
    x, t, y = batch()
    monkeypatch.setattr(AB, "CPU_TRAIN_ATTENTION", "fp32")
    want, want_g = loss_and_grads(model, x, t, y, bf16=True)
    monkeypatch.setattr(AB, "CPU_TRAIN_ATTENTION", "math")
    got, got_g = loss_and_grads(model, x, t, y, bf16=True)
    assert rel(got, want) < 2e-2
    assert want_g.keys() == got_g.keys()
    worst = max(rel(got_g[n], want_g[n]) for n in significant(want_g))
    assert worst < 5e-2, worst


def test_bf16_training_step_close_to_fp32():
    """The whole bf16 DC-DiT training forward/backward stays within bf16 rounding of fp32."""
    model = tiny_dcdit()
    x, t, y = batch()
    want, want_g = loss_and_grads(copy.deepcopy(model), x, t, y, bf16=False)
    got, got_g = loss_and_grads(model, x, t, y, bf16=True)
    assert rel(got, want) < 3e-2
    assert max(rel(got_g[n], want_g[n]) for n in significant(want_g)) < 0.1


def test_conv_blocks_on_the_grid_equal_the_token_path_with_grads():
    """Training hands consecutive 2D conv blocks the NCHW grid; calling each block on tokens (the
    path it replaces) gives the same output and gradients (fp32)."""
    from dcdit.models.dcdit import ConvResBlock, TokenLayout
    from dcdit.chunking import PackedSeqs

    model = tiny_dcdit()
    stack = model.encoder
    assert sum(isinstance(m, ConvResBlock) for m in stack.layers) >= 2
    B, (gh, gw) = 3, model.grid
    layout = TokenLayout(PackedSeqs.uniform(B, gh * gw, "cpu"), (gh, gw))
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(B * gh * gw, stack.layers[0].in_dim, generator=g)
    c0 = torch.randn(B, 64, generator=g)

    def run(fast: bool):
        stack.zero_grad(set_to_none=True)
        x, c = x0.clone().requires_grad_(), c0.clone().requires_grad_()
        if fast:
            out = stack(x, c, layout)
        else:
            h = x
            for layer in stack.layers:
                h = layer(h, c, layout)
            out = stack.rmsnorm(h)
        out.square().sum().backward()
        return [out.detach(), x.grad, c.grad] + [p.grad for p in stack.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ste_residual_equals_its_expression_with_grads():
    from dcdit.chunking import ste, ste_residual

    g = torch.Generator().manual_seed(3)
    h, r = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    p = torch.rand(50, generator=g)
    gy = torch.randn(50, 8, generator=g)

    def run(fn):
        ts = [t.clone().requires_grad_() for t in (h, p, r)]
        out = fn(*ts)
        out.backward(gy)
        return [out.detach()] + [t.grad for t in ts]

    want = run(lambda h, p, r: h * ste(p)[:, None] + r)
    got = run(ste_residual)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])
    torch.testing.assert_close(got[2], want[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_packed_dit_block_training_equals_per_sequence_blocks(bf16):
    """A DiT block on packed sequences of unequal lengths while training (one gather of the six
    modulation vectors; under bf16, the padded batched attention and the bf16 modulation) equals the
    block run on each sequence alone: outputs and gradients, fp32 to rounding, bf16 to bf16 rounding."""
    from dcdit.attention import packed_attn_fn
    from dcdit.chunking import PackedSeqs
    from dcdit.models.layers import DiTBlock

    torch.manual_seed(0)
    blk = DiTBlock(32, 2)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    lengths = [9, 12, 10, 12]
    seqs = PackedSeqs(lengths, "cpu")
    g = torch.Generator().manual_seed(4)
    x0, c0 = torch.randn(sum(lengths), 32, generator=g), torch.randn(len(lengths), 32, generator=g)
    gy = torch.randn(sum(lengths), 32, generator=g)

    def run(packed: bool):
        blk.zero_grad(set_to_none=True)
        x, c = x0.clone().requires_grad_(), c0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if packed:
                out = blk(x, c, packed_attn_fn(seqs.cu_seqlens, seqs.max_seqlen, seqs.lengths), seqs)
            else:
                out = torch.cat([blk(xs[None], c[i : i + 1])[0] for i, xs in enumerate(x.split(lengths))])
        out.float().backward(gy)
        return [out.detach().float(), x.grad, c.grad] + [p.grad for p in blk.parameters()]

    for a, b in zip(run(True), run(False)):
        if bf16:
            assert rel(a, b) < 3e-2
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")
def test_compiled_training_gelu_is_the_tanh_gelu():
    """gelu_tanh's compiled bf16-training form (x * sigmoid(2u)) is the same function as aten's
    tanh GELU: values and gradients to fp32 rounding, on inputs across its range."""
    from dcdit.models.layers import gelu_tanh

    x = torch.linspace(-8, 8, 4001).reshape(1, -1)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))

    def value_and_grad(fn):
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the fast path's condition; fp32 inputs stay fp32
            y = fn(xr)
        y.backward(g)
        return y.detach(), xr.grad

    y_fast, g_fast = value_and_grad(torch.compile(gelu_tanh, fullgraph=True))
    y_ref, g_ref = value_and_grad(lambda v: torch.nn.functional.gelu(v, approximate="tanh"))
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-5)  # |g| up to ~4
