"""Training: config parsing, data order, the loop through the CLI (loss falls), stops."""
import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from dcdit.cli import main
from dcdit.training import load_train_config, train
from dcdit.chunking.ratio import ratio_targets
from dcdit.training.config import RatioConfig
from dcdit.training.data import RankBatchSampler, StepStream, local_slice

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# A DiT small enough for a step in a few milliseconds.
TINY_DIT = [
    "model.arch=dit", "model.preset=DiT-S/2", "model.overrides={hidden_size: 32, depth: 1, num_heads: 2}",
    "data.source=shapes", "data.num_samples=64", "data.image_size=8",
    "train.global_batch_size=8", "train.log_interval=2", "train.ckpt_interval=1000", "train.progress=false",
    "train.ema_decay=0.9", "train.device=cpu", "train.tensorboard=false", "optim.lr=1e-3", "samples.interval=0",
    "train.precision=fp32",  # exactness tests (DDP vs one process, resume) compare in fp32
]

# A DC-DiT of the same scale: 8x8 grid, conv encoder/decoder at width 32, 1 DiT block at 64.
TINY_DCDIT = [s for s in TINY_DIT if not s.startswith("model.")] + [
    "model.arch=dcdit", "model.preset=DC-DiT-S-N4",
    "model.overrides={d_model: [64, 64], num_heads: [4, 4], arch_layout: [c1, [D1], c1], enc_dec_dim_factor: [2, null]}",
    "ratio.group_size=4", "multibudget.enabled=true", "multibudget.start_step=1",
]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- config


def test_config_overrides_types_and_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {steps: 7, seed: 3}\noptim: {lr: 1e-4}\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain: {steps: 9}\n")
    cfg = load_train_config(tmp_path / "child.yaml", ["model.overrides.depth=2", "ratio.target_N=[4, 16]"])
    assert cfg.train.steps == 9 and cfg.train.seed == 3
    assert cfg.optim.lr == pytest.approx(1e-4)  # "1e-4" is a YAML string: read as a float
    assert cfg.model.overrides == {"depth": 2} and cfg.ratio.target_N == [4.0, 16.0]
    assert cfg.name == "child"


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "unknown config key 'train.stpes'"),
    ("train.steps=abc", "train.steps: expected int, got 'abc'"),
    ("train.precision=fp8", "train.precision"),
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("data.source=nope", "unknown data source"),
    ("ratio.target_N=1", "ratio.target_N"),
    # every sampling key is checked at load, not at the first sample grid mid-run
    ("samples.cfg_scale=-1", "samples.cfg_scale must be a finite number >= 0 (1: no guidance), got -1.0"),
    ("samples.cfg_scale=.nan", "samples.cfg_scale must be a finite number >= 0 (1: no guidance), got nan"),
    ("samples.cfg_scale=abc", "samples.cfg_scale: expected float, got 'abc'"),
    ("samples.steps=0", "samples.steps: must be an integer in 1..1000"),
    ("samples.steps=1001", "samples.steps: must be an integer in 1..1000 (diffusion.diffusion_steps), got 1001"),
    ("samples.num=0", "samples.num: must be positive, got 0"),
    ("samples.interval=-1", "samples.interval: must be >= 0"),
    ("samples.cfg=3", "unknown config key 'samples.cfg'"),
    ("multibudget.fractions=[0.1, 1.0]", "multibudget.fractions[1] must lie in [0, 1), got 1.0"),
    ("multibudget.fractions=[]", "multibudget.fractions: expected a non-empty list"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_train_config(None, [override])


def test_train_step_is_diffusion_plus_weighted_ratio_loss():
    """train_step = the diffusion's loss + weight x ratio loss on the routing; DiT gets the diffusion loss only."""
    from dcdit.chunking import ratio_loss
    from dcdit.diffusion import create_diffusion
    from dcdit.models import build_dcdit, build_dit
    from dcdit.training import train_step

    torch.manual_seed(0)
    dc = build_dcdit("DC-DiT-S-N4", input_size=8, num_classes=4, d_model=[128, 128], num_heads=[4, 4])
    with torch.no_grad():
        dc.routing_module.residual_scorer[-1].bias.fill_(1.0)  # keep most tokens, so tail dropping drops some
    dit = build_dit("DiT-S/2", input_size=8, num_classes=4)
    d = create_diffusion("")
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    y, t = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 200, 500, 999])
    loss, stats = train_step(dc, d, x, y, t, noise, tail_drop=0.3, ratio_weight=0.5, ratio_N=4.0, ratio_group=2)
    terms = d.training_losses(lambda xt, tt, y: dc(xt, tt, y, tail_drop=0.3), x, t, dict(y=y), noise=noise)
    want_ratio = ratio_loss(terms["extras"], 4.0, group_size=2)
    torch.testing.assert_close(stats["loss_ratio"], want_ratio.detach())
    torch.testing.assert_close(loss, terms["loss"].mean() + 0.5 * want_ratio)
    assert stats["keep_effective_0"] < stats["keep_natural_0"] and stats["vb"] > 0
    loss.backward()
    assert dc.routing_module.proj.weight.grad is not None  # the ratio loss reaches the router
    loss_dit, stats_dit = train_step(dit, d, x, y, t, noise, ratio_weight=0.5, ratio_N=4.0)
    assert "loss_ratio" not in stats_dit and "keep_natural_0" not in stats_dit
    torch.testing.assert_close(loss_dit, stats_dit["loss_diffusion"])
    bf16, _ = train_step(dc, d, x, y, t, noise, bf16=True)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16)
    with pytest.raises(ValueError, match="ratio_N"):
        train_step(dc, d, x, y, t, noise, ratio_weight=0.03)


