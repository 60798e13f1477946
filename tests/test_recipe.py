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


def test_min_snr_floor_keeps_the_noisiest_steps_in_a_v_loss():
    t = torch.tensor([0, 10, 100, 500, 900, 999])
    plain = create_diffusion("", min_snr_gamma=5.0, prediction="v")
    floored = create_diffusion("", min_snr_gamma=5.0, min_snr_floor=1.0, prediction="v")
    snr = torch.as_tensor(plain.alphas_cumprod / (1 - plain.alphas_cumprod))[t]
    torch.testing.assert_close(floored.mse_weight(t), (snr.clamp(1.0, 5.0) / (snr + 1)).float())
    assert plain.mse_weight(torch.tensor([999])).item() < 1e-3  # Min-SNR under v: the noisiest step ~ SNR
    assert floored.mse_weight(torch.tensor([999])).item() == pytest.approx(1.0, abs=1e-3)
    clean = snr > 5.0  # where SNR exceeds gamma the floor changes nothing
    torch.testing.assert_close(floored.mse_weight(t)[clean], plain.mse_weight(t)[clean])
    for bad in ({"min_snr_floor": 1.0}, {"min_snr_gamma": 5.0, "min_snr_floor": 6.0},
                {"min_snr_gamma": 5.0, "min_snr_floor": 0.0}):
        with pytest.raises(ValueError, match="min_snr_floor"):
            create_diffusion("", **bad)
    with pytest.raises(ValueError, match="diffusion.min_snr_floor"):
        config_from_dict({"diffusion": {"min_snr_floor": 1.0}})


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


# ------------------------------------------------------------- what the network predicts


def _target_for(d, prediction, x_t, t, x0_hat):
    """The output a model of ``prediction`` gives when its estimate of the clean image is ``x0_hat``."""
    a = torch.from_numpy(d.sqrt_alphas_cumprod).float()[t].view(-1, 1, 1, 1)
    s = torch.from_numpy(d.sqrt_one_minus_alphas_cumprod).float()[t].view(-1, 1, 1, 1)
    return {"epsilon": (x_t - a * x0_hat) / s, "x0": x0_hat, "v": (a * x_t - x0_hat) / s}[prediction]


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_min_snr_loss_is_one_x0_loss_whatever_the_network_predicts(prediction):
    """Min-SNR-gamma weights each target so the loss is min(SNR, gamma) * |x0 - x0_hat|^2 in every
    parameterisation, and the diffusion reads the output back to the same x0_hat."""
    d = create_diffusion("", learn_sigma=False, min_snr_gamma=5.0, prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    x0_hat = x0 + 0.3 * torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([3, 40, 150, 400, 700, 990])
    x_t = d.q_sample(x0, t, noise=noise)
    out = _target_for(d, prediction, x_t, t, x0_hat)
    loss = d.training_losses(lambda x, tt: out, x0, t, noise=noise)["loss"]
    snr = torch.from_numpy(d.alphas_cumprod / (1 - d.alphas_cumprod)).float()[t]
    want = snr.clamp(max=5.0) * ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, want, rtol=2e-4, atol=1e-6)
    read_back = d.p_mean_variance(lambda x, tt: out, x_t, t, clip_denoised=False)["pred_xstart"]
    torch.testing.assert_close(read_back, x0_hat, rtol=0, atol=2e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_every_sampler_recovers_the_data_from_a_perfect_model_of_each_kind(prediction):
    """A model that knows the one data point answers in its own parameterisation; DDPM and DDIM must
    both land on the point, so the sampler reads the output as the model's config says."""
    from dcdit.sampling import sample, sampling_diffusion_for

    x0 = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    full = create_diffusion("")

    class Oracle(torch.nn.Module):
        config = {"in_channels": 1, "input_size": 4, "num_classes": 2, "learn_sigma": True,
                  "prediction": prediction}

        def forward(self, x, t, y):
            out = _target_for(full, prediction, x, t, x0.expand(x.shape[0], -1, -1, -1))
            return torch.cat([out, torch.zeros_like(out)], dim=1)

    for sampler in ("ddpm", "ddim"):
        d = sampling_diffusion_for(Oracle(), sampler, 20)
        seen = []  # every step's x0 estimate, from the noisiest on: all of them the data point
        x, _ = sample(Oracle(), d, [0, 1], seed=0, measure_flops=False, clip_denoised=False, device="cpu",
                      callback=lambda info: seen.append(info["pred_xstart"]))
        torch.testing.assert_close(x, x0.expand(2, -1, -1, -1), rtol=0, atol=1e-3)
        assert len(seen) == 20
        for pred in seen:
            torch.testing.assert_close(pred, x0.expand(2, -1, -1, -1), rtol=0, atol=2e-3)


def test_prediction_is_stored_with_the_model_and_drives_loss_and_sampler(tmp_path):
    from dcdit.checkpoint import load_model
    from dcdit.sampling import sampling_diffusion_for
    from dcdit.training import load_train_config, train
    from test_training import TINY_DIT

    run = train(load_train_config(None, TINY_DIT + ["train.steps=2", "diffusion.prediction=v"]), out=tmp_path / "run")
    model = load_model(run, which="ema")
    assert model.config["prediction"] == "v"
    assert sampling_diffusion_for(model, "ddim", 5).model_mean_type.value == "v"
    assert create_diffusion("").model_mean_type.value == "epsilon"  # DiT's default unchanged
    # Upcycling a v-model keeps v unless the config says otherwise.
    child = train(load_train_config(None, TINY_DIT + ["train.steps=1", f"model.init_from={run}"]), out=tmp_path / "c")
    assert load_model(child, which="ema").config["prediction"] == "v"
    from dcdit.diffusion.factory import MEAN_TYPES
    from dcdit.models.config import PREDICTIONS
    assert tuple(MEAN_TYPES) == PREDICTIONS  # the model's names and the diffusion's agree
    with pytest.raises(ValueError, match="prediction"):
        create_diffusion("", prediction="noise")
    # A diffusion that reads the output as something else is refused, not sampled into noise.
    from dcdit.sampling import create_sampling_diffusion, sample
    with pytest.raises(ValueError, match=r"^the model predicts v but the diffusion reads its output as epsilon"):
        sample(model, create_sampling_diffusion("ddim", 5), [0, 1], measure_flops=False)
