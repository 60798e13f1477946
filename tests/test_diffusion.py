"""Tests for dcdit.diffusion: DiT's Gaussian diffusion, number for number.

Fixture tests compare against /work/shared/reference/dit_tiny.pt (produced by
facebookresearch/DiT). Where a quantity amplifies the model's float32 rounding
noise (x_0 predicted at t = 999 multiplies eps by sqrt(1/abar - 1) ~ 157, and
the DDIM ODE carries that through the trajectory) the diffusion arithmetic is
checked exactly against the fixture's own recorded model output, and the
end-to-end comparison uses a tolerance scaled by that amplification.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from dcdit.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    mean_flat,
    space_timesteps,
)

FIXTURE = "/work/shared/reference/dit_tiny.pt"
ATOL = 1e-5


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ref():
    if not os.path.exists(FIXTURE):
        pytest.skip("reference fixture not available")
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def dit(ref):
    from dcdit.models import DiT

    c = ref["config"]
    model = DiT(
        input_size=c["input_size"], patch_size=c["patch"], in_channels=c["in_ch"], hidden_size=c["hidden"],
        depth=c["depth"], num_heads=c["heads"], num_classes=c["classes"], mlp_ratio=4.0,
        class_dropout_prob=0.1, learn_sigma=True,
    )
    model.load_state_dict(ref["state_dict"], strict=True)
    return model.eval()


def _assert_close(actual, expected, atol=ATOL, name=""):
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= atol, f"{name}: max abs error {err:.3g} > {atol:.3g}"


def _x0_amplification(diffusion, t, ndim):
    """Per-sample factor max(1, sqrt(1/abar_t - 1)) by which eps noise enters x_0 = f(x_t, eps)."""
    coef = torch.from_numpy(diffusion.sqrt_recipm1_alphas_cumprod)[t].clamp(min=1.0)
    return coef.view(-1, *([1] * (ndim - 1)))


# ------------------------------------------------------ reference fixture


def test_fixture_training_losses(ref, dit):
    inp, out = ref["inputs"], ref["outputs"]["training_losses"]
    diffusion = create_diffusion("")
    with torch.no_grad():
        terms = diffusion.training_losses(dit, inp["x0"], inp["t"], dict(y=inp["y"]), noise=inp["noise"])
    for key in ("loss", "mse", "vb"):
        assert terms[key].shape == (6,)
        _assert_close(terms[key], out[key], name=key)
    assert terms["extras"] is None


def test_fixture_p_mean_variance_exact_given_model_output(ref):
    """The diffusion arithmetic alone, fed the fixture's own recorded model(x, t, y)."""
    inp, out = ref["inputs"], ref["outputs"]
    recorded = out["forward"]
    diffusion = create_diffusion("")
    res = diffusion.p_mean_variance(lambda x, t, **kw: recorded, inp["x"], inp["t"], clip_denoised=False)
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        _assert_close(res[key], out["p_mean_variance"][key], name=key)


def test_fixture_p_mean_variance(ref, dit):
    inp, out = ref["inputs"], ref["outputs"]["p_mean_variance"]
    diffusion = create_diffusion("")
    with torch.no_grad():
        res = diffusion.p_mean_variance(dit, inp["x"], inp["t"], clip_denoised=False, model_kwargs=dict(y=inp["y"]))
    for key in ("mean", "variance", "log_variance"):
        _assert_close(res[key], out[key], name=key)
    # x_0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps: 1e-5 in eps units.
    err = (res["pred_xstart"] - out["pred_xstart"]).abs()
    assert (err <= ATOL * _x0_amplification(diffusion, inp["t"], 4)).all()
    assert res["extras"] is None


def test_fixture_ddim10_eta0(ref, dit):
    inp = ref["inputs"]
    diffusion = create_diffusion("ddim10")
    assert diffusion.timestep_map.tolist() == list(range(0, 1000, 100))
    sample = diffusion.ddim_sample_loop(
        dit, inp["xT"].shape, inp["xT"], clip_denoised=False, model_kwargs=dict(y=inp["y"][:3]), progress=False
    )
    # The eta = 0 DDIM ODE integrates eps over sigma = sqrt(1/abar - 1) from ~157 to 0, so the
    # model's float32 rounding noise (~6e-7, present in the reference too) can grow ~157x.
    _assert_close(sample, ref["outputs"]["ddim10_eta0"], atol=2e-4, name="ddim10")


