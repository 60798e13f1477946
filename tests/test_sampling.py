"""Sampling: per-sample seeds, the sampling loop, compute budgets, npz/grid output, DDP generation."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dcdit.checkpoint import save_model_dir
from dcdit.cli import main
from dcdit.evaluation.io import load_samples_npz
from dcdit.models import DCDiT, build_dit
from dcdit.sampling import (
    Budget,
    SampleStats,
    bisect_tail_drop,
    parse_tail_drop,
    parse_tail_drops,
    create_sampling_diffusion,
    derive_seed,
    labels_for_indices,
    parse_classes,
    probe_diffusion,
    sample,
    shard_indices,
    solve_budget,
)

NUM_CLASSES = 5


def tiny_dcdit(in_channels=3, bias=0.5, seed=0):
    """A ~60k-parameter DC-DiT on an 8x8 grid; router bias 0.5 keeps most tokens, so tail dropping has room."""
    torch.manual_seed(seed)
    m = DCDiT.from_config(dict(
        input_size=8, in_channels=in_channels, num_classes=NUM_CLASSES, arch_layout=["c1", ["D2"], "c1"],
        d_model=[64, 64], num_heads=[4, 4], enc_dec_dim_factor=[2, None], norm_groups=8, router_norm_groups=4,
        router_bias_init=bias,
    ))
    with torch.no_grad():  # break the zero init so outputs depend on the input
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def tiny_dit(in_channels=3):
    torch.manual_seed(0)
    m = build_dit("DiT-S/2", input_size=8, in_channels=in_channels, depth=2, hidden_size=64, num_heads=4,
                  num_classes=NUM_CLASSES)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dcdit():
    return tiny_dcdit()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, dcdit):
    return save_model_dir(tmp_path_factory.mktemp("ckpt") / "tiny", dcdit)


# ----------------------------------------------------------------- seeds and labels


def test_seed_and_label_helpers():
    assert derive_seed(0, 1) != derive_seed(0, 2) != derive_seed(1, 1)
    assert derive_seed(3, 7) == derive_seed(3, 7)
    assert labels_for_indices([0, 1, 5, 6], 5).tolist() == [0, 1, 0, 1]
    assert labels_for_indices([0, 1, 2, 3], 5, [4, 2]).tolist() == [4, 2, 4, 2]
    assert parse_classes("1, 3", 5) == [1, 3] and parse_classes(None, 5) is None
    with pytest.raises(ValueError, match="outside"):
        parse_classes("1,9", 5)
    shards = [shard_indices(7, r, 3) for r in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(7))


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5)])
def test_samples_identical_across_batch_sizes(dcdit, sampler, eta):
    d = create_sampling_diffusion(sampler, 3)
    labels = [0, 1, 2]
    full, stats = sample(dcdit, d, labels, seed=7, sampler=sampler, eta=eta, measure_flops=False)
    parts = [sample(dcdit, d, labels[a:b], seed=7, indices=range(a, b), sampler=sampler, eta=eta,
                    measure_flops=False)[0] for a, b in ((0, 1), (1, 3))]
    torch.testing.assert_close(torch.cat(parts), full, atol=2e-4, rtol=0)
    other_seed, _ = sample(dcdit, d, labels[:1], seed=8, sampler=sampler, eta=eta, measure_flops=False)
    assert (other_seed - full[:1]).abs().max() > 0.1
    assert stats.kept_share.shape == (3, 1, 3) and stats.timesteps[0] > stats.timesteps[-1] == 0


def test_ddim_loop_matches_diffusion_and_guidance():
    """eta = 0 reproduces dcdit.diffusion's own DDIM loop; guidance runs both halves."""
    from dcdit.sampling import SampleNoise

    m = tiny_dit()
    d = create_sampling_diffusion("ddim", 4)
    ours, stats = sample(m, d, [1, 2], seed=3)
    noise = SampleNoise(3, [0, 1], (3, 8, 8)).draw()
    ref = d.ddim_sample_loop(m, noise.shape, noise=noise, model_kwargs=dict(y=torch.tensor([1, 2])),
                             clip_denoised=False, progress=False)
    torch.testing.assert_close(ours, ref)
    assert stats.kept_share is None and stats.flops_per_step.shape == (4, 2)
    _, guided = sample(m, d, [1, 2], seed=3, cfg_scale=2.0)
    assert guided.gflops_per_step == pytest.approx(2 * stats.gflops_per_step)  # both halves are charged
    with pytest.raises(ValueError, match="DC-DiT"):
        sample(m, d, [1], tail_drop=0.2)


