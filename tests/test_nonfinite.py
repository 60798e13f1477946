"""Non-finite losses, weights and samples (issue 28): a diverging run keeps its good checkpoints.

* a step with a NaN / inf loss term or gradient norm is skipped: the run equals one that never took
  that step's update, bitwise;
* too many in a row stop the run with one line, and its last (finite) checkpoint stays, loads and resumes;
* a checkpoint holding NaN is never written, and one written by hand is refused by every loading command;
* sampling a broken model stops with an error instead of writing black images;
* under DDP a NaN on one rank only makes both ranks skip (tests/ddp_nonfinite_probe.py).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dcdit.training.step as step_module
import dcdit.training.trainer as trainer_module
from dcdit.checkpoint import load_model, load_safetensors
from dcdit.cli import main
from dcdit.training import load_train_config, train
from dcdit.training.state import find_checkpoint, list_checkpoints, save_checkpoint
from dcdit.utils import NonFiniteError, first_nonfinite

from test_training import CONFIGS, TINY_DCDIT, TINY_DIT, records

CONFIG = CONFIGS / "shapes_dit_cpu.yaml"
NAN = float("nan")


def sets(items: list[str]) -> list[str]:
    return sum((["--set", s] for s in items), [])


def ckpt_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Everything a checkpoint trains: model, EMA and optimizer tensors, by file-prefixed name."""
    out = {}
    for name in ("model", "ema", "train_state"):
        for k, v in load_file(str(ckpt / f"{name}.safetensors")).items():
            if name != "train_state" or k.startswith("optim."):
                out[f"{name}/{k}"] = v
    return out


def poison(path: Path, key: str) -> None:
    """Write NaN into one element of one tensor of a safetensors file (as a diverged run would)."""
    state = load_file(str(path))
    state[key] = state[key].clone()
    state[key].view(-1)[0] = NAN
    save_file(state, str(path))


# ----------------------------------------------------------------------------- first_nonfinite


def test_first_nonfinite_names_the_first_bad_float_tensor():
    t = {"a": torch.ones(3), "step": torch.tensor(5), "b": torch.tensor([1.0, float("inf")]),
         "c": torch.tensor([NAN])}
    assert first_nonfinite(t) == "b"
    assert first_nonfinite({"a": torch.ones(2), "i": torch.arange(3)}) is None
    assert first_nonfinite({}) is None


# ----------------------------------------------------------------------------- one skipped step


def _nan_input_at(k: int):
    """train_step whose k-th call sees an all-NaN batch: the diffusion loss (and every gradient) is NaN."""
    real, calls = trainer_module.train_step, []

    def wrapped(model, diffusion, x, *args, **kwargs):
        if len(calls) == k:
            x = torch.full_like(x, NAN)
        calls.append(1)
        return real(model, diffusion, x, *args, **kwargs)

    return "dcdit.training.trainer.train_step", wrapped


def _nan_ratio_at(k: int):
    """ratio_loss whose k-th call returns NaN: only the DC-DiT's ratio term goes bad (and the gradient)."""
    real, calls = step_module.ratio_loss, []

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        if len(calls) == k:
            out = out * NAN
        calls.append(1)
        return out

    return "dcdit.training.step.ratio_loss", wrapped


def _inf_grad_at(k: int):
    """clip_grad_norm_ whose k-th call first makes one gradient element inf: losses finite, the norm not."""
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def wrapped(params, *args, **kwargs):
        params = list(params)
        if len(calls) == k:
            params[0].grad.view(-1)[0] = float("inf")
        calls.append(1)
        return real(params, *args, **kwargs)

    return "torch.nn.utils.clip_grad_norm_", wrapped