def test_fixture_respaced25(ref, dit):
    inp, out = ref["inputs"], ref["outputs"]
    diffusion = create_diffusion("25")
    assert torch.equal(diffusion.timestep_map, out["respaced25_timestep_map"])
    t = torch.full((3,), 12, dtype=torch.long)
    with torch.no_grad():
        res = diffusion.p_mean_variance(
            dit, inp["xT"], t, clip_denoised=False, model_kwargs=dict(y=inp["y"][:3])
        )
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        _assert_close(res[key], out["respaced25_p_mean_variance_step12"][key], name=key)


# --------------------------------------------------------------- schedules


def test_linear_schedule_matches_dit():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert (np.diff(betas) > 0).all()
    short = get_named_beta_schedule("linear", 250)  # scaled by 1000 / 250
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_schedule_alpha_bar():
    betas = get_named_beta_schedule("cosine", 100)
    assert ((betas > 0) & (betas <= 0.999)).all()
    abar = np.cumprod(1 - betas)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = np.array([f((i + 1) / 100) / f(0) for i in range(100)])
    np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-10)  # last beta is clipped at 0.999


def test_unknown_schedule():
    with pytest.raises(ValueError, match="quadratic"):
        get_named_beta_schedule("quadratic", 10)


def test_diffusion_invariants():
    d = create_diffusion("", diffusion_steps=200)
    abar = d.alphas_cumprod
    assert (np.diff(abar) < 0).all() and 0 < abar[-1] < abar[0] < 1
    np.testing.assert_allclose(d.sqrt_alphas_cumprod**2 + d.sqrt_one_minus_alphas_cumprod**2, 1.0)
    # Posterior variance lies between 0 and beta; the clipped log skips the t = 0 zero.
    assert (d.posterior_variance <= d.betas).all() and d.posterior_variance[0] == 0
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    # The posterior mean of x_0 itself diffused with zero noise stays on the mean path.
    x0 = torch.randn(4, 3, 5, 5)
    t = torch.tensor([1, 50, 120, 199])
    xt = d.q_sample(x0, t, noise=torch.zeros_like(x0))
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, t)
    expected = torch.from_numpy(d.sqrt_alphas_cumprod[t.numpy() - 1]).float().view(-1, 1, 1, 1) * x0
    torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-5)
    assert var.shape == logvar.shape == x0.shape


def test_q_sample_statistics():
    d = create_diffusion("")
    x0 = torch.full((20000, 1), 2.0)
    t = torch.full((20000,), 300)
    xt = d.q_sample(x0, t)
    m, v, _ = d.q_mean_variance(x0[:1], t[:1])
    assert xt.mean().item() == pytest.approx(m.item(), abs=0.02)
    assert xt.var().item() == pytest.approx(v.item(), abs=0.02)


# --------------------------------------------------------------- respacing


def test_space_timesteps_forms():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim7") == list(range(0, 1000, 143))  # smallest stride giving 7 steps
    assert space_timesteps(1000, "250") == space_timesteps(1000, [250]) == space_timesteps(1000, 250)
    assert len(space_timesteps(1000, "250")) == 250
    steps = space_timesteps(300, "10,15,20")
    assert len(steps) == 45
    assert sum(s < 100 for s in steps) == 10 and sum(s >= 200 for s in steps) == 20
    assert steps[0] == 0 and steps[-1] == 299
    assert space_timesteps(1000, "1000") == list(range(1000))
    # Half-integer positions round half to even, as the reference (25 of 1000: 499.5 -> 500).
    assert 500 in space_timesteps(1000, "25")


@pytest.mark.parametrize("spec", ["ddim37", "abc", "", "0", "10,abc", "ddim", "1001", "-5", [0], [], "2000,1"])
def test_space_timesteps_errors(spec):
    with pytest.raises(ValueError, match="invalid timestep respacing"):
        space_timesteps(1000, spec)
    if isinstance(spec, str) and spec:
        with pytest.raises(ValueError, match=repr(spec).replace("[", r"\[")):
            create_diffusion(spec)


