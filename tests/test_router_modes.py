"""Router modes: the fixed grid and random routers that isolate the learned router's contribution."""
import pytest
import torch

from dcdit.chunking import PackedSeqs, fixed_routing, lattice, ratio_loss, sample_keys
from dcdit.chunking.routing import lattice_mask
from dcdit.diffusion import create_diffusion
from dcdit.flops import count_model_flops
from dcdit.models import DCDiT
from dcdit.models.config import DCDiTConfig
from dcdit.training import load_train_config, train
from dcdit.training.step import train_step

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(mode="learned", N=4.0, input_size=32, patch=2, layout=None, **kw) -> DCDiT:
    """A 16x16-grid DC-DiT small enough for many forwards."""
    torch.manual_seed(0)
    cfg = DCDiTConfig(input_size=input_size, patch_size=patch, in_channels=1, num_classes=10, d_model=[64, 64],
                      num_heads=[2, 2], arch_layout=layout or ["c1", ["D1"], "c1"], enc_dec_dim_factor=[4, None],
                      norm_groups=8, downsample_factor=N, router_mode=mode, **kw)
    return DCDiT(cfg).eval()


def inputs(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 32, 32, generator=g), torch.randint(0, 1000, (B,), generator=g), torch.arange(B) % 10


def masks(model, x, t, y, **kw):
    with torch.no_grad():
        return model(x, t, y, **kw)[1]


# --------------------------------------------------------------------------- config


def test_default_mode_is_learned_and_its_config_reads_as_before():
    cfg = DCDiTConfig()
    assert cfg.router_mode == "learned" and "router_mode" not in cfg.to_dict()
    grid = DCDiTConfig(router_mode="grid")
    assert grid.to_dict()["router_mode"] == "grid"
    assert DCDiTConfig.from_dict(grid.to_dict()) == grid


@pytest.mark.parametrize("kw, message", [
    (dict(router_mode="fixed"), "router_mode must be one of learned, grid, random, got 'fixed'"),
    (dict(router_mode="grid", downsample_factor=4.5), "downsample_factor must be whole"),
])
def test_bad_router_mode_is_a_one_line_error(kw, message):
    with pytest.raises(ValueError, match=message) as e:
        DCDiTConfig(**kw)
    assert "\n" not in str(e.value)


def test_parameter_count_and_names_are_the_learned_models():
    learned, grid, rnd = (tiny(m) for m in ("learned", "grid", "random"))
    names = [n for n, _ in learned.named_parameters()]
    assert [n for n, _ in grid.named_parameters()] == names == [n for n, _ in rnd.named_parameters()]
    grid.load_state_dict(learned.state_dict())  # the same layout: checkpoints move between modes


# --------------------------------------------------------------------------- grid


def test_lattice_shapes():
    assert lattice(4) == (2, 2, 0) and lattice(9) == (3, 3, 0) and lattice(6) == (2, 3, 0) and lattice(16) == (4, 4, 0)
    assert lattice(2) == (1, 2, 1) and lattice(5) == (1, 5, 2)
    with pytest.raises(ValueError, match="whole n >= 2"):
        lattice(1)


def test_grid_keeps_every_second_token_in_each_direction_at_n4():
    x, t, y = inputs()
    st = masks(tiny("grid"), x, t, y)[0]
    r, c = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    expect = ((r % 2 == 0) & (c % 2 == 0)).reshape(-1)
    assert torch.equal(st.keep_mask, expect.expand(4, -1)) and torch.equal(st.natural_mask, st.keep_mask)
    assert st.kept_share().tolist() == [0.25] * 4  # exactly 64 of 256, every sample, every t
    assert torch.equal(st.boundary_prob, expect.float().expand(4, -1))  # p = 1 kept, 0 elsewhere
    assert torch.equal(st.selected_prob, torch.ones(4, 256))  # STE(max(p, 1 - p)) = 1