def test_ratio_ramp():
    r = RatioConfig(target_N=4.0, start_N=2.0, warmup_steps=10)
    assert ratio_targets(r, 0, 1) == [2.0]
    assert ratio_targets(r, 5, 2) == [3.0, 3.0]
    assert ratio_targets(r, 50, 1) == [4.0]
    assert ratio_targets(RatioConfig(), 0, 1, model_N=16.0) == [16.0]  # null target: the model's N


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_parse(path):
    cfg = load_train_config(path)
    assert cfg.train.steps > 0


# ----------------------------------------------------------------------------- data order


def test_step_stream_epochs_and_rank_slices():
    stream = StepStream(dataset_len=10, global_batch=4, seed=1)
    seen = np.concatenate([stream.global_indices(s) for s in range(5)])  # 20 items = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert stream.position(3) == (1, 2)
    # 2 ranks x 2 micro-steps of 1 cover each step's global batch exactly once, in global order
    parts = {r: list(RankBatchSampler(stream, 0, 2, r, 2, 2)) for r in range(2)}
    for s in range(2):
        got = [None] * 4
        for r in range(2):
            for m in range(2):
                got[local_slice(m, r, 2, 1)] = parts[r][s * 2 + m]
        assert got == stream.global_indices(s).tolist()
    resumed = list(RankBatchSampler(stream, 1, 2, 0, 2, 2))
    assert resumed == parts[0][2:]


# ----------------------------------------------------------------------------- the loop