def test_spaced_diffusion_keeps_alpha_bar_and_maps_timesteps():
    base = create_diffusion("")
    spaced = create_diffusion("10,20")
    kept = spaced.timestep_map.numpy()
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    seen = []

    def spy(x, t, **kw):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    x = torch.randn(2, 3, 4, 4)
    spaced.p_mean_variance(spy, x, torch.tensor([0, 29]))
    assert seen[0].tolist() == [int(kept[0]), int(kept[29])] == [0, 999]


# ----------------------------------------------------------- model outputs


class _Param(torch.nn.Module):
    """A 'model' whose output is a learnable tensor (ignores x and t)."""

    def __init__(self, shape, extras=None):
        super().__init__()
        self.out = torch.nn.Parameter(torch.randn(shape) * 0.5)
        self.extras = extras

    def forward(self, x, t, y=None):
        return self.out if self.extras is None else (self.out, self.extras)


def test_tuple_output_extras_are_passed_back():
    routing = [{"boundary_prob": torch.rand(2, 16)}]
    model = _Param((2, 6, 4, 4), extras=routing)
    d = create_diffusion("")
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([5, 600])
    terms = d.training_losses(model, x, t, model_kwargs=dict(y=torch.zeros(2, dtype=torch.long)))
    assert terms["extras"] is routing
    assert d.p_mean_variance(model, x, t)["extras"] is routing
    plain = d.training_losses(_Param((2, 6, 4, 4)), x, t)
    assert plain["extras"] is None and set(plain) == {"loss", "mse", "vb", "extras"}


def test_bad_model_outputs():
    d = create_diffusion("")
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="tensor or a"):
        d.p_mean_variance(lambda x, t: (x, None, None), x, t)
    with pytest.raises(ValueError, match="model output shape"):
        d.p_mean_variance(lambda x, t: x, x, t)  # learned sigma needs 2C channels
    with pytest.raises(ValueError, match="t must be"):
        d.q_sample(x, torch.tensor([1]))


def test_hybrid_loss_stop_gradient_and_terms():
    d = create_diffusion("")
    model = _Param((3, 6, 4, 4))
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 700])
    terms = d.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    torch.testing.assert_close(terms["mse"], mean_flat((noise - model.out[:, :3]) ** 2))
    terms["vb"].sum().backward()
    assert model.out.grad[:, :3].abs().max() == 0  # VB never trains the mean
    assert model.out.grad[:, 3:].abs().max() > 0
    # t == 0 uses the discretised decoder NLL in bits.
    out = d.p_mean_variance(model, d.q_sample(x0, t, noise), t, clip_denoised=False)
    nll = -discretized_gaussian_log_likelihood(x0, means=out["mean"], log_scales=0.5 * out["log_variance"])
    assert terms["vb"][0].item() == pytest.approx((mean_flat(nll) / math.log(2))[0].item(), rel=1e-5)


def test_rescaled_learned_sigmas_scales_vb():
    model = _Param((2, 6, 4, 4))
    x0, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 200])
    plain = create_diffusion("250").training_losses(model, x0, t, noise=noise)
    scaled = create_diffusion("250", rescale_learned_sigmas=True).training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(scaled["vb"], plain["vb"] * 0.25)
    torch.testing.assert_close(scaled["mse"], plain["mse"])


def test_fixed_variance_and_start_x():
    x0 = torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 500])
    for sigma_small in (False, True):
        d = create_diffusion("", learn_sigma=False, sigma_small=sigma_small, predict_xstart=True)
        assert d.model_var_type == (ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE)
        out = d.p_mean_variance(lambda x, t: x0, torch.randn_like(x0), t, clip_denoised=False)
        torch.testing.assert_close(out["pred_xstart"], x0)
        expected = d.posterior_variance[500] if sigma_small else d.betas[500]
        assert out["variance"][1].unique().item() == pytest.approx(expected, rel=1e-6)
        terms = d.training_losses(lambda x, t: x0, x0, t)
        assert set(terms) == {"loss", "mse", "extras"} and terms["mse"].abs().max() == 0
    kl = create_diffusion("", use_kl=True)
    assert kl.loss_type == LossType.RESCALED_KL and kl.model_mean_type == ModelMeanType.EPSILON
    terms = kl.training_losses(_Param((2, 6, 4, 4)), x0, t)
    torch.testing.assert_close(terms["loss"], terms["vb"] * 1000)


