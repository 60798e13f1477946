"""diffusers' solvers in the library's sampling loop, and the sampling precision setting.

DDIM through diffusers' DDIMScheduler equals our DDIM; DPM-Solver++ converges
on a model whose epsilon is exact for Gaussian data; every sampler runs every
model kind (DiT / DC-DiT, learned sigma or not, epsilon / v) with guidance,
Lite-CFG and tail drop, batch-invariantly; budgets and the CLI take them.
"""
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from dcdit.cli import main
from dcdit.diffusion import create_diffusion
from dcdit.evaluation.io import load_samples_npz
from dcdit.models import DCDiT, build_dit
from dcdit.sampling import (
    SAMPLERS,
    SCHEDULERS,
    Budget,
    SchedulerSampling,
    create_sampling_diffusion,
    resolve_precision,
    sample,
    sampling_diffusion_for,
    solve_budget,
)
from dcdit.sampling import precision as precision_mod
from dcdit.sampling.schedulers import SchedulerAdapter

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 5
NEW = tuple(SCHEDULERS)  # dpm++2m, unipc, euler


def perturb(m):
    with torch.no_grad():  # break the zero init so outputs depend on the input
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def tiny(kind: str, learn_sigma=True, prediction="epsilon"):
    torch.manual_seed(0)
    if kind == "dit":
        return perturb(build_dit("DiT-S/2", input_size=8, in_channels=3, depth=2, hidden_size=64, num_heads=4,
                                 num_classes=NUM_CLASSES, learn_sigma=learn_sigma, prediction=prediction))
    return perturb(DCDiT.from_config(dict(
        input_size=8, in_channels=3, num_classes=NUM_CLASSES, arch_layout=["c1", ["D2"], "c1"],
        d_model=[64, 64], num_heads=[4, 4], enc_dec_dim_factor=[2, None], norm_groups=8, router_norm_groups=4,
        router_bias_init=0.5, learn_sigma=learn_sigma, prediction=prediction)))


# diffusers' DDIM configured to our DDIM's spacing: "leading" without offset = DiT's "ddimN" (0, s, 2s, ...),
# the last step to abar = 1, and no clipping of its own (the loop clips like our DDIM when asked).
DIFFUSERS_DDIM = SchedulerAdapter("diffusers-ddim", "DDIMScheduler", dict(
    timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True, clip_sample=False))


@pytest.mark.parametrize("kind,learn_sigma,prediction,cfg,clip", [
    ("dit", True, "epsilon", 1.0, False),
    ("dit", False, "v", 3.0, True),
    ("dcdit", True, "epsilon", 2.0, True),
    ("dcdit", False, "v", 1.0, False),
    ("dit", False, "x0", 1.0, True),
])
def test_diffusers_ddim_equals_our_ddim(kind, learn_sigma, prediction, cfg, clip):
    m = tiny(kind, learn_sigma, prediction)
    steps = 10  # 1000 / 10: the same timesteps 900, 800, ..., 0 in both
    ours_d = sampling_diffusion_for(m, "ddim", steps)
    theirs_d = SchedulerSampling(DIFFUSERS_DDIM, steps, create_diffusion("").betas, prediction, learn_sigma)
    kw = dict(seed=4, cfg_scale=cfg, clip_denoised=clip, measure_flops=False)
    kw.update(tail_drop=0.2) if kind == "dcdit" else None
    ours, s1 = sample(m, ours_d, [0, 1, 3], sampler="ddim", **kw)
    theirs, s2 = sample(m, theirs_d, [0, 1, 3], **kw)
    assert s1.timesteps == s2.timesteps == list(range(900, -1, -100))
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


class GaussianEps(nn.Module):
    """Exact epsilon of x_t = a x0 + b eps for x0 ~ N(mu, s^2) per pixel: b (x_t - a mu) / (a^2 s^2 + b^2)."""

    def __init__(self, alphas_cumprod, mu=0.3, s=1.0):
        super().__init__()
        self.config = dict(in_channels=1, input_size=4, num_classes=1, learn_sigma=False, prediction="epsilon")
        self.ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.mu, self.s = mu, s
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        a, b = self.ab[t].sqrt().view(-1, 1, 1, 1), (1 - self.ab[t]).sqrt().view(-1, 1, 1, 1)
        return (b * (x.double() - a * self.mu) / (a**2 * self.s**2 + b**2)).float()

    def exact(self, x_start, t0: int):
        """The probability-flow ODE's end point from x_start at t0: mu + s z, z = (x - a mu) / sqrt(a^2 s^2 + b^2)."""
        a, b = self.ab[t0].sqrt(), (1 - self.ab[t0]).sqrt()
        return self.mu + self.s * (x_start.double() - a * self.mu) / (a**2 * self.s**2 + b**2).sqrt()


