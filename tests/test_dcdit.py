"""DC-DiT: the reference fixture, the forward contract, properties, precision and devices."""
from __future__ import annotations

import json

import pytest
import torch

from dcdit.compat import load_reference_dcdit
from dcdit.chunking import ratio_loss
from dcdit.models import DCDIT_PRESETS, DCDiT, DCDiTConfig, build_dcdit, build_model, model_config

ATOL = 1e-5


def tiny_config(**kw) -> DCDiTConfig:
    base = dict(
        input_size=16, in_channels=4, num_classes=10, arch_layout=["c1", ["D2"], "c1"], d_model=[64, 64],
        num_heads=[4, 4], enc_dec_dim_factor=[2, None],
    )
    return DCDiTConfig(**{**base, **kw})


def perturbed(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter so no output is trivially zero (as the fixture does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def set_router_bias(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("routing_module"):
                m.residual_scorer[-1].bias.fill_(value)


def inputs(cfg: DCDiTConfig, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.input_hw
    x = torch.randn(B, cfg.in_channels, h, w, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, cfg.num_classes, (B,), generator=g)
    return x, t, y


# --------------------------------------------------------------------------- #
#                              Reference fixture                              #
# --------------------------------------------------------------------------- #

@pytest.fixture(scope="module")
def ref(dcdit_fixture):  # dcdit_fixture (tests/conftest.py) skips when the file is absent
    d = dcdit_fixture
    model = load_reference_dcdit(d["state_dict"], d["config"]).eval()
    return d, model


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_fixture_forward(ref, drop):
    d, model = ref
    inp, want = d["inputs"], d["outputs"][f"forward_drop{drop}"]
    with torch.no_grad():
        out, routing = model(inp["x"], inp["t"], inp["y"], tail_drop=drop)
    assert len(routing) == 1 and routing[0].grid == (16, 16)
    r = routing[0]
    assert torch.equal(r.keep_mask, want["boundary_mask"].bool())
    assert torch.equal(r.natural_mask, want["boundary_mask_natural"].bool())
    torch.testing.assert_close(r.boundary_prob, want["boundary_prob"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out, want["out"], atol=ATOL, rtol=0)
    torch.testing.assert_close(ratio_loss(routing, 4.0), want["ratio_loss"], atol=ATOL, rtol=0)
    torch.testing.assert_close(ratio_loss(routing, 4.0, group_size=3), want["ratio_loss_rb3"], atol=ATOL, rtol=0)


def test_fixture_per_sample_drop(ref):
    d, model = ref
    inp, want = d["inputs"], d["outputs"]["forward_per_sample_drop"]
    with torch.no_grad():
        out, routing = model(inp["x"], inp["t"], inp["y"], tail_drop=inp["per_sample_drop"])
    assert torch.equal(routing[0].keep_mask, want["boundary_mask"].bool())
    torch.testing.assert_close(out, want["out"], atol=ATOL, rtol=0)


def test_fixture_guided(ref):
    d, model = ref
    c, want = d["inputs"]["cfg"], d["outputs"]["forward_with_cfg"]
    with torch.no_grad():
        out, routing = model.forward_with_cfg(c["x"], c["t"], c["y"], c["scale"], guidance_channels=3)
    # Channels that pass through agree to 1e-5. The guided ones are uncond + s (cond - uncond): per-branch
    # differences (~5e-6 here, from bf16 rounding of q/k/v) grow up to (2s + 1)x; we allow 2e-5 at s = 4.
    torch.testing.assert_close(out[:, 3:], want[:, 3:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[:, :3], want[:, :3], atol=2 * ATOL, rtol=0)
    assert len(routing) == 1 and routing[0].keep_mask.shape == (6, 256)


def test_fixture_pos_embed_layout(ref):
    """The fixture's pos_embed is the reference table plus N(0, 0.05) noise: ours differs by noise only."""
    d, model = ref
    diff = DCDiT(model.cfg).pos_embed - d["state_dict"]["pos_embed"]
    assert 0.04 < diff.std().item() < 0.06 and diff.mean().abs().item() < 0.01


# --------------------------------------------------------------------------- #
#                         Contract and configuration                          #
# --------------------------------------------------------------------------- #

def test_forward_contract_shapes_and_routing():
    cfg = tiny_config()
    model = perturbed(DCDiT(cfg))
    x, t, y = inputs(cfg, 3)
    with torch.no_grad():
        out, routing = model(x, t, y)
    assert out.shape == (3, 8, 16, 16) and torch.isfinite(out).all()
    (r,) = routing
    assert r.boundary_prob.shape == (3, 256) and r.boundary_prob.dtype == torch.float32
    assert r.keep_mask.dtype == torch.bool and r.natural_mask.dtype == torch.bool
    assert r.grid == (16, 16) and torch.equal(r.num_kept, r.keep_mask.sum(1))
    assert (r.boundary_prob[:, [0, -1]] == 1).all() and r.keep_mask[:, [0, -1]].all()
    assert not any(k.startswith("_last") for k in vars(model))  # nothing stashed on the module


def test_config_round_trip_and_factory():
    model = DCDiT(tiny_config(input_size=(12, 20), dechunk_kernel_sigma=2.0))
    cfg = json.loads(json.dumps(model.config))
    clone = DCDiT.from_config(cfg)
    assert clone.config == model.config and clone.grid == (12, 20)
    assert clone.state_dict().keys() == model.state_dict().keys()
    spec = model_config(model)
    assert spec["arch"] == "dcdit"
    assert isinstance(build_model(spec), DCDiT)
    with pytest.raises(ValueError, match="bogus"):
        DCDiT.from_config({**cfg, "bogus": 1})
    with pytest.raises(ValueError, match="bogus"):
        build_model({**spec, "bogus": 1})


@pytest.mark.parametrize(
    "bad",
    [
        dict(arch_layout=["c1", ["D2"]]),
        dict(arch_layout=["c1", ["X2"], "c1"]),
        dict(d_model=[64]),
        dict(num_heads=[5, 5]),
        dict(enc_dec_dim_factor=[2, 2]),
        dict(input_size=15, patch_size=2),
        dict(norm_groups=7),
        dict(downsample_factor=1.0),
        dict(arch_layout=["D1", ["D2"], "c1"]),  # a DiT block at the reduced encoder width
    ],
)
def test_bad_configs_raise_value_error(bad):
    with pytest.raises(ValueError):
        DCDiT(tiny_config(**bad))


def test_presets_match_reference_layout():
    assert len(DCDIT_PRESETS) == 9
    # the CPU-scale preset is the reproduction's DC-DiT, the architecture of pretrained:mnist-repro-dcdit-n4
    from dcdit.pretrained import resolve_pretrained

    mnist = model_config(build_dcdit("DC-DiT-MNIST-N4", in_channels=1, num_classes=10, prediction="v"))
    assert mnist == json.loads((resolve_pretrained("pretrained:mnist-repro-dcdit-n4") / "config.json").read_text())
    b = DCDIT_PRESETS["DC-DiT-B-N4"]
    assert b["arch_layout"] == ["c2", ["D12"], "c2"] and b["d_model"] == [768, 768]
    assert b["num_heads"] == [12, 12] and b["enc_dec_dim_factor"] == [4, None] and b["downsample_factor"] == 4.0
    assert DCDIT_PRESETS["DC-DiT-XL-N16"]["arch_layout"] == ["c2", ["D28"], "c2"]
    with torch.device("meta"):
        xl = build_dcdit("DC-DiT-XL-N16")
        s = build_dcdit("DC-DiT-S-N4", input_size=16, num_classes=10)
    assert len(xl.main_network.layers) == 28 and xl.main_network.layers[0].attn.num_heads == 16
    assert xl.x_embedder.proj.out_channels == 288 and xl.cfg.downsample_factor == 16.0
    assert s.grid == (16, 16) and s.main_network.layers[0].mlp.fc1.out_features == 4 * 384
    with pytest.raises(ValueError, match="unknown DC-DiT preset"):
        build_dcdit("DC-DiT-M-N4")


def test_component_names_cover_every_module():
    model = DCDiT(tiny_config(arch_layout=["c1", ["c1", ["D1"], "c1"], "c1"], d_model=[64, 64, 64],
                              num_heads=[4, 4, 4], enc_dec_dim_factor=[2, None, None], downsample_factor=[4.0, 2.0]))
    names = model.component_names()
    for path, _ in model.named_modules():
        if path:
            assert DCDiT.component_of(path, names) is not None, path
    assert DCDiT.component_of("main_network.routing_module.proj", names) == "routing"
    assert DCDiT.component_of("main_network.main_network.layers.0.attn", names) == "main network"
    assert DCDiT.component_of("encoder.layers.0", names) == "encoder"
    assert set(model.flop_components()) == {n for n, _ in model.named_children()}
    assert set(DCDiT.component_names().values()) == {"embeddings", "encoder", "routing", "chunk",
                                                     "main network", "dechunk", "decoder", "final layer"}


def test_bad_inputs_raise_value_error():
    cfg = tiny_config()
    model = DCDiT(cfg).eval()
    x, t, y = inputs(cfg, 2)
    with pytest.raises(ValueError, match="expected input"):
        model(x[:, :, :15], t, y)
    with pytest.raises(ValueError):
        model(x, t[:1], y)
    with pytest.raises(ValueError):
        model(x, t, y, tail_drop=1.0)
    with pytest.raises(ValueError):
        model(x, t, y, tail_drop=torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError):
        model(x, t, torch.tensor([0, 11]))  # beyond the null class


# --------------------------------------------------------------------------- #
#                                Properties                                   #
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize(
    "size,patch,B",
    [(15, 1, 2), ((12, 20), 1, 3), (16, 2, 2), ((8, 12), 2, 1), (9, 1, 1)],
)
def test_random_shapes(size, patch, B):
    cfg = tiny_config(input_size=size, patch_size=patch)
    model = perturbed(DCDiT(cfg))
    set_router_bias(model, 0.0)
    x, t, y = inputs(cfg, B)
    with torch.no_grad():
        out, (r,) = model(x, t, y, tail_drop=0.2)
    h, w = cfg.input_hw
    L = (h // patch) * (w // patch)
    assert out.shape == (B, 8, h, w) and torch.isfinite(out).all()
    assert r.keep_mask.shape == (B, L) and r.grid == (h // patch, w // patch)
    n = r.natural_mask.sum(1)
    assert torch.equal(r.num_kept, n - (n.float() * 0.2).long())


@pytest.mark.parametrize("bias,expect", [(30.0, "all"), (-30.0, "forced")])
def test_all_or_only_forced_tokens_kept(bias, expect):
    cfg = tiny_config(input_size=(10, 12))
    model = perturbed(DCDiT(cfg))
    set_router_bias(model, bias)
    x, t, y = inputs(cfg, 2)
    with torch.no_grad():
        out, (r,) = model(x, t, y)
    assert torch.isfinite(out).all()
    if expect == "all":
        assert r.keep_mask.all()
    else:
        assert r.keep_mask.sum(1).tolist() == [2, 2] and r.keep_mask[:, [0, -1]].all()


def test_drop_099_keeps_at_least_one_token():
    cfg = tiny_config()
    model = perturbed(DCDiT(cfg))
    set_router_bias(model, 0.0)
    x, t, y = inputs(cfg, 3)
    with torch.no_grad():
        out, (r,) = model(x, t, y, tail_drop=0.99)
    n = r.natural_mask.sum(1)
    assert torch.equal(r.num_kept, n - (n.float() * 0.99).long()) and (r.num_kept >= 1).all()
    assert torch.isfinite(out).all()


def _padding_invariance(model, cfg, B=4, drop=0.0):
    x, t, y = inputs(cfg, B, seed=1)
    with torch.no_grad():
        batched, routing = model(x, t, y, tail_drop=drop)
        assert len(set(routing[0].num_kept.tolist())) > 1  # genuinely different lengths
        for b in range(B):
            alone, _ = model(x[b : b + 1], t[b : b + 1], y[b : b + 1], tail_drop=drop)
            torch.testing.assert_close(alone[0], batched[b], atol=1e-5, rtol=0)


def test_padding_never_changes_a_sample():
    cfg = tiny_config()
    model = perturbed(DCDiT(cfg))
    set_router_bias(model, 0.0)
    with torch.no_grad():  # make p depend on the input strongly enough to vary the kept counts
        model.routing_module.residual_scorer[-1].weight.normal_(0, 2.0)
    _padding_invariance(model, cfg)
    _padding_invariance(model, cfg, drop=0.3)


def test_per_sample_drop_equals_separate_calls():
    cfg = tiny_config()
    model = perturbed(DCDiT(cfg))
    set_router_bias(model, 0.0)
    x, t, y = inputs(cfg, 3)
    frac = torch.tensor([0.0, 0.5, 0.9])
    with torch.no_grad():
        out, (r,) = model(x, t, y, tail_drop=frac)
        for b in range(3):
            alone, (ra,) = model(x[b : b + 1], t[b : b + 1], y[b : b + 1], tail_drop=float(frac[b]))
            assert torch.equal(ra.keep_mask[0], r.keep_mask[b])
            torch.testing.assert_close(alone[0], out[b], atol=1e-5, rtol=0)


def test_guided_forward_and_lite_cfg():
    cfg = tiny_config()
    model = perturbed(DCDiT(cfg))
    set_router_bias(model, 0.0)
    x, t, _ = inputs(cfg, 4)
    y = torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        out, (r,) = model.forward_with_cfg(x, t, y, 3.0)
        raw, _ = model(torch.cat([x[:2], x[:2]]), t, y)
        cond, uncond = raw[:2, :4], raw[2:, :4]
        torch.testing.assert_close(out[:2, :4], uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 4:], raw[:, 4:])  # variances pass through
        lite, (rl,) = model.forward_with_cfg(x, t, y, 3.0, cond_tail_drop=0.0, uncond_tail_drop=0.9)
    assert torch.equal(rl.keep_mask[:2], r.keep_mask[:2])
    assert (rl.num_kept[2:] < r.num_kept[2:]).all() and torch.isfinite(lite).all()
    with pytest.raises(ValueError):
        model.forward_with_cfg(x[:3], t[:3], y[:3], 3.0)
    with pytest.raises(ValueError, match=r"\[0, 1\), got \[0.0, 0.0, 1.5, 1.5\]"):  # checked once, by forward
        model.forward_with_cfg(x, t, y, 3.0, cond_tail_drop=0.0, uncond_tail_drop=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\), got 1.5"):
        model.forward_with_cfg(x, t, y, 3.0, cond_tail_drop=1.5)


# --------------------------------------------------------------------------- #
#                          Gradients and precision                            #
# --------------------------------------------------------------------------- #

def test_gradients_reach_router_through_ste_and_ratio_loss():
    cfg = tiny_config()
    model = perturbed(DCDiT(cfg)).train()
    set_router_bias(model, 0.0)
    x, t, y = inputs(cfg, 2)
    router = model.routing_module
    out, routing = model(x, t, y)
    out.square().mean().backward()  # diffusion-like loss: reaches the router only via STE + dechunk
    g1 = router.proj.weight.grad.clone()
    assert g1.abs().sum() > 0
    model.zero_grad()
    _, routing = model(x, t, y)
    ratio_loss(routing, 4.0).backward()
    assert router.proj.weight.grad.abs().sum() > 0 and router.residual_scorer[-1].bias.grad.abs() > 0
    assert model.main_network.layers[0].attn.qkv.weight.grad is None  # the ratio loss touches the router only


def test_ste_gradient_only_path():
    """With dechunk smoothing made p-independent (sigma tiny, p at 0.5), the STE still carries gradient."""
    cfg = tiny_config(dechunk_kernel_sigma=1e-3)
    model = perturbed(DCDiT(cfg)).train()
    set_router_bias(model, 0.0)
    x, t, y = inputs(cfg, 2)
    out, _ = model(x, t, y)
    out.sum().backward()
    assert model.routing_module.residual_scorer[-1].bias.grad.abs() > 0


def test_bf16_autocast_keeps_router_and_dechunk_fp32():
    cfg = tiny_config()
    model = perturbed(DCDiT(cfg))
    set_router_bias(model, 0.0)
    x, t, y = inputs(cfg, 2)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, output.dtype)

        return hook

    hooks = [
        model.routing_module.proj.register_forward_hook(record("router")),
        model.dechunk.register_forward_hook(record("dechunk")),
        model.main_network.layers[0].attn.qkv.register_forward_hook(record("qkv")),
    ]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, (r,) = model(x, t, y)
    for h in hooks:
        h.remove()
    assert seen == {"router": torch.float32, "dechunk": torch.float32, "qkv": torch.bfloat16}
    assert r.boundary_prob.dtype == torch.float32 and torch.isfinite(out).all()
    set_router_bias(model, 30.0)  # same kept set in both precisions (p near 0.5 may flip under bf16)
    with torch.no_grad():
        ref, _ = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp, _ = model(x, t, y)
    assert (amp.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    cfg = tiny_config()
    model = perturbed(DCDiT(cfg))
    set_router_bias(model, 0.0)
    x, t, y = inputs(cfg, 3)
    with torch.no_grad():
        cpu, (rc,) = model(x, t, y, tail_drop=0.2)
        model.cuda()
        gpu, (rg,) = model(x.cuda(), t.cuda(), y.cuda(), tail_drop=0.2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            amp, _ = model(x.cuda(), t.cuda(), y.cuda(), tail_drop=torch.tensor([0.0, 0.3, 0.6]))
    assert torch.equal(rc.keep_mask, rg.keep_mask.cpu())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(amp).all()


# --------------------------------------------------------------------------- #
#                               Nested stages                                 #
# --------------------------------------------------------------------------- #

def nested_config(**kw):
    return tiny_config(arch_layout=["c1", ["c1", ["D1"], "c1"], "c1"], d_model=[64, 64, 64], num_heads=[4, 4, 4],
                       enc_dec_dim_factor=[2, None, None], downsample_factor=[4.0, 2.0], **kw)


def test_nested_stages_forward_and_padding_invariance():
    cfg = nested_config()
    model = perturbed(DCDiT(cfg))
    set_router_bias(model, 0.0)
    with torch.no_grad():
        model.routing_module.residual_scorer[-1].weight.normal_(0, 2.0)
        model.main_network.routing_module.residual_scorer[-1].weight.normal_(0, 2.0)
    x, t, y = inputs(cfg, 3, seed=1)
    with torch.no_grad():
        out, routing = model(x, t, y, tail_drop=0.1)
    assert len(routing) == 2 and routing[1].grid is None
    outer, inner = routing
    assert torch.equal(inner.valid_mask.sum(1), outer.num_kept)  # stage 2 sees stage 1's kept tokens
    assert not (inner.keep_mask & ~inner.valid_mask).any()
    for b, n in enumerate(outer.num_kept.tolist()):  # forced first/last of each inner sequence
        assert inner.natural_mask[b, 0] and inner.natural_mask[b, n - 1]
    assert torch.isfinite(out).all()
    loss = ratio_loss(routing, [4.0, 2.0])
    assert torch.isfinite(loss)
    with pytest.raises(ValueError):
        ratio_loss(routing, [4.0])
    _padding_invariance(model, cfg, B=3, drop=0.1)


# --------------------------------------------------------------------------- #
#                        Attention backends and FLOPs                         #
# --------------------------------------------------------------------------- #

def test_model_backends_agree():
    cfg = tiny_config()
    model = perturbed(DCDiT(cfg))
    set_router_bias(model, 0.0)
    x, t, y = inputs(cfg, 3)
    with torch.no_grad():
        loop, _ = model.set_attn_backend("sdpa_loop")(x, t, y, tail_drop=0.2)
        padded, _ = model.set_attn_backend("padded")(x, t, y, tail_drop=0.2)
    torch.testing.assert_close(loop, padded, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        model.set_attn_backend("nope")


def test_attention_flops_follow_kept_lengths():
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    cfg = tiny_config(arch_layout=["c1", ["D3"], "c1"])
    model = perturbed(DCDiT(cfg))
    set_router_bias(model, 0.0)
    x, t, y = inputs(cfg, 3)
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v)}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        _, (r,) = model(x, t, y, tail_drop=0.1)
    attn = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "attention" in str(op))
    lengths = r.num_kept.tolist()
    assert len(set(lengths)) > 1
    assert attn == 3 * 4 * 64 * sum(n * n for n in lengths)  # 3 blocks x (QK^T + AV) x 2 FLOPs x D x sum L_i^2


def test_layout_without_chunking_is_a_patch1_dit():
    cfg = tiny_config(arch_layout=["c1D2"], d_model=[64], num_heads=[4], enc_dec_dim_factor=None,
                      downsample_factor=4.0)
    model = perturbed(DCDiT(cfg))
    x, t, y = inputs(cfg, 2)
    with torch.no_grad():
        out, routing = model(x, t, y)
    assert routing == [] and out.shape == (2, 8, 16, 16) and torch.isfinite(out).all()
    assert ratio_loss(routing, 4.0).item() == 0.0
