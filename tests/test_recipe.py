"""The learning-speed recipe options: each off by default (DiT's behaviour), each doing what it says."""
import math

import numpy as np
import pytest
import torch

from dcdit.diffusion import create_diffusion
from dcdit.training import config_from_dict
from dcdit.training.trainer import ema_decay_at, init_label_table, lr_at


def test_min_snr_weights_match_the_formula_and_default_is_unweighted():
    d = create_diffusion("", min_snr_gamma=5.0)
    t = torch.tensor([0, 10, 100, 500, 999])
    abar = torch.as_tensor(d.alphas_cumprod, dtype=torch.float64)[t]
    snr = abar / (1 - abar)
    want = torch.minimum(snr, torch.tensor(5.0)) / snr
    torch.testing.assert_close(d.mse_weight(t), want.float())
    assert d.mse_weight(torch.tensor([999])).item() == pytest.approx(1.0)  # noisy steps keep weight 1
    assert create_diffusion("").min_snr_gamma is None
    with pytest.raises(ValueError, match="min_snr_gamma"):
        create_diffusion("", min_snr_gamma=0.0)


def test_min_snr_weights_the_mse_term_of_the_loss_only():
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    t = torch.tensor([1, 50, 400, 900])
    out = torch.randn(4, 4, 4, 4)  # learned sigma: 2C channels
    model = lambda x, t, **kw: out
    plain = create_diffusion("").training_losses(model, x0, t, noise=noise)
    weighted = create_diffusion("", min_snr_gamma=5.0).training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(weighted["mse"], plain["mse"])  # the logged MSE stays the plain one
    torch.testing.assert_close(weighted["vb"], plain["vb"])
    w = create_diffusion("", min_snr_gamma=5.0).mse_weight(t)
    torch.testing.assert_close(weighted["loss"], plain["mse"] * w + plain["vb"])


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    o = config_from_dict({"optim": {"lr": 1e-3, "warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1}}).optim
    assert lr_at(o, 0, 110) == pytest.approx(1e-4)
    assert lr_at(o, 9, 110) == pytest.approx(1e-3)
    assert lr_at(o, 60, 110) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # halfway through the decay
    assert lr_at(o, 110, 110) == pytest.approx(1e-4)
    const = config_from_dict({"optim": {"lr": 1e-3, "warmup_steps": 0}}).optim
    assert lr_at(const, 5000, 10) == 1e-3
    with pytest.raises(ValueError, match="optim.schedule"):
        config_from_dict({"optim": {"schedule": "linear"}})


def test_ema_warmup_starts_fast_and_reaches_the_set_decay():
    tc = config_from_dict({"train": {"ema_decay": 0.999, "ema_warmup": True}}).train
    assert ema_decay_at(tc, 0) == pytest.approx(0.1)
    assert ema_decay_at(tc, 90) == pytest.approx(91 / 100)
    assert ema_decay_at(tc, 10**6) == 0.999
    off = config_from_dict({"train": {"ema_decay": 0.999}}).train
    assert ema_decay_at(off, 0) == 0.999


@pytest.mark.parametrize("arch", ["dit", "dcdit"])
def test_label_init_std_redraws_only_the_label_table(arch):
    from dcdit.models.dcdit import build_dcdit
    from dcdit.models.dit import build_dit

    torch.manual_seed(0)
    if arch == "dit":
        model = build_dit("DiT-S/4", input_size=16, in_channels=1, num_classes=10, hidden_size=64, depth=1, num_heads=2)
    else:
        model = build_dcdit("DC-DiT-S-N4", input_size=16, in_channels=1, num_classes=10, patch_size=2,
                            d_model=[128, 128], num_heads=[2, 2], arch_layout=["c1", ["D1"], "c1"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_label_table(model, None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    init_label_table(model, 1.0)
    table = model.y_embedder.embedding_table.weight
    assert 0.8 < float(table.detach().std()) < 1.2 and float(before["y_embedder.embedding_table.weight"].std()) < 0.05
    changed = [k for k, v in before.items() if not torch.equal(v, model.state_dict()[k])]
    assert changed == ["y_embedder.embedding_table.weight"]