def test_stats_merge_and_lite_cfg(dcdit):
    d = create_sampling_diffusion("ddim", 2)
    _, a = sample(dcdit, d, [0, 1], cfg_scale=1.5, tail_drop=0.0, uncond_drop=0.9)
    _, b = sample(dcdit, d, [2], indices=[2], cfg_scale=1.5, tail_drop=0.0, uncond_drop=0.9, measure_flops=False)
    merged = SampleStats.merge([a, b])
    assert merged.num_images == 3 and merged.kept_share.shape == (2, 1, 3)
    assert merged.flops_per_step.shape == (2, 2)  # only the measured batch
    _, full = sample(dcdit, d, [0, 1], cfg_scale=1.5, tail_drop=0.0)
    assert a.gflops_per_step < full.gflops_per_step  # Lite-CFG drops most of the unconditional half
    assert set(a.to_dict()) >= {"gflops_per_step", "mean_kept_share", "kept_share_by_t"}


# ----------------------------------------------------------------- budgets


def step_cost(f):
    """A stub DC-DiT: 100 boundary tokens, floor(f * 100) dropped, scaffold + linear + quadratic cost."""
    kept = 100 - np.floor(f * 100)
    return 3.0 + 0.05 * kept + 0.0003 * kept**2


@pytest.mark.parametrize("target", [3.3, 5.0, 7.9, 10.9])
def test_bisection_on_stub_cost_lands_within_5_percent(target):
    sol = bisect_tail_drop(step_cost, target, "gflops")
    assert abs(step_cost(sol.tail_drop) - target) <= 0.05 * target
    assert len(sol.evaluations) <= 12 and sol.reachable == (step_cost(0.99), step_cost(0.0))


def test_budget_errors():
    with pytest.raises(ValueError, match=r"outside the reachable range 3\.05.*11"):
        bisect_tail_drop(step_cost, 20.0, "gflops")
    with pytest.raises(ValueError, match="within 5%"):  # a cost that jumps over the target
        bisect_tail_drop(lambda f: 10.0 if f < 0.5 else 2.0, 6.0, "gflops")
    with pytest.raises(ValueError, match="--tail-drop and --gflops"):
        Budget.from_options(tail_drop=0.1, gflops=3.0)
    with pytest.raises(ValueError, match="keep share"):
        Budget("keep_share", 1.5)
    assert Budget.from_options() is None


def test_parse_tail_drop_is_the_one_user_input_check():
    assert parse_tail_drop("0.25") == 0.25 and parse_tail_drop(0) == 0.0
    assert parse_tail_drops(" 0, 0.3,0.6 ", "--tail-drop") == [0.0, 0.3, 0.6]
    for bad, msg in (("1", "x must lie in \\[0, 1\\), got '1'"), (-0.5, "got -0.5"), ("nan", "got 'nan'"),
                     ("abc", "x must be a number in \\[0, 1\\), got 'abc'"), (None, "got None"), (True, "got True")):
        with pytest.raises(ValueError, match=msg):
            parse_tail_drop(bad, "x")
    with pytest.raises(ValueError, match="--tail-drop must lie in .*got '1.2'"):
        parse_tail_drops("0,1.2", "--tail-drop")
    with pytest.raises(ValueError, match="comma-separated"):
        parse_tail_drops(" , ", "--tail-drop")
    with pytest.raises(ValueError, match="tail_drop must lie in"):
        Budget("tail_drop", 1.0)