def test_constructor_validation():
    with pytest.raises(ValueError, match="model_var_type"):
        GaussianDiffusion(betas=[0.1, 0.2], model_var_type="wide")
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(betas=[0.0, 0.2])
    with pytest.raises(ValueError, match="use_timesteps"):
        SpacedDiffusion([5], betas=[0.1, 0.2])


# ----------------------------------------------------------------- samplers


def _oracle(x0):
    """A perfect eps-model for a single data point x0 (learned-sigma layout, variance channels 0).

    It receives original timesteps, so it looks up the 1000-step schedule.
    """
    abar = torch.from_numpy(create_diffusion("").alphas_cumprod)

    def model(x, t, **kw):
        ab = abar[t].float().view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model


def test_ddpm_loop_shape_determinism_and_callback():
    d = create_diffusion("20")
    model = _Param((2, 6, 4, 4))
    infos = []
    torch.manual_seed(0)
    a = d.p_sample_loop(model, (2, 3, 4, 4), clip_denoised=False, progress=False, callback=infos.append)
    torch.manual_seed(0)
    b = d.p_sample_loop(model, (2, 3, 4, 4), clip_denoised=False, progress=False)
    c = d.p_sample_loop(model, (2, 3, 4, 4), clip_denoised=False, progress=False)
    assert a.shape == (2, 3, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(
        d.p_sample_loop(model, (2, 3, 4, 4), progress=False, generator=g1),
        d.p_sample_loop(model, (2, 3, 4, 4), progress=False, generator=g2),
    )
    assert [info["i"] for info in infos] == list(range(19, -1, -1))
    assert [info["step"] for info in infos] == list(range(20))
    assert infos[0]["t"].tolist() == [999, 999] and infos[-1]["t"].tolist() == [0, 0]
    assert torch.equal(infos[-1]["sample"], a) and infos[0]["extras"] is None
    assert set(infos[0]) >= {"i", "t", "sample", "pred_xstart", "extras"}


def test_samplers_recover_data_with_oracle_model():
    d = create_diffusion("50")
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1
    x0 = x0.expand(2, -1, -1, -1)
    model = _oracle(x0)
    ddpm = d.p_sample_loop(model, (2, 3, 4, 4), progress=False)
    ddim = d.ddim_sample_loop(model, (2, 3, 4, 4), progress=False)
    torch.testing.assert_close(ddpm, x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(ddim, x0, atol=1e-4, rtol=0)


def test_ddim_eta_and_extras_callback():
    d = create_diffusion("ddim10")
    routing = [{"kept": 0.5}]
    model = _Param((2, 6, 4, 4), extras=routing)
    noise = torch.randn(2, 3, 4, 4)
    det1 = d.ddim_sample_loop(model, noise.shape, noise, progress=False)
    det2 = d.ddim_sample_loop(model, noise.shape, noise, progress=False)
    assert torch.equal(det1, det2)
    seen = []
    stochastic = d.ddim_sample_loop(model, noise.shape, noise, progress=False, eta=1.0, callback=seen.append)
    assert torch.isfinite(stochastic).all() and not torch.allclose(stochastic, det1)
    assert len(seen) == 10 and all(info["extras"] is routing for info in seen)
    assert [int(info["t"][0]) for info in seen] == list(range(900, -1, -100))
    with pytest.raises(ValueError, match="eta"):
        d.ddim_sample_loop(model, noise.shape, noise, progress=False, eta=-1.0)


def test_guided_callable_receives_model_kwargs(capsys):
    d = create_diffusion("ddim5")
    calls = []

    def guided(x, t, y, cfg_scale):
        calls.append((y.tolist(), cfg_scale))
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    y = torch.tensor([1, 2, 10, 10])
    out = d.ddim_sample_loop(guided, (4, 3, 4, 4), model_kwargs=dict(y=y, cfg_scale=4.0), progress=True)
    assert out.shape == (4, 3, 4, 4) and len(calls) == 5 and calls[0] == ([1, 2, 10, 10], 4.0)
    assert capsys.readouterr().err == ""  # stderr is not a TTY here: no progress bar