def test_dpm_solver_converges_on_gaussian_data():
    from dcdit.sampling import SampleNoise

    m = GaussianEps(create_diffusion("").alphas_cumprod)
    x_T = SampleNoise(0, range(16), (1, 4, 4)).draw()

    def error(sampler, steps):
        x, st = sample(m, sampling_diffusion_for(m, sampler, steps), [0] * 16, measure_flops=False)
        return float((x.double() - m.exact(x_T, st.timesteps[0])).abs().max())

    e5, e10, e20 = error("dpm++2m", 5), error("dpm++2m", 10), error("dpm++2m", 20)
    assert e20 < 0.01 and e20 < e10 / 4 and e10 < e5  # converges (second order: error / 4 per doubling)
    assert e10 < error("ddim", 20)  # half DDIM's network calls, a smaller error
    assert error("unipc", 20) < 0.01


@pytest.mark.parametrize("sampler", NEW)
@pytest.mark.parametrize("kind,learn_sigma,prediction", [
    ("dit", True, "epsilon"), ("dit", False, "v"), ("dcdit", True, "v"), ("dcdit", False, "epsilon")])
def test_every_sampler_runs_every_model(sampler, kind, learn_sigma, prediction):
    m = tiny(kind, learn_sigma, prediction)
    d = sampling_diffusion_for(m, sampler, 4)
    assert d.num_timesteps == 4 and d.timesteps == [999, 749, 499, 249]  # "trailing" spacing
    routed = kind == "dcdit"
    kw = dict(cfg_scale=2.0, clip_denoised=True, guidance_channels=2)
    if routed:
        kw.update(tail_drop=0.3, uncond_drop=0.8)
    x, st = sample(m, d, [0, 1, 4], seed=5, **kw)
    assert x.shape == (3, 3, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1.0 + 1e-5
    assert st.timesteps == d.timesteps and st.flops_per_step.shape == (4, 3) and st.gflops_per_step > 0
    if routed:
        assert st.kept_share.shape == st.natural_share.shape == (4, 1, 3)
        assert st.uncond_drop == 0.8 and (st.kept_share <= st.natural_share + 1e-6).all()
        _, full = sample(m, d, [0, 1, 4], seed=5, cfg_scale=2.0, clip_denoised=True, guidance_channels=2)
        assert st.gflops_per_step < full.gflops_per_step  # tail drop and Lite-CFG cut the cost
    else:
        assert st.kept_share is None


@pytest.mark.parametrize("sampler", NEW)
def test_samples_do_not_depend_on_their_batch(sampler):
    m = tiny("dcdit")
    d = sampling_diffusion_for(m, sampler, 3)
    labels = [0, 1, 2]
    full, _ = sample(m, d, labels, seed=7, cfg_scale=1.5, measure_flops=False)
    parts = [sample(m, d, labels[a:b], seed=7, indices=range(a, b), cfg_scale=1.5, measure_flops=False)[0]
             for a, b in ((0, 1), (1, 3))]
    torch.testing.assert_close(torch.cat(parts), full, atol=2e-4, rtol=0)
    other, _ = sample(m, d, labels[:1], seed=8, cfg_scale=1.5, measure_flops=False)
    assert (other - full[:1]).abs().max() > 0.1


def test_sampler_names_and_errors(monkeypatch):
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpm++2m", "unipc", "euler"}
    m = tiny("dit")
    d = sampling_diffusion_for(m, "dpm++2m", 3)
    x, _ = sample(m, d, [0], measure_flops=False)  # sampler=None: the diffusion's own
    with pytest.raises(ValueError, match="cannot run on a diffusion built for dpm\\+\\+2m"):
        sample(m, d, [0], sampler="ddim")
    with pytest.raises(ValueError, match="cannot run on a diffusion built for ddpm/ddim"):
        sample(m, create_sampling_diffusion("ddim", 3), [0], sampler="unipc")
    with pytest.raises(ValueError, match="eta applies to ddim only"):
        sample(m, d, [0], eta=0.5)
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        create_sampling_diffusion("heun", 3)
    with pytest.raises(ValueError, match="predicts epsilon but the diffusion reads its output as v"):
        sample(m, create_sampling_diffusion("euler", 3, prediction="v"), [0])
    monkeypatch.setitem(sys.modules, "diffusers", None)  # not installed
    with pytest.raises(ImportError, match="pip install 'diffusers==0.42.1'"):
        sampling_diffusion_for(m, "unipc", 3)


def test_cosine_schedule_betas_reach_the_scheduler():
    d = create_sampling_diffusion("dpm++2m", 5, noise_schedule="cosine", diffusion_steps=500)
    s = d.make()
    ref = create_diffusion("", noise_schedule="cosine", diffusion_steps=500)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), ref.alphas_cumprod, rtol=1e-4, atol=1e-9)
    assert d.timesteps == [499, 399, 299, 199, 99]