@pytest.mark.parametrize("arch, inject, terms", [
    ("dit", _nan_input_at, "loss_diffusion / grad_norm"),
    ("dcdit", _nan_ratio_at, "loss_ratio / grad_norm"),
    ("dit", _inf_grad_at, "grad_norm"),
])
def test_one_nonfinite_step_is_skipped_and_the_run_equals_one_without_its_update(tmp_path, monkeypatch, capsys,
                                                                                 arch, inject, terms):
    """Step 4 goes bad: skipped, counted, named; the final weights equal 3 steps + (step 4 never applied) + 2."""
    tiny = (TINY_DIT if arch == "dit" else TINY_DCDIT) + ["train.log_interval=1"]
    with monkeypatch.context() as m:
        m.setattr(*inject(3))  # the 4th step (index 3)
        a = train(load_train_config(CONFIG, tiny + ["train.steps=6"]), out=tmp_path / "a")
    err = capsys.readouterr().err
    assert f"step 4: non-finite {terms} (NaN or inf): update skipped (1 in a row, 1 in this run)" in err
    recs = {r["step"]: r for r in records(a)}
    assert [recs[s]["nonfinite_steps"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert "loss" not in recs[4] and "loss" in recs[5]  # the skipped step's loss stays out of the means
    assert "step 6/6 | loss" in err and "| skipped 1" in err  # the progress line shows the count
    assert json.loads((a / "ckpt-0000006" / "train_state.json").read_text())["nonfinite_steps"] == 1

    # The reference: 3 steps, then the checkpoint relabelled step 4 (step 4's update never happened), 2 more.
    b = train(load_train_config(CONFIG, tiny + ["train.steps=3"]), out=tmp_path / "b")
    meta_path = b / "ckpt-0000003" / "train_state.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "step": 4}))
    train(load_train_config(CONFIG, tiny + ["train.steps=6"]), resume=b / "ckpt-0000003")
    got, want = ckpt_tensors(a / "ckpt-0000006"), ckpt_tensors(b / "ckpt-0000006")
    assert first_nonfinite(got) is None
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ----------------------------------------------------------------------------- divergence


def test_diverging_resume_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys):
    """The issue's case: 20 good steps, then --resume with lr 1000 (keep_last_k=1, so nothing spare to lose)."""
    run = tmp_path / "r2"
    tiny = TINY_DIT + ["train.ckpt_interval=10", "train.keep_last_k=1"]
    assert main(["train", "--out", str(run), "--config", str(CONFIG)] + sets(tiny + ["train.steps=20"])) == 0
    good = ckpt_tensors(run / "ckpt-0000020")
    capsys.readouterr()

    assert main(["train", "--resume", str(run), "--set", "train.steps=60", "--set", "optim.lr=1000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert last.startswith("dcdit train: error: step 31: 10 steps in a row (from step 22) had a non-finite "), last
    assert f"its last checkpoint {run / 'ckpt-0000020'} is kept" in last and f"try --resume {run} with a lower optim.lr (this step's: " in last
    assert any("step 30: checkpoint postponed" in line for line in err)  # no broken-but-finite ckpt-30
    # The good checkpoint is still there, untouched, named by latest; it loads and resumes.
    assert list_checkpoints(run) == [run / "ckpt-0000020"] and find_checkpoint(run) == run / "ckpt-0000020"
    after = ckpt_tensors(run / "ckpt-0000020")
    assert all(torch.equal(after[k], good[k]) for k in good)
    assert first_nonfinite(load_model(run).state_dict()) is None
    assert main(["train", "--resume", str(run), "--set", "train.steps=22", "--set", "optim.lr=1e-3"]) == 0
    assert records(run)[-1]["step"] == 22 and records(run)[-1]["nonfinite_steps"] == 0


@pytest.mark.parametrize("override, message", [
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps: must be positive, got 0"),
    ("optim.lr=.inf", "optim.lr: must be positive and finite, got inf"),
])
def test_config_checks(override, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(None, [override])


def test_a_broken_state_that_passes_the_step_check_is_still_not_saved(tmp_path, monkeypatch):
    """A NaN that reaches the EMA without a bad loss or gradient: the next save refuses, on every rank."""
    real, calls = trainer_module.update_ema, []

    def poisoned(ema, model, decay):
        real(ema, model, decay)
        calls.append(1)
        if len(calls) == 3:
            next(ema.parameters()).view(-1)[0] = NAN

    monkeypatch.setattr("dcdit.training.trainer.update_ema", poisoned)
    cfg = load_train_config(CONFIG, TINY_DIT + ["train.steps=4", "train.ckpt_interval=2"])
    with pytest.raises(NonFiniteError, match=r"step 4: the ema state holds NaN or inf \(first in .*\): not saving"):
        train(cfg, out=tmp_path / "run")
    assert list_checkpoints(tmp_path / "run") == [tmp_path / "run" / "ckpt-0000002"]
    assert find_checkpoint(tmp_path / "run") == tmp_path / "run" / "ckpt-0000002"


# ----------------------------------------------------------------------------- saving


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 2-step tiny DiT run (read-only: tests copy it)."""
    run = tmp_path_factory.mktemp("nf") / "run"
    train(load_train_config(CONFIG, TINY_DIT + ["train.steps=2"]), out=run)
    return run


@pytest.mark.parametrize("what", ["model", "ema", "optimizer"])
def test_a_checkpoint_with_nan_is_never_written(tmp_path, tiny_run, what):
    from dcdit.models.factory import build_model

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = sorted(p.name for p in run.iterdir())
    config = json.loads((run / "ckpt-0000002" / "config.json").read_text())
    model, ema = build_model(config), build_model(config)
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # gives the optimizer its moment tensors
    first = next(model.parameters())
    target = {"model": first, "ema": next(ema.parameters()), "optimizer": opt.state[first]["exp_avg"]}[what]
    with torch.no_grad():
        target.view(-1)[0] = NAN
    with pytest.raises(NonFiniteError, match=f"step 3: the {what} state holds NaN or inf .* not saving"):
        save_checkpoint(run, 3, model, ema, opt, "", keep_last_k=1)
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written, nothing pruned
    assert (run / "latest").read_text().strip() == "ckpt-0000002"


# ----------------------------------------------------------------------------- loading


LOADERS = {  # command -> argv, given the run directory and a scratch directory
    "sample": lambda run, out: ["sample", "--ckpt", str(run), "--num-samples", "2", "--steps", "2",
                                "--npz", str(out / "s.npz"), "--device", "cpu", "--no-progress"],
    "flops": lambda run, out: ["flops", "--ckpt", str(run), "--steps", "2"],
    "bench": lambda run, out: ["bench", "--dit-ckpt", str(run), "--steps", "1", "--repeats", "1"],
    "visualize": lambda run, out: ["visualize", "--ckpt", str(run), "--out", str(out / "viz"), "--steps", "2"],
    "upcycle": lambda run, out: ["upcycle", "--dit", str(run), "--preset", "DC-DiT-S-N4", "--out", str(out / "up")],
    "train --resume": lambda run, out: ["train", "--resume", str(run), "--set", "train.steps=4"],
    "train init_from": lambda run, out: ["train", "--out", str(out / "new"), "--config", str(CONFIG)]
                                        + sets(TINY_DIT + ["train.steps=1", f"model.init_from={run}"]),
}


@pytest.mark.parametrize("command", list(LOADERS))
def test_every_loading_command_refuses_nan_weights(tmp_path, tiny_run, capsys, command):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt, key = run / "ckpt-0000002", "blocks.0.attn.qkv.weight"
    for name in ("model", "ema"):
        poison(ckpt / f"{name}.safetensors", key)
    capsys.readouterr()
    assert main(LOADERS[command](run, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    which = "model" if command == "train --resume" else "ema"  # a resume reads model.safetensors first
    assert f"{ckpt / (which + '.safetensors')} holds non-finite weights (NaN or inf), first in {key}" in err, err
    assert ("pass --allow-nonfinite" in err) == (not command.startswith("train"))  # training has no such option


def test_allow_nonfinite_loads_anyway(tmp_path, tiny_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    poison(run / "ckpt-0000002" / "ema.safetensors", "final_layer.linear.bias")
    assert main(["flops", "--ckpt", str(run), "--steps", "2", "--allow-nonfinite"]) == 0
    model = load_model(run, allow_nonfinite=True)
    assert torch.isnan(model.final_layer.linear.bias).any()


# ----------------------------------------------------------------------------- sampling


def test_sampling_a_broken_model_stops_instead_of_writing_black_images(tmp_path, tiny_run, capsys):
    from dcdit.sampling import sample, sampling_diffusion_for

    model = load_model(tiny_run)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(float("inf"))  # finite-looking run, non-finite outputs
    d = sampling_diffusion_for(model, "ddim", 2)
    with pytest.raises(NonFiniteError, match=r"not finite \(NaN or inf\) in 2 of 2 samples \(first: sample 5\)"):
        sample(model, d, [0, 1], indices=[5, 6], measure_flops=False)
    x, _ = sample(model, d, [0, 1], indices=[5, 6], measure_flops=False, allow_nonfinite=True)
    assert not torch.isfinite(x).all()
    x, _ = sample(load_model(tiny_run), d, [0, 1], measure_flops=False)  # a sound model passes
    assert torch.isfinite(x).all()

    # Through the CLI: one line, nothing written.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = load_safetensors(run / "ckpt-0000002" / "ema.safetensors")
    state["final_layer.linear.weight"] = torch.full_like(state["final_layer.linear.weight"], 3e38)
    save_file(state, str(run / "ckpt-0000002" / "ema.safetensors"))  # finite weights, overflowing outputs
    capsys.readouterr()
    assert main(LOADERS["sample"](run, tmp_path) + ["--clip-denoised", "no"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dcdit sample: error: the model's output is not finite") and len(err.splitlines()) == 1
    assert not (tmp_path / "s.npz").exists()


# ----------------------------------------------------------------------------- DDP


@pytest.mark.ddp
def test_ddp_nan_on_one_rank_makes_both_ranks_skip(tmp_path, monkeypatch, capsys):
    """2 processes, a NaN loss on rank 1 only at step 2: both skip, their weights stay equal, and equal one
    process that skipped the same step (global batch 8 = 2 x 4 against 1 x 8)."""
    from ddp_nonfinite_probe import poison_loss_on_rank
    from test_ddp import torchrun

    overrides = TINY_DIT + ["train.steps=4", "data.num_samples=12", "train.log_interval=1"]
    proc = torchrun(2, [str(tmp_path / "ddp"), str(CONFIG), json.dumps(overrides), "1"], tmp_path,
                    script=Path(__file__).with_name("ddp_nonfinite_probe.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2: non-finite loss_diffusion (NaN or inf): update skipped (1 in a row, 1 in this run)" in proc.stderr
    state = json.loads((tmp_path / "ddp" / "ckpt-0000004" / "train_state.json").read_text())
    fps = state["rank_fingerprints"]
    assert len(fps) == 2 and fps[0] == fps[1] and state["nonfinite_steps"] == 1
    assert [r["nonfinite_steps"] for r in records(tmp_path / "ddp")] == [0, 1, 1, 1]

    monkeypatch.setattr("dcdit.training.trainer.train_step", poison_loss_on_rank(0, 1))
    single = train(load_train_config(CONFIG, overrides), out=tmp_path / "single")
    got, want = ckpt_tensors(tmp_path / "ddp" / "ckpt-0000004"), ckpt_tensors(single / "ckpt-0000004")
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0, msg=k)
