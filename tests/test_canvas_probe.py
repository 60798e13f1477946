"""benchmarks/canvas_probe.py: its interventions do what they say, and undo themselves."""
from pathlib import Path

import pytest
import torch

from dcdit.models import DCDiT
from dcdit.models.config import DCDiTConfig

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import canvas_probe

    return canvas_probe


def tiny() -> DCDiT:
    torch.manual_seed(0)
    cfg = DCDiTConfig(input_size=32, patch_size=2, in_channels=1, num_classes=10, d_model=[64, 64], num_heads=[2, 2],
                      arch_layout=["c1", ["D1"], "c1"], enc_dec_dim_factor=[4, None], norm_groups=8,
                      downsample_factor=4.0, learn_sigma=False)
    model = DCDiT(cfg).eval()
    with torch.no_grad():  # leave the zero init: every block and the final layer do something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 32, 32, generator=g), torch.tensor([10, 500]), torch.tensor([3, 7])


def run(model, probe, mode, ink_cells):
    with torch.no_grad(), probe.intervention(model, mode, ink_cells):
        return model(*inputs())


def test_forced_routings_keep_what_they_say(probe):
    model = tiny()
    with torch.no_grad():
        ref, r_ref = model(*inputs())
    assert not bool(r_ref[0].keep_mask.all())
    ink = torch.zeros(2 * 256, dtype=torch.bool)
    ink[[5, 40, 41, 300, 301, 302]] = True
    _, r_all = run(model, probe, "all", ink)
    assert bool(r_all[0].keep_mask.all())
    _, r_oracle = run(model, probe, "oracle", ink)
    forced = torch.zeros(2, 256, dtype=torch.bool)
    forced[:, 0] = forced[:, -1] = True  # every sequence's first and last token are always kept
    assert torch.equal(r_oracle[0].keep_mask, ink.view(2, 256) | forced)
    _, r_grid = run(model, probe, "grid", ink)  # the fixed lattice at 1/N = 1/4 of each 16x16 grid
    keep = r_grid[0].keep_mask
    assert torch.equal(keep[0], keep[1]) and abs(keep[0].float().mean().item() - 0.25) < 0.02
    assert not torch.equal(keep, r_ref[0].keep_mask)
    dense = tiny()  # a router keeping about half the tokens with p near 0.5, so neighbours smooth
    with torch.no_grad():
        dense.routing_module.residual_scorer[-1].bias.fill_(0.3)
        dense_ref, dense_r = dense(*inputs())
    out_c, r_conf = run(dense, probe, "confident", ink)  # its own choice, with p = 1 / 0
    assert torch.equal(r_conf[0].keep_mask, dense_r[0].keep_mask)
    assert not torch.allclose(out_c, dense_ref)  # the dechunk no longer smooths with the soft p
    # the patches are gone afterwards: the learned router decides again
    with torch.no_grad():
        out, r = model(*inputs())
    assert torch.equal(r[0].keep_mask, r_ref[0].keep_mask) and torch.equal(out, ref)


def test_no_main_removes_the_main_network_and_only_it(probe):
    model = tiny()
    ink = torch.zeros(2 * 256, dtype=torch.bool)
    with_main, _ = run(model, probe, "learned", ink)
    without, _ = run(model, probe, "no-main", ink)
    assert not torch.allclose(with_main, without)
    with torch.no_grad():  # the main network's weights no longer matter under no-main
        for p in model.main_network.parameters():
            p.mul_(3.0)
    assert torch.equal(run(model, probe, "no-main", ink)[0], without)
    assert not torch.allclose(run(model, probe, "learned", ink)[0], with_main)
    assert "_main_blocks" not in vars(model)  # the patch is undone


def test_handoff_asks_the_early_model_at_noisy_t_and_the_late_one_below(monkeypatch):
    """benchmarks/canvas_handoff.py: the hand-off model is exactly model A at t >= switch and B below
    (a DC-DiT's routing output dropped), and refuses models that read images differently or mixed t."""
    from dcdit.models import DiT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from canvas_handoff import HandOff

    dcdit = tiny()
    torch.manual_seed(2)
    dit = DiT(input_size=32, patch_size=4, in_channels=1, num_classes=10, hidden_size=64, depth=1, num_heads=2,
              learn_sigma=False).eval()
    with torch.no_grad():  # off the zero init, so the two models' outputs differ
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, _, y = inputs()
    hand = HandOff(dit, dcdit, switch=500)
    with torch.no_grad():
        for t, want in ((700, dit(x, torch.full((2,), 700), y)), (500, dit(x, torch.full((2,), 500), y)),
                        (499, dcdit(x, torch.full((2,), 499), y)[0])):
            assert torch.equal(hand(x, torch.full((2,), t), y), want)
        with pytest.raises(ValueError, match="one timestep per batch"):
            hand(x, torch.tensor([10, 900]), y)
    other = DiT(input_size=32, patch_size=4, in_channels=1, num_classes=10, hidden_size=64, depth=1, num_heads=2,
                learn_sigma=True)
    with pytest.raises(ValueError, match="read images differently"):
        HandOff(other, dcdit, 500)


def test_handoff_can_run_one_dcdit_under_a_forced_routing_below_the_switch(monkeypatch, probe):
    """canvas_handoff's ``NAME+MODE``: the model under canvas_probe's intervention (here every token kept),
    the routers restored after each call; unknown modes and DiTs are refused by name."""
    from dcdit.models import DiT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from canvas_handoff import HandOff, Routed

    model = tiny()
    x, _, y = inputs()
    t = torch.full((2,), 100)
    with torch.no_grad():
        own = model(x, t, y)
        every = Routed(model, "all")(x, t, y)
        assert torch.equal(model(x, t, y)[0], own[0])  # the intervention undid itself
        assert bool(every[1][0].keep_mask.all()) and not bool(own[1][0].keep_mask.all())
        assert not torch.allclose(every[0], own[0])
        hand = HandOff(model, Routed(model, "all"), switch=250)
        assert torch.equal(hand(x, t, y), every[0])
        at_switch = torch.full((2,), 250)
        assert torch.equal(hand(x, at_switch, y), model(x, at_switch, y)[0])
    with pytest.raises(ValueError, match="unknown routing mode 'oracle'"):
        Routed(model, "oracle")
    with pytest.raises(ValueError, match="needs a DC-DiT, got a DiT"):
        Routed(DiT(input_size=32, patch_size=4, in_channels=1, num_classes=10, hidden_size=64, depth=1,
                   num_heads=2), "all")