def test_budget_with_a_diffusers_sampler():
    m = tiny("dcdit")
    d = sampling_diffusion_for(m, "dpm++2m", 4)
    _, st0 = sample(m, d, [0, 1], measure_flops=False)
    target = 0.7 * float(st0.kept_share[:, 0].mean())
    sol = solve_budget(m, Budget("keep_share", target), [0, 1], diffusion=d, probe_size=2)
    _, st = sample(m, d, [0, 1], tail_drop=sol.tail_drop, measure_flops=False)
    assert float(st.kept_share[:, 0].mean()) == pytest.approx(target, rel=0.05)
    short = solve_budget(m, Budget("keep_share", target), [0, 1], diffusion=d, probe_size=2, probe_steps=2)
    assert 0 < short.tail_drop < 1 and short.relative_error < 0.05


# ----------------------------------------------------------------- precision


def test_precision_resolution(monkeypatch):
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16", "cuda") == "bf16"
    monkeypatch.setattr(precision_mod, "cpu_supports_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision_mod, "cpu_supports_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto", "cuda") == "fp32"
    with pytest.raises(ValueError, match="unknown precision 'tf32'"):
        resolve_precision("tf32")


def test_cpuinfo_flags(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert "avx512_bf16" in precision_mod._cpuinfo_flags(str(f))
    assert precision_mod._cpuinfo_flags(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_bf16_runs_the_network_in_bf16_and_fp32_is_exact(sampler):
    m = tiny("dcdit")
    d = sampling_diffusion_for(m, sampler, 3)
    seen = []
    hook = m.final_layer.register_forward_hook(lambda mod, a, out: seen.append(out.dtype)) \
        if hasattr(m, "final_layer") else None
    linear = next(mod for mod in m.modules() if isinstance(mod, nn.Linear))
    h2 = linear.register_forward_hook(lambda mod, a, out: seen.append(out.dtype))
    ref, _ = sample(m, d, [0, 1], cfg_scale=2.0, measure_flops=False)
    assert set(seen) == {torch.float32}
    seen.clear()
    again, _ = sample(m, d, [0, 1], cfg_scale=2.0, measure_flops=False, precision="fp32")
    assert torch.equal(again, ref)  # fp32 is the untouched path
    low, _ = sample(m, d, [0, 1], cfg_scale=2.0, measure_flops=False, precision="bf16")
    assert torch.bfloat16 in seen and low.dtype == torch.float32
    assert 0 < (low - ref).abs().max() < 0.03 * ref.abs().max()  # bf16 rounding, not a different sample
    for h in (hook, h2):
        if h is not None:
            h.remove()


# ----------------------------------------------------------------- CLI


def test_cli_choices_match_the_library():
    from dcdit.cli.options import PRECISION_CHOICES, SAMPLER_CHOICES
    from dcdit.sampling import PRECISIONS

    assert SAMPLER_CHOICES == SAMPLERS and PRECISION_CHOICES == PRECISIONS


def test_cli_sample_with_a_diffusers_sampler(tmp_path, capsys):
    from dcdit.checkpoint import save_model_dir

    ckpt = save_model_dir(tmp_path / "tiny", tiny("dcdit"))
    outs = {}
    for sampler, precision in (("dpm++2m", "fp32"), ("unipc", "bf16")):
        npz = tmp_path / f"{sampler}.npz"
        assert main(["sample", "--ckpt", str(ckpt), "--sampler", sampler, "--steps", "3", "--num-samples", "3",
                     "--batch-size", "2", "--cfg-scale", "1.5", "--uncond-drop", "0.5", "--precision", precision,
                     "--npz", str(npz), "--no-progress"]) == 0
        outs[sampler] = load_samples_npz(npz)[0]
        assert outs[sampler].shape == (3, 8, 8, 3)
    out = capsys.readouterr().out
    assert "(dpm++2m, 3 steps" in out and "(unipc, 3 steps" in out and "bf16" in out
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(ckpt), "--sampler", "heun", "--npz", str(tmp_path / "x.npz")])
