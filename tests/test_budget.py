"""Compute budgets on a trained pixel DC-DiT: the real run lands within 3% of a kept-share / GFLOPs target."""
import numpy as np
import pytest
import torch

from dcdit.checkpoint import load_model
from dcdit.cli import main
from dcdit.cli.sample import budget_check
from dcdit.sampling import Budget, SampleStats, create_sampling_diffusion, sample, solve_budget

# A pixel DC-DiT (16x16 RGB shapes, 2x2 stem -> 8x8 grid) trained for 60 steps with tail-drop
# training (multibudget), so its router has learned something and tail dropping is meaningful.
TRAIN = [
    "data.source=shapes", "data.num_samples=256", "data.image_size=16", "train.global_batch_size=16",
    "train.log_interval=20", "train.ckpt_interval=1000", "train.progress=false", "train.ema_decay=0.9",
    "train.device=cpu", "train.tensorboard=false", "optim.lr=2e-3", "samples.interval=0", "train.steps=60",
    "model.arch=dcdit", "model.preset=DC-DiT-S-N4",
    "model.overrides={d_model: [64, 64], num_heads: [4, 4], arch_layout: [c1, [D1], c1], "
    "enc_dec_dim_factor: [2, null], patch_size: 2}",
    "ratio.group_size=4", "multibudget.enabled=true", "multibudget.start_step=20",
]
LABELS = list(range(8))
STEPS = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dcdit.training import load_train_config, train

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run = train(load_train_config(None, TRAIN), out=tmp_path_factory.mktemp("budget") / "run")
    yield run
    torch.set_num_threads(before)


def _value(stats, kind):
    return stats.gflops_per_step if kind == "gflops" else stats.mean_kept_share[0]


@pytest.mark.parametrize("sampler,clip", [("ddim", True), ("ddim", False), ("ddpm", True), ("ddpm", False)])
def test_real_run_lands_within_3_percent(trained, sampler, clip):
    """The probe samples exactly as the real run (sampler, clipping, every step), so the run hits the target."""
    model = load_model(trained)
    d = create_sampling_diffusion(sampler, STEPS)
    kw = dict(sampler=sampler, clip_denoised=clip)
    full = sample(model, d, LABELS, tail_drop=0.0, measure_flops=False, **kw)[1].mean_kept_share[0]
    target = round(0.6 * full, 4)  # needs a real tail drop (~0.4)
    sol = solve_budget(model, Budget("keep_share", target), LABELS, diffusion=d, probe_size=len(LABELS), **kw)
    assert 0.2 < sol.tail_drop < 0.7
    _, real = sample(model, d, LABELS, tail_drop=sol.tail_drop, measure_flops=False, **kw)
    assert abs(_value(real, "keep_share") - target) <= 0.03 * target, (sampler, clip, _value(real, "keep_share"), sol)
    assert real.mean_kept_share[0] == pytest.approx(sol.measured)  # the probe *is* the real run's sampling


def test_old_style_probe_misses_where_the_matched_one_hits(trained):
    """The bug this fixes: a short DDIM probe without clipping measures another run than a clipped DDPM one."""
    model = load_model(trained)
    d = create_sampling_diffusion("ddpm", STEPS)
    full = sample(model, d, LABELS, sampler="ddpm", clip_denoised=True, measure_flops=False)[1].mean_kept_share[0]
    target = 0.6 * full
    short = solve_budget(model, Budget("keep_share", target, tolerance=0.2), LABELS, diffusion=d,
                         probe_size=len(LABELS), probe_steps=3)  # DDIM, no clipping, 3 steps: the old probe
    matched = solve_budget(model, Budget("keep_share", target), LABELS, diffusion=d, probe_size=len(LABELS),
                           sampler="ddpm", clip_denoised=True)
    run = lambda f: sample(model, d, LABELS, sampler="ddpm", clip_denoised=True, tail_drop=f,
                           measure_flops=False)[1].mean_kept_share[0]
    assert abs(run(matched.tail_drop) - target) <= 0.03 * target
    assert abs(run(matched.tail_drop) - target) < abs(run(short.tail_drop) - target)


def test_cli_gflops_budget_reports_achieved_within_3_percent(trained, tmp_path, capsys):
    model = load_model(trained)
    d = create_sampling_diffusion("ddpm", STEPS)
    lo = sample(model, d, LABELS, sampler="ddpm", clip_denoised=True, tail_drop=0.9)[1].gflops_per_step
    hi = sample(model, d, LABELS, sampler="ddpm", clip_denoised=True, tail_drop=0.0)[1].gflops_per_step
    target = round(0.5 * (lo + hi), 6)
    stats_json = tmp_path / "stats.json"
    assert main(["sample", "--ckpt", str(trained), "--num-samples", "8", "--batch-size", "8", "--steps", str(STEPS),
                 "--sampler", "ddpm", "--gflops", str(target), "--npz", str(tmp_path / "s.npz"),
                 "--stats-json", str(stats_json), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "probe of 8 of 8 samples" in err and "achieved" in err and "warning" not in err
    import json

    b = json.loads(stats_json.read_text())["budget"]
    assert b["kind"] == "gflops" and abs(b["relative_error"]) <= 0.03
    assert b["achieved"] == pytest.approx(json.loads(stats_json.read_text())["stats"]["gflops_per_step"])


def test_budget_check_says_why_it_missed():
    st = SampleStats(timesteps=[1, 0], kept_share=np.full((2, 1, 4), 0.2), num_images=4)
    ok = budget_check(Budget("keep_share", 0.199), st, 4, 4, False)
    assert ok["relative_error"] == pytest.approx(0.2 / 0.199 - 1) and "warning" not in ok["message"]
    bad = budget_check(Budget("keep_share", 0.25), st, 2, 4, True)
    assert bad["message"].startswith("warning:") and "-20.0%" in bad["message"]
    assert "--probe-size" in bad["message"] and "--probe-steps" in bad["message"]
    assert budget_check(Budget("gflops", 1.0), st, 4, 4, False) is None  # no FLOPs measured: nothing to compare