def test_probe_diffusion_keeps_original_timesteps():
    d = create_sampling_diffusion("ddpm", 50)
    p = probe_diffusion(d, 5)
    assert p.num_timesteps == 5
    assert p.timestep_map.tolist() == [d.timestep_map[i].item() for i in (0, 12, 24, 37, 49)]
    np.testing.assert_allclose(p.alphas_cumprod, d.alphas_cumprod[[0, 12, 24, 37, 49]])


@pytest.mark.parametrize("kind", ["gflops", "keep_share"])
def test_budget_on_tiny_dcdit_lands_within_5_percent(dcdit, kind):
    d = create_sampling_diffusion("ddim", 4)
    labels = [0, 1, 2]
    lo = sample(dcdit, d, labels, tail_drop=0.95, measure_flops=kind == "gflops")[1]
    hi = sample(dcdit, d, labels, tail_drop=0.0, measure_flops=kind == "gflops")[1]
    value = (lambda s: s.gflops_per_step) if kind == "gflops" else (lambda s: s.mean_kept_share[0])
    target = 0.5 * (value(lo) + value(hi))
    count = kind == "gflops"
    sol = solve_budget(dcdit, Budget(kind, target), labels, diffusion=d, probe_steps=2)
    _, real = sample(dcdit, d, labels + [3, 4], tail_drop=sol.tail_drop, measure_flops=count)  # more samples
    assert abs(value(real) - target) <= 0.05 * target, (value(real), target, sol)
    with pytest.raises(ValueError, match="reachable range"):
        solve_budget(dcdit, Budget(kind, 0.2 * value(lo)), labels, diffusion=d, probe_steps=2)


# ----------------------------------------------------------------- CLI and output


def test_cli_npz_round_trip_and_grid(ckpt, tmp_path):
    npz, grid, stats = tmp_path / "s.npz", tmp_path / "g.png", tmp_path / "stats.json"
    code = main(["sample", "--ckpt", str(ckpt), "--num-samples", "5", "--batch-size", "2", "--steps", "3",
                 "--classes", "4,1", "--npz", str(npz), "--grid", str(grid), "--stats-json", str(stats),
                 "--gflops", "1e9", "--no-progress"][:-3] + ["--tail-drop", "0.3", "--no-progress"])
    assert code == 0
    images, labels = load_samples_npz(npz)
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert labels.tolist() == [4, 1, 4, 1, 4]
    with np.load(npz) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
    from PIL import Image

    assert Image.open(grid).size == (3 * 10 + 2, 2 * 10 + 2)  # 3 columns x 2 rows of 8px with 2px padding
    import json

    st = json.loads(stats.read_text())
    assert st["tail_drop"] == 0.3 and len(st["stats"]["gflops_per_step_by_t"]) == 3
    # The same seeds give the same images with another batch size.
    again = tmp_path / "again.npz"
    assert main(["sample", "--ckpt", str(ckpt), "--num-samples", "5", "--batch-size", "5", "--steps", "3",
                 "--classes", "4,1", "--npz", str(again), "--tail-drop", "0.3", "--no-progress"]) == 0
    assert np.abs(load_samples_npz(again)[0].astype(int) - images).max() <= 1


def test_cli_gflops_budget_and_errors(ckpt, tmp_path, capsys):
    npz = tmp_path / "b.npz"
    assert main(["sample", "--ckpt", str(ckpt), "--num-samples", "2", "--steps", "3", "--npz", str(npz),
                 "--gflops", "1000", "--no-progress"]) == 2
    assert "outside the reachable range" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(ckpt), "--steps", "3", "--no-progress"]) == 2
    assert "nothing to write" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(ckpt), "--npz", str(npz), "--uncond-drop", "0.5"]) == 2
    assert "needs guidance" in capsys.readouterr().err
    dit_dir = save_model_dir(tmp_path / "dit", tiny_dit())
    assert main(["sample", "--ckpt", str(dit_dir), "--npz", str(npz), "--keep-share", "0.5"]) == 2
    assert "DC-DiT" in capsys.readouterr().err