def test_grid_n5_is_the_square_lattice_of_side_sqrt5():
    seqs = PackedSeqs.uniform(2, 10 * 10, "cpu")
    st = fixed_routing("grid", 5.0, seqs, (10, 10))
    r, c = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    assert torch.equal(st.keep_mask[0], ((c - 2 * r) % 5 == 0).reshape(-1))
    assert st.num_kept.tolist() == [20, 20]  # exactly 1 in 5


def test_grid_1d_stage_keeps_every_nth_token():
    seqs = PackedSeqs([10, 7], "cpu")
    st = fixed_routing("grid", 3.0, seqs)
    assert st.keep_mask[0, :10].nonzero().flatten().tolist() == [0, 3, 6, 9]
    assert st.keep_mask[1].nonzero().flatten().tolist() == [0, 3, 6]  # padding never kept


def test_grid_tail_drop_thins_the_lattice_evenly():
    x, t, y = inputs()
    model = tiny("grid")
    st = masks(model, x, t, y, tail_drop=0.75)[0]
    r, c = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    assert torch.equal(st.keep_mask[0], ((r % 4 == 0) & (c % 4 == 0)).reshape(-1))  # every 4th: the 2x coarser lattice
    assert torch.equal(st.natural_mask[0], ((r % 2 == 0) & (c % 2 == 0)).reshape(-1))
    for f in (0.1, 0.3, 0.5, 0.9):
        k = masks(model, x, t, y, tail_drop=f)[0]
        assert k.num_kept.tolist() == [64 - int(64 * f)] * 4
        assert bool(k.keep_mask[:, 0].all()) and bool((k.keep_mask <= k.natural_mask).all())
        # nested: a larger drop removes a superset
        assert bool((masks(model, x, t, y, tail_drop=min(f + 0.05, 0.95))[0].keep_mask <= k.keep_mask).all())
    half = masks(model, x, t, y, tail_drop=0.5)[0].keep_mask[0].reshape(16, 16)
    assert half[:8].sum() == half[8:].sum() == 16  # spread, not the first rows dropped


# --------------------------------------------------------------------------- random


def test_random_keeps_one_in_n_and_is_reproducible():
    model = tiny("random")
    x, t, y = inputs(B=32)
    st = masks(model, x, t, y)[0]
    share = st.kept_share()
    assert abs(float(share.mean()) - (1 / 4 + 3 / 4 / 256)) < 0.015  # Bernoulli(1/4) + the forced first token
    assert float(share.std()) > 0.005  # per-sample draws, not one pattern
    assert bool(st.keep_mask[:, 0].all())
    assert torch.equal(masks(model, x, t, y)[0].keep_mask, st.keep_mask)  # same input: same boundaries
    assert torch.equal(masks(model, x[5:6], t[5:6], y[5:6])[0].keep_mask[0], st.keep_mask[5])  # batch-independent
    other = masks(model, x, (t + 1) % 1000, y)[0].keep_mask
    assert (other != st.keep_mask).any(dim=1).all()  # another timestep: other boundaries
    model.set_inference(group_tokens=256 * 3)  # grouped inference: the same per-sample draws
    assert torch.equal(masks(model, x, t, y)[0].keep_mask, st.keep_mask)


def test_random_share_follows_n_and_tail_drop():
    model = tiny("random", N=8.0)
    x, t, y = inputs(B=32)
    st = masks(model, x, t, y)[0]
    assert abs(float(st.kept_share().mean()) - 1 / 8) < 0.01
    d = masks(model, x, t, y, tail_drop=0.5)[0]
    assert torch.equal(d.num_kept, st.num_kept - (st.num_kept.float() * 0.5).long())
    assert bool((d.keep_mask <= st.keep_mask).all()) and bool(d.keep_mask[:, 0].all())