def test_cli_train_progress_bar_and_loss_falls(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--config", str(CONFIGS / "shapes_dit_cpu.yaml"), "--out", str(out)]
    for item in TINY_DIT + ["train.steps=40", "train.log_interval=10", "train.progress=true", "optim.lr=3e-3",
                            "optim.warmup_steps=0", "train.global_batch_size=16", "data.num_samples=256",
                            "samples.interval=40", "samples.num=4", "samples.steps=3"]:
        argv += ["--set", item]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "train:" in err and "40/40" in err and "loss=" in err  # the tqdm bar
    rec = records(out)
    assert [r["step"] for r in rec] == [10, 20, 30, 40]
    assert rec[-1]["loss"] < 0.7 * rec[0]["loss"], rec
    assert {"loss", "mse", "vb", "grad_norm", "images_per_sec", "lr"} <= set(rec[0])
    assert (out / "config.yaml").exists() and (out / "latest").read_text().strip() == "ckpt-0000040"
    assert (out / "samples" / "step0000040.png").exists()
    from dcdit.checkpoint import load_model

    model = load_model(out)  # the run dir loads as a model (EMA)
    assert type(model).__name__ == "DiT"


def test_cli_bad_config_key_is_one_line(tmp_path, capsys):
    code = main(["train", "--config", str(CONFIGS / "shapes_dit_cpu.yaml"), "--set", "train.stpes=5",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "unknown config key 'train.stpes'" in err


def test_cli_missing_data_path_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no_such_folder"
    code = main(["train", "--config", str(CONFIGS / "shapes_dit_cpu.yaml"), "--set", "data.source=folder",
                 "--set", f"data.path={missing}", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(missing) in err


def test_bf16_and_grad_accum(tmp_path):
    cfg = load_train_config(None, TINY_DIT + ["train.steps=2", "train.precision=bf16", "train.grad_accum=2"])
    rec = records(train(cfg, out=tmp_path / "r"))
    assert all(np.isfinite(r["loss"]) for r in rec)


def test_time_budget_stops_with_checkpoint(tmp_path):
    cfg = load_train_config(None, TINY_DIT + ["train.steps=1000", "train.max_minutes=0.0001"])
    run = train(cfg, out=tmp_path / "r")
    state = json.loads((run / "ckpt-0000001" / "train_state.json").read_text())
    assert state["step"] == 1 and state["reason"] == "time budget"


def test_sigterm_checkpoints_and_exits(tmp_path, monkeypatch):
    import dcdit.training.trainer as T

    calls = {"n": 0}
    real = T.update_ema

    def ema_then_signal(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(T, "update_ema", ema_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    run = train(load_train_config(None, TINY_DIT + ["train.steps=100"]), out=tmp_path / "r")
    state = json.loads((run / "ckpt-0000003" / "train_state.json").read_text())
    assert state["reason"] == "SIGTERM" and (run / "latest").read_text().strip() == "ckpt-0000003"
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored


def test_label_dropout_taken_over_and_reproducible(tmp_path):
    from dcdit.models.dit import DiT
    from dcdit.training.trainer import take_over_label_dropout

    m = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    assert take_over_label_dropout(m) == (pytest.approx(0.1), 10)
    assert m.y_embedder.dropout_prob == 0.0 and m.config["class_dropout_prob"] == 0.1
    a = records(train(load_train_config(None, TINY_DIT + ["train.steps=2"]), out=tmp_path / "a"))
    b = records(train(load_train_config(None, TINY_DIT + ["train.steps=2"]), out=tmp_path / "b"))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_dcdit_ratio_loss_multibudget_and_compression_logged(tmp_path):
    run = train(load_train_config(None, TINY_DCDIT + ["train.steps=4"]), out=tmp_path / "r")
    rec = records(run)
    assert {"loss_ratio", "compression_natural", "compression_effective", "tail_drop", "ratio_N"} <= set(rec[-1])
    assert all(np.isfinite(r["loss"]) for r in rec)
    assert rec[0]["tail_drop"] >= 0 and rec[-1]["ratio_N"] == 4.0
    assert rec[-1]["compression_effective"] >= rec[-1]["compression_natural"] - 1e-6
    from dcdit.checkpoint import load_model

    assert type(load_model(run)).__name__ == "DCDiT"


def test_multimultibudget_tail_drop_same_on_every_rank():
    from dcdit.training.trainer import multibudget_tail_drop

    cfg = load_train_config(None, ["multibudget.enabled=true", "multibudget.start_step=10"])
    draws = [multibudget_tail_drop(cfg, 0, step) for step in range(300)]
    assert draws == [multibudget_tail_drop(cfg, 0, step) for step in range(300)]  # a function of (seed, step) only
    assert set(draws[:10]) == {0.0} and set(draws[10:]) == set(cfg.multibudget.fractions)


def test_latents_source_trains_and_grids_need_a_vae(tmp_path):
    from types import SimpleNamespace

    from dcdit.data.latents import LatentShardWriter
    from dcdit.training.config import SamplesConfig
    from dcdit.training.samples import write_sample_grid

    w = LatentShardWriter(tmp_path / "lat", shard_size=16, meta={"image_size": 64, "num_classes": 10})
    w.add(torch.randn(24, 4, 8, 8) * 0.5, torch.arange(24) % 10)
    w.close()
    sets = [s for s in TINY_DIT if not s.startswith("data.")] + [
        "data.source=latents", f"data.path={tmp_path / 'lat'}", "train.steps=2", "samples.interval=2"]
    run = train(load_train_config(None, sets), out=tmp_path / "r")
    assert records(run)[-1]["step"] == 2 and not (run / "samples").exists()  # no VAE: grid skipped

    class FakeVAE(torch.nn.Module):  # decodes 4x8x8 latents to 3x16x16 "images"
        config = SimpleNamespace(latent_channels=4)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def decode(self, z):
            return SimpleNamespace(sample=torch.tanh(z[:, :3]).repeat_interleave(2, -1).repeat_interleave(2, -2))

    from dcdit.checkpoint import load_model
    from dcdit.data import DataConfig, build_dataset

    ds = build_dataset(DataConfig(source="latents", path=str(tmp_path / "lat")))
    png = write_sample_grid(tmp_path / "g.png", load_model(run), SamplesConfig(num=2, steps=2), ds, 1000, "linear",
                            torch.device("cpu"), vae=FakeVAE())
    from PIL import Image

    assert Image.open(png).size == (2 * 16 + 3 * 2, 16 + 2 * 2)