def test_latent_model_without_vae_saves_latents(tmp_path):
    ck = save_model_dir(tmp_path / "latent", tiny_dcdit(in_channels=4))
    npz = tmp_path / "lat.npz"
    with pytest.warns(UserWarning, match="raw latents"):
        assert main(["sample", "--ckpt", str(ck), "--num-samples", "3", "--steps", "2", "--npz", str(npz),
                     "--grid", str(tmp_path / "g.png"), "--no-progress"]) == 0
    with np.load(npz) as f:
        assert f["latents"].shape == (3, 4, 8, 8) and f["labels"].tolist() == [0, 1, 2]
    assert not (tmp_path / "g.png").exists()


def test_cli_flops_per_step_and_json(ckpt, tmp_path, capsys):
    out = tmp_path / "flops.json"
    assert main(["flops", "--ckpt", str(ckpt), "--steps", "3", "--tail-drop", "0,0.5", "--per-step",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "main network" in text and "f=0.5" in text
    import json

    runs = json.loads(out.read_text())["runs"]
    assert [r["tail_drop"] for r in runs] == [0.0, 0.5]
    assert runs[1]["gflops_per_step"] < runs[0]["gflops_per_step"]
    for r in runs:  # components add up to the total, per step and over the run
        assert sum(r["components_per_step"].values()) == pytest.approx(r["gflops_per_step"], rel=1e-6)
        assert r["gflops_per_image"] == pytest.approx(3 * r["gflops_per_step"], rel=1e-6)


@pytest.mark.ddp
def test_ddp_sampling_two_processes(ckpt, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not available")
    npz = tmp_path / "ddp.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash prints every thread's stack
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "dcdit", "sample", "--ckpt", str(ckpt),
           "--num-samples", "7", "--batch-size", "2", "--steps", "2", "--npz", str(npz), "--no-progress",
           "--precision", "fp32"]  # fp32: batch composition changes bf16 rounding, the check is about sharding
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)  # own process group: a hang is killed with its workers
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("torchrun sampling timed out")
    assert proc.returncode == 0 and npz.exists(), err[-2000:]
    assert "still referenced" not in err  # teardown freed the gloo group before interpreter shutdown
    images, labels = load_samples_npz(npz)
    assert images.shape[0] == 7 and labels.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert not list(tmp_path.glob(".*parts*"))  # rank parts cleaned up
    single = tmp_path / "single.npz"
    assert main(["sample", "--ckpt", str(ckpt), "--num-samples", "7", "--batch-size", "7", "--steps", "2",
                 "--npz", str(single), "--no-progress", "--precision", "fp32"]) == 0
    ref = load_samples_npz(single)[0]
    assert np.abs(ref.astype(int) - images).max() <= 1  # same samples, each exactly once, in index order
    flat = images.reshape(7, -1)
    assert len({row.tobytes() for row in flat}) == 7


def test_cli_bench_side_by_side(tmp_path, capsys):
    import json

    out = tmp_path / "bench.json"
    assert main(["bench", "--image-size", "32", "--steps", "1", "--repeats", "1", "--warmup", "0",
                 "--batch-size", "1", "--tail-drop", "0,0.5", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["arch"] for r in rows] == ["DiT", "DCDiT", "DCDiT"] and rows[0]["speedup_vs_dit"] == 1.0
    assert rows[2]["gflops_per_step"] < rows[1]["gflops_per_step"]  # tail dropping saves compute
    assert all(r["images_per_second"] > 0 and len(r["seconds"]) == 1 for r in rows)
    assert "DC-DiT-S-N4" in capsys.readouterr().out


def test_latent_model_grid_without_vae_is_an_error(tmp_path, capsys):
    """Issue 29: --grid alone on a latent model without --vae used to exit 0 having written nothing."""
    ck = save_model_dir(tmp_path / "latent", tiny_dcdit(in_channels=4))
    grid = tmp_path / "g.png"
    assert main(["sample", "--ckpt", str(ck), "--num-samples", "2", "--steps", "2", "--grid", str(grid),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs them decoded: give --vae DIR" in err and "--npz" in err
    assert not grid.exists()
