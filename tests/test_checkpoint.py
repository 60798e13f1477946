"""Training checkpoints: exact resume, atomic save, pruning, clear errors on damaged files."""
import json
from pathlib import Path

import pytest
import torch

from dcdit.checkpoint import load_model, load_safetensors
from dcdit.cli import main
from dcdit.training import load_train_config, train
from dcdit.training.state import list_checkpoints, load_checkpoint

from test_training import CONFIGS, TINY_DIT

CPU_CONFIG = ["--config", str(CONFIGS / "shapes_dit_cpu.yaml")]

# Label dropout on, 2 micro-steps, 40 samples / 12 per step: resumes cross an epoch boundary mid-batch.
RESUME = TINY_DIT + ["data.num_samples=40", "train.global_batch_size=12", "train.grad_accum=2"]


def weights(ckpt_dir: Path, name: str) -> dict:
    return load_safetensors(ckpt_dir / f"{name}.safetensors")


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_exact(tmp_path):
    straight = train(load_train_config(None, RESUME + ["train.steps=6"]), out=tmp_path / "straight")
    part = train(load_train_config(None, RESUME + ["train.steps=3"]), out=tmp_path / "split")
    assert (part / "latest").read_text().strip() == "ckpt-0000003"
    resumed = train(load_train_config(None, RESUME + ["train.steps=6"]), out=tmp_path / "split", resume=True)
    a, b = straight / "ckpt-0000006", resumed / "ckpt-0000006"
    for name in ("model", "ema", "train_state"):
        x, y = weights(a, name), weights(b, name)
        if name == "train_state":  # optimizer moments and step counts; RNG snapshots may differ
            x = {k: v for k, v in x.items() if k.startswith("optim.")}
            y = {k: v for k, v in y.items() if k.startswith("optim.")}
        assert_same(x, y)
    loss = lambda run: {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    a, b = loss(straight), loss(resumed)  # same logging windows (steps 1-2 and 5-6): same losses
    assert (a[2], a[6]) == (b[2], b[6])


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import dcdit.training.state as S

    real = S.save_json
    calls = {"n": 0}

    def failing_save_json(path, obj):
        if Path(path).name == S.STATE_JSON:
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint dies just before completing
                raise OSError("disk full (simulated)")
        real(path, obj)

    monkeypatch.setattr(S, "save_json", failing_save_json)
    run = tmp_path / "run"
    cfg = load_train_config(None, TINY_DIT + ["train.steps=4", "train.ckpt_interval=2"])
    with pytest.raises(OSError, match="simulated"):
        train(cfg, out=run)
    monkeypatch.setattr(S, "save_json", real)
    assert (run / "latest").read_text().strip() == "ckpt-0000002"
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-0000002"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no half-written directory left
    assert load_checkpoint(run / "ckpt-0000002")["step"] == 2
    load_model(run)  # still loadable as a model
    train(cfg, out=run, resume=True)  # and resumable
    assert (run / "latest").read_text().strip() == "ckpt-0000004"


def test_keep_last_k(tmp_path):
    run = train(load_train_config(None, TINY_DIT + ["train.steps=5", "train.ckpt_interval=1",
                                                    "train.keep_last_k=2"]), out=tmp_path / "r")
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-0000004", "ckpt-0000005"]


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "r")] + CPU_CONFIG
    sets = sum((["--set", s] for s in TINY_DIT + ["train.steps=1"]), [])
    assert main(args + sets) == 0
    assert main(args + sets) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_truncated_checkpoint_is_one_line_error(tmp_path, capsys):
    run = tmp_path / "r"
    sets = sum((["--set", s] for s in TINY_DIT + ["train.steps=2"]), [])
    assert main(["train", "--out", str(run)] + CPU_CONFIG + sets) == 0
    f = run / "ckpt-0000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capsys.readouterr()
    code = main(["train", "--resume", str(run)] + ["--set", "train.steps=4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "truncated" in err and "model.safetensors" in err


def test_resume_without_checkpoint_is_clear(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