def test_sample_keys_depend_on_the_input_bits_and_t():
    x, t, _ = inputs(B=3)
    k = sample_keys(x, t)
    assert k.dtype == torch.long and k.shape == (3,) and bool(((k >= 0) & (k < 2**32)).all())
    assert torch.equal(sample_keys(x.clone(), t.clone()), k)
    x2 = x.clone()
    x2[1, 0, 31, 31] = torch.nextafter(x2[1, 0, 31, 31], torch.tensor(9.0))  # one bit of one pixel
    k2 = sample_keys(x2, t)
    assert k2[0] == k[0] and k2[2] == k[2] and k2[1] != k[1]


def test_random_router_needs_keys():
    with pytest.raises(ValueError, match="sample key"):
        fixed_routing("random", 4.0, PackedSeqs.uniform(2, 16, "cpu"), (4, 4))


# --------------------------------------------------------------------------- training, dechunk, FLOPs


@pytest.mark.parametrize("mode", ["grid", "random"])
def test_fixed_router_trains_with_a_constant_ratio_loss(mode):
    model = tiny(mode).train()
    diffusion = create_diffusion("", prediction="v")
    x, t, y = inputs(B=8)
    loss, stats = train_step(model, diffusion, x.clamp(-1, 1), y, t, torch.randn_like(x), tail_drop=0.2,
                             ratio_weight=0.03, ratio_N=4.0, ratio_group=4)
    loss.backward()
    if mode == "grid":
        assert float(stats["loss_ratio"]) == pytest.approx(1.0, abs=1e-6)  # F = G = 1/N: the loss's minimum
    assert float(stats["keep_effective_0"]) < float(stats["keep_natural_0"])
    router = [p for n, p in model.named_parameters() if n.startswith("routing_module.")]
    assert router and all(p.grad is None for p in router)  # unused: nothing reaches the router
    rest = [p for n, p in model.named_parameters() if not n.startswith("routing_module.") and "y_embedder" not in n]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in rest)
    _, routing = model(x, t, y)
    assert not ratio_loss(routing, 4.0).requires_grad  # a constant: no gradient anywhere


def test_fixed_router_dechunk_is_the_nearest_kept_plug_back():
    """p = 1 on kept tokens: the dechunk's smoothing is off, each token takes its nearest kept token's output."""
    from dcdit.chunking import dechunk

    seqs = PackedSeqs.uniform(1, 16, "cpu")
    st = fixed_routing("grid", 4.0, seqs, (4, 4))
    kept = st.keep_mask[0].nonzero().flatten()
    h = torch.randn(len(kept), 8)
    out = dechunk(h, st.boundary_prob[0, kept], kept, PackedSeqs([len(kept)], "cpu"), seqs, (4, 4))
    r, c = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    nearest = ((r // 2) * 2 + (c // 2)).reshape(-1)  # the 2x2 cell's top-left kept token
    torch.testing.assert_close(out, h[nearest].float(), rtol=0, atol=1e-3 * h.abs().max().item())


def test_fixed_router_flops_skip_the_router_and_follow_the_kept_count():
    x, t, y = inputs(B=2)
    learned = count_model_flops(tiny("learned"), x, t, y)[0].by_component
    g4 = count_model_flops(tiny("grid"), x, t, y)[0].by_component
    g16 = count_model_flops(tiny("grid", N=16.0), x, t, y)[0].by_component
    assert learned.get("routing", 0) > 0 and g4.get("routing", 0) == 0
    assert g4["encoder"] == learned["encoder"] and g4["decoder"] == learned["decoder"]
    # main network: 64 vs 16 kept tokens per sample; its linear layers scale 4x, attention 16x
    assert 4 < g4["main network"] / g16["main network"] < 16


@pytest.mark.parametrize("mode", ["grid", "random"])
def test_trainer_runs_a_fixed_router(tmp_path, mode):
    overrides = [
        "model.arch=dcdit", "model.preset=DC-DiT-S-N4", "data.source=shapes", "data.num_samples=64",
        "data.image_size=8", "train.global_batch_size=8", "train.log_interval=1", "train.ckpt_interval=1000",
        "train.progress=false", "train.device=cpu", "train.tensorboard=false", "samples.interval=0",
        f"model.overrides={{d_model: [64, 64], num_heads: [4, 4], arch_layout: [c1, [D1], c1], "
        f"enc_dec_dim_factor: [2, null], router_mode: {mode}}}",
        "ratio.group_size=4", "multibudget.enabled=true", "multibudget.start_step=1", "train.steps=3",
    ]
    run = train(load_train_config(None, overrides), out=tmp_path / "r")
    import json

    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    from dcdit.checkpoint import load_model

    model = load_model(run, which="model")
    assert model.cfg.router_mode == mode
    share = [r["keep_natural_0"] for r in recs if "keep_natural_0" in r]
    if mode == "grid":
        assert share == [0.25, 0.25, 0.25]


def test_flops_cli_counts_a_config_before_training(tmp_path, capsys):
    import json

    from dcdit.cli import main

    (tmp_path / "c.yaml").write_text(
        "model: {arch: dcdit, preset: DC-DiT-S-N4, overrides: {d_model: [64, 64], num_heads: [4, 4], "
        "arch_layout: [c1, [D1], c1], enc_dec_dim_factor: [2, null]}}\n"
        "data: {source: shapes, num_samples: 16, image_size: 8}\n")
    out = tmp_path / "f.json"
    assert main(["flops", "--config", str(tmp_path / "c.yaml"), "--set", "model.overrides.router_mode=grid",
                 "--steps", "2", "--json", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["kept_share"] == 0.25  # 16 of the 8x8 grid's 64 tokens, every step
    assert main(["flops", "--model", "DiT-S/8", "--set", "a.b=1"]) == 2  # --set needs --config
    assert "--set overrides a --config" in capsys.readouterr().err


# --------------------------------------------------------------------------- learned router with a floor


def test_router_floor_config_reads_as_before_and_rejects_bad_values():
    assert "router_floor" not in DCDiTConfig().to_dict()
    cfg = DCDiTConfig(router_floor=16)
    assert cfg.to_dict()["router_floor"] == 16 and DCDiTConfig.from_dict(cfg.to_dict()) == cfg
    for kw, message in [(dict(router_floor=1), "router_floor must be 0 \\(none\\) or a whole number >= 2"),
                        (dict(router_floor=True), "router_floor must be 0"),
                        (dict(router_floor=4), "router_floor 4 must exceed the first stage's N = 4"),
                        (dict(router_floor=16, router_mode="grid"), "router_floor is for the learned router")]:
        with pytest.raises(ValueError, match=message) as e:
            DCDiTConfig(**kw)
        assert "\n" not in str(e.value)


def test_router_floor_always_keeps_its_lattice_and_the_router_still_trains():
    model = tiny(router_floor=16)
    with torch.no_grad():  # a router that keeps nothing of its own accord
        model.routing_module.residual_scorer[-1].bias.fill_(-30.0)
    x, t, y = inputs()
    keep = masks(model, x, t, y)[0].keep_mask  # (B, 256)
    on = lattice_mask(torch.arange(256), (16, 16), 16)
    assert int(on.sum()) == 16
    assert bool(keep[:, on].all())  # the floor, in every sample
    assert int(keep.sum(1).max()) <= 16 + 2  # + the forced first and last tokens
    free = tiny()  # the same weights without a floor keep only the forced tokens
    free.load_state_dict(model.state_dict())
    assert int(masks(free, x, t, y)[0].keep_mask.sum(1).max()) <= 2
    model.train()  # gradients still reach the router through the tokens off the floor
    out, routing = model(x, t, y)
    (out.square().mean() + ratio_loss(routing, [4.0])).backward()
    assert model.routing_module.residual_scorer[-1].bias.grad.abs().sum() > 0
